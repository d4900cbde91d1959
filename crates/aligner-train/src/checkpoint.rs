//! Checkpoints as Hugging Face folders: `config.json`, `model.safetensors` (Hugging Face tensor
//! names, LoRA merged), `tokenizer.json`, `tokenizer_config.json` (with the chat template),
//! `generation_config.json`, and `aligner.json` (what trained it, and for an Aligner the prompt
//! template every later use must render).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;

use aligner_local::tokenizer::TextTokenizer;

use crate::model::TrainModel;

/// What the checkpoint records about how it was made.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// `sft`, `dpo` or `train_aligner`.
    pub method: String,
    /// For an Aligner: the name of its prompt template (`aligner-v1`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aligner_template: Option<String>,
    /// The model it was trained from.
    pub base_model: String,
    pub optimizer_steps: usize,
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Writes the folder atomically (into `dir.tmp`, then renamed over `dir`).
pub fn save_hf(
    model: &TrainModel,
    tokenizer: &TextTokenizer,
    meta: &CheckpointMeta,
    dir: &Path,
) -> Result<()> {
    let c = &model.config;
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in model.merged_weights()? {
        tensors.insert(name, t.detach().to_dtype(DType::F32)?.contiguous()?);
    }
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
        .context("writing model.safetensors")?;
    let arch = match c.architecture.as_str() {
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let bos = tokenizer.bos_id();
    let eos = tokenizer.eos_ids().first().copied();
    let config = json!({
        "architectures": [arch],
        "model_type": c.architecture,
        "hidden_size": c.hidden,
        "intermediate_size": c.intermediate,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.context,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.hf_rope_scaling()?,
        "vocab_size": c.vocab,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.qkv_bias && c.architecture != "qwen2",
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    write_json(&tmp.join("config.json"), &config)?;
    write_json(
        &tmp.join("generation_config.json"),
        &json!({ "bos_token_id": bos, "eos_token_id": tokenizer.eos_ids() }),
    )?;
    tokenizer
        .inner()
        .save(tmp.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("writing tokenizer.json: {e}"))?;
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos(),
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": c.context,
    });
    if let Some(b) = tokenizer.bos_token() {
        tc["bos_token"] = json!(b);
    }
    if let Some(e) = tokenizer.eos_token() {
        tc["eos_token"] = json!(e);
        tc["pad_token"] = json!(e);
    }
    if let Some(t) = tokenizer.chat_template() {
        tc["chat_template"] = json!(t);
    }
    write_json(&tmp.join("tokenizer_config.json"), &tc)?;
    write_json(&tmp.join("aligner.json"), &serde_json::to_value(meta)?)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    Ok(())
}

/// `aligner.json` of a checkpoint folder, if it has one.
pub fn read_meta(dir: &Path) -> Result<Option<CheckpointMeta>> {
    let p = dir.join("aligner.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
    ))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
