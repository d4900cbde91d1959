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
                let mut config = aligner_openai::Config::new(&m.base_url, &m.model);
                config.api_key = api_key;
                config.max_concurrency = m.max_concurrency;
                config.requests_per_minute = m.requests_per_minute;
                config.tokens_per_minute = m.tokens_per_minute;
                config.timeout = Duration::from_secs_f64(m.timeout_secs);
                config.max_retries = m.max_retries;
                config.raw_as_chat = m.raw_endpoint == aligner_spec::RawEndpoint::Chat;
                if let Some(ms) = std::env::var("ALIGNER_BACKOFF_BASE_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    config.backoff_base = Duration::from_millis(ms);
                }
                let backend = aligner_openai::OpenAiBackend::new(config)
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                Ok(Arc::new(backend))
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
