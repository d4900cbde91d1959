//! The subcommands: argument parsing (clap) and what each one does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use aligner_engine::{Engine, RunOptions};
use aligner_spec::Pipeline;
use aligner_store::Store;

use crate::output::{self, SqlFormat};
use crate::progress::Bars;

pub use aligner_spec::Invalid;

#[derive(Parser, Debug)]
#[command(name = "aligner", version, about = "Iterative Aligner bootstrapping: generate, correct, pair, train, repeat", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check pipeline files without running anything.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the validated spec as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a pipeline; continues its unfinished run in the store if there is one.
    Run {
        file: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Start a new run even if an unfinished one exists.
        #[arg(long)]
        new: bool,
        /// Print the outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Continue a run (by id or pipeline name) from where it stopped.
    Resume {
        run: String,
        #[command(flatten)]
        store: StoreArg,
        /// The pipeline file, if it moved since the run started.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Runs, rounds, stage progress and failures.
    Status {
        /// A run id or pipeline name; all runs when omitted.
        run: Option<String>,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// A run as a self-contained HTML page and its Markdown twin (`reports/<run id>/`).
    Report {
        /// A run id or pipeline name (its latest run); the store's latest run when omitted.
        run: Option<String>,
        #[command(flatten)]
        store: StoreArg,
        /// Where to write `index.html`, `index.md` and the charts (default `reports/<run id>/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Examples of corrections shown per round and kind (held-out answers, training pairs).
        #[arg(long, default_value_t = 20)]
        examples: usize,
    },
    /// Query the store read-only with SQL (the query, or stdin when omitted).
    Sql {
        query: Option<String>,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
        format: SqlFormat,
    },
    /// Export a round's kept pairs for TRL, OpenRLHF or LLaMA-Factory.
    Export {
        #[arg(long)]
        run: String,
        #[arg(long)]
        round: i64,
        #[arg(long, value_enum, default_value_t = ExportKind::Dpo)]
        kind: ExportKind,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// `[{role, content}]` messages instead of plain strings.
        #[arg(long)]
        conversational: bool,
        #[arg(long, short)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
    /// The orchestrator daemon: a queue of runs in one store behind an authenticated HTTP API.
    Daemon(crate::daemon::DaemonArgs),
    /// Queue a pipeline on a daemon (`--daemon` or ALIGNER_DAEMON); without one, run it here.
    Submit {
        file: PathBuf,
        #[command(flatten)]
        daemon: crate::daemon::DaemonArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// The runs of a daemon, or of a store.
    Runs {
        #[command(flatten)]
        daemon: crate::daemon::DaemonArg,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: through its daemon, or in a store when no process drives it.
    Cancel {
        run: String,
        #[command(flatten)]
        daemon: crate::daemon::DaemonArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// A run's event log; `-f` follows it (with live progress from a daemon) until it ends.
    Logs {
        run: String,
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        daemon: crate::daemon::DaemonArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Serve a local model over an OpenAI-compatible HTTP API.
    Serve(Box<crate::serve::ServeArgs>),
    /// Train an Aligner on question-answer-correction data with the built-in trainer.
    TrainAligner(crate::train::TrainAlignerArgs),
    /// One round's DPO or SFT over an exported pairs file with the built-in trainer, as a
    /// cluster job runs it (`rounds.train.backend: {kind: ray}`); metrics go to stdout as JSON.
    Train(Box<crate::train::TrainArgs>),
    /// A checkpoint as a re-quantized GGUF (default Q8_0) for fast local inference.
    ExportGguf(crate::train::ExportGgufArgs),
    /// The offline default models.
    #[command(subcommand)]
    Models(crate::fetch::ModelsCommand),
    /// Prompt sets (StrongREJECT, MT-bench, HarmBench) as prompts JSONL.
    #[command(subcommand)]
    Prompts(crate::fetch::PromptsCommand),
}

#[derive(clap::Args, Debug, Clone)]
pub struct StoreArg {
    /// The SQLite store (default: the pipeline's `store:`, else `aligner.db`).
    #[arg(long, env = "ALIGNER_STORE")]
    pub store: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ExportKind {
    Dpo,
    Sft,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ExportFormat {
    Jsonl,
    Parquet,
}

const DEFAULT_STORE: &str = "aligner.db";

pub(crate) fn store_path(arg: &StoreArg, spec: Option<&Pipeline>) -> PathBuf {
    arg.store
        .clone()
        .or_else(|| spec.and_then(|s| s.store.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
}

fn load(file: &Path) -> Result<Pipeline> {
    Pipeline::from_path(file).map_err(|errors| {
        eprintln!("{errors}");
        anyhow::Error::new(Invalid::Silent)
    })
}

pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Validate { files, json } => validate(&files, json),
        Command::Serve(args) => crate::serve::run(*args).await,
        Command::Daemon(args) => crate::daemon::serve(args).await,
        Command::Submit {
            file,
            daemon,
            store,
        } => crate::daemon::submit(&file, &daemon, &store).await,
        Command::Runs {
            daemon,
            store,
            json,
        } => crate::daemon::runs(&daemon, &store, json).await,
        Command::Cancel { run, daemon, store } => {
            crate::daemon::cancel(&run, &daemon, &store).await
        }
        Command::Logs {
            run,
            follow,
            daemon,
            store,
        } => crate::daemon::logs(&run, follow, &daemon, &store).await,
        Command::ExportGguf(args) => {
            tokio::task::spawn_blocking(move || crate::train::export_gguf(args)).await?
        }
        Command::TrainAligner(args) => {
            tokio::task::spawn_blocking(move || crate::train::train_aligner(args)).await?
        }
        Command::Train(args) => {
            tokio::task::spawn_blocking(move || crate::train::train(*args)).await?
        }
        Command::Models(c) => crate::fetch::models(c),
        Command::Prompts(c) => crate::fetch::prompts(c),
        Command::Run {
            file,
            store,
            new,
            json,
        } => {
            let spec = load(&file)?;
            run(
                &file,
                spec,
                &store,
                RunOptions {
                    new_run: new,
                    ..Default::default()
                },
                json,
            )
            .await
        }
        Command::Resume {
            run: which,
            store,
            pipeline,
            json,
        } => {
            let path = store_path(&store, None);
            let (run_id, file) =
                aligner_daemon::client::resume_target(&path, &which, pipeline).await?;
            let spec = load(&file)?;
            let store = StoreArg { store: Some(path) };
            run(
                &file,
                spec,
                &store,
                RunOptions {
                    run_id: Some(run_id),
                    ..Default::default()
                },
                json,
            )
            .await
        }
        Command::Status { run, store, json } => status(run.as_deref(), &store, json).await,
        Command::Report {
            run,
            store,
            out,
            examples,
        } => {
            let path = store_path(&store, None);
            let written = aligner_report::write(&path, run.as_deref(), out, examples).await?;
            println!("{}", written.html.display());
            println!("{}", written.markdown.display());
            Ok(())
        }
        Command::Sql {
            query,
            store,
            format,
        } => {
            let sql = match query {
                Some(q) if q != "-" => q,
                _ => std::io::read_to_string(std::io::stdin()).context("reading SQL from stdin")?,
            };
            let store = Store::open_read_only(&store_path(&store, None)).await?;
            let result = store.query_read_only(&sql).await?;
            output::print_query(&result, format)
        }
        Command::Export {
            run,
            round,
            kind,
            format,
            conversational,
            out,
            store,
        } => {
            let store = Store::open_read_only(&store_path(&store, None)).await?;
            let kind = match kind {
                ExportKind::Dpo => aligner_dataset::Kind::Dpo,
                ExportKind::Sft => aligner_dataset::Kind::Sft,
            };
            let format = match format {
                ExportFormat::Jsonl => aligner_dataset::Format::Jsonl,
                ExportFormat::Parquet => aligner_dataset::Format::Parquet,
            };
            let how = (kind, format, conversational);
            let n = aligner_engine::export_pairs(&store, &run, round, how, &out).await?;
            eprintln!("wrote {n} records to `{}`", out.display());
            Ok(())
        }
    }
}

fn validate(files: &[PathBuf], json: bool) -> Result<()> {
    let (out, errors, bad) = aligner_spec::check_files(files, json);
    print!("{out}");
    eprint!("{errors}");
    if bad > 0 {
        let n = files.len();
        let message = format!("{bad} of {n} pipeline file(s) did not validate");
        return Err(Invalid::Message(message).into());
    }
    Ok(())
}

/// `aligner run FILE` with the default options (what `aligner submit` does without a daemon).
pub(crate) async fn run_file(file: &Path, store: &StoreArg) -> Result<()> {
    let spec = load(file)?;
    run(file, spec, store, RunOptions::default(), false).await
}

async fn run(
    file: &Path,
    spec: Pipeline,
    store: &StoreArg,
    options: RunOptions,
    json: bool,
) -> Result<()> {
    let path = store_path(store, Some(&spec));
    let store = Store::open(&path).await?;
    let bars = Arc::new(Bars::new(json));
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let engine = Engine::new(
        store.clone(),
        spec,
        &file,
        Arc::new(crate::backends::Factory),
        bars.clone(),
    );
    let flag = engine.interrupt_flag();
    tokio::spawn(async move {
        // Ctrl-C or SIGTERM: stop feeding items, commit what is in flight, release the lease.
        aligner_engine::shutdown_signal().await;
        eprintln!("interrupt: finishing in-flight items (press Ctrl-C again to abort)");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    let outcome = engine.run(&options).await;
    bars.clear();
    let mut outcome = outcome?;
    outcome.store = std::fs::canonicalize(&path).unwrap_or(path);
    let (run_id, outcome) = (outcome.run_id, serde_json::to_value(&outcome)?);
    let text = aligner_report::terminal::finished(&store, run_id, outcome, json).await?;
    store.close().await;
    print!("{text}");
    Ok(())
}

async fn status(which: Option<&str>, store: &StoreArg, json: bool) -> Result<()> {
    let store = Store::open_read_only(&store_path(store, None)).await?;
    let runs = match which {
        Some(w) => vec![store.find_run(w).await?],
        None => store.list_runs().await?,
    };
    let mut detail = Vec::new();
    for run in runs {
        detail.push(aligner_report::terminal::Status::load(&store, run).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
    } else if detail.is_empty() {
        println!("no runs yet");
    } else {
        for status in &detail {
            print!("{}", status.text());
        }
    }
    Ok(())
}
