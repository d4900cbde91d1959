//! Read-only queries for `aligner report`: training outcomes per round, and examples of the
//! Aligner's corrections (training pairs, held-out answers) to show beside their originals.

use serde::Serialize;

use crate::{Outcome, Result, StageStatus, Store, Verdict};

/// A round's training job as the report shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TrainingJobReport {
    pub round: i64,
    pub method: String,
    pub backend: String,
    pub status: StageStatus,
    pub pairs: i64,
    pub attempts: i64,
    pub exit_code: Option<i64>,
    pub reference_policy: String,
    pub reference_model: String,
    pub base_model: String,
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// One training metric of one round's job: its first and last logged values, and its range.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TrainingMetricSummary {
    pub round: i64,
    pub name: String,
    pub steps: i64,
    pub first_step: i64,
    pub first_value: f64,
    pub last_step: i64,
    pub last_value: f64,
    pub min_value: f64,
    pub max_value: f64,
}

/// One logged value of a training metric.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TrainingMetricPoint {
    pub round: i64,
    pub step: i64,
    pub value: f64,
}

/// A pair of a round: the prompt, the original answer (`rejected`) and the Aligner's
/// correction (`chosen`), with the synthesize stage's verdict.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PairExample {
    pub id: i64,
    pub round: i64,
    pub prompt_id: i64,
    pub prompt: String,
    /// The prompt's metadata (JSON object text).
    pub metadata: Option<String>,
    pub rejected: Option<String>,
    pub chosen: Option<String>,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub edit_distance: Option<f64>,
}

/// A held-out prompt with one model version's answer and the Aligner's correction of it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EvalExample {
    pub version: i64,
    pub prompt_id: i64,
    pub prompt: String,
    pub metadata: Option<String>,
    pub answer_status: Outcome,
    pub answer: Option<String>,
    pub answer_refusal: Option<i64>,
    pub answer_degenerate: Option<String>,
    pub corrected_status: Option<Outcome>,
    pub corrected: Option<String>,
    pub corrected_refusal: Option<i64>,
    pub corrected_degenerate: Option<String>,
}

impl Store {
    /// Every training job of a run (round 0 is the pipeline's own Aligner), by round.
    pub async fn report_training_jobs(&self, run_id: i64) -> Result<Vec<TrainingJobReport>> {
        Ok(sqlx::query_as::<_, TrainingJobReport>(
            "SELECT round, method, backend, status, pairs, attempts, exit_code, reference_policy,
                    reference_model, base_model, error, started_at, finished_at
             FROM training_jobs WHERE run_id = ? ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Per round and metric name, the first and last logged value (`training_metrics`).
    pub async fn report_training_metrics(&self, run_id: i64) -> Result<Vec<TrainingMetricSummary>> {
        Ok(sqlx::query_as::<_, TrainingMetricSummary>(
            "SELECT j.round, m.name, count(*) AS steps,
                    min(m.step) AS first_step,
                    (SELECT f.value FROM training_metrics f
                      WHERE f.training_job_id = m.training_job_id AND f.name = m.name
                      ORDER BY f.step ASC LIMIT 1) AS first_value,
                    max(m.step) AS last_step,
                    (SELECT l.value FROM training_metrics l
                      WHERE l.training_job_id = m.training_job_id AND l.name = m.name
                      ORDER BY l.step DESC LIMIT 1) AS last_value,
                    min(m.value) AS min_value, max(m.value) AS max_value
             FROM training_metrics m JOIN training_jobs j ON j.id = m.training_job_id
             WHERE j.run_id = ?
             GROUP BY j.round, m.training_job_id, m.name
             ORDER BY j.round, m.name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every logged value of one training metric of a run, by round and step.
    pub async fn training_metric_series(
        &self,
        run_id: i64,
        name: &str,
    ) -> Result<Vec<TrainingMetricPoint>> {
        Ok(sqlx::query_as::<_, TrainingMetricPoint>(
            "SELECT j.round, m.step, m.value
             FROM training_metrics m JOIN training_jobs j ON j.id = m.training_job_id
             WHERE j.run_id = ? AND m.name = ? ORDER BY j.round, m.step",
        )
        .bind(run_id)
        .bind(name)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` pairs of a round, kept ones first, in the order they were made.
    pub async fn pair_examples(
        &self,
        run_id: i64,
        round: i64,
        limit: i64,
    ) -> Result<Vec<PairExample>> {
        Ok(sqlx::query_as::<_, PairExample>(
            "SELECT x.id, x.round, x.prompt_id, p.prompt, p.metadata, x.rejected, x.chosen,
                    x.verdict, x.reason, x.edit_distance
             FROM pairs x JOIN prompts p ON p.id = x.prompt_id
             WHERE x.run_id = ? AND x.round = ?
             ORDER BY x.verdict = 'kept' DESC, x.id
             LIMIT ?",
        )
        .bind(run_id)
        .bind(round)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` held-out prompts with version `version`'s answer and its correction, in
    /// prompt order; and how many held-out answers that version has in all.
    pub async fn eval_examples(
        &self,
        run_id: i64,
        version: i64,
        limit: i64,
    ) -> Result<(Vec<EvalExample>, i64)> {
        let rows = sqlx::query_as::<_, EvalExample>(
            "SELECT a.version, a.prompt_id, p.prompt, p.metadata,
                    a.status AS answer_status, a.text AS answer, a.refusal AS answer_refusal,
                    a.degenerate AS answer_degenerate,
                    c.status AS corrected_status, c.text AS corrected,
                    c.refusal AS corrected_refusal, c.degenerate AS corrected_degenerate
             FROM eval_answers a JOIN prompts p ON p.id = a.prompt_id
             LEFT JOIN eval_answers c
               ON c.run_id = a.run_id AND c.version = a.version AND c.prompt_id = a.prompt_id
              AND c.kind = 'corrected'
             WHERE a.run_id = ? AND a.version = ? AND a.kind = 'answer'
             ORDER BY p.idx
             LIMIT ?",
        )
        .bind(run_id)
        .bind(version)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM eval_answers WHERE run_id = ? AND version = ? AND kind = 'answer'",
        )
        .bind(run_id)
        .bind(version)
        .fetch_one(&self.pool)
        .await?;
        Ok((rows, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewTrainingJob;

    #[tokio::test]
    async fn training_metrics_read_first_and_last_values_per_round() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
        let mut jobs = Vec::new();
        for round in [0, 1] {
            let job = store
                .start_training_job(&NewTrainingJob {
                    run_id: run,
                    round,
                    method: "dpo",
                    backend: "builtin",
                    hyperparameters: serde_json::json!({}),
                    reference_policy: "initial",
                    reference_model: "base",
                    base_model: "base",
                    data_path: "d.jsonl",
                    pairs: 4,
                    output_dir: "out",
                    command: None,
                    model: "upstream",
                })
                .await
                .unwrap();
            jobs.push(job.id);
        }
        // Steps logged out of order: first and last go by step, not by insertion.
        for (step, loss) in [(2, 0.5), (1, 0.7), (3, 0.6)] {
            let values = [
                ("loss".to_string(), loss),
                ("rewards/accuracies".to_string(), step as f64 / 4.0),
            ];
            store
                .record_training_metrics(jobs[1], step, &values)
                .await
                .unwrap();
        }
        store
            .record_training_metrics(jobs[0], 1, &[("loss".to_string(), 2.0)])
            .await
            .unwrap();
        store
            .finish_training_job(jobs[1], crate::StageStatus::Done, Some(0), None)
            .await
            .unwrap();

        let m = store.report_training_metrics(run).await.unwrap();
        let loss1 = m.iter().find(|m| m.round == 1 && m.name == "loss").unwrap();
        assert_eq!(
            (
                loss1.steps,
                loss1.first_step,
                loss1.first_value,
                loss1.last_step,
                loss1.last_value
            ),
            (3, 1, 0.7, 3, 0.6)
        );
        assert_eq!((loss1.min_value, loss1.max_value), (0.5, 0.7));
        assert_eq!(m.iter().filter(|m| m.round == 0).count(), 1);
        assert_eq!(m.len(), 3);

        let series = store.training_metric_series(run, "loss").await.unwrap();
        let got: Vec<(i64, i64, f64)> = series.iter().map(|p| (p.round, p.step, p.value)).collect();
        assert_eq!(got, [(0, 1, 2.0), (1, 1, 0.7), (1, 2, 0.5), (1, 3, 0.6)]);

        let jobs = store.report_training_jobs(run).await.unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[1].status, jobs[1].exit_code),
            (crate::StageStatus::Done, Some(0))
        );
        assert!(jobs[0].finished_at.is_none());

        // Nothing evaluated: no examples, none counted.
        let (rows, total) = store.eval_examples(run, 1, 20).await.unwrap();
        assert!(rows.is_empty() && total == 0);
        assert!(store.pair_examples(run, 1, 20).await.unwrap().is_empty());
    }
}
