//! OpenAI-compatible HTTP backend: chat and completions over one pooled client, with bounded
//! concurrency, smooth request/token rate limits and retries with backoff.
//!
//! Works against OpenAI itself and the OpenAI-compatible servers (vLLM, SGLang, llama.cpp,
//! TGI). Transient failures (429, 408, 5xx, timeouts, connection errors, malformed bodies) are
//! retried; other 4xx fail at once as [`ErrorKind::Permanent`]. The API key is sent only as a
//! bearer header and never appears in errors, logs or `Debug` output.

mod body;
mod fleet;
mod limiter;
mod response;
mod retry;
mod stream;
pub mod wire;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aligner_backend::{
    Completion, CompletionRequest, Error, ErrorKind, Message, Prompt, TextGenerator, TextSink,
};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use body::{
    build_body, effective_model, estimate_tokens, Endpoint, DEFAULT_MAX_TOKENS_ESTIMATE,
};
pub use fleet::Fleet;
pub use limiter::TokenBucket;
pub use response::{excerpt, parse_response, ParsedResponse, EXCERPT_CHARS};
pub use retry::{
    backoff_ceiling, backoff_delay, backoff_delay_with, parse_retry_after, parse_retry_after_value,
    DEFAULT_BACKOFF_BASE, MAX_BACKOFF, MAX_RETRY_AFTER,
};

/// Connect timeout of the shared client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the server and how hard to push it.
#[derive(Clone)]
pub struct Config {
    /// Up to and including `/v1`, e.g. `http://localhost:8000/v1`.
    pub base_url: String,
    pub model: String,
    /// Resolved by the caller (from an env var); sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Requests in flight at once (at least 1).
    pub max_concurrency: u32,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Whole-request timeout, per attempt.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff ceiling; attempt `n` waits up to `backoff_base * 2^n` (capped at 30 s).
    pub backoff_base: Duration,
    /// Send raw prompts to `/chat/completions` as the one user message, for servers that
    /// serve chat only. Default false: raw prompts go to `/completions`.
    pub raw_as_chat: bool,
}

impl Config {
    /// Defaults: no key, 16 in flight, no rate limits, 120 s timeout, 5 retries, 0.5 s base.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            max_concurrency: 16,
            requests_per_minute: None,
            tokens_per_minute: None,
            timeout: Duration::from_secs(120),
            max_retries: 5,
            backoff_base: DEFAULT_BACKOFF_BASE,
            raw_as_chat: false,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_concurrency", &self.max_concurrency)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("raw_as_chat", &self.raw_as_chat)
            .finish()
    }
}

/// Counters since the backend was created (shared by all clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// HTTP attempts sent.
    pub requests: u64,
    /// Attempts that were retries.
    pub retries: u64,
    pub status_429: u64,
    pub status_5xx: u64,
    pub timeouts: u64,
    pub conn_errors: u64,
    /// 200 responses that could not be parsed.
    pub malformed: u64,
    /// Requests that returned a completion.
    pub succeeded: u64,
    /// Requests that returned an error.
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    status_429: AtomicU64,
    status_5xx: AtomicU64,
    timeouts: AtomicU64,
    conn_errors: AtomicU64,
    malformed: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The OpenAI-compatible backend. Cheap to clone; clones share the client, limits and stats.
#[derive(Clone)]
pub struct OpenAiBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// `base_url` without a trailing slash.
    base_url: String,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
    semaphore: Semaphore,
    rpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    counters: Counters,
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn config_error(message: String) -> Error {
    Error {
        kind: ErrorKind::Permanent,
        message,
        attempts: 0,
    }
}

/// One attempt's result.
enum Outcome {
    Done(ParsedResponse, Duration),
    /// Worth another attempt; `retry_after` is the server's requested wait.
    Retry {
        reason: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    Fatal(String),
}

impl OpenAiBackend {
    /// Validates `config` and builds the shared HTTP client.
    pub fn new(config: Config) -> Result<Self, Error> {
        let base_url = config.base_url.trim().trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&base_url)
            .map_err(|e| config_error(format!("invalid base_url `{base_url}`: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(config_error(format!(
                "base_url `{base_url}` must start with http:// or https://"
            )));
        }
        if config.model.trim().is_empty() {
            return Err(config_error("model name is empty".into()));
        }
        if config.max_concurrency == 0 {
            return Err(config_error("max_concurrency must be at least 1".into()));
        }
        if config.requests_per_minute == Some(0) {
            return Err(config_error(
                "requests_per_minute must be positive (or unset)".into(),
            ));
        }
        if config.tokens_per_minute == Some(0) {
            return Err(config_error(
                "tokens_per_minute must be positive (or unset)".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(config_error("timeout must be positive".into()));
        }
        let auth = match config.api_key.as_deref().filter(|k| !k.is_empty()) {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    config_error("the API key contains characters not allowed in a header".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(config.max_concurrency as usize)
            .tcp_nodelay(true)
            .user_agent(concat!("aligner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| config_error(format!("cannot build the HTTP client: {e}")))?;
        let inner = Inner {
            base_url,
            client,
            auth,
            semaphore: Semaphore::new(config.max_concurrency as usize),
            rpm: config.requests_per_minute.map(TokenBucket::per_minute),
            tpm: config.tokens_per_minute.map(TokenBucket::per_minute),
            counters: Counters::default(),
            config,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: g(&c.requests),
            retries: g(&c.retries),
            status_429: g(&c.status_429),
            status_5xx: g(&c.status_5xx),
            timeouts: g(&c.timeouts),
            conn_errors: g(&c.conn_errors),
            malformed: g(&c.malformed),
            succeeded: g(&c.succeeded),
            failed: g(&c.failed),
        }
    }

    /// The URL for `endpoint`.
    pub fn url(&self, endpoint: Endpoint) -> String {
        format!("{}{}", self.inner.base_url, endpoint.path())
    }

    /// One completion, retried per the config. With a `sink` the server is asked to stream
    /// and each text piece goes to the sink as it arrives; a stream that breaks after its
    /// first piece is not retried (the pieces are out), it fails.
    async fn run(
        &self,
        mut request: CompletionRequest,
        sink: Option<&TextSink>,
    ) -> Result<Completion, Error> {
        let inner = &*self.inner;
        if inner.config.raw_as_chat {
            if let Prompt::Raw(text) = &mut request.prompt {
                let text = std::mem::take(text);
                request.prompt = Prompt::Chat(vec![Message::new("user", text)]);
            }
        }
        let (endpoint, mut body) = build_body(&request, &inner.config.model);
        if sink.is_some() {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let model = effective_model(&request, &inner.config.model).to_string();
        let url = self.url(endpoint);
        let body = serde_json::to_vec(&body)
            .map_err(|e| config_error(format!("cannot encode the request body: {e}")))?;
        let estimate = estimate_tokens(&request) as f64;
        let max_attempts = inner.config.max_retries.saturating_add(1);
        let mut last = String::new();
        for attempt in 0..max_attempts {
            if let Some(b) = &inner.rpm {
                b.acquire(1.0).await;
            }
            if let Some(b) = &inner.tpm {
                b.acquire(estimate).await;
            }
            let outcome = {
                let Ok(_permit) = inner.semaphore.acquire().await else {
                    return Err(config_error("the backend was shut down".into()));
                };
                self.attempt(&url, &body, endpoint, &model, sink).await
            };
            match outcome {
                Outcome::Done(parsed, latency) => {
                    if let (Some(b), Some(p), Some(c)) =
                        (&inner.tpm, parsed.prompt_tokens, parsed.completion_tokens)
                    {
                        b.adjust(estimate - (f64::from(p) + f64::from(c)));
                    }
                    return Ok(Completion {
                        text: parsed.text,
                        finish_reason: parsed.finish_reason,
                        model: parsed.model,
                        prompt_tokens: parsed.prompt_tokens,
                        completion_tokens: parsed.completion_tokens,
                        latency,
                        attempts: attempt + 1,
                        replica: None,
                    });
                }
                Outcome::Fatal(message) => {
                    return Err(Error {
                        kind: ErrorKind::Permanent,
                        message: inner.redact(message),
                        attempts: attempt + 1,
                    });
                }
                Outcome::Retry {
                    reason,
                    status,
                    retry_after,
                } => {
                    last = reason;
                    if attempt + 1 < max_attempts {
                        bump(&inner.counters.retries);
                        let wait = backoff_delay_with(
                            inner.config.backoff_base,
                            attempt,
                            retry_after,
                            rand::random::<f64>(),
                        );
                        tracing::debug!(
                            status,
                            attempt = attempt + 1,
                            wait_ms = wait.as_millis() as u64,
                            retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                            reason = %inner.redact(truncate(&last, 120)),
                            "retrying",
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Err(Error {
            kind: ErrorKind::Transient,
            message: inner.redact(format!("POST {url}: {last}; retries exhausted")),
            attempts: max_attempts,
        })
    }

    async fn attempt(
        &self,
        url: &str,
        body: &[u8],
        endpoint: Endpoint,
        model: &str,
        sink: Option<&TextSink>,
    ) -> Outcome {
        let inner = &*self.inner;
        bump(&inner.counters.requests);
        let start = std::time::Instant::now();
        let mut rb = inner
            .client
            .post(url)
            .timeout(inner.config.timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(auth) = &inner.auth {
            rb = rb.header(AUTHORIZATION, auth.clone());
        }
        let response = match rb.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_error(&e),
        };
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let streamed = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if let (Some(sink), true, true) = (sink, status.is_success(), streamed) {
            return self
                .read_stream(response, endpoint, model, sink, start)
                .await;
        }
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return self.transport_error(&e),
        };
        let latency = start.elapsed();
        let code = status.as_u16();
        if status.is_success() {
            return match parse_response(&bytes, endpoint, model) {
                Ok(parsed) => {
                    // A server that ignores `"stream": true` answers whole: one piece.
                    if let Some(sink) = sink.filter(|_| !parsed.text.is_empty()) {
                        let _ = sink.send(parsed.text.clone());
                    }
                    Outcome::Done(parsed, latency)
                }
                Err(msg) => {
                    bump(&inner.counters.malformed);
                    Outcome::Retry {
                        reason: format!("malformed response (HTTP {code}): {msg}"),
                        status: Some(code),
                        retry_after: None,
                    }
                }
            };
        }
        let what = format!("HTTP {status} from POST {url}: {}", excerpt(&bytes));
        if status == StatusCode::TOO_MANY_REQUESTS {
            bump(&inner.counters.status_429);
            Outcome::Retry {
                reason: what,
                status: Some(code),
                retry_after,
            }
        } else if status.is_server_error() {
            bump(&inner.counters.status_5xx);
            Outcome::Retry {
                reason: what,
                status: Some(code),
                retry_after,
            }
        } else if status == StatusCode::REQUEST_TIMEOUT {
            Outcome::Retry {
                reason: what,
                status: Some(code),
                retry_after,
            }
        } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            Outcome::Fatal(format!(
                "{what}; check the API key env var (it is sent as a Bearer token{})",
                if inner.auth.is_some() {
                    ""
                } else {
                    "; no key is set"
                }
            ))
        } else if endpoint == Endpoint::Completions
            && matches!(
                status,
                StatusCode::NOT_FOUND
                    | StatusCode::METHOD_NOT_ALLOWED
                    | StatusCode::NOT_IMPLEMENTED
            )
        {
            Outcome::Fatal(format!(
                "{what}; this server may not serve raw completions (many hosted APIs serve chat only)\nhint: set `raw_endpoint: chat` on the model (`--aligner-endpoint chat` for the proxy) to send the rendered prompt as the user message of `/chat/completions`; or check that base_url ends with /v1 (it is `{}`) and that the server serves model `{model}`",
                inner.base_url
            ))
        } else if status == StatusCode::NOT_FOUND {
            Outcome::Fatal(format!(
                "{what}; check that base_url ends with /v1 (it is `{}`) and that the server serves model `{model}`",
                inner.base_url
            ))
        } else {
            Outcome::Fatal(what)
        }
    }

    /// Reads a streamed answer, sending each piece to `sink`. Until the first piece a
    /// failure is worth another attempt; after it, the answer is broken and the call fails.
    async fn read_stream(
        &self,
        mut response: reqwest::Response,
        endpoint: Endpoint,
        model: &str,
        sink: &TextSink,
        start: std::time::Instant,
    ) -> Outcome {
        let mut events = stream::Events::default();
        let mut answer = stream::Answer::new(endpoint);
        let broken = |answer: &stream::Answer, reason: String| {
            if answer.received() == 0 {
                Outcome::Retry {
                    reason,
                    status: None,
                    retry_after: None,
                }
            } else {
                Outcome::Fatal(format!(
                    "{reason} (after {} streamed characters, which were sent on)",
                    answer.received()
                ))
            }
        };
        'read: loop {
            let bytes = match response.chunk().await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    let Outcome::Retry { reason, .. } = self.transport_error(&e) else {
                        return Outcome::Fatal(error_chain(&e));
                    };
                    return broken(&answer, format!("the stream broke: {reason}"));
                }
            };
            for payload in events.push(&bytes) {
                match answer.read(&payload) {
                    Ok(stream::Step::Done) => break 'read,
                    Ok(stream::Step::Text(piece)) => {
                        if !piece.is_empty() {
                            let _ = sink.send(piece);
                        }
                    }
                    Err(e) => return broken(&answer, e),
                }
            }
        }
        match answer.finish(model) {
            Ok(parsed) => Outcome::Done(parsed, start.elapsed()),
            Err(e) => Outcome::Fatal(e),
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> Outcome {
        let c = &self.inner.counters;
        if e.is_builder() {
            return Outcome::Fatal(format!("cannot build the request: {}", error_chain(e)));
        }
        let reason = if e.is_timeout() {
            bump(&c.timeouts);
            format!("request timed out after {:?}", self.inner.config.timeout)
        } else {
            bump(&c.conn_errors);
            format!("connection error: {}", error_chain(e))
        };
        Outcome::Retry {
            reason,
            status: None,
            retry_after: None,
        }
    }
}

impl Inner {
    /// Removes the API key from text that might have picked it up (e.g. an echoing server).
    fn redact(&self, message: String) -> String {
        match self.config.api_key.as_deref() {
            Some(key) if !key.is_empty() && message.contains(key) => {
                message.replace(key, "<redacted>")
            }
            _ => message,
        }
    }
}

/// `e` and its sources, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// At most `n` characters of `s`.
fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The backend of a pipeline's `kind: openai` model: one endpoint, or a [`Fleet`] over its
/// replicas. `api_key` is the resolved key; `backoff_base` overrides the retry backoff (tests).
pub fn from_spec(
    m: &aligner_spec::OpenAiModel,
    api_key: Option<String>,
    backoff_base: Option<Duration>,
) -> Result<std::sync::Arc<dyn TextGenerator>, Error> {
    let mut config = Config::new(&m.base_url, &m.model);
    config.api_key = api_key;
    config.max_concurrency = m.max_concurrency;
    config.requests_per_minute = m.requests_per_minute;
    config.tokens_per_minute = m.tokens_per_minute;
    config.timeout = Duration::from_secs_f64(m.timeout_secs);
    config.max_retries = m.max_retries;
    config.raw_as_chat = m.raw_endpoint == aligner_spec::RawEndpoint::Chat;
    if let Some(b) = backoff_base {
        config.backoff_base = b;
    }
    if m.replicas.is_empty() {
        return Ok(std::sync::Arc::new(OpenAiBackend::new(config)?));
    }
    let per_replica = m.replica_concurrency.unwrap_or(m.max_concurrency);
    Ok(std::sync::Arc::new(Fleet::new(
        config,
        &m.endpoints(),
        per_replica,
    )?))
}

#[async_trait::async_trait]
impl TextGenerator for OpenAiBackend {
    fn id(&self) -> String {
        format!("openai:{}#{}", self.inner.base_url, self.inner.config.model)
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, Error> {
        let span = tracing::debug_span!(
            "openai_complete",
            model = effective_model(&request, &self.inner.config.model),
            endpoint = Endpoint::for_prompt(&request.prompt).path(),
        );
        let result = self.run(request, None).instrument(span).await;
        self.count(&result);
        result
    }

    async fn complete_streaming(
        &self,
        request: CompletionRequest,
        sink: TextSink,
    ) -> Result<Completion, Error> {
        let span = tracing::debug_span!(
            "openai_stream",
            model = effective_model(&request, &self.inner.config.model),
            endpoint = Endpoint::for_prompt(&request.prompt).path(),
        );
        let result = self.run(request, Some(&sink)).instrument(span).await;
        self.count(&result);
        result
    }
}

impl OpenAiBackend {
    fn count(&self, result: &Result<Completion, Error>) {
        let c = &self.inner.counters;
        bump(if result.is_ok() {
            &c.succeeded
        } else {
            &c.failed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_key() {
        let mut config = Config::new("http://localhost:8000/v1/", "m");
        config.api_key = Some("sk-very-secret".into());
        assert!(!format!("{config:?}").contains("sk-very-secret"));
        let backend = OpenAiBackend::new(config).unwrap();
        assert!(!format!("{backend:?}").contains("sk-very-secret"));
        assert_eq!(backend.id(), "openai:http://localhost:8000/v1#m");
        assert_eq!(
            backend.url(Endpoint::Chat),
            "http://localhost:8000/v1/chat/completions"
        );
    }

    #[test]
    fn bad_configs_are_permanent_errors() {
        let ok = || Config::new("http://localhost:8000/v1", "m");
        let cases = [
            Config {
                base_url: "localhost:8000".into(),
                ..ok()
            },
            Config {
                base_url: "ftp://x/v1".into(),
                ..ok()
            },
            Config {
                model: " ".into(),
                ..ok()
            },
            Config {
                max_concurrency: 0,
                ..ok()
            },
            Config {
                requests_per_minute: Some(0),
                ..ok()
            },
            Config {
                tokens_per_minute: Some(0),
                ..ok()
            },
            Config {
                timeout: Duration::ZERO,
                ..ok()
            },
            Config {
                api_key: Some("bad\nkey".into()),
                ..ok()
            },
        ];
        for config in cases {
            let err = OpenAiBackend::new(config).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Permanent);
            assert!(!err.message.contains("bad\nkey"));
        }
    }

    #[test]
    fn backend_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<OpenAiBackend>();
    }
}
