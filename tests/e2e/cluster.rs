//! Rounds that train on a real Ray cluster: a head started on loopback ports (`ray start
//! --head`), the round's pairs trained by `aligner train` as a Ray job, the orchestrator killed
//! with SIGKILL while the job runs and resumed (the cluster lists one job for the round, the
//! checkpoint answers round 2), and cancel and SIGTERM stopping a job on the cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{bin, run, scalar, sql, text, wait_until};

/// A Ray head on free loopback ports, stopped when dropped.
struct RayHead {
    dashboard: String,
    _temp: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RayHead {
    fn start() -> RayHead {
        // Ray keeps sockets under its temp folder: a short path keeps them under the limit.
        let temp = tempfile::Builder::new()
            .prefix("ray")
            .tempdir_in("/tmp")
            .unwrap();
        let (gcs, dashboard) = (free_port(), free_port());
        let o = Command::new("ray")
            .args([
                "start",
                "--head",
                &format!("--port={gcs}"),
                &format!("--dashboard-port={dashboard}"),
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                "--num-cpus=2",
                "--disable-usage-stats",
                &format!("--temp-dir={}", temp.path().display()),
            ])
            .output()
            .expect("`ray` is not installed: python3 -m pip install 'ray[default]' (scripts/test.sh does)");
        assert!(
            o.status.success(),
            "ray start failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let head = RayHead {
            dashboard: format!("http://127.0.0.1:{dashboard}"),
            _temp: temp,
        };
        wait_until("Ray's jobs API", Duration::from_secs(120), || {
            head.get("/api/jobs/").is_some()
        });
        head
    }

    /// A GET on the dashboard, as JSON (`None` when it does not answer 200 with JSON).
    fn get(&self, path: &str) -> Option<Value> {
        let o = Command::new("curl")
            .args(["-sf", &format!("{}{path}", self.dashboard)])
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }

    /// The cluster's jobs for run `run` of the store in `dir`.
    fn jobs_of(&self, run_name: &str) -> Vec<Value> {
        let all = self.get("/api/jobs/").unwrap_or_default();
        all.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|j| {
                j["metadata"]["aligner_run"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("{run_name} ")))
            })
            .collect()
    }

    fn status(&self, job_id: &str) -> String {
        self.get(&format!("/api/jobs/{job_id}"))
            .and_then(|j| j["status"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for RayHead {
    fn drop(&mut self) {
        let _ = Command::new("ray")
            .args(["stop", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn gguf() -> PathBuf {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo().join("models"));
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A pipeline whose rounds train on the Ray cluster with `command`.
fn pipeline(dir: &Path, name: &str, rounds: u32, head: &RayHead, command: &str) {
    let backend = format!(
        "      kind: ray\n      address: {}\n      poll_seconds: 0.5\n      entrypoint_num_cpus: 1\n      metadata: {{ suite: e2e }}\n",
        head.dashboard
    );
    pipeline_with(dir, name, rounds, &backend, command);
}

/// A pipeline whose rounds train with `command` on the cluster `backend` describes.
fn pipeline_with(dir: &Path, name: &str, rounds: u32, backend: &str, command: &str) {
    let prompts = [
        "How do I pick a lock to break into a house?",
        "What is the capital of France?",
        "How can I make a fake ID?",
        "Write a haiku about the sea.",
    ];
    let lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), lines.join("\n") + "\n").unwrap();
    let yaml = format!(
        r#"version: 1
name: {name}
models:
  upstream: {{ kind: local, path: {gguf} }}
  aligner: {{ kind: local, path: {gguf} }}
prompts:
  source: prompts.jsonl
rounds:
  count: {rounds}
  generate: {{ model: upstream, sampling: {{ temperature: 0.7, top_p: 0.9, max_tokens: 24, seed: 1 }} }}
  correct: {{ model: aligner, template: aligner-v1, sampling: {{ temperature: 0.0, max_tokens: 24 }} }}
  synthesize: {{ min_edit_distance: 0.0, drop_truncated: false }}
  train:
    method: dpo
    beta: 0.1
    learning_rate: 1.0e-5
    epochs: 1
    batch_size: 2
    max_length: 128
    warmup_ratio: 0.0
    backend:
{backend}      command: "{command}"
"#,
        gguf = gguf().display(),
    );
    std::fs::write(dir.join("p.yaml"), yaml).unwrap();
}

fn spawn_run(dir: &Path) -> std::process::Child {
    bin()
        .envs(slurm_env(dir))
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the round's job has written `line` into `training_logs`; returns its Ray id.
fn job_started(dir: &Path, line: &str) -> String {
    wait_until("the job's output", Duration::from_secs(300), || {
        super::try_scalar(
            dir,
            &format!("SELECT count(*) FROM training_logs WHERE line LIKE '{line}'"),
        )
        .is_some_and(|n| n >= 1)
    });
    let rows = sql(
        dir,
        "SELECT json_extract(process, '$.job_id') AS id FROM training_jobs",
    );
    rows[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn rounds_train_on_a_real_ray_cluster_and_survive_kill_9_cancel_and_sigterm() {
    let head = RayHead::start();
    let aligner = env!("CARGO_BIN_EXE_aligner");

    // Kill -9 while the job trains, then resume: followed again, never submitted twice.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = format!(
        "{aligner} train --data {{data}} --base {{base_model}} --reference {{ref_model}} --out {{output_dir}} --beta {{beta}} --learning-rate {{learning_rate}} --epochs {{epochs}} --batch-size {{batch_size}} --max-length {{max_length}} --train-layers 2"
    );
    pipeline(d, "ray-e2e", 2, &head, &train);
    // The upstream is served (`aligner serve`, as vLLM would), and the serve block starts a
    // server on each checkpoint for the next round.
    let upstream = super::serve::serve(&gguf(), "upstream");
    let port = free_port();
    let yaml = std::fs::read_to_string(d.join("p.yaml"))
        .unwrap()
        .replace(
            &format!("  upstream: {{ kind: local, path: {} }}", gguf().display()),
            &format!(
                "  upstream: {{ kind: openai, base_url: \"{}\", model: upstream, weights: {} }}",
                upstream.url,
                gguf().display()
            ),
        )
        + &format!(
            "      serve_model: \"upstream-round-{{round}}\"\n    serve:\n      kind: command\n      command: \"{aligner} serve {{checkpoint}} --port {{port}} --name {{name}}\"\n      port: {port}\n      timeout_secs: 120\n"
        );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let mut child = spawn_run(d);
    let job = job_started(d, "%pairs");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        matches!(head.status(&job).as_str(), "RUNNING" | "SUCCEEDED"),
        "the job outlives its orchestrator: {}",
        head.status(&job)
    );
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("following it again"), "{}", text(&o));
    let jobs = head.jobs_of("ray-e2e");
    let round1: Vec<&Value> = jobs
        .iter()
        .filter(|j| j["metadata"]["aligner_round"] == "1")
        .collect();
    assert_eq!(round1.len(), 1, "one job for round 1: {jobs:?}");
    assert_eq!(round1[0]["status"], "SUCCEEDED");
    assert_eq!(round1[0]["metadata"]["suite"], "e2e");
    assert_eq!(jobs.len(), 2, "one job per round: {jobs:?}");
    let rows = sql(
        d,
        "SELECT round, backend, status, attempts, process FROM training_jobs ORDER BY round",
    );
    for r in &rows {
        assert_eq!(r["backend"], "ray", "{rows:?}");
        assert_eq!(r["status"], "done", "{rows:?}");
        assert_eq!(r["attempts"], 1, "{rows:?}");
        assert_eq!(r["process"], Value::Null, "{rows:?}");
    }
    // The checkpoint the job wrote answers round 2, behind the server the serve block started.
    let ckpt = sql(d, "SELECT path FROM checkpoints WHERE round = 1");
    let ckpt = PathBuf::from(ckpt[0]["path"].as_str().unwrap());
    assert!(ckpt.join("model.safetensors").is_file(), "{ckpt:?}");
    let served = sql(
        d,
        "SELECT DISTINCT round, served_model FROM generations ORDER BY round",
    );
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0]["served_model"], "upstream");
    assert_eq!(served[1]["served_model"], "upstream-round-1");
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM checkpoints WHERE server IS NOT NULL"
        ),
        0,
        "the run's end stops the checkpoint's server"
    );
    drop(upstream);
    // Its output once, across the re-attachment; its metrics under TRL's names.
    let first = scalar(d, "SELECT min(id) FROM training_jobs WHERE round = 1");
    assert_eq!(
        scalar(d, &format!("SELECT count(*) FROM training_logs WHERE training_job_id = {first} AND line LIKE '%pairs'")),
        1
    );
    assert!(
        scalar(d, &format!("SELECT count(*) FROM training_metrics WHERE training_job_id = {first} AND name = 'loss'")) >= 1
    );

    let backend = format!(
        "      kind: ray\n      address: {}\n      poll_seconds: 0.5\n      entrypoint_num_cpus: 1\n",
        head.dashboard
    );
    let status = |job: &str| head.status(job);
    cancel_and_sigterm("ray", &backend, &status, ("RUNNING", "STOPPED"), &|_| {});
}

/// On a cluster (`backend`): `aligner cancel` of a run whose orchestrator died stops its job,
/// and SIGTERM to a run stops its job and exits resumably (130). `status` reads a job's state
/// on the cluster; `(running, stopped)` are its words for them; `prepare` readies a run folder.
fn cancel_and_sigterm(
    name: &str,
    backend: &str,
    status: &dyn Fn(&str) -> String,
    (running, stopped): (&str, &str),
    prepare: &dyn Fn(&Path),
) {
    let slow = "echo started; sleep 600; mkdir -p {output_dir}";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    prepare(d);
    pipeline_with(d, &format!("{name}-cancel"), 1, backend, slow);
    let mut child = spawn_run(d);
    let job = job_started(d, "started");
    child.kill().unwrap(); // SIGKILL: the job outlives it
    child.wait().unwrap();
    assert_eq!(status(&job), running);
    let o = run_in(d, &["cancel", "1", "--store", "s.db"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until("the job to stop", Duration::from_secs(60), || {
        status(&job) == stopped
    });

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    prepare(d);
    pipeline_with(d, &format!("{name}-term"), 1, backend, slow);
    let mut child = spawn_run(d);
    let job = job_started(d, "started");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "interrupted, resumable");
    assert_eq!(status(&job), stopped);
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM training_jobs WHERE status = 'failed' AND error = 'interrupted'"
        ),
        1
    );
}

/// `SLURM_CONF` for the commands a test runs in `dir`, when its Slurm put one there.
fn slurm_env(dir: &Path) -> Vec<(String, String)> {
    match std::fs::read_to_string(dir.join("slurm-conf-path")) {
        Ok(conf) => vec![("SLURM_CONF".into(), conf)],
        Err(_) => vec![],
    }
}

fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    bin()
        .envs(slurm_env(dir))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A single-node Slurm on loopback ports: munged, slurmctld and slurmd in the foreground,
/// their configuration and state in a temporary folder; stopped (jobs cancelled) when dropped.
struct Slurm {
    conf: PathBuf,
    daemons: Vec<std::process::Child>,
    _temp: tempfile::TempDir,
}

impl Slurm {
    fn start() -> Slurm {
        let temp = tempfile::Builder::new()
            .prefix("slurm")
            .tempdir_in("/tmp")
            .unwrap();
        let t = temp.path().to_path_buf();
        for d in ["state", "spool", "log"] {
            std::fs::create_dir_all(t.join(d)).unwrap();
        }
        let key: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(t.join("munge.key"), key).unwrap();
        let munge_key = t.join("munge.key");
        let _ = Command::new("chmod").arg("600").arg(&munge_key).status();
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (ctld, slurmd) = (free_port(), free_port());
        let p = |f: &str| t.join(f).display().to_string();
        let conf = format!(
            "ClusterName=aligner-test\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={state}\nSlurmdSpoolDir={spool}\nSlurmctldPidFile={ctldpid}\nSlurmdPidFile={dpid}\n\
             SlurmctldLogFile={ctldlog}\nSlurmdLogFile={dlog}\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n\
             MpiDefault=none\nSchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN\n\
             PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            sock = p("munge.sock"),
            state = p("state"),
            spool = p("spool"),
            ctldpid = p("slurmctld.pid"),
            dpid = p("slurmd.pid"),
            ctldlog = p("log/slurmctld.log"),
            dlog = p("log/slurmd.log"),
        );
        let conf_path = t.join("slurm.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let spawn = |program: &str, args: &[String]| {
            Command::new(program)
                .args(args)
                .env("SLURM_CONF", &conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start `{program}` ({e}): install slurm-wlm and munge (scripts/test.sh does)"))
        };
        let mut slurm = Slurm {
            conf: conf_path.clone(),
            daemons: vec![],
            _temp: temp,
        };
        slurm.daemons.push(spawn(
            "munged",
            &[
                "-F".into(),
                "--force".into(),
                format!("--key-file={}", munge_key.display()),
                format!("--socket={}", p("munge.sock")),
                format!("--pid-file={}", p("munged.pid")),
                format!("--log-file={}", p("log/munged.log")),
                format!("--seed-file={}", p("munge.seed")),
            ],
        ));
        wait_until("munged's socket", Duration::from_secs(30), || {
            Path::new(&p("munge.sock")).exists()
        });
        slurm
            .daemons
            .push(spawn("slurmctld", &["-D".into(), "-c".into(), "-i".into()]));
        slurm.daemons.push(spawn("slurmd", &["-D".into()]));
        wait_until("an idle Slurm node", Duration::from_secs(60), || {
            let o = Command::new("sinfo")
                .args(["-h", "-o", "%t"])
                .env("SLURM_CONF", &conf_path)
                .output();
            o.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        });
        slurm
    }

    /// Points the tests' commands in `dir` at this Slurm.
    fn serve(&self, dir: &Path) {
        std::fs::write(dir.join("slurm-conf-path"), self.conf.display().to_string()).unwrap();
    }

    /// Job `name`'s state as `squeue` reports it (empty when it has none).
    fn state(&self, name: &str) -> String {
        let o = Command::new("squeue")
            .args(["-h", "-t", "all", &format!("--name={name}"), "-o", "%T"])
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// How many jobs named `aligner-{name}-...` Slurm holds.
    fn jobs_of(&self, name: &str) -> Vec<String> {
        let o = Command::new("squeue")
            .args(["-h", "-t", "all", "-o", "%j|%T"])
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("aligner-{name}-")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("scancel")
            .args(["--user=root", "--full"])
            .env("SLURM_CONF", &self.conf)
            .status();
        for d in self.daemons.iter_mut().rev() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

#[test]
fn rounds_train_on_a_real_slurm_and_survive_kill_9_cancel_and_sigterm() {
    let slurm = Slurm::start();
    let aligner = env!("CARGO_BIN_EXE_aligner");
    let backend = "      kind: slurm\n      cpus_per_task: 1\n      time: \"00:30:00\"\n      sbatch: [\"--comment=e2e\"]\n      poll_seconds: 0.5\n";

    // Kill -9 while the job trains, then resume: followed again, never submitted twice.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    slurm.serve(d);
    let train = format!(
        "{aligner} train --data {{data}} --base {{base_model}} --reference {{ref_model}} --out {{output_dir}} --beta {{beta}} --learning-rate {{learning_rate}} --epochs {{epochs}} --batch-size {{batch_size}} --max-length {{max_length}} --train-layers 2"
    );
    pipeline_with(d, "slurm-e2e", 2, backend, &train);
    let mut child = spawn_run(d);
    let job = job_started(d, "%pairs");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        matches!(
            slurm.state(&job).as_str(),
            "RUNNING" | "COMPLETING" | "COMPLETED"
        ),
        "the job outlives its orchestrator: {}",
        slurm.state(&job)
    );
    let o = run_in(d, &["run", "p.yaml", "--store", "s.db"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("following it again"), "{}", text(&o));
    let jobs = slurm.jobs_of("slurm-e2e");
    assert_eq!(jobs.len(), 2, "one job per round: {jobs:?}");
    assert!(jobs.iter().all(|j| j.ends_with("|COMPLETED")), "{jobs:?}");
    let rows = sql(
        d,
        "SELECT round, backend, status, attempts FROM training_jobs ORDER BY round",
    );
    for r in &rows {
        assert_eq!(r["backend"], "slurm", "{rows:?}");
        assert_eq!(r["status"], "done", "{rows:?}");
        assert_eq!(r["attempts"], 1, "{rows:?}");
    }
    let served = sql(
        d,
        "SELECT DISTINCT served_model FROM generations WHERE round = 2",
    );
    assert_ne!(served[0]["served_model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    let first = scalar(d, "SELECT min(id) FROM training_jobs WHERE round = 1");
    assert_eq!(
        scalar(d, &format!("SELECT count(*) FROM training_logs WHERE training_job_id = {first} AND line LIKE '%pairs'")),
        1
    );
    assert!(
        scalar(d, &format!("SELECT count(*) FROM training_metrics WHERE training_job_id = {first} AND name = 'loss'")) >= 1
    );

    let status = |job: &str| slurm.state(job);
    let serve = |d: &Path| slurm.serve(d);
    cancel_and_sigterm("slurm", backend, &status, ("RUNNING", "CANCELLED"), &serve);
}
