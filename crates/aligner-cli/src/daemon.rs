//! `aligner daemon` (the service) and the commands that talk to one: `submit`, `runs`,
//! `cancel`, `logs`. Those four work against a daemon when one is configured (`--daemon URL`
//! or `ALIGNER_DAEMON`), standalone on a store otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aligner_daemon::client::Client;
use aligner_store::Store;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;

use crate::commands::{Invalid, StoreArg};

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// The address to listen on. Anything but loopback exposes the API to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8765)]
    pub port: u16,
    /// The SQLite store the daemon owns (created if missing).
    #[arg(long, env = "ALIGNER_STORE", default_value = "aligner.db")]
    pub store: PathBuf,
    /// Most runs driven at once.
    #[arg(long, default_value_t = 1)]
    pub max_running: usize,
    /// Seconds SIGTERM waits for in-flight items to finish before exiting anyway.
    #[arg(long, default_value_t = 30.0)]
    pub grace_secs: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A run the daemon died driving this many times (crash, kill -9, lost lease) is failed
    /// with the reason instead of started again.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_crashes: u32,
    /// Environment variables submitted pipelines' `${VAR}`s may read (a name, or a prefix
    /// ending in `*`; repeatable). Others read as unset.
    #[arg(long = "allow-env", value_name = "VAR", default_values_t = ["ALIGNER_*".to_string()])]
    pub allow_env: Vec<String>,
    #[command(flatten)]
    pub token: TokenArg,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TokenArg {
    /// The token file (default: $XDG_CONFIG_HOME/aligner/daemon-token). `ALIGNER_TOKEN`, when
    /// set, is used instead.
    #[arg(long, env = "ALIGNER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenArg {
    fn path(&self) -> PathBuf {
        aligner_daemon::client::token_path(self.token_file.as_deref())
    }

    /// `ALIGNER_TOKEN`, else the token file (created on a daemon's first start).
    fn token(&self, create: bool) -> Result<String> {
        aligner_daemon::client::resolve_token(self.token_file.as_deref(), create)
    }
}

impl DaemonArg {
    /// A client of the configured daemon, if there is one.
    fn client(&self) -> Result<Option<(Client, &str)>> {
        match &self.daemon {
            Some(url) => Ok(Some((Client::new(url, self.token.token(false)?)?, url))),
            None => Ok(None),
        }
    }
}

/// Where a daemon is, for the client commands.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArg {
    /// A running daemon's URL (e.g. http://127.0.0.1:8765). Without it the command works on
    /// the store directly.
    #[arg(long, env = "ALIGNER_DAEMON")]
    pub daemon: Option<String>,
    #[command(flatten)]
    pub token: TokenArg,
}

/// `aligner daemon`.
pub async fn serve(args: DaemonArgs) -> Result<()> {
    let token = args.token.token(true)?;
    let token_source = if std::env::var_os("ALIGNER_TOKEN").is_some() {
        "ALIGNER_TOKEN".to_string()
    } else {
        args.token.path().display().to_string()
    };
    if !aligner_server::auth::is_loopback(&args.host) {
        eprintln!(
            "warning: listening on {} exposes the API beyond this machine; every request still needs the token",
            args.host
        );
    }
    let base_dir = std::env::current_dir().context("cannot read the working directory")?;
    let config = aligner_daemon::Config {
        store: args.store.clone(),
        host: args.host.clone(),
        port: args.port,
        max_running: args.max_running.max(1),
        grace: Duration::from_secs_f64(args.grace_secs.max(0.0)),
        token,
        max_body_bytes: args.max_body_bytes,
        max_crashes: args.max_crashes,
        base_dir,
        allow_env: args.allow_env.clone(),
    };
    let store_display = std::fs::canonicalize(&args.store)
        .unwrap_or_else(|_| args.store.clone())
        .display()
        .to_string();
    aligner_daemon::run(
        config,
        Arc::new(crate::backends::Factory),
        async {
            aligner_engine::shutdown_signal().await;
            eprintln!(
                "stopping: in-flight items finish first (a second Ctrl-C or SIGTERM exits at once)"
            );
            tokio::spawn(async {
                aligner_engine::shutdown_signal().await;
                std::process::exit(130);
            });
        },
        move |addr| {
            println!("aligner daemon listening on http://{addr}");
            println!("store: {store_display}");
            println!("token: {token_source}");
            let _ = std::io::stdout().flush();
        },
    )
    .await?;
    println!("aligner daemon stopped");
    Ok(())
}

/// `aligner submit FILE`: queue on a daemon, or run here when none is configured.
pub async fn submit(file: &Path, daemon: &DaemonArg, store: &StoreArg) -> Result<()> {
    let Some((client, url)) = daemon.client()? else {
        eprintln!("no daemon configured (--daemon or ALIGNER_DAEMON): running here");
        return crate::commands::run_file(file, store).await;
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the pipeline file {}", file.display()))?;
    let dir = std::fs::canonicalize(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let v = client.submit(text, &dir).await?;
    println!(
        "queued run {} ({}) on {}\nfollow it: aligner logs -f {} --daemon {}",
        v["run_id"],
        v["name"].as_str().unwrap_or(""),
        url,
        v["run_id"],
        url
    );
    Ok(())
}

/// `aligner runs`.
pub async fn runs(daemon: &DaemonArg, store: &StoreArg, json: bool) -> Result<()> {
    let rows: Vec<[String; 5]> = match daemon.client()? {
        Some((client, _)) => {
            let v = client.runs().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            v["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let p = &r["progress"];
                    let progress = match p["stage"].as_str() {
                        Some(stage) => {
                            format!("round {} {stage} {}/{}", p["round"], p["done"], p["total"])
                        }
                        None => String::new(),
                    };
                    [
                        r["run_id"].to_string(),
                        r["name"].as_str().unwrap_or("").to_string(),
                        r["state"].as_str().unwrap_or("").to_string(),
                        progress,
                        r["submitted_at"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect()
        }
        None => {
            let store = Store::open_read_only(&crate::commands::store_path(store, None)).await?;
            let runs = store.list_runs().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
                return Ok(());
            }
            runs.into_iter()
                .map(|r| {
                    [
                        r.id.to_string(),
                        r.name,
                        r.status.to_string(),
                        r.lease_holder
                            .map(|h| format!("driven by {h}"))
                            .unwrap_or_default(),
                        r.created_at,
                    ]
                })
                .collect()
        }
    };
    if rows.is_empty() {
        println!("no runs yet");
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["run", "pipeline", "state", "progress", "submitted"]);
    for r in rows {
        table.add_row(r);
    }
    println!("{table}");
    Ok(())
}

/// A daemon addresses runs by id.
fn numeric(run: &str) -> Result<i64> {
    run.parse().map_err(|_| {
        Invalid::Message(format!(
            "`{run}` is not a run id\nhint: against a daemon, runs are named by id; `aligner runs` lists them"
        ))
        .into()
    })
}

/// `aligner cancel RUN`.
pub async fn cancel(run: &str, daemon: &DaemonArg, store: &StoreArg) -> Result<()> {
    match daemon.client()? {
        Some((client, _)) => {
            let run = numeric(run)?;
            let v = client.cancel(run).await?;
            match v["requested"].as_str() {
                Some(_) => println!("run {run}: cancel requested; in-flight items finish first"),
                None => println!("run {run}: {}", v["state"].as_str().unwrap_or("cancelled")),
            }
        }
        None => {
            let store = Store::open(&crate::commands::store_path(store, None)).await?;
            let id =
                aligner_daemon::client::cancel_in_store(&store, &crate::backends::Factory, run)
                    .await?;
            println!("run {id}: cancelled");
        }
    }
    Ok(())
}

/// `aligner logs RUN [-f]`: the run's events (and, from a daemon, its live progress).
pub async fn logs(run: &str, follow: bool, daemon: &DaemonArg, store: &StoreArg) -> Result<()> {
    if let Some((client, _)) = daemon.client()? {
        let run = numeric(run)?;
        let events = client.events(run, follow).await?;
        futures::pin_mut!(events);
        let mut ended = false;
        while let Some(e) = events.next().await {
            let e = e?;
            if !e.data.is_empty() {
                print_event(&e.event, &e.data);
                ended |= e.event == "end";
            }
        }
        if !ended {
            bail!("the daemon's event stream ended before the run did (the daemon stopped?)\nhint: run `aligner logs -f {run}` again once it is back");
        }
        return Ok(());
    }
    let store = Store::open_read_only(&crate::commands::store_path(store, None)).await?;
    let events = aligner_daemon::client::store_events(store, run, follow).await?;
    futures::pin_mut!(events);
    while let Some(e) = events.next().await {
        let e = e?;
        print_event(&e.event, &e.data);
    }
    Ok(())
}

fn print_event(event: &str, data: &str) {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.to_string()));
    let line = match event {
        "log" => format!(
            "{} {:5} {}{}",
            v["ts"].as_str().unwrap_or(""),
            v["level"].as_str().unwrap_or(""),
            match (v["round"].as_i64(), v["stage"].as_str()) {
                (Some(r), Some(s)) => format!("[round {r} {s}] "),
                (Some(r), None) => format!("[round {r}] "),
                _ => String::new(),
            },
            v["message"].as_str().unwrap_or("")
        ),
        "stage_started" | "progress" | "stage_finished" => format!(
            "{event}: round {} {} {}/{}{}",
            v["round"],
            v["stage"].as_str().unwrap_or(""),
            v["done"],
            v["total"],
            match v["failed"].as_u64() {
                Some(f) if f > 0 => format!(" ({f} failed)"),
                _ => String::new(),
            }
        ),
        "end" | "state" => format!(
            "run {} {}{}",
            v["run_id"],
            v["state"].as_str().unwrap_or(""),
            v["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        _ => format!("{event}: {data}"),
    };
    println!("{line}");
}
