//! Preference pairs: the synthesize stage's verdict on each generation (kept, or dropped with
//! a reason), and the kept pairs a round trains on.

use crate::batch::BatchInsert;
use crate::{ExportPair, NewPair, Result, Store, UnpairedRow};

impl Store {
    /// Generations of the round without a pair verdict yet, with their correction (if any).
    pub async fn unpaired_page(
        &self,
        run_id: i64,
        round: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<UnpairedRow>> {
        self.generation_page(
            "SELECT g.id AS generation_id, g.prompt_id, p.prompt, p.metadata, p.prompt_hash || ':' || g.sample_idx AS dedupe_key, g.status AS generation_status,
                    g.text AS original, g.finish_reason AS original_finish,
                    c.id AS correction_id, c.status AS correction_status, c.text AS correction,
                    c.finish_reason AS correction_finish
             FROM generations g
             JOIN prompts p ON p.id = g.prompt_id
             LEFT JOIN corrections c ON c.generation_id = g.id
             WHERE g.run_id = ? AND g.round = ?
               AND NOT EXISTS (SELECT 1 FROM pairs x WHERE x.generation_id = g.id)",
            (run_id, round),
            (after_id, limit),
        )
        .await
    }

    pub async fn count_unpaired(&self, run_id: i64, round: i64) -> Result<i64> {
        self.round_count(
            "SELECT count(*) FROM generations g WHERE g.run_id = ? AND g.round = ?
               AND NOT EXISTS (SELECT 1 FROM pairs x WHERE x.generation_id = g.id)",
            run_id,
            round,
        )
        .await
    }

    /// Dedupe keys (prompt hash and sample index) of the round's kept pairs: the synthesize
    /// stage's state, rebuilt on resume.
    pub async fn kept_pair_keys(&self, run_id: i64, round: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT pr.prompt_hash || ':' || g.sample_idx FROM pairs p
             JOIN prompts pr ON pr.id = p.prompt_id JOIN generations g ON g.id = p.generation_id
             WHERE p.run_id = ? AND p.round = ? AND p.verdict = 'kept'",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn insert_pairs(&self, items: &[NewPair]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO pairs (run_id, round, prompt_id, generation_id, correction_id, chosen, rejected, verdict,
             reason, edit_distance, length_ratio, origin) ",
        )
        .tail(" ON CONFLICT (generation_id) DO NOTHING");
        self.insert_batch(INSERT, items, |mut b, p| {
            b.push_bind(p.run_id)
                .push_bind(p.round)
                .push_bind(p.prompt_id)
                .push_bind(p.generation_id)
                .push_bind(p.correction_id)
                .push_bind(&p.chosen)
                .push_bind(&p.rejected)
                .push_bind(if p.reason.is_none() {
                    "kept"
                } else {
                    "dropped"
                })
                .push_bind(&p.reason)
                .push_bind(p.edit_distance)
                .push_bind(p.length_ratio)
                .push_bind(p.origin.as_str());
        })
        .await
    }

    pub async fn pair_counts(&self, run_id: i64, round: i64) -> Result<(i64, i64)> {
        self.round_counts(
            "pairs",
            "verdict = 'kept'",
            "verdict = 'dropped'",
            run_id,
            round,
        )
        .await
    }

    /// The kept pairs of a round with their prompt, in pair order.
    pub async fn kept_pairs(&self, run_id: i64, round: i64) -> Result<Vec<ExportPair>> {
        Ok(sqlx::query_as::<_, ExportPair>(
            "SELECT p.id AS pair_id, pr.system, pr.prompt, p.chosen, p.rejected
             FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
             WHERE p.run_id = ? AND p.round = ? AND p.verdict = 'kept' ORDER BY p.id",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&self.pool)
        .await?)
    }
}
