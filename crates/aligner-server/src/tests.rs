//! The routes against a test-double generator, over real HTTP on a loopback port.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aligner_backend::{FinishReason, TextSink};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Answers `echo <prompt words> seed=<seed>`, word by word when streaming; honours `stop` and
/// `max_tokens` (in words). Prompts containing `FAIL` fail for good, `BUSY` transiently, and
/// `LATE-FAIL` after streaming a first word. A streamed `FOREVER` sends words until the call is
/// dropped or its sink closed, then sets `abandoned`.
#[derive(Default)]
struct Double {
    requests: Mutex<Vec<CompletionRequest>>,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

/// Sets its flag when dropped: the generation call ended, however it ended.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Double {
    fn requests(&self) -> Vec<CompletionRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn run(
        &self,
        request: &CompletionRequest,
    ) -> Result<(Vec<String>, Completion), aligner_backend::Error> {
        self.requests.lock().unwrap().push(request.clone());
        let prompt = match &request.prompt {
            Prompt::Raw(s) => s.clone(),
            Prompt::Chat(m) => m
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let fail = |kind, message: &str| aligner_backend::Error {
            kind,
            message: message.into(),
            attempts: 1,
        };
        if prompt.contains("LATE-FAIL") {
            return Err(fail(ErrorKind::Permanent, "the model failed mid-answer"));
        }
        if prompt.contains("FAIL") {
            return Err(fail(ErrorKind::Permanent, "the model exploded"));
        }
        if prompt.contains("BUSY") {
            return Err(fail(ErrorKind::Transient, "the model is busy"));
        }
        let seed = request
            .sampling
            .seed
            .map_or("none".to_string(), |s| s.to_string());
        let full = format!("echo {prompt} seed={seed}");
        let mut words: Vec<String> = full.split_inclusive(' ').map(str::to_string).collect();
        let mut finish = FinishReason::Stop;
        if let Some(max) = request.sampling.max_tokens {
            if words.len() > max as usize {
                words.truncate(max as usize);
                finish = FinishReason::Length;
            }
        }
        let mut text: String = words.concat();
        let cut = request
            .sampling
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(cut) = cut {
            text.truncate(cut);
            finish = FinishReason::Stop;
            let mut kept = Vec::new();
            let mut len = 0;
            for w in words {
                if len >= cut {
                    break;
                }
                let take = (cut - len).min(w.len());
                kept.push(w[..take].to_string());
                len += take;
            }
            words = kept;
        }
        let completion = Completion {
            completion_tokens: Some(words.len() as u32),
            prompt_tokens: Some(prompt.split_whitespace().count() as u32),
            finish_reason: finish,
            text,
            ..completion(0)
        };
        Ok((words, completion))
    }
}

fn completion(tokens: u32) -> Completion {
    Completion {
        text: String::new(),
        finish_reason: FinishReason::Stop,
        model: "double".into(),
        prompt_tokens: Some(tokens),
        completion_tokens: Some(tokens),
        latency: Duration::ZERO,
        attempts: 1,
        replica: None,
    }
}

#[async_trait::async_trait]
impl TextGenerator for Double {
    fn id(&self) -> String {
        "double".into()
    }

    async fn complete(
        &self,
        request: CompletionRequest,
    ) -> Result<Completion, aligner_backend::Error> {
        self.run(&request).map(|(_, c)| c)
    }

    async fn complete_streaming(
        &self,
        request: CompletionRequest,
        sink: TextSink,
    ) -> Result<Completion, aligner_backend::Error> {
        let prompt_text = format!("{:?}", request.prompt);
        if prompt_text.contains("FOREVER") {
            let _guard = SetOnDrop(self.abandoned.clone());
            while sink.send("more ".into()).is_ok() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            return Err(aligner_backend::Error {
                kind: ErrorKind::Permanent,
                message: "nobody is listening".into(),
                attempts: 1,
            });
        }
        if prompt_text.contains("LATE-FAIL") {
            let _ = sink.send("late ".into());
            tokio::task::yield_now().await;
        }
        let (words, completion) = self.run(&request)?;
        for w in words {
            let _ = sink.send(w);
            tokio::task::yield_now().await;
        }
        Ok(completion)
    }
}

struct Server {
    addr: SocketAddr,
    double: Arc<Double>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

async fn start() -> Server {
    start_with(ApiKeys::default()).await
}

async fn start_with(keys: ApiKeys) -> Server {
    let double = Arc::new(Double::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        double.clone(),
        "served".into(),
        listener,
        keys,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        double,
        stop: Some(stop),
        task,
    }
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        assert!(
            self.headers.contains("text/event-stream"),
            "not SSE: {}",
            self.headers
        );
        self.body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    /// The error object of an OpenAI-shaped error body, checked for all four fields.
    fn error(&self) -> serde_json::Map<String, Value> {
        let v = self.json();
        let e = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("no error object: {v}"))
            .clone();
        for key in ["message", "type", "param", "code"] {
            assert!(e.contains_key(key), "error without `{key}`: {v}");
        }
        e
    }
}

/// A minimal HTTP/1.1 client: one request per connection, chunked bodies decoded.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Answer {
    http_with(addr, method, path, body, "").await
}

/// [`http`] with extra header lines (each ending in `\r\n`).
async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> Answer {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut raw))
        .await
        .expect("answer within 20 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("headers end");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(s: &Server, path: &str, body: Value) -> Answer {
    http(s.addr, "POST", path, &body.to_string()).await
}

fn chat_body(content: &str) -> Value {
    json!({"model": "whatever-the-client-says", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]})
}

#[tokio::test]
async fn with_keys_every_route_but_health_needs_one() {
    let keys = ApiKeys::new(vec!["key-one".into(), "key-two".into()], "0.0.0.0", "x").unwrap();
    let s = start_with(keys).await;
    let body = chat_body("hi").to_string();
    for (headers, status) in [
        ("", 401),
        ("Authorization: Bearer wrong\r\n", 401),
        ("Authorization: Basic key-one\r\n", 401),
        ("Authorization: Bearer key-one\r\n", 200),
        ("authorization: bearer key-two\r\n", 200),
    ] {
        let a = http_with(s.addr, "POST", "/v1/chat/completions", &body, headers).await;
        assert_eq!(a.status, status, "{headers:?}: {}", a.body);
        if status == 401 {
            let e = a.error();
            assert_eq!(e["code"], "invalid_api_key", "{e:?}");
            assert!(
                a.headers.contains("www-authenticate: bearer"),
                "{}",
                a.headers
            );
        }
        let m = http_with(s.addr, "GET", "/v1/models", "", headers).await;
        assert_eq!(m.status, status, "{headers:?}");
    }
    // Unknown routes are not revealed without a key; health is open to probes.
    assert_eq!(http(s.addr, "GET", "/v1/nothing", "").await.status, 401);
    assert_eq!(http(s.addr, "GET", "/health", "").await.status, 200);
    // Only the authorized requests reached the model.
    assert_eq!(s.double.requests().len(), 2);
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let s = start().await;
    let a = http(s.addr, "GET", "/v1/models", "").await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "served");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["created"].is_u64());
    assert_eq!(
        http(s.addr, "GET", "/v1/models/served", "").await.json()["id"],
        "served"
    );
    let other = http(s.addr, "GET", "/v1/models/other", "").await;
    assert_eq!(other.status, 404);
    assert_eq!(other.error()["code"], "model_not_found");
    assert_eq!(http(s.addr, "GET", "/health", "").await.status, 200);
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape_and_maps_sampling() {
    let s = start().await;
    let mut body = chat_body("hello there");
    for (k, v) in [
        ("temperature", json!(0.7)),
        ("top_p", json!(0.9)),
        ("top_k", json!(20)),
        ("max_tokens", json!(50)),
        ("frequency_penalty", json!(0.5)),
        ("presence_penalty", json!(-0.5)),
        ("repetition_penalty", json!(1.1)),
        ("seed", json!(7)),
        ("user", json!("ignored")),
    ] {
        body[k] = v;
    }
    let a = post(&s, "/v1/chat/completions", body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].is_u64());
    assert_eq!(
        v["model"], "served",
        "the served name, whatever the client asked for"
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(
        choices[0]["message"]["content"],
        "echo system: be brief user: hello there seed=7"
    );
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 14);

    let req = &s.double.requests()[0];
    assert_eq!(
        req.prompt,
        Prompt::Chat(vec![
            Message::new("system", "be brief"),
            Message::new("user", "hello there")
        ])
    );
    assert_eq!(
        req.sampling,
        Sampling {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(20),
            max_tokens: Some(50),
            frequency_penalty: Some(0.5),
            presence_penalty: Some(-0.5),
            repetition_penalty: Some(1.1),
            seed: Some(7),
            stop: vec![],
        }
    );
    assert_eq!(req.model, None);
}

#[tokio::test]
async fn chat_content_parts_developer_role_and_max_completion_tokens() {
    let s = start().await;
    let body = json!({"messages": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": null},
        {"role": "user", "content": "three"}],
        "max_completion_tokens": 3, "max_tokens": 100, "top_k": -1});
    let a = post(&s, "/v1/chat/completions", body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["choices"][0]["finish_reason"], "length");
    let req = &s.double.requests()[0];
    assert_eq!(
        req.prompt,
        Prompt::Chat(vec![
            Message::new("system", "rules"),
            Message::new("user", "one\ntwo"),
            Message::new("assistant", ""),
            Message::new("user", "three"),
        ])
    );
    assert_eq!(req.sampling.max_tokens, Some(3));
    assert_eq!(req.sampling.top_k, None);
}

#[tokio::test]
async fn completion_takes_a_string_or_a_list_of_prompts() {
    let s = start().await;
    let a = post(
        &s,
        "/v1/completions",
        json!({"prompt": "a raw prompt", "seed": 1}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "served");
    assert_eq!(v["choices"][0]["text"], "echo a raw prompt seed=1");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["total_tokens"], 3 + 5);
    assert_eq!(
        s.double.requests()[0].prompt,
        Prompt::Raw("a raw prompt".into())
    );

    let v = post(
        &s,
        "/v1/completions",
        json!({"prompt": ["first", "second"], "n": 2, "seed": 10}),
    )
    .await
    .json();
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "echo first seed=10",
            "echo first seed=11",
            "echo second seed=10",
            "echo second seed=11"
        ]
    );
    let indexes: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    // Each prompt counted once, every completion counted.
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn n_choices_get_consecutive_seeds() {
    let s = start().await;
    let mut body = chat_body("hi");
    body["n"] = json!(3);
    body["seed"] = json!(100);
    let v = post(&s, "/v1/chat/completions", body).await.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with(&format!("seed={}", 100 + i)));
    }
    let mut seeds: Vec<_> = s
        .double
        .requests()
        .iter()
        .map(|r| r.sampling.seed)
        .collect();
    seeds.sort();
    assert_eq!(seeds, [Some(100), Some(101), Some(102)]);
    let mut body = chat_body("hi");
    body["n"] = json!(2);
    post(&s, "/v1/chat/completions", body).await;
    assert!(s.double.requests()[3..]
        .iter()
        .all(|r| r.sampling.seed.is_none()));
}

#[tokio::test]
async fn stop_takes_a_string_or_a_list() {
    let s = start().await;
    let v = post(
        &s,
        "/v1/completions",
        json!({"prompt": "one two three four", "stop": "three"}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["text"], "echo one two ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v = post(
        &s,
        "/v1/completions",
        json!({"prompt": "one two three four", "stop": ["four", "two", ""]}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["text"], "echo one ");
    let v = post(
        &s,
        "/v1/completions",
        json!({"prompt": "one two", "stop": null}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["text"], "echo one two seed=none");
    let stops: Vec<Vec<String>> = s
        .double
        .requests()
        .iter()
        .map(|r| r.sampling.stop.clone())
        .collect();
    assert_eq!(
        stops,
        [
            vec!["three".to_string()],
            vec!["four".into(), "two".into()],
            vec![]
        ]
    );
}

#[tokio::test]
async fn chat_stream_sends_role_then_content_then_finish_then_done() {
    let s = start().await;
    let whole = post(&s, "/v1/chat/completions", chat_body("stream me please"))
        .await
        .json();
    let mut body = chat_body("stream me please");
    body["stream"] = json!(true);
    let a = post(&s, "/v1/chat/completions", body).await;
    assert_eq!(a.status, 200);
    let events = a.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id, "one id for the whole stream");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "served");
        assert!(c["created"].is_u64());
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        assert!(c.get("usage").is_none(), "usage only when asked for");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    let middle = &chunks[1..chunks.len() - 1];
    assert!(middle.len() > 2, "streamed in pieces: {middle:?}");
    let text: String = middle
        .iter()
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null());
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn chat_stream_with_usage_and_n() {
    let s = start().await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    body["n"] = json!(2);
    body["seed"] = json!(5);
    body["stream_options"] = json!({"include_usage": true});
    let events = post(&s, "/v1/chat/completions", body).await.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 5);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2 * 7);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 5 + 14);
    let mut texts = [String::new(), String::new()];
    let mut finished = [0, 0];
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null());
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finished[i] += 1;
        }
    }
    assert_eq!(finished, [1, 1]);
    assert_eq!(texts[0], "echo system: be brief user: x seed=5");
    assert_eq!(texts[1], "echo system: be brief user: x seed=6");
}

#[tokio::test]
async fn completion_stream_sends_text_chunks() {
    let s = start().await;
    let body = json!({"prompt": "a b c d", "stream": true, "max_tokens": 3});
    let events = post(&s, "/v1/completions", body).await.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c["model"] == "served"));
    assert!(chunks[0]["id"].as_str().unwrap().starts_with("cmpl-"));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo a b ");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["text"], "");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
}

/// Checks a 400 names `param` in its message and `param` field.
async fn check_400(s: &Server, path: &str, body: &str, param: Option<&str>, says: &str) {
    let a = http(s.addr, "POST", path, body).await;
    assert_eq!(a.status, 400, "{body} -> {}", a.body);
    let e = a.error();
    assert_eq!(e["type"], "invalid_request_error");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(says),
        "{body}: message {message:?} lacks {says:?}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
        assert!(
            message.contains(&format!("`{p}`")),
            "{body}: message {message:?} does not name `{p}`"
        );
    }
}

#[tokio::test]
async fn bad_requests_are_400s_naming_the_field() {
    let s = start().await;
    let chat = "/v1/chat/completions";
    let text = "/v1/completions";
    check_400(&s, chat, "{not json", None, "not valid JSON").await;
    check_400(&s, chat, "[1, 2]", None, "JSON object").await;
    check_400(&s, chat, "{}", Some("messages"), "missing").await;
    check_400(
        &s,
        chat,
        r#"{"messages": []}"#,
        Some("messages"),
        "non-empty",
    )
    .await;
    check_400(
        &s,
        chat,
        r#"{"messages": [{"content": "x"}]}"#,
        Some("messages[0].role"),
        "required",
    )
    .await;
    check_400(
        &s,
        chat,
        r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
        Some("messages[0].role"),
        "`robot`",
    )
    .await;
    check_400(
        &s,
        chat,
        r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
        Some("messages[0].role"),
        "not supported",
    )
    .await;
    check_400(
        &s,
        chat,
        r#"{"messages": [{"role": "user", "content": 3}]}"#,
        Some("messages[0].content"),
        "string",
    )
    .await;
    check_400(
        &s,
        chat,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
        Some("messages[0].content[0]"),
        "image_url",
    )
    .await;
    let m = r#""messages": [{"role": "user", "content": "x"}]"#;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"temperature\": 3}}"),
        Some("temperature"),
        "between 0 and 2",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"temperature\": \"hot\"}}"),
        Some("temperature"),
        "invalid type",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"top_p\": 0}}"),
        Some("top_p"),
        "(0, 1]",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"top_k\": -5}}"),
        Some("top_k"),
        "positive",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"seed\": -1}}"),
        Some("seed"),
        "-1",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"max_tokens\": 0}}"),
        Some("max_tokens"),
        "at least 1",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"n\": 0}}"),
        Some("n"),
        "between 1",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"stop\": 5}}"),
        Some("stop"),
        "list of strings",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"stop\": [\"a\", 1]}}"),
        Some("stop"),
        "list of strings",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"frequency_penalty\": 9}}"),
        Some("frequency_penalty"),
        "between -2 and 2",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"repetition_penalty\": 0}}"),
        Some("repetition_penalty"),
        "greater than 0",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"logprobs\": true}}"),
        Some("logprobs"),
        "not supported",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"tools\": [{{\"type\": \"function\"}}]}}"),
        Some("tools"),
        "tool calling",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"response_format\": {{\"type\": \"json_object\"}}}}"),
        Some("response_format"),
        "text",
    )
    .await;
    check_400(
        &s,
        chat,
        &format!("{{{m}, \"stream\": \"yes\"}}"),
        Some("stream"),
        "invalid type",
    )
    .await;
    check_400(&s, text, "{}", Some("prompt"), "missing").await;
    check_400(
        &s,
        text,
        r#"{"prompt": [1, 2, 3]}"#,
        Some("prompt"),
        "token-id",
    )
    .await;
    check_400(&s, text, r#"{"prompt": []}"#, Some("prompt"), "non-empty").await;
    check_400(
        &s,
        text,
        r#"{"prompt": "x", "echo": true}"#,
        Some("echo"),
        "not supported",
    )
    .await;
    check_400(
        &s,
        text,
        r#"{"prompt": "x", "n": 2, "best_of": 3}"#,
        Some("best_of"),
        "not supported",
    )
    .await;
    check_400(
        &s,
        text,
        r#"{"prompt": "x", "logprobs": 2}"#,
        Some("logprobs"),
        "not supported",
    )
    .await;
    // Explicit defaults are fine.
    let ok = r#"{"prompt": "x", "logprobs": null, "echo": false, "suffix": "", "best_of": 1, "logit_bias": {}, "response_format": {"type": "text"}}"#;
    assert_eq!(http(s.addr, "POST", text, ok).await.status, 200);
    assert!(
        s.double.requests().len() == 1,
        "no bad request reached the backend"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_openai_errors() {
    let s = start().await;
    let a = http(s.addr, "POST", "/v1/embeddings", "{}").await;
    assert_eq!(a.status, 404);
    let e = a.error();
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("`POST /v1/embeddings`"));
    let a = http(s.addr, "GET", "/v1/chat/completions", "").await;
    assert_eq!(a.status, 405);
    assert!(a.error()["message"].as_str().unwrap().contains("`GET`"));
}

#[tokio::test]
async fn backend_failures_are_500_or_503_with_the_backend_message() {
    let s = start().await;
    let a = post(&s, "/v1/chat/completions", chat_body("FAIL now")).await;
    assert_eq!(a.status, 500);
    let e = a.error();
    assert_eq!(e["type"], "server_error");
    assert_eq!(e["message"], "the model exploded");
    let a = post(&s, "/v1/completions", json!({"prompt": "BUSY now"})).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.error()["message"], "the model is busy");
    // Streaming: a failure before the first piece is still a plain error answer.
    let a = post(
        &s,
        "/v1/completions",
        json!({"prompt": "FAIL", "stream": true}),
    )
    .await;
    assert_eq!(a.status, 500);
    assert_eq!(a.error()["message"], "the model exploded");
    // After the first piece the headers are sent: the error arrives as an event.
    let a = post(
        &s,
        "/v1/completions",
        json!({"prompt": "LATE-FAIL", "stream": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    let events = a.events();
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["message"], "the model failed mid-answer");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_streaming_client_that_goes_away_stops_its_generation() {
    let s = start().await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let body = json!({"prompt": "FOREVER", "stream": true}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    assert!(!s.double.abandoned.load(Ordering::SeqCst));
    drop(conn);
    let start = Instant::now();
    while !s.double.abandoned.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "generation still running 10 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let mut s = start().await;
    assert_eq!(http(s.addr, "GET", "/v1/models", "").await.status, 200);
    s.stop.take().unwrap().send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("stops in time");
    result.unwrap().unwrap();
    // Not checked: that connecting now fails. Tests run in parallel and another test's
    // listener may be given the port this one just released.
}

#[test]
fn model_argument_resolves_to_a_local_source() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("Tiny-Model.Q4_0.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let (spec, name) = model_spec(gguf.to_str().unwrap()).unwrap();
    assert!(
        matches!(spec.source, LocalSource::Gguf { ref path, architecture: None } if path.ends_with("Tiny-Model.Q4_0.gguf"))
    );
    assert_eq!(name, "Tiny-Model.Q4_0");
    assert_eq!(spec.dtype, "auto");
    let folder = dir.path().join("my-model");
    std::fs::create_dir(&folder).unwrap();
    let (spec, name) = model_spec(folder.to_str().unwrap()).unwrap();
    assert!(matches!(spec.source, LocalSource::HfFolder { .. }));
    assert_eq!(name, "my-model");
    let (spec, name) = model_spec("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    assert_eq!(
        spec.source,
        LocalSource::HubId {
            id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            revision: None
        }
    );
    assert_eq!(name, "HuggingFaceTB/SmolLM2-135M-Instruct");
    let missing = dir.path().join("nope.gguf");
    let err = model_spec(missing.to_str().unwrap()).unwrap_err();
    assert!(err.downcast_ref::<Invalid>().is_some(), "exit code 2");
    let message = err.to_string();
    assert!(
        message.contains(&format!("`{}`", missing.display())),
        "{message}"
    );
    assert!(message.contains("aligner models fetch"), "{message}");
    assert!(model_spec("models/not-here.gguf").is_err());
    assert!(model_spec("a/b/c").is_err());
}

/// The official `openai` Python client against the server (with the test double).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_works_with_the_server() {
    let s = start().await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_serve_openai.py");
    let start = Instant::now();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("ALIGNER_SERVE_BASE_URL", format!("http://{}/v1", s.addr))
        .env("ALIGNER_SERVE_MODEL", "served")
        .output()
        .await
        .expect("python3 runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "tests/python/test_serve_openai.py failed (it needs `python3 -m pip install openai`; scripts/test.sh installs it):\n{log}"
    );
    assert!(start.elapsed() < Duration::from_secs(120));
}
