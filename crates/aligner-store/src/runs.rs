//! Runs: creating and finding them, their status, and the lease that lets one process drive
//! a run at a time. The run row also keeps the spec snapshot (`spec_json`, `spec_hash`).

use sqlx::{Executor, Sqlite};

use crate::{Error, Result, RunRow, RunStatus, Store};

pub(crate) const RUN_COLUMNS: &str =
    "id, name, pipeline_path, spec_json, spec_hash, status, error, lease_holder, \
     lease_expires_ms, created_at, updated_at, finished_at";

/// Runs a daemon queues or drives are not continued by a standalone `aligner run`.
const NOT_DAEMON_JOB: &str =
    "id NOT IN (SELECT run_id FROM daemon_jobs WHERE state NOT IN ('done', 'failed', 'cancelled'))";

impl Store {
    pub async fn create_run(
        &self,
        name: &str,
        pipeline_path: &str,
        spec_json: &str,
        spec_hash: &str,
    ) -> Result<i64> {
        insert_run(&self.pool, name, pipeline_path, spec_json, spec_hash).await
    }

    /// The newest run of this pipeline name that has not finished.
    pub async fn latest_unfinished_run(&self, name: &str) -> Result<Option<RunRow>> {
        Ok(sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE name = ? AND status IN ('running', 'failed') AND {NOT_DAEMON_JOB} ORDER BY id DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn run(&self, id: i64) -> Result<RunRow> {
        sqlx::query_as::<_, RunRow>(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NoSuchRun(id.to_string()))
    }

    /// A run by numeric id, or the newest run with that pipeline name.
    pub async fn find_run(&self, id_or_name: &str) -> Result<RunRow> {
        if let Ok(id) = id_or_name.parse::<i64>() {
            return self.run(id).await;
        }
        sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1"
        ))
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NoSuchRun(id_or_name.to_string()))
    }

    /// An older unfinished run of this pipeline than `run_id` (another process created it at
    /// the same moment as us).
    pub async fn older_unfinished_run(&self, name: &str, run_id: i64) -> Result<Option<RunRow>> {
        Ok(sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE name = ? AND id < ? AND status IN ('running', 'failed') AND {NOT_DAEMON_JOB} ORDER BY id DESC LIMIT 1"
        ))
        .bind(name)
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Removes a run that has nothing recorded yet (a duplicate created by a race).
    pub async fn delete_empty_run(&self, run_id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let has_work: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM stage_executions WHERE run_id = ?1) + (SELECT count(*) FROM events WHERE run_id = ?1)",
        )
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await?;
        if has_work == 0 {
            sqlx::query("DELETE FROM runs WHERE id = ?")
                .bind(run_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn latest_run(&self) -> Result<Option<RunRow>> {
        Ok(sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn list_runs(&self) -> Result<Vec<RunRow>> {
        Ok(
            sqlx::query_as::<_, RunRow>(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id"))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn set_run_status(
        &self,
        run_id: i64,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET status = ?, error = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                    finished_at = CASE WHEN ? IN ('done', 'cancelled') THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END
             WHERE id = ?",
        )
        .bind(status)
        .bind(error)
        .bind(status)
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes the run's lease for `holder` until `now_ms + ttl_ms`. It succeeds when the lease is
    /// free, expired, already ours, or held by `stale_holder` (a holder the caller proved dead).
    pub async fn acquire_lease(
        &self,
        run_id: i64,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
        stale_holder: Option<&str>,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE runs SET lease_holder = ?, lease_expires_ms = ?
             WHERE id = ? AND (lease_holder IS NULL OR lease_expires_ms < ? OR lease_holder = ? OR lease_holder = ?)",
        )
        .bind(holder)
        .bind(now_ms + ttl_ms)
        .bind(run_id)
        .bind(now_ms)
        .bind(holder)
        .bind(stale_holder.unwrap_or("\u{0}"))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if done == 1 {
            return Ok(());
        }
        let run = self.run(run_id).await?;
        Err(Error::LeaseHeld {
            run: run_id,
            holder: run.lease_holder.unwrap_or_default(),
            expires: run.lease_expires_ms.map(format_ms).unwrap_or_default(),
        })
    }

    /// Extends our lease; false when another process took it (we must stop).
    pub async fn renew_lease(
        &self,
        run_id: i64,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool> {
        let n =
            sqlx::query("UPDATE runs SET lease_expires_ms = ? WHERE id = ? AND lease_holder = ?")
                .bind(now_ms + ttl_ms)
                .bind(run_id)
                .bind(holder)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(n == 1)
    }

    pub async fn release_lease(&self, run_id: i64, holder: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET lease_holder = NULL, lease_expires_ms = NULL WHERE id = ? AND lease_holder = ?")
            .bind(run_id)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn format_ms(ms: i64) -> String {
    // Human-readable enough for an error message without a date crate.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = (ms - now) / 1000;
    if secs >= 0 {
        format!("{secs}s from now")
    } else {
        format!("{}s ago", -secs)
    }
}

/// Records a new run with its spec snapshot, on the pool or on the caller's transaction (the
/// daemon queues the run in the same one).
pub(crate) async fn insert_run<'c>(
    conn: impl Executor<'c, Database = Sqlite>,
    name: &str,
    pipeline_path: &str,
    spec_json: &str,
    spec_hash: &str,
) -> Result<i64> {
    Ok(sqlx::query(
        "INSERT INTO runs (name, pipeline_path, spec_json, spec_hash) VALUES (?, ?, ?, ?)",
    )
    .bind(name)
    .bind(pipeline_path)
    .bind(spec_json)
    .bind(spec_hash)
    .execute(conn)
    .await?
    .last_insert_rowid())
}
