//! Sentence embeddings with a sentence-transformers BERT folder (all-MiniLM-L6-v2 and its
//! kin), run with candle: the synthesize stage's semantic filter compares texts with them.
//!
//! The encoder is candle-transformers' BERT (word + position + token-type embeddings and
//! LayerNorm, then self-attention layers with a padding mask and a GELU feed-forward); this
//! module adds what sentence-transformers puts around it: the folder's checks and tokenizer
//! settings, the pooling head it names (mean pooling over real tokens by default) and L2
//! normalization, so that a dot product is a cosine.
//!
//! Texts are embedded in batches of [`BATCH`]: sorted by token count first, so that each batch
//! pads little, and returned in the caller's order. Checked against a float64 numpy reference
//! (`scripts/fixtures/minilm_reference.py`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use tokenizers::utils::padding::{pad_encodings, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationParams, TruncationStrategy};
use tokenizers::{Encoding, Tokenizer};

/// Texts per forward pass.
pub const BATCH: usize = 32;

/// Tokens per text when the folder does not say (`sentence_bert_config.json`'s
/// `max_seq_length`).
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// The files an embedder folder must have.
const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// `1_Pooling/config.json`: which pooling the sentence-transformers head uses.
#[derive(Debug, Clone, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
}

/// A sentence-transformers BERT encoder with its tokenizer.
pub struct Embedder {
    tokenizer: Tokenizer,
    padding: PaddingParams,
    device: Device,
    model: BertModel,
    dim: usize,
    pooling: Pooling,
    max_seq_length: usize,
}

fn missing_file(dir: &Path, name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "embedder folder `{}` has no `{name}`\nhint: `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`; any sentence-transformers BERT folder with {} works",
        dir.display(),
        REQUIRED_FILES.map(|f| format!("`{f}`")).join(", ")
    )
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("`{}` is not valid", path.display()))
}

impl Embedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a
    /// sentence-transformers folder (plus `1_Pooling/config.json` and
    /// `sentence_bert_config.json` when present) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "embedder folder `{}` does not exist\nhint: `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`",
                dir.display()
            );
        }
        for name in REQUIRED_FILES {
            if !dir.join(name).is_file() {
                return Err(missing_file(dir, name));
            }
        }
        let mut raw: serde_json::Value = read_json(&dir.join("config.json"))?;
        let text = |k: &str| raw.get(k).and_then(|v| v.as_str()).map(String::from);
        if let Some(t) = text("model_type").as_deref() {
            if t != "bert" {
                bail!(
                    "`{}`: model_type `{t}` is not supported for embeddings; supported: `bert` (e.g. all-MiniLM-L6-v2)",
                    dir.join("config.json").display()
                );
            }
        }
        if let Some(p) = text("position_embedding_type").as_deref() {
            if p != "absolute" {
                bail!(
                    "`{}`: position_embedding_type `{p}` is not supported; supported: `absolute`",
                    dir.display()
                );
            }
        }
        // Hugging Face's names for the two GELUs, as candle-transformers spells them: the
        // exact `x * Φ(x)` (BERT's `gelu`) and the tanh approximation.
        let activation = match text("hidden_act").as_deref().unwrap_or("gelu") {
            "gelu" => "gelu",
            "gelu_new" | "gelu_pytorch_tanh" => "geluapproximate",
            other => bail!(
                "`{}`: hidden_act `{other}` is not supported; supported: `gelu`, `gelu_new`, `gelu_pytorch_tanh`",
                dir.display()
            ),
        };
        // Defaults of Hugging Face's `BertConfig` for what a folder may leave out.
        let object = raw.as_object_mut().with_context(|| {
            format!(
                "`{}` is not a JSON object",
                dir.join("config.json").display()
            )
        })?;
        object.insert("hidden_act".into(), activation.into());
        for (key, default) in [
            ("type_vocab_size", serde_json::json!(2)),
            ("layer_norm_eps", serde_json::json!(1e-12)),
            ("hidden_dropout_prob", serde_json::json!(0.1)),
            ("initializer_range", serde_json::json!(0.02)),
            ("pad_token_id", serde_json::json!(0)),
        ] {
            object.entry(key).or_insert(default);
        }
        object.remove("position_embedding_type");
        let config: BertConfig = serde_json::from_value(raw).with_context(|| {
            format!(
                "`{}` is not a BERT configuration",
                dir.join("config.json").display()
            )
        })?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            bail!(
                "`{}`: hidden_size {} is not a multiple of num_attention_heads {}",
                dir.display(),
                config.hidden_size,
                config.num_attention_heads
            );
        }

        let pooling = match dir.join("1_Pooling/config.json") {
            p if p.is_file() => {
                let c: PoolingConfig = read_json(&p)?;
                match (
                    c.pooling_mode_mean_tokens,
                    c.pooling_mode_cls_token,
                    c.pooling_mode_max_tokens || c.pooling_mode_mean_sqrt_len_tokens,
                ) {
                    (true, false, false) => Pooling::Mean,
                    (false, true, false) => Pooling::Cls,
                    _ => bail!(
                        "`{}`: this pooling is not supported; supported: `pooling_mode_mean_tokens` or `pooling_mode_cls_token` alone",
                        p.display()
                    ),
                }
            }
            _ => Pooling::Mean,
        };
        let max_seq_length = match dir.join("sentence_bert_config.json") {
            p if p.is_file() => read_json::<serde_json::Value>(&p)?
                .get("max_seq_length")
                .and_then(|v| v.as_u64())
                .map_or(DEFAULT_MAX_SEQ_LENGTH, |v| v as usize),
            _ => DEFAULT_MAX_SEQ_LENGTH,
        }
        .min(config.max_position_embeddings);

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            anyhow::anyhow!(
                "cannot load `{}`: {e}",
                dir.join("tokenizer.json").display()
            )
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("cannot set truncation: {e}"))?;
        // Padding is applied per batch (after sorting by length), not by `encode_batch`.
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
        padding.strategy = PaddingStrategy::BatchLongest;
        padding.pad_to_multiple_of = None;
        if tokenizer.get_padding().is_none() {
            padding.pad_id = config.pad_token_id as u32;
        }
        tokenizer.with_padding(None);

        let weights_path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .with_context(|| format!("cannot read `{}`", weights_path.display()))?;
        let prefix = ["", "bert.", "model."]
            .into_iter()
            .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
            .with_context(|| {
                format!(
                    "`{}` has no `embeddings.word_embeddings.weight`: not a BERT model",
                    weights_path.display()
                )
            })?;
        // The encoder's tensors under their unprefixed names, whichever prefix the file uses.
        let tensors = tensors
            .into_iter()
            .filter_map(|(name, t)| Some((name.strip_prefix(prefix)?.to_string(), t)))
            .collect();
        let model = BertModel::load(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            &config,
        )
        .with_context(|| {
            format!(
                "`{}` is not the BERT its config.json describes",
                weights_path.display()
            )
        })?;
        Ok(Embedder {
            tokenizer,
            padding,
            device: device.clone(),
            model,
            dim: config.hidden_size,
            pooling,
            max_seq_length,
        })
    }

    /// [`load`](Self::load) onto the CPU (callers need no candle types).
    pub fn load_cpu(dir: &Path) -> Result<Self> {
        Self::load(dir, &Device::Cpu)
    }

    /// Length of each embedding (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens kept per text; longer texts are truncated.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// One L2-normalized embedding per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        // Longest first, so each batch pads as little as possible.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
        let mut out = vec![Vec::new(); encodings.len()];
        for chunk in order.chunks(BATCH) {
            let mut batch: Vec<Encoding> = chunk.iter().map(|&i| encodings[i].clone()).collect();
            pad_encodings(&mut batch, &self.padding)
                .map_err(|e| anyhow::anyhow!("padding failed: {e}"))?;
            let vectors = self.forward(&batch)?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Embeddings of one padded batch.
    fn forward(&self, batch: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        let (b, t) = (batch.len(), batch[0].get_ids().len());
        let flat = |f: fn(&Encoding) -> &[u32]| -> Vec<u32> {
            batch.iter().flat_map(|e| f(e).iter().copied()).collect()
        };
        let dev = &self.device;
        let ids = Tensor::from_vec(flat(Encoding::get_ids), (b, t), dev)?;
        let type_ids = Tensor::from_vec(flat(Encoding::get_type_ids), (b, t), dev)?;
        let mask = Tensor::from_vec(flat(Encoding::get_attention_mask), (b, t), dev)?
            .to_dtype(DType::F32)?;

        let x = self.model.forward(&ids, &type_ids, Some(&mask))?;

        let pooled = match self.pooling {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

/// Cosine similarity of two vectors, in [-1, 1]; 0 when either is all zeros.
pub use aligner_backend::cosine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_basics() {
        assert_eq!(cosine(&[1.0, 0.0], &[2.0, 0.0]), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert_eq!(cosine(&[1.0, 0.0], &[-1.0, 0.0]), -1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = Embedder::load(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has no `model.safetensors`"), "{err}");
        assert!(err.contains("aligner models fetch"), "{err}");
        let err = Embedder::load(&dir.path().join("nope"), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("aligner models fetch"),
            "{err}"
        );
    }
}
