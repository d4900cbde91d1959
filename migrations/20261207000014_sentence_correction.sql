-- Sentence-by-sentence correction (`aligner serve --stream-correction sentence`): the trace of
-- each answer's steps, how long the first corrected text took, and an upstream that broke
-- off mid-answer (its partial answer and correction are kept, but are not Q-A-C data).
ALTER TABLE proxy_records ADD COLUMN sentences TEXT;      -- JSON [{sentence, correction, aligner_ms, ...}]
ALTER TABLE proxy_records ADD COLUMN first_correction_ms REAL;  -- from the request to the first corrected text
ALTER TABLE proxy_records ADD COLUMN upstream_error TEXT;

DROP VIEW proxy_qac;
CREATE VIEW proxy_qac AS
SELECT question, answer, correction, upstream_model, aligner_model, template_id, requested_at
FROM proxy_records
WHERE status = 'corrected' AND correction IS NOT NULL AND upstream_error IS NULL
ORDER BY id;
