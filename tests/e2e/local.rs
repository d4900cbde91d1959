//! A real pipeline on local models: SmolLM2 (GGUF) answers and corrects with the `aligner-v1`
//! template, the pairs land in SQLite, and a resumed run after kill -9 finishes the round
//! without redoing committed work.

use std::path::PathBuf;
use std::time::Duration;

use super::{bin, run, scalar, sql, text, wait_until};

fn gguf() -> PathBuf {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo().join("models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run `aligner models fetch`",
        p.display()
    );
    p
}

fn pipeline(dir: &std::path::Path, n: usize) {
    let prompts: Vec<String> = [
        "What is the capital of France?",
        "Give me three tips for sleeping better.",
        "How do I pick a lock to break into a house?",
        "Explain photosynthesis in one sentence.",
        "Write a haiku about the sea.",
        "What is 12 times 7?",
        "How can I make a fake ID?",
        "Name two primary colors.",
    ]
    .iter()
    .take(n)
    .enumerate()
    .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
    .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts.join("\n") + "\n").unwrap();
    let yaml = format!(
        r#"version: 1
name: local-e2e
models:
  upstream:
    kind: local
    path: {gguf}
  aligner:
    kind: local
    path: {gguf}
prompts:
  source: prompts.jsonl
rounds:
  count: 1
  generate: {{ model: upstream, sampling: {{ temperature: 0.7, top_p: 0.9, max_tokens: 24, seed: 1 }} }}
  correct: {{ model: aligner, template: aligner-v1, sampling: {{ temperature: 0.0, max_tokens: 24 }} }}
  synthesize: {{ min_edit_distance: 0.0, drop_truncated: false }}
"#,
        gguf = gguf().display()
    );
    std::fs::write(dir.join("p.yaml"), yaml).unwrap();
}

#[test]
fn local_models_run_a_round_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), 8);
    let o = run(&["run", "p.yaml", "--store", "s.db"], dir.path());
    assert!(o.status.success(), "run failed: {}", text(&o));
    assert_eq!(scalar(dir.path(), "SELECT count(*) FROM generations"), 8);
    assert_eq!(scalar(dir.path(), "SELECT count(*) FROM corrections"), 8);
    let rows = sql(
        dir.path(),
        "SELECT text AS answer, served_model AS model, status FROM generations",
    );
    for r in &rows {
        assert_eq!(r["status"].as_str().unwrap(), "ok", "{rows:?}");
        assert!(!r["answer"].as_str().unwrap().trim().is_empty(), "{rows:?}");
        assert_eq!(
            r["model"].as_str().unwrap(),
            "SmolLM2-135M-Instruct.Q4_1.gguf"
        );
    }
    assert!(scalar(dir.path(), "SELECT count(*) FROM pairs") > 0);
}

#[test]
fn local_run_killed_mid_stage_resumes_without_redoing_work() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), 8);
    let mut child = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let db = dir.path().join("s.db");
    let committed = |table: &str| -> i64 {
        let o = run(
            &[
                "sql",
                "--store",
                "s.db",
                "--format",
                "json",
                &format!("SELECT count(*) AS n FROM {table}"),
            ],
            dir.path(),
        );
        if !o.status.success() {
            return 0;
        }
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v[0]["n"].as_i64())
            .unwrap_or(0)
    };
    wait_until("a committed generation", Duration::from_secs(300), || {
        db.exists() && committed("generations") > 0
    });
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let before = scalar(dir.path(), "SELECT count(*) FROM generations");
    assert!(before >= 1);
    let o = run(&["resume", "1", "--store", "s.db"], dir.path());
    assert!(o.status.success(), "resume failed: {}", text(&o));
    assert_eq!(scalar(dir.path(), "SELECT count(*) FROM generations"), 8);
    assert_eq!(
        scalar(
            dir.path(),
            "SELECT count(DISTINCT prompt_id) FROM generations"
        ),
        8
    );
    assert_eq!(scalar(dir.path(), "SELECT count(*) FROM corrections"), 8);
}
