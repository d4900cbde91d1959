//! The axum routes: request parsing, fault injection and the deterministic answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use crate::answers;
use crate::{bump, Fault, Shared, PATH_CHAT, PATH_COMPLETIONS, PATH_MODELS};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new().route(PATH_CHAT, post(chat));
    if !shared.config.chat_only {
        router = router.route(PATH_COMPLETIONS, post(completions));
    }
    router
        .route(PATH_MODELS, get(models))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/update_weights_from_disk", post(update_weights))
        .route("/get_model_info", get(model_info))
        .fallback(not_found)
        .with_state(shared)
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    prompt: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
}

/// Counts a completion request as in flight while alive (also when the client goes away).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared
            .counters
            .max_in_flight
            .fetch_max(now, Ordering::Relaxed);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn error_response(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

fn bad_request(shared: &Shared, message: &str) -> Response {
    bump(&shared.counters.f_bad_request);
    error_response(StatusCode::BAD_REQUEST, message, "invalid_request_error")
}

/// 401 unless the configured key was sent. The body never echoes what was sent.
fn check_auth(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let expected = shared.expected_auth.as_deref()?;
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if sent == Some(expected) {
        return None;
    }
    bump(&shared.counters.f_unauthorized);
    Some(error_response(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided (mock server).",
        "invalid_request_error",
    ))
}

fn count_model(shared: &Shared, model: Option<&str>) {
    let model = model.unwrap_or("");
    let mut map = shared.per_model.lock().unwrap_or_else(|e| e.into_inner());
    match map.get_mut(model) {
        Some(c) => *c += 1,
        None => {
            map.insert(model.to_string(), 1);
        }
    }
}

fn temperature_ok(t: Option<f64>) -> bool {
    t.is_none_or(|t| (0.0..=2.0).contains(&t))
}

/// Applies the configured failure for this request, if any. `Ok(())` means "answer" (after any
/// timeout delay has passed); `Err` is the response to send instead of an answer.
async fn inject(shared: &Shared, poisoned: bool) -> Result<(), Response> {
    let c = &shared.counters;
    if poisoned {
        bump(&c.f_forced);
        return Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error processing this prompt (mock: forced failure).",
            "server_error",
        ));
    }
    let Some(fault) = shared.pick_fault() else {
        return Ok(());
    };
    match fault {
        Fault::TooManyRequests => {
            bump(&c.f_429);
            let mut resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached (mock).",
                "rate_limit_exceeded",
            );
            if let Some(secs) = shared.config.retry_after_secs {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Err(resp)
        }
        Fault::ServerError => {
            bump(&c.f_500);
            Err(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error while processing your request (mock).",
                "server_error",
            ))
        }
        Fault::Status(code) => {
            bump(&c.f_other);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Err(error_response(
                status,
                "Injected status (mock).",
                "mock_error",
            ))
        }
        Fault::Timeout => {
            bump(&c.f_timeout);
            tokio::time::sleep(shared.config.timeout_delay).await;
            Ok(())
        }
        Fault::Malformed => {
            let n = c.f_malformed.fetch_add(1, Ordering::Relaxed);
            let (ctype, body): (&'static str, &'static str) = match n % 3 {
                0 => (
                    "application/json",
                    r#"{"id":"mock-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"trunc"#,
                ),
                1 => (
                    "application/json",
                    r#"{"id":"mock-1","object":"chat.completion","created":0,"model":"mock"}"#,
                ),
                _ => (
                    "text/html",
                    "<html><body>502 Bad Gateway (mock proxy)</body></html>",
                ),
            };
            Err((StatusCode::OK, [(header::CONTENT_TYPE, ctype)], body).into_response())
        }
    }
}

async fn ok_latency(shared: &Shared) {
    // A server at capacity makes the request wait for a slot, then answer in `latency`.
    let _slot = match &shared.slots {
        Some(s) => s.acquire().await.ok(),
        None => None,
    };
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
}

fn contains_poison(shared: &Shared, text: &str) -> bool {
    shared
        .config
        .fail_prompts_containing
        .as_deref()
        .is_some_and(|p| text.contains(p))
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let shared = &*shared;
    bump(&shared.counters.requests);
    bump(&shared.counters.chat);
    let _guard = InFlight::enter(shared);
    if let Some(resp) = check_auth(shared, &headers) {
        return resp;
    }
    let req: ChatBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(shared, &format!("Invalid chat request body: {e}")),
    };
    *shared.last_body.lock().unwrap_or_else(|e| e.into_inner()) = Some(body.clone());
    shared
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(body.clone());
    if !temperature_ok(req.temperature) {
        return bad_request(shared, "temperature must be between 0 and 2");
    }
    count_model(shared, req.model.as_deref());
    let poisoned = req.messages.iter().any(|m| {
        m.content
            .as_deref()
            .is_some_and(|c| contains_poison(shared, c))
    });
    if let Err(resp) = inject(shared, poisoned).await {
        return resp;
    }
    ok_latency(shared).await;

    let model = req.model.as_deref().unwrap_or("mock");
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .or(req.messages.last())
        .and_then(|m| m.content.as_deref())
        .unwrap_or("");
    let judging = req.messages.iter().any(|m| {
        m.content
            .as_deref()
            .is_some_and(|c| c.contains(answers::JUDGE_MARKER))
    });
    let reply = if judging {
        answers::judge_text(last_user)
    } else if last_user.starts_with(answers::ALIGNER_MARKER) {
        // An Aligner's rendered template sent as a chat message (`raw_endpoint: chat`):
        // answered as `/v1/completions` answers it.
        answers::correction_text(last_user)
    } else {
        answers::chat_text(model, last_user)
    };
    let (text, finish) = answers::apply_max_tokens(reply, req.max_tokens);
    let prompt_tokens: u64 = req
        .messages
        .iter()
        .map(|m| m.content.as_deref().map_or(0, answers::word_count))
        .sum();
    let completion_tokens = answers::word_count(&text);
    bump(&shared.counters.ok);
    if req.stream == Some(true) {
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens});
        return stream_chat(shared, model, &text, finish, usage);
    }
    axum::Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// A chat answer as server-sent events: one word (with the spaces before it) per chunk,
/// `stream_delay` apart, then the finish reason, usage and `[DONE]`; with `cut_stream_after`,
/// the body ends after that many words, with neither.
fn stream_chat(
    shared: &Shared,
    model: &str,
    text: &str,
    finish: &str,
    usage: serde_json::Value,
) -> Response {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut pieces: Vec<String> = Vec::new();
    let (mut piece, mut in_word) = (String::new(), false);
    for c in text.chars() {
        if c.is_whitespace() && in_word {
            pieces.push(std::mem::take(&mut piece));
            in_word = false;
        }
        in_word |= !c.is_whitespace();
        piece.push(c);
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    let cut = shared.config.cut_stream_after;
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    let words = pieces.len().min(cut.unwrap_or(usize::MAX));
    events.extend(
        pieces[..words]
            .iter()
            .map(|p| chunk(json!({"content": p}), None)),
    );
    let whole = cut.is_none_or(|n| n >= pieces.len());
    if whole {
        events.push(chunk(json!({}), Some(finish)));
        let mut last = chunk(json!({}), None);
        last["choices"] = json!([]);
        last["usage"] = usage;
        events.push(last);
    }
    let mut lines: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    if whole {
        lines.push("data: [DONE]\n\n".to_string());
    }
    let delay = shared.config.stream_delay;
    let body = futures::stream::unfold(lines.into_iter(), move |mut it| async move {
        let line = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::convert::Infallible>(line), it))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(axum::body::Body::from_stream(body))
        .expect("a streamed response builds")
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &*shared;
    bump(&shared.counters.requests);
    bump(&shared.counters.completions);
    let _guard = InFlight::enter(shared);
    if let Some(resp) = check_auth(shared, &headers) {
        return resp;
    }
    let req: CompletionBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(shared, &format!("Invalid completion request body: {e}")),
    };
    *shared.last_body.lock().unwrap_or_else(|e| e.into_inner()) = Some(body.clone());
    shared
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(body.clone());
    if !temperature_ok(req.temperature) {
        return bad_request(shared, "temperature must be between 0 and 2");
    }
    count_model(shared, req.model.as_deref());
    let poisoned = contains_poison(shared, &req.prompt);
    if let Err(resp) = inject(shared, poisoned).await {
        return resp;
    }
    ok_latency(shared).await;

    let model = req.model.as_deref().unwrap_or("mock");
    let (text, finish) =
        answers::apply_max_tokens(answers::correction_text(&req.prompt), req.max_tokens);
    let prompt_tokens = answers::word_count(&req.prompt);
    let completion_tokens = answers::word_count(&text);
    bump(&shared.counters.ok);
    axum::Json(json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    bump(&shared.counters.requests);
    bump(&shared.counters.models);
    if let Some(resp) = check_auth(&shared, &headers) {
        return resp;
    }
    let mut data = vec![
        json!({"id": "mock", "object": "model", "created": 0, "owned_by": "aligner-mockserver"}),
    ];
    for (name, _) in shared
        .adapters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        data.push(json!({"id": name, "object": "model", "created": 0, "owned_by": "aligner-mockserver", "parent": "mock"}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// vLLM's runtime LoRA loading: the adapter's name is served from now on. A path that is not
/// a folder is refused as vLLM refuses it.
async fn load_lora_adapter(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    bump(&shared.counters.requests);
    bump(&shared.counters.other);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (Some(name), Some(path)) = (v["lora_name"].as_str(), v["lora_path"].as_str()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "lora_name and lora_path are required",
            "invalid_request_error",
        );
    };
    if let Some(message) = &shared.config.refuse_lora {
        return error_response(StatusCode::BAD_REQUEST, message, "invalid_request_error");
    }
    if !std::path::Path::new(path).is_dir() {
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("Loading lora {name} failed: No adapter found for {path}"),
            "invalid_request_error",
        );
    }
    let mut adapters = shared.adapters.lock().unwrap_or_else(|e| e.into_inner());
    if adapters.iter().any(|(n, _)| n == name) {
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("The lora adapter '{name}' has already been loaded."),
            "invalid_request_error",
        );
    }
    adapters.push((name.to_string(), path.to_string()));
    format!("Success: LoRA adapter '{name}' added successfully.").into_response()
}

/// SGLang's in-place weight update.
async fn update_weights(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    bump(&shared.counters.requests);
    bump(&shared.counters.other);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(path) = v["model_path"].as_str() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "model_path is required",
            "invalid_request_error",
        );
    };
    if !std::path::Path::new(path).is_dir() {
        return axum::Json(json!({"success": false, "message": format!("Failed to get weights iterator: {path} is not a model folder.")})).into_response();
    }
    *shared.weights.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_string());
    axum::Json(json!({"success": true, "message": "Succeeded to update model weights."}))
        .into_response()
}

async fn model_info(State(shared): State<Arc<Shared>>) -> Response {
    bump(&shared.counters.requests);
    bump(&shared.counters.other);
    let path = shared
        .weights
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    axum::Json(json!({"model_path": path.unwrap_or_else(|| "mock".into()), "is_generation": true}))
        .into_response()
}

async fn not_found(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    bump(&shared.counters.requests);
    bump(&shared.counters.other);
    bump(&shared.counters.f_not_found);
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Unknown path {} (mock server serves /v1/...)", uri.path()),
        "invalid_request_error",
    )
}
