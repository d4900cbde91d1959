//! What goes to stdout (tables, CSV, JSON) and how errors read on stderr.

use std::io::Write;

use anyhow::Result;
use clap::ValueEnum;
use comfy_table::{presets, Table};

use aligner_store::{QueryResult, RoundSummary, RunRow, StageRow};

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

fn table(header: Vec<String>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED);
    if std::env::var_os("NO_COLOR").is_some() {
        t.force_no_tty();
    }
    t.set_header(header);
    t
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

pub fn print_summaries(rounds: &[RoundSummary]) {
    let mut t = table(
        [
            "round",
            "upstream",
            "generations",
            "corrections",
            "pairs kept",
            "dropped",
            "copy rate",
            "len orig",
            "len corr",
            "drop reasons",
        ]
        .map(String::from)
        .to_vec(),
    );
    for r in rounds {
        t.add_row(vec![
            r.round.to_string(),
            r.upstream_ref.clone(),
            format!("{} ok, {} failed", r.generations_ok, r.generations_failed),
            format!("{} ok, {} failed", r.corrections_ok, r.corrections_failed),
            r.pairs_kept.to_string(),
            r.pairs_dropped.to_string(),
            r.copy_rate
                .map(|c| format!("{:.1}%", c * 100.0))
                .unwrap_or_default(),
            r.mean_len_original
                .map(|v| format!("{v:.0}"))
                .unwrap_or_default(),
            r.mean_len_correction
                .map(|v| format!("{v:.0}"))
                .unwrap_or_default(),
            r.drop_reasons
                .clone()
                .filter(|d| d != "{}")
                .unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

/// The held-out check of the pipeline's own Aligner (`aligner_eval`), when there is one.
pub fn print_aligner_eval(rows: &[aligner_store::AlignerEvalRow]) {
    if rows.is_empty() {
        return;
    }
    let pct = |v: Option<f64>| v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_default();
    let mut t = table(
        [
            "aligner (held out)",
            "rows",
            "refused: answers",
            "refused: teacher",
            "refused: aligner",
            "unchanged",
            "edit distance",
        ]
        .map(String::from)
        .to_vec(),
    );
    for r in rows {
        t.add_row(vec![
            r.label.clone(),
            r.rows.to_string(),
            pct(r.refusal_rate_answer),
            pct(r.refusal_rate_teacher),
            pct(r.refusal_rate_aligner),
            pct(r.copy_rate),
            r.mean_edit_distance
                .map(|v| format!("{v:.2}"))
                .unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

/// Each round's evaluation (`eval_metrics`, metrics by round) and the gate's decisions.
pub fn print_evaluation(
    metrics: &[aligner_store::EvalMetricRow],
    gates: &[aligner_store::GateDecisionRow],
) {
    if metrics.is_empty() && gates.is_empty() {
        return;
    }
    let mut rounds: Vec<i64> = metrics.iter().map(|m| m.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let mut names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut header = vec!["evaluation (held out)".to_string()];
    header.extend(rounds.iter().map(|r| format!("round {r}")));
    let mut t = table(header);
    for name in names {
        let mut row = vec![name.to_string()];
        for r in &rounds {
            let cell = metrics
                .iter()
                .find(|m| m.round == *r && m.name == name)
                .map(|m| match (m.value, m.ci_low, m.ci_high) {
                    (Some(v), Some(lo), Some(hi)) => format!("{v:.1} [{lo:.1}, {hi:.1}] n={}", m.n),
                    (Some(v), _, _) => format!("{v:.1} n={}", m.n),
                    (None, _, _) => format!("- n={}", m.n),
                })
                .unwrap_or_default();
            row.push(cell);
        }
        t.add_row(row);
    }
    println!("{t}");
    for g in gates {
        println!(
            "gate after round {}: {} ({})",
            g.round, g.decision, g.reason
        );
    }
}

pub fn print_run(run: &RunRow, rounds: &[RoundSummary], stages: &[StageRow]) {
    println!(
        "run {} `{}`: {}{}  (started {}, spec {})",
        run.id,
        run.name,
        run.status,
        run.lease_holder
            .as_ref()
            .map(|h| format!(", driven by {h}"))
            .unwrap_or_default(),
        run.created_at,
        &run.spec_hash[..12.min(run.spec_hash.len())]
    );
    if let Some(e) = &run.error {
        println!("  error: {}", e.lines().next().unwrap_or(""));
    }
    let mut t = table(
        [
            "round",
            "stage",
            "status",
            "done",
            "failed",
            "total",
            "executions",
            "error",
        ]
        .map(String::from)
        .to_vec(),
    );
    for s in stages {
        t.add_row(vec![
            s.round.to_string(),
            s.stage.clone(),
            s.status.clone(),
            s.done.to_string(),
            s.failed.to_string(),
            s.total.map(|t| t.to_string()).unwrap_or_default(),
            s.executions.to_string(),
            s.error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or("")
                .to_string(),
        ]);
    }
    println!("{t}");
    if !rounds.is_empty() {
        print_summaries(rounds);
    }
    println!();
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
