//! `aligner daemon`: a long-running service that owns one store and drives the pipeline runs
//! submitted to it.
//!
//! - **Queue.** A submitted pipeline is validated, recorded as a run and queued in the store
//!   (`daemon_jobs`). At most `max_running` runs are driven at once, each by the same engine
//!   `aligner run` uses, so every stage is resumable. A job's lease names the daemon process
//!   that claimed it; after a crash (even `kill -9`) the next start finds the holder dead and
//!   queues the job again, and the engine resumes the run where its store says it stopped.
//! - **Control.** Cancel and pause set the engine's interrupt flag: items in flight finish and
//!   are committed, then the run stops; resume queues a paused run again.
//! - **Shutdown.** On SIGTERM the daemon stops claiming work, interrupts its runs, waits up to
//!   the grace period for them to commit, queues them again for the next start and exits.
//! - **API.** Under `/v1/`, every request needs the bearer token (see [`auth`]); `GET /` is a
//!   small dashboard. Routes are listed in [`api`]; [`client`] is the other side.

pub mod api;
pub mod auth;
pub mod client;
mod jobs;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aligner_engine::BackendFactory;
use aligner_store::Store;
use anyhow::{Context, Result};
use tokio::sync::Notify;

pub use auth::{default_token_path, load_or_create_token};

/// How the daemon runs.
#[derive(Clone)]
pub struct Config {
    /// The store it owns (created if missing).
    pub store: PathBuf,
    pub host: String,
    pub port: u16,
    /// Most runs driven at once.
    pub max_running: usize,
    /// How long SIGTERM waits for in-flight items before exiting anyway.
    pub grace: Duration,
    /// The bearer token every API request must carry.
    pub token: String,
    /// Largest request body accepted (a pipeline, a SQL query).
    pub max_body_bytes: usize,
    /// A job whose daemon died this many times while driving it is failed, not queued again.
    pub max_crashes: u32,
    /// Where submitted pipelines' relative paths resolve unless the request names a folder.
    pub base_dir: PathBuf,
    /// Environment variables a submitted pipeline's `${VAR}`s may read: names, or prefixes
    /// ending in `*`. Anything else reads as unset, so a submission cannot read the daemon's
    /// secrets back through an error message or a URL.
    pub allow_env: Vec<String>,
}

/// The `${VAR}` lookup for submitted pipelines (see [`Config::allow_env`]).
pub fn env_lookup(config: &Config) -> impl Fn(&str) -> Option<String> + '_ {
    move |name: &str| {
        let allowed = config.allow_env.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name,
        });
        if allowed {
            std::env::var(name).ok()
        } else {
            None
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("max_running", &self.max_running)
            .field("grace", &self.grace)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Why a running job was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Pause,
    Cancel,
    Shutdown,
}

/// A run this process is driving.
pub(crate) struct Active {
    pub interrupt: Arc<AtomicBool>,
    pub stop: Mutex<Option<Stop>>,
    pub progress: Mutex<serde_json::Value>,
    pub events: tokio::sync::broadcast::Sender<serde_json::Value>,
}

impl Active {
    pub fn stop(&self, why: Stop) {
        let mut s = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        // A cancel outranks a pause; a shutdown never overrides what a user asked for.
        if s.is_none() || (why == Stop::Cancel && *s == Some(Stop::Pause)) {
            *s = Some(why);
        }
        self.interrupt.store(true, Ordering::Relaxed);
    }
}

pub(crate) struct Shared {
    pub store: Store,
    /// A read-only handle for `/v1/sql`.
    pub read_only: Store,
    pub factory: Arc<dyn BackendFactory>,
    pub config: Config,
    pub holder: String,
    pub active: Mutex<HashMap<i64, Arc<Active>>>,
    pub wake: Notify,
    pub draining: AtomicBool,
    /// Permits for open event streams.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub fn active(&self, run_id: i64) -> Option<Arc<Active>> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&run_id)
            .cloned()
    }
    /// The runs this process drives, with their ids.
    pub fn actives(&self) -> Vec<(i64, Arc<Active>)> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, a)| (*id, a.clone()))
            .collect()
    }

    pub fn active_count(&self) -> usize {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Serves until `shutdown` resolves, then drains (see the crate docs). `listening` is called
/// with the bound address once the socket accepts connections.
pub async fn run(
    config: Config,
    factory: Arc<dyn BackendFactory>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let store = Store::open(&config.store).await?;
    let read_only = Store::open_read_only(&config.store).await?;
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| {
            format!("cannot listen on {addr}\nhint: pick another --port, or stop what holds it")
        })?;
    let local = listener.local_addr()?;
    let grace = config.grace;
    let shared = Arc::new(Shared {
        store,
        read_only,
        factory,
        config,
        holder: aligner_engine::holder_id(),
        active: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        draining: AtomicBool::new(false),
        streams: Arc::new(tokio::sync::Semaphore::new(api::MAX_STREAMS)),
    });
    let (requeued, failed) = jobs::recover(&shared, true).await?;
    if requeued > 0 {
        tracing::info!("queued {requeued} run(s) again that a stopped daemon was driving");
    }
    if failed > 0 {
        tracing::warn!(
            "failed {failed} run(s) that a daemon died driving {} times",
            shared.config.max_crashes
        );
    }
    let scheduler = tokio::spawn(jobs::schedule(shared.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = api::router(shared.clone());
    let server = {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    listening(local);
    shutdown.await;
    tracing::info!("shutting down: no new work; waiting up to {grace:?} for in-flight items");
    shared.draining.store(true, Ordering::Relaxed);
    // No claim may complete after the drain looked at the running jobs.
    scheduler.abort();
    let _ = scheduler.await;
    let drained = jobs::drain(&shared, grace).await;
    let _ = stop_tx.send(true);
    // Event streams may stay open; give the server a moment, then go regardless.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    drop(stop_rx);
    shared.store.close().await;
    if !drained {
        tracing::warn!("grace period over with runs still in flight; the next start resumes them");
    }
    Ok(())
}
