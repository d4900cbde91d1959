//! The SQLite store: migrations, typed queries and the read-only SQL surface.
//!
//! Only this crate knows SQL. Every write the engine makes goes through one of the functions
//! here; batch inserts run in one transaction each. The file is opened in WAL mode with a busy
//! timeout and foreign keys on, and the embedded migrations (`migrations/` at the workspace
//! root) are applied on open.
//!
//! This file opens the store and names the errors; the queries live in one module per domain,
//! each adding its own `impl Store` block:
//!
//! - `runs`: runs, their status and spec snapshot, and the lease on a run.
//! - `stages`: rounds and stage executions (start, progress, finish), the round summary.
//! - `events`: the append-only event log.
//! - `items`: prompts, generations and corrections (a round's per-item work).
//! - `pairs`: preference pairs and their verdicts; the kept pairs a round trains on.
//! - `training`: training jobs, their logs and metrics, checkpoints.
//! - `aligner_data`: the Aligner's own data (`aligner_examples`) and its held-out check.
//! - `eval`: held-out answers, judge calls, evaluation metrics, gate decisions.
//! - `daemon`: the daemon's job queue.
//! - `proxy`: the correction proxy's records.
//! - `report`: read-only queries behind `aligner report`.
//! - `readonly`: the read-only SQL surface behind `aligner sql`.
//! - `rows`: the row types read and written.
//! - `batch`: the one multi-row INSERT every batch write goes through.
//! - `domain`: the closed vocabularies (stages, statuses, verdicts, gate decisions) as enums.

mod aligner_data;
mod batch;
mod daemon;
pub mod domain;
mod eval;
mod events;
mod items;
mod pairs;
mod proxy;
mod readonly;
mod report;
mod rows;
mod runs;
mod stages;
mod training;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub use daemon::{JobRow, QueuedRun};
pub use domain::{
    EventKind, GateDecision, JobState, Level, Outcome, RunStatus, Stage, StageStatus, UnknownValue,
    Verdict,
};
pub use proxy::{NewProxyRecord, ProxyRecordRow};
pub use readonly::{QueryResult, ReadOnlyError};
pub use report::*;
pub use rows::*;
pub use stages::StageEnd;

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

impl Store {
    /// A count over a round's rows: `sql` binds the run and the round, in that order.
    pub(crate) async fn round_count(&self, sql: &str, run_id: i64, round: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(run_id)
            .bind(round)
            .fetch_one(&self.pool)
            .await?)
    }

    /// A keyset page of a round's generations, in id order: `select` reads from `generations g`
    /// and ends in a `WHERE` that binds the run and the round; the page is the rows after
    /// `after_id`, at most `limit` of them.
    pub(crate) async fn generation_page<T>(
        &self,
        select: &str,
        (run_id, round): (i64, i64),
        (after_id, limit): (i64, i64),
    ) -> Result<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let sql = format!("{select} AND g.id > ? ORDER BY g.id LIMIT ?");
        Ok(sqlx::query_as::<_, T>(&sql)
            .bind(run_id)
            .bind(round)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

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
}

#[cfg(test)]
mod tests;
