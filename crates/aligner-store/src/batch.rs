//! The one multi-row INSERT every batch write goes through: rows cut into chunks, one
//! statement per chunk, all chunks in one transaction.

use sqlx::query_builder::Separated;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use crate::{Result, Store};

/// Rows per multi-row INSERT statement (keeps well under SQLite's bound-variable limit).
pub(crate) const INSERT_CHUNK: usize = 400;

/// A multi-row INSERT: the statement up to its `VALUES`, what follows the rows, and how many
/// rows go into one statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchInsert {
    /// `INSERT INTO table (col, ...) ` (or `INSERT OR REPLACE INTO ...`).
    head: &'static str,
    /// Appended after the rows, e.g. ` ON CONFLICT (...) DO NOTHING`; empty for nothing.
    tail: &'static str,
    /// Rows per statement; wide rows take half of [`INSERT_CHUNK`].
    chunk: usize,
}

impl BatchInsert {
    /// An INSERT of [`INSERT_CHUNK`] rows per statement, with nothing after the rows.
    pub(crate) const fn new(head: &'static str) -> Self {
        BatchInsert {
            head,
            tail: "",
            chunk: INSERT_CHUNK,
        }
    }

    /// What follows the rows (a conflict clause).
    pub(crate) const fn tail(self, tail: &'static str) -> Self {
        BatchInsert { tail, ..self }
    }

    /// Rows per statement, for rows with many columns.
    pub(crate) const fn chunk(self, chunk: usize) -> Self {
        BatchInsert { chunk, ..self }
    }

    /// Inserts `rows` on `conn` (the caller's transaction); `bind` pushes one row's values in
    /// the column order of `head`.
    pub(crate) async fn execute_on<'a, T>(
        &self,
        conn: &mut SqliteConnection,
        rows: &'a [T],
        mut bind: impl FnMut(Separated<'_, 'a, Sqlite, &'static str>, &'a T),
    ) -> Result<()> {
        for chunk in rows.chunks(self.chunk) {
            let mut qb: QueryBuilder<'a, Sqlite> = QueryBuilder::new(self.head);
            qb.push_values(chunk, &mut bind);
            qb.push(self.tail);
            qb.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

impl Store {
    /// Inserts `rows` in one transaction (all or nothing); nothing happens for no rows.
    pub(crate) async fn insert_batch<'a, T>(
        &self,
        insert: BatchInsert,
        rows: &'a [T],
        bind: impl FnMut(Separated<'_, 'a, Sqlite, &'static str>, &'a T),
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        insert.execute_on(&mut tx, rows, bind).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{NewPrompt, Store};

    fn prompt(idx: i64, split: &str) -> NewPrompt {
        NewPrompt {
            idx,
            source_id: idx.to_string(),
            split: split.into(),
            system: None,
            history: None,
            prompt: format!("p{idx}"),
            prompt_hash: format!("h{idx}"),
            metadata: None,
        }
    }

    #[tokio::test]
    async fn a_batch_over_several_statements_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
        let n = 2 * super::INSERT_CHUNK as i64 + 1;
        // The last row breaks a CHECK in the third statement: the first two roll back with it.
        let mut rows: Vec<_> = (0..n).map(|i| prompt(i, "train")).collect();
        rows.last_mut().unwrap().split = "neither".into();
        assert!(store.insert_prompts(run, &rows).await.is_err());
        assert_eq!(store.count_prompts(run, "train").await.unwrap(), 0);
        rows.last_mut().unwrap().split = "train".into();
        store.insert_prompts(run, &rows).await.unwrap();
        assert_eq!(store.count_prompts(run, "train").await.unwrap(), n);
        store.insert_prompts(run, &[]).await.unwrap();
    }
}
