-- Multi-turn prompts: the conversation before the prompt (`prompts.fields.messages`), as
-- JSON `[{"role": ..., "content": ...}, ...]`; NULL for a single-turn prompt.
ALTER TABLE prompts ADD COLUMN history TEXT;
