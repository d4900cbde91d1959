-- Where a pair's texts come from. `correction`: chosen = the Aligner's correction, rejected =
-- the upstream's answer (every pair before this column). The two others come from
-- `rounds.synthesize.benign_preference`, for prompts its rule calls benign: chosen = the
-- upstream's answer, rejected = the Aligner's refusal of it (`answer_over_aligner_refusal`)
-- or a fixed refusal text (`answer_over_refusal_text`).
ALTER TABLE pairs ADD COLUMN origin TEXT NOT NULL DEFAULT 'correction'
    CHECK (origin IN ('correction', 'answer_over_aligner_refusal', 'answer_over_refusal_text'));
