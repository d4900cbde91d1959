-- Tokens and latency of every model call, and what they cost.
--
-- The calls that stored none before: held-out answers (prompt tokens), judge calls, and the
-- round-0 answer, teacher and Aligner calls of `aligner_examples`.
ALTER TABLE eval_answers ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE eval_judgements ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE eval_judgements ADD COLUMN completion_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN answer_prompt_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN answer_completion_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN answer_latency_ms REAL;
ALTER TABLE aligner_examples ADD COLUMN teacher_prompt_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN teacher_completion_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN teacher_latency_ms REAL;
ALTER TABLE aligner_examples ADD COLUMN output_model TEXT;
ALTER TABLE aligner_examples ADD COLUMN output_prompt_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN output_completion_tokens INTEGER;
ALTER TABLE aligner_examples ADD COLUMN output_latency_ms REAL;
-- The model key a training job trains (the generate model, or the Aligner's name in round 0).
ALTER TABLE training_jobs ADD COLUMN model TEXT;

-- `prices:` of the pipeline, per run (written when the run starts or resumes).
CREATE TABLE model_prices (
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    model           TEXT NOT NULL,
    input           REAL NOT NULL,             -- per million prompt tokens
    output          REAL NOT NULL,             -- per million completion tokens
    per_hour        REAL NOT NULL,             -- per hour of the stages and jobs that run it
    PRIMARY KEY (run_id, model)
);

-- Every model call the project made, one row each.
CREATE VIEW model_calls AS
SELECT run_id, round, 'generate' AS stage, model, status, prompt_tokens, completion_tokens, latency_ms FROM generations
UNION ALL
SELECT run_id, round, 'correct', model, status, prompt_tokens, completion_tokens, latency_ms FROM corrections
UNION ALL
-- The initial model's held-out answers are made in round 1.
SELECT run_id, max(version, 1), 'evaluate', model, status, prompt_tokens, completion_tokens, latency_ms FROM eval_answers
UNION ALL
SELECT run_id, round, 'evaluate', judge, status, prompt_tokens, completion_tokens, latency_ms FROM eval_judgements
UNION ALL
SELECT run_id, 0, 'teach', answer_model, 'ok', answer_prompt_tokens, answer_completion_tokens, answer_latency_ms
FROM aligner_examples WHERE answer_latency_ms IS NOT NULL
UNION ALL
SELECT run_id, 0, 'teach', teacher, 'ok', teacher_prompt_tokens, teacher_completion_tokens, teacher_latency_ms
FROM aligner_examples WHERE teacher_latency_ms IS NOT NULL
UNION ALL
SELECT run_id, 0, 'evaluate_aligner', output_model, 'ok', output_prompt_tokens, output_completion_tokens, output_latency_ms
FROM aligner_examples WHERE output_latency_ms IS NOT NULL;

-- Tokens, time and cost by run, round, stage and model. `cost` = prompt and completion tokens
-- at the model's `input` / `output` prices, plus `per_hour` times `wall_seconds`: the stage's
-- wall time for calls (in `evaluate`, where several models share the stage, each is charged
-- the whole stage: an upper bound), the training job's for `train` / `train_aligner` rows.
-- `call_seconds` sums the calls' latencies (overlapping calls count each).
CREATE VIEW costs AS
WITH calls AS (
    SELECT run_id, round, stage, model, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(latency_ms) / 1000.0 AS call_seconds
    FROM model_calls GROUP BY run_id, round, stage, model
),
walls AS (
    SELECT run_id, round, stage,
           (julianday(coalesce(finished_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) - julianday(started_at)) * 86400.0 AS wall_seconds
    FROM stage_executions
),
jobs AS (
    SELECT run_id, round, CASE WHEN round = 0 THEN 'train_aligner' ELSE 'train' END AS stage, model,
           (julianday(coalesce(finished_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) - julianday(started_at)) * 86400.0 AS wall_seconds
    FROM training_jobs
)
SELECT c.run_id, c.round, c.stage, c.model, c.calls, c.prompt_tokens, c.completion_tokens,
       round(c.call_seconds, 3) AS call_seconds, round(w.wall_seconds, 3) AS wall_seconds,
       round(coalesce(c.prompt_tokens, 0) * coalesce(p.input, 0) / 1e6
             + coalesce(c.completion_tokens, 0) * coalesce(p.output, 0) / 1e6
             + coalesce(w.wall_seconds, 0) / 3600.0 * coalesce(p.per_hour, 0), 6) AS cost
FROM calls c
LEFT JOIN walls w ON w.run_id = c.run_id AND w.round = c.round AND w.stage = c.stage
LEFT JOIN model_prices p ON p.run_id = c.run_id AND p.model = c.model
UNION ALL
SELECT j.run_id, j.round, j.stage, j.model, 0, NULL, NULL, NULL, round(j.wall_seconds, 3),
       round(j.wall_seconds / 3600.0 * coalesce(p.per_hour, 0), 6)
FROM jobs j
LEFT JOIN model_prices p ON p.run_id = j.run_id AND p.model = j.model;
