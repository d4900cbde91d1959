//! The read-only SQL surface behind `aligner sql`: one statement, no writes, rows as JSON values.

use serde::Serialize;
use sqlx::{Column, Executor, Row, SqlitePool, TypeInfo, ValueRef};

use crate::{Error, Result, Store};

#[derive(Debug, thiserror::Error)]
pub enum ReadOnlyError {
    #[error("`aligner sql` only reads; `{keyword}` would change the store\nhint: use SELECT, WITH, EXPLAIN or a read-only PRAGMA")]
    WriteRefused { keyword: String },
    #[error("empty SQL statement\nhint: pass a query, e.g. `aligner sql \"SELECT * FROM round_summary\"`")]
    Empty,
    #[error(
        "one statement at a time: text follows the first `;`\nhint: run each statement on its own"
    )]
    MultipleStatements,
}

/// Columns and rows of a finished query; values are JSON (null, integer, real, text; blobs as hex).
#[derive(Debug, Clone, Serialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
    /// More rows were there than the caller's limit; `rows` holds the first ones.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

const READ_KEYWORDS: &[&str] = &["SELECT", "WITH", "EXPLAIN", "VALUES", "PRAGMA"];

/// First keyword after comments and whitespace.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r
                .split_once('\n')
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r
                .split_once("*/")
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// True when anything but whitespace and comments follows the first `;` outside quotes and
/// comments (SQLite would run it as a second statement).
fn has_second_statement(sql: &str) -> bool {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'[' => {
                while i < b.len() && b[i] != b']' {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b';' => return !only_trivia(&sql[i + 1..]),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Nothing but whitespace, comments and semicolons.
fn only_trivia(mut rest: &str) -> bool {
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix(';') {
            rest = r;
        } else {
            return rest.is_empty();
        }
    }
}

pub(crate) fn check(sql: &str) -> Result<(), ReadOnlyError> {
    if has_second_statement(sql) {
        return Err(ReadOnlyError::MultipleStatements);
    }
    let keyword = first_keyword(sql);
    if keyword.is_empty() {
        return Err(ReadOnlyError::Empty);
    }
    if !READ_KEYWORDS.contains(&keyword.as_str()) {
        return Err(ReadOnlyError::WriteRefused { keyword });
    }
    // `PRAGMA x = y` sets; `PRAGMA x` and `PRAGMA x(arg)` read (and the connection is
    // read-only with `query_only` on, so a pragma that writes fails in SQLite anyway).
    if keyword == "PRAGMA" && sql.contains('=') {
        return Err(ReadOnlyError::WriteRefused {
            keyword: "PRAGMA ... =".into(),
        });
    }
    Ok(())
}

impl Store {
    /// Runs one read-only statement and returns every row.
    pub async fn query_read_only(&self, sql: &str) -> Result<QueryResult> {
        query(&self.pool, sql, None).await
    }

    /// As [`query_read_only`](Store::query_read_only), stopping after `max_rows` rows
    /// (`truncated` says so).
    pub async fn query_read_only_limited(&self, sql: &str, max_rows: usize) -> Result<QueryResult> {
        query(&self.pool, sql, Some(max_rows)).await
    }
}

async fn query(
    pool: &SqlitePool,
    sql: &str,
    max_rows: Option<usize>,
) -> Result<QueryResult, Error> {
    use futures::TryStreamExt;
    check(sql)?;
    // The connection is read-only and `query_only` is on, so even a statement that slipped
    // past the keyword check (a CTE ending in DELETE) fails in SQLite itself. Rows stream in,
    // so a limit also ends a query that would never finish (an unbounded recursive CTE).
    let mut rows = Vec::new();
    let mut truncated = false;
    let mut stream = sqlx::query(sql).fetch(pool);
    let fetched: Result<(), sqlx::Error> = async {
        while let Some(row) = stream.try_next().await? {
            if max_rows.is_some_and(|m| rows.len() >= m) {
                truncated = true;
                break;
            }
            rows.push(row);
        }
        Ok(())
    }
    .await;
    drop(stream);
    fetched.map_err(|e| match &e {
        sqlx::Error::Database(db)
            if db.message().contains("readonly") || db.message().contains("query_only") =>
        {
            Error::ReadOnly(ReadOnlyError::WriteRefused {
                keyword: first_keyword(sql),
            })
        }
        _ => Error::Sql(e),
    })?;
    let columns = match rows.first() {
        Some(row) => row.columns().iter().map(|c| c.name().to_string()).collect(),
        // No rows: ask SQLite for the statement's columns so the header still prints.
        None => pool
            .describe(sql)
            .await
            .map(|d| d.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut values = Vec::with_capacity(row.len());
        for i in 0..row.len() {
            let raw = row.try_get_raw(i)?;
            let value = if raw.is_null() {
                serde_json::Value::Null
            } else {
                match raw.type_info().name() {
                    "INTEGER" | "BOOLEAN" => serde_json::Value::from(row.try_get::<i64, _>(i)?),
                    "REAL" => serde_json::Value::from(row.try_get::<f64, _>(i)?),
                    "BLOB" => {
                        let bytes: Vec<u8> = row.try_get(i)?;
                        serde_json::Value::from(
                            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        )
                    }
                    _ => serde_json::Value::from(row.try_get::<String, _>(i)?),
                }
            };
            values.push(value);
        }
        out.push(values);
    }
    Ok(QueryResult {
        columns,
        rows: out,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_check() {
        assert!(check("SELECT 1").is_ok());
        assert!(check("  -- hi\n with x as (select 1) select * from x").is_ok());
        assert!(check("/* c */ select 1").is_ok());
        assert!(matches!(
            check("DELETE FROM runs"),
            Err(ReadOnlyError::WriteRefused { .. })
        ));
        assert!(matches!(
            check("insert into runs values (1)"),
            Err(ReadOnlyError::WriteRefused { .. })
        ));
        assert!(matches!(
            check("PRAGMA journal_mode = DELETE"),
            Err(ReadOnlyError::WriteRefused { .. })
        ));
        assert!(check("PRAGMA table_info(runs)").is_ok());
        assert!(matches!(check("   "), Err(ReadOnlyError::Empty)));
    }

    #[test]
    fn one_statement_only() {
        assert!(check("SELECT 1;").is_ok());
        assert!(check("SELECT 1 ;  -- done\n ; /* x */").is_ok());
        assert!(check("SELECT ';' AS a, \"x;y\" FROM [a;b] -- ; DROP\n").is_ok());
        for sql in [
            "SELECT 1; ATTACH '/tmp/x.db' AS x",
            "SELECT 1;SELECT 2",
            "select ';'; delete from runs",
            "SELECT 1 /* ; */; PRAGMA x",
        ] {
            assert!(
                matches!(check(sql), Err(ReadOnlyError::MultipleStatements)),
                "{sql}"
            );
        }
    }
}
