//! The round engine. A run is rounds x stages; the pure [`planner`] says what comes next from
//! what the store says has finished, and the driver here does the IO: model calls through
//! [`aligner_backend::TextGenerator`], every finished item committed to the store.
//!
//! Durability rule: a unit of work (a generation, a correction, a pair verdict) exists in the
//! store or it does not; the store's unique keys make a retried unit land once. A stage is
//! marked done only after its last unit is committed, so after a `kill -9` the driver re-plans,
//! skips what is committed, and retries what was in flight.

pub mod cluster;
mod evaluate;
mod executor;
pub mod filters;
mod ingest;
mod lease;
pub mod planner;
pub mod refusal;
pub use evaluate::{degenerate, gate_decision, omega, omega_interval, parse_verdict};
mod remote;
mod semantic;
pub mod serving;
mod stages;
mod teach;
mod train;
mod trainer_process;
pub use trainer_process::stop_orphaned_trainers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aligner_backend::TextGenerator;
use aligner_spec::{ModelSpec, Pipeline};
use aligner_store::{EventKind, GateDecision, Level, NewEvent, RunStatus, StageStatus, Store};

pub use lease::{holder_id, holder_is_dead};
pub use planner::{Finished, Plan, Stage, Step};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] aligner_store::Error),
    #[error(transparent)]
    Dataset(#[from] aligner_dataset::Error),
    #[error("run `{run}` was started from a different pipeline spec; changed: {changes}\nhint: undo those edits to resume it, or start a new run with `aligner run --new`")]
    SpecChanged { run: i64, changes: String },
    #[error("model `{name}`: {source:#}")]
    Backend {
        name: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("round {round} `{stage}`: {message}")]
    Stage {
        round: u32,
        stage: &'static str,
        message: String,
    },
    /// A stage failed inside a part the binary wired in (its embedder, its trainer); the
    /// part's own error chain is kept, so exit codes can read it.
    #[error("round {round} `{stage}`: {message}")]
    Component {
        round: u32,
        stage: &'static str,
        /// What the user reads: the chain, with a hint where there is one.
        message: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("interrupted; finished work is saved\nhint: `aligner resume {run} --store {}` continues it", store.display())]
    Interrupted { run: i64, store: PathBuf },
    #[error("lost the lease on run `{run}` to another process; stopped")]
    LeaseLost { run: i64 },
    #[error("run `{run}` reached its budget: it has cost {spent:.4} of `budget.max_cost: {max}`, so it stopped before the next stage; finished work is saved\nhint: `aligner sql \"SELECT * FROM costs WHERE run_id = {run}\"` shows where it went; raise `budget.max_cost` and resume it (`aligner resume {run} --store {}`)", store.display())]
    BudgetReached {
        run: i64,
        spent: f64,
        max: f64,
        store: PathBuf,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Makes a model backend from its spec. The CLI wires the real backends (HTTP, local) in; the
/// engine does not know them.
pub trait BackendFactory: Send + Sync {
    fn text_generator(
        &self,
        name: &str,
        spec: &ModelSpec,
    ) -> anyhow::Result<Arc<dyn TextGenerator>>;

    /// The sentence embedder in folder `dir` (`rounds.synthesize.semantic.embedder`,
    /// `prompts.leak_check.embedder`). Called once per stage that uses it; implementations may
    /// cache it.
    fn embedder(
        &self,
        dir: &std::path::Path,
    ) -> anyhow::Result<Arc<dyn aligner_backend::Embedder>> {
        Err(anyhow::anyhow!(
            "this build cannot run the embedder `{}`\nhint: remove the `semantic` block (or `prompts.leak_check`) that names it, or use the `aligner` binary, which runs it locally",
            dir.display()
        ))
    }

    /// The built-in trainer of `rounds.train.backend: {kind: builtin}`.
    fn trainer(&self) -> anyhow::Result<Arc<dyn Trainer>> {
        Err(anyhow::anyhow!("this build has no built-in trainer\nhint: use the `aligner` binary, or `backend: {{ kind: command, command: ... }}` with your own trainer"))
    }

    /// The HTTP side of `rounds.train.serve` (is a checkpoint served; load it).
    fn checkpoint_server(&self) -> anyhow::Result<Arc<dyn serving::CheckpointServer>> {
        Err(anyhow::anyhow!(
            "this build cannot serve checkpoints\nhint: use the `aligner` binary"
        ))
    }

    /// The client of a cluster scheduler (`rounds.train.backend: {kind: ray}`).
    fn cluster(
        &self,
        scheduler: &cluster::Scheduler,
    ) -> anyhow::Result<Arc<dyn cluster::ClusterJobs>> {
        Err(anyhow::anyhow!(
            "this build cannot submit jobs to {}\nhint: use the `aligner` binary",
            scheduler.describe()
        ))
    }
}

/// What the built-in trainer is asked to do for one round.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub round: u32,
    pub stage: aligner_spec::TrainStage,
    pub options: aligner_spec::BuiltinTrainer,
    /// The model to train (round 1: the configured generate model; later: the previous
    /// round's checkpoint).
    pub base: aligner_spec::LocalModel,
    /// The frozen DPO reference (`rounds.train.reference` resolved).
    pub reference: aligner_spec::LocalModel,
    pub pairs: Vec<aligner_dataset::PairRecord>,
    /// Where the checkpoint goes (a fresh folder per attempt).
    pub out_dir: PathBuf,
    /// Kept across attempts: resumable optimizer state and the reference log-probs.
    pub state_dir: PathBuf,
    /// Set when the run is interrupted; the trainer stops at the next step.
    pub interrupt: Arc<AtomicBool>,
}

/// What a trainer reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// One optimizer step's metrics, named as TRL names them.
    Metrics {
        step: u64,
        values: Vec<(String, f64)>,
    },
    /// A line for `training_logs`.
    Log(String),
}

/// One question-answer-correction row the pipeline's own Aligner trains on.
#[derive(Debug, Clone)]
pub struct AlignerExample {
    /// The turns before the question (role, content), oldest first; empty for one turn.
    pub history: Vec<(String, String)>,
    pub question: String,
    pub answer: String,
    pub correction: String,
}

/// What the built-in trainer is asked to do to train the pipeline's own Aligner (round 0).
#[derive(Debug, Clone)]
pub struct AlignerTrainRequest {
    pub spec: aligner_spec::AlignerTrain,
    pub template: aligner_spec::Template,
    /// The model the Aligner starts from.
    pub base: aligner_spec::LocalModel,
    /// Every training row.
    pub examples: Vec<AlignerExample>,
    /// Where the checkpoint goes (a fresh folder per attempt).
    pub out_dir: PathBuf,
    /// Kept across attempts: resumable optimizer state.
    pub state_dir: PathBuf,
    pub interrupt: Arc<AtomicBool>,
}

/// The built-in trainer (the CLI wires `aligner-train` in). Runs on a blocking thread.
pub trait Trainer: Send + Sync {
    fn train(
        &self,
        request: &TrainRequest,
        events: &mut dyn FnMut(TrainEvent),
    ) -> anyhow::Result<()>;

    /// Trains an Aligner: identity warm-up, then SFT on the corrections.
    fn train_aligner(
        &self,
        _request: &AlignerTrainRequest,
        _events: &mut dyn FnMut(TrainEvent),
    ) -> anyhow::Result<()> {
        Err(anyhow::anyhow!("this trainer cannot train an Aligner"))
    }
}

/// Progress reporting (the CLI draws bars; the daemon will stream events).
pub trait Observer: Send + Sync {
    fn stage_started(&self, _round: u32, _stage: Stage, _total: u64, _already_done: u64) {}
    fn advanced(&self, _ok: u64, _failed: u64) {}
    fn stage_finished(&self, _round: u32, _stage: Stage, _ok: u64, _failed: u64) {}
    fn note(&self, _message: &str) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// How to start or continue a run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Start a new run even when an unfinished one of this pipeline exists.
    pub new_run: bool,
    /// Continue exactly this run.
    pub run_id: Option<i64>,
    /// Items written per store transaction (default 256).
    pub batch_size: Option<usize>,
}

/// What `run` returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunOutcome {
    pub run_id: i64,
    pub resumed: bool,
    pub store: PathBuf,
    pub rounds: u32,
}

/// Resolves on the first Ctrl-C or SIGTERM: how every front end (a run, the daemon, the
/// server) learns it should stop.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminate = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// `aligner export`: run `run`'s kept pairs of `round` into `out`; refused (as a usage error)
/// before the round's synthesize stage is done, or when it kept none. Returns how many.
pub async fn export_pairs(
    store: &Store,
    run: &str,
    round: i64,
    (kind, format, conversational): (aligner_dataset::Kind, aligner_dataset::Format, bool),
    out: &std::path::Path,
) -> anyhow::Result<usize> {
    let row = store.find_run(run).await?;
    let refuse = |m: String| anyhow::Error::new(aligner_spec::Invalid::Message(m));
    if !store.stage_done(row.id, round, Stage::Synthesize).await? {
        return Err(refuse(format!(
            "run `{}` round {round} has not finished its synthesize stage, so its pairs are not final\nhint: `aligner status {}` shows where the run is; `aligner resume {}` finishes it",
            row.id, row.id, row.id
        )));
    }
    let pairs = pair_records(store, row.id, round).await?;
    if pairs.is_empty() {
        return Err(refuse(format!(
            "run `{}` round {round} has no kept pairs\nhint: `aligner status {}` shows its rounds",
            row.id, row.id
        )));
    }
    Ok(aligner_dataset::write_pairs(
        out,
        format,
        kind,
        conversational,
        &pairs,
    )?)
}

/// A round's kept pairs as export records (what a train command receives and `aligner
/// export` writes).
pub async fn pair_records(
    store: &Store,
    run_id: i64,
    round: i64,
) -> Result<Vec<aligner_dataset::PairRecord>> {
    Ok(store
        .kept_pairs(run_id, round)
        .await?
        .into_iter()
        .map(pair_record)
        .collect())
}

/// A prompt's earlier turns as stored in `prompts.history`; `None` for a single turn.
pub(crate) fn history_json(turns: &[(String, String)]) -> Option<String> {
    (!turns.is_empty()).then(|| {
        serde_json::Value::Array(
            turns
                .iter()
                .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                .collect(),
        )
        .to_string()
    })
}

/// The turns of a stored `prompts.history` (JSON `[{"role", "content"}]`), oldest first.
pub(crate) fn history_turns(history: Option<&str>) -> Vec<(String, String)> {
    let Some(text) = history else {
        return Vec::new();
    };
    let v: Vec<serde_json::Value> = serde_json::from_str(text).unwrap_or_default();
    v.iter()
        .filter_map(|m| {
            Some((
                m["role"].as_str()?.to_string(),
                m["content"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// A prompt's chat messages: its system prompt, the turns before it, and the prompt.
pub(crate) fn chat_messages(
    system: Option<&str>,
    history: Option<&str>,
    prompt: &str,
) -> Vec<aligner_backend::Message> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(aligner_backend::Message::new("system", system.to_string()));
    }
    for (role, content) in history_turns(history) {
        messages.push(aligner_backend::Message::new(role, content));
    }
    messages.push(aligner_backend::Message::new("user", prompt.to_string()));
    messages
}

/// A correction prompt: the template with the question (and, for a template that shows it,
/// the conversation before it) and the answer.
pub(crate) fn render_correction(
    template: &aligner_spec::Template,
    history: Option<&str>,
    question: &str,
    answer: &str,
) -> String {
    let turns = history_turns(history);
    let refs: Vec<(&str, &str)> = turns
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    template.render_turns(&refs, question, answer)
}

/// A stored pair as a training record.
pub(crate) fn pair_record(p: aligner_store::ExportPair) -> aligner_dataset::PairRecord {
    aligner_dataset::PairRecord {
        system: p.system,
        history: history_turns(p.history.as_deref()),
        prompt: p.prompt,
        chosen: p.chosen.unwrap_or_default(),
        rejected: p.rejected.unwrap_or_default(),
    }
}

/// The part of a spec snapshot that must not change while a run is continued. Connection
/// tuning (concurrency, rate limits, timeouts, retries) does not change what a model answers,
/// so it may be adjusted between a crash and its resume.
pub fn resume_relevant(snapshot: &serde_json::Value) -> serde_json::Value {
    let mut v = snapshot.clone();
    // Prices and the budget may change for a resume (a budget raised to go on).
    if let Some(top) = v.as_object_mut() {
        top.remove("prices");
        top.remove("budget");
    }
    if let Some(models) = v.get_mut("models").and_then(|m| m.as_object_mut()) {
        for model in models.values_mut() {
            if let Some(m) = model.as_object_mut() {
                for key in [
                    "max_concurrency",
                    "requests_per_minute",
                    "tokens_per_minute",
                    "timeout_secs",
                    "max_retries",
                ] {
                    m.remove(key);
                }
            }
        }
    }
    v
}

/// Drives one run of one pipeline against one store.
pub struct Engine {
    store: Store,
    spec: Pipeline,
    pipeline_path: PathBuf,
    factory: Arc<dyn BackendFactory>,
    observer: Arc<dyn Observer>,
    interrupt: Arc<AtomicBool>,
}

impl Error {
    /// A stage's failure inside a wired-in part, keeping the part's error chain.
    pub(crate) fn component(round: u32, stage: &'static str, source: anyhow::Error) -> Error {
        Error::Component {
            round,
            stage,
            message: format!("{source:#}"),
            source,
        }
    }
}

impl Engine {
    pub fn new(
        store: Store,
        spec: Pipeline,
        pipeline_path: &Path,
        factory: Arc<dyn BackendFactory>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Engine {
            store,
            spec,
            pipeline_path: pipeline_path.to_path_buf(),
            factory,
            observer,
            interrupt: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Uses `flag` as the interrupt flag (see [`Engine::interrupt_flag`]), for a caller that
    /// holds it before the engine exists.
    pub fn with_interrupt(mut self, flag: Arc<AtomicBool>) -> Self {
        self.interrupt = flag;
        self
    }

    /// Set this flag (e.g. on Ctrl-C) to stop feeding new items; in-flight ones finish and are
    /// committed, then `run` returns [`Error::Interrupted`].
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    fn interrupted_error(&self, run: i64) -> Error {
        let store = std::fs::canonicalize(self.store.path())
            .unwrap_or_else(|_| self.store.path().to_path_buf());
        Error::Interrupted { run, store }
    }

    pub fn plan(&self) -> Plan {
        Plan {
            rounds: self.spec.rounds.count,
            train: self.spec.rounds.train.is_some(),
            evaluate: self.spec.rounds.evaluate.is_some(),
            aligner: self.spec.aligner.is_some(),
        }
    }

    /// Records a new run of this pipeline without starting it (a daemon queues it, then
    /// drives it with `RunOptions { run_id: Some(id), .. }`).
    pub async fn create_run(&self) -> Result<i64> {
        let (snapshot, hash) = self.snapshot_and_hash();
        Ok(self
            .store
            .create_run(
                &self.spec.name,
                &self.pipeline_path.display().to_string(),
                &snapshot,
                &hash,
            )
            .await?)
    }

    /// The spec snapshot a run of this pipeline records, and the hash a resume must match.
    pub fn snapshot_and_hash(&self) -> (String, String) {
        let snapshot = self.spec.snapshot();
        let hash = aligner_spec::hash_snapshot(&resume_relevant(&snapshot));
        (snapshot.to_string(), hash)
    }

    /// Finds the run to continue (or creates one), takes its lease and drives it to the end.
    pub async fn run(&self, options: &RunOptions) -> Result<RunOutcome> {
        let snapshot = self.spec.snapshot();
        let hash = aligner_spec::hash_snapshot(&resume_relevant(&snapshot));
        let existing = match options.run_id {
            Some(id) => Some(self.store.run(id).await?),
            None if options.new_run => None,
            None => self.store.latest_unfinished_run(&self.spec.name).await?,
        };
        let (run_id, resumed) = match existing {
            Some(run) => {
                if run.spec_hash != hash {
                    let old: serde_json::Value =
                        serde_json::from_str(&run.spec_json).map_err(|e| {
                            Error::Other(format!(
                                "run `{}` has an unreadable spec snapshot: {e}",
                                run.id
                            ))
                        })?;
                    let changes = aligner_spec::diff_snapshots(
                        &resume_relevant(&old),
                        &resume_relevant(&snapshot),
                    )
                    .iter()
                    .map(|c| format!("`{}` ({} -> {})", c.path, c.old, c.new))
                    .collect::<Vec<_>>()
                    .join(", ");
                    return Err(Error::SpecChanged {
                        run: run.id,
                        changes,
                    });
                }
                // A run created ahead of its start (a daemon's queued run) has no events yet.
                let started = !self.store.events(run.id, 0, 1).await?.is_empty();
                (run.id, started)
            }
            None => (self.create_run().await?, false),
        };
        let lease = lease::Lease::acquire(&self.store, run_id, self.interrupt.clone()).await?;
        if !resumed && !options.new_run && options.run_id.is_none() {
            // We created a run because none was unfinished. If an older unfinished one exists
            // now, another `aligner run` of this pipeline created it at the same moment: the
            // younger run steps back, so one pipeline is never driven twice.
            if let Some(other) = self
                .store
                .older_unfinished_run(&self.spec.name, run_id)
                .await?
            {
                lease.release(&self.store).await;
                self.store.delete_empty_run(run_id).await?;
                return Err(Error::Store(aligner_store::Error::LeaseHeld {
                    run: other.id,
                    holder: other
                        .lease_holder
                        .unwrap_or_else(|| "another process".into()),
                    expires: "a few seconds".into(),
                }));
            }
        }
        let driven = self.drive(run_id, resumed, options, &lease).await;
        // Servers `rounds.train.serve` started are needed no longer (a resumed run starts them
        // again where it needs them).
        if let Err(err) = serving::stop_servers(&self.store, run_id).await {
            tracing::warn!("cannot stop the run's checkpoint servers: {err}");
        }
        let result = match driven {
            Err(Error::Interrupted { .. }) if lease.lost() => Err(Error::LeaseLost { run: run_id }),
            other => other,
        };
        // Release first: a failure to record the status must not leave the lease renewing.
        lease.release(&self.store).await;
        match &result {
            Ok(_) => {
                self.store
                    .set_run_status(run_id, RunStatus::Done, None)
                    .await?
            }
            // Resumable as it is (a budget stop once the budget is raised).
            Err(Error::Interrupted { .. })
            | Err(Error::LeaseLost { .. })
            | Err(Error::BudgetReached { .. }) => {}
            Err(e) => {
                self.store
                    .set_run_status(run_id, RunStatus::Failed, Some(&e.to_string()))
                    .await?;
                self.event(
                    run_id,
                    None,
                    None,
                    Level::Error,
                    EventKind::RunFailed,
                    &e.to_string(),
                    None,
                )
                .await;
            }
        }
        result.map(|()| RunOutcome {
            run_id,
            resumed,
            store: self.store.path().to_path_buf(),
            rounds: self.spec.rounds.count,
        })
    }

    async fn drive(
        &self,
        run_id: i64,
        resumed: bool,
        options: &RunOptions,
        lease: &lease::Lease,
    ) -> Result<()> {
        self.store
            .set_run_status(run_id, RunStatus::Running, None)
            .await?;
        let kind = if resumed {
            EventKind::RunResumed
        } else {
            EventKind::RunStarted
        };
        self.event(
            run_id,
            None,
            None,
            Level::Info,
            kind,
            &format!("{kind} by {}", lease.holder()),
            None,
        )
        .await;
        let prices: Vec<(String, f64, f64, f64)> = self
            .spec
            .prices
            .iter()
            .map(|(m, p)| (m.clone(), p.input, p.output, p.per_hour))
            .collect();
        self.store.set_model_prices(run_id, &prices).await?;
        let plan = self.plan();
        let batch = options.batch_size.unwrap_or(256).max(1);
        loop {
            if lease.lost() {
                return Err(Error::LeaseLost { run: run_id });
            }
            if self.interrupted() {
                return Err(self.interrupted_error(run_id));
            }
            let finished = self.finished(run_id).await?;
            match planner::next_step(&plan, &finished) {
                Step::Ingest => ingest::run(self, run_id).await?,
                Step::Stage { round, stage } => {
                    if let Some(budget) = &self.spec.budget {
                        let spent = self.store.run_cost(run_id).await?;
                        if spent >= budget.max_cost {
                            let e = Error::BudgetReached {
                                run: run_id,
                                spent,
                                max: budget.max_cost,
                                store: self.store.path().to_path_buf(),
                            };
                            self.event(run_id, Some(round), Some(stage), Level::Warn, EventKind::RunFailed, &e.to_string(), Some(serde_json::json!({"spent": spent, "max_cost": budget.max_cost}))).await;
                            return Err(e);
                        }
                    }
                    let ctx = stages::Ctx {
                        engine: self,
                        run_id,
                        round,
                        batch,
                    };
                    match stage {
                        Stage::Generate => stages::generate(&ctx).await?,
                        Stage::Correct => stages::correct(&ctx).await?,
                        Stage::Synthesize => stages::synthesize(&ctx).await?,
                        Stage::Train => train::run(&ctx).await?,
                        Stage::Teach => teach::teach(&ctx).await?,
                        Stage::TrainAligner => teach::train_aligner(&ctx).await?,
                        Stage::EvaluateAligner => teach::evaluate_aligner(&ctx).await?,
                        Stage::Evaluate => evaluate::evaluate(&ctx).await?,
                        // The planner returns ingest as `Step::Ingest`, never as a round's stage.
                        Stage::Ingest => ingest::run(self, run_id).await?,
                    }
                }
                Step::FinishRound(round) => {
                    self.store
                        .finish_round(run_id, round as i64, StageStatus::Done)
                        .await?;
                    self.event(
                        run_id,
                        Some(round),
                        None,
                        Level::Info,
                        EventKind::RoundFinished,
                        &format!("round {round} finished"),
                        None,
                    )
                    .await;
                }
                Step::FinishRun => {
                    self.event(
                        run_id,
                        None,
                        None,
                        Level::Info,
                        EventKind::RunFinished,
                        "run finished",
                        None,
                    )
                    .await;
                    return Ok(());
                }
            }
        }
    }

    /// The round whose checkpoint round `round` starts from: the one before it, or, when the
    /// gate rolled back after that round, the best round it named.
    pub(crate) async fn start_round(&self, run_id: i64, round: i64) -> Result<i64> {
        let prev = round - 1;
        Ok(self
            .store
            .gate_decisions(run_id)
            .await?
            .iter()
            .find(|g| g.round == prev && g.decision == GateDecision::Rollback)
            .and_then(|g| g.best_round)
            .unwrap_or(prev))
    }

    /// What the store says has finished.
    async fn finished(&self, run_id: i64) -> Result<Finished> {
        let mut f = Finished::default();
        for s in self.store.stages(run_id).await? {
            if s.status != StageStatus::Done {
                continue;
            }
            if s.stage == Stage::Ingest {
                f.ingested = true;
            } else {
                f.stages.insert((s.round as u32, s.stage));
            }
        }
        for r in self.store.rounds(run_id).await? {
            if r.status == StageStatus::Done {
                f.rounds.insert(r.round as u32);
            }
        }
        f.stopped_after = self
            .store
            .gate_decisions(run_id)
            .await?
            .iter()
            .find(|g| g.decision == GateDecision::Stop)
            .map(|g| g.round as u32);
        Ok(f)
    }

    fn backend(&self, name: &str) -> Result<Arc<dyn TextGenerator>> {
        let spec = self.spec.models.get(name).ok_or_else(|| Error::Backend {
            name: name.into(),
            source: anyhow::anyhow!("not defined in `models`"),
        })?;
        self.factory
            .text_generator(name, spec)
            .map_err(|source| Error::Backend {
                name: name.into(),
                source,
            })
    }

    /// Whether `name` is the pipeline's own trained Aligner (`aligner.name`).
    fn is_trained_aligner(&self, name: &str) -> bool {
        self.spec.aligner.as_ref().is_some_and(|a| a.name == name)
    }

    /// The backend of a model key, or of the trained Aligner (its round-0 checkpoint).
    async fn backend_for(&self, run_id: i64, name: &str) -> Result<Arc<dyn TextGenerator>> {
        if !self.is_trained_aligner(name) {
            return self.backend(name);
        }
        let ckpt = self
            .store
            .checkpoint(run_id, 0)
            .await?
            .ok_or_else(|| Error::Backend {
                name: name.into(),
                source: anyhow::anyhow!(
                    "the trained Aligner has no checkpoint yet (stage `train_aligner` of round 0)"
                ),
            })?;
        self.factory
            .text_generator(name, &ModelSpec::Local(train::checkpoint_model(&ckpt.path)))
            .map_err(|source| Error::Backend {
                name: name.into(),
                source,
            })
    }

    /// `backend` as the model `name` of the pipeline, with that model's concurrency.
    pub(crate) fn model(&self, backend: Arc<dyn TextGenerator>, name: &str) -> executor::Model {
        executor::Model {
            backend,
            concurrency: self.concurrency(name),
        }
    }

    fn concurrency(&self, name: &str) -> usize {
        if self.is_trained_aligner(name) {
            return 32;
        }
        match self.spec.models.get(name) {
            Some(ModelSpec::Openai(m)) => m.max_concurrency as usize,
            // The local engine batches whatever is in flight (16 sequences by default); twice
            // that keeps its batch full while finished answers are committed.
            Some(ModelSpec::Local(_)) => 32,
            None => 1,
        }
    }

    /// Tells the observer `message` and records it, with `data`, as an `info` event of `stage`.
    pub(crate) async fn announce(
        &self,
        (run_id, round, stage): (i64, u32, Stage),
        kind: EventKind,
        message: &str,
        data: Option<serde_json::Value>,
    ) {
        self.observer.note(message);
        self.event(
            run_id,
            Some(round),
            Some(stage),
            Level::Info,
            kind,
            message,
            data,
        )
        .await;
    }

    /// Appends to the event log; a failure to log never fails the run.
    #[allow(clippy::too_many_arguments)]
    async fn event(
        &self,
        run_id: i64,
        round: Option<u32>,
        stage: Option<Stage>,
        level: Level,
        kind: EventKind,
        message: &str,
        data: Option<serde_json::Value>,
    ) {
        let e = NewEvent {
            run_id: Some(run_id),
            round: round.map(i64::from),
            stage,
            level,
            kind,
            message,
            data,
        };
        if let Err(err) = self.store.add_event(&e).await {
            tracing::warn!("could not record event `{kind}`: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tuning_is_not_part_of_the_resume_hash() {
        let a = serde_json::json!({"models": {"up": {"kind": "openai", "model": "m", "max_concurrency": 4, "timeout_secs": 10.0}}});
        let b = serde_json::json!({"models": {"up": {"kind": "openai", "model": "m", "max_concurrency": 64, "timeout_secs": 60.0}}});
        let c = serde_json::json!({"models": {"up": {"kind": "openai", "model": "other", "max_concurrency": 4}}});
        assert_eq!(resume_relevant(&a), resume_relevant(&b));
        assert_ne!(resume_relevant(&a), resume_relevant(&c));
    }

    #[test]
    fn a_conversation_is_asked_and_corrected_with_its_earlier_turns() {
        let history = r#"[{"role": "user", "content": "Plan a day in Rome."}, {"role": "assistant", "content": "See the Colosseum."}]"#;
        let m = chat_messages(Some("Be brief."), Some(history), "Make it cheaper.");
        let got: Vec<(&str, &str)> = m
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("system", "Be brief."),
                ("user", "Plan a day in Rome."),
                ("assistant", "See the Colosseum."),
                ("user", "Make it cheaper."),
            ]
        );
        assert_eq!(chat_messages(None, None, "Hi").len(), 1);
        let t = aligner_spec::Template::AlignerV1Multiturn;
        let prompt = render_correction(&t, Some(history), "Make it cheaper.", "Walk.");
        assert!(
            prompt.contains("[Conversation]\nUser: Plan a day in Rome.\nAssistant: See the Colosseum.\n[End of conversation]\nMake it cheaper. | Walk. ASSISTANT:"),
            "{prompt}"
        );
    }
}
