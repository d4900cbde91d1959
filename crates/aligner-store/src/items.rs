//! The per-item work of a round: prompts, the generations answering them, and the Aligner's
//! corrections of those generations.

use sqlx::Row;

use crate::batch::BatchInsert;
use crate::{NewCorrection, NewGeneration, NewPrompt, PromptRow, Result, Store, UncorrectedRow};

impl Store {
    /// Inserts the run's prompts in one transaction (all or nothing, so a crash mid-ingest
    /// leaves no partial prompt set).
    pub async fn insert_prompts(&self, run_id: i64, prompts: &[NewPrompt]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO prompts (run_id, idx, source_id, split, system, history, prompt, prompt_hash, metadata) ",
        );
        self.insert_batch(INSERT, prompts, |mut b, p| {
            b.push_bind(run_id)
                .push_bind(p.idx)
                .push_bind(&p.source_id)
                .push_bind(&p.split)
                .push_bind(&p.system)
                .push_bind(&p.history)
                .push_bind(&p.prompt)
                .push_bind(&p.prompt_hash)
                .push_bind(p.metadata.as_ref().map(|m| m.to_string()));
        })
        .await
    }

    pub async fn count_prompts(&self, run_id: i64, split: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM prompts WHERE run_id = ? AND split = ?")
                .bind(run_id)
                .bind(split)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Training-split prompts after `after_idx`, in order.
    pub async fn train_prompts_page(
        &self,
        run_id: i64,
        after_idx: i64,
        limit: i64,
    ) -> Result<Vec<PromptRow>> {
        Ok(sqlx::query_as::<_, PromptRow>(
            "SELECT id, idx, system, history, prompt, prompt_hash FROM prompts
             WHERE run_id = ? AND split = 'train' AND idx > ? ORDER BY idx LIMIT ?",
        )
        .bind(run_id)
        .bind(after_idx)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// (prompt_id, sample_idx) of the generations already recorded for prompts in the id range.
    pub async fn generation_keys(
        &self,
        run_id: i64,
        round: i64,
        first_prompt: i64,
        last_prompt: i64,
    ) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query(
            "SELECT prompt_id, sample_idx FROM generations
             WHERE run_id = ? AND round = ? AND prompt_id BETWEEN ? AND ?",
        )
        .bind(run_id)
        .bind(round)
        .bind(first_prompt)
        .bind(last_prompt)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Commits finished generations in one transaction. A row that already exists (a retried
    /// item whose first answer landed) is left as it was.
    pub async fn insert_generations(&self, items: &[NewGeneration]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO generations (run_id, round, prompt_id, sample_idx, status, text, finish_reason, model,
             backend, served_model, checkpoint_id, sampling, prompt_tokens, completion_tokens, latency_ms, attempts, error, replica) ",
        )
        .tail(" ON CONFLICT (run_id, round, prompt_id, sample_idx) DO NOTHING");
        self.insert_batch(INSERT, items, |mut b, g| {
            b.push_bind(g.run_id)
                .push_bind(g.round)
                .push_bind(g.prompt_id)
                .push_bind(g.sample_idx)
                .push_bind(g.out.status())
                .push_bind(&g.out.text)
                .push_bind(&g.out.finish_reason)
                .push_bind(&g.model)
                .push_bind(&g.backend)
                .push_bind(&g.out.served_model)
                .push_bind(g.checkpoint_id)
                .push_bind(&g.sampling)
                .push_bind(g.out.prompt_tokens)
                .push_bind(g.out.completion_tokens)
                .push_bind(g.out.latency_ms)
                .push_bind(g.out.attempts)
                .push_bind(&g.out.error)
                .push_bind(&g.out.replica);
        })
        .await
    }

    /// (ok, failed) generations of a round.
    pub async fn generation_counts(&self, run_id: i64, round: i64) -> Result<(i64, i64)> {
        self.round_counts(
            "generations",
            "status = 'ok'",
            "status = 'failed'",
            run_id,
            round,
        )
        .await
    }

    /// Forgets the round's failed generations so a re-executed stage retries them. Only called
    /// before the round's correct stage has run, so nothing references them.
    pub async fn delete_failed_generations(&self, run_id: i64, round: i64) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM generations WHERE run_id = ? AND round = ? AND status = 'failed'
               AND NOT EXISTS (SELECT 1 FROM pairs p WHERE p.generation_id = generations.id)",
        )
        .bind(run_id)
        .bind(round)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Successful generations of the round without a correction yet, after `after_id`.
    pub async fn uncorrected_page(
        &self,
        run_id: i64,
        round: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<UncorrectedRow>> {
        self.generation_page(
            "SELECT g.id AS generation_id, g.prompt_id, p.history, p.prompt, g.text AS answer
             FROM generations g JOIN prompts p ON p.id = g.prompt_id
             WHERE g.run_id = ? AND g.round = ? AND g.status = 'ok'
               AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.generation_id = g.id)",
            (run_id, round),
            (after_id, limit),
        )
        .await
    }

    pub async fn count_uncorrected(&self, run_id: i64, round: i64) -> Result<i64> {
        self.round_count(
            "SELECT count(*) FROM generations g WHERE g.run_id = ? AND g.round = ? AND g.status = 'ok'
               AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.generation_id = g.id)",
            run_id,
            round,
        )
        .await
    }

    pub async fn insert_corrections(&self, items: &[NewCorrection]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO corrections (run_id, round, generation_id, status, text, finish_reason, model, backend,
             served_model, template_id, template_hash, sampling, prompt_tokens, completion_tokens, latency_ms, attempts, error, replica) ",
        )
        .tail(" ON CONFLICT (generation_id) DO NOTHING");
        self.insert_batch(INSERT, items, |mut b, c| {
            b.push_bind(c.run_id)
                .push_bind(c.round)
                .push_bind(c.generation_id)
                .push_bind(c.out.status())
                .push_bind(&c.out.text)
                .push_bind(&c.out.finish_reason)
                .push_bind(&c.model)
                .push_bind(&c.backend)
                .push_bind(&c.out.served_model)
                .push_bind(&c.template_id)
                .push_bind(&c.template_hash)
                .push_bind(&c.sampling)
                .push_bind(c.out.prompt_tokens)
                .push_bind(c.out.completion_tokens)
                .push_bind(c.out.latency_ms)
                .push_bind(c.out.attempts)
                .push_bind(&c.out.error)
                .push_bind(&c.out.replica);
        })
        .await
    }

    pub async fn correction_counts(&self, run_id: i64, round: i64) -> Result<(i64, i64)> {
        self.round_counts(
            "corrections",
            "status = 'ok'",
            "status = 'failed'",
            run_id,
            round,
        )
        .await
    }

    /// Forgets the round's failed corrections so a re-executed stage retries them.
    pub async fn delete_failed_corrections(&self, run_id: i64, round: i64) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM corrections WHERE run_id = ? AND round = ? AND status = 'failed'
               AND NOT EXISTS (SELECT 1 FROM pairs p WHERE p.correction_id = corrections.id)",
        )
        .bind(run_id)
        .bind(round)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Two conditional counts over one round of a table (`ok`/`failed`, `kept`/`dropped`).
    pub(crate) async fn round_counts(
        &self,
        table: &str,
        first: &str,
        second: &str,
        run_id: i64,
        round: i64,
    ) -> Result<(i64, i64)> {
        let sql = format!(
            "SELECT coalesce(sum({first}), 0), coalesce(sum({second}), 0) FROM {table} WHERE run_id = ? AND round = ?"
        );
        let row = sqlx::query(&sql)
            .bind(run_id)
            .bind(round)
            .fetch_one(&self.pool)
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// `benign_preference.max_ratio`: drops kept benign-preference pairs of a round beyond
    /// `ratio` per kept correction pair, as `benign_cap`, in an order fixed by the prompt (a
    /// multiplicative hash of its id), so a rerun drops the same ones. Returns how many.
    pub async fn cap_benign_pairs(&self, run_id: i64, round: i64, ratio: f64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let corrections: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pairs WHERE run_id = ? AND round = ? AND verdict = 'kept' AND origin = 'correction'",
        )
        .bind(run_id)
        .bind(round)
        .fetch_one(&mut *tx)
        .await?;
        let benign: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM pairs WHERE run_id = ? AND round = ? AND verdict = 'kept' AND origin != 'correction'
             ORDER BY (prompt_id * 2654435761) % 4294967291, id",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&mut *tx)
        .await?;
        let allowed = (ratio * corrections as f64).floor() as usize;
        let excess = &benign[benign.len().min(allowed)..];
        for id in excess {
            sqlx::query("UPDATE pairs SET verdict = 'dropped', reason = 'benign_cap' WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(excess.len() as u64)
    }
}
