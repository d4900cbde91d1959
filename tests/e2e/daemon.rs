//! `aligner daemon` with real clients: curl against the API, the `aligner` client commands,
//! kill -9 mid-run and a restart that finishes the run with exact counts, SIGTERM, and the
//! dashboard in headless Chromium.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use aligner_mockserver::MockConfig;
use serde_json::Value;

use super::*;

const TOKEN: &str = "e2e-daemon-token-0123456789abcdef";

struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    /// Starts `aligner daemon` on a free port in `dir` (store `s.db`) and waits for its address.
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(dir, extra, |_| {})
    }

    /// As [`Daemon::start`], with `env` adjusting the command's environment.
    fn start_with(dir: &Path, extra: &[&str], env: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = bin();
        cmd.args([
            "daemon",
            "--port",
            "0",
            "--store",
            "s.db",
            "--grace-secs",
            "20",
        ])
        .args(extra)
        .env("ALIGNER_TOKEN", TOKEN)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        env(&mut cmd);
        let mut child = cmd.spawn().expect("daemon starts");
        let line = first_stdout_line(&mut child, Duration::from_secs(60))
            .expect("the daemon prints its address");
        let url = line
            .strip_prefix("aligner daemon listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Daemon { child, url }
    }

    fn signal(&self, sig: i32) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < within, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl with the given extra arguments; returns (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let o = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn authed(d: &Daemon, method: &str, path: &str, extra: &[&str]) -> (u16, Value) {
    let url = format!("{}{path}", d.url);
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut args = vec!["-X", method, "-H", &auth];
    args.extend_from_slice(extra);
    args.push(&url);
    let (code, body) = curl(&args);
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn job_state(d: &Daemon, run: i64) -> Value {
    let (code, v) = authed(d, "GET", &format!("/v1/runs/{run}"), &[]);
    assert_eq!(code, 200, "{v}");
    v
}

fn wait_state(d: &Daemon, run: i64, state: &str, within: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        let v = job_state(d, run);
        if v["job"]["state"] == state {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "run {run} never reached `{state}`: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn submit(d: &Daemon, dir: &Path, file: &str) -> i64 {
    let data = format!("@{}", dir.join(file).display());
    let path = format!("/v1/runs?base_dir={}", dir.display());
    let (code, v) = authed(d, "POST", &path, &["--data-binary", &data]);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["state"], "queued");
    v["run_id"].as_i64().unwrap()
}

#[test]
fn daemon_api_security_and_kill_9_resume_with_exact_counts() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(25),
        ..Default::default()
    });
    let dir = setup(&server, 40, &[], 2, 2, true);
    let mut d = Daemon::start(dir.path(), &[]);

    // No token, a wrong token, the health check, an unknown route.
    let (code, body) = curl(&[&format!("{}/v1/runs", d.url)]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("needs a token"), "{body}");
    let (code, body) = curl(&[
        "-H",
        "Authorization: Bearer wrong-token-wrong-token",
        &format!("{}/v1/runs", d.url),
    ]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("wrong token"), "{body}");
    // The token never goes in a URL, right or wrong.
    for token in ["wrong", TOKEN] {
        let (code, body) = curl(&[&format!("{}/v1/runs?token={token}", d.url)]);
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("does not go in URLs"), "{body}");
    }
    // The browser's way in: the login form sets an HttpOnly session cookie derived from the
    // token (not the token itself), which then opens the API; a cross-site change is refused.
    let (code, body) = curl(&["-i", &format!("{}/", d.url)]);
    assert_eq!(code, 303, "{body}");
    assert!(
        body.to_ascii_lowercase().contains("location: /login"),
        "{body}"
    );
    let (code, body) = curl(&[&format!("{}/login", d.url)]);
    assert_eq!(code, 200);
    assert!(
        body.contains("<form method=\"post\" action=\"/login\""),
        "{body}"
    );
    let (code, body) = curl(&[
        "--data-urlencode",
        "token=wrong",
        &format!("{}/login", d.url),
    ]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("wrong token"), "{body}");
    let (code, head) = curl(&[
        "-i",
        "--data-urlencode",
        &format!("token={TOKEN}"),
        &format!("{}/login", d.url),
    ]);
    assert_eq!(code, 303, "{head}");
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    let session = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let (code, body) = curl(&["-b", &session, &format!("{}/v1/runs", d.url)]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&["-b", &session, &format!("{}/", d.url)]);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(TOKEN));
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-b",
        &session,
        "-H",
        "Origin: http://evil.example",
        &format!("{}/v1/runs/1/cancel", d.url),
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross-site"), "{body}");
    let (code, body) = curl(&[
        "-b",
        "aligner_session=forged",
        &format!("{}/v1/runs", d.url),
    ]);
    assert_eq!(code, 401, "{body}");
    assert_eq!(curl(&[&format!("{}/health", d.url)]), (200, "ok".into()));
    let (code, v) = authed(&d, "GET", "/v2/things", &[]);
    assert_eq!(code, 404, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("/v1/"));

    // Malformed and oversized pipelines are refused before anything is queued.
    std::fs::write(
        dir.path().join("typo.yaml"),
        std::fs::read_to_string(dir.path().join("p.yaml"))
            .unwrap()
            .replace("temperature: 0.5", "temprature: 0.5"),
    )
    .unwrap();
    let data = format!("@{}", dir.path().join("typo.yaml").display());
    let (code, v) = authed(&d, "POST", "/v1/runs", &["--data-binary", &data]);
    assert_eq!(code, 422, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("did you mean `temperature`?"), "{msg}");
    assert!(v["error"]["detail"][0]["line"].as_i64().is_some(), "{v}");
    let (code, v) = authed(&d, "POST", "/v1/runs", &["--data-binary", "version: [1"]);
    assert_eq!(code, 422, "{v}");
    std::fs::write(dir.path().join("big.yaml"), "#".repeat(2 << 20)).unwrap();
    let data = format!("@{}", dir.path().join("big.yaml").display());
    let (code, v) = authed(&d, "POST", "/v1/runs", &["--data-binary", &data]);
    assert_eq!(code, 413, "{v}");
    let (code, v) = authed(
        &d,
        "POST",
        "/v1/sql",
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "{not json",
        ],
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = authed(&d, "GET", "/v1/runs", &[]);
    assert_eq!(code, 200);
    assert_eq!(
        v["runs"].as_array().unwrap().len(),
        0,
        "nothing queued: {v}"
    );

    // Submit, let it get into round 1, then kill -9 the daemon.
    let run = submit(&d, dir.path(), "p.yaml");
    let start = std::time::Instant::now();
    loop {
        let v = job_state(&d, run);
        let done = v["progress"]["done"].as_u64().unwrap_or(0);
        if v["progress"]["stage"] == "correct" && done >= 4 {
            break;
        }
        assert_ne!(
            v["job"]["state"], "done",
            "the run finished before the kill: {v}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(9);
    d.wait_exit(Duration::from_secs(10));
    drop(d);
    let rows = sql(dir.path(), "SELECT state, lease_holder FROM daemon_jobs");
    assert_eq!(rows[0]["state"], "running", "{rows:?}");

    // A restart queues it again and finishes it; every prompt was answered exactly once.
    let mut d = Daemon::start(dir.path(), &[]);
    let v = wait_state(&d, run, "done", Duration::from_secs(120));
    assert_eq!(v["job"]["attempts"], 2, "{v}");
    assert_eq!(v["run"]["status"], "done");
    assert_eq!(v["rounds"].as_array().unwrap().len(), 2, "{v}");
    assert_exactly_once(dir.path(), 2);
    let train = scalar(
        dir.path(),
        "SELECT count(*) FROM prompts WHERE split = 'train'",
    );
    assert_eq!(
        scalar(
            dir.path(),
            "SELECT count(*) FROM generations WHERE round = 1"
        ),
        train
    );
    assert_eq!(
        scalar(
            dir.path(),
            "SELECT count(*) FROM events WHERE kind = 'run_resumed'"
        ),
        1
    );

    // The event stream of a finished run: the log, then its end.
    let (code, body) = curl(&[
        "-N",
        "--max-time",
        "20",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &format!("{}/v1/runs/{run}/events", d.url),
    ]);
    assert_eq!(code, 200);
    assert!(body.contains("event: log"), "{body}");
    assert!(body.contains("run_resumed"), "{body}");
    assert!(
        body.trim_end().ends_with(&format!(
            "data: {{\"error\":null,\"run_id\":{run},\"state\":\"done\"}}"
        )),
        "{body}"
    );

    // Read-only SQL: reads work, writes are refused.
    let (code, v) = authed(
        &d,
        "POST",
        "/v1/sql",
        &["--data-binary", "SELECT count(*) AS n FROM pairs"],
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["rows"][0][0].as_i64().unwrap() > 0, "{v}");
    let (code, v) = authed(
        &d,
        "POST",
        "/v1/sql",
        &["--data-binary", "DELETE FROM pairs"],
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only reads"),
        "{v}"
    );

    // The report renders through the API.
    let (code, body) = curl(&[
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &format!("{}/v1/runs/{run}/report", d.url),
    ]);
    assert_eq!(code, 200);
    assert!(
        body.contains("<html") && body.contains("e2e"),
        "{}",
        &body[..body.len().min(500)]
    );

    // The client commands against the daemon.
    let o = bin()
        .args(["runs", "--daemon", &d.url])
        .env("ALIGNER_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("e2e") && t.contains("done"), "{t}");
    let o = bin()
        .args(["logs", &run.to_string(), "--daemon", &d.url])
        .env("ALIGNER_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("run {run} done")),
        "{}",
        text(&o)
    );
    let o = bin()
        .args(["runs", "--daemon", &d.url])
        .env("ALIGNER_TOKEN", "a-wrong-token-of-some-length")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("wrong token"), "{}", text(&o));

    // SIGTERM with nothing running: a clean exit.
    d.signal(15);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(server.stats().faults.status_500, 0);
}

#[test]
fn pause_resume_cancel_and_sigterm_requeue() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(40),
        ..Default::default()
    });
    let dir = setup(&server, 40, &[], 2, 1, false);
    let mut d = Daemon::start(dir.path(), &[]);

    // Submitted through the client command; paused while it runs, then resumed.
    let o = bin()
        .args(["submit", "p.yaml", "--daemon", &d.url])
        .env("ALIGNER_TOKEN", TOKEN)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("queued run 1"), "{}", text(&o));
    let run = 1;
    wait_until("generation under way", Duration::from_secs(60), || {
        job_state(&d, run)["progress"]["done"].as_u64().unwrap_or(0) >= 2
    });
    let (code, v) = authed(&d, "POST", &format!("/v1/runs/{run}/pause"), &[]);
    assert_eq!(code, 202, "{v}");
    let v = wait_state(&d, run, "paused", Duration::from_secs(30));
    let generated = scalar(dir.path(), "SELECT count(*) FROM generations");
    assert!(generated > 0, "{v}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        scalar(dir.path(), "SELECT count(*) FROM generations"),
        generated,
        "a paused run makes no requests"
    );
    let (code, v) = authed(&d, "POST", &format!("/v1/runs/{run}/resume"), &[]);
    assert_eq!(code, 200, "{v}");
    let (code, v) = authed(&d, "POST", &format!("/v1/runs/{run}/resume"), &[]);
    assert_eq!(code, 409, "resuming twice: {v}");

    // SIGTERM mid-run: the daemon finishes in-flight items, queues the run again and exits.
    wait_until("the resumed run is driven", Duration::from_secs(30), || {
        job_state(&d, run)["job"]["state"] == "running"
            && scalar(dir.path(), "SELECT count(*) FROM generations") > generated
    });
    d.signal(15);
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    drop(d);
    let rows = sql(dir.path(), "SELECT state, lease_holder FROM daemon_jobs");
    assert_eq!(rows[0]["state"], "queued", "{rows:?}");
    assert_eq!(rows[0]["lease_holder"], Value::Null);

    // A second run queues behind the first (one at a time); the first finishes after the
    // restart, the second is cancelled while queued, then a third is cancelled mid-run.
    let mut d = Daemon::start(dir.path(), &["--max-running", "1"]);
    let second = submit(&d, dir.path(), "p.yaml");
    let v = job_state(&d, second);
    assert_eq!(v["job"]["state"], "queued", "{v}");
    let (code, v) = authed(&d, "POST", &format!("/v1/runs/{second}/cancel"), &[]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "cancelled");
    wait_state(&d, run, "done", Duration::from_secs(120));
    assert_exactly_once(dir.path(), 2);
    let third = submit(&d, dir.path(), "p.yaml");
    wait_until("the third run generates", Duration::from_secs(60), || {
        job_state(&d, third)["progress"]["done"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let o = bin()
        .args(["cancel", &third.to_string(), "--daemon", &d.url])
        .env("ALIGNER_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v = wait_state(&d, third, "cancelled", Duration::from_secs(30));
    assert_eq!(v["run"]["status"], "cancelled", "{v}");
    let statuses = sql(dir.path(), "SELECT id, status FROM runs ORDER BY id");
    let s: Vec<&str> = statuses
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(s, ["done", "cancelled", "cancelled"]);
    let (code, v) = authed(&d, "POST", &format!("/v1/runs/{third}/cancel"), &[]);
    assert_eq!(code, 409, "{v}");
    d.signal(15);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn token_file_is_generated_private() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cfg").join("token");
    let d = Daemon::start_with(
        dir.path(),
        &["--token-file", token_file.to_str().unwrap()],
        |c| {
            c.env_remove("ALIGNER_TOKEN");
        },
    );
    let url = d.url.clone();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);
    let (code, body) = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("{url}/v1/runs"),
    ]);
    assert_eq!(code, 200, "{body}");
    // The client finds the same file.
    let o = bin()
        .args(["runs", "--daemon", &url, "--token-file"])
        .arg(&token_file)
        .env_remove("ALIGNER_TOKEN")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no runs yet"), "{}", text(&o));
    drop(d);
}

#[test]
fn dashboard_renders_in_headless_chromium() {
    if std::env::var_os("ALIGNER_SKIP_CHROMIUM").is_some() {
        return;
    }
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 12, &[], 1, 4, false);
    let d = Daemon::start(dir.path(), &[]);
    let run = submit(&d, dir.path(), "p.yaml");
    wait_state(&d, run, "done", Duration::from_secs(60));
    // A fresh profile per page: no cookie survives from one call (or test run) to the next.
    let chromium = |url: &str| -> String {
        let profile = tempfile::tempdir().unwrap();
        let o = std::process::Command::new("chromium")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=5000",
                "--dump-dom",
                url,
            ])
            .output()
            .expect("chromium is installed (scripts/test.sh installs Debian's `chromium`)");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // Without a session the dashboard sends the browser to the login form.
    let dom = chromium(&format!("{}/", d.url));
    assert!(dom.contains("action=\"/login\""), "{dom}");
    assert!(!dom.contains("data-run="), "{dom}");
    // `/login#token=...` logs in through the form (the fragment never reaches the server);
    // the cookie then carries the dashboard's own requests.
    let dom = chromium(&format!("{}/login#token={TOKEN}", d.url));
    assert!(dom.contains(&format!("data-run=\"{run}\"")), "{dom}");
    assert!(dom.contains("class=\"state done\""), "{dom}");
    assert!(dom.contains("round 1: done"), "{dom}");
    assert!(dom.contains("1 run(s), 0 running"), "{dom}");
    assert!(!dom.contains(TOKEN), "{dom}");
    let dom = chromium(&format!("{}/login#token=wrong", d.url));
    assert!(dom.contains("wrong token"), "{dom}");
    assert!(!dom.contains("data-run="), "{dom}");
}

#[test]
fn two_runs_of_one_pipeline_side_by_side_and_no_secret_from_the_environment() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_millis(5),
        ..Default::default()
    });
    let dir = setup(&server, 20, &[], 1, 2, false);
    // The daemon's environment holds a secret; a submission must not be able to read it.
    let d = Daemon::start_with(dir.path(), &["--max-running", "2"], |c| {
        c.env("E2E_SECRET_KEY", "sk-topsecret-value");
    });

    let a = submit(&d, dir.path(), "p.yaml");
    let b = submit(&d, dir.path(), "p.yaml");
    wait_state(&d, a, "done", Duration::from_secs(60));
    wait_state(&d, b, "done", Duration::from_secs(60));
    assert_exactly_once(dir.path(), 1);
    assert_eq!(
        scalar(dir.path(), "SELECT count(DISTINCT run_id) FROM generations"),
        2
    );

    let leaky = std::fs::read_to_string(dir.path().join("p.yaml"))
        .unwrap()
        .replacen(
            &format!("base_url: {}", server.base_url),
            &format!("base_url: {}/${{E2E_SECRET_KEY}}", server.base_url),
            1,
        );
    std::fs::write(dir.path().join("leaky.yaml"), leaky).unwrap();
    let data = format!("@{}", dir.path().join("leaky.yaml").display());
    let (code, v) = authed(&d, "POST", "/v1/runs", &["--data-binary", &data]);
    assert_eq!(code, 422, "{v}");
    assert!(!v.to_string().contains("topsecret"), "{v}");
    assert!(v.to_string().contains("E2E_SECRET_KEY"), "{v}");

    // One statement at a time through the SQL surface.
    let (code, v) = authed(
        &d,
        "POST",
        "/v1/sql",
        &["--data-binary", "SELECT 1; ATTACH '/etc/passwd' AS x"],
    );
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains("one statement"), "{v}");
}
