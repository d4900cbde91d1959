//! `rounds.train.serve`: a round's checkpoint behind the upstream's endpoint before anything
//! asks it, checked every time a stage is about to (so a resumed run finds it served, or
//! serves it again). `command` starts a server for the checkpoint (its identity stored with
//! the checkpoint, so a resumed run reuses it and it is stopped before the next train stage,
//! at the run's end and by `aligner cancel`); `vllm_lora` and `sglang_reload` ask the running
//! server to load it. The HTTP calls go through [`CheckpointServer`], which the binary wires in.

use std::time::{Duration, Instant};

use aligner_spec::{ModelSpec, ServeHow, ServeSpec};
use aligner_store::CheckpointRow;
use serde::{Deserialize, Serialize};

use crate::trainer_process::{self, Identity};
use crate::{Engine, Error, Result};

/// The HTTP side of serving a checkpoint.
#[async_trait::async_trait]
pub trait CheckpointServer: Send + Sync {
    /// Whether the server at `base_url` answers for the checkpoint now: `/models` lists `name`
    /// (`command`, `vllm_lora`), or the served weights are `path` (`sglang_reload`). An
    /// unreachable server is `Ok(false)` for `command` (it may still be starting).
    async fn is_served(
        &self,
        how: &ServeHow,
        base_url: &str,
        name: &str,
        path: &str,
    ) -> std::result::Result<bool, String>;
    /// Asks the running server to load the checkpoint (`vllm_lora`, `sglang_reload`).
    async fn load(
        &self,
        how: &ServeHow,
        base_url: &str,
        name: &str,
        path: &str,
    ) -> std::result::Result<(), String>;
}

/// A started server, as `checkpoints.server` stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Server {
    pub url: String,
    pub process: Identity,
}

/// Where checkpoint `ckpt` answers: its server's base URL and model name, serving it first if
/// it is not served yet. `None` when the pipeline has no `serve` block (the user's server is
/// expected to answer under `serve_model`).
pub(crate) async fn ensure_served(
    e: &Engine,
    (round, stage): (u32, &'static str),
    ckpt: &CheckpointRow,
) -> Result<Option<(String, String)>> {
    let Some(serve) = e.spec.rounds.train.as_ref().and_then(|t| t.serve.as_ref()) else {
        return Ok(None);
    };
    let fail = |message: String| Error::Stage {
        round,
        stage,
        message,
    };
    let Some(name) = ckpt.serve_model.clone() else {
        return Ok(None);
    };
    let server = e
        .factory
        .checkpoint_server()
        .map_err(|source| Error::component(round, stage, source))?;
    let ModelSpec::Openai(upstream) = &e.spec.models[&e.spec.rounds.generate.model] else {
        return Ok(None);
    };
    let url = match &serve.how {
        ServeHow::Command { port, base_url, .. } => {
            base_url.replace("{port}", &served_port(*port, ckpt.round).to_string())
        }
        ServeHow::VllmLora { base_url } | ServeHow::SglangReload { base_url } => base_url
            .clone()
            .unwrap_or_else(|| upstream.base_url.trim_end_matches('/').to_string()),
    };
    let what = format!("checkpoint {} (round {})", ckpt.path, ckpt.round);
    match &serve.how {
        ServeHow::Command { command, port, .. } => {
            let listed = server.is_served(&serve.how, &url, &name, &ckpt.path).await;
            if listed.is_ok_and(|l| l) {
                // A server answering under the name must be the one this run started for this
                // checkpoint: another run's (same name, same port) answers with other weights.
                let ours = ckpt
                    .server
                    .as_deref()
                    .and_then(|r| serde_json::from_str::<Server>(r).ok())
                    .is_some_and(|r| r.url == url && r.process.is_alive());
                if ours {
                    return Ok(Some((url, name)));
                }
                return Err(fail(format!(
                    "{url} already serves `{name}`, but not from a server this run started for {what}\nhint: another run's server holds the port; stop it, or give this pipeline another `rounds.train.serve.port` or `serve_model`"
                )));
            }
            start(
                e,
                serve,
                server.as_ref(),
                ckpt,
                (&url, &name),
                (command, *port),
            )
            .await
            .map_err(|m| fail(format!("cannot serve {what}: {m}")))?;
        }
        how => {
            // Every replica of the upstream loads it, unless `base_url` names one server.
            let targets = match how {
                ServeHow::VllmLora { base_url: Some(u) }
                | ServeHow::SglangReload { base_url: Some(u) } => vec![u.clone()],
                _ => upstream
                    .endpoints()
                    .iter()
                    .map(|u| u.trim_end_matches('/').to_string())
                    .collect(),
            };
            for target in &targets {
                load_into(
                    server.as_ref(),
                    serve,
                    how,
                    target,
                    (&name, &ckpt.path),
                    &what,
                )
                .await
                .map_err(fail)?;
            }
            if targets.len() > 1 {
                return Ok(Some((url, name)));
            }
        }
    }
    e.observer.note(&format!(
        "round {round} {stage}: {what} served at {url} as `{name}`"
    ));
    Ok(Some((url, name)))
}

/// Asks the server at `url` to load the checkpoint unless it serves it already, and waits until
/// it answers for it.
async fn load_into(
    server: &dyn CheckpointServer,
    serve: &ServeSpec,
    how: &ServeHow,
    url: &str,
    (name, path): (&str, &str),
    what: &str,
) -> std::result::Result<(), String> {
    if server
        .is_served(how, url, name, path)
        .await
        .is_ok_and(|l| l)
    {
        return Ok(());
    }
    server.load(how, url, name, path).await.map_err(|m| {
        let hint = if m.contains(": HTTP ") {
            "vLLM needs `--enable-lora` (and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) and an adapter checkpoint; SGLang needs a checkpoint of the served architecture"
        } else {
            "the server did not answer: check that it runs and that `rounds.train.serve.base_url` (default: the upstream's `base_url` and `replicas`) reaches it"
        };
        format!("the server at {url} refused to load {what}: {m}\nhint: {hint}")
    })?;
    let deadline = Instant::now() + Duration::from_secs_f64(serve.timeout_secs);
    loop {
        match server.is_served(how, url, name, path).await {
            Ok(true) => return Ok(()),
            last if Instant::now() > deadline => {
                let why = last
                    .err()
                    .map(|e| format!(" (last check: {e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "the server at {url} accepted {what} but does not answer for it as `{name}` after {} s{why}",
                    serve.timeout_secs
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Round k's checkpoint listens on `port + k - 1`, so two versions can be up at once (an
/// evaluation that compares them).
fn served_port(port: u16, round: i64) -> i64 {
    i64::from(port) + round - 1
}

/// Starts the server command for `ckpt` and waits until it lists `name`; on failure it is
/// stopped and the error carries its last output.
async fn start(
    e: &Engine,
    serve: &ServeSpec,
    server: &dyn CheckpointServer,
    ckpt: &CheckpointRow,
    (url, name): (&str, &str),
    (command, port): (&str, u16),
) -> std::result::Result<(), String> {
    // A server this checkpoint had before (dead, or alive but not answering) goes first.
    stop_one(e, ckpt.id, ckpt.server.as_deref()).await;
    let values = vec![
        ("checkpoint", ckpt.path.clone()),
        ("port", served_port(port, ckpt.round).to_string()),
        ("name", name.to_string()),
        ("round", ckpt.round.to_string()),
    ];
    let rendered = crate::train::render_command(command, &values);
    let files = std::path::Path::new(&ckpt.path).with_file_name("serve");
    let (mut child, id) = trainer_process::spawn(&rendered, &[], 1, &files)
        .map_err(|err| format!("cannot start `sh -c {rendered}`: {err}"))?;
    let record = Server {
        url: url.to_string(),
        process: id.clone(),
    };
    let record = serde_json::to_string(&record).expect("a server record serializes");
    e.store
        .set_checkpoint_server(ckpt.id, Some(&record))
        .await
        .map_err(|err| err.to_string())?;
    let deadline = Instant::now() + Duration::from_secs_f64(serve.timeout_secs);
    let mut last_check = String::new();
    loop {
        let check = server.is_served(&serve.how, url, name, &ckpt.path).await;
        if let Err(e) = &check {
            last_check = e.clone();
        }
        if check.is_ok_and(|served| served) {
            // Reaped when it ends; the record stays until it is stopped.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            return Ok(());
        }
        let ended = matches!(child.try_wait(), Ok(Some(_)));
        if ended || Instant::now() > deadline || e.interrupted() {
            trainer_process::kill_group(id.pid, "TERM").await;
            let _ = child.wait().await;
            let _ = e.store.set_checkpoint_server(ckpt.id, None).await;
            let (out, _) = trainer_process::read_lines(&id.stdout, 0);
            let (err, _) = trainer_process::read_lines(&id.stderr, 0);
            let tail: Vec<String> = out.into_iter().chain(err).rev().take(15).collect();
            let tail: Vec<String> = tail.into_iter().rev().collect();
            let why = if ended {
                "the server exited".to_string()
            } else if e.interrupted() {
                "interrupted".to_string()
            } else {
                let last = if last_check.is_empty() {
                    String::new()
                } else {
                    format!(" (last check: {last_check})")
                };
                format!(
                    "`{url}/models` did not list `{name}` within {} s{last}",
                    serve.timeout_secs
                )
            };
            return Err(format!(
                "`{rendered}`: {why}; last output:\n  {}\nhint: its whole output is in `{}` and `{}`",
                tail.join("\n  "),
                id.stdout.display(),
                id.stderr.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Stops checkpoint `id`'s recorded server if it is provably ours and alive, and clears it.
async fn stop_one(e: &Engine, id: i64, record: Option<&str>) {
    stop_record(record).await;
    let _ = e.store.set_checkpoint_server(id, None).await;
}

/// Stops a recorded server that is provably ours and alive, and waits until it is gone (its
/// GPU memory and port free again): SIGTERM, then SIGKILL after 30 s.
async fn stop_record(record: Option<&str>) -> bool {
    let Some(server) = record.and_then(|r| serde_json::from_str::<Server>(r).ok()) else {
        return false;
    };
    let p = &server.process;
    if !p.is_alive() {
        return false;
    }
    trainer_process::kill_group(p.pid, "TERM").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.is_alive() {
        if Instant::now() > deadline {
            trainer_process::kill_group(p.pid, "KILL").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Stops every server a run's `serve: {kind: command}` started (before a train stage needs
/// the accelerators, at the run's end, on `aligner cancel`). Returns how many were running.
pub async fn stop_servers(store: &aligner_store::Store, run_id: i64) -> Result<usize> {
    let mut stopped = 0;
    for (id, _, record) in store.checkpoint_servers(run_id).await? {
        if stop_record(Some(&record)).await {
            stopped += 1;
        }
        store.set_checkpoint_server(id, None).await?;
    }
    Ok(stopped)
}

/// The model to ask instead of the configured one when checkpoint `ckpt` is served somewhere
/// else than the upstream's own URL (a `command` server, or a `serve.base_url`); serving it
/// first. `None`: ask the configured backend (under `serve_model`).
pub(crate) async fn served_model(
    e: &Engine,
    at: (u32, &'static str),
    ckpt: &CheckpointRow,
) -> Result<Option<ModelSpec>> {
    let Some((url, name)) = ensure_served(e, at, ckpt).await? else {
        return Ok(None);
    };
    let ModelSpec::Openai(upstream) = &e.spec.models[&e.spec.rounds.generate.model] else {
        return Ok(None);
    };
    if url == upstream.base_url.trim_end_matches('/') {
        return Ok(None);
    }
    let mut m = upstream.clone();
    m.base_url = url;
    m.model = name;
    // The checkpoint is served there only, not by the upstream's replicas.
    m.replicas.clear();
    Ok(Some(ModelSpec::Openai(m)))
}
