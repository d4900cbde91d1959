//! The one model configuration of the llama family (Llama, SmolLM, Mistral, Qwen2): shapes and
//! constants read from a GGUF file's metadata or a Hugging Face `config.json`. Inference (the
//! CPU path in `model.rs`, the candle device path in `device.rs`) and the trainer
//! (`aligner-train`) all read a model through these two functions.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::gguf::GgufFile;

/// The architectures the loaders read, for hints.
pub const SUPPORTED: &str = "llama (Llama, SmolLM), mistral, qwen2, gemma3 (GGUF, inference only)";

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
    /// Rotary frequency scaling (Llama 3.1+, linear); `None`: plain `rope_theta`.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3's differences from the llama layer; `None` for every other architecture.
    #[serde(default)]
    pub gemma3: Option<Gemma3>,
}

/// What a Gemma 3 layer does beyond a llama layer: the embedding scaled by `sqrt(hidden)`,
/// RMS norms on each query and key head, norms after attention and after the feed-forward
/// block (before their residual adds), a GELU (tanh) gate, and local layers that attend to the
/// last `sliding_window` positions with their own rotary base, every `pattern`-th layer global.
/// The GGUF conversion stores Gemma's norm weights with their `+ 1` applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gemma3 {
    pub sliding_window: usize,
    /// Layer `i` is global when `(i + 1) % pattern == 0`.
    pub pattern: usize,
    /// The local layers' rotary base (the global ones use `rope_theta`).
    pub rope_theta_local: f64,
}

impl Gemma3 {
    /// Whether layer `i` attends to a sliding window.
    pub fn is_local(&self, i: usize) -> bool {
        !(i + 1).is_multiple_of(self.pattern)
    }
}

/// How a model scales its rotary frequencies. Only these are implemented; a file asking for
/// another (YaRN, dynamic NTK, LongRoPE, ...) stops loading with an error naming it, so no model
/// ever runs with the wrong frequencies.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a smooth blend
    /// between (Hugging Face `rope_scaling: {rope_type: llama3, ...}`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// A divisor per frequency, as a GGUF file stores Llama 3.1's scaling (`rope_freqs.weight`).
    Factors(Vec<f64>),
}

impl ModelConfig {
    /// The rotary inverse frequencies, one per pair of dimensions: `rope_theta^(-2i/d)`, scaled.
    pub fn inv_freqs(&self) -> Vec<f64> {
        self.inv_freqs_for(self.rope_theta)
    }

    /// [`Self::inv_freqs`] with another rotary base (Gemma 3's local layers).
    pub fn inv_freqs_for(&self, theta: f64) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| theta.powf(-(2.0 * i as f64) / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Factors(divisors)) => {
                base.iter().zip(divisors).map(|(f, d)| f / d).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }) => {
                let low_wavelen = original_context / low_freq_factor;
                let high_wavelen = original_context / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// `rope_scaling` as Hugging Face's `config.json` writes it (`None`: no scaling). A GGUF
    /// file's per-frequency divisors have no such form: an error says so.
    pub fn hf_rope_scaling(&self) -> Result<serde_json::Value> {
        Ok(match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({ "rope_type": "linear", "factor": factor })
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_context as u64,
            }),
            Some(RopeScaling::Factors(_)) => bail!(
                "this model's rotary scaling came from a GGUF file's `rope_freqs.weight`, which a Hugging Face `config.json` cannot express\nhint: train from the Hugging Face checkpoint (its config.json has `rope_scaling`)"
            ),
        })
    }
}

/// `rope_scaling` of a `config.json` (`null`, absent, or `rope_type`/`type` `default`: none).
fn hf_rope_scaling(path: &Path, v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v["rope_type"].as_str().or(v["type"].as_str()).unwrap_or("");
    let num = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("{}: `rope_scaling.{k}` is missing", path.display()))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_context: num("original_max_position_embeddings")?,
        }),
        other => bail!(
            "{}: `rope_scaling` of type `{other}` is not implemented\nhint: implemented: `llama3`, `linear`; running without it would use the wrong rotary frequencies",
            path.display()
        ),
    })
}

/// A GGUF file's rotary scaling: `rope_freqs.weight` (Llama 3.1+ conversions), or
/// `{arch}.rope.scaling.type` `linear`; anything else is refused by name.
fn gguf_rope_scaling(file: &GgufFile, arch: &str, half: usize) -> Result<Option<RopeScaling>> {
    if let Some(divisors) = file.optional_vector("rope_freqs.weight")? {
        if divisors.len() != half {
            bail!(
                "{}: `rope_freqs.weight` has {} values, expected {half} (head_dim / 2)",
                file.path.display(),
                divisors.len()
            );
        }
        return Ok(Some(RopeScaling::Factors(
            divisors.into_iter().map(f64::from).collect(),
        )));
    }
    let kind = file
        .string(&format!("{arch}.rope.scaling.type"))
        .unwrap_or_else(|_| "none".into());
    Ok(match kind.as_str() {
        "none" => None,
        "linear" => {
            let factor = f64::from(file.f32(&format!("{arch}.rope.scaling.factor")).map_err(|_| {
                anyhow!("{}: linear rope scaling without `{arch}.rope.scaling.factor`", file.path.display())
            })?);
            (factor != 1.0 && factor > 0.0).then_some(RopeScaling::Linear { factor })
        }
        other => bail!(
            "{}: rope scaling `{other}` (`{arch}.rope.scaling.type`) is not implemented\nhint: implemented: Llama 3.1's frequency factors (`rope_freqs.weight`) and `linear`; running without it would use the wrong rotary frequencies",
            file.path.display()
        ),
    })
}

/// Context length when the file does not say.
const DEFAULT_CONTEXT: usize = 4096;

impl ModelConfig {
    /// From a GGUF file's metadata (`{arch}.*` keys) and tensor list.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?;
        let rope = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" | "gemma3" => RopeStyle::Halves,
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
        let head_dim = file
            .usize(&key("attention.key_length"))
            .unwrap_or(hidden / heads);
        let rope_scaling = gguf_rope_scaling(file, &arch, head_dim / 2)?;
        let gemma3 = if arch == "gemma3" {
            if let Some(v) = file
                .usize(&key("attention.value_length"))
                .ok()
                .filter(|&v| v != head_dim)
            {
                bail!(
                    "{}: gemma3 with value heads of {v} and key heads of {head_dim} dimensions is not implemented",
                    file.path.display()
                );
            }
            if rope_scaling.is_some() {
                bail!(
                    "{}: gemma3 with rotary scaling (the larger Gemma 3 models' global layers) is not implemented\nhint: Gemma 3 270M and 1B have none",
                    file.path.display()
                );
            }
            Some(Gemma3 {
                sliding_window: need("attention.sliding_window")?,
                // llama.cpp's (and Hugging Face's) Gemma 3: five local layers, then a global one;
                // the local rotary base is not in the file.
                pattern: 6,
                rope_theta_local: 10_000.0,
            })
        } else {
            None
        };
        Ok(ModelConfig {
            gemma3,
            rope_scaling,
            vocab: embed_dims[0],
            hidden,
            intermediate: need("feed_forward_length")?,
            layers: need("block_count")?,
            heads,
            kv_heads: file.usize(&key("attention.head_count_kv")).unwrap_or(heads),
            head_dim,
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
            gemma3: None,
            rope_scaling: hf_rope_scaling(&cfg_path, &cfg["rope_scaling"])?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31() -> ModelConfig {
        ModelConfig {
            gemma3: None,
            architecture: "llama".into(),
            vocab: 10,
            hidden: 4096,
            intermediate: 1,
            layers: 1,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            rms_eps: 1e-5,
            context: 131_072,
            tie_embeddings: false,
            qkv_bias: false,
            rope: RopeStyle::Halves,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            }),
        }
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_divides_long_ones_and_blends_between() {
        let c = llama31();
        let plain = ModelConfig {
            gemma3: None,
            rope_scaling: None,
            ..c.clone()
        }
        .inv_freqs();
        let scaled = c.inv_freqs();
        assert_eq!(scaled.len(), 64);
        let wavelen = |f: f64| 2.0 * std::f64::consts::PI / f;
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 2048.0 {
                assert_eq!(p, s);
                kept += 1;
            } else if wavelen(*p) > 8192.0 {
                assert!((p / 8.0 - s).abs() < 1e-15);
                divided += 1;
            } else {
                assert!(*s < *p && *s > p / 8.0, "{p} -> {s}");
                blended += 1;
            }
        }
        assert!(
            kept > 0 && divided > 0 && blended > 0,
            "{kept} {divided} {blended}"
        );
        // The first frequency is 1 (wavelength 2 pi): untouched.
        assert_eq!(scaled[0], 1.0);
    }

    #[test]
    fn config_json_rope_scaling_is_read_or_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let write = |scaling: serde_json::Value| {
            let cfg = serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
                "rope_theta": 500000.0, "rope_scaling": scaling,
            });
            std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
            ModelConfig::from_hf_folder(dir.path())
        };
        let c = write(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})).unwrap();
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        // What a checkpoint writes back reads the same.
        assert_eq!(write(c.hf_rope_scaling().unwrap()).unwrap(), c);
        let c = write(serde_json::json!({"type": "linear", "factor": 2.0})).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.inv_freqs()[0], 0.5);
        assert_eq!(write(serde_json::Value::Null).unwrap().rope_scaling, None);
        let e = write(serde_json::json!({"rope_type": "yarn", "factor": 4.0})).unwrap_err();
        assert!(
            e.to_string()
                .contains("`rope_scaling` of type `yarn` is not implemented"),
            "{e}"
        );
    }
}
