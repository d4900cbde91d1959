-- Evaluation of every round on the held-out prompts (rounds.evaluate): the models' answers, the
-- Aligner's corrections of them, every judge verdict with the judge's raw output, the metrics
-- computed from them, and the gate's decisions.

-- One answer per (model version, held-out prompt, kind). Version 0 is the initial upstream;
-- version k is what round k's training produced (the upstream itself when rounds do not train).
-- kind 'answer': the model's answer; 'corrected': the Aligner's correction of that answer.
CREATE TABLE eval_answers (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    version         INTEGER NOT NULL,
    prompt_id       INTEGER NOT NULL REFERENCES prompts (id),
    kind            TEXT NOT NULL CHECK (kind IN ('answer', 'corrected')),
    status          TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text            TEXT,
    finish_reason   TEXT,
    model           TEXT NOT NULL,             -- the spec's model key (or the Aligner's name)
    model_ref       TEXT NOT NULL,             -- what answered: path, served name or checkpoint
    completion_tokens INTEGER,
    latency_ms      REAL,
    refusal         INTEGER,                   -- 1 when the refusal detector fires
    degenerate      TEXT,                      -- 'repetition' or 'truncated' when the text is
    error           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, version, prompt_id, kind)
);

-- One judge call: `comparison` names the two sides (candidate vs baseline), `aspect` the judge
-- prompt. `order` 'forward' shows the candidate as A, 'swapped' as B. `verdict` is what the
-- judge said about positions (A, B or Equal), NULL when its output had no verdict.
CREATE TABLE eval_judgements (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    comparison      TEXT NOT NULL CHECK (comparison IN ('aligner', 'initial', 'previous')),
    aspect          TEXT NOT NULL,
    prompt_id       INTEGER NOT NULL REFERENCES prompts (id),
    "order"         TEXT NOT NULL CHECK ("order" IN ('forward', 'swapped')),
    candidate_id    INTEGER NOT NULL REFERENCES eval_answers (id),
    baseline_id     INTEGER NOT NULL REFERENCES eval_answers (id),
    status          TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    verdict         TEXT CHECK (verdict IN ('A', 'B', 'Equal')),
    raw             TEXT,                      -- the judge's whole output
    judge           TEXT NOT NULL,             -- the spec's model key
    latency_ms      REAL,
    error           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, round, comparison, aspect, prompt_id, "order")
);

-- Per prompt, the two orders combined: the candidate wins or loses when both orders agree;
-- a disagreement (or an Equal in either order) is Equal; a prompt with a missing or
-- unparsable verdict has no outcome.
CREATE VIEW eval_outcomes AS
SELECT f.run_id, f.round, f.comparison, f.aspect, f.prompt_id,
       f.verdict AS forward, s.verdict AS swapped,
       CASE
           WHEN f.verdict IS NULL OR s.verdict IS NULL THEN NULL
           WHEN f.verdict = 'A' AND s.verdict = 'B' THEN 'win'
           WHEN f.verdict = 'B' AND s.verdict = 'A' THEN 'loss'
           ELSE 'equal'
       END AS outcome
FROM eval_judgements f
JOIN eval_judgements s
  ON s.run_id = f.run_id AND s.round = f.round AND s.comparison = f.comparison
 AND s.aspect = f.aspect AND s.prompt_id = f.prompt_id AND s."order" = 'swapped'
WHERE f."order" = 'forward';

-- Metrics of a round's evaluation, written by the evaluate stage: omega per comparison and
-- aspect (with a bootstrap confidence interval), refusal rates, lengths, copy rate,
-- degenerate outputs. `detail` is a JSON object (counts, medians, ...).
CREATE TABLE eval_metrics (
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    name            TEXT NOT NULL,
    value           REAL,
    ci_low          REAL,
    ci_high         REAL,
    n               INTEGER NOT NULL,
    detail          TEXT,
    PRIMARY KEY (run_id, round, name)
);

-- What the gate decided after a round's evaluation.
CREATE TABLE gate_decisions (
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    metric          TEXT NOT NULL,
    value           REAL,
    best_round      INTEGER,
    best_value      REAL,
    decision        TEXT NOT NULL CHECK (decision IN ('continue', 'stop', 'rollback')),
    reason          TEXT NOT NULL,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, round)
);

-- One row per round and metric, for plain SQL: SELECT * FROM eval_summary WHERE run_id = 1.
CREATE VIEW eval_summary AS
SELECT m.run_id, m.round, m.name, m.value, m.ci_low, m.ci_high, m.n, m.detail
FROM eval_metrics m
ORDER BY m.run_id, m.round, m.name;
