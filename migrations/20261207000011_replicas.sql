-- Which endpoint answered, when a model names several (`replicas:`); NULL for a single one.
ALTER TABLE generations ADD COLUMN replica TEXT;
ALTER TABLE corrections ADD COLUMN replica TEXT;
ALTER TABLE eval_answers ADD COLUMN replica TEXT;
