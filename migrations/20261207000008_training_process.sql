-- A `command` trainer writes its output to files and the orchestrator follows them, so a
-- restarted orchestrator can follow a trainer that is still running instead of starting it
-- again. `process` (JSON) says who the trainer is (pid, host, boot id, the process's start
-- time) and where its output and exit status go; the offsets say how much of each output file
-- is already in `training_logs` (both advance in the transaction that inserts the lines).
ALTER TABLE training_jobs ADD COLUMN process TEXT;
ALTER TABLE training_jobs ADD COLUMN stdout_offset INTEGER NOT NULL DEFAULT 0;
ALTER TABLE training_jobs ADD COLUMN stderr_offset INTEGER NOT NULL DEFAULT 0;
