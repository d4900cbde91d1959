//! The run as terminal text: the tables `aligner run` prints at the end and `aligner status`
//! prints (stages, rounds, the round-0 Aligner's check, the evaluation and gate), and the
//! data behind them ([`Status`]).

use std::fmt::Write as _;

use aligner_store::{
    AlignerEvalRow, EvalMetricRow, GateDecisionRow, RoundCost, RoundSummary, RunRow, StageRow,
    Store,
};
use anyhow::Result;
use comfy_table::{presets, Table};
use serde::Serialize;

/// A table in the terminal style every command uses (no colours under `NO_COLOR`).
pub fn table(header: Vec<String>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED);
    if std::env::var_os("NO_COLOR").is_some() {
        t.force_no_tty();
    }
    t.set_header(header);
    t
}

/// Everything `aligner status` shows of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub run: RunRow,
    pub rounds: Vec<RoundSummary>,
    pub stages: Vec<StageRow>,
    pub aligner_eval: Vec<AlignerEvalRow>,
    pub evaluation: Vec<EvalMetricRow>,
    pub gate: Vec<GateDecisionRow>,
    /// Calls, tokens and cost per round (the `costs` view).
    pub costs: Vec<RoundCost>,
}

impl Status {
    pub async fn load(store: &Store, run: RunRow) -> Result<Status> {
        let id = run.id;
        Ok(Status {
            rounds: store.round_summaries(id).await?,
            stages: store.stages(id).await?,
            aligner_eval: store.aligner_eval(id).await?,
            evaluation: store.eval_metrics(id).await?,
            gate: store.gate_decisions(id).await?,
            // A store written before the `costs` view opens read-only without it.
            costs: store.round_costs(id).await.unwrap_or_default(),
            run,
        })
    }

    /// The run, the round-0 Aligner's check and the evaluation, as text.
    pub fn text(&self) -> String {
        let mut out = run(&self.run, &self.rounds, &self.stages);
        out.push_str(&aligner_eval(&self.aligner_eval));
        out.push_str(&evaluation(&self.evaluation, &self.gate));
        out.push_str(&costs(&self.costs));
        out
    }
}

/// Calls, tokens and cost per round (cost is 0 without `prices:`).
pub fn costs(rounds: &[RoundCost]) -> String {
    if rounds.iter().all(|r| r.calls == 0 && r.cost == 0.0) {
        return String::new();
    }
    let mut t = table(
        [
            "round",
            "model calls",
            "prompt tokens",
            "completion tokens",
            "cost",
        ]
        .map(String::from)
        .to_vec(),
    );
    for r in rounds {
        t.add_row(vec![
            r.round.to_string(),
            r.calls.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            format!("{:.4}", r.cost),
        ]);
    }
    format!("{t}\n")
}

/// Each round: generations, corrections, pairs kept and dropped, copy rate, lengths.
pub fn summaries(rounds: &[RoundSummary]) -> String {
    let mut out = String::new();
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
    let _ = writeln!(out, "{t}");
    out
}

/// The held-out check of the pipeline's own Aligner (`aligner_eval`), when there is one.
pub fn aligner_eval(rows: &[AlignerEvalRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let pct = |v: Option<f64>| v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_default();
    let mut t = table(
        ["aligner (held out)"]
            .iter()
            .chain(&crate::ALIGNER_EVAL)
            .map(|c| c.to_string())
            .collect(),
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
    let _ = writeln!(out, "{t}");
    out
}

/// Each round's evaluation (`eval_metrics`, metrics by round) and the gate's decisions.
pub fn evaluation(metrics: &[EvalMetricRow], gates: &[GateDecisionRow]) -> String {
    let mut out = String::new();
    if metrics.is_empty() && gates.is_empty() {
        return out;
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
    let _ = writeln!(out, "{t}");
    for g in gates {
        let _ = writeln!(
            out,
            "gate after round {}: {} ({})",
            g.round, g.decision, g.reason
        );
    }
    out
}

/// This process's peak resident set size (Linux `VmHWM`), for `--json` reports and benchmarks.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What `aligner run` prints when a run ends: the Aligner's evaluation, the rounds, the
/// evaluation and gate, and where to look next; with `json`, the same as one JSON object
/// (`outcome` is the engine's) with this process's peak resident set size.
pub async fn finished(
    store: &aligner_store::Store,
    run_id: i64,
    outcome: serde_json::Value,
    json: bool,
) -> Result<String> {
    let rounds = store.round_summaries(run_id).await?;
    let aligner = store.aligner_eval(run_id).await?;
    let metrics = store.eval_metrics(run_id).await?;
    let gates = store.gate_decisions(run_id).await?;
    let path = &outcome["store"];
    if json {
        let v = serde_json::json!({"run": outcome, "store": path, "rounds": rounds, "aligner_eval": aligner, "evaluation": metrics, "gate": gates, "peak_rss_kb": peak_rss_kb()});
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let path = path.as_str().unwrap_or_default();
    Ok(format!(
        "{}{}{}\nrun {run_id} {}: {} round(s)\nstore: {path}\nlook at the pairs:\n  aligner sql --store {path} \"SELECT round, prompt, rejected, chosen FROM pairs_latest LIMIT 5\"\n",
        aligner_eval(&aligner),
        summaries(&rounds),
        evaluation(&metrics, &gates),
        if outcome["resumed"] == true { "resumed and finished" } else { "finished" },
        outcome["rounds"],
    ))
}

/// A run's state, its stages and its rounds.
pub fn run(run: &RunRow, rounds: &[RoundSummary], stages: &[StageRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
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
        let _ = writeln!(out, "  error: {}", e.lines().next().unwrap_or(""));
    }
    let mut t = table(
        ["round"]
            .iter()
            .chain(&crate::STAGE_PROGRESS)
            .chain(&["error"])
            .map(|c| c.to_string())
            .collect(),
    );
    for s in stages {
        t.add_row(vec![
            s.round.to_string(),
            s.stage.to_string(),
            s.status.to_string(),
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
    let _ = writeln!(out, "{t}");
    if !rounds.is_empty() {
        out.push_str(&summaries(rounds));
    }
    let _ = writeln!(out);
    out
}
