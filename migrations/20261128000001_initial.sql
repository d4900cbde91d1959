-- The store of one or more pipeline runs. Every row carries its provenance (run, round,
-- model, checkpoint, template, sampling, tokens, latency, time). Timestamps are UTC ISO-8601.

CREATE TABLE runs (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL,
    pipeline_path   TEXT NOT NULL,
    spec_json       TEXT NOT NULL,            -- canonical snapshot of the validated spec
    spec_hash       TEXT NOT NULL,            -- sha256 of spec_json
    status          TEXT NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
    error           TEXT,
    lease_holder    TEXT,                     -- "pid 123 on host h" while a process drives the run
    lease_expires_ms INTEGER,                 -- unix ms; a lease past this is free
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     TEXT
);
CREATE INDEX runs_name ON runs (name, id);

CREATE TABLE rounds (
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    upstream_model  TEXT NOT NULL,            -- the spec's model key
    upstream_ref    TEXT NOT NULL,            -- what answered: model name, path or served checkpoint
    checkpoint_id   INTEGER REFERENCES checkpoints (id),  -- NULL in round 1
    started_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     TEXT,
    PRIMARY KEY (run_id, round)
);

CREATE TABLE stage_executions (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,          -- 0 for run-level stages (ingest)
    stage           TEXT NOT NULL CHECK (stage IN ('ingest', 'generate', 'correct', 'synthesize', 'train', 'evaluate')),
    status          TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    total           INTEGER,
    done            INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    executions      INTEGER NOT NULL DEFAULT 1, -- 1 + times it was resumed
    error           TEXT,
    started_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     TEXT,
    UNIQUE (run_id, round, stage)
);

CREATE TABLE prompts (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    idx             INTEGER NOT NULL,          -- order within the run
    source_id       TEXT NOT NULL,             -- the id column, or the source row number
    split           TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
    system          TEXT,
    prompt          TEXT NOT NULL,
    prompt_hash     TEXT NOT NULL,             -- of the normalized text, for duplicate detection
    metadata        TEXT,                      -- JSON object of the mapped extra columns
    UNIQUE (run_id, idx)
);

CREATE TABLE checkpoints (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,          -- the round whose train stage made it
    training_job_id INTEGER NOT NULL REFERENCES training_jobs (id),
    path            TEXT NOT NULL,
    serve_model     TEXT,                      -- the model name a server exposes it under
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, round)
);

CREATE TABLE generations (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    prompt_id       INTEGER NOT NULL REFERENCES prompts (id),
    sample_idx      INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text            TEXT,
    finish_reason   TEXT,
    model           TEXT NOT NULL,             -- the spec's model key
    backend         TEXT NOT NULL,             -- backend id (kind, url, model)
    served_model    TEXT,                      -- model name the server reported
    checkpoint_id   INTEGER REFERENCES checkpoints (id),
    sampling        TEXT NOT NULL,             -- JSON
    prompt_tokens   INTEGER,
    completion_tokens INTEGER,
    latency_ms      REAL,
    attempts        INTEGER NOT NULL,
    error           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, round, prompt_id, sample_idx)
);
-- Keyset pages of a round's generations (correct and synthesize read them in id order).
CREATE INDEX generations_round_id ON generations (run_id, round, id);

CREATE TABLE corrections (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    generation_id   INTEGER NOT NULL UNIQUE REFERENCES generations (id),
    status          TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text            TEXT,
    finish_reason   TEXT,
    model           TEXT NOT NULL,
    backend         TEXT NOT NULL,
    served_model    TEXT,
    template_id     TEXT NOT NULL,
    template_hash   TEXT NOT NULL,             -- sha256 of the exact template text
    sampling        TEXT NOT NULL,
    prompt_tokens   INTEGER,
    completion_tokens INTEGER,
    latency_ms      REAL,
    attempts        INTEGER NOT NULL,
    error           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX corrections_round ON corrections (run_id, round);

CREATE TABLE pairs (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    prompt_id       INTEGER NOT NULL REFERENCES prompts (id),
    generation_id   INTEGER NOT NULL UNIQUE REFERENCES generations (id),
    correction_id   INTEGER REFERENCES corrections (id),
    chosen          TEXT,                      -- the correction
    rejected        TEXT,                      -- the original answer
    verdict         TEXT NOT NULL CHECK (verdict IN ('kept', 'dropped')),
    reason          TEXT,                      -- why it was dropped
    edit_distance   REAL,                      -- normalized, 0 = identical
    length_ratio    REAL,                      -- len(chosen) / len(rejected)
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX pairs_round ON pairs (run_id, round, verdict);
CREATE INDEX pairs_correction ON pairs (correction_id);

CREATE TABLE training_jobs (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    method          TEXT NOT NULL,
    backend         TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,             -- JSON
    reference_policy TEXT NOT NULL,            -- initial | previous
    reference_model TEXT NOT NULL,             -- what that resolved to this round
    base_model      TEXT NOT NULL,
    data_path       TEXT NOT NULL,
    pairs           INTEGER NOT NULL,
    output_dir      TEXT NOT NULL,
    command         TEXT,
    pgid            INTEGER,                   -- process group of the running command
    status          TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    exit_code       INTEGER,
    error           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 1,
    started_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     TEXT,
    UNIQUE (run_id, round)
);

CREATE TABLE training_logs (
    id              INTEGER PRIMARY KEY,
    training_job_id INTEGER NOT NULL REFERENCES training_jobs (id),
    attempt         INTEGER NOT NULL,
    stream          TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    line            TEXT NOT NULL,
    ts              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX training_logs_job ON training_logs (training_job_id, attempt, id);

-- Per-step training metrics, named as TRL names them (loss, rewards/chosen, ...).
CREATE TABLE training_metrics (
    training_job_id INTEGER NOT NULL REFERENCES training_jobs (id),
    step            INTEGER NOT NULL,
    name            TEXT NOT NULL,
    value           REAL NOT NULL,
    PRIMARY KEY (training_job_id, step, name)
);

-- Append-only: what happened, in order.
CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id          INTEGER REFERENCES runs (id),
    round           INTEGER,
    stage           TEXT,
    level           TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    kind            TEXT NOT NULL,
    message         TEXT NOT NULL,
    data            TEXT,                      -- JSON
    ts              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

-- One line per round: what a user asks first.
CREATE VIEW round_summary AS
SELECT
    r.run_id,
    r.round,
    r.status,
    r.upstream_ref,
    (SELECT count(*) FROM generations g WHERE g.run_id = r.run_id AND g.round = r.round AND g.status = 'ok') AS generations_ok,
    (SELECT count(*) FROM generations g WHERE g.run_id = r.run_id AND g.round = r.round AND g.status = 'failed') AS generations_failed,
    (SELECT count(*) FROM corrections c WHERE c.run_id = r.run_id AND c.round = r.round AND c.status = 'ok') AS corrections_ok,
    (SELECT count(*) FROM corrections c WHERE c.run_id = r.run_id AND c.round = r.round AND c.status = 'failed') AS corrections_failed,
    (SELECT count(*) FROM pairs p WHERE p.run_id = r.run_id AND p.round = r.round AND p.verdict = 'kept') AS pairs_kept,
    (SELECT count(*) FROM pairs p WHERE p.run_id = r.run_id AND p.round = r.round AND p.verdict = 'dropped') AS pairs_dropped,
    (SELECT round(avg(CASE WHEN trim(c.text) = trim(g.text) THEN 1.0 ELSE 0.0 END), 4)
       FROM corrections c JOIN generations g ON g.id = c.generation_id
      WHERE c.run_id = r.run_id AND c.round = r.round AND c.status = 'ok') AS copy_rate,
    (SELECT round(avg(length(g.text)), 1) FROM generations g
      WHERE g.run_id = r.run_id AND g.round = r.round AND g.status = 'ok') AS mean_len_original,
    (SELECT round(avg(length(c.text)), 1) FROM corrections c
      WHERE c.run_id = r.run_id AND c.round = r.round AND c.status = 'ok') AS mean_len_correction,
    (SELECT json_group_object(reason, n) FROM (
        SELECT p.reason, count(*) AS n FROM pairs p
         WHERE p.run_id = r.run_id AND p.round = r.round AND p.verdict = 'dropped'
         GROUP BY p.reason ORDER BY p.reason)) AS drop_reasons,
    r.started_at,
    r.finished_at
FROM rounds r;

-- The kept pairs of each run's latest round whose synthesize stage has finished.
CREATE VIEW pairs_latest AS
SELECT p.run_id, p.round, p.id AS pair_id, pr.prompt, p.chosen, p.rejected,
       p.edit_distance, p.length_ratio, c.template_id, g.model AS upstream_model, c.model AS aligner_model
FROM pairs p
JOIN prompts pr ON pr.id = p.prompt_id
JOIN generations g ON g.id = p.generation_id
LEFT JOIN corrections c ON c.id = p.correction_id
WHERE p.verdict = 'kept'
  AND p.round = (SELECT max(s.round) FROM stage_executions s
                  WHERE s.run_id = p.run_id AND s.stage = 'synthesize' AND s.status = 'done');

-- Stage progress for `aligner status`.
CREATE VIEW stage_progress AS
SELECT run_id, round, stage, status, total, done, failed, executions, error, started_at, finished_at
FROM stage_executions;

-- Every failed item with its error.
CREATE VIEW failures AS
SELECT run_id, round, 'generate' AS stage, id AS item_id, prompt_id, attempts, error, created_at
  FROM generations WHERE status = 'failed'
UNION ALL
SELECT c.run_id, c.round, 'correct', c.id, g.prompt_id, c.attempts, c.error, c.created_at
  FROM corrections c JOIN generations g ON g.id = c.generation_id WHERE c.status = 'failed';
