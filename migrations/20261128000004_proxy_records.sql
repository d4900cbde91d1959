-- The correction proxy (`aligner serve --upstream URL --aligner MODEL --record STORE`): one row
-- per corrected choice, as future question-answer-correction training data. Not tied to a run.

-- `question` is the last user message the Aligner read; `messages` the whole request
-- conversation as JSON. `correction` is NULL when the Aligner failed and the proxy passed the
-- answer through (`--on-aligner-error passthrough`), with the error in `aligner_error`.
-- Timestamps: when the request arrived, when the upstream answered, when the Aligner finished.
CREATE TABLE proxy_records (
    id                          INTEGER PRIMARY KEY,
    request_id                  TEXT NOT NULL,     -- the response's `id` (chatcmpl-...)
    choice                      INTEGER NOT NULL,  -- the choice index
    question                    TEXT NOT NULL,
    messages                    TEXT NOT NULL,
    answer                      TEXT NOT NULL,
    correction                  TEXT,
    status                      TEXT NOT NULL CHECK (status IN ('corrected', 'passthrough')),
    aligner_error               TEXT,
    upstream_url                TEXT NOT NULL,     -- base URL, never with credentials
    upstream_model              TEXT NOT NULL,     -- the model name the upstream reported
    aligner_model               TEXT NOT NULL,
    template_id                 TEXT NOT NULL,
    template_hash               TEXT NOT NULL,     -- SHA-256 of the template text
    answer_finish_reason        TEXT,
    correction_finish_reason    TEXT,
    upstream_prompt_tokens      INTEGER,
    upstream_completion_tokens  INTEGER,
    aligner_prompt_tokens       INTEGER,
    aligner_completion_tokens   INTEGER,
    upstream_ms                 REAL,
    aligner_ms                  REAL,
    stream                      INTEGER NOT NULL,  -- 1 when the client asked for a stream
    requested_at                TEXT NOT NULL,
    answered_at                 TEXT NOT NULL,
    corrected_at                TEXT,
    created_at                  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (request_id, choice)
);

CREATE INDEX proxy_records_requested ON proxy_records (requested_at);

-- The corrected rows with the columns `aligner train-aligner --data` reads.
CREATE VIEW proxy_qac AS
SELECT question, answer, correction, upstream_model, aligner_model, template_id, requested_at
FROM proxy_records
WHERE status = 'corrected' AND correction IS NOT NULL
ORDER BY id;
