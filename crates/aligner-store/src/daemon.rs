//! The daemon's queue (`daemon_jobs`): submitted pipelines waiting for, holding or done with a
//! worker slot, with a lease naming the daemon process that claimed each.

use serde::Serialize;
use sqlx::{Executor, Sqlite};

use crate::runs::insert_run;
use crate::{JobState, Result, Store};

const JOB_COLUMNS: &str = "run_id, name, base_dir, state, requested, error, attempts, crashes, lease_holder, lease_expires_ms, submitted_at, started_at, finished_at, updated_at";

/// One queued, running or finished job (the pipeline text is read separately).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub run_id: i64,
    pub name: String,
    pub base_dir: String,
    pub state: JobState,
    pub requested: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    /// How many times a daemon died while driving it.
    pub crashes: i64,
    pub lease_holder: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub submitted_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
}

/// What [`Store::create_queued_run`] records.
pub struct QueuedRun<'a> {
    pub name: &'a str,
    pub pipeline_path: &'a str,
    pub spec_json: &'a str,
    pub spec_hash: &'a str,
    pub pipeline_yaml: &'a str,
    pub base_dir: &'a str,
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

impl Store {
    /// Queues the run `run_id` (already created) for a daemon.
    pub async fn enqueue_job(
        &self,
        run_id: i64,
        name: &str,
        pipeline_yaml: &str,
        base_dir: &str,
    ) -> Result<()> {
        insert_job(&self.pool, run_id, name, pipeline_yaml, base_dir).await
    }

    /// Records a new run and queues it, in one transaction (no run without its queue entry).
    pub async fn create_queued_run(&self, run: &QueuedRun<'_>) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id = insert_run(
            &mut *tx,
            run.name,
            run.pipeline_path,
            run.spec_json,
            run.spec_hash,
        )
        .await?;
        insert_job(&mut *tx, id, run.name, run.pipeline_yaml, run.base_dir).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Pause or cancel requests recorded on jobs `holder` is driving.
    pub async fn job_requests(&self, holder: &str) -> Result<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT run_id, requested FROM daemon_jobs
             WHERE state = 'running' AND requested IS NOT NULL AND lease_holder = ?",
        )
        .bind(holder)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn jobs(&self) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM daemon_jobs ORDER BY run_id"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn job(&self, run_id: i64) -> Result<Option<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM daemon_jobs WHERE run_id = ?"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The submitted pipeline text of a job.
    pub async fn job_pipeline(&self, run_id: i64) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT pipeline_yaml FROM daemon_jobs WHERE run_id = ?")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Claims the oldest queued job for `holder`: it becomes `running` with a lease until
    /// `now_ms + ttl_ms`. None when nothing is queued.
    pub async fn claim_job(
        &self,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE daemon_jobs SET state = 'running', lease_holder = ?, lease_expires_ms = ?,
                    attempts = attempts + 1, started_at = COALESCE(started_at, {NOW}), updated_at = {NOW}
             WHERE run_id = (SELECT run_id FROM daemon_jobs WHERE state = 'queued' ORDER BY run_id LIMIT 1)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(holder)
        .bind(now_ms + ttl_ms)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Extends `holder`'s lease on a job it is driving.
    pub async fn renew_job_lease(
        &self,
        run_id: i64,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE daemon_jobs SET lease_expires_ms = ?
             WHERE run_id = ? AND lease_holder = ? AND state = 'running'",
        )
        .bind(now_ms + ttl_ms)
        .bind(run_id)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Running jobs whose lease lapsed, or whose holder is one of `dead_holders`: the daemon
    /// driving them died. Each counts a crash; one with `max_crashes` crashes is failed (its
    /// run too) with the reason, the others go back to the queue. Returns (queued, failed).
    pub async fn requeue_orphaned_jobs(
        &self,
        now_ms: i64,
        dead_holders: &[String],
        max_crashes: u32,
    ) -> Result<(u64, u64)> {
        let mut orphans: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT run_id, crashes FROM daemon_jobs
             WHERE state = 'running' AND (lease_holder IS NULL OR lease_expires_ms < ?)",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        for holder in dead_holders {
            let more: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT run_id, crashes FROM daemon_jobs WHERE state = 'running' AND lease_holder = ?",
            )
            .bind(holder)
            .fetch_all(&self.pool)
            .await?;
            for o in more {
                if !orphans.contains(&o) {
                    orphans.push(o);
                }
            }
        }
        let (mut queued, mut failed) = (0, 0);
        for (run_id, crashes) in orphans {
            let crashes = crashes + 1;
            if crashes >= i64::from(max_crashes) {
                let error = format!(
                    "the daemon stopped {crashes} times while driving this run (a crash, kill -9 or a lost lease), so it is not started again\nhint: if the run itself brings the daemon down, its last events and the daemon's log say where; `aligner resume {run_id} --store STORE` continues it by hand, or `--max-crashes` allows more"
                );
                self.set_run_status(run_id, crate::RunStatus::Failed, Some(&error))
                    .await?;
                self.set_job_state(run_id, JobState::Failed, Some(&error))
                    .await?;
                failed += 1;
            } else {
                sqlx::query(&format!(
                    "UPDATE daemon_jobs SET state = 'queued', lease_holder = NULL, lease_expires_ms = NULL, updated_at = {NOW}
                     WHERE run_id = ? AND state = 'running'"
                ))
                .bind(run_id)
                .execute(&self.pool)
                .await?;
                queued += 1;
            }
            sqlx::query("UPDATE daemon_jobs SET crashes = ? WHERE run_id = ?")
                .bind(crashes)
                .bind(run_id)
                .execute(&self.pool)
                .await?;
        }
        Ok((queued, failed))
    }

    /// Holders of running jobs' leases (to check which of them are dead).
    pub async fn job_lease_holders(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT lease_holder FROM daemon_jobs WHERE state = 'running' AND lease_holder IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Moves a job to `state`, releasing its lease and clearing the request it honoured.
    pub async fn set_job_state(
        &self,
        run_id: i64,
        state: JobState,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(&format!(
            "UPDATE daemon_jobs SET state = ?, error = ?, requested = NULL, lease_holder = NULL,
                    lease_expires_ms = NULL, updated_at = {NOW},
                    finished_at = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN {NOW} END
             WHERE run_id = ?"
        ))
        .bind(state)
        .bind(error)
        .bind(state)
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a pause or cancel request on a running job (a cancel is never downgraded to a
    /// pause); false when the job is not running.
    pub async fn request_job(&self, run_id: i64, request: &str) -> Result<bool> {
        Ok(sqlx::query(&format!(
            "UPDATE daemon_jobs SET requested = CASE WHEN requested = 'cancel' THEN 'cancel' ELSE ? END,
                    updated_at = {NOW}
             WHERE run_id = ? AND state = 'running'"
        ))
        .bind(request)
        .bind(run_id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Moves a job from one of `from` to `to` in one statement; false when it was in another
    /// state (the caller reports the conflict).
    pub async fn transition_job(
        &self,
        run_id: i64,
        from: &[JobState],
        to: JobState,
    ) -> Result<bool> {
        let placeholders = vec!["?"; from.len()].join(", ");
        let sql = format!(
            "UPDATE daemon_jobs SET state = ?, requested = NULL, updated_at = {NOW},
                    finished_at = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN {NOW} END
             WHERE run_id = ? AND state IN ({placeholders})"
        );
        let mut q = sqlx::query(&sql).bind(to).bind(to).bind(run_id);
        for f in from {
            q = q.bind(f.as_str());
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }
}

async fn insert_job<'c>(
    conn: impl Executor<'c, Database = Sqlite>,
    run_id: i64,
    name: &str,
    pipeline_yaml: &str,
    base_dir: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO daemon_jobs (run_id, name, pipeline_yaml, base_dir) VALUES (?, ?, ?, ?)",
    )
    .bind(run_id)
    .bind(name)
    .bind(pipeline_yaml)
    .bind(base_dir)
    .execute(conn)
    .await?;
    Ok(())
}
