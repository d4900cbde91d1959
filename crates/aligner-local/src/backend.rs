//! [`LocalBackend`]: a local model behind the engine's [`TextGenerator`] trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aligner_backend::{
    Completion, CompletionRequest, Error, ErrorKind, FinishReason, Prompt, TextGenerator, TextSink,
};
use aligner_spec::{LocalModel, LocalSource};
use anyhow::{anyhow, bail, Result};

use crate::chat::ChatTemplate;
use crate::engine::{Engine, EngineOptions, Finish, GenParams};
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Sequences decoding at once. Default 16.
    pub max_batch: usize,
    /// Context length cap (prompt + output). Default 4096 (or the model's, if smaller).
    pub context: usize,
    /// Default `max_tokens` when a request sets none.
    pub default_max_tokens: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_batch: 16,
            context: 4096,
            default_max_tokens: 512,
        }
    }
}

/// A loaded model: weights, tokenizer, chat template and the batching engine.
pub struct LocalBackend {
    id: String,
    name: String,
    tokenizer: Arc<TextTokenizer>,
    chat: Option<ChatTemplate>,
    engine: Engine,
    default_max_tokens: usize,
}

/// Where a model's files are, once a hub id is resolved.
enum Resolved {
    Gguf(PathBuf),
    Folder(PathBuf),
}

impl LocalBackend {
    pub fn load(spec: &LocalModel, opts: LoadOptions) -> Result<Self> {
        let (resolved, name) = match &spec.source {
            LocalSource::Gguf { path, .. } => (Resolved::Gguf(path.clone()), file_name(path)),
            LocalSource::HfFolder { path, .. } => (Resolved::Folder(path.clone()), file_name(path)),
            LocalSource::HubId { id, revision } => (
                Resolved::Folder(resolve_hub_id(id, revision.as_deref())?),
                id.clone(),
            ),
        };
        let started = Instant::now();
        let (model, tokenizer, source) = match &resolved {
            Resolved::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let model = Model::from_gguf(&file)?;
                let tok = TextTokenizer::from_gguf(&file.content)
                    .map_err(|e| anyhow!("{}: tokenizer: {e:#}", path.display()))?;
                (model, tok, path.clone())
            }
            Resolved::Folder(dir) => {
                if !dir.join("config.json").is_file() {
                    bail!(
                        "{}: no config.json\nhint: a Hugging Face model folder holds config.json, tokenizer.json, tokenizer_config.json and model*.safetensors",
                        dir.display()
                    );
                }
                let model = Model::from_hf_folder(dir, &spec.dtype)?;
                let tok = TextTokenizer::from_hf_folder(dir)?;
                (model, tok, dir.clone())
            }
        };
        let chat = match tokenizer.chat_template() {
            Some(t) => Some(ChatTemplate::new(
                t,
                tokenizer.bos_token().map(String::from),
                tokenizer.eos_token().map(String::from),
            )?),
            None => None,
        };
        tracing::info!(
            model = %source.display(),
            architecture = %model.config.architecture,
            weights_mb = model.weight_bytes() / (1 << 20),
            secs = started.elapsed().as_secs_f64(),
            "loaded local model"
        );
        let tokenizer = Arc::new(tokenizer);
        let engine = Engine::start(
            Arc::new(model),
            tokenizer.clone(),
            EngineOptions {
                max_batch: opts.max_batch.max(1),
                prefill_chunk: 512,
                context: opts.context,
            },
        );
        Ok(LocalBackend {
            id: format!("local:{}", source.display()),
            name,
            tokenizer,
            chat,
            engine,
            default_max_tokens: opts.default_max_tokens,
        })
    }

    /// The served name (file or folder name, or the hub id).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The token ids the model reads for `prompt`.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, Error> {
        let text = match prompt {
            Prompt::Raw(text) => text.clone(),
            Prompt::Chat(messages) => {
                let chat = self.chat.as_ref().ok_or_else(|| {
                    permanent(format!(
                        "model `{}` has no chat template\nhint: use a raw prompt template (e.g. `aligner-v1`), or a model whose tokenizer_config.json / GGUF metadata carries a chat template",
                        self.name
                    ))
                })?;
                chat.render(messages, true)
                    .map_err(|e| permanent(format!("chat template: {e:#}")))?
            }
        };
        self.tokenizer
            .encode(&text, true)
            .map_err(|e| permanent(format!("tokenizing the prompt: {e:#}")))
    }

    fn params(&self, request: &CompletionRequest) -> GenParams {
        let s = &request.sampling;
        GenParams {
            max_tokens: s
                .max_tokens
                .map(|m| m as usize)
                .unwrap_or(self.default_max_tokens)
                .max(1),
            stop: s.stop.clone(),
            ignore_eos: false,
            sampling: SamplingParams {
                temperature: s.temperature.unwrap_or(1.0) as f32,
                top_p: s.top_p.unwrap_or(1.0) as f32,
                top_k: s.top_k.unwrap_or(0) as usize,
                repetition_penalty: s.repetition_penalty.unwrap_or(1.0) as f32,
                frequency_penalty: s.frequency_penalty.unwrap_or(0.0) as f32,
                presence_penalty: s.presence_penalty.unwrap_or(0.0) as f32,
                seed: s.seed.unwrap_or_else(rand::random),
            },
        }
    }

    async fn run(
        &self,
        request: CompletionRequest,
        sink: Option<TextSink>,
    ) -> Result<Completion, Error> {
        let started = Instant::now();
        let ids = self.prompt_ids(&request.prompt)?;
        let params = self.params(&request);
        let out = self
            .engine
            .generate(ids, params, sink)
            .await
            .map_err(permanent)?;
        Ok(Completion {
            text: out.text,
            finish_reason: match out.finish {
                Finish::Stop => FinishReason::Stop,
                Finish::Length => FinishReason::Length,
            },
            model: self.name.clone(),
            prompt_tokens: Some(out.prompt_tokens as u32),
            completion_tokens: Some(out.tokens.len() as u32),
            latency: started.elapsed(),
            attempts: 1,
            replica: None,
        })
    }
}

fn permanent(message: impl Into<String>) -> Error {
    Error {
        kind: ErrorKind::Permanent,
        message: message.into(),
        attempts: 1,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[async_trait::async_trait]
impl TextGenerator for LocalBackend {
    fn id(&self) -> String {
        self.id.clone()
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, Error> {
        self.run(request, None).await
    }

    async fn complete_streaming(
        &self,
        request: CompletionRequest,
        sink: TextSink,
    ) -> Result<Completion, Error> {
        self.run(request, Some(sink)).await
    }
}

/// Finds a hub model in the local Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`): `models--org--name/snapshots/<revision>/`.
pub fn resolve_hub_id(id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let cache = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })
        .ok_or_else(|| anyhow!("cannot locate the Hugging Face cache (set HF_HUB_CACHE)"))?;
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let snapshot = std::fs::read_to_string(repo.join("refs").join(rev))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| rev.to_string());
    let dir = repo.join("snapshots").join(&snapshot);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    bail!(
        "hub model `{id}` (revision {rev}) is not in the local Hugging Face cache ({})\nhint: download it first (`huggingface-cli download {id}`), or point `path:` at a local folder or .gguf file",
        cache.display()
    )
}

#[cfg(test)]
mod tests {
    use super::resolve_hub_id;

    #[test]
    fn hub_ids_resolve_in_the_local_cache_or_say_how_to_get_them() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::env::set_var("HF_HUB_CACHE", cache.path());
        assert_eq!(resolve_hub_id("org/name", None).unwrap(), snap);
        let err = resolve_hub_id("org/other", None).unwrap_err().to_string();
        std::env::remove_var("HF_HUB_CACHE");
        assert!(
            err.contains("org/other") && err.contains("huggingface-cli download org/other"),
            "{err}"
        );
    }
}
