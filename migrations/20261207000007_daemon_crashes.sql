-- How many times a daemon died (crash, kill -9, lease lapsed) while driving a job. A job that
-- reaches the daemon's `--max-crashes` is failed with the reason instead of queued again.
ALTER TABLE daemon_jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
