//! The train stage on a cluster (`backend: ray`): the round's pairs are exported, the rendered
//! command is submitted as a job whose id was stored first, its state and output are followed
//! into `training_logs` and `training_metrics`, and its checkpoint is registered. After a
//! restart the stored job is followed again, never submitted twice; one the cluster never
//! received is submitted under the same id.

use std::time::{Duration, Instant};

use aligner_spec::{ExternalTrainer, TrainStage};
use aligner_store::{EventKind, StageStatus, TrainingJobRow};

use crate::cluster::{complete_lines, ClusterJob, ClusterJobs, JobState, RemoteJob, Scheduler};
use crate::stages::Ctx;
use crate::train::{self, RoundJob, RoundPaths};
use crate::{Error, Result, Stage};

/// Consecutive failed looks at a job before the round gives up following it (the job itself
/// is left alone: `aligner run` again follows it).
const MAX_LOST_POLLS: u32 = 10;

pub(crate) async fn run(
    ctx: &Ctx<'_>,
    stage: &TrainStage,
    trainer: &ExternalTrainer,
    scheduler: Scheduler,
    paths: RoundPaths<'_>,
    previous: Option<TrainingJobRow>,
) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round);
    let stage_err = |message: String| Error::Stage {
        round,
        stage: "train",
        message,
    };
    let where_ = scheduler.describe();
    let jobs = e
        .factory
        .cluster(&scheduler)
        .map_err(|source| Error::component(round, "train", source))?;
    let unreachable = |err: String| {
        stage_err(format!(
            "cannot reach {where_}: {err}\nhint: check `rounds.train.backend` (Ray: its `address` and that the dashboard is up; Slurm: `sbatch` and `squeue` on PATH, `SLURM_CONF`); nothing was lost, `aligner run` again continues the round"
        ))
    };
    let stored = previous
        .as_ref()
        .filter(|j| j.status == StageStatus::Running)
        .and_then(|j| j.process.as_deref())
        .and_then(|p| serde_json::from_str::<RemoteJob>(p).ok());
    let submission = |remote: &RemoteJob| {
        let values = train::placeholders(
            stage,
            paths.data,
            paths.base,
            paths.reference,
            &remote.attempt_dir,
            round,
        );
        ClusterJob {
            id: remote.job_id.clone(),
            entrypoint: train::render_command(&trainer.command, &values),
            env: values
                .iter()
                .map(|(k, v)| (format!("ALIGNER_{}", k.to_uppercase()), v.clone()))
                .collect(),
            metadata: vec![
                ("aligner_run".into(), format!("{} {run_id}", e.spec.name)),
                ("aligner_round".into(), round.to_string()),
                ("aligner_attempt".into(), remote.attempt.to_string()),
            ],
        }
    };
    let (job, remote, offset) = match (previous, stored) {
        (Some(job), Some(remote)) => {
            let state = jobs.state(&remote).await.map_err(unreachable)?;
            let how = match &state {
                JobState::Unknown => {
                    // Stored, then the orchestrator died before the cluster had it.
                    jobs.submit(&remote, &submission(&remote))
                        .await
                        .map_err(|err| submit_failed(&remote.job_id, &where_, err))
                        .map_err(stage_err)?;
                    "submitted now: the cluster never received it".to_string()
                }
                state => format!("following it again ({})", state_word(state)),
            };
            let message = format!(
                "round {round} train: attempt {} is job `{}` on {where_}; {how}",
                remote.attempt, remote.job_id
            );
            e.announce(
                (run_id, round, Stage::Train),
                EventKind::TrainStarted,
                &message,
                Some(serde_json::json!({"attempt": remote.attempt, "reattached": true, "job_id": remote.job_id})),
            )
            .await;
            let offset = job.stdout_offset;
            (job, remote, offset)
        }
        (previous, _) => {
            let attempt = previous.map_or(1, |j| j.attempts + 1);
            train::remove_attempts(paths.dir).map_err(stage_err)?;
            let attempt_dir = paths.dir.join(format!("checkpoint.attempt-{attempt}"));
            let how = (trainer.format, trainer.conversational);
            let pairs = train::export_pairs(ctx, stage, how, paths.data).await?;
            let remote_backend = scheduler.name();
            let remote = RemoteJob {
                scheduler,
                job_id: job_id(ctx, attempt).await?,
                attempt,
                attempt_dir,
            };
            let submitted = submission(&remote);
            let job = train::start_job(
                ctx,
                stage,
                RoundJob {
                    backend: remote_backend,
                    reference: paths.reference,
                    base: paths.base,
                    data: paths.data,
                    pairs: pairs.len(),
                    out: paths.out,
                    command: Some(&submitted.entrypoint),
                },
            )
            .await?;
            // Stored before it is submitted: a crash in between finds the id and asks the
            // cluster, so the job is never submitted twice.
            let handle = serde_json::to_string(&remote).expect("a job handle serializes");
            e.store.set_training_process(job.id, Some(&handle)).await?;
            jobs.submit(&remote, &submitted)
                .await
                .map_err(|err| submit_failed(&remote.job_id, &where_, err))
                .map_err(stage_err)?;
            let message = format!(
                "round {round} train: {} pairs -> job `{}` on {where_}: `{}`",
                pairs.len(),
                remote.job_id,
                submitted.entrypoint
            );
            e.announce(
                (run_id, round, Stage::Train),
                EventKind::TrainStarted,
                &message,
                Some(serde_json::json!({"attempt": attempt, "pairs": pairs.len(), "job_id": remote.job_id})),
            )
            .await;
            (job, remote, 0)
        }
    };

    let (state, tail) = follow(ctx, jobs.as_ref(), &job, &remote, offset).await?;
    if e.interrupted() && !matches!(state, JobState::Succeeded) {
        if state.is_finished() {
            e.store.set_training_process(job.id, None).await?;
            e.store
                .finish_training_job(job.id, StageStatus::Failed, None, Some("interrupted"))
                .await?;
        } else {
            // The cluster did not confirm the stop: the job stays recorded as running, so the
            // next `aligner run` follows it (or `aligner cancel` stops it) instead of
            // submitting another attempt beside it.
            e.observer.note(&format!(
                "round {round} train: job `{}` did not stop in time; it stays recorded (`{}` stops it by hand)",
                remote.job_id,
                remote.scheduler.stop_command(&remote.job_id)
            ));
        }
        return Err(e.interrupted_error(run_id));
    }
    let tail_text = tail.join("\n  ");
    let attempt_dir = &remote.attempt_dir;
    let failure = match &state {
        // Moved into place before a crash that came before registering it.
        JobState::Succeeded if !attempt_dir.exists() && is_non_empty(paths.out) => None,
        JobState::Succeeded if !is_non_empty(attempt_dir) => Some(format!(
            "job `{}` succeeded but wrote no checkpoint into `{}`\nhint: the command must write the trained model into `{{output_dir}}`, on a filesystem this machine shares with the cluster's workers",
            remote.job_id,
            attempt_dir.display()
        )),
        JobState::Succeeded => {
            train::move_into_place(attempt_dir, paths.out).map_err(stage_err)?;
            None
        }
        other => Some(format!(
            "job `{}` on {where_} {}; last output:\n  {tail_text}\nhint: the full log is in `training_logs` (job {}); `aligner run` again starts attempt {}",
            remote.job_id,
            state_word(other),
            job.id,
            remote.attempt + 1
        )),
    };
    if let Some(message) = failure {
        e.store.set_training_process(job.id, None).await?;
        e.store
            .finish_training_job(job.id, StageStatus::Failed, None, Some(&message))
            .await?;
        return Err(train::train_failed(ctx, message).await?);
    }
    let serve = trainer.serve_model.as_ref().map(|s| {
        s.replace("{round}", &round.to_string())
            .replace("{output_dir}", &paths.out.display().to_string())
    });
    // Registered first, then the handle and the attempt's files go: a crash in between
    // leaves a finished round, never a job whose evidence is gone.
    train::register(ctx, job.id, 0, paths.out, serve).await?;
    e.store.set_training_process(job.id, None).await?;
    train::remove_attempts(paths.dir).map_err(stage_err)?;
    Ok(())
}

fn is_non_empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

fn submit_failed(id: &str, where_: &str, err: String) -> String {
    format!("cannot submit job `{id}` to {where_}: {err}\nhint: nothing was submitted; fix the cause and `aligner run` again")
}

fn state_word(state: &JobState) -> String {
    match state {
        JobState::Unknown => "unknown to the cluster".into(),
        JobState::Pending => "pending".into(),
        JobState::Running => "running".into(),
        JobState::Succeeded => "succeeded".into(),
        JobState::Failed(why) => format!("failed: {why}"),
    }
}

/// The id attempt `attempt` of this round is submitted under: the run's name, id and start
/// time (two stores that both hold a run 1 of `study` do not collide on one cluster), the
/// round and the attempt.
async fn job_id(ctx: &Ctx<'_>, attempt: i64) -> Result<String> {
    let run = ctx.engine.store.run(ctx.run_id).await?;
    let name: String = ctx
        .engine
        .spec
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let started: String = run
        .created_at
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    Ok(format!(
        "aligner-{name}-{}-{started}-r{}-a{attempt}",
        ctx.run_id, ctx.round
    ))
}

/// Follows a job until it finishes: its output into `training_logs` (from the stored offset;
/// each line once), its logged dicts into `training_metrics`, and a stop request when the run
/// is interrupted (then up to a minute for the cluster to confirm it). Returns the last state
/// and the last lines of output.
async fn follow(
    ctx: &Ctx<'_>,
    jobs: &dyn ClusterJobs,
    job: &TrainingJobRow,
    remote: &RemoteJob,
    mut offset: i64,
) -> Result<(JobState, Vec<String>)> {
    let e = ctx.engine;
    let poll = Duration::from_secs_f64(remote.scheduler.poll_seconds());
    let mut output = train::OutputLog::new(&e.store, job.id).await?;
    let mut stopping: Option<Instant> = None;
    let mut lost = 0;
    loop {
        let state = match jobs.state(remote).await {
            Ok(JobState::Unknown) => JobState::Failed("the cluster no longer knows it".into()),
            Ok(state) => {
                lost = 0;
                state
            }
            Err(err) => {
                lost += 1;
                if lost >= MAX_LOST_POLLS {
                    return Err(Error::Stage {
                        round: ctx.round,
                        stage: "train",
                        message: format!(
                            "lost job `{}` on {}: {err}\nhint: the job may still be running there; `aligner run` again follows it (nothing is submitted twice)",
                            remote.job_id,
                            remote.scheduler.describe()
                        ),
                    });
                }
                tracing::warn!(target: "aligner::train", "job `{}`: {err}", remote.job_id);
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        let finished = state.is_finished();
        match jobs.logs(remote, offset.max(0) as u64).await {
            Ok(text) => {
                let (lines, used) = complete_lines(&text, finished);
                if used > 0 {
                    offset += used as i64;
                    let tagged: Vec<(String, String)> = lines
                        .into_iter()
                        .map(|l| ("stdout".to_string(), l))
                        .collect();
                    output
                        .record(&e.store, job.id, remote.attempt, &tagged, (offset, 0))
                        .await?;
                }
            }
            Err(err) => {
                tracing::warn!(target: "aligner::train", "job `{}` logs: {err}", remote.job_id)
            }
        }
        if finished {
            return Ok((state, output.tail()));
        }
        if e.interrupted() {
            let since = *stopping.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(60) {
                return Ok((state, output.tail()));
            }
            // Asked again at every look until the cluster reports the job ended.
            if let Err(err) = jobs.stop(remote).await {
                tracing::warn!(target: "aligner::train", "cannot stop job `{}`: {err}", remote.job_id);
            }
        }
        let wait = if stopping.is_some() {
            poll.min(Duration::from_millis(500))
        } else {
            poll
        };
        tokio::time::sleep(wait).await;
    }
}

/// Stops a run's cluster jobs that no orchestrator follows any more (`aligner cancel` of a
/// run whose process died); returns how many it asked to stop.
pub(crate) async fn stop_orphaned(
    factory: &dyn crate::BackendFactory,
    job: &TrainingJobRow,
) -> Result<bool> {
    let Some(remote) = job
        .process
        .as_deref()
        .and_then(|p| serde_json::from_str::<RemoteJob>(p).ok())
    else {
        return Ok(false);
    };
    let stop_failed = |err: String| Error::Stage {
        round: job.round as u32,
        stage: "train",
        message: format!(
            "cannot stop job `{}` on {}: {err}\nhint: stop it on the cluster yourself (`{}`)",
            remote.job_id,
            remote.scheduler.describe(),
            remote.scheduler.stop_command(&remote.job_id)
        ),
    };
    let jobs = factory
        .cluster(&remote.scheduler)
        .map_err(|err| stop_failed(format!("{err:#}")))?;
    match jobs.state(&remote).await.map_err(stop_failed)? {
        JobState::Pending | JobState::Running => {
            jobs.stop(&remote).await.map_err(stop_failed)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}
