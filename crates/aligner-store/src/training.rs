//! Training: a round's training job, its logs and per-step metrics, and the checkpoint it
//! leaves.

use crate::batch::BatchInsert;
use crate::{
    CheckpointRow, Error, NewTrainingJob, Result, RoundCost, StageStatus, Store, TrainingJobRow,
};

/// Lines of a training job's output: (job, attempt, stream, line).
const TRAINING_LOGS: BatchInsert =
    BatchInsert::new("INSERT INTO training_logs (training_job_id, attempt, stream, line) ");

impl Store {
    /// Creates the round's training job, or re-opens it after a crash (attempts + 1).
    pub async fn start_training_job(&self, job: &NewTrainingJob<'_>) -> Result<TrainingJobRow> {
        sqlx::query(
            "INSERT INTO training_jobs (run_id, round, method, backend, hyperparameters, reference_policy, reference_model,
                 base_model, data_path, pairs, output_dir, command, model)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (run_id, round) DO UPDATE SET attempts = attempts + 1, status = 'running', error = NULL,
                 exit_code = NULL, finished_at = NULL, data_path = excluded.data_path, pairs = excluded.pairs,
                 command = excluded.command",
        )
        .bind(job.run_id)
        .bind(job.round)
        .bind(job.method)
        .bind(job.backend)
        .bind(job.hyperparameters.to_string())
        .bind(job.reference_policy)
        .bind(job.reference_model)
        .bind(job.base_model)
        .bind(job.data_path)
        .bind(job.pairs)
        .bind(job.output_dir)
        .bind(job.command)
        .bind(job.model)
        .execute(&self.pool)
        .await?;
        self.training_job(job.run_id, job.round)
            .await?
            .ok_or_else(|| Error::Sql(sqlx::Error::RowNotFound))
    }

    pub async fn training_job(&self, run_id: i64, round: i64) -> Result<Option<TrainingJobRow>> {
        Ok(sqlx::query_as::<_, TrainingJobRow>(
            "SELECT id, run_id, round, status, attempts, exit_code, output_dir, error, process, stdout_offset, stderr_offset FROM training_jobs WHERE run_id = ? AND round = ?",
        )
        .bind(run_id)
        .bind(round)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records the pipeline's `prices:` for a run (replacing what an earlier start recorded):
    /// (model, input, output, per hour).
    pub async fn set_model_prices(
        &self,
        run_id: i64,
        prices: &[(String, f64, f64, f64)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM model_prices WHERE run_id = ?")
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        for (model, input, output, per_hour) in prices {
            sqlx::query("INSERT INTO model_prices (run_id, model, input, output, per_hour) VALUES (?, ?, ?, ?, ?)")
                .bind(run_id)
                .bind(model)
                .bind(input)
                .bind(output)
                .bind(per_hour)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What a run has cost so far (the `costs` view's sum).
    pub async fn run_cost(&self, run_id: i64) -> Result<f64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(sum(cost), 0.0) FROM costs WHERE run_id = ?")
                .bind(run_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// A run's calls, tokens and cost per round.
    pub async fn round_costs(&self, run_id: i64) -> Result<Vec<RoundCost>> {
        Ok(sqlx::query_as::<_, RoundCost>(
            "SELECT round, sum(calls) AS calls, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                    coalesce(sum(completion_tokens), 0) AS completion_tokens,
                    round(coalesce(sum(cost), 0), 6) AS cost
             FROM costs WHERE run_id = ? GROUP BY round ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A run's training jobs still marked running.
    pub async fn running_training_jobs(&self, run_id: i64) -> Result<Vec<TrainingJobRow>> {
        Ok(sqlx::query_as::<_, TrainingJobRow>(
            "SELECT id, run_id, round, status, attempts, exit_code, output_dir, error, process, stdout_offset, stderr_offset FROM training_jobs WHERE run_id = ? AND status = 'running' ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records who the running trainer of a job's current attempt is (`None` once it ended),
    /// with its output not yet read: both offsets start again at 0.
    pub async fn set_training_process(&self, job_id: i64, process: Option<&str>) -> Result<()> {
        let reset = if process.is_some() {
            ", stdout_offset = 0, stderr_offset = 0"
        } else {
            ""
        };
        sqlx::query(&format!(
            "UPDATE training_jobs SET process = ?{reset} WHERE id = ?"
        ))
        .bind(process)
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends lines read from a trainer's output files and records how far each file has
    /// been read, in one transaction: a follower that restarts reads on from there, so no line
    /// is stored twice or lost.
    pub async fn append_training_output(
        &self,
        job_id: i64,
        attempt: i64,
        lines: &[(String, String)],
        (stdout_offset, stderr_offset): (i64, i64),
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if !lines.is_empty() {
            TRAINING_LOGS
                .execute_on(&mut tx, lines, |mut b, (stream, line)| {
                    b.push_bind(job_id)
                        .push_bind(attempt)
                        .push_bind(stream)
                        .push_bind(line);
                })
                .await?;
        }
        sqlx::query("UPDATE training_jobs SET stdout_offset = ?, stderr_offset = ? WHERE id = ?")
            .bind(stdout_offset)
            .bind(stderr_offset)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn append_training_logs(
        &self,
        job_id: i64,
        attempt: i64,
        lines: &[(String, String)],
    ) -> Result<()> {
        self.insert_batch(TRAINING_LOGS, lines, |mut b, (stream, line)| {
            b.push_bind(job_id)
                .push_bind(attempt)
                .push_bind(stream)
                .push_bind(line);
        })
        .await
    }

    /// The last step with metrics of a job (0 when none): where a trainer's logged dicts that
    /// carry no step of their own continue counting.
    pub async fn last_metric_step(&self, job_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(max(step), 0) FROM training_metrics WHERE training_job_id = ?",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// One optimizer step's metrics (TRL's names), replacing a step recorded before (a
    /// resumed training repeats no step, but a retried one may).
    pub async fn record_training_metrics(
        &self,
        job_id: i64,
        step: i64,
        values: &[(String, f64)],
    ) -> Result<()> {
        const INSERT: BatchInsert = BatchInsert::new(
            "INSERT OR REPLACE INTO training_metrics (training_job_id, step, name, value) ",
        );
        self.insert_batch(INSERT, values, |mut b, (name, value)| {
            b.push_bind(job_id)
                .push_bind(step)
                .push_bind(name)
                .push_bind(value);
        })
        .await
    }

    pub async fn finish_training_job(
        &self,
        job_id: i64,
        status: StageStatus,
        exit_code: Option<i64>,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE training_jobs SET status = ?, exit_code = ?, error = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE id = ?",
        )
        .bind(status)
        .bind(exit_code)
        .bind(error)
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Registers a finished training job's checkpoint and marks the job done, atomically.
    pub async fn register_checkpoint(
        &self,
        run_id: i64,
        round: i64,
        job_id: i64,
        exit_code: i64,
        path: &str,
        serve_model: Option<&str>,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE training_jobs SET status = 'done', exit_code = ?, error = NULL,
                    finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
        )
        .bind(exit_code)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO checkpoints (run_id, round, training_job_id, path, serve_model) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (run_id, round) DO UPDATE SET path = excluded.path, serve_model = excluded.serve_model,
                 training_job_id = excluded.training_job_id",
        )
        .bind(run_id)
        .bind(round)
        .bind(job_id)
        .bind(path)
        .bind(serve_model)
        .execute(&mut *tx)
        .await?;
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM checkpoints WHERE run_id = ? AND round = ?")
                .bind(run_id)
                .bind(round)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn checkpoint(&self, run_id: i64, round: i64) -> Result<Option<CheckpointRow>> {
        Ok(sqlx::query_as::<_, CheckpointRow>(
            "SELECT id, run_id, round, path, serve_model, server FROM checkpoints WHERE run_id = ? AND round = ?",
        )
        .bind(run_id)
        .bind(round)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records (or clears) the server a checkpoint's `serve: {kind: command}` started.
    pub async fn set_checkpoint_server(
        &self,
        checkpoint_id: i64,
        server: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE checkpoints SET server = ? WHERE id = ?")
            .bind(server)
            .bind(checkpoint_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The run's checkpoints that have a server recorded: (checkpoint id, round, its record).
    pub async fn checkpoint_servers(&self, run_id: i64) -> Result<Vec<(i64, i64, String)>> {
        Ok(sqlx::query_as::<_, (i64, i64, String)>(
            "SELECT id, round, server FROM checkpoints WHERE run_id = ? AND server IS NOT NULL ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
