//! The correction proxy (`aligner serve --upstream URL --aligner ...`) against loopback test
//! servers standing in for the upstream and the Aligner, and with the real SmolLM2 GGUF as an
//! in-process Aligner: corrections with the original beside them, streaming, error statuses,
//! records in SQLite, and the official `openai` Python client.

use std::io::{Read, Write};
use std::net::TcpStream;

use aligner_mockserver::answers;
use serde_json::json;

use super::*;

const ALIGNER_V1_PREFIX: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: ";

/// A running proxy, killed when dropped.
struct Proxy {
    child: Child,
    addr: String,
    url: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `aligner serve --upstream ...` with `args` in `dir`; its stderr goes to
/// `dir/proxy.log`.
fn proxy(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proxy {
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let mut cmd = bin();
    cmd.arg("serve")
        .args(args)
        .args(["--port", "0"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("aligner serve starts");
    let line = first_stdout_line(&mut child, Duration::from_secs(120))
        .expect("the proxy prints its address within 120 s");
    assert!(
        line.starts_with("correcting http://127.0.0.1:"),
        "unexpected first line: {line:?}\n{}",
        std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
    );
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    Proxy { child, addr, url }
}

/// An HTTP/1.1 answer: status, headers (names lowercased) and the body, de-chunked.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..eol]).unwrap().trim();
        let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    // Read until the server closes. A server that answers before reading a whole (too large)
    // body may reset the connection after its answer: keep what arrived.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if raw.is_empty() => panic!("reading the answer: {e}"),
            Err(_) => break,
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Answer {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn post(p: &Proxy, body: &Value) -> Answer {
    http(
        &p.addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
    )
}

fn chat(question: &str) -> Value {
    json!({
        "model": "client-model",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": question},
        ],
    })
}

/// The mock's answer to `question` and the mock Aligner's correction of it.
fn expected(question: &str) -> (String, String) {
    let answer = answers::chat_text("mock-upstream", question);
    let prompt = format!("{ALIGNER_V1_PREFIX}{question} | {answer} ASSISTANT:");
    (answer, answers::correction_text(&prompt))
}

/// Streamed chunks: the concatenated content of choice 0, the finish reasons, the chunks.
fn streamed(a: &Answer) -> (String, Vec<String>, Vec<Value>) {
    let events = a.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = String::new();
    let mut finishes = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        for choice in c["choices"].as_array().unwrap() {
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    (text, finishes, chunks)
}

#[test]
fn proxy_corrects_streams_fails_clearly_and_records() {
    const KEY: &str = "sk-proxy-upstream-0123456789";
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig {
        api_key: Some(KEY.into()),
        fail_prompts_containing: Some("POISON".into()),
        ..Default::default()
    });
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig {
        fail_prompts_containing: Some("BREAK-THE-ALIGNER".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = proxy(
        d,
        &[
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--upstream-api-key-env",
            "E2E_PROXY_KEY",
            "--upstream-retries",
            "1",
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
            "--aligner-retries",
            "0",
            "--record",
            "s.db",
            "--max-body-bytes",
            "65536",
        ],
        &[("E2E_PROXY_KEY", KEY)],
    );
    assert!(p.url.ends_with("/v1"));
    let question = "What is 2+2?";
    let (answer, correction) = expected(question);
    assert_eq!(correction, format!("I corrected this: {answer}"));

    // A whole answer: the correction, the original beside it, both models' usage.
    let a = post(&p, &chat(question));
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "mock-upstream");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], correction.as_str());
    assert_eq!(
        v["choices"][0]["message"]["aligner_original"],
        answer.as_str()
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["aligner"]["original"], answer.as_str());
    assert_eq!(v["aligner"]["aligner_model"], "mock-aligner");
    assert_eq!(v["aligner"]["template"], "aligner-v1");
    assert_eq!(v["aligner"]["passthrough"], false);
    let u = &v["usage"];
    let up_prompt = answers::word_count("You are helpful.") + answers::word_count(question);
    let al_prompt = answers::word_count(&format!(
        "{ALIGNER_V1_PREFIX}{question} | {answer} ASSISTANT:"
    ));
    assert_eq!(u["aligner"]["upstream"]["prompt_tokens"], up_prompt);
    assert_eq!(u["aligner"]["aligner"]["prompt_tokens"], al_prompt);
    assert_eq!(u["prompt_tokens"], up_prompt + al_prompt);
    assert_eq!(
        u["completion_tokens"],
        answers::word_count(&answer) + answers::word_count(&correction)
    );
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let timing = a.header("server-timing").expect("a Server-Timing header");
    for part in ["upstream;dur=", "aligner;dur=", "total;dur="] {
        assert!(timing.contains(part), "{timing}");
    }
    // What each model was sent: the upstream model name (with the key), and the Aligner the
    // byte-exact aligner-v1 prompt with the proxy's sampling.
    assert_eq!(upstream.stats().per_model["mock-upstream"], 1);
    let sent = aligner.last_request_body().unwrap();
    assert_eq!(
        sent["prompt"],
        format!("{ALIGNER_V1_PREFIX}{question} | {answer} ASSISTANT:")
    );
    assert_eq!(sent["model"], "mock-aligner");
    assert_eq!(sent["max_tokens"], 512);
    assert_eq!(sent["temperature"], 0.0);

    // Streamed: standard chunks whose content adds up to the correction, then [DONE].
    let mut body = chat(question);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let a = post(&p, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let (text, finishes, chunks) = streamed(&a);
    assert_eq!(text, correction);
    assert_eq!(finishes, ["stop"]);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["aligner_original"],
        answer.as_str()
    );
    assert_eq!(chunks[0]["aligner"]["aligner_model"], "mock-aligner");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["prompt_tokens"], up_prompt + al_prompt);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // Two choices, each corrected.
    let mut body = chat("Name a colour.");
    body["n"] = json!(2);
    body["seed"] = json!(5);
    let a = post(&p, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    let (answer2, correction2) = expected("Name a colour.");
    for i in 0..2 {
        assert_eq!(v["choices"][i]["index"], i);
        assert_eq!(v["choices"][i]["message"]["content"], correction2.as_str());
        assert_eq!(
            v["choices"][i]["message"]["aligner_original"],
            answer2.as_str()
        );
    }

    // The upstream fails (500, retried once): 502 naming the upstream; the Aligner is not asked.
    let aligner_calls = aligner.stats().ok;
    let a = post(&p, &chat("POISON: this always fails"));
    assert_eq!(a.status, 502, "{}", a.body);
    let e = &a.json()["error"];
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("upstream `{}`", upstream.base_url)) && message.contains("500"),
        "{message}"
    );
    assert_eq!(e["code"], "upstream_error");
    assert_eq!(upstream.stats().faults.forced_500, 2, "one retry");
    assert_eq!(aligner.stats().ok, aligner_calls);
    // The same when streaming: the error comes before any event.
    let mut body = chat("POISON again");
    body["stream"] = json!(true);
    let a = post(&p, &body);
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "upstream_error");

    // The Aligner fails: 502 naming the Aligner, whole or streamed.
    let a = post(&p, &chat("BREAK-THE-ALIGNER please"));
    assert_eq!(a.status, 502, "{}", a.body);
    let e = &a.json()["error"];
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("the Aligner `mock-aligner` failed"),
        "{e}"
    );
    assert_eq!(e["code"], "aligner_error");
    let mut body = chat("BREAK-THE-ALIGNER when streaming");
    body["stream"] = json!(true);
    let a = post(&p, &body);
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "aligner_error");

    // Bad bodies: 400 naming the field; too large: 413.
    let a = http(&p.addr, "POST", "/v1/chat/completions", b"{\"messages\": [");
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let a = post(&p, &json!({"model": "m"}));
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["param"], "messages");
    let mut body = chat(question);
    body["temperature"] = json!(7);
    let a = post(&p, &body);
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["param"], "temperature");
    let a = post(
        &p,
        &json!({"model": "m", "messages": [{"role": "system", "content": "no question"}]}),
    );
    assert_eq!(a.status, 400);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`user` message"));
    let big = chat(&"x".repeat(70_000));
    let a = post(&p, &big);
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "request_too_large");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("65536"));
    // The other routes.
    let a = http(&p.addr, "GET", "/v1/models", b"");
    assert_eq!(a.json()["data"][0]["id"], "mock-upstream");
    assert_eq!(http(&p.addr, "GET", "/health", b"").status, 200);
    assert_eq!(http(&p.addr, "POST", "/v1/completions", b"{}").status, 404);

    // Records: one per corrected choice (whole 1, streamed 1, n=2 2), none for failures.
    wait_until("4 records", Duration::from_secs(30), || {
        scalar(d, "SELECT count(*) FROM proxy_records") >= 4
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(scalar(d, "SELECT count(*) FROM proxy_records"), 4);
    assert_eq!(scalar(d, "SELECT count(*) FROM proxy_qac"), 4);
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM proxy_records WHERE stream = 1 AND status = 'corrected'"
        ),
        1
    );
    let rows = sql(
        d,
        "SELECT question, answer, correction, upstream_model, aligner_model, template_id, upstream_url, requested_at <= answered_at AND answered_at <= corrected_at AS ordered FROM proxy_records WHERE question = 'What is 2+2?' ORDER BY id",
    );
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["answer"], answer.as_str());
        assert_eq!(r["correction"], correction.as_str());
        assert_eq!(r["upstream_model"], "mock-upstream");
        assert_eq!(r["aligner_model"], "mock-aligner");
        assert_eq!(r["template_id"], "aligner-v1");
        assert_eq!(r["upstream_url"], upstream.base_url.as_str());
        assert_eq!(r["ordered"], 1);
    }
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM proxy_records WHERE question = 'Name a colour.' AND choice IN (0, 1)"
        ),
        2
    );
    // The Q-A-C export documented in docs/proxy.md: CSV from `aligner sql`, read the way
    // `aligner train-aligner --data` reads it.
    let o = run(
        &[
            "sql",
            "--store",
            "s.db",
            "--format",
            "csv",
            "SELECT question, answer, correction FROM proxy_qac",
        ],
        d,
    );
    assert!(o.status.success(), "{}", super::text(&o));
    std::fs::write(d.join("qac.csv"), &o.stdout).unwrap();
    let (qac, _) =
        aligner_dataset::read_qac(&d.join("qac.csv"), aligner_dataset::Format::Csv).unwrap();
    assert_eq!(qac.len(), 4);
    assert_eq!(qac[0].question, question);
    assert_eq!(qac[0].answer, answer);
    assert_eq!(qac[0].correction, correction);

    // The key reached the upstream (every call was authorized) but nothing else.
    assert_eq!(upstream.stats().faults.unauthorized, 0);
    drop(p);
    let log = std::fs::read_to_string(d.join("proxy.log")).unwrap();
    assert!(!log.contains(KEY), "{log}");
    for f in ["s.db", "s.db-wal"] {
        if let Ok(bytes) = std::fs::read(d.join(f)) {
            assert!(
                !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
                "key found in {f}"
            );
        }
    }
}

#[test]
fn proxy_passes_the_answer_through_when_asked_and_times_out_upstream() {
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig {
        fail_prompts_containing: Some("BREAK-THE-ALIGNER".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = proxy(
        d,
        &[
            "--upstream",
            &upstream.base_url,
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
            "--aligner-retries",
            "0",
            "--on-aligner-error",
            "passthrough",
            "--record",
            "s.db",
        ],
        &[],
    );
    // Without `--upstream-model` the client's model goes upstream.
    let q = "BREAK-THE-ALIGNER: is this passed through?";
    let original = answers::chat_text("client-model", q);
    let a = post(&p, &chat(q));
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], original.as_str());
    assert_eq!(m["aligner_original"], original.as_str());
    assert_eq!(m["aligner_passthrough"], true);
    assert!(m["aligner_error"]
        .as_str()
        .unwrap()
        .contains("mock-aligner"));
    assert_eq!(v["aligner"]["passthrough"], true);
    assert_eq!(upstream.stats().per_model["client-model"], 1);
    let mut body = chat(q);
    body["stream"] = json!(true);
    let a = post(&p, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    let (text, finishes, chunks) = streamed(&a);
    assert_eq!(text, original);
    assert_eq!(finishes, ["stop"]);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["aligner_passthrough"] == true));
    // A request without a model name cannot be forwarded.
    let a = post(
        &p,
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["param"], "model");
    wait_until("2 records", Duration::from_secs(30), || {
        scalar(d, "SELECT count(*) FROM proxy_records") >= 2
    });
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM proxy_records WHERE status = 'passthrough' AND correction IS NULL AND aligner_error LIKE '%mock-aligner%'"
        ),
        2
    );
    assert_eq!(scalar(d, "SELECT count(*) FROM proxy_qac"), 0);
    drop(p);

    // An upstream slower than `--upstream-timeout`: 502 naming the upstream and the timeout.
    let slow = aligner_mockserver::spawn_in_thread(MockConfig {
        latency: Duration::from_secs(3),
        ..Default::default()
    });
    let p = proxy(
        d,
        &[
            "--upstream",
            &slow.base_url,
            "--upstream-timeout",
            "0.3",
            "--upstream-retries",
            "0",
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
        ],
        &[],
    );
    let start = Instant::now();
    let a = post(&p, &chat("Are you there?"));
    assert_eq!(a.status, 502, "{}", a.body);
    let message = a.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&slow.base_url) && message.contains("timed out"),
        "{message}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn proxy_option_combinations_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let up = "http://127.0.0.1:9/v1";
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "m.gguf", "--upstream", up, "--aligner", "m.gguf"],
            "is not used with `--upstream`",
        ),
        (&["serve", "--upstream", up], "needs an Aligner"),
        (
            &[
                "serve",
                "--upstream",
                up,
                "--aligner",
                "m.gguf",
                "--aligner-url",
                up,
            ],
            "are exclusive",
        ),
        (
            &["serve", "--upstream", up, "--aligner-url", up],
            "needs `--aligner-model NAME`",
        ),
        (
            &["serve", "--record", "r.db"],
            "`--record` needs `--upstream URL`",
        ),
        (&["serve"], "missing MODEL"),
        (
            &[
                "serve",
                "--upstream",
                up,
                "--upstream-api-key-env",
                "E2E_PROXY_UNSET_KEY",
                "--aligner-url",
                up,
                "--aligner-model",
                "a",
            ],
            "environment variable `E2E_PROXY_UNSET_KEY`",
        ),
        (
            &[
                "serve",
                "--upstream",
                up,
                "--aligner-url",
                up,
                "--aligner-model",
                "a",
                "--template",
                "aligner-v9",
            ],
            "unknown template `aligner-v9`",
        ),
        (
            &["serve", "--upstream", up, "--aligner", "models/absent.gguf"],
            "`models/absent.gguf` does not exist",
        ),
        // Beyond loopback, a server needs keys: it never lends the upstream's key to anyone.
        (
            &[
                "serve",
                "--upstream",
                up,
                "--aligner-url",
                up,
                "--aligner-model",
                "a",
                "--host",
                "0.0.0.0",
            ],
            "`--host 0.0.0.0` puts the correction proxy on the network with no API key",
        ),
        (
            &["serve", "m.gguf", "--host", "0.0.0.0"],
            "`--host 0.0.0.0` puts this model server on the network",
        ),
        (&["serve", "m.gguf", "--api-key", ""], "an API key is empty"),
    ];
    for (args, want) in cases {
        let o = run(args, d);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
}

/// An Aligner behind a chat-only server (no `/v1/completions`, like most hosted APIs): the
/// default raw endpoint fails with a hint, `--aligner-endpoint chat` sends the rendered template
/// as the user message and the answer is corrected as before, with the template recorded.
#[test]
fn proxy_uses_a_chat_only_aligner_when_asked() {
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig {
        chat_only: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--upstream",
        upstream.base_url.as_str(),
        "--upstream-model",
        "mock-upstream",
        "--aligner-url",
        aligner.base_url.as_str(),
        "--aligner-model",
        "mock-aligner",
        "--record",
        "s.db",
    ];
    let question = "Name a prime number.";
    {
        let p = proxy(dir.path(), &args, &[]);
        let a = post(&p, &chat(question));
        assert_eq!(a.status, 502, "{}", a.body);
        let message = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("404"), "{message}");
        assert!(message.contains("--aligner-endpoint chat"), "{message}");
    }
    let mut with_chat = args.to_vec();
    with_chat.extend(["--aligner-endpoint", "chat"]);
    let p = proxy(dir.path(), &with_chat, &[]);
    let a = post(&p, &chat(question));
    assert_eq!(a.status, 200, "{}", a.body);
    let (answer, correction) = expected(question);
    assert_eq!(a.json()["choices"][0]["message"]["content"], correction);
    assert_eq!(a.json()["aligner"]["original"], answer);
    // The Aligner server saw chat requests only: one failed raw call before, none now.
    let stats = aligner.stats();
    assert_eq!(stats.per_path["/v1/completions"], 0, "{stats:?}");
    assert!(stats.per_path["/v1/chat/completions"] >= 1, "{stats:?}");
    wait_until("the record", Duration::from_secs(30), || {
        scalar(dir.path(), "SELECT count(*) FROM proxy_records") >= 1
    });
    drop(p);
    let rows = sql(
        dir.path(),
        "SELECT template_id, length(template_hash) AS h FROM proxy_records WHERE status = 'corrected'",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["template_id"], "aligner-v1");
    assert_eq!(rows[0]["h"], 64);
}

#[test]
fn proxy_answers_the_openai_python_client() {
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        dir.path(),
        &[
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
        ],
        &[("ALIGNER_API_KEYS", "first-key,e2e-proxy-key")],
    );
    let out = Command::new("python3")
        .arg(repo().join("tests/python/test_proxy_openai.py"))
        .env("ALIGNER_PROXY_BASE_URL", &p.url)
        .env("ALIGNER_PROXY_API_KEY", "e2e-proxy-key")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/python/test_proxy_openai.py failed (it needs `python3 -m pip install openai`; scripts/test.sh installs it):\n{}",
        text(&out)
    );
}

#[test]
fn proxy_corrects_with_a_local_smollm2_aligner() {
    let model = super::serve::smollm2();
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = proxy(
        d,
        &[
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--aligner",
            model.to_str().unwrap(),
            "--aligner-max-tokens",
            "8",
            "--record",
            "s.db",
        ],
        &[],
    );
    let question = "How do I boil an egg?";
    let original = answers::chat_text("mock-upstream", question);
    let a = post(&p, &chat(question));
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    let correction = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!correction.trim().is_empty(), "{v}");
    assert_eq!(
        v["choices"][0]["message"]["aligner_original"],
        original.as_str()
    );
    assert_eq!(v["aligner"]["aligner_model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(v["aligner"]["template"], "aligner-v1");
    let al = &v["usage"]["aligner"]["aligner"];
    assert!(al["prompt_tokens"].as_u64().unwrap() > 20, "{al}");
    let produced = al["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&produced), "{al}");
    // Streamed token by token (greedy): the same correction.
    let mut body = chat(question);
    body["stream"] = json!(true);
    let a = post(&p, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    let (text, finishes, chunks) = streamed(&a);
    assert_eq!(text, correction);
    assert_eq!(finishes.len(), 1);
    assert!(chunks.len() >= 3, "{chunks:?}");
    wait_until("2 records", Duration::from_secs(30), || {
        scalar(d, "SELECT count(*) FROM proxy_records") >= 2
    });
    assert_eq!(
        scalar(d, "SELECT count(DISTINCT correction) FROM proxy_qac"),
        1
    );
}

/// `--aligner-price`: each answer says what its correction cost, and so does its record; a
/// malformed price is refused before the proxy listens.
#[test]
fn proxy_reports_what_each_correction_cost() {
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--upstream",
        upstream.base_url.as_str(),
        "--upstream-model",
        "mock-upstream",
        "--aligner-url",
        aligner.base_url.as_str(),
        "--aligner-model",
        "mock-aligner",
        "--aligner-price",
        "2,8",
        "--record",
        "s.db",
    ];
    let p = proxy(dir.path(), &args, &[]);
    let a = post(&p, &chat("Name a prime number."));
    assert_eq!(a.status, 200, "{}", a.body);
    let al = &a.json()["usage"]["aligner"]["aligner"];
    let (input, output) = (
        al["prompt_tokens"].as_f64().unwrap(),
        al["completion_tokens"].as_f64().unwrap(),
    );
    assert!(input > 0.0 && output > 0.0, "{al}");
    let cost = al["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (input * 2.0 + output * 8.0) / 1e6).abs() < 1e-12,
        "{al}"
    );
    wait_until("the record", Duration::from_secs(30), || {
        scalar(dir.path(), "SELECT count(*) FROM proxy_records") >= 1
    });
    drop(p);
    let rows = sql(
        dir.path(),
        "SELECT aligner_cost_usd, aligner_prompt_tokens, aligner_completion_tokens FROM proxy_records",
    );
    let recorded = rows[0]["aligner_cost_usd"].as_f64().unwrap();
    assert!((recorded - cost).abs() < 1e-12, "{rows:?}");

    let o = run(
        &[
            "serve",
            "--upstream",
            upstream.base_url.as_str(),
            "--aligner-url",
            aligner.base_url.as_str(),
            "--aligner-model",
            "m",
            "--aligner-price",
            "cheap",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("`--aligner-price` must be INPUT,OUTPUT"),
        "{}",
        text(&o)
    );
}

/// `--stream-correction sentence`: the upstream's answer is streamed and each sentence is
/// corrected as soon as it is complete; whole and streamed answers, the record with its
/// steps, an upstream that breaks off mid-answer, and the Python `openai` client.
#[test]
fn sentence_by_sentence_correction_streams_before_the_upstream_finishes() {
    let slow = MockConfig {
        stream_delay: Duration::from_millis(80),
        ..MockConfig::default()
    };
    let upstream = aligner_mockserver::spawn_in_thread(slow.clone());
    let broken = aligner_mockserver::spawn_in_thread(MockConfig {
        cut_stream_after: Some(6),
        ..slow
    });
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let start = |upstream: &str, store: &str| {
        let sub = d.join(store);
        std::fs::create_dir_all(&sub).unwrap();
        proxy(
            &sub,
            &[
                "--upstream",
                upstream,
                "--upstream-model",
                "mock-upstream",
                "--aligner-url",
                &aligner.base_url,
                "--aligner-model",
                "mock-aligner",
                "--stream-correction",
                "sentence",
                "--record",
                "s.db",
            ],
            &[],
        )
    };
    let p = start(&upstream.base_url, "ok");
    let q = "Boil the water. Add the egg. Wait nine minutes. Cool it in cold water.";
    let answer = answers::chat_text("mock-upstream", q);
    let a = post(&p, &chat(q));
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["choices"][0]["message"]["content"], answer.to_uppercase());
    assert_eq!(v["aligner"]["template"], "stream-aligner-v1");
    let mut body = chat(q);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let a = post(&p, &body);
    let (streamed_text, finishes, chunks) = streamed(&a);
    assert_eq!(streamed_text, answer.to_uppercase());
    assert_eq!(finishes, ["stop"]);
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64() > Some(0));
    // n > 1 cannot be corrected as it streams.
    let mut two = chat(q);
    two["n"] = json!(2);
    let a = post(&p, &two);
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.json()["error"]["param"], "n");

    let b = start(&broken.base_url, "broken");
    let out = Command::new("python3")
        .arg(repo().join("tests/python/test_proxy_sentences.py"))
        .env("ALIGNER_PROXY_BASE_URL", &p.url)
        .env("ALIGNER_BROKEN_PROXY_BASE_URL", &b.url)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/python/test_proxy_sentences.py failed:\n{}",
        text(&out)
    );
    // Not streamed, the broken answer is a 502 naming the upstream.
    let a = post(&b, &chat(q));
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "upstream_error");

    // One record per answer, with its steps; the first corrected text came well before the
    // upstream's last word.
    let ok = d.join("ok");
    wait_until("the records", Duration::from_secs(30), || {
        scalar(&ok, "SELECT count(*) FROM proxy_records") >= 3
    });
    let rows = sql(
        &ok,
        "SELECT answer, correction, template_id, sentences, first_correction_ms, upstream_ms,
                upstream_error FROM proxy_records WHERE stream = 1",
    );
    assert!(!rows.is_empty());
    for r in &rows {
        assert_eq!(r["answer"], answer.as_str());
        assert_eq!(r["correction"], answer.to_uppercase().as_str());
        assert_eq!(r["template_id"], "stream-aligner-v1");
        assert!(r["upstream_error"].is_null());
        let steps: Vec<Value> = serde_json::from_str(r["sentences"].as_str().unwrap()).unwrap();
        let sentences: Vec<&str> = steps
            .iter()
            .map(|s| s["sentence"].as_str().unwrap())
            .collect();
        assert_eq!(
            sentences,
            [
                "answer: Boil the water. ",
                "Add the egg. ",
                "Wait nine minutes. ",
                "Cool it in cold water."
            ]
        );
        let (first, upstream) = (
            r["first_correction_ms"].as_f64().unwrap(),
            r["upstream_ms"].as_f64().unwrap(),
        );
        assert!(
            first < upstream / 2.0,
            "first corrected text at {first} ms, upstream done at {upstream} ms"
        );
    }
    let broken_dir = d.join("broken");
    wait_until("the broken records", Duration::from_secs(30), || {
        scalar(&broken_dir, "SELECT count(*) FROM proxy_records") >= 2
    });
    let rows = sql(
        &broken_dir,
        "SELECT answer, correction, upstream_error FROM proxy_records",
    );
    for r in &rows {
        assert_eq!(r["answer"], "answer: Boil the water. Add the");
        assert_eq!(r["correction"], "ANSWER: BOIL THE WATER. ");
        assert!(
            r["upstream_error"]
                .as_str()
                .unwrap()
                .contains("finish_reason"),
            "{r:?}"
        );
    }
    assert_eq!(
        scalar(&broken_dir, "SELECT count(*) FROM proxy_qac"),
        0,
        "partial answers are not Q-A-C data"
    );
}

/// `aligner train-aligner --template stream-aligner-v1` turns each question-answer-correction
/// row into one example per answer sentence and records the template; the proxy corrects with
/// that checkpoint sentence by sentence, and refuses it (or a whole-answer Aligner) in the
/// other mode with a hint.
#[test]
fn a_stream_aligner_trains_from_qac_rows_and_corrects_sentence_by_sentence() {
    let model = super::serve::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = [
        (
            "How do I boil an egg?",
            "Put it in boiling water. Wait nine minutes. Cool it.",
            None,
        ),
        ("What is 2+2?", "It is 4. Easy.", None),
        (
            "How do I pick a lock to break into a house?",
            "Use a tension wrench. Rake the pins.",
            Some("I can't help with breaking in. A locksmith can help with your own lock."),
        ),
    ];
    let data: String = rows
        .iter()
        .map(|(q, a, c)| {
            json!({"question": q, "answer": a, "correction": c.unwrap_or(a)}).to_string() + "\n"
        })
        .collect();
    std::fs::write(d.join("qac.jsonl"), data).unwrap();
    let o = bin()
        .args(["train-aligner", "--data", "qac.jsonl", "--base"])
        .arg(&model)
        .args([
            "--out",
            "ckpt",
            "--template",
            "stream-aligner-v1",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-length",
            "160",
            "--train-layers",
            "1",
            "--warmup-fraction",
            "0",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // 3 + 2 + 2 answer sentences, one example each.
    assert!(
        text(&o).contains("corrections: 7 question-answer-correction rows"),
        "{}",
        text(&o)
    );
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ckpt/aligner.json")).unwrap())
            .unwrap();
    assert_eq!(meta["aligner_template"], "stream-aligner-v1");
    let ckpt = d.join("ckpt");
    let ckpt = ckpt.to_str().unwrap();

    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let base = [
        "serve",
        "--upstream",
        upstream.base_url.as_str(),
        "--upstream-model",
        "mock-upstream",
        "--port",
        "0",
    ];
    // Whole-answer mode with a stream Aligner, and sentence mode with a whole-answer one.
    let o = bin().args(base).args(["--aligner", ckpt]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--stream-correction sentence"),
        "{}",
        text(&o)
    );
    // The same checkpoint recorded as a whole-answer Aligner (as round 0 writes one).
    let whole = d.join("ckpt-whole");
    std::fs::create_dir_all(&whole).unwrap();
    for f in std::fs::read_dir(d.join("ckpt")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, whole.join(f.file_name().unwrap())).unwrap();
    }
    let mut meta = meta.clone();
    meta["aligner_template"] = json!("aligner-v1");
    meta["extra"]["template_text"] = json!(format!(
        "{ALIGNER_V1_PREFIX}{{question}} | {{answer}} ASSISTANT:"
    ));
    std::fs::write(whole.join("aligner.json"), meta.to_string()).unwrap();
    let o = bin()
        .args(base)
        .args(["--stream-correction", "sentence", "--aligner"])
        .arg(&whole)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("train-aligner --template stream-aligner-v1"),
        "{}",
        text(&o)
    );

    let p = proxy(
        d,
        &[
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--aligner",
            ckpt,
            "--stream-correction",
            "sentence",
            "--aligner-max-tokens",
            "12",
            "--record",
            "s.db",
        ],
        &[],
    );
    let a = post(&p, &chat("Say hello. Then say goodbye."));
    assert_eq!(a.status, 200, "{}", a.body);
    wait_until("the record", Duration::from_secs(30), || {
        scalar(d, "SELECT count(*) FROM proxy_records") >= 1
    });
    let rows = sql(d, "SELECT correction, sentences FROM proxy_records");
    let steps: Vec<Value> = serde_json::from_str(rows[0]["sentences"].as_str().unwrap()).unwrap();
    // "answer: Say hello. " and "Then say goodbye.": two steps, each with its own output.
    assert_eq!(steps.len(), 2, "{steps:?}");
    let joined: String = steps
        .iter()
        .map(|s| s["correction"].as_str().unwrap())
        .collect();
    assert_eq!(rows[0]["correction"], joined.as_str());
    assert_eq!(
        a.json()["choices"][0]["message"]["content"],
        joined.as_str()
    );
}

/// `--template aligner-v1-multiturn`: the proxy corrects the last answer in the context of the
/// conversation before it (system messages aside), rendered as `history-v1`.
#[test]
fn proxy_corrects_the_last_answer_with_the_conversation_before_it() {
    let upstream = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let aligner = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        dir.path(),
        &[
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
            "--template",
            "aligner-v1-multiturn",
        ],
        &[],
    );
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Plan a day in Rome."},
            {"role": "assistant", "content": "Morning: the Colosseum.\nAfternoon: the Vatican."},
            {"role": "user", "content": "Make it cheaper."},
        ],
    });
    let a = post(&p, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    let answer = answers::chat_text("mock-upstream", "Make it cheaper.");
    let sent = aligner.last_request_body().unwrap();
    assert_eq!(
        sent["prompt"],
        format!(
            "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless, given the conversation before it.\n[Conversation]\nUser: Plan a day in Rome.\nAssistant: Morning: the Colosseum.\nAfternoon: the Vatican.\n[End of conversation]\nMake it cheaper. | {answer} ASSISTANT:"
        )
    );
    assert_eq!(a.json()["aligner"]["template"], "aligner-v1-multiturn");
    assert_eq!(
        a.json()["choices"][0]["message"]["content"],
        format!("I corrected this: {answer}")
    );
}
