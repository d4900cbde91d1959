//! The append-only event log: what happened to a run, at which level.

use crate::{EventRow, NewEvent, Result, Store};

impl Store {
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

    /// The run's latest warnings and errors, newest last.
    pub async fn recent_problems(&self, run_id: i64, limit: i64) -> Result<Vec<EventRow>> {
        let mut rows = sqlx::query_as::<_, EventRow>(
            "SELECT id, run_id, round, stage, level, kind, message, data, ts FROM events
             WHERE run_id = ? AND level IN ('warn', 'error') ORDER BY id DESC LIMIT ?",
        )
        .bind(run_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.reverse();
        Ok(rows)
    }
}
