//! `aligner serve` on the real SmolLM2 GGUF, driven by the official `openai` Python client.

use super::*;

fn models_dir() -> PathBuf {
    std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

pub(crate) fn smollm2() -> PathBuf {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "`{}` is missing\nhint: run `aligner models fetch` (or point ALIGNER_MODELS_DIR at a folder holding it)",
        path.display()
    );
    path
}

/// A running `aligner serve`, killed when dropped if it is still there.
pub(crate) struct Serving {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn serve(model: &Path, name: &str) -> Serving {
    let mut child = bin()
        .args([
            "serve",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--name",
            name,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("aligner serve starts");
    let line = first_stdout_line(&mut child, Duration::from_secs(120))
        .expect("`aligner serve` prints its address within 120 s");
    assert!(
        line.starts_with(&format!(
            "serving {} as {name} on http://127.0.0.1:",
            model.display()
        )),
        "unexpected first line: {line:?}"
    );
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.ends_with("/v1"), "{line:?}");
    Serving { child, url }
}

#[test]
fn serve_answers_the_openai_python_client_with_smollm2() {
    let model = smollm2();
    let mut server = serve(&model, "smollm2");
    let out = Command::new("python3")
        .arg(repo().join("tests/python/test_serve_openai.py"))
        .env("ALIGNER_SERVE_BASE_URL", &server.url)
        .env("ALIGNER_SERVE_MODEL", "smollm2")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/python/test_serve_openai.py failed (it needs `python3 -m pip install openai`; scripts/test.sh installs it):\n{}",
        text(&out)
    );
    // SIGTERM: a graceful stop, exit 0.
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}

#[test]
fn serve_with_a_missing_model_exits_2_naming_the_path_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    let o = run(
        &["serve", "models/not-here.gguf", "--port", "0"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("`models/not-here.gguf`"), "{t}");
    assert!(t.contains("aligner models fetch"), "{t}");
}

/// `rounds.train.serve: {kind: command}` with an `openai` upstream: round 1 asks the user's
/// server (an `aligner serve` of SmolLM2), `aligner train` trains round 1's pairs, and the
/// orchestrator serves the checkpoint with `aligner serve` on its own port, which answers
/// round 2. Killed with SIGKILL once that server runs, the resumed run reuses it (no second
/// server on the port), and stops it at the end.
#[test]
fn the_serve_block_puts_each_checkpoint_behind_an_endpoint_for_the_next_round() {
    let model = smollm2();
    let upstream = serve(&model, "upstream");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"id": format!("p{i}"), "prompt": format!("Write a short note about the number {i}.")})
                .to_string()
        })
        .collect();
    std::fs::write(d.join("prompts.jsonl"), prompts.join("\n") + "\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let aligner = env!("CARGO_BIN_EXE_aligner");
    let yaml = format!(
        r#"version: 1
name: serve-e2e
models:
  upstream: {{ kind: openai, base_url: "{url}", model: upstream, weights: {gguf} }}
  aligner: {{ kind: local, path: {gguf} }}
prompts:
  source: prompts.jsonl
rounds:
  count: 2
  generate: {{ model: upstream, sampling: {{ temperature: 0.7, max_tokens: 48, seed: 1 }} }}
  correct: {{ model: aligner, template: aligner-v1, sampling: {{ temperature: 0.0, max_tokens: 24 }} }}
  synthesize: {{ min_edit_distance: 0.0, drop_truncated: false }}
  train:
    method: dpo
    learning_rate: 1.0e-5
    epochs: 1
    batch_size: 2
    max_length: 128
    warmup_ratio: 0.0
    backend:
      kind: command
      command: "{aligner} train --data {{data}} --base {{base_model}} --reference {{ref_model}} --out {{output_dir}} --batch-size 2 --max-length 128 --train-layers 2"
      serve_model: "upstream-round-{{round}}"
    serve:
      kind: command
      command: "{aligner} serve {{checkpoint}} --port {{port}} --name {{name}}"
      port: {port}
      timeout_secs: 120
"#,
        url = upstream.url,
        gguf = model.display(),
    );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let mut child = bin()
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "round 1's checkpoint served",
        Duration::from_secs(300),
        || {
            try_scalar(
                d,
                "SELECT count(*) FROM checkpoints WHERE server IS NOT NULL",
            ) == Some(1)
        },
    );
    let pid = scalar(
        d,
        "SELECT json_extract(server, '$.process.pid') FROM checkpoints WHERE round = 1",
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // It was starting when the orchestrator died; it comes up on its own.
    wait_until(
        "the checkpoint's server, orphaned, to answer",
        Duration::from_secs(120),
        || {
            let models = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{port}/v1/models")])
                .output()
                .unwrap();
            String::from_utf8_lossy(&models.stdout).contains("upstream-round-1")
        },
    );
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    let served = sql(
        d,
        "SELECT DISTINCT round, served_model FROM generations ORDER BY round",
    );
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0]["served_model"], "upstream");
    assert_eq!(served[1]["served_model"], "upstream-round-1");
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM checkpoints WHERE server IS NOT NULL"
        ),
        0,
        "the run's end stops its servers"
    );
    wait_until(
        "the checkpoint's server to stop",
        Duration::from_secs(30),
        || !Path::new(&format!("/proc/{pid}")).exists(),
    );
}
