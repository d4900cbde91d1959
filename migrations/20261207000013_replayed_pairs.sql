-- Earlier rounds' kept pairs that a round's training set replayed (`rounds.train.replay`):
-- `round` trained on `pair_id`, which an earlier round kept.
CREATE TABLE replayed_pairs (
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    round           INTEGER NOT NULL,
    pair_id         INTEGER NOT NULL REFERENCES pairs (id),
    PRIMARY KEY (run_id, round, pair_id)
);
