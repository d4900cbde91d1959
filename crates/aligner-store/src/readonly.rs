//! The read-only SQL surface behind `aligner sql`: one statement, no writes, rows as JSON values.

use serde::Serialize;
use sqlx::{Column, Executor, Row, SqlitePool, TypeInfo, ValueRef};

use crate::Error;

#[derive(Debug, thiserror::Error)]
pub enum ReadOnlyError {
    #[error("`aligner sql` only reads; `{keyword}` would change the store\nhint: use SELECT, WITH, EXPLAIN or a read-only PRAGMA")]
    WriteRefused { keyword: String },
    #[error("empty SQL statement\nhint: pass a query, e.g. `aligner sql \"SELECT * FROM round_summary\"`")]
    Empty,
}

/// Columns and rows of a finished query; values are JSON (null, integer, real, text; blobs as hex).
#[derive(Debug, Clone, Serialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
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

pub(crate) fn check(sql: &str) -> Result<(), ReadOnlyError> {
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

pub(crate) async fn query(pool: &SqlitePool, sql: &str) -> Result<QueryResult, Error> {
    check(sql)?;
    // The connection is read-only and `query_only` is on, so even a statement that slipped
    // past the keyword check (a CTE ending in DELETE) fails in SQLite itself.
    let rows = sqlx::query(sql)
        .fetch_all(pool)
        .await
        .map_err(|e| match &e {
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
    Ok(QueryResult { columns, rows: out })
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
}
