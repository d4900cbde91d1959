//! The OpenAI-compatible servers behind `aligner serve`: one local model over HTTP (this
//! module), so any OpenAI client (or another orchestrator) can use it, and the correction
//! proxy ([`proxy`], `--upstream`) that puts an Aligner in front of any model.
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{name}`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (both with `stream: true` as server-sent events) and `GET /health`.
//! Request bodies are parsed into a [`Plan`] (one backend request per choice) before anything
//! runs, so every bad field is a 400 naming it. HTTP statuses are decided in [`ApiError`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aligner_backend::{
    Completion, CompletionRequest, ErrorKind, Message, Prompt, Sampling, TextGenerator,
};
use aligner_openai::wire::{
    self, AssistantMessage, ChatChoice, Choice, ChunkChoice, ErrorBody, ErrorDetail, ModelList,
    ModelObject, RequestParams, TextChoice, Usage,
};
use aligner_spec::{LocalModel, LocalSource};
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};

use auth::ApiKeys;
use sse::Progress;

use aligner_spec::Invalid;

/// Most choices (`n` times the number of prompts) one request may ask for.
const MAX_CHOICES: usize = 128;

/// What `aligner serve` serves and where.
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// A `.gguf` file, a Hugging Face model folder, or a hub id `org/name`. Not with
    /// `proxy.upstream`, where the Aligner is `proxy.aligner`.
    pub model: Option<String>,
    /// The address to listen on.
    pub host: String,
    /// The port to listen on (0 picks a free one).
    pub port: u16,
    /// The model name clients see (default: the file or folder name, or the hub id).
    pub name: Option<String>,
    /// Most sequences generated together (default: the backend's).
    pub max_batch: Option<usize>,
    /// Keys clients must send (`Authorization: Bearer KEY`); required beyond loopback.
    pub api_keys: Vec<String>,
    pub proxy: proxy::ProxyOptions,
}

/// `aligner serve`: loads the model, listens, calls `listening` with a line saying what is
/// served where, and serves until `shutdown` resolves. With `proxy.upstream`, runs the
/// correction proxy instead.
pub async fn run(
    args: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(&str),
) -> Result<()> {
    if args.proxy.upstream.is_some() {
        let keys = ApiKeys::new(args.api_keys.clone(), &args.host, "the correction proxy")?;
        return proxy::run(args, keys, shutdown, listening).await;
    }
    let keys = ApiKeys::new(args.api_keys.clone(), &args.host, "this model server")?;
    if let Some(flag) = args.proxy.first_set() {
        return Err(Invalid::Message(format!(
            "`--{flag}` needs `--upstream URL`\nhint: `aligner serve --upstream URL --aligner MODEL` runs the correction proxy; `aligner serve MODEL` serves one local model"
        ))
        .into());
    }
    let Some(model) = args.model else {
        return Err(Invalid::Message(
            "missing MODEL\nhint: `aligner serve MODEL` serves a local model (`.gguf` file, Hugging Face folder or hub id); `aligner serve --upstream URL --aligner MODEL` runs the correction proxy".into(),
        )
        .into());
    };
    let (spec, default_name) = model_spec(&model)?;
    let name = args.name.unwrap_or(default_name);
    let max_batch = args.max_batch;
    let generator = tokio::task::spawn_blocking(move || load(&spec, max_batch))
        .await
        .context("loading the model")??;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on `{}:{}`", args.host, args.port))?;
    let addr = listener.local_addr()?;
    listening(&format!("serving {model} as {name} on http://{addr}/v1"));
    serve(generator, name, listener, keys, shutdown).await
}

/// Loads a local model with the local backend.
fn load(spec: &LocalModel, max_batch: Option<usize>) -> Result<Arc<dyn TextGenerator>> {
    let mut options = aligner_local::backend::LoadOptions::default();
    if let Some(n) = max_batch {
        options.max_batch = n.max(1);
    }
    Ok(Arc::new(aligner_local::backend::LocalBackend::load(
        spec, options,
    )?))
}

/// Resolves the `MODEL` argument into a local model spec and the default served name.
fn model_spec(model: &str) -> Result<(LocalModel, String)> {
    let path = Path::new(model);
    let file_name = |p: &Path, strip_ext: bool| {
        let name = if strip_ext {
            p.file_stem()
        } else {
            p.file_name()
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_string())
    };
    let local = |source| LocalModel {
        source,
        dtype: "auto".into(),
    };
    if path.is_dir() {
        let path = absolute(path);
        let name = file_name(&path, false);
        return Ok((
            local(LocalSource::HfFolder {
                path,
                architecture: None,
            }),
            name,
        ));
    }
    if path.is_file() {
        let name = file_name(path, path.extension().is_some_and(|e| e == "gguf"));
        return Ok((
            local(LocalSource::Gguf {
                path: absolute(path),
                architecture: None,
            }),
            name,
        ));
    }
    if !looks_like_path(model) && is_hub_id(model) {
        return Ok((
            local(LocalSource::HubId {
                id: model.to_string(),
                revision: None,
            }),
            model.to_string(),
        ));
    }
    Err(Invalid::Message(format!(
        "model `{model}` does not exist\nhint: `aligner models fetch` downloads the default models into `models/`; MODEL is a `.gguf` file, a Hugging Face model folder or a hub id `org/name`"
    ))
    .into())
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `org/name` with the characters hubs allow.
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        })
}

/// A missing `models/x.gguf` or `./x` is a missing file, not a hub id.
fn looks_like_path(s: &str) -> bool {
    s.ends_with(".gguf")
        || s.starts_with(['.', '/', '~'])
        || s.split('/')
            .next()
            .is_some_and(|first| Path::new(first).is_dir())
}

struct AppState {
    generator: Arc<dyn TextGenerator>,
    model: String,
    created: u64,
}

type Shared = Arc<AppState>;

/// Serves `generator` as `model_name` on `listener` until `shutdown` resolves, then waits for
/// the requests in flight.
pub async fn serve(
    generator: Arc<dyn TextGenerator>,
    model_name: String,
    listener: tokio::net::TcpListener,
    keys: ApiKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let state = Arc::new(AppState {
        generator,
        model: model_name,
        created: unix_now(),
    });
    axum::serve(listener, router(state, keys))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}

fn router(state: Shared, keys: ApiKeys) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*name}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(|| async { StatusCode::OK }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            keys,
            auth::require_key,
        ))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error answer in OpenAI's shape. The one place HTTP statuses are chosen.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A 400 about one field, named in the message.
    fn field(param: &str, problem: impl std::fmt::Display) -> Self {
        Self::invalid(Some(param), format!("`{param}` {problem}"))
    }

    /// A backend failure: 503 when trying again later may help, 500 otherwise.
    fn backend(e: &aligner_backend::Error) -> Self {
        let status = match e.kind {
            ErrorKind::Transient => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Permanent => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            kind: "server_error",
            message: e.message.clone(),
            param: None,
            code: None,
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

const ROUTES: &str = "`GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`";

async fn not_found(method: Method, uri: Uri) -> ApiError {
    unknown_route(&method, &uri, "this server", ROUTES)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    wrong_method(&method, &uri, "this server", ROUTES)
}

/// 404 for a path `server` does not route; `routes` lists the ones it does.
fn unknown_route(method: &Method, uri: &Uri, server: &str, routes: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!(
            "unknown path `{method} {}`; {server} serves {routes}",
            uri.path()
        ),
        param: None,
        code: Some("unknown_url"),
    }
}

/// 405 for a routed path asked with the wrong method.
fn wrong_method(method: &Method, uri: &Uri, server: &str, routes: &str) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        message: format!(
            "method `{method}` is not allowed on `{}`; {server} serves {routes}",
            uri.path()
        ),
        param: None,
        code: Some("method_not_allowed"),
    }
}

// ---------------------------------------------------------------------------------------------
// Models

/// `/v1/models`: the list of the one model a server exposes.
fn model_list(id: &str, created: u64) -> Json<ModelList> {
    Json(ModelList::new(vec![ModelObject::served(id, created)]))
}

/// `/v1/models/{name}`: the model when `name` is its id, else 404 (`serves` says what the
/// server offers instead, e.g. "this server serves").
fn model_lookup(
    name: &str,
    id: &str,
    created: u64,
    serves: &str,
) -> Result<Json<ModelObject>, ApiError> {
    if name == id {
        return Ok(Json(ModelObject::served(id, created)));
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!("model `{name}` does not exist; {serves} `{id}`"),
        param: Some("model".into()),
        code: Some("model_not_found"),
    })
}

async fn models(State(state): State<Shared>) -> Json<ModelList> {
    model_list(&state.model, state.created)
}

async fn model(
    State(state): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    model_lookup(&name, &state.model, state.created, "this server serves")
}

// ---------------------------------------------------------------------------------------------
// Request parsing

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endpoint {
    Chat,
    Text,
}

/// A parsed request: one backend request per choice, in choice order.
struct Plan {
    endpoint: Endpoint,
    /// `(prompt index, request)`; the choice index is the position.
    requests: Vec<(usize, CompletionRequest)>,
    stream: bool,
    include_usage: bool,
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

fn parse_common(value: &Value) -> Result<RequestParams, ApiError> {
    serde_path_to_error::deserialize::<_, RequestParams>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(None, format!("invalid request: {inner}"))
        } else {
            ApiError::field(&path, format!("is invalid: {inner}"))
        }
    })
}

fn range(
    param: &str,
    v: Option<f64>,
    ok: impl Fn(f64) -> bool,
    want: &str,
) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !ok(x) => Err(ApiError::field(param, format!("must be {want}, got {x}"))),
        _ => Ok(v),
    }
}

/// Truthy: present and not `null`, `false`, `0`, `""`, `[]` or `{}`.
fn set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Bool(true)) => true,
    }
}

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::field(param, format!("is not supported by this server ({why})"))
}

/// Sampling, `n`, streaming flags, and refusals of what this server does not do.
fn sampling(c: &RequestParams) -> Result<(Sampling, usize), ApiError> {
    let temperature = range(
        "temperature",
        c.temperature,
        |x| (0.0..=2.0).contains(&x),
        "between 0 and 2",
    )?;
    let top_p = range("top_p", c.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("must be a positive integer (or -1 for off), got {k}"),
            ))
        }
    };
    let penalty = |x: f64| (-2.0..=2.0).contains(&x);
    let frequency_penalty = range(
        "frequency_penalty",
        c.frequency_penalty,
        penalty,
        "between -2 and 2",
    )?;
    let presence_penalty = range(
        "presence_penalty",
        c.presence_penalty,
        penalty,
        "between -2 and 2",
    )?;
    let repetition_penalty = range(
        "repetition_penalty",
        c.repetition_penalty,
        |x| x > 0.0,
        "greater than 0",
    )?;
    let (max_param, max_tokens) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::field(max_param, "must be at least 1"));
    }
    let n = c.n.unwrap_or(1) as usize;
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::field(
            "n",
            format!("must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    if let Some(b) = c.best_of {
        if b as usize != n {
            return Err(unsupported("best_of", "only `best_of` equal to `n`"));
        }
    }
    if set(&c.logprobs) || set(&c.top_logprobs) {
        let param = if set(&c.logprobs) {
            "logprobs"
        } else {
            "top_logprobs"
        };
        return Err(unsupported(param, "no log probabilities"));
    }
    if set(&c.logit_bias) {
        return Err(unsupported("logit_bias", "no logit bias"));
    }
    if set(&c.tools) || set(&c.functions) {
        let param = if set(&c.tools) { "tools" } else { "functions" };
        return Err(unsupported(param, "no tool calling"));
    }
    if let Some(format) = &c.response_format {
        let kind = format.get("type").and_then(Value::as_str);
        if !format.is_null() && kind != Some("text") {
            return Err(unsupported(
                "response_format",
                "only `{\"type\": \"text\"}`",
            ));
        }
    }
    if c.echo == Some(true) {
        return Err(unsupported("echo", "the prompt is not echoed"));
    }
    if c.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "no insertion"));
    }
    let stop = match &c.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::field("stop", "must be a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::field(
                "stop",
                "must be a string or a list of strings",
            ))
        }
    };
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    Ok((
        Sampling {
            temperature,
            top_p,
            top_k,
            max_tokens,
            frequency_penalty,
            presence_penalty,
            repetition_penalty,
            seed: c.seed,
            stop,
        },
        n,
    ))
}

/// `messages` into chat messages: string content, or a list of text parts (joined by newlines).
fn messages(value: &Value) -> Result<Vec<Message>, ApiError> {
    let Some(raw) = value.get("messages") else {
        return Err(ApiError::invalid(
            Some("messages"),
            "missing field `messages`",
        ));
    };
    let Some(items) = raw.as_array().filter(|a| !a.is_empty()) else {
        return Err(ApiError::field(
            "messages",
            "must be a non-empty list of messages",
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::field(&format!("{at}.role"), "is required and must be a string")
        })?;
        let role = match role {
            "system" | "user" | "assistant" => role,
            "developer" => "system",
            "tool" | "function" => {
                return Err(unsupported(
                    &format!("{at}.role"),
                    &format!("no tool calling, so no `{role}` messages"),
                ))
            }
            other => {
                return Err(ApiError::field(
                    &format!("{at}.role"),
                    format!("must be `system`, `user`, `assistant` or `developer`, got `{other}`"),
                ))
            }
        };
        let content = match item.get("content") {
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str);
                    match (kind, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => texts.push(t),
                        (Some("text"), None) => {
                            return Err(ApiError::field(
                                &format!("{at}.content[{j}].text"),
                                "is required and must be a string",
                            ))
                        }
                        (other, _) => {
                            return Err(unsupported(
                                &format!("{at}.content[{j}]"),
                                &format!("only `text` parts, got `{}`", other.unwrap_or("?")),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            _ => {
                return Err(ApiError::field(
                    &format!("{at}.content"),
                    "is required and must be a string or a list of text parts",
                ))
            }
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// `prompt`: a string or a list of strings.
fn prompts(value: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::field("prompt", "must be a string or a non-empty list of strings");
    match value.get("prompt") {
        None => Err(ApiError::invalid(Some("prompt"), "missing field `prompt`")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().any(Value::is_number) || items.iter().any(Value::is_array) {
                return Err(unsupported("prompt", "token-id prompts; send text"));
            }
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

fn plan(endpoint: Endpoint, body: &Bytes) -> Result<Plan, ApiError> {
    plan_value(endpoint, &parse_body(body)?)
}

/// [`plan`] of a body already parsed into a JSON object.
fn plan_value(endpoint: Endpoint, value: &Value) -> Result<Plan, ApiError> {
    let common = parse_common(value)?;
    let (sampling, n) = sampling(&common)?;
    let prompts: Vec<Prompt> = match endpoint {
        Endpoint::Chat => vec![Prompt::Chat(messages(value)?)],
        Endpoint::Text => prompts(value)?.into_iter().map(Prompt::Raw).collect(),
    };
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::field(
            "n",
            format!("times the number of prompts must be at most {MAX_CHOICES}"),
        ));
    }
    let mut requests = Vec::with_capacity(prompts.len() * n);
    for (p, prompt) in prompts.into_iter().enumerate() {
        for i in 0..n {
            let mut sampling = sampling.clone();
            // Choice i of n gets seed + i: reproducible, and not n copies of one answer.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            requests.push((
                p,
                CompletionRequest {
                    prompt: prompt.clone(),
                    sampling,
                    model: None,
                },
            ));
        }
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(Plan {
        endpoint,
        requests,
        stream: common.stream.unwrap_or(false),
        include_usage,
    })
}

// ---------------------------------------------------------------------------------------------
// Answers

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:016x}{n:08x}")
}

/// Token counts: each prompt once (as OpenAI counts it), every choice's completion.
fn usage(requests: &[(usize, CompletionRequest)], done: &[(usize, Completion)]) -> Usage {
    let mut prompt_tokens = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut completion_tokens = 0u64;
    for (choice, c) in done {
        if seen.insert(requests[*choice].0) {
            prompt_tokens += u64::from(c.prompt_tokens.unwrap_or(0));
        }
        completion_tokens += u64::from(c.completion_tokens.unwrap_or(0));
    }
    Usage::new(prompt_tokens, completion_tokens)
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Text => "cmpl",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Text => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Text => "text_completion",
        }
    }

    fn choice(self, index: usize, c: &Completion) -> Choice {
        let finish_reason = Some(c.finish_reason.as_str().to_string());
        match self {
            Endpoint::Chat => Choice::Chat(ChatChoice {
                index,
                message: AssistantMessage::assistant(c.text.clone()),
                logprobs: None,
                finish_reason,
            }),
            Endpoint::Text => Choice::Text(TextChoice {
                index,
                text: c.text.clone(),
                logprobs: None,
                finish_reason,
            }),
        }
    }

    /// One streamed choice: a text piece, the assistant role (chat), or the finish reason.
    fn chunk_choice(
        self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
    ) -> Choice {
        match self {
            Endpoint::Chat => {
                let delta = match (role, text) {
                    (true, _) => AssistantMessage::assistant(""),
                    (false, Some(t)) => AssistantMessage::piece(t),
                    (false, None) => AssistantMessage::default(),
                };
                Choice::Delta(ChunkChoice {
                    index,
                    delta,
                    logprobs: None,
                    finish_reason: finish.map(str::to_string),
                    extra: Map::new(),
                })
            }
            Endpoint::Text => Choice::Text(TextChoice {
                index,
                text: text.unwrap_or("").to_string(),
                logprobs: None,
                finish_reason: finish.map(str::to_string),
            }),
        }
    }
}

async fn chat(State(state): State<Shared>, body: Bytes) -> Response {
    answer(state, Endpoint::Chat, body).await
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Response {
    answer(state, Endpoint::Text, body).await
}

async fn answer(state: Shared, endpoint: Endpoint, body: Bytes) -> Response {
    let plan = match plan(endpoint, &body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let result = if plan.stream {
        stream(state, plan).await
    } else {
        whole(state, plan).await
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A non-streamed answer: all choices generated concurrently (a batching backend batches them).
async fn whole(state: Shared, plan: Plan) -> Result<Response, ApiError> {
    let calls = plan
        .requests
        .iter()
        .map(|(_, r)| state.generator.complete(r.clone()));
    let results = futures::future::join_all(calls).await;
    let mut done = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        done.push((i, r.map_err(|e| ApiError::backend(&e))?));
    }
    let endpoint = plan.endpoint;
    let body = wire::Completion {
        id: new_id(endpoint.id_prefix()),
        object: endpoint.object(),
        created: unix_now(),
        model: state.model.clone(),
        choices: done.iter().map(|(i, c)| endpoint.choice(*i, c)).collect(),
        usage: usage(&plan.requests, &done),
        system_fingerprint: None,
        extra: Map::new(),
    };
    Ok(Json(body).into_response())
}

/// A streamed answer. Waits for the first piece (or failure) before sending headers, so a
/// request that fails at once gets a proper error status instead of a broken stream.
async fn stream(state: Shared, plan: Plan) -> Result<Response, ApiError> {
    let mut rx = sse::spawn_all(
        &state.generator,
        plan.requests.iter().map(|(_, r)| r.clone()),
    );
    let first = rx.recv().await;
    if let Some(Progress::Done(_, Err(e))) = &first {
        return Err(ApiError::backend(e));
    }
    let endpoint = plan.endpoint;
    let mut out = sse::Writer::new(
        new_id(endpoint.id_prefix()),
        endpoint.chunk_object(),
        unix_now(),
        state.model.clone(),
    );
    let handler = Chunks {
        endpoint,
        include_usage: plan.include_usage,
        requests: plan.requests,
        done: Vec::new(),
    };
    if endpoint == Endpoint::Chat {
        for i in 0..handler.requests.len() {
            let choice = endpoint.chunk_choice(i, None, true, None);
            handler.push(&mut out, choice, None);
        }
    }
    Ok(sse::respond(rx, first, out, handler))
}

/// Turns generation progress into OpenAI's chunks.
struct Chunks {
    endpoint: Endpoint,
    include_usage: bool,
    requests: Vec<(usize, CompletionRequest)>,
    done: Vec<(usize, Completion)>,
}

impl Chunks {
    /// A chunk of at most one choice; with `include_usage`, every chunk has `usage` (`null`
    /// until the last).
    fn push(&self, out: &mut sse::Writer, choice: Choice, usage: Option<Usage>) {
        self.push_all(out, vec![choice], usage);
    }

    fn push_all(&self, out: &mut sse::Writer, choices: Vec<Choice>, usage: Option<Usage>) {
        let usage = self.include_usage.then_some(usage);
        out.chunk(choices, usage, Map::new());
    }
}

impl sse::Handler for Chunks {
    fn handle(&mut self, progress: Progress, out: &mut sse::Writer) {
        match progress {
            Progress::Text(i, text) => {
                if !text.is_empty() {
                    let choice = self.endpoint.chunk_choice(i, Some(&text), false, None);
                    self.push(out, choice, None);
                }
            }
            Progress::Done(i, Ok(c)) => {
                let finish = c.finish_reason.as_str().to_string();
                let choice = self.endpoint.chunk_choice(i, None, false, Some(&finish));
                self.push(out, choice, None);
                self.done.push((i, c));
                if self.done.len() == self.requests.len() {
                    if self.include_usage {
                        let usage = usage(&self.requests, &self.done);
                        self.push_all(out, Vec::new(), Some(usage));
                    }
                    out.done();
                }
            }
            Progress::Done(_, Err(e)) => {
                // Headers are sent: the error goes in the stream, as OpenAI clients expect.
                let body = ApiError::backend(&e).body();
                out.raw(serde_json::to_string(&body).expect("an error body serializes"));
                out.done();
            }
        }
    }
}

pub mod auth;
pub mod proxy;
mod sse;
#[cfg(test)]
mod tests;
