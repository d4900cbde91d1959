//! The Aligner's own data (`aligner_examples`): question rows ingested for round 0, the
//! answers, teacher corrections and Aligner outputs recorded on them, and the held-out check.

use crate::batch::{BatchInsert, INSERT_CHUNK};
use crate::{AlignerEvalRow, AlignerExampleRow, AlignerUpdate, NewAlignerExample, Result, Store};

impl Store {
    /// Inserts the rows of the run's Aligner data in one transaction (all or nothing).
    pub async fn insert_aligner_examples(
        &self,
        run_id: i64,
        rows: &[NewAlignerExample],
    ) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO aligner_examples (run_id, idx, source_id, split, label, history, question, metadata, answer, correction, teacher) ",
        )
        .chunk(INSERT_CHUNK / 2);
        self.insert_batch(INSERT, rows, |mut b, r| {
            b.push_bind(run_id)
                .push_bind(r.idx)
                .push_bind(&r.source_id)
                .push_bind(&r.split)
                .push_bind(&r.label)
                .push_bind(&r.history)
                .push_bind(&r.question)
                .push_bind(r.metadata.as_ref().map(|m| m.to_string()))
                .push_bind(&r.answer)
                .push_bind(&r.correction)
                .push_bind(&r.teacher);
        })
        .await
    }

    /// Every row of the run's Aligner data, in order.
    pub async fn aligner_examples(&self, run_id: i64) -> Result<Vec<AlignerExampleRow>> {
        Ok(sqlx::query_as::<_, AlignerExampleRow>(
            "SELECT id, idx, source_id, split, label, history, question, answer, answer_finish, correction, output
             FROM aligner_examples WHERE run_id = ? ORDER BY idx",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records finished calls on Aligner data rows, in one transaction.
    pub async fn update_aligner_examples(&self, updates: &[AlignerUpdate]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for u in updates {
            let q = match u {
                AlignerUpdate::Answer {
                    id,
                    text,
                    finish,
                    model,
                    usage,
                } => sqlx::query(
                    "UPDATE aligner_examples SET answer = ?, answer_finish = ?, answer_model = ?, error = NULL,
                     answer_prompt_tokens = ?, answer_completion_tokens = ?, answer_latency_ms = ? WHERE id = ?",
                )
                .bind(text)
                .bind(finish)
                .bind(model)
                .bind(usage.prompt_tokens)
                .bind(usage.completion_tokens)
                .bind(usage.latency_ms)
                .bind(id),
                AlignerUpdate::Correction {
                    id,
                    text,
                    teacher,
                    answer_refusal,
                    correction_refusal,
                    usage,
                } => {
                    let usage = usage.unwrap_or_default();
                    sqlx::query(
                        "UPDATE aligner_examples SET correction = ?, teacher = ?, answer_refusal = ?, correction_refusal = ?, error = NULL,
                         teacher_prompt_tokens = ?, teacher_completion_tokens = ?, teacher_latency_ms = ? WHERE id = ?",
                    )
                    .bind(text)
                    .bind(teacher)
                    .bind(*answer_refusal as i64)
                    .bind(*correction_refusal as i64)
                    .bind(usage.prompt_tokens)
                    .bind(usage.completion_tokens)
                    .bind(usage.latency_ms)
                    .bind(id)
                }
                AlignerUpdate::Output {
                    id,
                    text,
                    finish,
                    refusal,
                    answer_refusal,
                    edit_distance,
                    model,
                    usage,
                } => sqlx::query(
                    "UPDATE aligner_examples SET output = ?, output_finish = ?, output_refusal = ?, answer_refusal = ?, output_edit_distance = ?, error = NULL,
                     output_model = ?, output_prompt_tokens = ?, output_completion_tokens = ?, output_latency_ms = ? WHERE id = ?",
                )
                .bind(text)
                .bind(finish)
                .bind(*refusal as i64)
                .bind(*answer_refusal as i64)
                .bind(edit_distance)
                .bind(model)
                .bind(usage.prompt_tokens)
                .bind(usage.completion_tokens)
                .bind(usage.latency_ms)
                .bind(id),
                AlignerUpdate::Failed { id, error } => {
                    sqlx::query("UPDATE aligner_examples SET error = ? WHERE id = ?")
                        .bind(error)
                        .bind(id)
                }
            };
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The held-out check (`aligner_eval`) of a run, one row per label.
    pub async fn aligner_eval(&self, run_id: i64) -> Result<Vec<AlignerEvalRow>> {
        Ok(sqlx::query_as::<_, AlignerEvalRow>(
            "SELECT label, rows, refusal_rate_answer, refusal_rate_teacher, refusal_rate_aligner, copy_rate, mean_edit_distance
             FROM aligner_eval WHERE run_id = ? ORDER BY label",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
