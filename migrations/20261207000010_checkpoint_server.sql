-- The server `rounds.train.serve: {kind: command}` started for a checkpoint: its URL and who it
-- is (pid, host, boot id, start time), so a resumed run reuses it, and it is stopped before the
-- next train stage, at the run's end and by `aligner cancel`. NULL when none runs.
ALTER TABLE checkpoints ADD COLUMN server TEXT;
