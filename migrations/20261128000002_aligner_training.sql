-- The pipeline's own Aligner (`aligner:` in the spec), trained before round 1 as round 0:
-- stages `teach` (answers and the teacher's corrections), `train_aligner` and
-- `evaluate_aligner` (the trained Aligner on held-out rows). Their rows live in
-- `aligner_examples`; `aligner_eval` sums up the held-out check.

-- SQLite cannot change a CHECK in place: rebuild `stage_executions` with the new stage names
-- (and the views that read it).
DROP VIEW stage_progress;
DROP VIEW pairs_latest;

CREATE TABLE stage_executions_new (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,          -- 0 for run-level stages (ingest, the Aligner's)
    stage           TEXT NOT NULL CHECK (stage IN ('ingest', 'teach', 'train_aligner', 'evaluate_aligner',
                                                   'generate', 'correct', 'synthesize', 'train', 'evaluate')),
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
INSERT INTO stage_executions_new SELECT * FROM stage_executions;
DROP TABLE stage_executions;
ALTER TABLE stage_executions_new RENAME TO stage_executions;

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

CREATE VIEW stage_progress AS
SELECT run_id, round, stage, status, total, done, failed, executions, error, started_at, finished_at
FROM stage_executions;

-- One question-answer-correction row of the Aligner's data: from the `data` file, or a teach
-- prompt with the answer a model gave and the correction the teacher wrote. Held-out rows also
-- get the trained Aligner's output and the refusal flags of the refusal detector.
CREATE TABLE aligner_examples (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    idx             INTEGER NOT NULL,          -- order within the run
    source_id       TEXT NOT NULL,             -- the id column, or the source row number
    split           TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
    label           TEXT CHECK (label IN ('harmful', 'benign')),  -- NULL without `aligner.labels`
    question        TEXT NOT NULL,
    metadata        TEXT,                      -- JSON object of the mapped extra columns
    answer          TEXT,
    answer_finish   TEXT,                      -- stop | length
    answer_model    TEXT,
    correction      TEXT,
    teacher         TEXT,                      -- `data`, `refusal`, or the teacher model's key
    error           TEXT,                      -- the last failure of an answer or teacher call
    output          TEXT,                      -- the trained Aligner's correction (held-out rows)
    output_finish   TEXT,
    answer_refusal  INTEGER,                   -- 1 when the refusal detector flags the text
    correction_refusal INTEGER,
    output_refusal  INTEGER,
    output_edit_distance REAL,                 -- normalized, between output and answer; 0 = copy
    UNIQUE (run_id, idx)
);

-- The held-out check of each run's trained Aligner, per label: how often the upstream's
-- answers, the teacher's corrections and the Aligner's outputs are refusals, and how much the
-- Aligner changed the answers.
CREATE VIEW aligner_eval AS
SELECT run_id,
       coalesce(label, 'unlabelled') AS label,
       count(*) AS rows,
       round(avg(answer_refusal), 4) AS refusal_rate_answer,
       round(avg(correction_refusal), 4) AS refusal_rate_teacher,
       round(avg(output_refusal), 4) AS refusal_rate_aligner,
       round(avg(CASE WHEN trim(output) = trim(answer) THEN 1.0 ELSE 0.0 END), 4) AS copy_rate,
       round(avg(output_edit_distance), 4) AS mean_edit_distance,
       round(avg(length(answer)), 1) AS mean_len_answer,
       round(avg(length(output)), 1) AS mean_len_output
FROM aligner_examples
WHERE split = 'holdout' AND output IS NOT NULL
GROUP BY run_id, label;
