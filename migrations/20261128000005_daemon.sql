-- The daemon's queue: one job per submitted pipeline, keyed by the run it drives. `state` is
-- the queue's view (a queued run's `runs.status` stays 'running' until it finishes, with no
-- lease holder). `requested` is what an API call asked of a running job; the job honours it
-- at the next item boundary. The job lease (`lease_holder`, `lease_expires_ms`) names the
-- daemon process that claimed it; a job whose daemon died is queued again on the next start.
CREATE TABLE daemon_jobs (
    run_id          INTEGER PRIMARY KEY REFERENCES runs (id),
    name            TEXT NOT NULL,
    pipeline_yaml   TEXT NOT NULL,             -- the submitted body, as received
    base_dir        TEXT NOT NULL,             -- where its relative paths resolve
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'paused', 'cancelled', 'done', 'failed')),
    requested       TEXT CHECK (requested IN ('pause', 'cancel')),
    error           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,  -- how many times a daemon started it
    lease_holder    TEXT,
    lease_expires_ms INTEGER,
    submitted_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at      TEXT,
    finished_at     TEXT,
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX daemon_jobs_state ON daemon_jobs (state, run_id);
