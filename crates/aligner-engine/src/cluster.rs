//! Training jobs on a cluster scheduler (Ray's Jobs API): what a scheduler client does for the
//! engine, and the handle a round stores *before* it submits, so an orchestrator that dies at
//! any point finds its job again instead of submitting a second one.
//!
//! The engine speaks no HTTP: the client behind [`ClusterJobs`] comes from the
//! [`BackendFactory`](crate::BackendFactory) (`aligner-cluster` in the `aligner` binary).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which scheduler a job went to, with everything needed to reach it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheduler", rename_all = "snake_case")]
pub enum Scheduler {
    Ray(aligner_spec::RayCluster),
    Slurm(aligner_spec::SlurmCluster),
}

impl Scheduler {
    pub fn describe(&self) -> String {
        match self {
            Scheduler::Ray(c) => format!("the Ray cluster at {}", c.address),
            Scheduler::Slurm(_) => "Slurm".to_string(),
        }
    }

    /// The backend's name in `training_jobs.backend`.
    pub fn name(&self) -> &'static str {
        match self {
            Scheduler::Ray(_) => "ray",
            Scheduler::Slurm(_) => "slurm",
        }
    }

    pub fn poll_seconds(&self) -> f64 {
        match self {
            Scheduler::Ray(c) => c.poll_seconds,
            Scheduler::Slurm(c) => c.poll_seconds,
        }
    }

    /// How a user stops job `id` by hand.
    pub fn stop_command(&self, id: &str) -> String {
        match self {
            Scheduler::Ray(c) => format!("ray job stop --address {} {id}", c.address),
            Scheduler::Slurm(_) => format!("scancel --name={id}"),
        }
    }
}

/// A round's job on a cluster, as `training_jobs.process` stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteJob {
    #[serde(flatten)]
    pub scheduler: Scheduler,
    /// The id the job is submitted under, chosen (and stored) before submitting: run, round
    /// and attempt, so a resubmission of the same attempt is recognised by the cluster.
    pub job_id: String,
    pub attempt: i64,
    pub attempt_dir: PathBuf,
}

impl RemoteJob {
    /// Where a scheduler that writes the job's output to a file puts it (Slurm's `--output`),
    /// beside the attempt's folder on the shared filesystem.
    pub fn output_file(&self) -> PathBuf {
        PathBuf::from(format!("{}.out", self.attempt_dir.display()))
    }

    /// Where the job's wrapper writes its exit status (Slurm), like a `command` trainer's.
    pub fn exit_file(&self) -> PathBuf {
        PathBuf::from(format!("{}.exit", self.attempt_dir.display()))
    }
}

/// What is submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterJob {
    pub id: String,
    /// The rendered train command.
    pub entrypoint: String,
    /// The placeholders' `ALIGNER_*` variables.
    pub env: Vec<(String, String)>,
    /// Labels the cluster keeps with the job (run and round).
    pub metadata: Vec<(String, String)>,
}

/// A job's state as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// The scheduler has no job by that id (it was never submitted).
    Unknown,
    Pending,
    Running,
    Succeeded,
    /// Failed or stopped, in the scheduler's words.
    Failed(String),
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed(_))
    }
}

/// A cluster scheduler's client. Errors are the scheduler's own words (or why it could not be
/// reached); the engine adds the place and the hint.
#[async_trait::async_trait]
pub trait ClusterJobs: Send + Sync {
    /// Submits `job` (under `remote.job_id`, which `job.id` repeats).
    async fn submit(&self, remote: &RemoteJob, job: &ClusterJob) -> Result<(), String>;
    async fn state(&self, remote: &RemoteJob) -> Result<JobState, String>;
    /// The job's output from byte `offset` on (as much as the scheduler has now).
    async fn logs(&self, remote: &RemoteJob, offset: u64) -> Result<String, String>;
    /// Asks the scheduler to stop the job; one that has finished is fine.
    async fn stop(&self, remote: &RemoteJob) -> Result<(), String>;
}

/// The complete lines of `text` (output read from some offset) and how many bytes they take;
/// a last line without its newline waits for it unless the job has `finished`.
pub(crate) fn complete_lines(text: &str, finished: bool) -> (Vec<String>, usize) {
    let used = if finished {
        text.len()
    } else {
        text.rfind('\n').map_or(0, |i| i + 1)
    };
    let lines = text[..used]
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    (lines, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_line_waits_for_its_newline_until_the_job_ends() {
        assert_eq!(
            complete_lines("a\nb\npart", false),
            (vec!["a".to_string(), "b".to_string()], 4)
        );
        assert_eq!(
            complete_lines("a\nb\npart", true),
            (vec!["a".into(), "b".into(), "part".into()], 8)
        );
        assert_eq!(complete_lines("part", false), (vec![], 0));
    }

    #[test]
    fn a_stored_handle_reads_back_and_is_not_a_local_identity() {
        let job = RemoteJob {
            scheduler: Scheduler::Ray(aligner_spec::RayCluster {
                address: "http://127.0.0.1:8265".into(),
                runtime_env: None,
                entrypoint_num_cpus: Some(1.0),
                entrypoint_num_gpus: None,
                metadata: Default::default(),
                poll_seconds: 2.0,
            }),
            job_id: "aligner-x-1-r1-a1".into(),
            attempt: 1,
            attempt_dir: "/tmp/a".into(),
        };
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains(r#""scheduler":"ray""#), "{text}");
        assert_eq!(serde_json::from_str::<RemoteJob>(&text).unwrap(), job);
        assert!(serde_json::from_str::<crate::trainer_process::Identity>(&text).is_err());
    }
}
