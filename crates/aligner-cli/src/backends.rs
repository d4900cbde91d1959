//! Wires the spec's models to real backends: the OpenAI-compatible HTTP client and local
//! models (`aligner-local`). A local model named by several roles (the quickstart's upstream
//! and Aligner) is loaded once and shared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aligner_backend::TextGenerator;
use aligner_spec::ModelSpec;

pub struct Factory;

impl aligner_engine::BackendFactory for Factory {
    fn text_generator(
        &self,
        name: &str,
        spec: &ModelSpec,
    ) -> Result<Arc<dyn TextGenerator>, String> {
        match spec {
            ModelSpec::Openai(m) => {
                let api_key = match &m.api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        format!("environment variable `{var}` (from `models.{name}.api_key_env`) is not set\nhint: export {var}=<your key>")
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
                if let Some(ms) = std::env::var("ALIGNER_BACKOFF_BASE_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    config.backoff_base = Duration::from_millis(ms);
                }
                let backend = aligner_openai::OpenAiBackend::new(config).map_err(|e| e.message)?;
                Ok(Arc::new(backend))
            }
            ModelSpec::Local(m) => local_backend(name, m),
        }
    }

    fn embedder(
        &self,
        spec: &aligner_spec::SemanticFilter,
    ) -> Result<Arc<dyn aligner_backend::Embedder>, String> {
        crate::embedder::load(spec)
    }

    fn trainer(&self) -> Result<Arc<dyn aligner_engine::Trainer>, String> {
        Ok(Arc::new(crate::trainer::BuiltinTrainer))
    }
}

/// Loaded local models, by their spec.
fn loaded() -> &'static Mutex<HashMap<String, Arc<aligner_local::backend::LocalBackend>>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Arc<aligner_local::backend::LocalBackend>>>> =
        OnceLock::new();
    LOADED.get_or_init(Default::default)
}

fn local_backend(
    name: &str,
    m: &aligner_spec::LocalModel,
) -> Result<Arc<dyn TextGenerator>, String> {
    let key = serde_json::to_string(m).unwrap_or_default();
    let mut cache = loaded().lock().expect("model cache lock");
    if let Some(b) = cache.get(&key) {
        return Ok(b.clone());
    }
    let mut opts = aligner_local::backend::LoadOptions::default();
    if let Some(n) = std::env::var("ALIGNER_LOCAL_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        opts.max_batch = n.max(1);
    }
    let backend = aligner_local::backend::LocalBackend::load(m, opts)
        .map_err(|e| format!("models.{name}: {e:#}"))?;
    let backend = Arc::new(backend);
    cache.insert(key, backend.clone());
    Ok(backend)
}
