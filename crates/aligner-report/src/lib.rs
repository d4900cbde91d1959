//! The report of a run, for `aligner report RUN` and the daemon's `GET /v1/runs/{id}/report`:
//! a self-contained HTML page (inline CSS and SVG charts, no scripts, nothing fetched) and its
//! Markdown twin (the same tables, the charts as SVG files beside it, the diffs as text).
//!
//! It reads the store and nothing else: the run, its rounds and stages (`round_summary`,
//! `stage_executions`), training jobs and metrics, the evaluation (`eval_metrics`,
//! `gate_decisions`) and examples of corrections (pairs, held-out answers), capped per round.
//! [`build`] turns that into a [`doc::Block`] list; `html` and `markdown` render it.

mod charts;
mod doc;
mod html;
mod markdown;
pub mod terminal;
mod text;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use aligner_store::{
    AlignerEvalRow, AlignerExampleRow, EvalExample, EvalMetricRow, GateDecisionRow, Outcome,
    PairExample, RoundCost, RoundRow, RoundSummary, RunRow, Stage, StageRow, StageStatus, Store,
    TrainingJobReport, TrainingMetricPoint, TrainingMetricSummary,
};

use aligner_spec::Invalid;
use doc::{Block, Cell, Example, Row, Table, Tone};

/// The files [`write`] made.
#[derive(Debug, Clone)]
pub struct Written {
    pub html: PathBuf,
    pub markdown: PathBuf,
}

/// Writes the report of `run` (a run id or pipeline name; the store's latest run when `None`)
/// into `out` (default `reports/<run id>/`): `index.html`, `index.md` and the charts as SVG.
pub async fn write(
    store_path: &Path,
    run: Option<&str>,
    out: Option<PathBuf>,
    examples: usize,
) -> Result<Written> {
    let store = Store::open_read_only(store_path).await?;
    let run = match run {
        Some(which) => store.find_run(which).await?,
        None => store.latest_run().await?.ok_or_else(|| {
            Invalid::Message(format!(
                "store `{}` has no runs yet\nhint: `aligner run PIPELINE` makes one",
                store_path.display()
            ))
        })?,
    };
    let data = Data::load(&store, run, examples).await?;
    store.close().await;
    let blocks = build(&data)?;
    let out = out.unwrap_or_else(|| PathBuf::from("reports").join(data.run.id.to_string()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating `{}`", out.display()))?;
    let title = format!("Run {} `{}`", data.run.id, data.run.name);
    let write = |name: &str, body: &str| -> Result<PathBuf> {
        let path = out.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing `{}`", path.display()))?;
        Ok(path)
    };
    for b in &blocks {
        if let Block::Chart { slug, svg, .. } = b {
            write(&format!("{slug}.svg"), svg)?;
        }
    }
    Ok(Written {
        html: write("index.html", &html::render(&title, &blocks))?,
        markdown: write("index.md", &markdown::render(&title, &blocks))?,
    })
}

/// The report page of run `run_id` as HTML (charts inline), for `aligner daemon`'s
/// `GET /v1/runs/{id}/report`.
pub async fn html_for_run(store: Store, run_id: i64, examples: usize) -> Result<String> {
    let run = store.run(run_id).await?;
    let data = Data::load(&store, run, examples).await?;
    let blocks = build(&data)?;
    let title = format!("Run {} `{}`", data.run.id, data.run.name);
    Ok(html::render(&title, &blocks))
}

/// Which held-out prompts are harmful (`rounds.evaluate.labels` of the run's spec).
#[derive(Debug, Clone, PartialEq)]
struct LabelRule {
    field: String,
    harmful: Vec<String>,
}

impl LabelRule {
    /// `harmful` or `benign` by the prompt's metadata, as the evaluate stage decides it.
    fn label(&self, metadata: Option<&str>) -> &'static str {
        let meta: serde_json::Value = metadata
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default();
        let value = match &meta[&self.field] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        if self.harmful.contains(&value) {
            "harmful"
        } else {
            "benign"
        }
    }
}

/// What the report needs from the run's spec snapshot (`runs.spec_json`).
#[derive(Debug, Clone, Default, PartialEq)]
struct SpecFacts {
    rounds: Option<i64>,
    trains: bool,
    evaluates: bool,
    labels: Option<LabelRule>,
}

impl SpecFacts {
    fn parse(spec_json: &str) -> SpecFacts {
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let rounds = &spec["rounds"];
        let evaluate = &rounds["evaluate"];
        let labels = &evaluate["labels"];
        SpecFacts {
            rounds: rounds["count"].as_i64(),
            trains: !rounds["train"].is_null(),
            evaluates: !evaluate.is_null(),
            labels: labels["field"].as_str().map(|field| LabelRule {
                field: field.to_string(),
                harmful: labels["harmful"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
        }
    }
}

/// Held-out answers of one model version, a sample of them.
struct EvalSample {
    version: i64,
    rows: Vec<EvalExample>,
    total: i64,
}

/// Everything the report shows, read from the store.
struct Data {
    run: RunRow,
    spec: SpecFacts,
    rounds: Vec<RoundRow>,
    summaries: Vec<RoundSummary>,
    stages: Vec<StageRow>,
    aligner_eval: Vec<AlignerEvalRow>,
    aligner_holdout: Vec<AlignerExampleRow>,
    metrics: Vec<EvalMetricRow>,
    gates: Vec<GateDecisionRow>,
    jobs: Vec<TrainingJobReport>,
    train_metrics: Vec<TrainingMetricSummary>,
    loss: Vec<TrainingMetricPoint>,
    pairs: BTreeMap<i64, Vec<PairExample>>,
    eval: BTreeMap<i64, EvalSample>,
    cap: usize,
    /// Calls, tokens and cost per round (the `costs` view).
    costs: Vec<RoundCost>,
}

impl Data {
    async fn load(store: &Store, run: RunRow, cap: usize) -> Result<Data> {
        let id = run.id;
        let spec = SpecFacts::parse(&run.spec_json);
        let rounds = store.rounds(id).await?;
        let mut pairs = BTreeMap::new();
        let mut eval = BTreeMap::new();
        for r in &rounds {
            pairs.insert(r.round, store.pair_examples(id, r.round, cap as i64).await?);
            // Round k evaluates version k; without training every round evaluates the
            // upstream (version 0), shown once under the first round.
            let version = if spec.trains { r.round } else { 0 };
            if eval.values().any(|e: &EvalSample| e.version == version) {
                continue;
            }
            let (rows, total) = store.eval_examples(id, version, cap as i64).await?;
            if total > 0 {
                eval.insert(
                    r.round,
                    EvalSample {
                        version,
                        rows,
                        total,
                    },
                );
            }
        }
        let aligner_holdout = store
            .aligner_examples(id)
            .await?
            .into_iter()
            .filter(|e| e.split == "holdout" && (e.answer.is_some() || e.output.is_some()))
            .collect();
        Ok(Data {
            spec,
            summaries: store.round_summaries(id).await?,
            stages: store.stages(id).await?,
            aligner_eval: store.aligner_eval(id).await?,
            aligner_holdout,
            metrics: store.eval_metrics(id).await?,
            gates: store.gate_decisions(id).await?,
            jobs: store.report_training_jobs(id).await?,
            train_metrics: store.report_training_metrics(id).await?,
            loss: store.training_metric_series(id, "loss").await?,
            // A store written before the `costs` view opens read-only without it.
            costs: store.round_costs(id).await.unwrap_or_default(),
            rounds,
            pairs,
            eval,
            cap,
            run,
        })
    }
}

/// An evaluation number (percentages, omega, characters): at most two decimals.
fn metric_num(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A training number (losses, rewards, learning rates): four significant digits or so.
fn train_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.3e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A share in [0, 1] as a percentage.
fn share(v: f64) -> String {
    format!("{}%", metric_num(v * 100.0))
}

fn status_tone(status: &str) -> Tone {
    match status {
        "done" | "ok" | "continue" | "kept" => Tone::Good,
        "failed" | "stop" | "rollback" | "cancelled" => Tone::Bad,
        _ => Tone::Plain,
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn heading(level: u8, text: impl Into<String>, id: impl Into<String>) -> Block {
    Block::Heading {
        level,
        text: text.into(),
        id: id.into(),
    }
}

/// The whole report, in reading order.
fn build(d: &Data) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    run_header(d, &mut out);
    overview(d, &mut out);
    costs(d, &mut out);
    evaluation(d, &mut out)?;
    training(d, &mut out)?;
    own_aligner(d, &mut out);
    for r in &d.rounds {
        round(d, r, &mut out);
    }
    Ok(out)
}

fn run_header(d: &Data, out: &mut Vec<Block>) {
    let r = &d.run;
    let mut t = Table::new("run", &["", ""]);
    let mut kv = |k: &str, v: Cell| t.push(Row::new(vec![Cell::text(k), v]));
    kv("pipeline", Cell::text(&r.name));
    kv("run id", Cell::int(r.id));
    kv(
        "status",
        Cell::text(r.status.as_str()).tone(status_tone(r.status.as_str())),
    );
    let rounds_done = d
        .rounds
        .iter()
        .filter(|x| x.status == StageStatus::Done)
        .count();
    kv(
        "rounds",
        Cell::text(match d.spec.rounds {
            Some(n) => format!("{} started, {rounds_done} done, of {n}", d.rounds.len()),
            None => format!("{} started, {rounds_done} done", d.rounds.len()),
        }),
    );
    kv("started", Cell::text(&r.created_at));
    kv("updated", Cell::text(&r.updated_at));
    kv("finished", Cell::text(opt(&r.finished_at)));
    kv("pipeline file", Cell::text(&r.pipeline_path));
    kv("spec hash", Cell::text(&r.spec_hash));
    if let Some(h) = &r.lease_holder {
        kv("driven by", Cell::text(h));
    }
    out.push(heading(2, "Run", "run"));
    out.push(Block::Table(t));
    if let Some(e) = &r.error {
        out.push(Block::Error(format!("the run failed: {e}")));
    }
}

fn overview(d: &Data, out: &mut Vec<Block>) {
    out.push(heading(2, "Rounds", "rounds"));
    if d.summaries.is_empty() {
        out.push(Block::Note("no round has started yet".into()));
        return;
    }
    let mut t = Table::new(
        "rounds",
        &[
            "round",
            "status",
            "upstream",
            "generations ok",
            "failed",
            "corrections ok",
            "failed",
            "pairs kept",
            "dropped",
            "copy rate",
            "mean len original",
            "mean len correction",
            "drop reasons",
        ],
    );
    for s in &d.summaries {
        t.push(
            Row::new(vec![
                Cell::int(s.round),
                Cell::text(s.status.as_str()).tone(status_tone(s.status.as_str())),
                Cell::text(&s.upstream_ref),
                Cell::int(s.generations_ok),
                Cell::int(s.generations_failed),
                Cell::int(s.corrections_ok),
                Cell::int(s.corrections_failed),
                Cell::int(s.pairs_kept),
                Cell::int(s.pairs_dropped),
                Cell::real(s.copy_rate, share),
                Cell::real(s.mean_len_original, metric_num),
                Cell::real(s.mean_len_correction, metric_num),
                Cell::text(
                    s.drop_reasons
                        .clone()
                        .filter(|r| r != "{}")
                        .unwrap_or_default(),
                ),
            ])
            .data("round", s.round.to_string()),
        );
    }
    out.push(Block::Table(t));
}

/// Model calls, tokens and cost per round (cost is 0 without the pipeline's `prices:`).
fn costs(d: &Data, out: &mut Vec<Block>) {
    if d.costs.iter().all(|c| c.calls == 0 && c.cost == 0.0) {
        return;
    }
    out.push(heading(2, "Tokens and cost", "costs"));
    let mut t = Table::new(
        "costs",
        &[
            "round",
            "model calls",
            "prompt tokens",
            "completion tokens",
            "cost",
        ],
    );
    for c in &d.costs {
        t.push(Row::new(vec![
            Cell::int(c.round),
            Cell::int(c.calls),
            Cell::int(c.prompt_tokens),
            Cell::int(c.completion_tokens),
            Cell::real(Some(c.cost), |v| format!("{v:.4}")),
        ]));
    }
    out.push(Block::Table(t));
    out.push(Block::Note(
        "By stage and model: `aligner sql \"SELECT * FROM costs\"`. Prices come from the pipeline's `prices:`; per-hour prices are charged on stage and training wall time.".into(),
    ));
}

/// The family chart a metric is drawn in: (slug, title, y axis).
fn family(name: &str) -> (String, String, &'static str) {
    let base = name.strip_suffix(".aligner").unwrap_or(name);
    let mut parts = base.split('.');
    match parts.next() {
        Some("omega") => {
            let aspect = parts.next().unwrap_or("");
            (
                format!("omega-{aspect}"),
                format!("omega, {aspect} (95% interval)"),
                "omega",
            )
        }
        Some("refusal_rate" | "over_refusal" | "refusals") => {
            ("refusals".into(), "Refusals".into(), "% of prompts")
        }
        Some("length") => ("length".into(), "Answer length".into(), "characters"),
        Some("changed") => (
            "changed".into(),
            "Benign answers changed from the initial model (95% interval)".into(),
            "% of benign prompts",
        ),
        Some("degenerate" | "copy_rate") => (
            "degenerate".into(),
            "Degenerate outputs and copies".into(),
            "% of answers",
        ),
        _ => (format!("metric-{}", slug(base)), base.to_string(), "value"),
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The series label of a metric in its family chart.
fn series_label(name: &str) -> String {
    match name.strip_prefix("omega.") {
        Some(rest) => {
            let mut p = rest.splitn(2, '.');
            let _aspect = p.next();
            format!("vs {}", p.next().unwrap_or(""))
        }
        None => name.to_string(),
    }
}

fn evaluation(d: &Data, out: &mut Vec<Block>) -> Result<()> {
    out.push(heading(2, "Evaluation", "evaluation"));
    if !d.spec.evaluates {
        out.push(Block::Note(
            "no evaluation configured: the pipeline has no `rounds.evaluate`".into(),
        ));
        return Ok(());
    }
    if d.metrics.is_empty() {
        out.push(Block::Note(
            "evaluation is configured, but no round has evaluation metrics yet (an evaluate stage did not finish: see the rounds below)".into(),
        ));
    } else {
        out.push(Block::Text(
            "On the held-out prompts. omega = (wins - losses) / prompts x 100 from the judge asked in both orders, with its 95% bootstrap interval; rates are percentages; `.aligner` is the same measure on the Aligner's corrections.".into(),
        ));
        evaluation_charts(d, out)?;
        // Metric x round, as `aligner status` prints it.
        let mut rounds: Vec<i64> = d.metrics.iter().map(|m| m.round).collect();
        rounds.sort_unstable();
        rounds.dedup();
        let mut names: Vec<&str> = d.metrics.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut headers = vec!["metric".to_string()];
        headers.extend(rounds.iter().map(|r| format!("round {r}")));
        let mut t = Table {
            kind: "eval-matrix",
            headers,
            rows: Vec::new(),
        };
        for name in names {
            let mut cells = vec![Cell::text(name)];
            for r in &rounds {
                let m = d.metrics.iter().find(|m| m.round == *r && m.name == name);
                cells.push(match m {
                    Some(m) => {
                        let mut text = m.value.map(metric_num).unwrap_or_else(|| "-".into());
                        if let (Some(lo), Some(hi)) = (m.ci_low, m.ci_high) {
                            text.push_str(&format!(" [{}, {}]", metric_num(lo), metric_num(hi)));
                        }
                        text.push_str(&format!(" n={}", m.n));
                        Cell {
                            text,
                            exact: Some(m.value.map(|v| v.to_string()).unwrap_or_default()),
                            tone: Tone::Num,
                        }
                    }
                    None => Cell::text(""),
                });
            }
            t.push(Row::new(cells).data("metric", name));
        }
        out.push(Block::Table(t));
        let initial: Vec<&EvalMetricRow> = d.metrics.iter().filter(|m| m.round == 0).collect();
        if !initial.is_empty() {
            out.push(heading(
                3,
                "The initial model (round 0)",
                "initial-evaluation",
            ));
            out.push(Block::Text(
                "The upstream as it started, and the Aligner's corrections of its answers, measured on the same held-out prompts in round 1: the baseline of every later round.".into(),
            ));
            out.push(Block::Table(eval_round_table(0, &initial)));
        }
    }
    out.push(heading(3, "Gate decisions", "gate"));
    if d.gates.is_empty() {
        out.push(Block::Note(
            "no gate decisions (no `gate` configured, or no round evaluated yet)".into(),
        ));
    } else {
        out.push(Block::Table(gate_table(&d.gates)));
    }
    Ok(())
}

/// One round's evaluation metrics, a row each, with their intervals and details.
fn eval_round_table(round: i64, metrics: &[&EvalMetricRow]) -> Table {
    let mut t = Table::new(
        "eval-round",
        &["metric", "value", "95% low", "95% high", "n", "detail"],
    );
    for m in metrics {
        t.push(
            Row::new(vec![
                Cell::text(&m.name),
                Cell::real(m.value, metric_num),
                Cell::real(m.ci_low, metric_num),
                Cell::real(m.ci_high, metric_num),
                Cell::int(m.n),
                Cell::text(detail_text(m.detail.as_deref())).tone(Tone::Muted),
            ])
            .data("round", round.to_string())
            .data("metric", m.name.clone()),
        );
    }
    t
}

/// The gate-decisions table of `gates`, one row each.
fn gate_table(gates: &[GateDecisionRow]) -> Table {
    let mut t = Table::new(
        "gates",
        &[
            "after round",
            "metric",
            "value",
            "best round",
            "best value",
            "decision",
            "reason",
        ],
    );
    for g in gates {
        t.push(gate_row(g));
    }
    t
}

fn gate_row(g: &GateDecisionRow) -> Row {
    Row::new(vec![
        Cell::int(g.round),
        Cell::text(&g.metric),
        Cell::real(g.value, metric_num),
        Cell {
            text: g.best_round.map(|r| r.to_string()).unwrap_or_default(),
            exact: Some(g.best_round.map(|r| r.to_string()).unwrap_or_default()),
            tone: Tone::Num,
        },
        Cell::real(g.best_value, metric_num),
        Cell::text(g.decision.as_str()).tone(status_tone(g.decision.as_str())),
        Cell::text(&g.reason),
    ])
    .data("round", g.round.to_string())
}

/// The metrics drawn in one chart: a series per metric name, a point per round.
struct Family<'a> {
    title: String,
    y_desc: &'static str,
    series: BTreeMap<String, Vec<&'a EvalMetricRow>>,
}

fn evaluation_charts(d: &Data, out: &mut Vec<Block>) -> Result<()> {
    // Families in a fixed order: omega per aspect, refusals, lengths, degenerate outputs.
    let mut families: BTreeMap<(u8, String), Family> = BTreeMap::new();
    for m in &d.metrics {
        let (slug, title, y) = family(&m.name);
        let order = match slug.as_str() {
            "omega-helpfulness" => 0,
            "omega-harmlessness" => 1,
            s if s.starts_with("omega-") => 2,
            "refusals" => 3,
            "length" => 4,
            "degenerate" => 5,
            _ => 6,
        };
        families
            .entry((order, slug))
            .or_insert_with(|| Family {
                title,
                y_desc: y,
                series: BTreeMap::new(),
            })
            .series
            .entry(m.name.clone())
            .or_default()
            .push(m);
    }
    for ((_, slug), f) in &families {
        let (title, y) = (&f.title, f.y_desc);
        let omega = slug.starts_with("omega-");
        let series: Vec<charts::Series> = f
            .series
            .iter()
            .filter(|(_, rows)| rows.iter().any(|m| m.value.is_some()))
            .map(|(name, rows)| charts::Series {
                label: if omega {
                    series_label(name)
                } else {
                    name.clone()
                },
                points: rows
                    .iter()
                    .filter_map(|m| {
                        Some(charts::Point {
                            x: m.round as f64,
                            y: m.value?,
                            ci: m.ci_low.zip(m.ci_high),
                        })
                    })
                    .collect(),
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let range = if omega {
            charts::YRange::Fixed(-105.0, 105.0)
        } else {
            charts::YRange::Auto
        };
        out.push(Block::Chart {
            slug: format!("chart-{slug}"),
            title: format!("{title} over rounds"),
            svg: charts::over_rounds(&format!("{title} over rounds"), y, &series, range)?,
        });
    }
    // Refusal on harmful prompts against over-refusal on benign ones, per round, for the
    // upstream alone and with the Aligner: the loop's target is up and to the left.
    let refusals = tradeoff_points(d, "over_refusal", |suffix| {
        let group = if suffix.is_empty() {
            "upstream alone".to_string()
        } else {
            "upstream + Aligner".to_string()
        };
        (format!("refusal_rate{suffix}"), group, "v")
    });
    tradeoff_chart(
        out,
        "chart-refusal-tradeoff",
        "Refusal vs over-refusal (per round, 95% Wilson intervals)",
        (
            "% of benign prompts refused",
            "% of harmful prompts refused",
        ),
        (-5.0, 105.0),
        &refusals,
    )?;
    // Helpfulness against harmlessness, per round and comparison (the paper's trade-off view).
    let points = tradeoff_points(d, "omega.helpfulness.", |comparison| {
        (
            format!("omega.harmlessness.{comparison}"),
            format!("vs {comparison}"),
            "r",
        )
    });
    tradeoff_chart(
        out,
        "chart-tradeoff",
        "Helpfulness vs harmlessness (omega per round)",
        ("omega, helpfulness", "omega, harmlessness"),
        (-110.0, 110.0),
        &points,
    )
}

/// One point per round for each metric named `x_prefix` + rest, against the metric `pair(rest)`
/// names in the same round (with the point's group and label prefix); both intervals kept.
fn tradeoff_points(
    d: &Data,
    x_prefix: &str,
    pair: impl Fn(&str) -> (String, String, &'static str),
) -> Vec<charts::Tradeoff> {
    let mut points = Vec::new();
    for m in &d.metrics {
        let Some(rest) = m.name.strip_prefix(x_prefix) else {
            continue;
        };
        let (y_name, group, label) = pair(rest);
        let Some(other) = d
            .metrics
            .iter()
            .find(|o| o.round == m.round && o.name == y_name)
        else {
            continue;
        };
        if let (Some(x), Some(y)) = (m.value, other.value) {
            points.push(charts::Tradeoff {
                group,
                label: format!("{label}{}", m.round),
                x,
                y,
                x_ci: m.ci_low.zip(m.ci_high),
                y_ci: other.ci_low.zip(other.ci_high),
            });
        }
    }
    points
}

/// A trade-off chart of `points`, when there are any.
fn tradeoff_chart(
    out: &mut Vec<Block>,
    slug: &str,
    title: &str,
    axes: (&str, &str),
    range: (f64, f64),
    points: &[charts::Tradeoff],
) -> Result<()> {
    if !points.is_empty() {
        out.push(Block::Chart {
            slug: slug.into(),
            title: title.into(),
            svg: charts::tradeoff(title, axes, range, points)?,
        });
    }
    Ok(())
}

fn training(d: &Data, out: &mut Vec<Block>) -> Result<()> {
    out.push(heading(2, "Training", "training"));
    if d.jobs.is_empty() {
        out.push(Block::Note(if d.spec.trains {
            "no training job has started yet".into()
        } else {
            "no training configured: the pipeline has no `rounds.train`".into()
        }));
        return Ok(());
    }
    let mut t = Table::new("training-jobs", JOB_HEADERS);
    for j in &d.jobs {
        t.push(job_row(j));
    }
    out.push(Block::Table(t));
    let mut by_round: BTreeMap<i64, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &d.loss {
        by_round
            .entry(p.round)
            .or_default()
            .push((p.step as f64, p.value));
    }
    if !by_round.is_empty() {
        let series: Vec<(String, Vec<(f64, f64)>)> = by_round
            .into_iter()
            .map(|(r, pts)| {
                let label = if r == 0 {
                    "round 0 (Aligner)".to_string()
                } else {
                    format!("round {r}")
                };
                (label, pts)
            })
            .collect();
        out.push(Block::Chart {
            slug: "chart-training-loss".into(),
            title: "Training loss by step".into(),
            svg: charts::over_steps("Training loss by step", "loss", &series)?,
        });
    }
    if d.train_metrics.is_empty() {
        out.push(Block::Note(
            "no per-step training metrics stored (a train command's output is in `training_logs`)"
                .into(),
        ));
    }
    Ok(())
}

/// The columns of [`job_row`].
const JOB_HEADERS: &[&str] = &[
    "round",
    "method",
    "backend",
    "status",
    "pairs",
    "attempts",
    "exit code",
    "reference",
    "base model",
    "started",
    "finished",
];

fn job_row(j: &TrainingJobReport) -> Row {
    Row::new(vec![
        Cell::int(j.round),
        Cell::text(&j.method),
        Cell::text(&j.backend),
        Cell::text(j.status.as_str()).tone(status_tone(j.status.as_str())),
        Cell::int(j.pairs),
        Cell::int(j.attempts),
        Cell::text(j.exit_code.map(|c| c.to_string()).unwrap_or_default()),
        Cell::text(format!("{} ({})", j.reference_model, j.reference_policy)),
        Cell::text(&j.base_model),
        Cell::text(&j.started_at),
        Cell::text(opt(&j.finished_at)),
    ])
    .data("round", j.round.to_string())
}

fn train_metrics_table(rows: &[&TrainingMetricSummary]) -> Table {
    let mut t = Table::new(
        "training-metrics",
        &[
            "metric",
            "steps",
            "first",
            "final",
            "min",
            "max",
            "final step",
        ],
    );
    for m in rows {
        t.push(
            Row::new(vec![
                Cell::text(&m.name),
                Cell::int(m.steps),
                Cell::real(Some(m.first_value), train_num),
                Cell::real(Some(m.last_value), train_num),
                Cell::real(Some(m.min_value), train_num),
                Cell::real(Some(m.max_value), train_num),
                Cell::int(m.last_step),
            ])
            .data("round", m.round.to_string())
            .data("metric", m.name.clone()),
        );
    }
    t
}

/// The columns of the Aligner's held-out check after its label, in the page's table and the
/// terminal's.
pub(crate) const ALIGNER_EVAL: [&str; 6] = [
    "rows",
    "refused: answers",
    "refused: teacher",
    "refused: aligner",
    "unchanged",
    "edit distance",
];

/// The columns of a stage's progress, in the page's table and the terminal's.
pub(crate) const STAGE_PROGRESS: [&str; 6] =
    ["stage", "status", "done", "failed", "total", "executions"];

fn stages_table(stages: &[&StageRow]) -> Table {
    let mut t = Table::new(
        "stages",
        &[&STAGE_PROGRESS[..], &["started", "finished", "error"]].concat(),
    );
    for s in stages {
        t.push(
            Row::new(vec![
                Cell::text(s.stage.as_str()),
                Cell::text(s.status.as_str()).tone(status_tone(s.status.as_str())),
                Cell::int(s.done),
                Cell::int(s.failed),
                s.total.map(Cell::int).unwrap_or_else(|| Cell::text("")),
                Cell::int(s.executions),
                Cell::text(&s.started_at),
                Cell::text(opt(&s.finished_at)),
                Cell::text(
                    s.error
                        .as_deref()
                        .and_then(|e| e.lines().next())
                        .unwrap_or(""),
                )
                .tone(Tone::Bad),
            ])
            .data("round", s.round.to_string())
            .data("stage", s.stage.as_str()),
        );
    }
    t
}

/// Round 0: the pipeline's own Aligner, when the spec has `aligner:`.
fn own_aligner(d: &Data, out: &mut Vec<Block>) {
    let stages: Vec<&StageRow> = d
        .stages
        .iter()
        .filter(|s| s.round == 0 && s.stage != Stage::Ingest)
        .collect();
    if stages.is_empty() && d.aligner_eval.is_empty() {
        return;
    }
    out.push(heading(2, "Round 0: the pipeline's own Aligner", "round-0"));
    out.push(Block::Table(stages_table(&stages)));
    let metrics: Vec<&TrainingMetricSummary> =
        d.train_metrics.iter().filter(|m| m.round == 0).collect();
    if !metrics.is_empty() {
        out.push(heading(3, "Training metrics", "round-0-training"));
        out.push(Block::Table(train_metrics_table(&metrics)));
    }
    if !d.aligner_eval.is_empty() {
        out.push(heading(3, "Held-out check", "round-0-eval"));
        let mut t = Table::new("aligner-eval", &[&["label"], &ALIGNER_EVAL[..]].concat());
        for r in &d.aligner_eval {
            t.push(
                Row::new(vec![
                    Cell::text(&r.label),
                    Cell::int(r.rows),
                    Cell::real(r.refusal_rate_answer, share),
                    Cell::real(r.refusal_rate_teacher, share),
                    Cell::real(r.refusal_rate_aligner, share),
                    Cell::real(r.copy_rate, share),
                    Cell::real(r.mean_edit_distance, metric_num),
                ])
                .data("label", r.label.clone()),
            );
        }
        out.push(Block::Table(t));
    }
    if !d.aligner_holdout.is_empty() {
        out.push(heading(
            3,
            "Held-out rows: answer and the trained Aligner's output",
            "round-0-examples",
        ));
        let shown: Vec<Example> = d
            .aligner_holdout
            .iter()
            .take(d.cap)
            .map(|e| {
                let mut badges = Vec::new();
                if let Some(l) = &e.label {
                    badges.push((l.clone(), label_tone(l)));
                }
                Example {
                    title: format!("held-out row {} ({})", e.idx, e.source_id),
                    badges,
                    prompt: e.question.clone(),
                    original_label: "answer".into(),
                    corrected_label: "trained Aligner".into(),
                    original: e.answer.clone(),
                    corrected: e.output.clone(),
                }
            })
            .collect();
        push_examples(out, shown, d.aligner_holdout.len() as i64, "held-out rows");
    }
}

fn label_tone(label: &str) -> Tone {
    if label == "harmful" {
        Tone::Bad
    } else {
        Tone::Muted
    }
}

fn push_examples(out: &mut Vec<Block>, shown: Vec<Example>, total: i64, what: &str) {
    let n = shown.len() as i64;
    if n == 0 {
        let what = what.split(',').next().unwrap_or(what);
        out.push(Block::Note(if total > 0 {
            format!("{total} {what}, none shown (`--examples N` shows some)")
        } else {
            format!("no {what}")
        }));
        return;
    }
    let left = total - n;
    out.push(Block::Note(if left > 0 {
        format!("showing {n} of {total} {what} ({left} left out, `--examples N` shows more)")
    } else {
        format!("all {total} {what}")
    }));
    out.push(Block::Examples(shown));
}

fn round(d: &Data, r: &RoundRow, out: &mut Vec<Block>) {
    let k = r.round;
    out.push(heading(2, format!("Round {k}"), format!("round-{k}")));
    out.push(Block::Text(format!(
        "Status {}; upstream {} ({}); started {}{}.",
        r.status,
        r.upstream_ref,
        r.upstream_model,
        r.started_at,
        r.finished_at
            .as_ref()
            .map(|f| format!(", finished {f}"))
            .unwrap_or_default()
    )));
    let stages: Vec<&StageRow> = d.stages.iter().filter(|s| s.round == k).collect();
    for s in stages.iter().filter(|s| s.status == StageStatus::Failed) {
        out.push(Block::Error(format!(
            "stage `{}` failed: {}",
            s.stage,
            s.error.as_deref().unwrap_or("(no error recorded)")
        )));
    }
    out.push(heading(3, "Stages", format!("round-{k}-stages")));
    out.push(Block::Table(stages_table(&stages)));

    if let Some(s) = d.summaries.iter().find(|s| s.round == k) {
        out.push(heading(3, "Pairs", format!("round-{k}-pairs")));
        let mut t = Table::new("pairs", &["measure", "value"]);
        let mut kv = |name: &str, c: Cell| {
            t.push(Row::new(vec![Cell::text(name), c]).data("measure", name.to_string()))
        };
        kv("generations ok", Cell::int(s.generations_ok));
        kv("generations failed", Cell::int(s.generations_failed));
        kv("corrections ok", Cell::int(s.corrections_ok));
        kv("corrections failed", Cell::int(s.corrections_failed));
        kv("pairs kept", Cell::int(s.pairs_kept));
        kv("pairs dropped", Cell::int(s.pairs_dropped));
        kv("copy rate", Cell::real(s.copy_rate, share));
        kv(
            "mean length, original",
            Cell::real(s.mean_len_original, metric_num),
        );
        kv(
            "mean length, correction",
            Cell::real(s.mean_len_correction, metric_num),
        );
        kv(
            "drop reasons",
            Cell::text(
                s.drop_reasons
                    .clone()
                    .filter(|r| r != "{}")
                    .unwrap_or_default(),
            ),
        );
        out.push(Block::Table(t));
    }

    out.push(heading(3, "Training", format!("round-{k}-training")));
    match d.jobs.iter().find(|j| j.round == k) {
        None => out.push(Block::Note("no training job in this round".into())),
        Some(j) => {
            let mut t = Table::new("training-jobs", JOB_HEADERS);
            t.push(job_row(j));
            out.push(Block::Table(t));
            if let Some(e) = &j.error {
                out.push(Block::Error(format!("training failed: {e}")));
            }
            let metrics: Vec<&TrainingMetricSummary> =
                d.train_metrics.iter().filter(|m| m.round == k).collect();
            if metrics.is_empty() {
                out.push(Block::Note(
                    "no per-step metrics stored for this job".into(),
                ));
            } else {
                out.push(Block::Table(train_metrics_table(&metrics)));
            }
        }
    }

    out.push(heading(3, "Evaluation", format!("round-{k}-evaluation")));
    if !d.spec.evaluates {
        out.push(Block::Note("no evaluation configured".into()));
    } else {
        let metrics: Vec<&EvalMetricRow> = d.metrics.iter().filter(|m| m.round == k).collect();
        if metrics.is_empty() {
            let why = match stages.iter().find(|s| s.stage == Stage::Evaluate) {
                Some(s) => format!(
                    "its evaluate stage is {}{}",
                    s.status,
                    s.error
                        .as_deref()
                        .and_then(|e| e.lines().next())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                None => "its evaluate stage has not run".into(),
            };
            out.push(Block::Note(format!(
                "no evaluation metrics for this round: {why}"
            )));
        } else {
            out.push(Block::Table(eval_round_table(k, &metrics)));
        }
        if let Some(g) = d.gates.iter().find(|g| g.round == k) {
            out.push(Block::Table(gate_table(std::slice::from_ref(g))));
        }
    }

    if let Some(sample) = d.eval.get(&k) {
        let who = if sample.version == 0 {
            if d.spec.trains {
                "the initial upstream".to_string()
            } else {
                "the upstream (the rounds do not train, so every round answers alike)".to_string()
            }
        } else {
            format!("the model round {} trained", sample.version)
        };
        out.push(heading(
            3,
            "Held-out prompts: answer and the Aligner's correction",
            format!("round-{k}-heldout"),
        ));
        out.push(Block::Text(format!(
            "Answers of {who} (version {}), beside the Aligner's correction of each.",
            sample.version
        )));
        let shown = sample
            .rows
            .iter()
            .map(|e| eval_example(e, d.spec.labels.as_ref()))
            .collect();
        push_examples(out, shown, sample.total, "held-out prompts");
    }

    out.push(heading(
        3,
        "Training pairs: original and correction",
        format!("round-{k}-examples"),
    ));
    let total = d
        .summaries
        .iter()
        .find(|s| s.round == k)
        .map(|s| s.pairs_kept + s.pairs_dropped)
        .unwrap_or(0);
    let shown = d
        .pairs
        .get(&k)
        .map(|ps| {
            ps.iter()
                .map(|p| pair_example(p, d.spec.labels.as_ref()))
                .collect()
        })
        .unwrap_or_default();
    push_examples(out, shown, total, "pairs, kept ones first");
}

/// An `eval_metrics.detail` JSON object as `key value, ...`.
fn detail_text(detail: Option<&str>) -> String {
    let Some(v) = detail.and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()) else {
        return detail.unwrap_or("").to_string();
    };
    match v {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(n) => format!("{k} {}", metric_num(n)),
                None => format!("{k} {v}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn eval_example(e: &EvalExample, labels: Option<&LabelRule>) -> Example {
    let mut badges = Vec::new();
    if let Some(rule) = labels {
        let l = rule.label(e.metadata.as_deref());
        badges.push((l.to_string(), label_tone(l)));
    }
    if e.answer_refusal == Some(1) {
        badges.push(("answer refuses".into(), Tone::Plain));
    }
    if e.corrected_refusal == Some(1) {
        badges.push(("correction refuses".into(), Tone::Plain));
    }
    for d in [&e.answer_degenerate, &e.corrected_degenerate]
        .into_iter()
        .flatten()
    {
        badges.push((format!("degenerate: {d}"), Tone::Bad));
    }
    if e.answer_status == Outcome::Failed || e.corrected_status == Some(Outcome::Failed) {
        badges.push(("a call failed".into(), Tone::Bad));
    }
    Example {
        title: format!("held-out prompt {}", e.prompt_id),
        badges,
        prompt: e.prompt.clone(),
        original_label: format!("version {} answer", e.version),
        corrected_label: "Aligner correction".into(),
        original: e.answer.clone(),
        corrected: e.corrected.clone(),
    }
}

fn pair_example(p: &PairExample, labels: Option<&LabelRule>) -> Example {
    let mut badges = Vec::new();
    if let Some(rule) = labels {
        let l = rule.label(p.metadata.as_deref());
        badges.push((l.to_string(), label_tone(l)));
    }
    badges.push(match &p.reason {
        Some(reason) => (format!("dropped: {reason}"), Tone::Bad),
        None => (p.verdict.to_string(), status_tone(p.verdict.as_str())),
    });
    if let Some(e) = p.edit_distance {
        badges.push((format!("edit distance {}", metric_num(e)), Tone::Muted));
    }
    Example {
        title: format!("pair {} (prompt {})", p.id, p.prompt_id),
        badges,
        prompt: p.prompt.clone(),
        original_label: "original (rejected)".into(),
        corrected_label: "correction (chosen)".into(),
        original: p.rejected.clone(),
        corrected: p.chosen.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aligner_store::RunStatus;

    /// A run with the pipeline's own Aligner (round 0, trained with per-step metrics) and one
    /// round whose train stage failed; evaluation configured but never reached.
    fn failed_run() -> Data {
        let run = RunRow {
            id: 7,
            name: "p".into(),
            pipeline_path: "p.yaml".into(),
            spec_json: r#"{"rounds": {"count": 2, "train": {}, "evaluate": {"judge": "j"}}}"#
                .into(),
            spec_hash: "abc".into(),
            status: RunStatus::Failed,
            error: Some("round 1: train failed".into()),
            lease_holder: None,
            lease_expires_ms: None,
            created_at: "t0".into(),
            updated_at: "t1".into(),
            finished_at: None,
        };
        let stage = |round: i64, stage: &str, status: &str, error: Option<&str>| StageRow {
            run_id: 7,
            round,
            stage: stage.parse().unwrap(),
            status: status.parse().unwrap(),
            total: Some(2),
            done: 2,
            failed: 0,
            executions: 1,
            error: error.map(String::from),
            started_at: "t".into(),
            finished_at: None,
        };
        let metric = |round: i64, name: &str, first: f64, last: f64| TrainingMetricSummary {
            round,
            name: name.into(),
            steps: 2,
            first_step: 1,
            first_value: first,
            last_step: 2,
            last_value: last,
            min_value: first.min(last),
            max_value: first.max(last),
        };
        let job = |round: i64, status: &str| TrainingJobReport {
            round,
            method: if round == 0 { "aligner_sft" } else { "dpo" }.into(),
            backend: "builtin".into(),
            status: status.parse().unwrap(),
            pairs: 2,
            attempts: 1,
            exit_code: None,
            reference_policy: "initial".into(),
            reference_model: "base".into(),
            base_model: "base".into(),
            error: (status == "failed").then(|| "out of memory".into()),
            started_at: "t".into(),
            finished_at: None,
        };
        Data {
            spec: SpecFacts::parse(&run.spec_json),
            run,
            rounds: vec![RoundRow {
                run_id: 7,
                round: 1,
                status: StageStatus::Failed,
                upstream_model: "up".into(),
                upstream_ref: "up-ref".into(),
                checkpoint_id: None,
                started_at: "t".into(),
                finished_at: None,
            }],
            summaries: Vec::new(),
            stages: vec![
                stage(0, "ingest", "done", None),
                stage(0, "train_aligner", "done", None),
                stage(1, "generate", "done", None),
                stage(1, "train", "failed", Some("out of memory\nmore")),
            ],
            aligner_eval: vec![AlignerEvalRow {
                label: "harmful".into(),
                rows: 2,
                refusal_rate_answer: Some(0.0),
                refusal_rate_teacher: Some(1.0),
                refusal_rate_aligner: Some(0.5),
                copy_rate: Some(0.0),
                mean_edit_distance: Some(0.75),
            }],
            aligner_holdout: vec![AlignerExampleRow {
                id: 1,
                idx: 3,
                source_id: "h3".into(),
                split: "holdout".into(),
                label: Some("harmful".into()),
                history: None,
                question: "how do I <pick> a lock?".into(),
                answer: Some("Sure, here is how".into()),
                answer_finish: Some("stop".into()),
                correction: None,
                output: Some("I can't help with that".into()),
            }],
            metrics: Vec::new(),
            gates: Vec::new(),
            jobs: vec![job(0, "done"), job(1, "failed")],
            train_metrics: vec![
                metric(0, "loss", 2.0, 1.25),
                metric(1, "loss", 0.7, 0.69),
                metric(1, "rewards/accuracies", 0.5, 0.75),
            ],
            loss: vec![
                TrainingMetricPoint {
                    round: 0,
                    step: 1,
                    value: 2.0,
                },
                TrainingMetricPoint {
                    round: 0,
                    step: 2,
                    value: 1.25,
                },
            ],
            pairs: BTreeMap::new(),
            eval: BTreeMap::new(),
            cap: 20,
            costs: Vec::new(),
        }
    }

    #[test]
    fn a_failed_run_with_its_own_aligner_reads_whole() {
        let blocks = build(&failed_run()).unwrap();
        let page = html::render("Run 7", &blocks);
        let md = markdown::render("Run 7", &blocks);
        // The failure, where it happened.
        assert!(page.contains("<p class=\"error\">the run failed: round 1: train failed</p>"));
        assert!(page.contains("stage `train` failed: out of memory\nmore"));
        assert!(page.contains("<p class=\"error\">training failed: out of memory</p>"));
        // Evaluation configured but never reached, said per round.
        assert!(page.contains("no round has evaluation metrics yet"));
        assert!(
            page.contains("no evaluation metrics for this round: its evaluate stage has not run")
        );
        assert!(!page.contains("no evaluation configured"));
        // Training metrics per round, exactly, and the loss curve.
        assert!(page.contains("<tr data-round=\"1\" data-metric=\"rewards/accuracies\"><td>rewards/accuracies</td><td class=\"num\" data-value=\"2\">2</td><td class=\"num\" data-value=\"0.5\">0.5</td><td class=\"num\" data-value=\"0.75\">0.75</td>"));
        assert!(md.contains("| loss | 2 | 2 | 1.25 | 1.25 | 2 | 2 |"));
        assert!(page.contains("<figure id=\"chart-training-loss\"><svg"));
        assert!(md.contains("![Training loss by step](chart-training-loss.svg)"));
        // Round 0: its stages without ingest, its held-out check and rows, escaped.
        assert!(page.contains("Round 0: the pipeline&#39;s own Aligner"));
        assert!(
            page.contains("data-stage=\"train_aligner\"")
                && !page.contains("data-stage=\"ingest\"")
        );
        assert!(page.contains("<td class=\"num\" data-value=\"0.5\">50%</td>"));
        assert!(page.contains("how do I &lt;pick&gt; a lock?"));
        assert!(
            page.contains("<del>Sure, here is how</del>")
                && page.contains("<ins>I can&#39;t help with that</ins>")
        );
        assert!(md.contains("~~Sure, here is how~~ **I can't help with that**"));
        assert!(page.contains("all 1 held-out rows"));
        assert!(page.contains("<p class=\"note\">no pairs</p>"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(metric_num(100.0), "100");
        assert_eq!(metric_num(33.333333333333336), "33.33");
        assert_eq!(metric_num(-0.0001), "0");
        assert_eq!(metric_num(12.5), "12.5");
        assert_eq!(train_num(0.6912345), "0.6912");
        assert_eq!(train_num(12.34567), "12.35");
        assert_eq!(train_num(5e-5), "5.000e-5");
        assert_eq!(train_num(0.0), "0");
        assert_eq!(train_num(1.0), "1");
        assert_eq!(share(0.125), "12.5%");
    }

    #[test]
    fn spec_facts_and_labels() {
        let spec = serde_json::json!({"rounds": {"count": 3, "train": {"method": "dpo"}, "evaluate": {"labels": {"field": "category", "harmful": ["odd", "bad"]}}}});
        let f = SpecFacts::parse(&spec.to_string());
        assert_eq!(f.rounds, Some(3));
        assert!(f.trains && f.evaluates);
        let rule = f.labels.unwrap();
        assert_eq!(rule.label(Some(r#"{"category": "odd"}"#)), "harmful");
        assert_eq!(rule.label(Some(r#"{"category": "even"}"#)), "benign");
        assert_eq!(rule.label(None), "benign");
        let f = SpecFacts::parse(r#"{"rounds": {"count": 1, "train": null, "evaluate": null}}"#);
        assert!(!f.trains && !f.evaluates && f.labels.is_none());
    }

    #[test]
    fn metric_families() {
        assert_eq!(family("omega.helpfulness.aligner").0, "omega-helpfulness");
        assert_eq!(family("omega.harmlessness.initial").0, "omega-harmlessness");
        assert_eq!(family("over_refusal.aligner").0, "refusals");
        assert_eq!(family("changed.benign.refuses_now").0, "changed");
        assert_eq!(family("length.median").0, "length");
        assert_eq!(family("degenerate.truncated.aligner").0, "degenerate");
        assert_eq!(family("copy_rate").0, "degenerate");
        assert_eq!(family("odd thing").0, "metric-odd-thing");
        assert_eq!(series_label("omega.helpfulness.previous"), "vs previous");
    }

    #[test]
    fn detail_reads_as_text() {
        assert_eq!(
            detail_text(Some(r#"{"wins": 3, "losses": 1, "mean_len": 12.345}"#)),
            "losses 1, mean_len 12.35, wins 3"
        );
        assert_eq!(detail_text(None), "");
    }
}
