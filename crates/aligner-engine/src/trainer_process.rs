//! A `command` trainer as a process the orchestrator can lose and find again.
//!
//! The trainer runs in its own process group under a small `sh` wrapper that writes its exit
//! status to a file; its stdout and stderr go to files, not pipes, so it keeps running (and
//! logging) when the orchestrator is killed. What identifies it ([`Identity`]: pid, host, boot
//! id and the process's start time in clock ticks since boot) is stored with the job. After a
//! restart, a trainer whose identity still matches a live process is provably the same one and
//! is followed again; a stored pid that is gone, or now belongs to another process, is left
//! alone (never signalled).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// Who a trainer process is, and where its output and exit status go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub pid: i64,
    pub host: String,
    pub boot_id: String,
    /// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
    pub start_ticks: u64,
    pub attempt: i64,
    pub attempt_dir: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub exit_file: PathBuf,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A live process's start time (`None` when there is no such process, or only its zombie: an
/// ended process no parent has reaped, as under a container's init that reaps nothing).
fn start_ticks(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    if rest.next()? == "Z" {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

impl Identity {
    /// Whether this identity is a live process now: same host and boot, and the pid's start
    /// time unchanged (a reused pid has another).
    pub fn is_alive(&self) -> bool {
        self.host == crate::lease::hostname()
            && !self.boot_id.is_empty()
            && self.boot_id == boot_id()
            && start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// The exit status the wrapper wrote; `None` when it wrote none (it was killed).
    pub fn exit_code(&self) -> Option<i64> {
        std::fs::read_to_string(&self.exit_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Starts `command` under `sh` in its own process group, with the trainer's environment, its
/// output in files beside `attempt_dir`, and the wrapper writing its exit status.
pub(crate) fn spawn(
    command: &str,
    env: &[(String, String)],
    attempt: i64,
    attempt_dir: &Path,
) -> std::io::Result<(Child, Identity)> {
    let base = attempt_dir.display().to_string();
    let (stdout, stderr, exit_file) = (
        PathBuf::from(format!("{base}.stdout")),
        PathBuf::from(format!("{base}.stderr")),
        PathBuf::from(format!("{base}.exit")),
    );
    for f in [&stdout, &stderr, &exit_file] {
        let _ = std::fs::remove_file(f);
    }
    let out = std::fs::File::create(&stdout)?;
    let err = std::fs::File::create(&stderr)?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"sh -c "$1"; code=$?; echo "$code" > "$2.tmp" && mv "$2.tmp" "$2"; exit "$code""#)
        .arg("aligner-trainer")
        .arg(command)
        .arg(&exit_file)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group, so stopping it stops the whole trainer, not just `sh`; and
        // no kill on drop: a trainer outlives an orchestrator that dies.
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn()?;
    let pid = i64::from(child.id().unwrap_or_default());
    let identity = Identity {
        pid,
        host: crate::lease::hostname(),
        boot_id: boot_id(),
        start_ticks: start_ticks(pid).unwrap_or_default(),
        attempt,
        attempt_dir: attempt_dir.to_path_buf(),
        stdout,
        stderr,
        exit_file,
    };
    Ok((child, identity))
}

/// The complete lines of `path` after `offset`, and the offset after the last of them (a
/// line still being written waits for its newline).
pub(crate) fn read_lines(path: &Path, offset: i64) -> (Vec<String>, i64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), offset);
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(offset.max(0) as u64)).is_err() || f.read_to_end(&mut buf).is_err() {
        return (Vec::new(), offset);
    }
    let Some(last_newline) = buf.iter().rposition(|&b| b == b'\n') else {
        return (Vec::new(), offset);
    };
    let lines = String::from_utf8_lossy(&buf[..last_newline])
        .split('\n')
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    (lines, offset + last_newline as i64 + 1)
}

/// Named values of one logged step.
pub(crate) type Metrics = Vec<(String, f64)>;

/// The metrics in one line of a trainer's output, when it is a logged dict: a JSON object, or
/// the Python `dict` repr that Hugging Face's `Trainer` (so TRL) prints every `logging_steps`,
/// e.g. `{'loss': 0.6914, 'grad_norm': 1.2, 'learning_rate': 5e-07, 'rewards/chosen': 0.01,
/// 'epoch': 0.1}` (transformers 5 quotes the numbers: `{'loss': '0.6931', ...}`). Returns the step it names (`step` or `global_step`), if any, and every
/// numeric value under its own name (TRL's names pass through). The final summary
/// (`{'train_runtime': ..., 'train_loss': ...}`) is recognised by its `train_*` keys and is
/// not a step.
pub(crate) fn parse_metrics(line: &str) -> Option<(Option<i64>, Metrics)> {
    let t = line.trim();
    let start = t.find('{')?;
    if !t.ends_with('}') {
        return None;
    }
    let body = &t[start..];
    let value: serde_json::Value = serde_json::from_str(body).ok().or_else(|| {
        // Python's repr: single-quoted keys, and nan / inf spelled its way.
        let json = body
            .replace('\'', "\"")
            .replace(": nan", ": null")
            .replace(": inf", ": null")
            .replace(": -inf", ": null");
        serde_json::from_str(&json).ok()
    })?;
    let map = value.as_object()?;
    // The end-of-training summary (`train_runtime`, `train_loss`, ...) is not a step.
    if map.keys().any(|k| k.starts_with("train_")) {
        return None;
    }
    let mut step = None;
    let mut values = Vec::new();
    for (k, v) in map {
        // transformers 5 prints its numbers as strings (`{'loss': '0.6931', ...}`).
        let Some(x) = v
            .as_f64()
            .or_else(|| v.as_str().and_then(|t| t.trim().parse::<f64>().ok()))
            .filter(|x| x.is_finite())
        else {
            continue;
        };
        match k.as_str() {
            "step" | "global_step" => step = Some(x as i64),
            "total_flos" => {}
            k => values.push((k.to_string(), x)),
        }
    }
    (!values.is_empty()).then_some((step, values))
}

/// Signals a process group (`kill -SIG -- -PGID`); a group that is already gone is fine.
pub(crate) async fn kill_group(pgid: i64, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Stops the trainers of a run that no orchestrator follows any more (after `aligner cancel`
/// of a run whose process died): SIGTERM to each `command` group that is provably the trainer
/// that run started, a stop request for each cluster job still pending or running; their jobs
/// are marked failed. Returns how many were stopped.
pub async fn stop_orphaned_trainers(
    store: &aligner_store::Store,
    factory: &dyn crate::BackendFactory,
    run_id: i64,
) -> crate::Result<usize> {
    let mut stopped = 0;
    // A job that cannot be stopped (its cluster unreachable) does not keep the others, or the
    // run's checkpoint servers, running: every one is tried, the failures reported at the end.
    let mut failures = Vec::new();
    for job in store.running_training_jobs(run_id).await? {
        let local = job
            .process
            .as_deref()
            .and_then(|p| serde_json::from_str::<Identity>(p).ok());
        if let Some(id) = local {
            if id.is_alive() {
                kill_group(id.pid, "TERM").await;
                stopped += 1;
            }
        } else {
            match crate::remote::stop_orphaned(factory, &job).await {
                Ok(true) => stopped += 1,
                Ok(false) if job.process.is_none() => continue,
                Ok(false) => {}
                Err(err) => {
                    // Its handle stays, so a later `aligner cancel` can try again.
                    failures.push(err.to_string());
                    continue;
                }
            }
        }
        store.set_training_process(job.id, None).await?;
        store
            .finish_training_job(
                job.id,
                aligner_store::StageStatus::Failed,
                None,
                Some("cancelled"),
            )
            .await?;
    }
    stopped += crate::serving::stop_servers(store, run_id).await?;
    if !failures.is_empty() {
        return Err(crate::Error::Other(failures.join("\n")));
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trainer_is_known_again_by_its_identity_and_its_exit_status_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let attempt = dir.path().join("checkpoint.attempt-1");
        let (mut child, id) = spawn(
            "echo one; echo two >&2; printf 'three'; sleep 0.3; echo ' and more'; exit 7",
            &[],
            1,
            &attempt,
        )
        .unwrap();
        assert!(id.is_alive(), "{id:?}");
        // A stored identity round-trips, and another start time is another process.
        let back: Identity = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
        assert_eq!(back, id);
        let other = Identity {
            start_ticks: id.start_ticks + 1,
            ..id.clone()
        };
        assert!(!other.is_alive());
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        assert!(!id.is_alive());
        assert_eq!(id.exit_code(), Some(7));
        // Complete lines only, from where the last read stopped.
        let (lines, off) = read_lines(&id.stdout, 0);
        assert_eq!(lines, ["one", "three and more"]);
        assert_eq!(read_lines(&id.stdout, off), (vec![], off));
        assert_eq!(read_lines(&id.stderr, 0).0, ["two"]);
    }

    #[test]
    fn logged_dicts_become_metrics_under_their_names() {
        let (step, v) = parse_metrics(
            "{'loss': 0.6914, 'grad_norm': 1.5, 'learning_rate': 5e-07, 'rewards/chosen': 0.01, 'epoch': 0.1}",
        )
        .unwrap();
        assert_eq!(step, None);
        assert!(v.contains(&("loss".to_string(), 0.6914)));
        assert!(v.contains(&("rewards/chosen".to_string(), 0.01)));
        assert_eq!(v.len(), 5);
        let (step, v) = parse_metrics(r#"{"step": 12, "loss": 0.5, "note": "x"}"#).unwrap();
        assert_eq!((step, v), (Some(12), vec![("loss".to_string(), 0.5)]));
        // The end-of-training summary and plain text are not metrics.
        assert_eq!(
            parse_metrics("{'train_runtime': 12.5, 'train_samples_per_second': 3.1}"),
            None
        );
        assert_eq!(parse_metrics("training round 2 on 4 pairs"), None);
        // transformers 5 (TRL 1.x) quotes its numbers; found by scripts/check_trl_dpo.sh.
        let (_, v) = parse_metrics(
            "{'loss': '0.6759', 'grad_norm': '15.52', 'learning_rate': '7.5e-07', 'rewards/margins': '0.03476', 'epoch': '1.5'}",
        )
        .unwrap();
        assert!(v.contains(&("loss".to_string(), 0.6759)), "{v:?}");
        assert!(
            v.contains(&("rewards/margins".to_string(), 0.03476)),
            "{v:?}"
        );
        assert_eq!(
            parse_metrics("{'train_runtime': '6.282', 'train_loss': '0.6832', 'epoch': '2'}"),
            None
        );
        assert_eq!(
            parse_metrics("{'loss': nan, 'epoch': 1.0}")
                .unwrap()
                .1
                .len(),
            1
        );
    }

    #[test]
    fn a_partial_line_waits_for_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out");
        std::fs::write(&f, "a\nb").unwrap();
        let (lines, off) = read_lines(&f, 0);
        assert_eq!((lines, off), (vec!["a".to_string()], 2));
        std::fs::write(&f, "a\nbc\n").unwrap();
        assert_eq!(read_lines(&f, off), (vec!["bc".to_string()], 5));
        assert_eq!(read_lines(&dir.path().join("missing"), 3), (vec![], 3));
    }
}
