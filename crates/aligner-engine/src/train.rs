//! The train stage. `backend: command` exports the round's kept pairs, runs the user's trainer
//! with templated arguments, streams its output into `training_logs`, checks the exit code and
//! the checkpoint folder, and registers the checkpoint as the next round's upstream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aligner_dataset::{Format, Kind};
use aligner_spec::{
    ExportFormat, ExternalTrainer, ModelSpec, ReferencePolicy, TrainBackend, TrainMethod,
    TrainStage,
};
use aligner_store::{EventKind, Level, NewTrainingJob, StageEnd, StageStatus};

use crate::cluster::Scheduler;
use crate::stages::Ctx;
use crate::trainer_process::{self, Identity};
use crate::{Error, Result, Stage};

/// Quotes a value for `sh` (single quotes; embedded ones closed and escaped).
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The placeholders a train command may use, and the matching `ALIGNER_*` environment variables.
pub(crate) fn placeholders(
    train: &TrainStage,
    data: &Path,
    base: &str,
    reference: &str,
    out: &Path,
    round: u32,
) -> Vec<(&'static str, String)> {
    vec![
        ("data", data.display().to_string()),
        ("base_model", base.to_string()),
        ("ref_model", reference.to_string()),
        ("output_dir", out.display().to_string()),
        ("round", round.to_string()),
        ("method", enum_str(&train.method)),
        ("loss", enum_str(&train.loss)),
        ("beta", train.beta.to_string()),
        ("learning_rate", train.learning_rate.to_string()),
        ("epochs", train.epochs.to_string()),
        ("batch_size", train.batch_size.to_string()),
        (
            "gradient_accumulation",
            train.gradient_accumulation.to_string(),
        ),
        ("max_length", train.max_length.to_string()),
        ("warmup_ratio", train.warmup_ratio.to_string()),
    ]
}

pub(crate) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(crate) fn render_command(template: &str, values: &[(&'static str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), &sh_quote(v));
    }
    out
}

fn run_dir(ctx: &Ctx<'_>) -> PathBuf {
    let e = ctx.engine;
    e.spec
        .workdir
        .join(format!("{}-{}", e.spec.name, ctx.run_id))
        .join(format!("round-{}", ctx.round))
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round as i64);
    let train = e
        .spec
        .rounds
        .train
        .as_ref()
        .expect("planned only with a train block");
    let stage_err = |message: String| Error::Stage {
        round: ctx.round,
        stage: "train",
        message,
    };
    // The accelerators go to training: checkpoint servers started for earlier rounds stop.
    crate::serving::stop_servers(&e.store, run_id).await?;
    let (external, scheduler) = match &train.backend {
        TrainBackend::Builtin(options) => return run_builtin(ctx, train, options).await,
        TrainBackend::Command(t) => (t, None),
        TrainBackend::Ray { trainer, cluster } => (trainer, Some(Scheduler::Ray(cluster.clone()))),
        TrainBackend::Slurm { trainer, cluster } => {
            (trainer, Some(Scheduler::Slurm(cluster.clone())))
        }
    };
    let ExternalTrainer {
        command,
        format,
        conversational,
        serve_model,
    } = external;
    e.store
        .start_stage(run_id, round, Stage::Train, Some(1))
        .await?;
    e.observer.stage_started(ctx.round, Stage::Train, 1, 0);

    // The model this round trained from, and the DPO reference it resolves to.
    let initial = match &e.spec.models[&e.spec.rounds.generate.model] {
        // Its weights, not the name its server gives them (validation requires `weights`).
        ModelSpec::Openai(m) => m.weights.clone().unwrap_or_else(|| m.model.clone()),
        ModelSpec::Local(m) => match &m.source {
            aligner_spec::LocalSource::Gguf { path, .. }
            | aligner_spec::LocalSource::HfFolder { path, .. } => path.display().to_string(),
            aligner_spec::LocalSource::HubId { id, .. } => id.clone(),
        },
    };
    let base = if ctx.round == 1 {
        initial.clone()
    } else {
        e.store
            .checkpoint(run_id, e.start_round(run_id, round).await?)
            .await?
            .map(|c| c.path)
            .ok_or_else(|| {
                stage_err(format!(
                    "round {} left no checkpoint to train from",
                    ctx.round - 1
                ))
            })?
    };
    let reference = match train.reference {
        ReferencePolicy::Initial => initial.clone(),
        ReferencePolicy::Previous => base.clone(),
    };

    let dir = run_dir(ctx);
    let ext = match format {
        ExportFormat::Jsonl => "jsonl",
        ExportFormat::Parquet => "parquet",
    };
    let data = dir.join(format!("pairs.{ext}"));
    // Each attempt trains into a fresh folder, moved to `checkpoint` only on success: a killed
    // attempt's partial files can never be registered, and trainers that refuse a non-empty
    // output folder work on resume.
    let out = dir.join("checkpoint");
    let previous = e.store.training_job(run_id, round).await?;
    if let Some(scheduler) = scheduler {
        let paths = RoundPaths {
            base: &base,
            reference: &reference,
            dir: &dir,
            data: &data,
            out: &out,
        };
        return crate::remote::run(ctx, train, external, scheduler, paths, previous).await;
    }
    // The trainer this round started last time, when the job never finished: still running
    // (followed again), or ended while no orchestrator watched (its result is taken as it is).
    let last = previous
        .as_ref()
        .filter(|j| j.status == StageStatus::Running)
        .and_then(|j| j.process.as_deref())
        .and_then(|p| serde_json::from_str::<Identity>(p).ok())
        .filter(|id| id.is_alive() || id.exit_code().is_some());
    let (job, id, child, offsets) = match (previous, last) {
        (Some(job), Some(id)) => {
            let how = if id.is_alive() {
                format!(
                    "following its trainer again (pid {}, still running)",
                    id.pid
                )
            } else {
                format!(
                    "its trainer (pid {}) ended while no orchestrator watched; taking its result",
                    id.pid
                )
            };
            let message = format!("round {} train: attempt {} {how}", ctx.round, id.attempt);
            e.observer.note(&message);
            e.event(
                run_id,
                Some(ctx.round),
                Some(Stage::Train),
                Level::Info,
                EventKind::TrainStarted,
                &message,
                Some(serde_json::json!({"attempt": id.attempt, "reattached": true, "pid": id.pid})),
            )
            .await;
            let offsets = (job.stdout_offset, job.stderr_offset);
            (job, id, None, offsets)
        }
        (previous, _) => {
            let attempt = previous.map_or(1, |j| j.attempts + 1);
            // Earlier attempts' folders and output files go now: only the last failed
            // attempt is kept (for a look) until the next one starts.
            remove_attempts(&dir).map_err(stage_err)?;
            let attempt_dir = dir.join(format!("checkpoint.attempt-{attempt}"));
            let pairs = export_pairs(ctx, train, (*format, *conversational), &data).await?;
            let values = placeholders(train, &data, &base, &reference, &attempt_dir, ctx.round);
            let rendered = render_command(command, &values);
            let job = start_job(
                ctx,
                train,
                RoundJob {
                    backend: "command",
                    reference: &reference,
                    base: &base,
                    data: &data,
                    pairs: pairs.len(),
                    out: &out,
                    command: Some(&rendered),
                },
            )
            .await?;
            e.observer.note(&format!(
                "round {} train: {} pairs -> `{}`",
                ctx.round,
                pairs.len(),
                rendered
            ));
            e.event(run_id, Some(ctx.round), Some(Stage::Train), Level::Info, EventKind::TrainStarted, &rendered, Some(serde_json::json!({"attempt": job.attempts, "pairs": pairs.len(), "reference": reference}))).await;
            let env: Vec<(String, String)> = values
                .iter()
                .map(|(k, v)| (format!("ALIGNER_{}", k.to_uppercase()), v.clone()))
                .collect();
            let (child, id) =
                trainer_process::spawn(&rendered, &env, job.attempts, &attempt_dir)
                    .map_err(|err| stage_err(format!("cannot start `sh -c {rendered}`: {err}")))?;
            let identity = serde_json::to_string(&id).expect("an identity serializes");
            e.store
                .set_training_process(job.id, Some(&identity))
                .await?;
            (job, id, Some(child), (0, 0))
        }
    };
    let attempt_dir = id.attempt_dir.clone();
    let (code, tail) = follow(ctx, &job, &id, child, offsets).await?;
    e.store.set_training_process(job.id, None).await?;
    let tail_text = tail.join("\n  ");
    if e.interrupted() {
        e.store
            .finish_training_job(job.id, StageStatus::Failed, code, Some("interrupted"))
            .await?;
        return Err(e.interrupted_error(run_id));
    }
    let failure = if code != Some(0) {
        Some(format!("train command exited with {}; last output:\n  {tail_text}\nhint: the full log is in `training_logs` (job {})", code.map_or("a signal".into(), |c| c.to_string()), job.id))
    } else if !attempt_dir.is_dir()
        || std::fs::read_dir(&attempt_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    {
        Some(format!("train command exited 0 but wrote no checkpoint into `{}`\nhint: the command must write the trained model into `{{output_dir}}`", attempt_dir.display()))
    } else {
        move_into_place(&attempt_dir, &out).map_err(stage_err)?;
        // Its output is in `training_logs`: the files go with the folder.
        remove_attempts(&dir).map_err(stage_err)?;
        None
    };
    if let Some(message) = failure {
        e.store
            .finish_training_job(job.id, StageStatus::Failed, code, Some(&message))
            .await?;
        return Err(train_failed(ctx, message).await?);
    }
    let serve = serve_model.as_ref().map(|s| {
        s.replace("{round}", &ctx.round.to_string())
            .replace("{output_dir}", &out.display().to_string())
    });
    register(ctx, job.id, code.unwrap_or(0), &out, serve).await
}

/// Follows a trainer until it ends: its output files into `training_logs` (from the offsets
/// already stored), SIGTERM to its group when the run is interrupted. Returns its exit status
/// (`None`: killed by a signal) and the last lines of its output.
async fn follow(
    ctx: &Ctx<'_>,
    job: &aligner_store::TrainingJobRow,
    id: &Identity,
    mut child: Option<tokio::process::Child>,
    mut offsets: (i64, i64),
) -> Result<(Option<i64>, Vec<String>)> {
    let e = ctx.engine;
    let mut output = OutputLog::new(&e.store, job.id).await?;
    let mut stopping = false;
    let mut status = None;
    loop {
        // Whether it has ended is asked before reading, so the last read sees everything.
        let ended = match &mut child {
            Some(c) => match c.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s.code().map(i64::from));
                    true
                }
                Ok(None) => false,
                Err(_) => !id.is_alive(),
            },
            None => !id.is_alive(),
        };
        let (out, out_at) = trainer_process::read_lines(&id.stdout, offsets.0);
        let (err, err_at) = trainer_process::read_lines(&id.stderr, offsets.1);
        if (out_at, err_at) != offsets {
            let lines: Vec<(String, String)> = out
                .into_iter()
                .map(|l| ("stdout".to_string(), l))
                .chain(err.into_iter().map(|l| ("stderr".to_string(), l)))
                .collect();
            offsets = (out_at, err_at);
            output
                .record(&e.store, job.id, id.attempt, &lines, offsets)
                .await?;
        }
        if ended {
            break;
        }
        if e.interrupted() && !stopping {
            stopping = true;
            trainer_process::kill_group(id.pid, "TERM").await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let code = status.unwrap_or_else(|| id.exit_code());
    Ok((code, output.tail()))
}

/// Writes the round's kept pairs where a user's trainer reads them (`{data}`); returns them.
pub(crate) async fn export_pairs(
    ctx: &Ctx<'_>,
    train: &TrainStage,
    (format, conversational): (ExportFormat, bool),
    data: &Path,
) -> Result<Vec<aligner_dataset::PairRecord>> {
    let pairs = round_pairs(ctx).await?;
    let kind = match train.method {
        TrainMethod::Dpo => Kind::Dpo,
        TrainMethod::Sft => Kind::Sft,
    };
    let fmt = match format {
        ExportFormat::Parquet => Format::Parquet,
        ExportFormat::Jsonl => Format::Jsonl,
    };
    aligner_dataset::write_pairs(data, fmt, kind, conversational, &pairs)?;
    Ok(pairs)
}

/// A user's trainer's output as it is followed (a local process or a cluster job): each line
/// into `training_logs` once (with the read offsets, in one transaction), its logged dicts
/// (TRL's `{'loss': ...}` lines, or JSON objects) into `training_metrics` under their own
/// names, and the last lines kept for an error message.
pub(crate) struct OutputLog {
    tail: std::collections::VecDeque<String>,
    /// Logged dicts without a step of their own are counted on from the last one stored.
    step: i64,
}

impl OutputLog {
    pub(crate) async fn new(store: &aligner_store::Store, job_id: i64) -> Result<Self> {
        Ok(OutputLog {
            tail: Default::default(),
            step: store.last_metric_step(job_id).await?,
        })
    }

    /// Records `(stream, line)`s read up to `offsets`.
    pub(crate) async fn record(
        &mut self,
        store: &aligner_store::Store,
        job_id: i64,
        attempt: i64,
        lines: &[(String, String)],
        offsets: (i64, i64),
    ) -> Result<()> {
        for (_, line) in lines {
            tracing::info!(target: "aligner::train", "{line}");
            if self.tail.len() == 20 {
                self.tail.pop_front();
            }
            self.tail.push_back(line.clone());
        }
        store
            .append_training_output(job_id, attempt, lines, offsets)
            .await?;
        for (_, line) in lines {
            if let Some((named, values)) = trainer_process::parse_metrics(line) {
                self.step = named.unwrap_or(self.step + 1);
                store
                    .record_training_metrics(job_id, self.step, &values)
                    .await?;
            }
        }
        Ok(())
    }

    pub(crate) fn tail(self) -> Vec<String> {
        self.tail.into()
    }
}

/// Removes the round's earlier attempt folders and their output files.
pub(crate) fn remove_attempts(dir: &Path) -> std::result::Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("checkpoint.attempt-") {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|err| format!("cannot clear `{}`: {err}", path.display()))?;
    }
    Ok(())
}

/// Marks the round's train stage failed with `message`; returns the error to stop with.
pub(crate) async fn train_failed(ctx: &Ctx<'_>, message: String) -> Result<Error> {
    ctx.engine
        .store
        .finish_stage(
            ctx.run_id,
            ctx.round as i64,
            Stage::Train,
            StageEnd::failed(0, 1, &message),
        )
        .await?;
    Ok(Error::Stage {
        round: ctx.round,
        stage: "train",
        message,
    })
}

/// What differs between a round's command and built-in training jobs.
pub(crate) struct RoundJob<'a> {
    pub backend: &'a str,
    pub reference: &'a str,
    pub base: &'a str,
    /// The exported pairs (command) or the trainer's state folder (built-in).
    pub data: &'a Path,
    pub pairs: usize,
    pub out: &'a Path,
    pub command: Option<&'a str>,
}

/// Where a round's user trainer reads and writes.
pub(crate) struct RoundPaths<'a> {
    pub base: &'a str,
    pub reference: &'a str,
    /// The round's folder.
    pub dir: &'a Path,
    /// The exported pairs.
    pub data: &'a Path,
    /// Where the registered checkpoint goes.
    pub out: &'a Path,
}

/// Records (or re-attempts) a round's `training_jobs` row.
pub(crate) async fn start_job(
    ctx: &Ctx<'_>,
    train: &TrainStage,
    job: RoundJob<'_>,
) -> Result<aligner_store::TrainingJobRow> {
    Ok(ctx
        .engine
        .store
        .start_training_job(&NewTrainingJob {
            run_id: ctx.run_id,
            round: ctx.round as i64,
            method: &enum_str(&train.method),
            backend: job.backend,
            hyperparameters: serde_json::to_value(train).unwrap_or_default(),
            reference_policy: &enum_str(&train.reference),
            reference_model: job.reference,
            base_model: job.base,
            data_path: &job.data.display().to_string(),
            pairs: job.pairs as i64,
            output_dir: &job.out.display().to_string(),
            command: job.command,
            model: &ctx.engine.spec.rounds.generate.model,
        })
        .await?)
}

/// The round's kept pairs; none fails the stage (there is nothing to train on).
pub(crate) async fn round_pairs(ctx: &Ctx<'_>) -> Result<Vec<aligner_dataset::PairRecord>> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round as i64);
    let mut pairs = crate::pair_records(&e.store, run_id, round).await?;
    let replay = e.spec.rounds.train.as_ref().and_then(|t| t.replay.as_ref());
    if let Some(replay) = replay {
        let origins: Vec<&str> = replay.origins.iter().map(|o| o.as_str()).collect();
        let replayed = e
            .store
            .replay_pairs(run_id, round, replay.min_pairs.into(), &origins)
            .await?;
        if !replayed.is_empty() {
            tracing::info!(
                "round {}: {} pairs of its own, {} replayed from earlier rounds (`replayed_pairs`)",
                ctx.round,
                pairs.len(),
                replayed.len()
            );
        }
        pairs.extend(replayed.into_iter().map(crate::pair_record));
    }
    if pairs.is_empty() {
        return Err(train_failed(ctx, no_pairs(ctx.round)).await?);
    }
    Ok(pairs)
}

fn no_pairs(round: u32) -> String {
    format!("round {round} kept no pairs to train on\nhint: `aligner sql \"SELECT reason, count(*) FROM pairs WHERE round = {round} GROUP BY reason\"` shows why; relax `rounds.synthesize`")
}

/// Moves a successful attempt's folder to `out` (replacing one left by an attempt that was
/// moved into place but never registered).
pub(crate) fn move_into_place(attempt_dir: &Path, out: &Path) -> std::result::Result<(), String> {
    if out.exists() {
        std::fs::remove_dir_all(out)
            .map_err(|err| format!("cannot replace `{}`: {err}", out.display()))?;
    }
    std::fs::rename(attempt_dir, out)
        .map_err(|err| format!("cannot move the checkpoint to `{}`: {err}", out.display()))
}

/// Registers the round's checkpoint (marking its job done), finishes the stage and reports it.
pub(crate) async fn register(
    ctx: &Ctx<'_>,
    job_id: i64,
    exit_code: i64,
    out: &Path,
    serve: Option<String>,
) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round as i64);
    let ckpt = e
        .store
        .register_checkpoint(
            run_id,
            round,
            job_id,
            exit_code,
            &out.display().to_string(),
            serve.as_deref(),
        )
        .await?;
    e.store
        .finish_stage(run_id, round, Stage::Train, StageEnd::done(1, 0))
        .await?;
    e.observer.stage_finished(ctx.round, Stage::Train, 1, 0);
    let message = format!(
        "round {} checkpoint {} at `{}`{}",
        ctx.round,
        ckpt,
        out.display(),
        serve
            .map(|s| format!(" served as `{s}`"))
            .unwrap_or_default()
    );
    e.announce(
        (run_id, ctx.round, Stage::Train),
        EventKind::CheckpointRegistered,
        &message,
        None,
    )
    .await;
    Ok(())
}

/// `backend: builtin`: trains in-process with the CLI's trainer (`aligner-train`), streams
/// its per-step metrics into `training_metrics` and its messages into `training_logs`, and
/// registers the Hugging Face checkpoint folder it writes. The optimizer state and the
/// reference log-probs live in `round-N/train-state` across attempts, so a killed round
/// resumes from its last saved step.
async fn run_builtin(
    ctx: &Ctx<'_>,
    train: &TrainStage,
    options: &aligner_spec::BuiltinTrainer,
) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round as i64);
    let stage_err = |message: String| Error::Stage {
        round: ctx.round,
        stage: "train",
        message,
    };
    let gen_model = &e.spec.rounds.generate.model;
    let ModelSpec::Local(initial) = &e.spec.models[gen_model] else {
        return Err(stage_err(format!(
            "the built-in trainer trains local models; `{gen_model}` is not `kind: local`"
        )));
    };
    e.store
        .start_stage(run_id, round, Stage::Train, Some(1))
        .await?;
    e.observer.stage_started(ctx.round, Stage::Train, 1, 0);
    let base = if ctx.round == 1 {
        initial.clone()
    } else {
        let ckpt = e
            .store
            .checkpoint(run_id, e.start_round(run_id, round).await?)
            .await?
            .ok_or_else(|| {
                stage_err(format!(
                    "round {} left no checkpoint to train from",
                    ctx.round - 1
                ))
            })?;
        checkpoint_model(&ckpt.path)
    };
    let reference = match train.reference {
        ReferencePolicy::Initial => initial.clone(),
        ReferencePolicy::Previous => base.clone(),
    };
    let describe = describe_local;
    let dir = run_dir(ctx);
    let out = dir.join("checkpoint");
    let (attempt_dir, state_dir) = attempt_dirs(ctx, &dir).await?;
    let pairs = round_pairs(ctx).await?;
    let trainer = e
        .factory
        .trainer()
        .map_err(|source| Error::component(ctx.round, "train", source))?;
    let job = start_job(
        ctx,
        train,
        RoundJob {
            backend: "builtin",
            reference: &describe(&reference),
            base: &describe(&base),
            data: &state_dir,
            pairs: pairs.len(),
            out: &out,
            command: None,
        },
    )
    .await?;
    let message = format!(
        "round {} train (built-in {}): {} pairs, base `{}`, reference `{}`",
        ctx.round,
        enum_str(&train.method),
        pairs.len(),
        describe(&base),
        describe(&reference)
    );
    e.announce(
        (run_id, ctx.round, Stage::Train),
        EventKind::TrainStarted,
        &message,
        Some(serde_json::json!({"attempt": job.attempts, "pairs": pairs.len()})),
    )
    .await;
    let request = crate::TrainRequest {
        round: ctx.round,
        stage: train.clone(),
        options: options.clone(),
        base,
        reference,
        pairs,
        out_dir: attempt_dir.clone(),
        state_dir,
        interrupt: e.interrupt.clone(),
    };
    run_in_thread(ctx, Stage::Train, &job, move |events| {
        trainer.train(&request, events)
    })
    .await?;
    move_into_place(&attempt_dir, &out).map_err(stage_err)?;
    register(ctx, job.id, 0, &out, None).await
}

/// Runs a built-in training on a blocking thread: its per-step metrics go to
/// `training_metrics`, its messages to `training_logs`. A failure marks the job and the
/// stage failed; an interruption marks the job failed and returns [`Error::Interrupted`].
pub(crate) async fn run_in_thread(
    ctx: &Ctx<'_>,
    stage: Stage,
    job: &aligner_store::TrainingJobRow,
    work: impl FnOnce(&mut dyn FnMut(crate::TrainEvent)) -> anyhow::Result<()> + Send + 'static,
) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round as i64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::TrainEvent>();
    let worker = tokio::task::spawn_blocking(move || {
        work(&mut |ev| {
            let _ = tx.send(ev);
        })
    });
    while let Some(ev) = rx.recv().await {
        match ev {
            crate::TrainEvent::Metrics { step, values } => {
                let line = values
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.5}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                tracing::info!(target: "aligner::train", "step {step}: {line}");
                e.store
                    .record_training_metrics(job.id, step as i64, &values)
                    .await?;
            }
            crate::TrainEvent::Log(line) => {
                tracing::info!(target: "aligner::train", "{line}");
                e.store
                    .append_training_logs(job.id, job.attempts, &[("stdout".into(), line)])
                    .await?;
            }
        }
    }
    let result = worker.await.map_err(|err| Error::Stage {
        round: ctx.round,
        stage: stage.as_str(),
        message: format!("the trainer thread failed: {err}"),
    })?;
    if e.interrupted() {
        e.store
            .finish_training_job(job.id, StageStatus::Failed, None, Some("interrupted"))
            .await?;
        return Err(e.interrupted_error(run_id));
    }
    if let Err(source) = result {
        let message = format!(
            "built-in trainer: {source:#}\nhint: its log is in `training_logs` (job {})",
            job.id
        );
        e.store
            .finish_training_job(job.id, StageStatus::Failed, None, Some(&message))
            .await?;
        e.store
            .finish_stage(run_id, round, stage, StageEnd::failed(0, 1, &message))
            .await?;
        return Err(Error::Component {
            round: ctx.round,
            stage: stage.as_str(),
            message,
            source,
        });
    }
    Ok(())
}

/// What a local model is, for logs and `training_jobs`: its path or hub id.
pub(crate) fn describe_local(m: &aligner_spec::LocalModel) -> String {
    match &m.source {
        aligner_spec::LocalSource::Gguf { path, .. }
        | aligner_spec::LocalSource::HfFolder { path, .. } => path.display().to_string(),
        aligner_spec::LocalSource::HubId { id, .. } => id.clone(),
    }
}

/// The folders of a built-in training in `dir`: a fresh `checkpoint.attempt-N` for this
/// attempt (N from the round's training job), and `train-state`, kept across attempts.
pub(crate) async fn attempt_dirs(ctx: &Ctx<'_>, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let e = ctx.engine;
    let err = |message: String| Error::Stage {
        round: ctx.round,
        stage: if ctx.round == 0 {
            "train_aligner"
        } else {
            "train"
        },
        message,
    };
    let previous = e.store.training_job(ctx.run_id, ctx.round as i64).await?;
    let attempt = previous.map_or(1, |j| j.attempts + 1);
    let attempt_dir = dir.join(format!("checkpoint.attempt-{attempt}"));
    if attempt_dir.exists() {
        std::fs::remove_dir_all(&attempt_dir)
            .map_err(|x| err(format!("cannot clear `{}`: {x}", attempt_dir.display())))?;
    }
    let state_dir = dir.join("train-state");
    std::fs::create_dir_all(&state_dir)
        .map_err(|x| err(format!("cannot create `{}`: {x}", state_dir.display())))?;
    Ok((attempt_dir, state_dir))
}

/// A checkpoint folder as a local model (Hugging Face layout). It answers with its weights
/// quantized to Q8_0 at load, about 4x faster than its f32 weights on the CPU path. The
/// trainer always reads the folder's f32 weights.
pub(crate) fn checkpoint_model(path: &str) -> aligner_spec::LocalModel {
    aligner_spec::LocalModel {
        source: aligner_spec::LocalSource::HfFolder {
            path: PathBuf::from(path),
            architecture: None,
        },
        dtype: "q8_0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_rendered_with_quoted_values() {
        let values = vec![
            ("data", "/tmp/my runs/pairs.jsonl".to_string()),
            ("round", "2".to_string()),
            ("base_model", "it's".to_string()),
        ];
        assert_eq!(
            render_command(
                "train --data {data} --round {round} --model {base_model} {unknown}",
                &values
            ),
            r"train --data '/tmp/my runs/pairs.jsonl' --round 2 --model 'it'\''s' {unknown}"
        );
    }
}
