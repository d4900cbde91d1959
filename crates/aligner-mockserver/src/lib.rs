//! Loopback OpenAI-compatible test server with deterministic answers and fault injection.
//!
//! A test double for tests and benchmarks only: it serves `/v1/chat/completions`,
//! `/v1/completions` and `/v1/models` on `127.0.0.1` (and vLLM's `/v1/load_lora_adapter`,
//! SGLang's `/update_weights_from_disk` and `/get_model_info`, so serving checkpoints can be
//! tested), answers cheaply and predictably (see
//! [`answers`]), and injects 429s, 500s, slow answers and malformed bodies with seeded
//! probabilities or from a fixed script. It keeps counters ([`MockStats`]) but logs nothing.

pub mod answers;
mod handlers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

/// A fault the server can inject into a completion request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 429 (with `Retry-After` when [`MockConfig::retry_after_secs`] is set).
    TooManyRequests,
    /// HTTP 500.
    ServerError,
    /// Sleep [`MockConfig::timeout_delay`] before answering normally.
    Timeout,
    /// HTTP 200 with broken JSON, JSON without `choices`, or an HTML page.
    Malformed,
    /// Any other status with an OpenAI-style error body (e.g. 400, 503).
    Status(u16),
}

/// What the server does. `Default` is a well-behaved server: no faults, no latency, no auth.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    pub seed: u64,
    /// Fault probabilities in `[0, 1]`, drawn per completion request from a counter-based
    /// generator seeded with `seed` (deterministic for a given request order).
    pub p_429: f64,
    pub p_500: f64,
    /// Sleep `timeout_delay` before answering.
    pub p_timeout: f64,
    /// 200 with broken JSON or JSON missing `choices`.
    pub p_malformed: f64,
    pub timeout_delay: Duration,
    /// Sent as `Retry-After` with 429s.
    pub retry_after_secs: Option<u64>,
    /// Added to every ok answer.
    pub latency: Duration,
    /// When set, requests without `Authorization: Bearer <key>` get 401.
    pub api_key: Option<String>,
    /// Requests whose prompt or messages contain this text always get 500.
    pub fail_prompts_containing: Option<String>,
    /// Faults for the first completion requests, in arrival order (one per request), before
    /// the probabilistic ones apply. Makes "fails twice, then succeeds" tests exact.
    pub script: Vec<Fault>,
    /// Serve chat only, like most hosted APIs: `/v1/completions` is an unknown path (404).
    pub chat_only: bool,
    /// Answers at most this many completion requests at once (the rest wait their turn), so
    /// that with `latency` the server, not the client, is the bottleneck. `None`: no limit.
    pub capacity: Option<usize>,
    /// Refuse `POST /v1/load_lora_adapter` with this message (HTTP 400), as vLLM does for an
    /// adapter it cannot load.
    pub refuse_lora: Option<String>,
    /// Streamed chat answers (`"stream": true`) send one word per event, this far apart.
    pub stream_delay: Duration,
    /// A streamed chat answer stops after this many words: the connection closes without a
    /// finish reason or `[DONE]`, as when a server dies mid-answer.
    pub cut_stream_after: Option<usize>,
}

/// Injected faults and rejections, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub status_429: u64,
    pub status_500: u64,
    pub timeout: u64,
    pub malformed: u64,
    /// Scripted [`Fault::Status`] answers.
    pub other_status: u64,
    /// 500s from [`MockConfig::fail_prompts_containing`].
    pub forced_500: u64,
    /// 401s for a missing or wrong key.
    pub unauthorized: u64,
    /// 400s for bodies the server could not use (bad JSON, temperature outside [0, 2]).
    pub bad_request: u64,
    /// 404s for unknown paths.
    pub not_found: u64,
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Every request, any path.
    pub requests: u64,
    /// Requests by path: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `other`.
    pub per_path: BTreeMap<String, u64>,
    pub faults: FaultCounts,
    /// Completion requests by the `model` they named (`""` when none).
    pub per_model: BTreeMap<String, u64>,
    /// Completion answers with a well-formed 200 body.
    pub ok: u64,
    /// Completion requests being handled right now.
    pub in_flight: u64,
    /// The most completion requests ever handled at once.
    pub max_in_flight: u64,
}

pub(crate) const PATH_CHAT: &str = "/v1/chat/completions";
pub(crate) const PATH_COMPLETIONS: &str = "/v1/completions";
pub(crate) const PATH_MODELS: &str = "/v1/models";

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub chat: AtomicU64,
    pub completions: AtomicU64,
    pub models: AtomicU64,
    pub other: AtomicU64,
    pub ok: AtomicU64,
    pub f_429: AtomicU64,
    pub f_500: AtomicU64,
    pub f_timeout: AtomicU64,
    pub f_malformed: AtomicU64,
    pub f_other: AtomicU64,
    pub f_forced: AtomicU64,
    pub f_unauthorized: AtomicU64,
    pub f_bad_request: AtomicU64,
    pub f_not_found: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) struct Shared {
    pub config: MockConfig,
    /// `"Bearer <key>"` when a key is required.
    pub expected_auth: Option<String>,
    pub counters: Counters,
    pub draws: AtomicU64,
    pub script_pos: AtomicU64,
    pub per_model: Mutex<BTreeMap<String, u64>>,
    pub last_body: Mutex<Option<axum::body::Bytes>>,
    /// Every completion request body that parsed, in arrival order.
    pub bodies: Mutex<Vec<axum::body::Bytes>>,
    /// Adapters loaded with `POST /v1/load_lora_adapter` (vLLM): (name, path), listed as models.
    pub adapters: Mutex<Vec<(String, String)>>,
    /// The weights `POST /update_weights_from_disk` (SGLang) last loaded.
    pub weights: Mutex<Option<String>>,
    /// [`MockConfig::capacity`]'s slots.
    pub slots: Option<tokio::sync::Semaphore>,
}

impl Shared {
    fn new(config: MockConfig) -> Self {
        let expected_auth = config.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let slots = config.capacity.map(tokio::sync::Semaphore::new);
        Self {
            config,
            expected_auth,
            counters: Counters::default(),
            draws: AtomicU64::new(0),
            script_pos: AtomicU64::new(0),
            per_model: Mutex::new(BTreeMap::new()),
            last_body: Mutex::new(None),
            bodies: Mutex::new(Vec::new()),
            adapters: Mutex::new(Vec::new()),
            weights: Mutex::new(None),
            slots,
        }
    }

    /// The fault for the next completion request, if any: the script first, then a seeded draw.
    pub fn pick_fault(&self) -> Option<Fault> {
        let c = &self.config;
        if !c.script.is_empty() {
            let pos = self.script_pos.fetch_add(1, Ordering::Relaxed) as usize;
            if let Some(f) = c.script.get(pos) {
                return Some(*f);
            }
        }
        let total = c.p_429 + c.p_500 + c.p_timeout + c.p_malformed;
        if total <= 0.0 {
            return None;
        }
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let u = unit(splitmix64(
            c.seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        ));
        let mut edge = c.p_429;
        if u < edge {
            return Some(Fault::TooManyRequests);
        }
        edge += c.p_500;
        if u < edge {
            return Some(Fault::ServerError);
        }
        edge += c.p_timeout;
        if u < edge {
            return Some(Fault::Timeout);
        }
        edge += c.p_malformed;
        if u < edge {
            return Some(Fault::Malformed);
        }
        None
    }

    fn stats(&self) -> MockStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        let mut per_path = BTreeMap::new();
        per_path.insert(PATH_CHAT.to_string(), g(&c.chat));
        per_path.insert(PATH_COMPLETIONS.to_string(), g(&c.completions));
        per_path.insert(PATH_MODELS.to_string(), g(&c.models));
        per_path.insert("other".to_string(), g(&c.other));
        MockStats {
            requests: g(&c.requests),
            per_path,
            faults: FaultCounts {
                status_429: g(&c.f_429),
                status_500: g(&c.f_500),
                timeout: g(&c.f_timeout),
                malformed: g(&c.f_malformed),
                other_status: g(&c.f_other),
                forced_500: g(&c.f_forced),
                unauthorized: g(&c.f_unauthorized),
                bad_request: g(&c.f_bad_request),
                not_found: g(&c.f_not_found),
            },
            per_model: self
                .per_model
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ok: g(&c.ok),
            in_flight: g(&c.in_flight),
            max_in_flight: g(&c.max_in_flight),
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A running mock server. Dropping it (or [`MockServer::shutdown`]) stops it.
pub struct MockServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl MockServer {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        MockServer::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Binds `addr` and serves on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let app = handlers::router(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(MockServer {
            addr,
            base_url: base_url(addr),
            shared,
            stop: Some(tx),
            thread: None,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> MockStats {
        self.shared.stats()
    }

    /// The body of the last completion request that parsed, for checking what a client sent.
    pub fn last_request_body(&self) -> Option<serde_json::Value> {
        let body = self
            .shared
            .last_body
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        serde_json::from_slice(&body).ok()
    }

    /// Every completion request body that parsed, in arrival order.
    pub fn request_bodies(&self) -> Vec<serde_json::Value> {
        self.shared
            .bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect()
    }

    /// The LoRA adapters loaded so far (vLLM's `load_lora_adapter`): (name, path).
    pub fn adapters(&self) -> Vec<(String, String)> {
        self.shared
            .adapters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The weights SGLang's `update_weights_from_disk` loaded last.
    pub fn weights(&self) -> Option<String> {
        self.shared
            .weights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops accepting connections. For a server from [`spawn_in_thread`] this also stops its
    /// runtime (cancelling slow answers) and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_now();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1")
}

/// Runs a server on its own thread with its own runtime (for tests that drive an external
/// process, or code without a runtime). Stats stay readable from the returned handle.
///
/// # Panics
/// When no loopback port can be bound or the runtime cannot start (test-only code).
pub fn spawn_in_thread(config: MockConfig) -> MockServer {
    spawn_in_thread_on(0, config)
}

/// [`spawn_in_thread`] on a given loopback port (0 picks a free one): a test can stop a
/// server and start another with other behaviour at the same address.
///
/// # Panics
/// When the port cannot be bound or the runtime cannot start (test-only code).
pub fn spawn_in_thread_on(port: u16, config: MockConfig) -> MockServer {
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("mock server: bind 127.0.0.1:{port}: {e}"));
    std_listener
        .set_nonblocking(true)
        .expect("mock server: set_nonblocking");
    let addr = std_listener.local_addr().expect("mock server: local_addr");
    let shared = Arc::new(Shared::new(config));
    let app = handlers::router(shared.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("aligner-mockserver")
        .enable_all()
        .build()
        .expect("mock server: tokio runtime");
    let thread = std::thread::Builder::new()
        .name("aligner-mockserver".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(_) => return,
                };
                tokio::select! {
                    _ = std::future::IntoFuture::into_future(axum::serve(listener, app)) => {}
                    _ = rx => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .expect("mock server: spawn thread");
    MockServer {
        addr,
        base_url: base_url(addr),
        shared,
        stop: Some(tx),
        thread: Some(thread),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn post(addr: SocketAddr, path: &str, body: &str, auth: Option<&str>) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn thread_server_answers_and_counts() {
        let server = spawn_in_thread(MockConfig {
            script: vec![Fault::TooManyRequests],
            retry_after_secs: Some(3),
            ..Default::default()
        });
        let chat = r#"{"model":"m-ckpt-1","messages":[{"role":"user","content":"one two three"}],"max_tokens":3}"#;
        let (st, _) = post(server.addr, PATH_CHAT, chat, None);
        assert_eq!(st, 429);
        let (st, body) = post(server.addr, PATH_CHAT, chat, None);
        assert_eq!(st, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "[m-ckpt-1] answer: one"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["model"], "m-ckpt-1");

        let raw = r#"{"model":"c","prompt":"USER: fix: q? | COPY a. ASSISTANT:"}"#;
        let (st, body) = post(server.addr, PATH_COMPLETIONS, raw, None);
        assert_eq!(st, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["text"], "COPY a.");
        assert_eq!(v["usage"]["completion_tokens"], 2);

        let (st, _) = post(server.addr, "/v1/nope", "{}", None);
        assert_eq!(st, 404);
        let (st, _) = post(server.addr, PATH_COMPLETIONS, "not json", None);
        assert_eq!(st, 400);

        let stats = server.stats();
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.ok, 2);
        assert_eq!(stats.faults.status_429, 1);
        assert_eq!(stats.faults.bad_request, 1);
        assert_eq!(stats.faults.not_found, 1);
        assert_eq!(stats.per_path[PATH_CHAT], 2);
        assert_eq!(stats.per_model["m-ckpt-1"], 2);
        assert_eq!(stats.in_flight, 0);
        assert_eq!(server.last_request_body().unwrap()["model"], "c");
        server.shutdown();
    }

    #[test]
    fn auth_and_forced_failures() {
        let server = spawn_in_thread(MockConfig {
            api_key: Some("k-123".into()),
            fail_prompts_containing: Some("POISON".into()),
            ..Default::default()
        });
        let raw = r#"{"prompt":"a | b ASSISTANT:"}"#;
        assert_eq!(post(server.addr, PATH_COMPLETIONS, raw, None).0, 401);
        let (st, body) = post(server.addr, PATH_COMPLETIONS, raw, Some("Bearer nope"));
        assert_eq!(st, 401);
        assert!(!body.contains("nope"));
        assert_eq!(
            post(server.addr, PATH_COMPLETIONS, raw, Some("Bearer k-123")).0,
            200
        );
        let poison = r#"{"prompt":"POISON | b ASSISTANT:"}"#;
        assert_eq!(
            post(server.addr, PATH_COMPLETIONS, poison, Some("Bearer k-123")).0,
            500
        );
        let s = server.stats();
        assert_eq!(s.faults.unauthorized, 2);
        assert_eq!(s.faults.forced_500, 1);
        assert_eq!(s.per_model[""], 2);
    }

    #[test]
    fn draws_are_seeded_and_roughly_calibrated() {
        let cfg = MockConfig {
            seed: 7,
            p_429: 0.1,
            p_500: 0.2,
            p_malformed: 0.05,
            ..Default::default()
        };
        let a = Shared::new(cfg.clone());
        let b = Shared::new(cfg);
        let fa: Vec<_> = (0..10_000).map(|_| a.pick_fault()).collect();
        let fb: Vec<_> = (0..10_000).map(|_| b.pick_fault()).collect();
        assert_eq!(fa, fb);
        let n429 = fa
            .iter()
            .filter(|f| **f == Some(Fault::TooManyRequests))
            .count();
        let n500 = fa
            .iter()
            .filter(|f| **f == Some(Fault::ServerError))
            .count();
        let nbad = fa.iter().filter(|f| **f == Some(Fault::Malformed)).count();
        assert!((800..1200).contains(&n429), "{n429}");
        assert!((1800..2200).contains(&n500), "{n500}");
        assert!((350..650).contains(&nbad), "{nbad}");
        assert!(!fa.contains(&Some(Fault::Timeout)));
    }
}
