//! The SQLite store: migrations, typed queries and the read-only SQL surface.
//!
//! Only this crate knows SQL. Every write the engine makes goes through one of the functions
//! here; batch inserts run in one transaction each. The file is opened in WAL mode with a busy
//! timeout and foreign keys on, and the embedded migrations (`migrations/` at the workspace
//! root) are applied on open.

mod daemon;
mod proxy;
mod readonly;
mod report;
mod rows;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

pub use daemon::{JobRow, QueuedRun};
pub use proxy::{NewProxyRecord, ProxyRecordRow};
pub use readonly::{QueryResult, ReadOnlyError};
pub use report::*;
pub use rows::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open store `{path}`: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("store `{path}` does not exist\nhint: run a pipeline first, or pass `--store FILE`")]
    Missing { path: PathBuf },
    #[error("cannot apply migrations to `{path}`: {source}\nhint: the file may come from a newer aligner; use a new store file")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("run `{run}` is being driven by {holder} (lease until {expires})\nhint: wait for it to finish, or stop that process first")]
    LeaseHeld {
        run: i64,
        holder: String,
        expires: String,
    },
    #[error("no run `{0}` in this store\nhint: `aligner status` lists the runs")]
    NoSuchRun(String),
    #[error(transparent)]
    ReadOnly(#[from] ReadOnlyError),
    #[error("store query failed: {0}")]
    Sql(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handle on one store file. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
}

/// Runs a daemon queues or drives are not continued by a standalone `aligner run`.
const NOT_DAEMON_JOB: &str =
    "id NOT IN (SELECT run_id FROM daemon_jobs WHERE state NOT IN ('done', 'failed', 'cancelled'))";

/// Rows per multi-row INSERT statement (keeps well under SQLite's bound-variable limit).
const INSERT_CHUNK: usize = 400;

impl Store {
    /// Opens (creating if needed) a store for writing and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Open {
                path: path.into(),
                source: sqlx::Error::Io(e),
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // Switching a new file to WAL needs a moment of exclusive access, which SQLite refuses
        // at once (no busy wait) when another process is opening the same file: retry briefly.
        let mut tries = 0;
        let pool = loop {
            match SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options.clone())
                .await
            {
                Ok(pool) => break pool,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("5") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20 + 10 * tries)).await;
                }
                Err(source) => {
                    return Err(Error::Open {
                        path: path.into(),
                        source,
                    })
                }
            }
        };
        // Two processes opening a new file at once both try to apply the migrations; the
        // loser's transaction fails once the winner's commits, and a second pass finds them applied.
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(_) if attempt < 3 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(source) => {
                    return Err(Error::Migrate {
                        path: path.into(),
                        source,
                    })
                }
            }
        }
        Ok(Store {
            pool,
            path: path.into(),
        })
    }

    /// Opens an existing store read-only (`aligner sql`, `status`, `export`). Nothing is created
    /// and no migration runs.
    pub async fn open_read_only(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(Error::Missing { path: path.into() });
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(30))
            .pragma("query_only", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        Ok(Store {
            pool,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Names of the applied migrations, oldest first.
    pub async fn applied_migrations(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT description FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Runs one read-only statement and returns every row (see [`readonly`]).
    pub async fn query_read_only(&self, sql: &str) -> Result<QueryResult> {
        readonly::query(&self.pool, sql, None).await
    }

    /// As [`query_read_only`](Store::query_read_only), stopping after `max_rows` rows
    /// (`truncated` says so).
    pub async fn query_read_only_limited(&self, sql: &str, max_rows: usize) -> Result<QueryResult> {
        readonly::query(&self.pool, sql, Some(max_rows)).await
    }

    // ---------------------------------------------------------------- runs

    pub async fn create_run(
        &self,
        name: &str,
        pipeline_path: &str,
        spec_json: &str,
        spec_hash: &str,
    ) -> Result<i64> {
        let id = sqlx::query(
            "INSERT INTO runs (name, pipeline_path, spec_json, spec_hash) VALUES (?, ?, ?, ?)",
        )
        .bind(name)
        .bind(pipeline_path)
        .bind(spec_json)
        .bind(spec_hash)
        .execute(&self.pool)
        .await?
        .last_insert_rowid();
        Ok(id)
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

    /// Whether a stage of a round has finished.
    pub async fn stage_done(&self, run_id: i64, round: i64, stage: &str) -> Result<bool> {
        Ok(self
            .stage(run_id, round, stage)
            .await?
            .is_some_and(|s| s.status == "done"))
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
        status: &str,
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

    // ---------------------------------------------------------------- rounds & stages

    /// Records the round's start once; a resumed round keeps its first row.
    pub async fn ensure_round(
        &self,
        run_id: i64,
        round: i64,
        upstream_model: &str,
        upstream_ref: &str,
        checkpoint_id: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO rounds (run_id, round, upstream_model, upstream_ref, checkpoint_id) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (run_id, round) DO NOTHING",
        )
        .bind(run_id)
        .bind(round)
        .bind(upstream_model)
        .bind(upstream_ref)
        .bind(checkpoint_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn finish_round(&self, run_id: i64, round: i64, status: &str) -> Result<()> {
        sqlx::query(
            "UPDATE rounds SET status = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id = ? AND round = ?",
        )
        .bind(status)
        .bind(run_id)
        .bind(round)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn rounds(&self, run_id: i64) -> Result<Vec<RoundRow>> {
        Ok(sqlx::query_as::<_, RoundRow>(
            "SELECT run_id, round, status, upstream_model, upstream_ref, checkpoint_id, started_at, finished_at
             FROM rounds WHERE run_id = ? ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn round_summaries(&self, run_id: i64) -> Result<Vec<RoundSummary>> {
        Ok(sqlx::query_as::<_, RoundSummary>(
            "SELECT run_id, round, status, upstream_ref, generations_ok, generations_failed, corrections_ok,
                    corrections_failed, pairs_kept, pairs_dropped, copy_rate, mean_len_original,
                    mean_len_correction, drop_reasons
             FROM round_summary WHERE run_id = ? ORDER BY round",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn stage(&self, run_id: i64, round: i64, stage: &str) -> Result<Option<StageRow>> {
        Ok(sqlx::query_as::<_, StageRow>(&format!(
            "SELECT {STAGE_COLUMNS} FROM stage_executions WHERE run_id = ? AND round = ? AND stage = ?"
        ))
        .bind(run_id)
        .bind(round)
        .bind(stage)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn stages(&self, run_id: i64) -> Result<Vec<StageRow>> {
        Ok(sqlx::query_as::<_, StageRow>(&format!(
            "SELECT {STAGE_COLUMNS} FROM stage_executions WHERE run_id = ? ORDER BY round, id"
        ))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Marks a stage running (first time, or again after a crash: `executions` counts them).
    pub async fn start_stage(
        &self,
        run_id: i64,
        round: i64,
        stage: &str,
        total: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO stage_executions (run_id, round, stage, total) VALUES (?, ?, ?, ?)
             ON CONFLICT (run_id, round, stage) DO UPDATE SET
                status = 'running', executions = executions + 1, total = excluded.total, error = NULL, finished_at = NULL",
        )
        .bind(run_id)
        .bind(round)
        .bind(stage)
        .bind(total)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn update_stage_progress(
        &self,
        run_id: i64,
        round: i64,
        stage: &str,
        done: i64,
        failed: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE stage_executions SET done = ?, failed = ? WHERE run_id = ? AND round = ? AND stage = ?")
            .bind(done)
            .bind(failed)
            .bind(run_id)
            .bind(round)
            .bind(stage)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_stage(
        &self,
        run_id: i64,
        round: i64,
        stage: &str,
        status: &str,
        done: i64,
        failed: i64,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE stage_executions SET status = ?, done = ?, failed = ?, error = ?,
                    finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE run_id = ? AND round = ? AND stage = ?",
        )
        .bind(status)
        .bind(done)
        .bind(failed)
        .bind(error)
        .bind(run_id)
        .bind(round)
        .bind(stage)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- events

    pub async fn add_event(&self, event: &NewEvent<'_>) -> Result<()> {
        sqlx::query("INSERT INTO events (run_id, round, stage, level, kind, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(event.run_id)
            .bind(event.round)
            .bind(event.stage)
            .bind(event.level)
            .bind(event.kind)
            .bind(event.message)
            .bind(event.data.as_ref().map(|d| d.to_string()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn events(&self, run_id: i64, after_id: i64, limit: i64) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as::<_, EventRow>(
            "SELECT id, run_id, round, stage, level, kind, message, data, ts FROM events
             WHERE run_id = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(run_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---------------------------------------------------------------- prompts

    /// Inserts the run's prompts in one transaction (all or nothing, so a crash mid-ingest
    /// leaves no partial prompt set).
    pub async fn insert_prompts(&self, run_id: i64, prompts: &[NewPrompt]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in prompts.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO prompts (run_id, idx, source_id, split, system, prompt, prompt_hash, metadata) ");
            qb.push_values(chunk, |mut b, p| {
                b.push_bind(run_id)
                    .push_bind(p.idx)
                    .push_bind(&p.source_id)
                    .push_bind(&p.split)
                    .push_bind(&p.system)
                    .push_bind(&p.prompt)
                    .push_bind(&p.prompt_hash)
                    .push_bind(p.metadata.as_ref().map(|m| m.to_string()));
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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
            "SELECT id, idx, system, prompt, prompt_hash FROM prompts
             WHERE run_id = ? AND split = 'train' AND idx > ? ORDER BY idx LIMIT ?",
        )
        .bind(run_id)
        .bind(after_idx)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---------------------------------------------------------------- generations

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
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO generations (run_id, round, prompt_id, sample_idx, status, text, finish_reason, model,
                 backend, served_model, checkpoint_id, sampling, prompt_tokens, completion_tokens, latency_ms, attempts, error) ",
            );
            qb.push_values(chunk, |mut b, g| {
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
                    .push_bind(&g.out.error);
            });
            qb.push(" ON CONFLICT (run_id, round, prompt_id, sample_idx) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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

    // ---------------------------------------------------------------- corrections

    /// Successful generations of the round without a correction yet, after `after_id`.
    pub async fn uncorrected_page(
        &self,
        run_id: i64,
        round: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<UncorrectedRow>> {
        Ok(sqlx::query_as::<_, UncorrectedRow>(
            "SELECT g.id AS generation_id, g.prompt_id, p.prompt, g.text AS answer
             FROM generations g JOIN prompts p ON p.id = g.prompt_id
             WHERE g.run_id = ? AND g.round = ? AND g.status = 'ok' AND g.id > ?
               AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.generation_id = g.id)
             ORDER BY g.id LIMIT ?",
        )
        .bind(run_id)
        .bind(round)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn count_uncorrected(&self, run_id: i64, round: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM generations g WHERE g.run_id = ? AND g.round = ? AND g.status = 'ok'
               AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.generation_id = g.id)",
        )
        .bind(run_id)
        .bind(round)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn insert_corrections(&self, items: &[NewCorrection]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO corrections (run_id, round, generation_id, status, text, finish_reason, model, backend,
                 served_model, template_id, template_hash, sampling, prompt_tokens, completion_tokens, latency_ms, attempts, error) ",
            );
            qb.push_values(chunk, |mut b, c| {
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
                    .push_bind(&c.out.error);
            });
            qb.push(" ON CONFLICT (generation_id) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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

    // ---------------------------------------------------------------- pairs

    /// Generations of the round without a pair verdict yet, with their correction (if any).
    pub async fn unpaired_page(
        &self,
        run_id: i64,
        round: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<UnpairedRow>> {
        Ok(sqlx::query_as::<_, UnpairedRow>(
            "SELECT g.id AS generation_id, g.prompt_id, p.prompt, p.prompt_hash || ':' || g.sample_idx AS dedupe_key, g.status AS generation_status,
                    g.text AS original, g.finish_reason AS original_finish,
                    c.id AS correction_id, c.status AS correction_status, c.text AS correction,
                    c.finish_reason AS correction_finish
             FROM generations g
             JOIN prompts p ON p.id = g.prompt_id
             LEFT JOIN corrections c ON c.generation_id = g.id
             WHERE g.run_id = ? AND g.round = ? AND g.id > ?
               AND NOT EXISTS (SELECT 1 FROM pairs x WHERE x.generation_id = g.id)
             ORDER BY g.id LIMIT ?",
        )
        .bind(run_id)
        .bind(round)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn count_unpaired(&self, run_id: i64, round: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM generations g WHERE g.run_id = ? AND g.round = ?
               AND NOT EXISTS (SELECT 1 FROM pairs x WHERE x.generation_id = g.id)",
        )
        .bind(run_id)
        .bind(round)
        .fetch_one(&self.pool)
        .await?)
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
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO pairs (run_id, round, prompt_id, generation_id, correction_id, chosen, rejected, verdict,
                 reason, edit_distance, length_ratio) ",
            );
            qb.push_values(chunk, |mut b, p| {
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
                    .push_bind(p.length_ratio);
            });
            qb.push(" ON CONFLICT (generation_id) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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

    // ---------------------------------------------------------------- training

    /// Creates the round's training job, or re-opens it after a crash (attempts + 1).
    pub async fn start_training_job(&self, job: &NewTrainingJob<'_>) -> Result<TrainingJobRow> {
        sqlx::query(
            "INSERT INTO training_jobs (run_id, round, method, backend, hyperparameters, reference_policy, reference_model,
                 base_model, data_path, pairs, output_dir, command)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
        .execute(&self.pool)
        .await?;
        self.training_job(job.run_id, job.round)
            .await?
            .ok_or_else(|| Error::Sql(sqlx::Error::RowNotFound))
    }

    pub async fn training_job(&self, run_id: i64, round: i64) -> Result<Option<TrainingJobRow>> {
        Ok(sqlx::query_as::<_, TrainingJobRow>(
            "SELECT id, run_id, round, status, attempts, exit_code, output_dir, error, pgid FROM training_jobs WHERE run_id = ? AND round = ?",
        )
        .bind(run_id)
        .bind(round)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records the process group of the running train command, so a resumed run can stop a
    /// trainer that outlived a killed `aligner`.
    pub async fn set_training_pgid(&self, job_id: i64, pgid: Option<i64>) -> Result<()> {
        sqlx::query("UPDATE training_jobs SET pgid = ? WHERE id = ?")
            .bind(pgid)
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn append_training_logs(
        &self,
        job_id: i64,
        attempt: i64,
        lines: &[(String, String)],
    ) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in lines.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO training_logs (training_job_id, attempt, stream, line) ",
            );
            qb.push_values(chunk, |mut b, (stream, line)| {
                b.push_bind(job_id)
                    .push_bind(attempt)
                    .push_bind(stream)
                    .push_bind(line);
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// One optimizer step's metrics (TRL's names), replacing a step recorded before (a
    /// resumed training repeats no step, but a retried one may).
    pub async fn record_training_metrics(
        &self,
        job_id: i64,
        step: i64,
        values: &[(String, f64)],
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT OR REPLACE INTO training_metrics (training_job_id, step, name, value) ",
        );
        qb.push_values(values, |mut b, (name, value)| {
            b.push_bind(job_id)
                .push_bind(step)
                .push_bind(name)
                .push_bind(value);
        });
        qb.build().execute(&self.pool).await?;
        Ok(())
    }

    pub async fn finish_training_job(
        &self,
        job_id: i64,
        status: &str,
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
            "SELECT id, run_id, round, path, serve_model FROM checkpoints WHERE run_id = ? AND round = ?",
        )
        .bind(run_id)
        .bind(round)
        .fetch_optional(&self.pool)
        .await?)
    }

    // ---------------------------------------------------------------- the Aligner's data

    /// Inserts the rows of the run's Aligner data in one transaction (all or nothing).
    pub async fn insert_aligner_examples(
        &self,
        run_id: i64,
        rows: &[NewAlignerExample],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(INSERT_CHUNK / 2) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO aligner_examples (run_id, idx, source_id, split, label, question, metadata, answer, correction, teacher) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(run_id)
                    .push_bind(r.idx)
                    .push_bind(&r.source_id)
                    .push_bind(&r.split)
                    .push_bind(&r.label)
                    .push_bind(&r.question)
                    .push_bind(r.metadata.as_ref().map(|m| m.to_string()))
                    .push_bind(&r.answer)
                    .push_bind(&r.correction)
                    .push_bind(&r.teacher);
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every row of the run's Aligner data, in order.
    pub async fn aligner_examples(&self, run_id: i64) -> Result<Vec<AlignerExampleRow>> {
        Ok(sqlx::query_as::<_, AlignerExampleRow>(
            "SELECT id, idx, source_id, split, label, question, answer, answer_finish, correction, output
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
                } => sqlx::query(
                    "UPDATE aligner_examples SET answer = ?, answer_finish = ?, answer_model = ?, error = NULL WHERE id = ?",
                )
                .bind(text)
                .bind(finish)
                .bind(model)
                .bind(id),
                AlignerUpdate::Correction {
                    id,
                    text,
                    teacher,
                    answer_refusal,
                    correction_refusal,
                } => sqlx::query(
                    "UPDATE aligner_examples SET correction = ?, teacher = ?, answer_refusal = ?, correction_refusal = ?, error = NULL WHERE id = ?",
                )
                .bind(text)
                .bind(teacher)
                .bind(*answer_refusal as i64)
                .bind(*correction_refusal as i64)
                .bind(id),
                AlignerUpdate::Output {
                    id,
                    text,
                    finish,
                    refusal,
                    answer_refusal,
                    edit_distance,
                } => sqlx::query(
                    "UPDATE aligner_examples SET output = ?, output_finish = ?, output_refusal = ?, answer_refusal = ?, output_edit_distance = ?, error = NULL WHERE id = ?",
                )
                .bind(text)
                .bind(finish)
                .bind(*refusal as i64)
                .bind(*answer_refusal as i64)
                .bind(edit_distance)
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

    // ---------------------------------------------------------------- evaluation

    /// The run's held-out prompts, in order.
    pub async fn holdout_prompts(&self, run_id: i64) -> Result<Vec<HoldoutPromptRow>> {
        Ok(sqlx::query_as::<_, HoldoutPromptRow>(
            "SELECT id, idx, system, prompt, metadata FROM prompts
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
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO eval_answers (run_id, version, prompt_id, kind, status, text, finish_reason, model,
                 model_ref, completion_tokens, latency_ms, refusal, degenerate, error) ",
            );
            qb.push_values(chunk, |mut b, a| {
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
                    .push_bind(&a.out.error);
            });
            qb.push(" ON CONFLICT (run_id, version, prompt_id, kind) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO eval_judgements (run_id, round, comparison, aspect, prompt_id, \"order\",
                 candidate_id, baseline_id, status, verdict, raw, judge, latency_ms, error) ",
            );
            qb.push_values(chunk, |mut b, j| {
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
                    .push_bind(&j.out.error);
            });
            qb.push(
                " ON CONFLICT (run_id, round, comparison, aspect, prompt_id, \"order\") DO NOTHING",
            );
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a round's metrics.
    pub async fn replace_eval_metrics(
        &self,
        run_id: i64,
        round: i64,
        metrics: &[EvalMetricRow],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM eval_metrics WHERE run_id = ? AND round = ?")
            .bind(run_id)
            .bind(round)
            .execute(&mut *tx)
            .await?;
        for m in metrics {
            sqlx::query(
                "INSERT INTO eval_metrics (run_id, round, name, value, ci_low, ci_high, n, detail)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(run_id)
            .bind(round)
            .bind(&m.name)
            .bind(m.value)
            .bind(m.ci_low)
            .bind(m.ci_high)
            .bind(m.n)
            .bind(&m.detail)
            .execute(&mut *tx)
            .await?;
        }
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
        .bind(&d.decision)
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

impl Store {
    /// Two conditional counts over one round of a table (`ok`/`failed`, `kept`/`dropped`).
    async fn round_counts(
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

#[cfg(test)]
mod tests;

impl Store {
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
}
