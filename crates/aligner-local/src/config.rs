//! The one model configuration of the llama family (Llama, SmolLM, Mistral, Qwen2): shapes and
//! constants read from a GGUF file's metadata or a Hugging Face `config.json`. Inference (the
//! CPU path in `model.rs`, the candle device path in `device.rs`) and the trainer
//! (`aligner-train`) all read a model through these two functions.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::gguf::GgufFile;

/// The architectures the loaders read, for hints.
pub const SUPPORTED: &str = "llama (Llama, SmolLM), mistral, qwen2";

/// How rotary embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama-architecture GGUF files, whose Q/K rows were
    /// permuted by the converter.
    Interleaved,
    /// Halves (x[i], x[i + d/2]): Hugging Face checkpoints, and Qwen2 in GGUF.
    Halves,
}

/// Shapes and constants of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// Positions the model was trained for (`context_length`, `max_position_embeddings`).
    pub context: usize,
    /// The output projection is the token embedding.
    pub tie_embeddings: bool,
    /// q/k/v projections with biases (Qwen2).
    pub qkv_bias: bool,
    /// How the file's Q/K rows pair dimensions for rotary embeddings.
    pub rope: RopeStyle,
}

/// Context length when the file does not say.
const DEFAULT_CONTEXT: usize = 4096;

impl ModelConfig {
    /// From a GGUF file's metadata (`{arch}.*` keys) and tensor list.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?;
        let rope = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Halves,
            other => bail!(
                "{}: GGUF architecture `{other}` is not supported\nhint: supported architectures: {SUPPORTED}",
                file.path.display()
            ),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| {
            file.usize(&key(k))
                .map_err(|_| anyhow!("{}: metadata `{}` is missing", file.path.display(), key(k)))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let embed_dims = file.dims("token_embd.weight")?;
        Ok(ModelConfig {
            vocab: embed_dims[0],
            hidden,
            intermediate: need("feed_forward_length")?,
            layers: need("block_count")?,
            heads,
            kv_heads: file.usize(&key("attention.head_count_kv")).unwrap_or(heads),
            head_dim: file
                .usize(&key("attention.key_length"))
                .unwrap_or(hidden / heads),
            rope_theta: f64::from(file.f32(&key("rope.freq_base")).unwrap_or(10_000.0)),
            rms_eps: f64::from(
                file.f32(&key("attention.layer_norm_rms_epsilon"))
                    .unwrap_or(1e-5),
            ),
            context: file
                .usize(&key("context_length"))
                .unwrap_or(DEFAULT_CONTEXT),
            tie_embeddings: !file.has("output.weight"),
            qkv_bias: file.has("blk.0.attn_q.bias"),
            rope,
            architecture: arch,
        })
    }

    /// From a Hugging Face model folder's `config.json`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "reading {}\nhint: a Hugging Face model folder holds config.json, tokenizer.json, tokenizer_config.json and model*.safetensors",
                cfg_path.display()
            )
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let arch = match cfg["architectures"][0].as_str() {
            Some("LlamaForCausalLM") => "llama",
            Some("MistralForCausalLM") => "mistral",
            Some("Qwen2ForCausalLM") => "qwen2",
            other => bail!(
                "{}: architecture {:?} is not supported\nhint: supported architectures: {SUPPORTED} (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
                cfg_path.display(),
                other.unwrap_or("(none)")
            ),
        };
        let get = |k: &str| -> Result<usize> {
            cfg[k]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("{}: missing `{k}`", cfg_path.display()))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        Ok(ModelConfig {
            architecture: arch.to_string(),
            vocab: get("vocab_size")?,
            hidden,
            intermediate: get("intermediate_size")?,
            layers: get("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(hidden / heads),
            rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10_000.0),
            rms_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            context: get("max_position_embeddings").unwrap_or(DEFAULT_CONTEXT),
            tie_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: arch == "qwen2" || cfg["attention_bias"].as_bool().unwrap_or(false),
            rope: RopeStyle::Halves,
        })
    }
}
