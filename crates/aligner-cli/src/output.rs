//! What goes to stdout (tables, CSV, JSON) and how errors read on stderr.

use std::io::Write;

use aligner_report::terminal::table;
use aligner_store::QueryResult;
use anyhow::Result;
use clap::ValueEnum;

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum SqlFormat {
    Table,
    Csv,
    Json,
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn print_query(result: &QueryResult, format: SqlFormat) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        SqlFormat::Table => {
            let mut t = table(result.columns.clone());
            for row in &result.rows {
                t.add_row(row.iter().map(|v| {
                    let s = cell(v);
                    if s.chars().count() > 120 {
                        format!("{}…", s.chars().take(119).collect::<String>())
                    } else {
                        s
                    }
                }));
            }
            writeln!(out, "{t}")?;
            writeln!(
                out,
                "({} row{})",
                result.rows.len(),
                if result.rows.len() == 1 { "" } else { "s" }
            )?;
        }
        SqlFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(&result.columns)?;
            for row in &result.rows {
                w.write_record(row.iter().map(cell))?;
            }
            w.flush()?;
        }
        SqlFormat::Json => {
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = result
                .rows
                .iter()
                .map(|row| {
                    result
                        .columns
                        .iter()
                        .cloned()
                        .zip(row.iter().cloned())
                        .collect()
                })
                .collect();
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// `error: ...` with the cause chain; messages already carry their `hint:` lines.
pub fn render_error(err: &anyhow::Error) -> String {
    let mut out = format!("error: {err}");
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
        }
    }
    out
}
