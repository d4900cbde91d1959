//! The scheduler: claims queued jobs up to the limit, drives each with the engine, and records
//! how each ended.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aligner_engine::{Engine, Observer, RunOptions, Stage};
use aligner_spec::Pipeline;
use aligner_store::{JobRow, JobState, RunStatus};
use anyhow::Result;
use serde_json::json;

use crate::{Active, Shared, Stop};

/// A job lease outlives this many milliseconds without renewal only if its daemon is gone.
const JOB_TTL_MS: i64 = 30_000;
const TICK: Duration = Duration::from_secs(2);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Queues again the jobs a dead daemon (or one whose lease lapsed) was driving, or fails
/// those it died driving `max_crashes` times; returns (queued, failed). At `startup`
/// that includes jobs under our own holder name: a new process (say PID 1 in a container, on
/// the same host name) can carry the name of the one that died, and it drives nothing yet.
pub(crate) async fn recover(shared: &Shared, startup: bool) -> Result<(u64, u64)> {
    let dead: Vec<String> = shared
        .store
        .job_lease_holders()
        .await?
        .into_iter()
        .filter(|h| {
            if h == &shared.holder {
                startup
            } else {
                aligner_engine::holder_is_dead(h)
            }
        })
        .collect();
    Ok(shared
        .store
        .requeue_orphaned_jobs(now_ms(), &dead, shared.config.max_crashes)
        .await?)
}

/// Claims and starts jobs until draining.
pub(crate) async fn schedule(shared: Arc<Shared>) {
    loop {
        if shared.draining.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = tick(&shared).await {
            tracing::warn!("scheduler: {e:#}");
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

async fn tick(shared: &Arc<Shared>) -> Result<()> {
    let now = now_ms();
    let active = shared.actives();
    for (id, _) in &active {
        shared
            .store
            .renew_job_lease(*id, &shared.holder, now, JOB_TTL_MS)
            .await?;
    }
    // Requests recorded while a job was being claimed (or by another process) reach it here.
    for (id, request) in shared.store.job_requests(&shared.holder).await? {
        if let Some((_, a)) = active.iter().find(|(a_id, _)| *a_id == id) {
            match request.as_str() {
                "cancel" => a.stop(Stop::Cancel),
                "pause" => a.stop(Stop::Pause),
                _ => {}
            }
        }
    }
    recover(shared, false).await?;
    while !shared.draining.load(Ordering::Relaxed)
        && shared.active_count() < shared.config.max_running.max(1)
    {
        let Some(job) = shared
            .store
            .claim_job(&shared.holder, now_ms(), JOB_TTL_MS)
            .await?
        else {
            break;
        };
        start(shared, job);
    }
    Ok(())
}

fn start(shared: &Arc<Shared>, job: JobRow) {
    let run_id = job.run_id;
    let (events, _) = tokio::sync::broadcast::channel(256);
    let active = Arc::new(Active {
        interrupt: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        stop: Mutex::new(None),
        progress: Mutex::new(json!({})),
        events,
    });
    match job.requested.as_deref() {
        Some("cancel") => active.stop(Stop::Cancel),
        Some("pause") => active.stop(Stop::Pause),
        _ => {}
    }
    shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(run_id, active.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        // The run itself in a task of its own, so a panic ends it as failed instead of
        // leaving its slot taken.
        let outcome = {
            let (shared, job, active) = (shared.clone(), job.clone(), active.clone());
            match tokio::spawn(async move { drive(&shared, &job, &active).await }).await {
                Ok(outcome) => outcome,
                Err(e) => Err(Ended::Failed(format!(
                    "the run's task ended abnormally: {e}"
                ))),
            }
        };
        let (state, error) = match outcome {
            Ok(()) => (JobState::Done, None),
            Err(Ended::Interrupted) => {
                match *active.stop.lock().unwrap_or_else(|e| e.into_inner()) {
                    Some(Stop::Cancel) => (JobState::Cancelled, None),
                    Some(Stop::Pause) => (JobState::Paused, None),
                    // Shutdown, or the lease went to another process: queue it again.
                    _ => (JobState::Queued, None),
                }
            }
            Err(Ended::Budget(e)) => (JobState::Paused, Some(e)),
            Err(Ended::Failed(e)) => (JobState::Failed, Some(e)),
        };
        // Leave the slot first: a resume of this run may claim it again at once.
        {
            let mut map = shared.active.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(&run_id).is_some_and(|a| Arc::ptr_eq(a, &active)) {
                map.remove(&run_id);
            }
        }
        let mut tries = 0;
        while let Err(e) = finish(&shared, run_id, state, error.as_deref()).await {
            tries += 1;
            if tries >= 5 {
                // The job stays `running` under our lease; the next start queues it again.
                tracing::error!("run {run_id}: cannot record its end ({state}): {e:#}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * tries)).await;
        }
        let _ = active
            .events
            .send(json!({"type": "state", "run_id": run_id, "state": state, "error": error}));
        shared.wake.notify_one();
    });
}

/// Records how a run's job ended. The run's own status is written first, so whoever reads a
/// finished job state also reads the run's final status (both writes are idempotent, and the
/// caller retries the pair).
async fn finish(shared: &Shared, run_id: i64, state: JobState, error: Option<&str>) -> Result<()> {
    match state {
        JobState::Cancelled => {
            shared
                .store
                .set_run_status(
                    run_id,
                    RunStatus::Cancelled,
                    Some("cancelled through the daemon API"),
                )
                .await?
        }
        // The engine records most failures itself, not those before it starts driving.
        JobState::Failed => {
            shared
                .store
                .set_run_status(run_id, RunStatus::Failed, error)
                .await?
        }
        _ => {}
    }
    shared.store.set_job_state(run_id, state, error).await?;
    Ok(())
}

enum Ended {
    Interrupted,
    /// Stopped at its budget: paused with the reason, resumable once the budget is raised.
    Budget(String),
    Failed(String),
}

async fn drive(shared: &Arc<Shared>, job: &JobRow, active: &Arc<Active>) -> Result<(), Ended> {
    // Ended meanwhile by other means (`aligner cancel` on the store): honour that.
    let status = shared
        .store
        .run(job.run_id)
        .await
        .map_err(|e| Ended::Failed(e.to_string()))?
        .status;
    if status == RunStatus::Cancelled || status == RunStatus::Done {
        active.stop(Stop::Cancel);
        return if status == RunStatus::Done {
            Ok(())
        } else {
            Err(Ended::Interrupted)
        };
    }
    let yaml = shared
        .store
        .job_pipeline(job.run_id)
        .await
        .map_err(|e| Ended::Failed(e.to_string()))?
        .ok_or_else(|| Ended::Failed("the job's pipeline text is missing".into()))?;
    let base = std::path::PathBuf::from(&job.base_dir);
    let file = base.join(crate::api::SUBMITTED_FILE);
    // Validated on submit; checked again since `${VAR}`s and files may have changed since.
    let spec = Pipeline::from_yaml_with_env(&yaml, &file, &base, crate::env_lookup(&shared.config))
        .map_err(|e| Ended::Failed(e.to_string()))?;
    let observer = Arc::new(JobObserver::new(job.run_id, active.clone()));
    let engine = Engine::new(
        shared.store.clone(),
        spec,
        &file,
        shared.factory.clone(),
        observer,
    )
    // Our flag is the engine's: a stop raised before the engine existed holds.
    .with_interrupt(active.interrupt.clone());
    let result = engine
        .run(&RunOptions {
            run_id: Some(job.run_id),
            ..Default::default()
        })
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(aligner_engine::Error::Interrupted { .. })
        | Err(aligner_engine::Error::LeaseLost { .. }) => Err(Ended::Interrupted),
        Err(e @ aligner_engine::Error::BudgetReached { .. }) => Err(Ended::Budget(e.to_string())),
        Err(e) => Err(Ended::Failed(e.to_string())),
    }
}

/// Interrupts every run and waits up to `grace` for them to commit and stop. True when all did.
pub(crate) async fn drain(shared: &Arc<Shared>, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while shared.active_count() > 0 && Instant::now() < deadline {
        // Stop every run (also one claimed as the drain began) and keep the leases of what is
        // still finishing.
        let now = now_ms();
        for (id, a) in shared.actives() {
            a.stop(Stop::Shutdown);
            let _ = shared
                .store
                .renew_job_lease(id, &shared.holder, now, JOB_TTL_MS)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.active_count() == 0
}

/// Forwards the engine's progress to the run's event stream and keeps the latest snapshot for
/// the run detail.
struct JobObserver {
    run_id: i64,
    active: Arc<Active>,
    stage: Mutex<StageProgress>,
}

#[derive(Default)]
struct StageProgress {
    round: u32,
    stage: &'static str,
    total: u64,
    done: u64,
    failed: u64,
    last_sent: Option<Instant>,
}

impl JobObserver {
    fn new(run_id: i64, active: Arc<Active>) -> Self {
        JobObserver {
            run_id,
            active,
            stage: Mutex::new(StageProgress::default()),
        }
    }

    fn publish(&self, kind: &str, p: &mut StageProgress, force: bool) {
        let now = Instant::now();
        if !force
            && p.last_sent
                .is_some_and(|t| now - t < Duration::from_millis(250))
        {
            return;
        }
        p.last_sent = Some(now);
        let v = json!({
            "type": kind,
            "run_id": self.run_id,
            "round": p.round,
            "stage": p.stage,
            "total": p.total,
            "done": p.done,
            "failed": p.failed,
        });
        *self
            .active
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = v.clone();
        let _ = self.active.events.send(v);
    }
}

impl Observer for JobObserver {
    fn stage_started(&self, round: u32, stage: Stage, total: u64, already_done: u64) {
        let mut p = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        *p = StageProgress {
            round,
            stage: stage.as_str(),
            total,
            done: already_done,
            failed: 0,
            last_sent: None,
        };
        self.publish("stage_started", &mut p, true);
    }

    fn advanced(&self, ok: u64, failed: u64) {
        let mut p = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        p.done += ok + failed;
        p.failed += failed;
        self.publish("progress", &mut p, false);
    }

    fn stage_finished(&self, round: u32, stage: Stage, ok: u64, failed: u64) {
        let mut p = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        p.round = round;
        p.stage = stage.as_str();
        p.done = p.done.max(ok + failed);
        p.failed = failed;
        self.publish("stage_finished", &mut p, true);
    }

    fn note(&self, message: &str) {
        let _ = self
            .active
            .events
            .send(json!({"type": "note", "run_id": self.run_id, "message": message}));
    }
}
