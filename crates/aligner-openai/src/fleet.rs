//! One model served by several endpoints (replicas of one served model): each request goes
//! to the healthy replica with the fewest requests outstanding, within a global bound and
//! each replica's own; a replica that fails transiently (connection refused, timeout, 429,
//! 5xx) is taken out, the request goes to another one, and the replica is probed
//! (`GET /models`) after a cool-down and let back in when it answers. The answering replica
//! is recorded on the completion.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aligner_backend::{Completion, CompletionRequest, Error, ErrorKind, TextGenerator};
use tokio::sync::Semaphore;

use crate::{Config, OpenAiBackend, TokenBucket};

/// First cool-down of a replica taken out; doubled at each failed probe, up to a minute.
const COOL_DOWN: Duration = Duration::from_millis(500);
const MAX_COOL_DOWN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Health {
    /// Serving; `wait` is the cool-down it gets if it fails again (back to the first one only
    /// after a completion succeeds, so a replica whose `/models` answers but whose completions
    /// fail is not let back in at full rate).
    Up { wait: Duration },
    /// Out until `until`; `probing` while a probe is in flight.
    Down {
        until: Instant,
        wait: Duration,
        probing: bool,
    },
}

struct Replica {
    url: String,
    backend: OpenAiBackend,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
}

impl Replica {
    fn health(&self) -> Health {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, h: Health) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }

    /// Takes the replica out (again), with a longer cool-down each time it is still failing.
    fn take_out(&self) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let wait = match *h {
            Health::Up { wait } => wait,
            Health::Down { wait, .. } => (wait * 2).min(MAX_COOL_DOWN),
        };
        *h = Health::Down {
            until: Instant::now() + wait,
            wait,
            probing: false,
        };
    }
}

struct Inner {
    replicas: Vec<Replica>,
    global: Semaphore,
    rpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    probe: reqwest::Client,
    auth: Option<String>,
    model: String,
    /// Attempts per request across the fleet.
    max_attempts: u32,
    /// How long a request may wait for a replica to come back.
    timeout: Duration,
    next: AtomicUsize,
}

/// A [`TextGenerator`] over several replicas of one served model.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl Fleet {
    /// `config` is the model's (its `base_url` is ignored); `endpoints` are the replicas'
    /// base URLs; each takes at most `per_replica` requests at once.
    pub fn new(config: Config, endpoints: &[String], per_replica: u32) -> Result<Self, Error> {
        let mut replicas = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let mut c = config.clone();
            c.base_url = url.clone();
            c.max_concurrency = per_replica.max(1);
            // The fleet fails over instead of retrying on the same replica, and applies the
            // rate limits once for all of them.
            c.max_retries = 0;
            c.requests_per_minute = None;
            c.tokens_per_minute = None;
            replicas.push(Replica {
                url: url.trim_end_matches('/').to_string(),
                backend: OpenAiBackend::new(c)?,
                outstanding: AtomicUsize::new(0),
                health: Mutex::new(Health::Up { wait: COOL_DOWN }),
            });
        }
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error {
                kind: ErrorKind::Permanent,
                message: e.to_string(),
                attempts: 0,
            })?;
        Ok(Fleet {
            inner: Arc::new(Inner {
                global: Semaphore::new(config.max_concurrency.max(1) as usize),
                rpm: config.requests_per_minute.map(TokenBucket::per_minute),
                tpm: config.tokens_per_minute.map(TokenBucket::per_minute),
                probe,
                auth: config.api_key.clone().map(|k| format!("Bearer {k}")),
                model: config.model.clone(),
                max_attempts: (config.max_retries + 1).max(endpoints.len() as u32 + 1),
                timeout: config.timeout,
                next: AtomicUsize::new(0),
                replicas,
            }),
        })
    }

    /// The replica to send the next request to: the one with the fewest outstanding among
    /// those up (ties taken in turn). Replicas whose cool-down has passed are probed in the
    /// background; when none is up, this waits for one to come back, until `deadline`.
    async fn pick(&self, deadline: Instant) -> Option<&Replica> {
        let inner = &self.inner;
        loop {
            let now = Instant::now();
            let start = inner.next.fetch_add(1, Ordering::Relaxed);
            let n = inner.replicas.len();
            let mut best: Option<&Replica> = None;
            let mut soonest: Option<Instant> = None;
            for i in 0..n {
                let (idx, r) = ((start + i) % n, &inner.replicas[(start + i) % n]);
                match r.health() {
                    Health::Up { .. } => {
                        if best.is_none_or(|b| {
                            r.outstanding.load(Ordering::Relaxed)
                                < b.outstanding.load(Ordering::Relaxed)
                        }) {
                            best = Some(r);
                        }
                    }
                    Health::Down {
                        until,
                        wait,
                        probing,
                    } => {
                        if until <= now && !probing {
                            r.set(Health::Down {
                                until,
                                wait,
                                probing: true,
                            });
                            let fleet = self.clone();
                            tokio::spawn(async move { fleet.probe(idx).await });
                        }
                        soonest = Some(soonest.map_or(until, |s: Instant| s.min(until)));
                    }
                }
            }
            if let Some(r) = best {
                return Some(r);
            }
            if now >= deadline {
                return None;
            }
            let wait = soonest
                .map(|s| s.saturating_duration_since(now))
                .unwrap_or_default()
                .clamp(Duration::from_millis(20), Duration::from_millis(250));
            tokio::time::sleep(wait).await;
        }
    }

    /// Asks replica `idx` whether it serves again (`GET /models` answers 200); lets it back in
    /// when it does, keeps it out for longer when it does not.
    async fn probe(&self, idx: usize) {
        let r = &self.inner.replicas[idx];
        let mut req = self.inner.probe.get(format!("{}/models", r.url));
        if let Some(a) = &self.inner.auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let ok = req
            .send()
            .await
            .is_ok_and(|resp| resp.status().is_success());
        if ok {
            tracing::info!(target: "aligner::openai", "replica {} is back", r.url);
            let wait = match r.health() {
                Health::Down { wait, .. } => (wait * 2).min(MAX_COOL_DOWN),
                Health::Up { wait } => wait,
            };
            r.set(Health::Up { wait });
        } else {
            r.take_out();
        }
    }
}

#[async_trait::async_trait]
impl TextGenerator for Fleet {
    fn id(&self) -> String {
        let urls: Vec<&str> = self.inner.replicas.iter().map(|r| r.url.as_str()).collect();
        format!("openai:{}#{}", urls.join(","), self.inner.model)
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, Error> {
        let inner = &self.inner;
        let Ok(_permit) = inner.global.acquire().await else {
            return Err(Error {
                kind: ErrorKind::Permanent,
                message: "the backend was shut down".into(),
                attempts: 0,
            });
        };
        if let Some(b) = &inner.rpm {
            b.acquire(1.0).await;
        }
        if let Some(b) = &inner.tpm {
            b.acquire(crate::body::estimate_tokens(&request) as f64)
                .await;
        }
        let mut failures: Vec<String> = Vec::new();
        // With every replica out, a request waits for one to come back for as long as one
        // request may take, then fails (a run's Ctrl-C waits for its requests in flight).
        let deadline = Instant::now() + inner.timeout;
        for attempt in 0..inner.max_attempts {
            let Some(r) = self.pick(deadline).await else {
                failures.push("every replica is out and none came back in time".into());
                break;
            };
            r.outstanding.fetch_add(1, Ordering::Relaxed);
            let result = r.backend.complete(request.clone()).await;
            r.outstanding.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(mut c) => {
                    r.set(Health::Up { wait: COOL_DOWN });
                    c.attempts = attempt + 1;
                    c.replica = Some(r.url.clone());
                    return Ok(c);
                }
                Err(e) if e.kind == ErrorKind::Transient => {
                    tracing::warn!(target: "aligner::openai", "replica {} taken out: {}", r.url, e.message);
                    r.take_out();
                    failures.push(format!("{}: {}", r.url, e.message));
                }
                Err(mut e) => {
                    e.attempts = attempt + 1;
                    e.message = format!("{} (replica {})", e.message, r.url);
                    return Err(e);
                }
            }
        }
        Err(Error {
            kind: ErrorKind::Transient,
            message: format!("no replica answered: {}", failures.join("; ")),
            attempts: inner.max_attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aligner_backend::{Prompt, Sampling};
    use aligner_mockserver::{spawn_in_thread as spawn, MockConfig};

    fn request(i: usize) -> CompletionRequest {
        CompletionRequest {
            prompt: Prompt::Raw(format!("question {i}")),
            sampling: Sampling::default(),
            model: None,
        }
    }

    /// A replica that dies mid-way loses no request: its in-flight ones fail over, later ones
    /// go to the others, and each answer names the replica that gave it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_dies_is_taken_out_and_its_requests_answered_elsewhere() {
        let slow = MockConfig {
            latency: Duration::from_millis(20),
            ..Default::default()
        };
        let a = spawn(slow.clone());
        let b = spawn(slow.clone());
        let urls = vec![a.base_url.clone(), b.base_url.clone()];
        let mut config = Config::new("http://unused/v1", "m");
        config.max_concurrency = 8;
        config.timeout = Duration::from_secs(5);
        let fleet = Fleet::new(config, &urls, 4).unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let f = fleet.clone();
            tasks.push(tokio::spawn(async move { f.complete(request(i)).await }));
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let a_url = a.base_url.clone();
        tokio::task::spawn_blocking(move || a.shutdown())
            .await
            .unwrap();
        let mut by_replica = std::collections::BTreeMap::<String, usize>::new();
        for t in tasks {
            let c = t.await.unwrap().expect("every request is answered");
            *by_replica.entry(c.replica.unwrap()).or_default() += 1;
        }
        assert_eq!(by_replica.values().sum::<usize>(), 40);
        assert!(by_replica[&b.base_url] > 20, "{by_replica:?}");
        assert!(
            by_replica.get(&a_url).is_some_and(|n| *n > 0),
            "{by_replica:?}"
        );
        assert!(matches!(
            fleet.inner.replicas[0].health(),
            Health::Down { .. }
        ));
    }

    /// A replica that answers 500s is taken out and, once its probe answers, let back in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_replica_is_probed_and_let_back_in() {
        let flaky = spawn(MockConfig {
            script: vec![aligner_mockserver::Fault::ServerError; 2],
            ..Default::default()
        });
        let good = spawn(MockConfig::default());
        let urls = vec![flaky.base_url.clone(), good.base_url.clone()];
        let fleet = Fleet::new(Config::new("http://unused/v1", "m"), &urls, 4).unwrap();
        for i in 0..4 {
            fleet.complete(request(i)).await.unwrap();
        }
        assert!(matches!(
            fleet.inner.replicas[0].health(),
            Health::Down { .. }
        ));
        let back = Instant::now() + Duration::from_secs(10);
        let mut answered_by_flaky = 0;
        while answered_by_flaky == 0 {
            assert!(Instant::now() < back, "the replica never came back");
            let c = fleet.complete(request(9)).await.unwrap();
            if c.replica.as_deref() == Some(flaky.base_url.as_str()) {
                answered_by_flaky += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(matches!(
            fleet.inner.replicas[0].health(),
            Health::Up { .. }
        ));
    }
}

#[cfg(test)]
mod deadline {
    use super::*;

    /// With every replica gone, a request fails after the timeout instead of waiting forever.
    #[tokio::test]
    async fn a_request_to_a_fleet_that_is_all_down_fails_in_time() {
        let urls = vec![
            "http://127.0.0.1:1/v1".to_string(),
            "http://127.0.0.1:2/v1".to_string(),
        ];
        let mut config = Config::new("http://unused/v1", "m");
        config.timeout = Duration::from_secs(2);
        let fleet = Fleet::new(config, &urls, 1).unwrap();
        let started = Instant::now();
        let err = fleet
            .complete(CompletionRequest {
                prompt: aligner_backend::Prompt::Raw("x".into()),
                sampling: Default::default(),
                model: None,
            })
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.kind, ErrorKind::Transient);
        assert!(err.message.contains("127.0.0.1:1"), "{}", err.message);
    }
}
