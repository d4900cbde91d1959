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
struct Serving {
    child: Child,
    url: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, name: &str) -> Serving {
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
