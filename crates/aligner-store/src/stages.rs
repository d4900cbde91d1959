//! Rounds and stage executions: which stage of which round started, how far it got, how it
//! ended; and the per-round summary view.

use crate::{Result, RoundRow, RoundSummary, Stage, StageRow, StageStatus, Store};

/// A query on the store's database, before its values are bound.
type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

pub(crate) const STAGE_COLUMNS: &str =
    "run_id, round, stage, status, total, done, failed, executions, error, started_at, finished_at";

impl Store {
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

    pub async fn finish_round(&self, run_id: i64, round: i64, status: StageStatus) -> Result<()> {
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

    pub async fn stage(&self, run_id: i64, round: i64, stage: Stage) -> Result<Option<StageRow>> {
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
        stage: Stage,
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
        stage: Stage,
        done: i64,
        failed: i64,
    ) -> Result<()> {
        self.update_stage(
            (run_id, round, stage),
            "UPDATE stage_executions SET done = ?, failed = ? WHERE run_id = ? AND round = ? AND stage = ?",
            |q| q.bind(done).bind(failed),
        )
        .await
    }

    /// Records how a stage execution ended.
    pub async fn finish_stage(
        &self,
        run_id: i64,
        round: i64,
        stage: Stage,
        end: StageEnd<'_>,
    ) -> Result<()> {
        let StageEnd {
            status,
            done,
            failed,
            error,
        } = end;
        self.update_stage(
            (run_id, round, stage),
            "UPDATE stage_executions SET status = ?, done = ?, failed = ?, error = ?,
                    finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE run_id = ? AND round = ? AND stage = ?",
            |q| q.bind(status).bind(done).bind(failed).bind(error),
        )
        .await
    }

    /// Runs `update` (`UPDATE stage_executions SET ... WHERE run_id = ? AND round = ? AND
    /// stage = ?`) on one stage execution, `bind` binding the values of its `SET`.
    async fn update_stage<'q>(
        &self,
        (run_id, round, stage): (i64, i64, Stage),
        update: &'q str,
        bind: impl FnOnce(SqliteQuery<'q>) -> SqliteQuery<'q>,
    ) -> Result<()> {
        bind(sqlx::query(update))
            .bind(run_id)
            .bind(round)
            .bind(stage)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether a stage of a round has finished.
    pub async fn stage_done(&self, run_id: i64, round: i64, stage: Stage) -> Result<bool> {
        Ok(self
            .stage(run_id, round, stage)
            .await?
            .is_some_and(|s| s.status == StageStatus::Done))
    }
}

/// How a stage execution ended: its status, its final counts and, for a failed one, why.
#[derive(Debug, Clone, Copy)]
pub struct StageEnd<'a> {
    pub status: StageStatus,
    pub done: i64,
    pub failed: i64,
    pub error: Option<&'a str>,
}

impl<'a> StageEnd<'a> {
    /// Finished, with `done` units done and `failed` failed.
    pub fn done(done: i64, failed: i64) -> Self {
        StageEnd {
            status: StageStatus::Done,
            done,
            failed,
            error: None,
        }
    }

    /// Failed with `error`, having `done` units done and `failed` failed.
    pub fn failed(done: i64, failed: i64, error: &'a str) -> Self {
        StageEnd {
            status: StageStatus::Failed,
            done,
            failed,
            error: Some(error),
        }
    }
}
