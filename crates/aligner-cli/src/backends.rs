//! Wires the spec's models to real backends: the OpenAI-compatible HTTP client, local models
//! and embedders (`aligner_local::shared`, loaded once per process), the built-in trainer, the
//! cluster schedulers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aligner_backend::TextGenerator;
use aligner_cluster::{HttpServing, RayJobs, SlurmJobs};
use aligner_engine::cluster::{ClusterJobs, Scheduler};
use aligner_engine::serving::CheckpointServer;
use aligner_spec::ModelSpec;

pub struct Factory;

impl aligner_engine::BackendFactory for Factory {
    fn text_generator(
        &self,
        name: &str,
        spec: &ModelSpec,
    ) -> anyhow::Result<Arc<dyn TextGenerator>> {
        match spec {
            ModelSpec::Openai(m) => {
                let api_key = match &m.api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        anyhow::anyhow!("environment variable `{var}` (from `models.{name}.api_key_env`) is not set\nhint: export {var}=<your key>")
                    })?),
                    None => None,
                };
                let backoff = std::env::var("ALIGNER_BACKOFF_BASE_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_millis);
                aligner_openai::from_spec(m, api_key, backoff)
                    .map_err(|e| anyhow::anyhow!(e.message))
            }
            ModelSpec::Local(m) => Ok(aligner_local::shared::backend(name, m)?),
        }
    }

    fn embedder(&self, dir: &Path) -> anyhow::Result<Arc<dyn aligner_backend::Embedder>> {
        aligner_local::shared::embedder(dir)
    }

    fn trainer(&self) -> anyhow::Result<Arc<dyn aligner_engine::Trainer>> {
        Ok(Arc::new(aligner_train::pipeline::BuiltinTrainer))
    }

    fn checkpoint_server(&self) -> anyhow::Result<Arc<dyn CheckpointServer>> {
        Ok(Arc::new(HttpServing::new().map_err(anyhow::Error::msg)?))
    }

    fn cluster(&self, scheduler: &Scheduler) -> anyhow::Result<Arc<dyn ClusterJobs>> {
        Ok(match scheduler {
            Scheduler::Ray(c) => Arc::new(RayJobs::new(c.clone()).map_err(anyhow::Error::msg)?),
            Scheduler::Slurm(c) => Arc::new(SlurmJobs::new(c.clone())),
        })
    }
}
