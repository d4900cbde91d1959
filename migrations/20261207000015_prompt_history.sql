-- Multi-turn prompts: the conversation before the prompt (`prompts.fields.messages`), as
-- JSON `[{"role": ..., "content": ...}, ...]`; NULL for a single-turn prompt. The same for
-- the round-0 Aligner's teaching rows (`aligner.teach.prompts.fields.messages`).
ALTER TABLE prompts ADD COLUMN history TEXT;
ALTER TABLE aligner_examples ADD COLUMN history TEXT;
