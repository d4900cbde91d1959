//! End-to-end suite: the real `aligner` binary against a loopback OpenAI-compatible test server
//! that injects faults, a real SQLite store, and a real training command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aligner_mockserver::{MockConfig, MockServer};
use serde_json::Value;

mod architecture;
mod cluster;
mod daemon;
mod evaluate;
mod fetch;
mod local;
mod proxy;
mod report;
mod semantic;
mod serve;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aligner"));
    c.env("NO_COLOR", "1")
        .env("ALIGNER_BACKOFF_BASE_MS", "2")
        .env_remove("ALIGNER_STORE");
    c
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn run(args: &[&str], dir: &Path) -> Output {
    bin()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("aligner runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Rows of a read-only query as JSON objects.
fn sql(dir: &Path, query: &str) -> Vec<serde_json::Map<String, Value>> {
    let o = run(&["sql", "--store", "s.db", "--format", "json", query], dir);
    assert!(o.status.success(), "sql failed: {}", text(&o));
    serde_json::from_slice::<Vec<serde_json::Map<String, Value>>>(&o.stdout).expect("json rows")
}

/// [`scalar`] for a wait: `None` while the store is not there yet or not yet migrated (a run
/// that was just spawned creates it).
fn try_scalar(dir: &Path, query: &str) -> Option<i64> {
    if !dir.join("s.db").exists() {
        return None;
    }
    let o = run(&["sql", "--store", "s.db", "--format", "json", query], dir);
    if !o.status.success() {
        return None;
    }
    let rows: Vec<serde_json::Map<String, Value>> = serde_json::from_slice(&o.stdout).ok()?;
    rows.first()?.values().next()?.as_i64()
}

fn scalar(dir: &Path, query: &str) -> i64 {
    let rows = sql(dir, query);
    rows[0]
        .values()
        .next()
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no integer from {query}: {rows:?}"))
}

/// The first line `child` prints on stdout, waiting up to `within` for it (None on time-out or
/// end of output). The rest of its stdout is read and dropped, so the child never blocks or
/// fails writing.
fn first_stdout_line(child: &mut Child, within: Duration) -> Option<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines.map_while(Result::ok) {}
    });
    rx.recv_timeout(within).ok()
}

/// Waits for a condition with a deadline instead of sleeping a fixed time.
fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_prompts(dir: &Path, n: usize, extra: &[&str]) {
    let mut lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"id": format!("q{i}"), "prompt": format!("Question number {i}: how do I do task {i} well?"), "category": if i % 2 == 0 { "even" } else { "odd" }}).to_string())
        .collect();
    for (j, p) in extra.iter().enumerate() {
        lines.push(
            serde_json::json!({"id": format!("x{j}"), "prompt": p, "category": "extra"})
                .to_string(),
        );
    }
    std::fs::write(dir.join("prompts.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// A trainer stand-in: checks its inputs and writes a checkpoint folder, like a real one would.
const TRAIN_SCRIPT: &str = r#"#!/bin/sh
set -e
test -s "$1" || { echo "no data at $1" >&2; exit 4; }
mkdir -p "$2"
echo "training round $3 on $(wc -l < "$1") pairs from base $4"
echo '{"model_type": "llama"}' > "$2/config.json"
"#;

fn pipeline(
    server: &MockServer,
    rounds: u32,
    concurrency: u32,
    sample_temp: f64,
    train: bool,
) -> String {
    let train_block = if train {
        r#"  train:
    method: dpo
    beta: 0.1
    reference: initial
    backend:
      kind: command
      command: "sh train.sh {data} {output_dir} {round} {base_model}"
      serve_model: "ckpt-round-{round}"
"#
    } else {
        ""
    };
    format!(
        r#"version: 1
name: e2e
models:
  upstream:
    kind: openai
    base_url: {url}
    model: mock-upstream
    weights: /weights/upstream-base
    max_concurrency: {concurrency}
    timeout: 1s
    max_retries: 8
  aligner:
    kind: openai
    base_url: {url}
    model: mock-aligner
    max_concurrency: {concurrency}
    timeout: 1s
    max_retries: 8
prompts:
  source: prompts.jsonl
  fields: {{ id: id, metadata: [category] }}
  holdout: 0.1
  seed: 3
rounds:
  count: {rounds}
  generate:
    model: upstream
    sampling: {{ temperature: {sample_temp}, top_p: 0.95, max_tokens: 64, seed: 11 }}
  correct:
    model: aligner
    template: aligner-v1
    sampling: {{ temperature: 0.3, top_p: 0.95, top_k: 10, frequency_penalty: 1.2, max_tokens: 64 }}
  synthesize:
    min_edit_distance: 0.01
{train_block}"#,
        url = server.base_url
    )
}

fn setup(
    server: &MockServer,
    prompts: usize,
    extra: &[&str],
    rounds: u32,
    concurrency: u32,
    train: bool,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_prompts(dir.path(), prompts, extra);
    std::fs::write(dir.path().join("train.sh"), TRAIN_SCRIPT).unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        pipeline(server, rounds, concurrency, 0.5, train),
    )
    .unwrap();
    dir
}

/// Every training-split prompt has exactly one generation, one correction (when the generation
/// succeeded) and one pair verdict in every round.
fn assert_exactly_once(dir: &Path, rounds: i64) {
    let train = scalar(dir, "SELECT count(*) FROM prompts WHERE split = 'train'");
    for round in 1..=rounds {
        let per = |table: &str, join: &str| {
            sql(
                dir,
                &format!(
                    "SELECT count(*) AS n FROM prompts p LEFT JOIN (SELECT g.prompt_id, count(t.id) AS c FROM generations g {join} WHERE g.round = {round} GROUP BY g.prompt_id) x ON x.prompt_id = p.id WHERE p.split = 'train' AND coalesce(x.c, 0) = 1 /* {table} */"
                ),
            )[0]["n"]
                .as_i64()
                .unwrap()
        };
        assert_eq!(
            per("generations", "JOIN generations t ON t.id = g.id"),
            train,
            "round {round}: one generation per prompt"
        );
        let gen_failed = scalar(
            dir,
            &format!(
                "SELECT count(*) FROM generations WHERE round = {round} AND status = 'failed'"
            ),
        );
        assert_eq!(
            per(
                "corrections",
                "JOIN corrections t ON t.generation_id = g.id"
            ),
            train - gen_failed,
            "round {round}: one correction per successful generation"
        );
        assert_eq!(
            per("pairs", "JOIN pairs t ON t.generation_id = g.id"),
            train,
            "round {round}: one pair verdict per prompt"
        );
    }
}

#[test]
fn every_example_pipeline_validates() {
    let dir = repo().join("pipelines");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    assert!(!files.is_empty());
    for f in files {
        let o = bin()
            .arg("validate")
            .arg(&f)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{} does not validate:\n{}",
            f.display(),
            text(&o)
        );
    }
}

#[test]
fn broken_pipeline_exits_2_with_location() {
    let dir = tempfile::tempdir().unwrap();
    write_prompts(dir.path(), 3, &[]);
    std::fs::write(
        dir.path().join("bad.yaml"),
        "version: 1\nmodels:\n  up:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    model: m\nprompts:\n  source: prompts.jsonl\nrounds:\n  count: 1\n  generate:\n    model: up\n    sampling: { temprature: 0.5 }\n  correct:\n    model: upp\n",
    )
    .unwrap();
    let o = run(&["validate", "bad.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("bad.yaml:13"), "{t}");
    assert!(t.contains("did you mean `temperature`?"), "{t}");
    // Once the types are right, references are checked.
    let fixed = std::fs::read_to_string(dir.path().join("bad.yaml"))
        .unwrap()
        .replace("temprature", "temperature");
    std::fs::write(dir.path().join("bad.yaml"), fixed).unwrap();
    let o = run(&["run", "bad.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("bad.yaml:15:12") && t.contains("rounds.correct.model") && t.contains("`up`"),
        "{t}"
    );
    assert!(
        !dir.path().join("aligner.db").exists(),
        "nothing runs before the spec is valid"
    );
}

#[test]
fn two_rounds_end_to_end_through_faults() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        seed: 42,
        p_429: 0.08,
        p_500: 0.08,
        p_timeout: 0.02,
        timeout_delay: Duration::from_millis(1500),
        p_malformed: 0.05,
        fail_prompts_containing: Some("POISON".into()),
        ..Default::default()
    });
    let dir = setup(
        &server,
        60,
        &[
            "POISON: this one always fails",
            "COPY: the aligner copies this answer",
        ],
        2,
        8,
        true,
    );
    let d = dir.path();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "run failed:\n{}", text(&o));
    let out = text(&o);
    assert!(out.contains("look at the pairs"), "{out}");

    assert_exactly_once(d, 2);
    let train = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'train'");
    assert_eq!(
        train + scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout'"),
        62
    );
    // Holdout prompts are never answered.
    assert_eq!(scalar(d, "SELECT count(*) FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE p.split = 'holdout'"), 0);
    let stats = server.stats();
    assert!(
        stats.faults.status_429 > 0 && stats.faults.status_500 > 0 && stats.faults.malformed > 0,
        "faults were injected: {stats:?}"
    );
    // Retries show up in provenance.
    assert!(
        scalar(
            d,
            "SELECT max(attempts) FROM generations WHERE status = 'ok'"
        ) > 1
    );
    // The poisoned prompt (if it is in the training split) failed for good with its error
    // recorded, and its verdict says so; the stage went on.
    let poisoned = sql(d, "SELECT g.round, g.status, g.error, x.reason FROM generations g JOIN prompts p ON p.id = g.prompt_id JOIN pairs x ON x.generation_id = g.id WHERE p.prompt LIKE 'POISON%'");
    assert_eq!(
        poisoned.len(),
        2,
        "the poisoned prompt is in the training split and failed in both rounds"
    );
    assert_eq!(
        scalar(d, "SELECT sum(generations_failed) FROM round_summary"),
        2
    );
    for row in &poisoned {
        assert_eq!(row["status"], "failed");
        assert!(row["error"].as_str().unwrap().contains("500"), "{row:?}");
        assert_eq!(row["reason"], "generation_failed");
    }
    let copies = sql(d, "SELECT x.reason FROM pairs x JOIN prompts p ON p.id = x.prompt_id WHERE p.prompt LIKE 'COPY%'");
    assert!(
        !copies.is_empty(),
        "the copied prompt is in the training split"
    );
    for row in &copies {
        assert_eq!(row["reason"], "identical");
    }
    // Round 2 was answered by round 1's checkpoint, under the name the spec gave it.
    assert_eq!(scalar(d, "SELECT count(*) FROM rounds WHERE round = 2 AND upstream_ref = 'ckpt-round-1' AND checkpoint_id IS NOT NULL"), 1);
    assert!(
        stats.per_model.get("ckpt-round-1").copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    let ok2 = scalar(d, "SELECT count(*) FROM generations WHERE round = 2 AND status = 'ok' AND text LIKE '[ckpt-round-1]%'");
    assert_eq!(
        ok2,
        scalar(
            d,
            "SELECT count(*) FROM generations WHERE round = 2 AND status = 'ok'"
        )
    );
    // Training ran twice, its output is in the store, checkpoints are registered.
    // Round 1 trains the served model's weights (not its served name); round 2 the checkpoint
    // round 1 wrote; the reference stays the initial weights.
    assert_eq!(scalar(d, "SELECT count(*) FROM training_jobs WHERE status = 'done' AND reference_model = '/weights/upstream-base'"), 2);
    assert_eq!(scalar(d, "SELECT count(*) FROM training_logs WHERE line LIKE 'training round 1 on % pairs from base /weights/upstream-base'"), 1);
    assert_eq!(scalar(d, "SELECT count(*) FROM checkpoints"), 2);
    assert!(scalar(d, "SELECT count(*) FROM training_logs WHERE line LIKE 'training round 2 on % pairs from base %round-1/checkpoint'") == 1);
    // Provenance on every row.
    assert_eq!(scalar(d, "SELECT count(*) FROM corrections WHERE template_id != 'aligner-v1' OR sampling NOT LIKE '%\"top_k\":10%'"), 0);
    // The summary view agrees with the tables.
    let summary = sql(d, "SELECT * FROM round_summary ORDER BY round");
    assert_eq!(summary.len(), 2);
    for s in &summary {
        let kept = s["pairs_kept"].as_i64().unwrap();
        let dropped = s["pairs_dropped"].as_i64().unwrap();
        assert_eq!(kept + dropped, train);
        assert!(kept > 0);
    }
    // The API key env var was never set and never needed; no secret-looking text in the store.
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs WHERE spec_json LIKE '%sk-%'"),
        0
    );

    // Export, plain and conversational.
    let o = run(
        &[
            "export",
            "--store",
            "s.db",
            "--run",
            "e2e",
            "--round",
            "2",
            "--kind",
            "dpo",
            "--out",
            "out.jsonl",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(d.join("out.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        first["prompt"].is_string() && first["chosen"].is_string() && first["rejected"].is_string()
    );
    let o = run(
        &[
            "export",
            "--store",
            "s.db",
            "--run",
            "1",
            "--round",
            "1",
            "--kind",
            "sft",
            "--format",
            "parquet",
            "--conversational",
            "--out",
            "sft.parquet",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(d.join("sft.parquet"))
        .unwrap()
        .starts_with(b"PAR1"));
    let o = run(
        &[
            "export",
            "--store",
            "s.db",
            "--run",
            "1",
            "--round",
            "2",
            "--conversational",
            "--out",
            "conv.jsonl",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    // Loaded the way TRL loads preference data.
    for (file, kind, style) in [
        ("out.jsonl", "dpo", "plain"),
        ("sft.parquet", "sft", "conversational"),
        ("conv.jsonl", "dpo", "conversational"),
    ] {
        let o = Command::new("python3")
            .arg(repo().join("tests/python/check_export.py"))
            .args([file, kind, style])
            .current_dir(d)
            .env("HF_DATASETS_OFFLINE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", d.join("hf"))
            .output()
            .expect("python3 runs");
        assert!(
            o.status.success(),
            "{file} does not load with `datasets` (scripts/test.sh installs it):\n{}",
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).starts_with("ok "),
            "{}",
            text(&o)
        );
    }
    // The round's export is the same file the train command received.
    let round2 = std::fs::read_to_string(d.join("runs/e2e-1/round-2/pairs.jsonl")).unwrap();
    assert_eq!(
        round2,
        std::fs::read_to_string(d.join("out.jsonl")).unwrap()
    );

    // Status and SQL for people.
    let o = run(&["status", "--store", "s.db"], d);
    assert!(
        o.status.success() && text(&o).contains("synthesize"),
        "{}",
        text(&o)
    );
    let o = run(&["sql", "--store", "s.db", "DELETE FROM pairs"], d);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("only reads"), "{}", text(&o));
    // A second `run` of a finished pipeline starts a new run rather than redoing the old one.
    let before = scalar(d, "SELECT count(*) FROM runs");
    assert_eq!(before, 1);
}

fn spawn_run(dir: &Path) -> Child {
    bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_mid_stage_then_resume_loses_and_duplicates_nothing() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        seed: 7,
        // Slow enough that each kill lands well inside its stage on a loaded machine.
        latency: Duration::from_millis(40),
        p_500: 0.02,
        ..Default::default()
    });
    let dir = setup(&server, 200, &[], 2, 4, true);
    let d = dir.path();
    // The store may not exist yet, or be mid-migration, while the first process starts.
    let count = |q: &str| -> i64 {
        let o = run(&["sql", "--store", "s.db", "--format", "json", q], d);
        serde_json::from_slice::<Vec<serde_json::Map<String, Value>>>(&o.stdout)
            .ok()
            .and_then(|rows| {
                rows.first()
                    .and_then(|r| r.values().next().and_then(Value::as_i64))
            })
            .unwrap_or(0)
    };

    // Kill during round 1's generate stage.
    let mut child = spawn_run(d);
    wait_until("some generations", Duration::from_secs(60), || {
        count("SELECT count(*) FROM generations") >= 40
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let committed = count("SELECT count(*) FROM generations");
    assert!(committed < 180, "killed mid-stage ({committed} committed)");

    // Kill again during round 2's correct stage.
    let mut child = spawn_run(d);
    wait_until("round 2 corrections", Duration::from_secs(120), || {
        count("SELECT count(*) FROM corrections WHERE round = 2") >= 30
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(count("SELECT count(*) FROM stage_executions WHERE round = 2 AND stage = 'correct' AND status = 'running'") == 1);

    // Resume by id and finish.
    let o = run(&["resume", "1", "--store", "s.db"], d);
    assert!(o.status.success(), "resume failed:\n{}", text(&o));
    assert_exactly_once(d, 2);
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM runs WHERE id = 1 AND status = 'done'"
        ),
        1
    );
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs"),
        1,
        "resumed, not restarted"
    );
    assert!(
        scalar(
            d,
            "SELECT executions FROM stage_executions WHERE round = 1 AND stage = 'generate'"
        ) == 2
    );
    // Nothing finished was asked again: the server answered at most what was committed plus
    // what was in flight or not yet flushed at each kill.
    let committed = scalar(d, "SELECT (SELECT count(*) FROM generations WHERE status = 'ok') + (SELECT count(*) FROM corrections WHERE status = 'ok')");
    let answered = server.stats().ok as i64;
    assert!(
        answered >= committed && answered <= committed + 60,
        "answered {answered}, committed {committed}"
    );
}

#[test]
fn a_second_concurrent_run_is_refused_and_a_changed_spec_too() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(200),
        ..Default::default()
    });
    let dir = setup(&server, 50, &[], 1, 2, false);
    let d = dir.path();
    let mut first = spawn_run(d);
    wait_until(
        "the first run to hold its lease",
        Duration::from_secs(60),
        || {
            let o = run(
                &[
                    "sql",
                    "--store",
                    "s.db",
                    "--format",
                    "csv",
                    "SELECT count(*) FROM runs WHERE lease_holder IS NOT NULL",
                ],
                d,
            );
            String::from_utf8_lossy(&o.stdout).lines().nth(1) == Some("1")
        },
    );
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("is being driven by pid"), "{t}");
    first.kill().unwrap();
    first.wait().unwrap();

    // Resuming with an edited spec is refused, naming what changed.
    std::fs::write(d.join("p.yaml"), pipeline(&server, 1, 2, 0.9, false)).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("`rounds.generate.sampling.temperature` (0.5 -> 0.9)"),
        "{t}"
    );
    assert!(t.contains("--new"), "{t}");

    // Connection tuning may change between a crash and its resume.
    std::fs::write(d.join("p.yaml"), pipeline(&server, 1, 6, 0.5, false)).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs"),
        1,
        "the same run was continued"
    );
    assert_exactly_once(d, 1);
}

#[test]
fn a_failing_train_command_fails_the_run_with_its_output() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 10, &[], 2, 4, true);
    let d = dir.path();
    std::fs::write(
        d.join("train.sh"),
        "echo 'CUDA out of memory' >&2; exit 3\n",
    )
    .unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("train command exited with 3") && t.contains("CUDA out of memory"),
        "{t}"
    );
    assert_eq!(scalar(d, "SELECT count(*) FROM training_logs WHERE stream = 'stderr' AND line = 'CUDA out of memory'"), 1);
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs WHERE status = 'failed'"),
        1
    );
    // Fixing the trainer and running again resumes at the train stage: nothing regenerated.
    std::fs::write(d.join("train.sh"), TRAIN_SCRIPT).unwrap();
    let before = server.stats().ok;
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT attempts FROM training_jobs WHERE round = 1"),
        2
    );
    // The failed attempt's folder and output went when the next attempt started; the good
    // one's folder became the checkpoint.
    assert_eq!(attempt_files(d), Vec::<std::path::PathBuf>::new());
    let train = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'train'") as u64;
    assert_eq!(
        server.stats().ok - before,
        2 * train,
        "only round 2's calls were made"
    );
}

/// `prices:` turn every call's tokens into the `costs` view (checked against the raw rows), and
/// `budget:` stops a run cleanly before the stage that would spend past it; raised, the same
/// run goes on.
#[test]
fn costs_follow_the_tokens_and_a_budget_stops_the_run_resumably() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 12, &[], 2, 4, false);
    let d = dir.path();
    let base = std::fs::read_to_string(d.join("p.yaml")).unwrap();
    // One unit per upstream prompt token, two per completion token; the Aligner per hour.
    let priced = |budget: f64| {
        format!("{base}prices:\n  upstream: {{ input: 1000000, output: 2000000 }}\n  aligner: {{ input: 0.5, per_hour: 3600 }}\nbudget: {{ max_cost: {budget} }}\n")
    };
    std::fs::write(d.join("p.yaml"), priced(1.0)).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("reached its budget"), "{}", text(&o));
    assert!(text(&o).contains("raise `budget.max_cost`"), "{}", text(&o));
    // It stopped after round 1's generate stage, before correcting anything.
    assert_eq!(scalar(d, "SELECT count(*) FROM corrections"), 0);
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs WHERE status = 'running'"),
        1
    );
    std::fs::write(d.join("p.yaml"), priced(1e12)).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs"),
        1,
        "the same run went on"
    );
    // The view against a hand computation from the calls' own rows.
    let rows = sql(
        d,
        "SELECT (SELECT sum(cost) FROM costs WHERE model = 'upstream') AS view,
                (SELECT sum(prompt_tokens) + 2 * sum(completion_tokens) FROM generations) AS hand,
                (SELECT sum(calls) FROM costs WHERE stage = 'correct') AS corrections,
                (SELECT count(*) FROM corrections) AS corrected",
    );
    let r = &rows[0];
    assert!(r["hand"].as_f64().unwrap() > 0.0, "{r:?}");
    assert!(
        (r["view"].as_f64().unwrap() - r["hand"].as_f64().unwrap()).abs() < 1e-6,
        "{r:?}"
    );
    assert_eq!(r["corrections"], r["corrected"]);
    // The Aligner: its prompt tokens at 0.5 per million plus one unit per second of its stages.
    let rows = sql(
        d,
        "SELECT (SELECT sum(cost) FROM costs WHERE model = 'aligner') AS view,
                (SELECT sum(prompt_tokens) * 0.5 / 1e6 FROM corrections)
                  + (SELECT sum((julianday(finished_at) - julianday(started_at)) * 86400.0) FROM stage_executions WHERE stage = 'correct') AS hand",
    );
    let r = &rows[0];
    assert!(
        (r["view"].as_f64().unwrap() - r["hand"].as_f64().unwrap()).abs() < 1e-3,
        "{r:?}"
    );
    // `aligner status` shows tokens and cost per round.
    let o = run(&["status", "--store", "s.db"], d);
    assert!(text(&o).contains("completion tokens"), "{}", text(&o));
    // So does the report.
    let o = run(&["report", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(d.join("reports/1/index.md")).unwrap();
    assert!(md.contains("Tokens and cost"), "{md}");
}

/// A trainer that takes a while, counting its starts in `starts.log`.
const SLOW_TRAIN_SCRIPT: &str = r#"#!/bin/sh
set -e
echo started >> starts.log
echo "{'loss': 0.6914, 'learning_rate': 1e-05, 'rewards/margins': 0.0, 'epoch': 0.5}"
echo "step 1"
sleep 3
echo "step 2" >&2
echo "{'loss': 0.5, 'learning_rate': 5e-06, 'rewards/margins': 0.8, 'epoch': 1.0}"
echo "{'train_runtime': 3.2, 'train_loss': 0.6}"
mkdir -p "$2"
echo '{"model_type": "llama"}' > "$2/config.json"
echo "done"
"#;

/// Attempt folders and output files anywhere under `dir`.
fn attempt_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("checkpoint.attempt-")
            {
                found.push(path.clone());
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

/// `kill -9` of the orchestrator while a `command` trainer runs: the trainer keeps running,
/// and the resumed run follows it again instead of starting another. One trainer start, no
/// log line stored twice, its checkpoint registered, no attempt folder left behind.
#[test]
fn a_resumed_run_follows_the_trainer_a_killed_run_started() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 10, &[], 1, 4, true);
    let d = dir.path();
    std::fs::write(d.join("train.sh"), SLOW_TRAIN_SCRIPT).unwrap();
    let mut child = spawn_run(d);
    wait_until("the trainer's first line", Duration::from_secs(60), || {
        try_scalar(
            d,
            "SELECT count(*) FROM training_logs WHERE line = 'step 1'",
        ) == Some(1)
    });
    child.kill().unwrap(); // SIGKILL: no chance to stop the trainer
    child.wait().unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("following its trainer again"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("starts.log")).unwrap(),
        "started\n",
        "the trainer was started once"
    );
    for (line, stream) in [
        ("step 1", "stdout"),
        ("step 2", "stderr"),
        ("done", "stdout"),
    ] {
        assert_eq!(
            scalar(d, &format!("SELECT count(*) FROM training_logs WHERE line = '{line}' AND stream = '{stream}'")),
            1,
            "{line}"
        );
    }
    assert_eq!(
        scalar(d, "SELECT count(*) FROM training_jobs WHERE status = 'done' AND attempts = 1 AND process IS NULL"),
        1
    );
    assert_eq!(scalar(d, "SELECT count(*) FROM checkpoints"), 1);
    assert_eq!(attempt_files(d), Vec::<std::path::PathBuf>::new());
    // The trainer's logged dicts are metrics under TRL's names, counted across the restart.
    let loss = sql(
        d,
        "SELECT step, value FROM training_metrics WHERE name = 'loss' ORDER BY step",
    );
    assert_eq!(loss.len(), 2, "{loss:?}");
    assert_eq!(
        (loss[0]["step"].as_i64(), loss[0]["value"].as_f64()),
        (Some(1), Some(0.6914))
    );
    assert_eq!(
        (loss[1]["step"].as_i64(), loss[1]["value"].as_f64()),
        (Some(2), Some(0.5))
    );
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM training_metrics WHERE name LIKE 'train_%'"
        ),
        0
    );
}

/// `aligner cancel` of a run whose process was killed stops the trainer it left running.
#[test]
fn cancel_stops_the_trainer_a_killed_run_left_running() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 10, &[], 1, 4, true);
    let d = dir.path();
    std::fs::write(
        d.join("train.sh"),
        SLOW_TRAIN_SCRIPT.replace("sleep 3", "sleep 30"),
    )
    .unwrap();
    let mut child = spawn_run(d);
    wait_until("the trainer's first line", Duration::from_secs(60), || {
        try_scalar(
            d,
            "SELECT count(*) FROM training_logs WHERE line = 'step 1'",
        ) == Some(1)
    });
    let pid = scalar(
        d,
        "SELECT json_extract(process, '$.pid') FROM training_jobs",
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the trainer outlives its orchestrator"
    );
    let o = run(&["cancel", "1", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    wait_until("the trainer to stop", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM training_jobs WHERE status = 'failed' AND error = 'cancelled'"
        ),
        1
    );
}

#[test]
fn sigterm_finishes_in_flight_items_and_releases_the_lease() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(50),
        ..Default::default()
    });
    let dir = setup(&server, 150, &[], 1, 4, false);
    let d = dir.path();
    let child = spawn_run(d);
    wait_until("some generations", Duration::from_secs(60), || {
        let o = run(
            &[
                "sql",
                "--store",
                "s.db",
                "--format",
                "csv",
                "SELECT count(*) FROM generations",
            ],
            d,
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0)
            >= 20
    });
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(text(&out).contains("aligner resume 1"), "{}", text(&out));
    // Clean stop: lease released, run resumable, nothing half-written.
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM runs WHERE status = 'running' AND lease_holder IS NULL"
        ),
        1
    );
    let o = run(&["resume", "1", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_exactly_once(d, 1);
}

#[test]
fn two_runs_started_together_drive_one_run() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(30),
        ..Default::default()
    });
    let dir = setup(&server, 60, &[], 1, 2, false);
    let d = dir.path();
    let a = spawn_run(d);
    let b = spawn_run(d);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let mut codes = [a.status.code(), b.status.code()];
    codes.sort();
    assert_eq!(
        codes,
        [Some(0), Some(3)],
        "one drives, one is refused:\n{}\n{}",
        text(&a),
        text(&b)
    );
    assert_eq!(scalar(d, "SELECT count(*) FROM runs"), 1);
    assert_exactly_once(d, 1);
}

#[test]
fn several_samples_per_prompt_and_repeated_prompts() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rows: Vec<String> = (0..10)
        .map(|i| serde_json::json!({"prompt": format!("Tell me about topic {i}.")}).to_string())
        .collect();
    // The same prompts again, differing only in case and spacing.
    rows.extend((0..3).map(|i| {
        serde_json::json!({"prompt": format!("  tell me  about TOPIC {i}.")}).to_string()
    }));
    std::fs::write(d.join("prompts.csv.jsonl"), rows.join("\n")).unwrap();
    let yaml = format!(
        "version: 1\nmodels:\n  m: {{kind: openai, base_url: \"{}\", model: m}}\nprompts: {{source: prompts.csv.jsonl, format: jsonl}}\nrounds:\n  count: 1\n  generate: {{model: m, n: 2, sampling: {{seed: 11, max_tokens: 64}}}}\n  correct: {{model: m}}\n",
        server.base_url
    );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(scalar(d, "SELECT count(*) FROM generations"), 26);
    // Each sample carries its own seed.
    assert_eq!(scalar(d, "SELECT count(*) FROM generations WHERE sample_idx = 0 AND sampling LIKE '%\"seed\":11%'"), 13);
    assert_eq!(scalar(d, "SELECT count(*) FROM generations WHERE sample_idx = 1 AND sampling LIKE '%\"seed\":12%'"), 13);
    // One pair per prompt text and sample; the repeats are dropped with their reason.
    assert_eq!(
        scalar(d, "SELECT count(*) FROM pairs WHERE verdict = 'kept'"),
        20
    );
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM pairs WHERE reason = 'duplicate_prompt'"
        ),
        6
    );
}

#[test]
fn a_fixed_held_out_file_is_held_out_and_a_leak_into_training_is_an_error() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let line = |id: &str, p: &str| serde_json::json!({"id": id, "prompt": p}).to_string() + "\n";
    let train: String = (0..6)
        .map(|i| line(&format!("t{i}"), &format!("Tell me about topic {i}.")))
        .collect();
    std::fs::write(d.join("train.jsonl"), &train).unwrap();
    let held: String = (0..3)
        .map(|i| line(&format!("h{i}"), &format!("Explain subject {i}.")))
        .collect();
    std::fs::write(d.join("held.jsonl"), &held).unwrap();
    let yaml = |holdout: &str| {
        format!(
            "version: 1\nmodels:\n  m: {{kind: openai, base_url: \"{}\", model: m}}\nprompts: {{source: train.jsonl, fields: {{id: id}}, {holdout}}}\nrounds:\n  count: 1\n  generate: {{model: m, sampling: {{max_tokens: 32}}}}\n  correct: {{model: m}}\n",
            server.base_url
        )
    };
    // Both ways of holding out at once is a spec error.
    std::fs::write(
        d.join("both.yaml"),
        yaml("holdout: 0.5, holdout_source: held.jsonl"),
    )
    .unwrap();
    let o = run(&["validate", "both.yaml"], d);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("both `holdout` and `holdout_source` are set"),
        "{}",
        text(&o)
    );

    std::fs::write(d.join("p.yaml"), yaml("holdout_source: held.jsonl")).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT count(*) FROM prompts WHERE split = 'train'"),
        6
    );
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM prompts WHERE split = 'holdout' AND source_id LIKE 'h%'"
        ),
        3
    );
    // Only the training prompts are answered.
    assert_eq!(scalar(d, "SELECT count(*) FROM generations"), 6);

    // A held-out prompt that is also a training prompt (up to case and spaces) stops the run
    // before anything is answered, naming both ids.
    std::fs::write(
        d.join("held.jsonl"),
        held + &line("h9", "  tell me about TOPIC 4."),
    )
    .unwrap();
    let o = run(&["run", "p.yaml", "--store", "leak.db"], d);
    assert!(!o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("`t4` is the held-out prompt `h9`"), "{out}");
    assert!(out.contains("hint: remove one of the two"), "{out}");
    let o = run(
        &[
            "sql",
            "--store",
            "leak.db",
            "--format",
            "json",
            "SELECT count(*) AS n FROM generations",
        ],
        d,
    );
    let rows: Value = serde_json::from_slice(&o.stdout).expect("json rows");
    assert_eq!(rows, serde_json::json!([{"n": 0}]), "{}", text(&o));
}

#[test]
fn the_api_key_is_sent_but_never_stored_or_printed() {
    const KEY: &str = "sk-test-0123456789abcdef";
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        api_key: Some(KEY.into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_prompts(d, 5, &[]);
    let yaml = format!(
        "version: 1\nmodels:\n  m: {{kind: openai, base_url: \"{}\", model: m, api_key_env: E2E_KEY, max_retries: 1}}\nprompts: {{source: prompts.jsonl}}\nrounds:\n  count: 1\n  generate: {{model: m}}\n  correct: {{model: m}}\n",
        server.base_url
    );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();

    // Unset: a clear error before any request.
    let o = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .env_remove("E2E_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("environment variable `E2E_KEY`"),
        "{}",
        text(&o)
    );

    // Wrong key: every call is refused (401, not retried), the stage fails, the key is not echoed.
    let o = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .env("E2E_KEY", "sk-wrong-key-999")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("401") && !t.contains("sk-wrong-key-999"), "{t}");

    // Right key: the run resumes, retries the failed items and finishes.
    let o = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .env("E2E_KEY", KEY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains(KEY));
    assert_exactly_once(d, 1);
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM generations WHERE status = 'failed'"
        ),
        0
    );
    // Not in the store file (nor its WAL), in any form.
    for f in ["s.db", "s.db-wal"] {
        if let Ok(bytes) = std::fs::read(d.join(f)) {
            assert!(
                !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
                "key found in {f}"
            );
            assert!(
                !bytes.windows(16).any(|w| w == b"sk-wrong-key-999"),
                "wrong key found in {f}"
            );
        }
    }
}

#[test]
fn sql_reads_stdin_and_status_speaks_json() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 8, &[], 1, 4, false);
    let d = dir.path();
    assert!(run(&["run", "p.yaml", "--store", "s.db"], d)
        .status
        .success());
    let mut child = bin()
        .args(["sql", "--store", "s.db", "--format", "csv"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT round, pairs_kept FROM round_summary")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let train = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'train'");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("round,pairs_kept\n1,{train}\n")
    );
    // An empty result still names its columns.
    let o = run(
        &[
            "sql",
            "--store",
            "s.db",
            "--format",
            "csv",
            "SELECT id, name FROM runs WHERE id = 99",
        ],
        d,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "id,name\n");
    let o = run(&["status", "--store", "s.db", "--json"], d);
    let v: Value = serde_json::from_slice(&o.stdout).expect("status --json is JSON");
    assert_eq!(v[0]["run"]["status"], "done");
    assert_eq!(v[0]["stages"].as_array().unwrap().len(), 4);
}

/// `rounds.train.serve` against a server that loads checkpoints itself: vLLM's runtime LoRA
/// loading and SGLang's weight update (the test double speaks both), and a refusal that fails
/// the round with the server's words and keeps round 1.
#[test]
fn the_serve_block_loads_each_checkpoint_into_vllm_or_sglang() {
    let with_serve = |server: &MockServer, kind: &str| {
        let dir = setup(server, 10, &[], 2, 4, true);
        let yaml = std::fs::read_to_string(dir.path().join("p.yaml")).unwrap()
            + &format!("    serve: {{ kind: {kind}, timeout_secs: 10 }}\n");
        std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
        dir
    };
    let checkpoint = |d: &Path| -> String {
        sql(d, "SELECT path FROM checkpoints WHERE round = 1")[0]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = with_serve(&server, "vllm_lora");
    let d = dir.path();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        server.adapters(),
        vec![("ckpt-round-1".to_string(), checkpoint(d))],
        "round 1's checkpoint loaded once, under its serve_model"
    );
    assert!(server.stats().per_model["ckpt-round-1"] > 0);
    assert_eq!(
        sql(
            d,
            "SELECT DISTINCT served_model FROM generations WHERE round = 2"
        )
        .len(),
        1
    );

    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = with_serve(&server, "sglang_reload");
    let d = dir.path();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.weights(), Some(checkpoint(d)));

    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        refuse_lora: Some("LoRA is not enabled. Use --enable-lora to enable LoRA.".into()),
        ..Default::default()
    });
    let dir = with_serve(&server, "vllm_lora");
    let d = dir.path();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("LoRA is not enabled. Use --enable-lora to enable LoRA."),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("refused to load"), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT count(*) FROM checkpoints WHERE round = 1"),
        1
    );
    assert_eq!(
        scalar(d, "SELECT count(*) FROM generations WHERE round = 2"),
        0
    );
}

/// A model served by two replicas: requests spread over both, one dies mid-stage, and every
/// prompt is still answered once, each row naming the replica that answered it.
#[test]
fn a_replica_that_dies_mid_stage_loses_and_doubles_nothing() {
    let slow = MockConfig {
        latency: Duration::from_millis(50),
        ..Default::default()
    };
    let a = aligner_mockserver::spawn_in_thread(slow.clone());
    let b = aligner_mockserver::spawn_in_thread(slow);
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&a, 200, &[], 1, 4, false);
    let d = dir.path();
    let yaml = std::fs::read_to_string(d.join("p.yaml"))
        .unwrap()
        .replacen(
            "    model: mock-upstream\n",
            &format!(
                "    model: mock-upstream\n    replicas: [{}]\n    replica_concurrency: 2\n",
                b.base_url
            ),
            1,
        )
        .replacen(
            &format!("    base_url: {}\n    model: mock-aligner", a.base_url),
            &format!(
                "    base_url: {}\n    model: mock-aligner",
                aligner.base_url
            ),
            1,
        );
    assert!(yaml.contains(&aligner.base_url));
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let log = std::fs::File::create(d.join("run.log")).unwrap();
    let mut child = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("some generations", Duration::from_secs(60), || {
        try_scalar(d, "SELECT count(*) FROM generations").is_some_and(|n| n >= 10)
    });
    let (a_url, b_url) = (a.base_url.clone(), b.base_url.clone());
    let answered_by_a = a.stats().ok as i64;
    a.shutdown();
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(d.join("run.log")).unwrap_or_default();
    assert!(status.success(), "{log}");
    let train = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'train'");
    assert_eq!(
        scalar(d, "SELECT count(*) FROM generations WHERE status = 'ok'"),
        train
    );
    assert_eq!(
        scalar(d, "SELECT count(DISTINCT prompt_id) FROM generations"),
        train
    );
    let by = sql(
        d,
        "SELECT replica, count(*) AS n FROM generations GROUP BY replica ORDER BY replica",
    );
    let names: Vec<&str> = by.iter().map(|r| r["replica"].as_str().unwrap()).collect();
    let mut expected = vec![a_url.as_str(), b_url.as_str()];
    expected.sort();
    assert_eq!(names, expected, "{by:?}");
    assert!(
        answered_by_a < train / 2,
        "killed mid-stage ({answered_by_a} of {train})"
    );
    assert!(
        b.stats().ok as i64 > train / 2,
        "the surviving replica took the rest"
    );
}

/// Multi-turn prompts (`prompts.fields.messages`): the last user turn is the prompt, the turns
/// before it its history, carried through two rounds into TRL's conversational export (loaded
/// by `datasets`); the plain export refuses them with a hint.
#[test]
fn conversations_go_through_two_rounds_into_a_conversational_export() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows: Vec<String> = (0..8)
        .map(|i| {
            let messages = if i % 2 == 0 {
                serde_json::json!([
                    {"role": "system", "content": "You are a travel agent."},
                    {"role": "user", "content": format!("Plan day {i} in Rome.")},
                    {"role": "assistant", "content": "Morning: the Colosseum.\nAfternoon: the Vatican."},
                    {"role": "user", "content": format!("Make day {i} cheaper.")},
                ])
            } else {
                serde_json::json!([{"role": "user", "content": format!("Name a prime above {i}0.")}])
            };
            serde_json::json!({"id": format!("c{i}"), "messages": messages}).to_string()
        })
        .collect();
    std::fs::write(d.join("prompts.jsonl"), rows.join("\n") + "\n").unwrap();
    std::fs::write(d.join("train.sh"), TRAIN_SCRIPT).unwrap();
    let spec = pipeline(&server, 2, 4, 0.5, true)
        .replace(
            "fields: { id: id, metadata: [category] }",
            "fields: { id: id, messages: messages }",
        )
        .replace("holdout: 0.1", "holdout: 0.25")
        .replace("template: aligner-v1", "template: aligner-v1-multiturn")
        .replace(
            "      serve_model: \"ckpt-round-{round}\"",
            "      serve_model: \"ckpt-round-{round}\"\n      conversational: true",
        );
    std::fs::write(d.join("p.yaml"), spec).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    // The last user turn is the prompt; the turns between the system message and it are its
    // history (NULL for a single turn).
    let prompts = sql(
        d,
        "SELECT source_id, system, history, prompt FROM prompts ORDER BY idx",
    );
    assert_eq!(prompts.len(), 8);
    for p in &prompts {
        let i: usize = p["source_id"].as_str().unwrap()[1..].parse().unwrap();
        if i.is_multiple_of(2) {
            assert_eq!(p["prompt"], format!("Make day {i} cheaper.").as_str());
            assert_eq!(p["system"], "You are a travel agent.");
            let h: Value = serde_json::from_str(p["history"].as_str().unwrap()).unwrap();
            assert_eq!(h[0]["content"], format!("Plan day {i} in Rome.").as_str());
            assert_eq!(h[1]["role"], "assistant");
        } else {
            assert!(p["history"].is_null(), "{p:?}");
        }
    }
    assert_eq!(
        scalar(d, "SELECT count(*) FROM generations WHERE round = 2"),
        6
    );
    // The round's training data and the export keep the conversation as the prompt.
    let o = run(
        &[
            "export",
            "--store",
            "s.db",
            "--run",
            "1",
            "--round",
            "2",
            "--conversational",
            "--out",
            "conv.jsonl",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let exported = std::fs::read_to_string(d.join("conv.jsonl")).unwrap();
    let mut multi = 0;
    for line in exported.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let prompt = v["prompt"].as_array().unwrap();
        if prompt.len() == 4 {
            multi += 1;
            let roles: Vec<&str> = prompt.iter().map(|m| m["role"].as_str().unwrap()).collect();
            assert_eq!(roles, ["system", "user", "assistant", "user"]);
        } else {
            assert_eq!(prompt.len(), 1, "{v}");
        }
    }
    assert!(multi >= 1, "{exported}");
    assert_eq!(
        exported,
        std::fs::read_to_string(d.join("runs/e2e-1/round-2/pairs.jsonl")).unwrap()
    );
    let o = Command::new("python3")
        .arg(repo().join("tests/python/check_export.py"))
        .args(["conv.jsonl", "dpo", "conversational"])
        .current_dir(d)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", d.join("hf"))
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &[
            "export",
            "--store",
            "s.db",
            "--run",
            "1",
            "--round",
            "2",
            "--out",
            "plain.jsonl",
        ],
        d,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("--conversational"), "{}", text(&o));
}
