//! Slurm: [`SlurmJobs`] submits a rendered batch script with `sbatch --parsable`, reads a
//! job's state from `squeue` (all states the controller still holds) and `sacct` (when
//! accounting is on), and stops it with `scancel`. A job is known by its name (the id the
//! engine stored before submitting), so one submitted just before the orchestrator died is
//! found again. The script writes the job's exit status beside its output on the shared
//! filesystem, so a job the controller has forgotten (no accounting, past `MinJobAge`) is still
//! taken as it ended, never submitted again.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use aligner_engine::cluster::{ClusterJob, ClusterJobs, JobState, RemoteJob};
use aligner_spec::SlurmCluster;
use tokio::process::Command;

pub struct SlurmJobs {
    cluster: SlurmCluster,
}

impl SlurmJobs {
    pub fn new(cluster: SlurmCluster) -> Self {
        Self { cluster }
    }

    /// The batch script: resources and options, the job's variables, the command in a
    /// subshell, and its exit status written (then renamed into place) where the engine reads
    /// it.
    fn script(&self, remote: &RemoteJob, job: &ClusterJob) -> String {
        let c = &self.cluster;
        let mut s = String::from("#!/bin/sh\n");
        let mut opt = |line: String| {
            s.push_str("#SBATCH ");
            s.push_str(&line);
            s.push('\n');
        };
        opt(format!("--job-name={}", job.id));
        opt(format!("--output={}", remote.output_file().display()));
        // A requeued job would run twice under one attempt and restart its output file; a
        // preempted or failed node fails the attempt instead, and the next one is submitted
        // by `aligner run`.
        opt("--no-requeue".to_string());
        if let Some(v) = &c.partition {
            opt(format!("--partition={v}"));
        }
        if let Some(v) = &c.time {
            opt(format!("--time={v}"));
        }
        if let Some(v) = c.nodes {
            opt(format!("--nodes={v}"));
        }
        if let Some(v) = &c.gpus {
            opt(format!("--gpus={v}"));
        }
        if let Some(v) = c.cpus_per_task {
            opt(format!("--cpus-per-task={v}"));
        }
        if let Some(v) = &c.mem {
            opt(format!("--mem={v}"));
        }
        for line in &c.sbatch {
            opt(line.clone());
        }
        let comment: Vec<String> = job
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        opt(format!("--comment={}", quote(&comment.join(","))));
        for (k, v) in &job.env {
            s.push_str(&format!("export {k}={}\n", quote(v)));
        }
        let exit = remote.exit_file().display().to_string();
        s.push_str(&format!(
            "(\n{}\n)\ncode=$?\necho \"$code\" > {tmp} && mv {tmp} {exit}\nexit \"$code\"\n",
            job.entrypoint,
            tmp = quote(&format!("{exit}.tmp")),
            exit = quote(&exit),
        ));
        s
    }
}

/// Single-quotes a value for `sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a Slurm command; its stdout, or its stderr (or why it could not start) as the error.
async fn slurm(program: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| {
            format!("cannot run `{program}`: {e} (is Slurm's client installed and on PATH?)")
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(format!("`{program} {}` failed: {err}", args.join(" ")))
    }
}

/// A Slurm job state as the engine reads it (`None`: not a state this maps).
fn state_of(state: &str, detail: &str) -> JobState {
    let state = state.split_whitespace().next().unwrap_or_default();
    match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "RESIZING" | "SUSPENDED" => JobState::Pending,
        "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" => JobState::Running,
        "COMPLETED" => JobState::Succeeded,
        other => JobState::Failed(
            format!("{} {detail}", other.to_ascii_lowercase())
                .trim()
                .to_string(),
        ),
    }
}

/// The exit status the script wrote, if it got that far.
fn exit_status(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The job's output as text with one byte of text per byte of file, so offsets counted on the
/// text are offsets in the file: an invalid byte reads as `?`, and a character cut in half at
/// the end of what is written so far waits for its other bytes.
fn text_of(mut buf: Vec<u8>) -> String {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&buf[at..]) {
            Ok(_) => break,
            Err(e) => match e.error_len() {
                None => {
                    buf.truncate(at + e.valid_up_to());
                    break;
                }
                Some(n) => {
                    let bad = at + e.valid_up_to();
                    buf[bad..bad + n].fill(b'?');
                    at = bad + n;
                }
            },
        }
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[async_trait::async_trait]
impl ClusterJobs for SlurmJobs {
    async fn submit(&self, remote: &RemoteJob, job: &ClusterJob) -> Result<(), String> {
        let script = std::path::PathBuf::from(format!("{}.sbatch", remote.attempt_dir.display()));
        for stale in [remote.output_file(), remote.exit_file()] {
            let _ = std::fs::remove_file(stale);
        }
        std::fs::write(&script, self.script(remote, job))
            .map_err(|e| format!("cannot write `{}`: {e}", script.display()))?;
        slurm(
            "sbatch",
            &["--parsable".into(), script.display().to_string()],
        )
        .await?;
        Ok(())
    }

    async fn state(&self, remote: &RemoteJob) -> Result<JobState, String> {
        if let Some(code) = exit_status(&remote.exit_file()) {
            return Ok(if code == 0 {
                JobState::Succeeded
            } else {
                JobState::Failed(format!("exited with {code}"))
            });
        }
        let name = format!("--name={}", remote.job_id);
        let queue = slurm(
            "squeue",
            &[
                "-h".into(),
                "-t".into(),
                "all".into(),
                name.clone(),
                "-o".into(),
                "%i|%T|%r".into(),
            ],
        )
        .await?;
        if let Some(line) = queue.lines().rfind(|l| !l.trim().is_empty()) {
            let mut f = line.split('|');
            let (_id, state, reason) = (f.next(), f.next().unwrap_or_default(), f.next());
            let reason = reason.filter(|r| *r != "None" && !r.is_empty());
            return Ok(state_of(
                state,
                &reason.map(|r| format!("({r})")).unwrap_or_default(),
            ));
        }
        // Gone from the controller: accounting may still know it.
        let acct = slurm(
            "sacct",
            &[
                "-n".into(),
                "-X".into(),
                "-P".into(),
                name,
                "-o".into(),
                "State,ExitCode".into(),
            ],
        )
        .await
        .unwrap_or_default();
        if let Some(line) = acct.lines().rfind(|l| !l.trim().is_empty()) {
            let (state, code) = line.split_once('|').unwrap_or((line, ""));
            return Ok(state_of(state, &format!("(exit code {code})")));
        }
        Ok(if remote.output_file().exists() {
            JobState::Failed("Slurm no longer knows the job and it wrote no exit status".into())
        } else {
            JobState::Unknown
        })
    }

    async fn logs(&self, remote: &RemoteJob, offset: u64) -> Result<String, String> {
        let Ok(mut f) = std::fs::File::open(remote.output_file()) else {
            return Ok(String::new());
        };
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| format!("cannot read `{}`: {e}", remote.output_file().display()))?;
        Ok(text_of(buf))
    }

    async fn stop(&self, remote: &RemoteJob) -> Result<(), String> {
        slurm("scancel", &[format!("--name={}", remote.job_id)]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_asks_for_the_resources_and_writes_the_exit_status() {
        let cluster = SlurmCluster {
            partition: Some("gpu".into()),
            time: Some("04:00:00".into()),
            nodes: None,
            gpus: Some("8".into()),
            cpus_per_task: Some(16),
            mem: None,
            sbatch: vec!["--account=alignment".into()],
            poll_seconds: 5.0,
        };
        let remote = RemoteJob {
            scheduler: aligner_engine::cluster::Scheduler::Slurm(cluster.clone()),
            job_id: "aligner-x-1-r1-a1".into(),
            attempt: 1,
            attempt_dir: "/shared/round-1/checkpoint.attempt-1".into(),
        };
        let job = ClusterJob {
            id: remote.job_id.clone(),
            entrypoint: "python train.py --out /shared/round-1/checkpoint.attempt-1".into(),
            env: vec![
                ("ALIGNER_ROUND".into(), "1".into()),
                ("ALIGNER_DATA".into(), "/d/it's.jsonl".into()),
            ],
            metadata: vec![("aligner_round".into(), "1".into())],
        };
        let script = SlurmJobs::new(cluster).script(&remote, &job);
        assert_eq!(
            script,
            r#"#!/bin/sh
#SBATCH --job-name=aligner-x-1-r1-a1
#SBATCH --output=/shared/round-1/checkpoint.attempt-1.out
#SBATCH --no-requeue
#SBATCH --partition=gpu
#SBATCH --time=04:00:00
#SBATCH --gpus=8
#SBATCH --cpus-per-task=16
#SBATCH --account=alignment
#SBATCH --comment='aligner_round=1'
export ALIGNER_ROUND='1'
export ALIGNER_DATA='/d/it'\''s.jsonl'
(
python train.py --out /shared/round-1/checkpoint.attempt-1
)
code=$?
echo "$code" > '/shared/round-1/checkpoint.attempt-1.exit.tmp' && mv '/shared/round-1/checkpoint.attempt-1.exit.tmp' '/shared/round-1/checkpoint.attempt-1.exit'
exit "$code"
"#
        );
    }

    #[test]
    fn output_bytes_and_text_keep_the_same_length() {
        assert_eq!(text_of(b"caf\xc3\xa9\n".to_vec()), "caf\u{e9}\n");
        assert_eq!(text_of(b"latin \xe9 one\n".to_vec()), "latin ? one\n");
        assert_eq!(text_of(b"a\nhalf \xc3".to_vec()), "a\nhalf ");
        let mixed = b"\xff\xfeok\n".to_vec();
        assert_eq!(text_of(mixed.clone()).len(), mixed.len());
    }

    #[test]
    fn slurm_states_read_as_the_engine_needs() {
        assert_eq!(state_of("PENDING", "(Resources)"), JobState::Pending);
        assert_eq!(state_of("COMPLETING", ""), JobState::Running);
        assert_eq!(state_of("COMPLETED", ""), JobState::Succeeded);
        assert_eq!(
            state_of("CANCELLED by 0", "(exit code 0:15)"),
            JobState::Failed("cancelled (exit code 0:15)".into())
        );
        assert_eq!(state_of("TIMEOUT", ""), JobState::Failed("timeout".into()));
    }
}
