//! The sentence embedder of `rounds.synthesize.semantic`: a sentence-transformers folder
//! (all-MiniLM-L6-v2 by default) run on the CPU with candle by `aligner-local`. Each folder is
//! loaded once per process and shared.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use aligner_backend::{Embedder, Error, ErrorKind};
use aligner_spec::SemanticFilter;

struct LocalEmbedder(aligner_local::embed::Embedder);

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

/// The embedder for `spec.embedder`, loaded on first use.
pub fn load(spec: &SemanticFilter) -> Result<Arc<dyn Embedder>, String> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<LocalEmbedder>>>> = OnceLock::new();
    let mut cache = LOADED
        .get_or_init(Default::default)
        .lock()
        .expect("embedder cache lock");
    if let Some(e) = cache.get(&spec.embedder) {
        return Ok(e.clone());
    }
    let embedder = aligner_local::embed::Embedder::load_cpu(&spec.embedder)
        .map_err(|e| format!("`rounds.synthesize.semantic.embedder`: {e:#}"))?;
    let embedder = Arc::new(LocalEmbedder(embedder));
    cache.insert(spec.embedder.clone(), embedder.clone());
    Ok(embedder)
}
