//! Evaluation: held-out answers, judge calls, the metrics computed from them, and the gate's
//! decision after each round.

use sqlx::{QueryBuilder, Row, Sqlite};

use crate::batch::BatchInsert;
use crate::{
    EvalAnswerRow, EvalJudgementRow, EvalMetricRow, GateDecisionRow, HoldoutPromptRow,
    NewEvalAnswer, NewEvalJudgement, Result, Store,
};

impl Store {
    /// The run's held-out prompts, in order.
    pub async fn holdout_prompts(&self, run_id: i64) -> Result<Vec<HoldoutPromptRow>> {
        Ok(sqlx::query_as::<_, HoldoutPromptRow>(
            "SELECT id, idx, source_id, system, history, prompt, metadata FROM prompts
             WHERE run_id = ? AND split = 'holdout' ORDER BY idx",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every held-out answer and correction of a run.
    pub async fn eval_answers(&self, run_id: i64) -> Result<Vec<EvalAnswerRow>> {
        Ok(sqlx::query_as::<_, EvalAnswerRow>(
            "SELECT id, version, prompt_id, kind, status, text, finish_reason, completion_tokens, refusal, degenerate
             FROM eval_answers WHERE run_id = ? ORDER BY id",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Commits held-out answers in one transaction; an existing row is left as it was.
    pub async fn insert_eval_answers(&self, items: &[NewEvalAnswer]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO eval_answers (run_id, version, prompt_id, kind, status, text, finish_reason, model,
             model_ref, completion_tokens, latency_ms, refusal, degenerate, error, prompt_tokens, replica) ",
        )
        .tail(" ON CONFLICT (run_id, version, prompt_id, kind) DO NOTHING");
        self.insert_batch(INSERT, items, |mut b, a| {
            b.push_bind(a.run_id)
                .push_bind(a.version)
                .push_bind(a.prompt_id)
                .push_bind(a.kind)
                .push_bind(a.out.status())
                .push_bind(&a.out.text)
                .push_bind(&a.out.finish_reason)
                .push_bind(&a.model)
                .push_bind(&a.model_ref)
                .push_bind(a.out.completion_tokens)
                .push_bind(a.out.latency_ms)
                .push_bind(a.refusal.map(i64::from))
                .push_bind(&a.degenerate)
                .push_bind(&a.out.error)
                .push_bind(a.out.prompt_tokens)
                .push_bind(&a.out.replica);
        })
        .await
    }

    /// Deletes the failed judge calls of round `round` and the failed held-out answers of
    /// `versions`, so a resumed evaluation retries them. Earlier rounds keep theirs.
    pub async fn delete_failed_eval(
        &self,
        run_id: i64,
        round: i64,
        versions: &[i64],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id FROM eval_answers WHERE status = 'failed' AND run_id = ");
        qb.push_bind(run_id).push(" AND version IN (");
        let mut sep = qb.separated(", ");
        for v in versions {
            sep.push_bind(*v);
        }
        qb.push(")");
        let ids: Vec<i64> = qb
            .build()
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in &ids {
            // Judge calls on a failed answer (none are made, but a store edited by hand may have
            // them) go first: they reference it.
            sqlx::query("DELETE FROM eval_judgements WHERE candidate_id = ? OR baseline_id = ?")
                .bind(id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM eval_answers WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "DELETE FROM eval_judgements WHERE run_id = ? AND round = ? AND status = 'failed'",
        )
        .bind(run_id)
        .bind(round)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The judge calls recorded for a round.
    pub async fn eval_judgements(&self, run_id: i64, round: i64) -> Result<Vec<EvalJudgementRow>> {
        Ok(sqlx::query_as::<_, EvalJudgementRow>(
            "SELECT comparison, aspect, prompt_id, \"order\", status, verdict
             FROM eval_judgements WHERE run_id = ? AND round = ? ORDER BY id",
        )
        .bind(run_id)
        .bind(round)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Commits judge calls in one transaction; an existing row is left as it was.
    pub async fn insert_eval_judgements(&self, items: &[NewEvalJudgement]) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO eval_judgements (run_id, round, comparison, aspect, prompt_id, \"order\",
             candidate_id, baseline_id, status, verdict, raw, judge, latency_ms, error, prompt_tokens,
             completion_tokens) ",
        )
        .tail(" ON CONFLICT (run_id, round, comparison, aspect, prompt_id, \"order\") DO NOTHING");
        self.insert_batch(INSERT, items, |mut b, j| {
            b.push_bind(j.run_id)
                .push_bind(j.round)
                .push_bind(j.comparison)
                .push_bind(j.aspect)
                .push_bind(j.prompt_id)
                .push_bind(j.order)
                .push_bind(j.candidate_id)
                .push_bind(j.baseline_id)
                .push_bind(j.out.status())
                .push_bind(j.verdict)
                .push_bind(&j.out.text)
                .push_bind(&j.judge)
                .push_bind(j.out.latency_ms)
                .push_bind(&j.out.error)
                .push_bind(j.out.prompt_tokens)
                .push_bind(j.out.completion_tokens);
        })
        .await
    }

    /// Replaces a round's metrics.
    pub async fn replace_eval_metrics(
        &self,
        run_id: i64,
        round: i64,
        metrics: &[EvalMetricRow],
    ) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT INTO eval_metrics (run_id, round, name, value, ci_low, ci_high, n, detail) ",
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM eval_metrics WHERE run_id = ? AND round = ?")
            .bind(run_id)
            .bind(round)
            .execute(&mut *tx)
            .await?;
        INSERT
            .execute_on(&mut tx, metrics, |mut b, m| {
                b.push_bind(run_id)
                    .push_bind(round)
                    .push_bind(&m.name)
                    .push_bind(m.value)
                    .push_bind(m.ci_low)
                    .push_bind(m.ci_high)
                    .push_bind(m.n)
                    .push_bind(&m.detail);
            })
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every evaluation metric of a run, by round and name.
    pub async fn eval_metrics(&self, run_id: i64) -> Result<Vec<EvalMetricRow>> {
        Ok(sqlx::query_as::<_, EvalMetricRow>(
            "SELECT round, name, value, ci_low, ci_high, n, detail FROM eval_metrics
             WHERE run_id = ? ORDER BY round, name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records (or replaces) the gate's decision after a round.
    pub async fn record_gate_decision(&self, run_id: i64, d: &GateDecisionRow) -> Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO gate_decisions (run_id, round, metric, value, best_round, best_value, decision, reason)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(run_id)
        .bind(d.round)
        .bind(&d.metric)
        .bind(d.value)
        .bind(d.best_round)
        .bind(d.best_value)
        .bind(d.decision)
        .bind(&d.reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The gate's decisions of a run, by round.
    pub async fn gate_decisions(&self, run_id: i64) -> Result<Vec<GateDecisionRow>> {
        Ok(sqlx::query_as::<_, GateDecisionRow>(
            "SELECT round, metric, value, best_round, best_value, decision, reason
             FROM gate_decisions WHERE run_id = ? ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
