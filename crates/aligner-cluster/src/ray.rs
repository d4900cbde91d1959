//! Ray: [`RayJobs`] speaks the Jobs REST API of a Ray cluster's dashboard, the API behind
//! `ray job submit`: `POST /api/jobs/` submits under a chosen `submission_id`,
//! `GET /api/jobs/{id}` reports the state, `GET /api/jobs/{id}/logs` the driver's output and
//! `POST /api/jobs/{id}/stop` stops it. The engine decides when to call what
//! ([`aligner_engine::cluster`]); this crate only turns calls into requests and answers into
//! [`JobState`]s, keeping the cluster's own words in every error.

use std::collections::BTreeMap;
use std::time::Duration;

use aligner_engine::cluster::{ClusterJob, ClusterJobs, JobState, RemoteJob};
use aligner_spec::RayCluster;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A client of one Ray cluster, with what its jobs ask for.
pub struct RayJobs {
    cluster: RayCluster,
    http: reqwest::Client,
}

impl RayJobs {
    pub fn new(cluster: RayCluster) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { cluster, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/jobs/{path}", self.cluster.address)
    }

    /// The request body of a submission: the spec's `runtime_env` with the job's variables
    /// added to its `env_vars` (the spec's own win), resources and metadata.
    fn body(&self, job: &ClusterJob) -> Value {
        let mut runtime_env = match &self.cluster.runtime_env {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let mut env_vars: Map<String, Value> = job
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        if let Some(Value::Object(own)) = runtime_env.get("env_vars") {
            env_vars.extend(own.clone());
        }
        runtime_env.insert("env_vars".into(), Value::Object(env_vars));
        let mut metadata: BTreeMap<String, String> = self.cluster.metadata.clone();
        metadata.extend(job.metadata.iter().cloned());
        let mut body = json!({
            "entrypoint": job.entrypoint,
            "submission_id": job.id,
            "runtime_env": runtime_env,
            "metadata": metadata,
        });
        if let Some(cpus) = self.cluster.entrypoint_num_cpus {
            body["entrypoint_num_cpus"] = json!(cpus);
        }
        if let Some(gpus) = self.cluster.entrypoint_num_gpus {
            body["entrypoint_num_gpus"] = json!(gpus);
        }
        body
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(u16, String), String> {
        let response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| describe(&e))?;
        Ok((status, text))
    }
}

/// An HTTP error with its causes (connection refused, timed out, ...).
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

/// What the dashboard said: its message, or the last line of the Python traceback it sends
/// back with a 4xx/5xx (`ValueError: Job with submission_id ... already exists`).
fn said(status: u16, text: &str) -> String {
    let text = text.trim();
    let message = if text.starts_with("Traceback") {
        text.lines()
            .rev()
            .map(str::trim)
            .find(|l| l.contains("Error: ") || l.contains("Exception: "))
            .unwrap_or(text)
    } else {
        text
    };
    let short: String = message.chars().take(600).collect();
    format!("HTTP {status}: {short}")
}

#[derive(Deserialize)]
struct Details {
    status: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Logs {
    logs: String,
}

/// A job's `status` and `message` as a [`JobState`].
fn state_of(details: Details) -> JobState {
    let why = details.message.unwrap_or_default();
    match details.status.as_str() {
        "PENDING" => JobState::Pending,
        "RUNNING" => JobState::Running,
        "SUCCEEDED" => JobState::Succeeded,
        "STOPPED" => JobState::Failed(format!("stopped: {why}")),
        _ => JobState::Failed(why),
    }
}

/// The part of `logs` from byte `offset` on, cut back to a character boundary.
fn after(logs: &str, offset: u64) -> String {
    let mut at = (offset as usize).min(logs.len());
    while !logs.is_char_boundary(at) {
        at -= 1;
    }
    logs[at..].to_string()
}

#[async_trait::async_trait]
impl ClusterJobs for RayJobs {
    async fn submit(&self, _: &RemoteJob, job: &ClusterJob) -> Result<(), String> {
        let (status, text) = self
            .send(self.http.post(self.url("")).json(&self.body(job)))
            .await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(said(status, &text))
        }
    }

    async fn state(&self, remote: &RemoteJob) -> Result<JobState, String> {
        let (status, text) = self.send(self.http.get(self.url(&remote.job_id))).await?;
        match status {
            404 => Ok(JobState::Unknown),
            200..=299 => serde_json::from_str::<Details>(&text)
                .map(state_of)
                .map_err(|e| format!("unexpected answer ({e}): {}", said(status, &text))),
            _ => Err(said(status, &text)),
        }
    }

    async fn logs(&self, remote: &RemoteJob, offset: u64) -> Result<String, String> {
        let id = &remote.job_id;
        let (status, text) = self
            .send(self.http.get(self.url(&format!("{id}/logs"))))
            .await?;
        if !(200..300).contains(&status) {
            return Err(said(status, &text));
        }
        let logs: Logs = serde_json::from_str(&text)
            .map_err(|e| format!("unexpected answer ({e}): {}", said(status, &text)))?;
        Ok(after(&logs.logs, offset))
    }

    async fn stop(&self, remote: &RemoteJob) -> Result<(), String> {
        let id = &remote.job_id;
        let (status, text) = self
            .send(self.http.post(self.url(&format!("{id}/stop"))))
            .await?;
        match status {
            200..=299 | 404 => Ok(()),
            _ => Err(said(status, &text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> RayCluster {
        RayCluster {
            address: "http://127.0.0.1:1".into(),
            runtime_env: Some(
                json!({"env_vars": {"HF_HOME": "/shared", "ALIGNER_ROUND": "own"}, "pip": ["trl"]}),
            ),
            entrypoint_num_cpus: None,
            entrypoint_num_gpus: Some(1.0),
            metadata: [("team".to_string(), "a".to_string())].into(),
            poll_seconds: 2.0,
        }
    }

    #[test]
    fn a_submission_carries_the_runtime_env_the_variables_and_the_resources() {
        let jobs = RayJobs::new(cluster()).unwrap();
        let body = jobs.body(&ClusterJob {
            id: "aligner-x-1-r1-a1".into(),
            entrypoint: "python train.py".into(),
            env: vec![
                ("ALIGNER_DATA".into(), "/d/pairs.jsonl".into()),
                ("ALIGNER_ROUND".into(), "1".into()),
            ],
            metadata: vec![("aligner_round".into(), "1".into())],
        });
        assert_eq!(
            body,
            json!({
                "entrypoint": "python train.py",
                "submission_id": "aligner-x-1-r1-a1",
                "runtime_env": {
                    "pip": ["trl"],
                    "env_vars": {"ALIGNER_DATA": "/d/pairs.jsonl", "ALIGNER_ROUND": "own", "HF_HOME": "/shared"},
                },
                "metadata": {"aligner_round": "1", "team": "a"},
                "entrypoint_num_gpus": 1.0,
            })
        );
    }

    #[test]
    fn states_and_log_offsets_read_as_the_engine_needs() {
        let d = |s: &str, m: &str| Details {
            status: s.into(),
            message: Some(m.into()),
        };
        assert_eq!(state_of(d("PENDING", "")), JobState::Pending);
        assert_eq!(state_of(d("SUCCEEDED", "")), JobState::Succeeded);
        assert_eq!(
            state_of(d("FAILED", "exit code 1")),
            JobState::Failed("exit code 1".into())
        );
        assert_eq!(
            state_of(d("STOPPED", "by user")),
            JobState::Failed("stopped: by user".into())
        );
        assert_eq!(after("héllo\n", 2), "éllo\n");
        assert_eq!(after("héllo\n", 3), "llo\n");
        assert_eq!(after("abc", 9), "");
    }

    #[test]
    fn a_traceback_is_read_down_to_its_message() {
        let body = "Traceback (most recent call last):\n  File \"job_head.py\", line 419\nRuntimeError: Request failed with status code 400: Traceback (most recent call last):\n  File \"job_manager.py\"\nValueError: Job with submission_id t-1 already exists. Please use a different submission_id.\n.";
        assert_eq!(
            said(500, body),
            "HTTP 500: ValueError: Job with submission_id t-1 already exists. Please use a different submission_id."
        );
        assert_eq!(
            said(404, "Job x does not exist"),
            "HTTP 404: Job x does not exist"
        );
    }

    #[tokio::test]
    async fn an_unreachable_dashboard_is_an_error_with_the_reason() {
        let jobs = RayJobs::new(cluster()).unwrap();
        let remote = RemoteJob {
            scheduler: aligner_engine::cluster::Scheduler::Ray(cluster()),
            job_id: "x".into(),
            attempt: 1,
            attempt_dir: "/tmp/x".into(),
        };
        let err = jobs.state(&remote).await.unwrap_err();
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }
}
