//! End-to-end tests of the OpenAI backend against the loopback mock server.

use std::time::{Duration, Instant};

use aligner_backend::{
    CompletionRequest, ErrorKind, FinishReason, Message, Prompt, Sampling, TextGenerator,
};
use aligner_mockserver::{Fault, MockConfig, MockServer};
use aligner_openai::{Config, OpenAiBackend};

const CORRECTION: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: What is 2+2? | It is 4. ASSISTANT:";

async fn start_server(config: MockConfig) -> MockServer {
    MockServer::start(config).await.expect("mock server starts")
}

/// A backend with fast backoff so retry tests stay quick.
fn make_backend(server: &MockServer, tweak: impl FnOnce(&mut Config)) -> OpenAiBackend {
    let mut config = Config::new(&server.base_url, "mock-model");
    config.backoff_base = Duration::from_millis(5);
    config.timeout = Duration::from_secs(10);
    config.max_retries = 3;
    tweak(&mut config);
    OpenAiBackend::new(config).expect("valid config")
}

fn chat(text: &str) -> CompletionRequest {
    CompletionRequest {
        prompt: Prompt::Chat(vec![
            Message::new("system", "be brief"),
            Message::new("user", text),
        ]),
        sampling: Sampling::default(),
        model: None,
    }
}

fn raw(prompt: &str) -> CompletionRequest {
    CompletionRequest {
        prompt: Prompt::Raw(prompt.into()),
        sampling: Sampling::default(),
        model: None,
    }
}

#[tokio::test]
async fn chat_round_trip() {
    let server = start_server(MockConfig::default()).await;
    let backend = make_backend(&server, |_| {});
    let c = backend.complete(chat("hello there")).await.unwrap();
    assert_eq!(c.text, "answer: hello there");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.model, "mock-model");
    assert_eq!(c.prompt_tokens, Some(4));
    assert_eq!(c.completion_tokens, Some(3));
    assert_eq!(c.attempts, 1);
    assert!(c.latency > Duration::ZERO);

    // A per-request model override reaches the server (checkpoint names get a prefix).
    let mut req = chat("one two three four");
    req.model = Some("policy-ckpt-2".into());
    req.sampling.max_tokens = Some(3);
    let c = backend.complete(req).await.unwrap();
    assert_eq!(c.text, "[policy-ckpt-2] answer: one");
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.model, "policy-ckpt-2");

    let s = server.stats();
    assert_eq!(s.per_path["/v1/chat/completions"], 2);
    assert_eq!(s.per_model["mock-model"], 1);
    assert_eq!(s.per_model["policy-ckpt-2"], 1);
    assert_eq!(backend.stats().requests, 2);
    assert_eq!(backend.stats().succeeded, 2);
    assert_eq!(
        backend.id(),
        format!("openai:{}#mock-model", server.base_url)
    );
}

#[tokio::test]
async fn raw_completion_round_trip() {
    let server = start_server(MockConfig::default()).await;
    let backend = make_backend(&server, |_| {});
    let c = backend.complete(raw(CORRECTION)).await.unwrap();
    assert_eq!(c.text, "I corrected this: It is 4.");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    let copy = CORRECTION.replace("What is", "COPY What is");
    assert_eq!(backend.complete(raw(&copy)).await.unwrap().text, "It is 4.");
    assert_eq!(server.stats().per_path["/v1/completions"], 2);
}

#[tokio::test]
async fn a_chat_only_server_gets_raw_prompts_as_chat_when_asked() {
    let server = start_server(MockConfig {
        chat_only: true,
        ..Default::default()
    })
    .await;
    // Raw completions: the server has none, and the error says what to set.
    let e = make_backend(&server, |_| {})
        .complete(raw(CORRECTION))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(e.attempts, 1, "a missing endpoint is not retried");
    assert!(e.message.contains("404"), "{}", e.message);
    assert!(e.message.contains("raw_endpoint: chat"), "{}", e.message);
    // `raw_as_chat`: the rendered template is the one user message of a chat request.
    let backend = make_backend(&server, |c| c.raw_as_chat = true);
    let c = backend.complete(raw(CORRECTION)).await.unwrap();
    assert_eq!(c.text, "I corrected this: It is 4.");
    let body = server.last_request_body().unwrap();
    assert_eq!(
        body["messages"],
        serde_json::json!([{"role": "user", "content": CORRECTION}])
    );
    assert!(body.get("prompt").is_none(), "{body}");
    // Chat prompts are unchanged.
    assert_eq!(
        backend.complete(chat("hello")).await.unwrap().text,
        "answer: hello"
    );
    let s = server.stats();
    assert_eq!(s.per_path["/v1/chat/completions"], 2);
    assert_eq!(s.per_path["other"], 1);
}

#[tokio::test]
async fn sampling_fields_reach_the_server() {
    let server = start_server(MockConfig::default()).await;
    let backend = make_backend(&server, |_| {});
    let mut req = raw(CORRECTION);
    req.sampling = Sampling {
        temperature: Some(0.7),
        top_p: Some(0.95),
        top_k: Some(50),
        max_tokens: Some(128),
        frequency_penalty: Some(0.5),
        presence_penalty: Some(0.25),
        repetition_penalty: Some(1.05),
        seed: Some(42),
        stop: vec!["</s>".into()],
    };
    backend.complete(req).await.unwrap();
    let body = server.last_request_body().unwrap();
    assert_eq!(body["model"], "mock-model");
    assert_eq!(body["prompt"], CORRECTION);
    assert_eq!(body["temperature"], 0.7);
    assert_eq!(body["top_p"], 0.95);
    assert_eq!(body["top_k"], 50);
    assert_eq!(body["max_tokens"], 128);
    assert_eq!(body["frequency_penalty"], 0.5);
    assert_eq!(body["presence_penalty"], 0.25);
    assert_eq!(body["repetition_penalty"], 1.05);
    assert_eq!(body["seed"], 42);
    assert_eq!(body["stop"], serde_json::json!(["</s>"]));
    assert_eq!(body["n"], 1);
    assert_eq!(body["stream"], false);

    backend.complete(chat("hi")).await.unwrap();
    let body = server.last_request_body().unwrap();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}"); // model, messages, n, stream
    assert_eq!(
        body["messages"][1],
        serde_json::json!({"role": "user", "content": "hi"})
    );
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let server = start_server(MockConfig {
        script: vec![Fault::TooManyRequests],
        retry_after_secs: Some(1),
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |_| {});
    let start = Instant::now();
    let c = backend.complete(chat("x")).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(c.attempts, 2);
    let s = backend.stats();
    assert_eq!((s.requests, s.retries, s.status_429), (2, 1, 1));
    assert_eq!(server.stats().faults.status_429, 1);
}

#[tokio::test]
async fn server_errors_are_retried() {
    let server = start_server(MockConfig {
        script: vec![Fault::ServerError, Fault::Status(503), Fault::Status(408)],
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |_| {});
    let c = backend.complete(chat("x")).await.unwrap();
    assert_eq!(c.attempts, 4);
    let s = backend.stats();
    assert_eq!((s.retries, s.status_5xx), (3, 2));
}

#[tokio::test]
async fn persistent_failure_is_transient_after_retries() {
    let server = start_server(MockConfig {
        fail_prompts_containing: Some("POISON".into()),
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |c| c.max_retries = 2);
    let err = backend
        .complete(raw("q | POISON answer ASSISTANT:"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient);
    assert_eq!(err.attempts, 3);
    assert!(err.message.contains("500"), "{}", err.message);
    assert_eq!(server.stats().faults.forced_500, 3);
    assert_eq!(backend.stats().failed, 1);
    // Other prompts are unaffected.
    assert!(backend.complete(raw(CORRECTION)).await.is_ok());
}

#[tokio::test]
async fn bad_request_is_permanent_at_once() {
    let server = start_server(MockConfig::default()).await;
    let backend = make_backend(&server, |_| {});
    let mut req = chat("x");
    req.sampling.temperature = Some(5.0); // the mock, like OpenAI, rejects this with 400
    let err = backend.complete(req).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.attempts, 1);
    assert!(
        err.message.contains("400") && err.message.contains("temperature"),
        "{}",
        err.message
    );
    assert_eq!(server.stats().requests, 1);
}

#[tokio::test]
async fn wrong_base_url_gets_a_hint() {
    let server = start_server(MockConfig::default()).await;
    let base = server.base_url.trim_end_matches("/v1").to_string();
    let backend = OpenAiBackend::new(Config::new(base, "m")).unwrap();
    let err = backend.complete(chat("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(
        err.message.contains("404") && err.message.contains("/v1"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn timeouts_are_retried() {
    let server = start_server(MockConfig {
        script: vec![Fault::Timeout],
        timeout_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |c| c.timeout = Duration::from_millis(300));
    let c = backend.complete(chat("slow")).await.unwrap();
    assert_eq!(c.attempts, 2);
    assert_eq!(c.text, "answer: slow");
    assert_eq!(backend.stats().timeouts, 1);
}

#[tokio::test]
async fn malformed_responses_are_retried_then_reported() {
    let server = start_server(MockConfig {
        p_malformed: 1.0,
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |c| c.max_retries = 3);
    let err = backend.complete(chat("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient);
    assert_eq!(err.attempts, 4);
    assert!(err.message.contains("malformed"), "{}", err.message);
    assert_eq!(backend.stats().malformed, 4);
    assert_eq!(server.stats().faults.malformed, 4);

    // All three malformed shapes, then a good answer.
    let server = server_with_script(vec![Fault::Malformed; 3]).await;
    let backend = make_backend(&server, |_| {});
    let c = backend.complete(raw(CORRECTION)).await.unwrap();
    assert_eq!(c.attempts, 4);
    assert_eq!(backend.stats().malformed, 3);
}

async fn server_with_script(script: Vec<Fault>) -> MockServer {
    start_server(MockConfig {
        script,
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn connection_errors_are_retried() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut config = Config::new(format!("http://127.0.0.1:{port}/v1"), "m");
    config.backoff_base = Duration::from_millis(5);
    config.max_retries = 1;
    let backend = OpenAiBackend::new(config).unwrap();
    let err = backend.complete(chat("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient);
    assert_eq!(err.attempts, 2);
    assert_eq!(backend.stats().conn_errors, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let server = start_server(MockConfig {
        latency: Duration::from_millis(40),
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |c| c.max_concurrency = 3);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..15 {
        let b = backend.clone();
        set.spawn(async move { b.complete(chat(&format!("q{i}"))).await });
    }
    for r in set.join_all().await {
        r.unwrap();
    }
    let s = server.stats();
    assert_eq!(s.ok, 15);
    assert_eq!(s.in_flight, 0);
    assert!(s.max_in_flight <= 3, "{}", s.max_in_flight);
    assert!(s.max_in_flight >= 2, "{}", s.max_in_flight);
}

#[tokio::test]
async fn api_key_is_sent_and_never_leaked() {
    let server = start_server(MockConfig {
        api_key: Some("sk-right-0001".into()),
        ..Default::default()
    })
    .await;
    let good = make_backend(&server, |c| c.api_key = Some("sk-right-0001".into()));
    assert!(good.complete(chat("x")).await.is_ok());

    let bad = make_backend(&server, |c| c.api_key = Some("sk-wrong-9999".into()));
    let err = bad.complete(chat("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.attempts, 1);
    assert!(err.message.contains("401"), "{}", err.message);
    assert!(err.message.contains("API key"), "{}", err.message);
    assert!(!err.message.contains("sk-wrong-9999"));
    assert!(!err.to_string().contains("sk-wrong-9999"));
    assert!(!format!("{err:?}").contains("sk-wrong-9999"));

    let none = make_backend(&server, |_| {});
    let err = none.complete(chat("x")).await.unwrap_err();
    assert!(err.message.contains("no key is set"), "{}", err.message);
    assert_eq!(server.stats().faults.unauthorized, 2);
}

#[tokio::test]
async fn seeded_faults_mixed_all_succeed_with_enough_retries() {
    let server = start_server(MockConfig {
        seed: 11,
        p_429: 0.15,
        p_500: 0.15,
        p_malformed: 0.1,
        ..Default::default()
    })
    .await;
    let backend = make_backend(&server, |c| {
        c.max_retries = 12;
        c.backoff_base = Duration::from_millis(1);
    });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let b = backend.clone();
        set.spawn(async move { b.complete(raw(&format!("q{i} | a{i} ASSISTANT:"))).await });
    }
    let results = set.join_all().await;
    assert!(results.iter().all(Result::is_ok));
    let s = backend.stats();
    let f = server.stats().faults;
    assert_eq!(s.status_429, f.status_429);
    assert_eq!(s.status_5xx, f.status_500);
    assert_eq!(s.malformed, f.malformed);
    assert_eq!(s.retries, f.status_429 + f.status_500 + f.malformed);
    assert_eq!(s.requests, 100 + s.retries);
}

/// `complete_streaming` asks for a stream and hands each piece on as it arrives: the first
/// piece comes long before the whole answer, and the pieces add up to the answer.
#[tokio::test]
async fn a_streamed_answer_arrives_piece_by_piece() {
    let server = start_server(MockConfig {
        stream_delay: Duration::from_millis(40),
        ..MockConfig::default()
    })
    .await;
    let backend = make_backend(&server, |_| {});
    let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let call = tokio::spawn(async move {
        backend
            .complete_streaming(chat("one two three four five six"), sink)
            .await
    });
    let first = pieces.recv().await.unwrap();
    let first_at = start.elapsed();
    let c = call.await.unwrap().unwrap();
    let mut text = first;
    while let Ok(p) = pieces.try_recv() {
        text.push_str(&p);
    }
    assert_eq!(text, "answer: one two three four five six");
    assert_eq!(c.text, text);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!((c.prompt_tokens, c.completion_tokens), (Some(8), Some(7)));
    assert!(
        first_at * 3 < c.latency,
        "first piece at {first_at:?}, whole answer at {:?}",
        c.latency
    );
    let body = server.last_request_body().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
}

/// A stream that breaks after its first pieces fails (no retry: the pieces are out), naming
/// how far it got; one that breaks before any piece is retried like any failed call.
#[tokio::test]
async fn a_stream_that_breaks_midway_fails_without_a_retry() {
    let server = start_server(MockConfig {
        cut_stream_after: Some(3),
        ..MockConfig::default()
    })
    .await;
    let backend = make_backend(&server, |_| {});
    let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel();
    let e = backend
        .complete_streaming(chat("one two three four five six"), sink)
        .await
        .unwrap_err();
    assert!(e.message.contains("without a finish_reason"), "{e}");
    assert_eq!(e.attempts, 1, "{e}");
    let mut sent = String::new();
    while let Ok(p) = pieces.try_recv() {
        sent.push_str(&p);
    }
    assert_eq!(sent, "answer: one two");
    assert_eq!(server.stats().per_path["/v1/chat/completions"], 1);
}
