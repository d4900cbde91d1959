//! The client side of the daemon's API (`aligner submit`, `runs`, `cancel`, `logs` with
//! `--daemon URL`), and the same control on a store no daemon drives.
//!
//! The event stream is read with `eventsource-stream`, which decodes UTF-8 across network
//! chunks (a character split between two chunks arrives whole).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aligner_spec::Invalid;
use aligner_store::{JobState, RunStatus, Store};
use anyhow::{anyhow, bail, Result};
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::Value;

/// The token a client sends: `ALIGNER_TOKEN`, else the token file (`file`, default
/// [`crate::default_token_path`]), created when `create` and missing (a daemon's first start).
pub fn resolve_token(file: Option<&Path>, create: bool) -> Result<String> {
    if let Ok(t) = std::env::var("ALIGNER_TOKEN") {
        let t = t.trim().to_string();
        if t.len() < 16 {
            bail!("ALIGNER_TOKEN is shorter than 16 characters\nhint: use a long random value, e.g. `openssl rand -hex 32`");
        }
        return Ok(t);
    }
    let path = token_path(file);
    if !create && !path.exists() {
        bail!(
            "no daemon token: ALIGNER_TOKEN is not set and {} does not exist\nhint: start the daemon once on this machine, or set ALIGNER_TOKEN to its token",
            path.display()
        );
    }
    crate::load_or_create_token(&path)
}

/// The token file: `file`, else [`crate::default_token_path`].
pub fn token_path(file: Option<&Path>) -> PathBuf {
    file.map(Path::to_path_buf)
        .unwrap_or_else(crate::default_token_path)
}

/// One server-sent event: its name and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub data: String,
}

/// A daemon's API.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(url: &str, token: String) -> Result<Client> {
        Ok(Client {
            base: url.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            anyhow!(
                "cannot reach the daemon at {}: {e}\nhint: is `aligner daemon` running there?",
                self.base
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(Invalid::Message(format!("daemon answered {status}: {message}")).into())
    }

    async fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await?
            .json()
            .await?)
    }

    async fn post(&self, path: &str, body: String) -> Result<Value> {
        Ok(self
            .send(self.http.post(format!("{}{path}", self.base)).body(body))
            .await?
            .json()
            .await?)
    }

    /// Queues a pipeline (its YAML text); relative paths in it resolve against `base_dir`.
    /// Answers `{run_id, name, ...}`.
    pub async fn submit(&self, pipeline: String, base_dir: &Path) -> Result<Value> {
        let path = format!(
            "/v1/runs?base_dir={}",
            form_urlencoded::byte_serialize(base_dir.display().to_string().as_bytes())
                .collect::<String>()
        );
        self.post(&path, pipeline).await
    }

    /// `{runs: [...]}`, each with its state and progress.
    pub async fn runs(&self) -> Result<Value> {
        self.get("/v1/runs").await
    }

    /// Asks the daemon to cancel a run.
    pub async fn cancel(&self, run: i64) -> Result<Value> {
        self.post(&format!("/v1/runs/{run}/cancel"), String::new())
            .await
    }

    /// A run's events: the stored log, then (with `follow`) live progress until it ends.
    pub async fn events(
        &self,
        run: i64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Event>>> {
        let resp = self
            .send(self.http.get(format!(
                "{}/v1/runs/{run}/events?follow={}",
                self.base,
                if follow { 1 } else { 0 }
            )))
            .await?;
        Ok(resp.bytes_stream().eventsource().map(|item| {
            item.map(|e| Event {
                event: e.event,
                data: e.data,
            })
            .map_err(|e| anyhow!("reading the daemon's event stream: {e}"))
        }))
    }
}

/// A run's stored events as `log` events, from a store no daemon serves; with `follow`,
/// new ones as they land (polled) until the run stops.
pub async fn store_events(
    store: Store,
    run: &str,
    follow: bool,
) -> Result<impl Stream<Item = Result<Event>>> {
    let id = store.find_run(run).await?.id;
    let state = (store, 0i64, VecDeque::<Event>::new(), false);
    Ok(futures::stream::try_unfold(
        state,
        move |(store, mut after, mut queue, mut ended)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Ok(Some((e, (store, after, queue, ended))));
                }
                if ended {
                    return Ok(None);
                }
                let events = store.events(id, after, 1000).await?;
                for e in &events {
                    after = e.id;
                    queue.push_back(Event {
                        event: "log".into(),
                        data: serde_json::to_string(e)?,
                    });
                }
                if !follow || store.run(id).await?.status != RunStatus::Running {
                    ended = events.is_empty();
                } else if events.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        },
    ))
}

/// `aligner resume`: the run `which` names in the store at `path`, and the pipeline file to
/// continue it with (`pipeline`, else the one it was started from, which must still exist).
pub async fn resume_target(
    path: &std::path::Path,
    which: &str,
    pipeline: Option<std::path::PathBuf>,
) -> Result<(i64, std::path::PathBuf)> {
    let ro = Store::open_read_only(path).await?;
    let row = ro.find_run(which).await?;
    ro.close().await;
    let file = pipeline.unwrap_or_else(|| std::path::PathBuf::from(&row.pipeline_path));
    if !file.exists() {
        return Err(Invalid::Message(format!(
            "run `{}` was started from `{}`, which no longer exists\nhint: pass `--pipeline FILE`",
            row.id,
            file.display()
        ))
        .into());
    }
    Ok((row.id, file))
}

/// Cancels a run in a store no daemon drives it from: refused when a process holds its lease
/// or a daemon is driving it; a daemon's queued or paused job is cancelled in its queue too.
pub async fn cancel_in_store(
    store: &Store,
    factory: &dyn aligner_engine::BackendFactory,
    run: &str,
) -> Result<i64> {
    let row = store.find_run(run).await?;
    if row.status != RunStatus::Running {
        return Err(Invalid::Message(format!("run {} is already {}", row.id, row.status)).into());
    }
    if let Some(job) = store.job(row.id).await? {
        match job.state {
            JobState::Queued | JobState::Paused => {
                store
                    .transition_job(row.id, &[JobState::Queued, JobState::Paused], JobState::Cancelled)
                    .await?;
            }
            JobState::Running => {
                return Err(Invalid::Message(format!(
                    "run {} is being driven by a daemon\nhint: cancel it through that daemon: --daemon URL",
                    row.id
                ))
                .into())
            }
            _ => {}
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let held = match (&row.lease_holder, row.lease_expires_ms) {
        (Some(h), Some(exp)) => exp > now && !aligner_engine::holder_is_dead(h),
        _ => false,
    };
    if held {
        return Err(Invalid::Message(format!(
            "run {} is being driven by {}\nhint: stop that process (Ctrl-C) first, or cancel through its daemon with --daemon",
            row.id,
            row.lease_holder.unwrap_or_default()
        ))
        .into());
    }
    store
        .set_run_status(
            row.id,
            RunStatus::Cancelled,
            Some("cancelled with `aligner cancel`"),
        )
        .await?;
    // A trainer the dead process started may still be running: it is ours, stop it.
    aligner_engine::stop_orphaned_trainers(store, factory, row.id).await?;
    Ok(row.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A character whose bytes arrive in two network chunks reaches the reader whole (the
    /// hand-written reader this replaced decoded each chunk on its own).
    #[tokio::test]
    async fn a_character_split_across_chunks_arrives_whole() {
        let chunks: Vec<Vec<u8>> = vec![
            b"event: log\ndata: caf\xc3".to_vec(),
            b"\xa9 \xe2\x9c".to_vec(),
            b"\x93\n\nevent: end\ndata: {}\n\n".to_vec(),
        ];
        let app = axum::Router::new().route(
            "/v1/runs/7/events",
            axum::routing::get(move || {
                let chunks = chunks.clone();
                async move {
                    // A pause between chunks, so each is its own read on the client.
                    axum::body::Body::from_stream(futures::stream::iter(chunks).then(
                        |c| async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, std::io::Error>(c)
                        },
                    ))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::new(&format!("http://{addr}"), "t".into()).unwrap();
        let events: Vec<Event> = client
            .events(7, false)
            .await
            .unwrap()
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            (events[0].event.as_str(), events[0].data.as_str()),
            ("log", "café ✓")
        );
        assert_eq!(events[1].event, "end");
    }
}
