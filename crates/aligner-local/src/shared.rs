//! Local models and sentence embedders loaded once per process and shared by every role that
//! names them (the quickstart's upstream and Aligner are one SmolLM2): what the pipeline's
//! backend factory hands the engine for `kind: local` models and `rounds.synthesize.semantic`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use aligner_backend::{Embedder, Error, ErrorKind};
use aligner_spec::LocalModel;
use anyhow::Context;

use crate::backend::{LoadOptions, LocalBackend};

/// The local model `models.{name}`, loaded on first use. `ALIGNER_LOCAL_MAX_BATCH` caps the
/// sequences generated together.
pub fn backend(name: &str, m: &LocalModel) -> anyhow::Result<Arc<LocalBackend>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Arc<LocalBackend>>>> = OnceLock::new();
    let key = serde_json::to_string(m).unwrap_or_default();
    let mut cache = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(b) = cache.get(&key) {
        return Ok(b.clone());
    }
    let mut opts = LoadOptions::default();
    if let Some(n) = std::env::var("ALIGNER_LOCAL_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        opts.max_batch = n.max(1);
    }
    let backend = LocalBackend::load(m, opts).with_context(|| format!("models.{name}"))?;
    let backend = Arc::new(backend);
    cache.insert(key, backend.clone());
    Ok(backend)
}

/// A sentence-transformers folder (all-MiniLM-L6-v2 by default) run on the CPU.
struct LocalEmbedder(crate::embed::Embedder);

impl Embedder for LocalEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Error> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.0.embed(&texts).map_err(|e| Error {
            kind: ErrorKind::Permanent,
            message: format!("{e:#}"),
            attempts: 1,
        })
    }
}

/// The sentence embedder in folder `dir`, loaded on first use.
pub fn embedder(dir: &Path) -> anyhow::Result<Arc<dyn Embedder>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<LocalEmbedder>>>> = OnceLock::new();
    let mut cache = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(e) = cache.get(dir) {
        return Ok(e.clone());
    }
    let embedder = crate::embed::Embedder::load_cpu(dir)
        .with_context(|| format!("the embedder `{}`", dir.display()))?;
    let embedder = Arc::new(LocalEmbedder(embedder));
    cache.insert(dir.to_path_buf(), embedder.clone());
    Ok(embedder)
}
