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
            "SELECT p.id AS pair_id, pr.system, pr.history, pr.prompt, p.chosen, p.rejected
             FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
             WHERE p.run_id = ? AND p.round = ? AND p.verdict = 'kept' ORDER BY p.id",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The earlier rounds' pairs round `round` replayed (`rounds.train.replay`), in the order
    /// they were picked. On the first call for a round, when it kept fewer than `min_pairs`,
    /// they are picked and recorded in one transaction: earlier rounds' kept pairs whose
    /// `origin` is one of `origins` and whose prompt has no kept pair in `round`, one per
    /// prompt (its newest), newest round first. Later calls (a resumed train stage) read the
    /// record, so a round always trains on the same set.
    pub async fn replay_pairs(
        &self,
        run_id: i64,
        round: i64,
        min_pairs: i64,
        origins: &[&str],
    ) -> Result<Vec<ExportPair>> {
        let mut tx = self.pool.begin().await?;
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM replayed_pairs WHERE run_id = ? AND round = ?",
        )
        .bind(run_id)
        .bind(round)
        .fetch_one(&mut *tx)
        .await?;
        if recorded == 0 {
            let kept: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pairs WHERE run_id = ? AND round = ? AND verdict = 'kept'",
            )
            .bind(run_id)
            .bind(round)
            .fetch_one(&mut *tx)
            .await?;
            let wanted = (min_pairs - kept).max(0);
            if wanted > 0 && !origins.is_empty() {
                let marks = vec!["?"; origins.len()].join(", ");
                let sql = format!(
                    "SELECT p.id, p.prompt_id FROM pairs p
                     WHERE p.run_id = ? AND p.round < ? AND p.verdict = 'kept' AND p.origin IN ({marks})
                       AND p.prompt_id NOT IN (SELECT x.prompt_id FROM pairs x
                           WHERE x.run_id = p.run_id AND x.round = ? AND x.verdict = 'kept')
                     ORDER BY p.round DESC, p.id"
                );
                let mut q = sqlx::query_as::<_, (i64, i64)>(&sql)
                    .bind(run_id)
                    .bind(round);
                for o in origins {
                    q = q.bind(*o);
                }
                let candidates = q.bind(round).fetch_all(&mut *tx).await?;
                let mut seen = std::collections::HashSet::new();
                let picked = candidates
                    .into_iter()
                    .filter(|(_, prompt)| seen.insert(*prompt))
                    .take(wanted as usize);
                for (pair_id, _) in picked {
                    sqlx::query(
                        "INSERT INTO replayed_pairs (run_id, round, pair_id) VALUES (?, ?, ?)",
                    )
                    .bind(run_id)
                    .bind(round)
                    .bind(pair_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        let pairs = sqlx::query_as::<_, ExportPair>(
            "SELECT p.id AS pair_id, pr.system, pr.history, pr.prompt, p.chosen, p.rejected
             FROM replayed_pairs r JOIN pairs p ON p.id = r.pair_id JOIN prompts pr ON pr.id = p.prompt_id
             WHERE r.run_id = ? AND r.round = ? ORDER BY r.rowid",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(pairs)
    }
}
