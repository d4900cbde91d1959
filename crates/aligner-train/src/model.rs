//! A llama-family causal LM (Llama, SmolLM, Mistral, Qwen2) whose weights are candle tensors,
//! trainable ones as [`Var`]s, with optional LoRA adapters on the linear layers.
//!
//! Weights are held in the Hugging Face layout (`[out, in]` linear weights, rotate-half rotary
//! embedding). A GGUF's q/k weights, which llama.cpp's converter permutes for its interleaved
//! rotary embedding, are permuted back at load time, so a checkpoint written from here is a
//! plain Hugging Face checkpoint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use aligner_local::gguf::GgufFile;

use crate::fused::{AttentionWeights, AttnPlan, BlockWeight, GradSink, MlpWeights, RopeTables};

/// Shapes and constants of the model: the one configuration inference reads too.
pub use aligner_local::config::{ModelConfig as Config, RopeStyle};

/// Linear layers LoRA can adapt, by their Hugging Face names.
pub use aligner_spec::LORA_TARGETS;

/// How to train: which parameters are variables.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// Every weight (embeddings, norms, linear layers).
    Full,
    /// The last `n` transformer layers and the final norm; everything else frozen.
    TopLayers(usize),
    /// LoRA adapters on the named linear layers; the base weights frozen.
    Lora(LoraConfig),
    /// Nothing (a frozen reference model).
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Hugging Face names from [`LORA_TARGETS`].
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// A weight, trainable or not.
#[derive(Clone)]
pub struct Param {
    value: Tensor,
    var: Option<Var>,
    /// Where the fused blocks put its gradient (trainable weights only).
    sink: Option<Arc<GradSink>>,
}

impl Param {
    fn frozen(t: Tensor) -> Self {
        Param {
            value: t,
            var: None,
            sink: None,
        }
    }

    fn new(t: Tensor, trainable: bool) -> Result<Self> {
        if trainable {
            let var = Var::from_tensor(&t)?;
            Ok(Param {
                value: var.as_tensor().clone(),
                var: Some(var),
                sink: Some(Arc::new(GradSink::default())),
            })
        } else {
            Ok(Param::frozen(t))
        }
    }

    fn block(&self) -> BlockWeight {
        BlockWeight {
            value: self.value.clone(),
            sink: self.sink.clone(),
        }
    }

    pub fn tensor(&self) -> &Tensor {
        &self.value
    }

    pub fn var(&self) -> Option<&Var> {
        self.var.as_ref()
    }
}

/// A LoRA adapter: `y += scale * dropout(x) Aᵀ Bᵀ`, A `[r, in]`, B `[out, r]` (zero at start).
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// `x` is `[n, in]`; `fused`: the CPU's fused linear op (see [`crate::fused`]).
    fn forward(&self, x: &Tensor, train: bool, fused: bool) -> Result<Tensor> {
        let mut y = if fused {
            crate::fused::linear(x, self.weight.tensor())?
        } else {
            x.matmul(&self.weight.tensor().t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b.tensor())?;
        }
        if let Some(l) = &self.lora {
            let xd = if train && l.dropout > 0.0 {
                candle_nn::ops::dropout(x, l.dropout)?
            } else {
                x.clone()
            };
            let delta = xd
                .matmul(&l.a.as_tensor().t()?)?
                .matmul(&l.b.as_tensor().t()?)?;
            y = (y + delta.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }

    /// The weight with the adapter folded in.
    fn merged(&self) -> Result<Tensor> {
        let w = self.weight.tensor().clone();
        match &self.lora {
            Some(l) => Ok((w + l
                .b
                .as_tensor()
                .matmul(l.a.as_tensor())?
                .affine(l.scale, 0.0)?)?),
            None => Ok(w),
        }
    }
}

pub struct Layer {
    pub input_norm: Param,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Param,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct TrainModel {
    pub config: Config,
    pub embed: Param,
    pub layers: Vec<Layer>,
    pub norm: Param,
    /// `None`: tied to the embedding.
    pub lm_head: Option<Param>,
    device: Device,
    cos: Tensor,
    sin: Tensor,
    /// The same rotary tables for the fused CPU attention.
    rope: Arc<RopeTables>,
    /// Whether the forward pass uses the fused CPU layers ([`crate::fused`]).
    fused: bool,
}

/// Raw f32 weights by Hugging Face name, with their shapes.
pub type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

impl TrainModel {
    /// From a GGUF (every tensor dequantized to f32).
    pub fn from_gguf(path: &Path, trainable: &Trainable, device: &Device) -> Result<Self> {
        let (config, weights) = gguf_weights(path)?;
        Self::from_weights(config, weights, trainable, device)
    }

    /// From a Hugging Face folder (config.json + *.safetensors, f32/f16/bf16).
    pub fn from_hf_folder(dir: &Path, trainable: &Trainable, device: &Device) -> Result<Self> {
        let (config, weights) = hf_weights(dir)?;
        Self::from_weights(config, weights, trainable, device)
    }

    /// A GGUF file or a Hugging Face folder.
    pub fn load(path: &Path, trainable: &Trainable, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_folder(path, trainable, device)
        } else {
            Self::from_gguf(path, trainable, device)
        }
    }

    pub fn from_weights(
        config: Config,
        mut weights: Weights,
        trainable: &Trainable,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let (s, v) = weights
                .remove(name)
                .ok_or_else(|| anyhow!("weight `{name}` is missing"))?;
            if s != shape {
                bail!("weight `{name}` has shape {s:?}, expected {shape:?}");
            }
            Ok(Tensor::from_vec(v, s, device)?)
        };
        let full = matches!(trainable, Trainable::Full);
        let top = |i: usize| match trainable {
            Trainable::Full => true,
            Trainable::TopLayers(n) => i + *n >= c.layers,
            _ => false,
        };
        let lora = match trainable {
            Trainable::Lora(l) => {
                for t in &l.targets {
                    if !LORA_TARGETS.contains(&t.as_str()) {
                        bail!(
                            "LoRA target `{t}` is not a linear layer of this model\nhint: targets are {}",
                            LORA_TARGETS.join(", ")
                        );
                    }
                }
                if l.rank == 0 {
                    bail!("LoRA rank must be at least 1");
                }
                Some(l.clone())
            }
            _ => None,
        };
        let mut seed = 0x5eed_u64;
        let mut linear = |take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
                          prefix: &str,
                          short: &str,
                          out: usize,
                          inp: usize,
                          bias: bool,
                          trainable: bool|
         -> Result<Linear> {
            let weight = Param::new(
                take(&format!("{prefix}.{short}.weight"), &[out, inp])?,
                trainable,
            )?;
            let bias = if bias {
                Some(Param::new(
                    take(&format!("{prefix}.{short}.bias"), &[out])?,
                    trainable,
                )?)
            } else {
                None
            };
            let lora = match &lora {
                Some(l) if l.targets.iter().any(|t| t == short) => {
                    // A: Kaiming-uniform as PEFT does (bound 1/sqrt(in)); B: zeros.
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..l.rank * inp)
                        .map(|_| (uniform(&mut seed) * 2.0 - 1.0) * bound)
                        .collect();
                    Some(Lora {
                        a: Var::from_tensor(&Tensor::from_vec(a, (l.rank, inp), device)?)?,
                        b: Var::zeros((out, l.rank), DType::F32, device)?,
                        scale: l.alpha / l.rank as f64,
                        dropout: l.dropout,
                    })
                }
                _ => None,
            };
            Ok(Linear { weight, bias, lora })
        };
        let (h, qd, kvd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let embed = Param::new(take("model.embed_tokens.weight", &[c.vocab, h])?, full)?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            let t = top(i);
            let input_norm = Param::new(take(&format!("{p}.input_layernorm.weight"), &[h])?, t)?;
            let q = linear(
                &mut take,
                &format!("{p}.self_attn"),
                "q_proj",
                qd,
                h,
                c.qkv_bias,
                t,
            )?;
            let k = linear(
                &mut take,
                &format!("{p}.self_attn"),
                "k_proj",
                kvd,
                h,
                c.qkv_bias,
                t,
            )?;
            let v = linear(
                &mut take,
                &format!("{p}.self_attn"),
                "v_proj",
                kvd,
                h,
                c.qkv_bias,
                t,
            )?;
            let o = linear(
                &mut take,
                &format!("{p}.self_attn"),
                "o_proj",
                h,
                qd,
                false,
                t,
            )?;
            let post_norm = Param::new(
                take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                t,
            )?;
            let gate = linear(
                &mut take,
                &format!("{p}.mlp"),
                "gate_proj",
                c.intermediate,
                h,
                false,
                t,
            )?;
            let up = linear(
                &mut take,
                &format!("{p}.mlp"),
                "up_proj",
                c.intermediate,
                h,
                false,
                t,
            )?;
            let down = linear(
                &mut take,
                &format!("{p}.mlp"),
                "down_proj",
                h,
                c.intermediate,
                false,
                t,
            )?;
            layers.push(Layer {
                input_norm,
                q,
                k,
                v,
                o,
                post_norm,
                gate,
                up,
                down,
            });
        }
        let train_head = full || matches!(trainable, Trainable::TopLayers(_));
        let norm = Param::new(take("model.norm.weight", &[h])?, train_head)?;
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(Param::new(
                take("lm_head.weight", &[c.vocab, h])?,
                train_head,
            )?)
        };
        // Rotary tables (rotate-half layout), computed in f64 and rounded once.
        let half = c.head_dim / 2;
        let n = c.context;
        let mut cos = vec![0f32; n * c.head_dim];
        let mut sin = vec![0f32; n * c.head_dim];
        let inv = c.inv_freqs();
        for p in 0..n {
            for (i, freq) in inv.iter().enumerate() {
                let a = p as f64 * freq;
                for j in [i, i + half] {
                    cos[p * c.head_dim + j] = a.cos() as f32;
                    sin[p * c.head_dim + j] = a.sin() as f32;
                }
            }
        }
        let rope = Arc::new(RopeTables {
            cos: cos.clone(),
            sin: sin.clone(),
            head_dim: c.head_dim,
        });
        let cos = Tensor::from_vec(cos, (n, c.head_dim), device)?;
        let sin = Tensor::from_vec(sin, (n, c.head_dim), device)?;
        Ok(TrainModel {
            rope,
            fused: device.is_cpu(),
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            cos,
            sin,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Backpropagates `loss` and returns every parameter's gradient: candle's gradient store
    /// with the gradients the fused blocks accumulated in their own buffers added in. Use
    /// this rather than `loss.backward()`, which misses the latter.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let mut params: Vec<&Param> = vec![&self.embed, &self.norm];
        params.extend(self.lm_head.iter());
        for l in &self.layers {
            params.extend(l.params());
        }
        for p in params {
            let Some(buf) = p.sink.as_ref().and_then(|s| s.take()) else {
                continue;
            };
            let g = Tensor::from_vec(buf, p.value.shape(), &Device::Cpu)?;
            let g = match grads.get(&p.value) {
                Some(other) => (other + g)?,
                None => g,
            };
            grads.insert(&p.value, g);
        }
        Ok(grads)
    }

    /// Turns the fused CPU layers off (or back on, on the CPU): the forward pass then composes
    /// candle's basic ops, as it does on other devices. For tests that compare the two.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on && self.device.is_cpu();
    }

    /// Every trainable variable, with its Hugging Face name (LoRA: `<linear>.lora_A/B`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let mut add = |name: String, p: &Param| {
            if let Some(v) = p.var() {
                out.push((name, v.clone()));
            }
        };
        add("model.embed_tokens.weight".into(), &self.embed);
        let mut loras = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            add(format!("{p}.input_layernorm.weight"), &l.input_norm);
            add(format!("{p}.post_attention_layernorm.weight"), &l.post_norm);
            for (name, lin) in l.linears() {
                add(format!("{p}.{name}.weight"), &lin.weight);
                if let Some(b) = &lin.bias {
                    add(format!("{p}.{name}.bias"), b);
                }
                if let Some(lo) = &lin.lora {
                    loras.push((format!("{p}.{name}.lora_A"), lo.a.clone()));
                    loras.push((format!("{p}.{name}.lora_B"), lo.b.clone()));
                }
            }
        }
        add("model.norm.weight".into(), &self.norm);
        if let Some(h) = &self.lm_head {
            add("lm_head.weight".into(), h);
        }
        out.extend(loras);
        out
    }

    /// Hidden states after the final norm, `[b, t, hidden]`, for token ids `[b, t]` (u32).
    /// `mask` (`[b, t]`, 1 for tokens, 0 for padding) masks padded keys; causal masking is
    /// always on. `train` turns on LoRA dropout.
    pub fn hidden(&self, ids: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.hidden_planned(ids, mask, None, train)
    }

    /// Whether [`Self::hidden_planned`] takes attention layouts other than causal rows (the
    /// fused CPU layers do; candle's composed ops do not).
    pub fn takes_layouts(&self) -> bool {
        self.fused
    }

    /// [`Self::hidden`] with the rows laid out as `plan` says (e.g. a prompt shared by its
    /// chosen and rejected answers); `None` is causal rows. Needs [`Self::takes_layouts`].
    pub fn hidden_planned(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        plan: Option<&Arc<AttnPlan>>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        // A planned row holds several sequences; its longest one must fit.
        let longest = plan.map_or(t, |p| p.max_position() + 1);
        if longest > c.context {
            bail!(
                "sequence of {longest} tokens is longer than the model's {} positions",
                c.context
            );
        }
        let (hd, nh, nkv) = (c.head_dim, c.heads, c.kv_heads);
        let mut x = self
            .embed
            .tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b * t, c.hidden))?;
        if let Some(plan) = plan {
            if !self.fused {
                bail!("shared-prefix rows need the fused CPU layers (f32 on the CPU)");
            }
            return self.hidden_fused(x, plan, b, t, train);
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        // On the CPU with right padding (every `pack`ed batch) the fused causal softmax needs
        // no mask tensor: padding only ever follows a sequence's tokens. Otherwise an additive
        // bias masks future and padded keys.
        let right_padded = match mask {
            None => true,
            Some(m) => m
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .iter()
                .all(|row| row.windows(2).all(|w| !(w[0] == 0.0 && w[1] != 0.0))),
        };
        if self.fused && right_padded {
            return self.hidden_fused(x, &Arc::new(AttnPlan::causal(b, t)), b, t, train);
        }
        let fused = self.device.is_cpu() && right_padded;
        let bias = if fused {
            None
        } else {
            let mut bias: Vec<f32> = vec![0.0; t * t];
            for i in 0..t {
                for j in i + 1..t {
                    bias[i * t + j] = NEG;
                }
            }
            let mut bias = Tensor::from_vec(bias, (1, 1, t, t), &self.device)?;
            if let Some(m) = mask {
                let keys = m
                    .to_dtype(DType::F32)?
                    .affine(-(NEG as f64), NEG as f64)?
                    .reshape((b, 1, 1, t))?;
                bias = bias.broadcast_add(&keys)?;
            }
            Some(bias)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let h = rms_norm(&x, l.input_norm.tensor(), c.rms_eps)?;
            let q = l.q.forward(&h, train, false)?;
            let k = l.k.forward(&h, train, false)?;
            let v = l.v.forward(&h, train, false)?;
            let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = rope(&q, &cos, &sin)?;
            let k = rope(&k, &cos, &sin)?;
            let (k, v) = if nh != nkv {
                (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?)
            } else {
                (k, v)
            };
            let scores = q.matmul(&k.t()?)?;
            let att = match &bias {
                None => crate::kernels::causal_softmax(&scores, scale)?,
                Some(bias) => softmax_last(&(scores * scale)?.broadcast_add(bias)?)?,
            };
            let o = att
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, nh * hd))?;
            x = (x + l.o.forward(&o, train, false)?)?;
            let h = rms_norm(&x, l.post_norm.tensor(), c.rms_eps)?;
            let g = l.gate.forward(&h, train, false)?.silu()?;
            let u = l.up.forward(&h, train, false)?;
            x = (x + l.down.forward(&(g * u)?, train, false)?)?;
        }
        let x = rms_norm(&x, self.norm.tensor(), c.rms_eps)?;
        Ok(x.reshape((b, t, c.hidden))?)
    }

    /// [`Self::hidden`] from the fused CPU layers, for embeddings `x` `[b * t, hidden]` of
    /// right-padded (or unpadded) sequences.
    fn hidden_fused(
        &self,
        mut x: Tensor,
        plan: &Arc<AttnPlan>,
        b: usize,
        t: usize,
        train: bool,
    ) -> Result<Tensor> {
        use crate::fused;
        let c = &self.config;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        for l in &self.layers {
            if !l.has_lora() {
                let w = l.attention_weights();
                x = fused::attention_block(
                    &x, &w, plan, c.heads, c.kv_heads, c.rms_eps, &self.rope,
                )?;
                x = fused::mlp_block(&x, &l.mlp_weights(), c.intermediate, c.rms_eps)?;
                continue;
            }
            let h = fused::rms_norm(&x, l.input_norm.tensor(), c.rms_eps)?;
            let q = l.q.forward(&h, train, true)?;
            let k = l.k.forward(&h, train, true)?;
            let v = l.v.forward(&h, train, true)?;
            let o = fused::attention(&q, &k, &v, plan, c.heads, c.kv_heads, scale, &self.rope)?;
            x = (x + l.o.forward(&o, train, true)?)?;
            let h = fused::rms_norm(&x, l.post_norm.tensor(), c.rms_eps)?;
            let g = l.gate.forward(&h, train, true)?;
            let u = l.up.forward(&h, train, true)?;
            x = (x + l.down.forward(&fused::swiglu(&g, &u)?, train, true)?)?;
        }
        let x = fused::rms_norm(&x, self.norm.tensor(), c.rms_eps)?;
        Ok(x.reshape((b, t, c.hidden))?)
    }

    /// Logits for rows of hidden states `[n, hidden]`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed).tensor();
        Ok(h.matmul(&w.t()?)?)
    }

    /// Logits at every position, `[b, t, vocab]`.
    pub fn logits(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self
            .hidden(ids, mask, false)?
            .reshape((b * t, self.config.hidden))?;
        Ok(self.head(&h)?.reshape((b, t, self.config.vocab))?)
    }

    /// The weights with LoRA adapters merged, by Hugging Face name.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.tensor().clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_norm.tensor().clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_norm.tensor().clone(),
            ));
            for (name, lin) in l.linears() {
                out.push((format!("{p}.{name}.weight"), lin.merged()?));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b.tensor().clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.tensor().clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h.tensor().clone()));
        }
        Ok(out)
    }

    /// A frozen copy of the current weights (LoRA merged): the reference model of a DPO
    /// round with `reference: previous`.
    pub fn frozen_copy(&self) -> Result<TrainModel> {
        let mut weights = Weights::new();
        for (name, t) in self.merged_weights()? {
            let t = t.detach().to_device(&Device::Cpu)?;
            weights.insert(
                name,
                (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?),
            );
        }
        TrainModel::from_weights(self.config.clone(), weights, &Trainable::None, &self.device)
    }
}

impl Layer {
    /// Whether any linear layer carries a LoRA adapter (the fused blocks have none).
    fn has_lora(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora.is_some())
    }

    fn attention_weights(&self) -> AttentionWeights {
        let bias = match (&self.q.bias, &self.k.bias, &self.v.bias) {
            (Some(q), Some(k), Some(v)) => Some([q.block(), k.block(), v.block()]),
            _ => None,
        };
        AttentionWeights {
            norm: self.input_norm.block(),
            q: self.q.weight.block(),
            k: self.k.weight.block(),
            v: self.v.weight.block(),
            o: self.o.weight.block(),
            bias,
        }
    }

    fn mlp_weights(&self) -> MlpWeights {
        MlpWeights {
            norm: self.post_norm.block(),
            gate: self.gate.weight.block(),
            up: self.up.weight.block(),
            down: self.down.weight.block(),
        }
    }

    fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.input_norm, &self.post_norm];
        for (_, l) in self.linears() {
            out.push(&l.weight);
            out.extend(l.bias.iter());
        }
        out
    }

    fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }
}

/// Masked attention scores: large and negative, not -inf, so a fully masked row stays finite.
const NEG: f32 = -1e9;

/// `x * rsqrt(mean(x²) + eps) * w` over the last dimension, from differentiable ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension from differentiable ops (the max shift is a constant).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Rotate-half rotary embedding of `[b, heads, t, hd]` with tables `[t, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// `[b, kv, t, hd]` -> `[b, kv * n, t, hd]`, each kv head repeated for its query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .contiguous()?
        .reshape((b, kv * n, t, hd))?)
}

fn uniform(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 40) as f32 / (1u64 << 24) as f32
}

/// Undoes llama.cpp's q/k row permutation (its converter interleaves the two rotary halves of
/// each head): GGUF row `h*hd + 2i + j` is Hugging Face row `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    reorder_qk_rows(w, heads, rows, cols, false)
}

/// Moves q/k rows between the two orders, `cols` values per row: Hugging Face row
/// `h*hd + j*hd/2 + i` is GGUF row `h*hd + 2i + j`. `to_gguf` picks the direction (Hugging
/// Face to GGUF, as [`crate::gguf_export::permute_rows`], when true; back, as
/// [`unpermute_rows`], when false).
pub(crate) fn reorder_qk_rows(
    w: &[f32],
    heads: usize,
    rows: usize,
    cols: usize,
    to_gguf: bool,
) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let hf = h * hd + j * half + i;
                let gguf = h * hd + 2 * i + j;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Every tensor of a model as (GGUF name, Hugging Face name, heads whose q/k rows llama.cpp
/// permutes). Reading a GGUF and writing one both go through this list.
pub fn gguf_tensor_names(c: &Config) -> Vec<(String, String, Option<usize>)> {
    let mut names = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        None,
    )];
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let mut add = |gguf: &str, hf: &str, permute: Option<usize>| {
            names.push((format!("blk.{i}.{gguf}"), format!("{p}.{hf}"), permute));
        };
        add("attn_norm.weight", "input_layernorm.weight", None);
        add("attn_q.weight", "self_attn.q_proj.weight", Some(c.heads));
        add("attn_k.weight", "self_attn.k_proj.weight", Some(c.kv_heads));
        add("attn_v.weight", "self_attn.v_proj.weight", None);
        if c.qkv_bias {
            add("attn_q.bias", "self_attn.q_proj.bias", Some(c.heads));
            add("attn_k.bias", "self_attn.k_proj.bias", Some(c.kv_heads));
            add("attn_v.bias", "self_attn.v_proj.bias", None);
        }
        add("attn_output.weight", "self_attn.o_proj.weight", None);
        add("ffn_norm.weight", "post_attention_layernorm.weight", None);
        add("ffn_gate.weight", "mlp.gate_proj.weight", None);
        add("ffn_up.weight", "mlp.up_proj.weight", None);
        add("ffn_down.weight", "mlp.down_proj.weight", None);
    }
    names.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        None,
    ));
    if !c.tie_embeddings {
        names.push(("output.weight".into(), "lm_head.weight".into(), None));
    }
    names
}

/// A GGUF's configuration and weights (dequantized, Hugging Face names and layout).
pub fn gguf_weights(path: &Path) -> Result<(Config, Weights)> {
    let file = GgufFile::open(path)?;
    let config = Config::from_gguf(&file)?;
    if config.gemma3.is_some() {
        bail!(
            "{}: training gemma3 models is not implemented (the built-in trainer runs the llama layer); gemma3 GGUF files run for inference only",
            path.display()
        );
    }
    let mut w = Weights::new();
    let mut put = |gguf: &str, hf: String, permute_heads: Option<usize>| -> Result<()> {
        let (_, dims, _) = file.raw(gguf)?;
        let mut v = file.vector(gguf)?;
        if let (Some(nh), [rows, cols]) = (permute_heads, &dims[..]) {
            v = unpermute_rows(&v, nh, *rows, *cols);
        }
        if let (Some(nh), [rows]) = (permute_heads, &dims[..]) {
            v = unpermute_rows(&v, nh, *rows, 1);
        }
        w.insert(hf, (dims, v));
        Ok(())
    };
    for (gguf, hf, permute) in gguf_tensor_names(&config) {
        put(&gguf, hf, permute)?;
    }
    Ok((config, w))
}

/// A Hugging Face folder's configuration and weights (as f32).
pub fn hf_weights(dir: &Path) -> Result<(Config, Weights)> {
    let config = Config::from_hf_folder(dir)?;
    let files = aligner_local::safetensors::files(dir)?;
    let mut w = Weights::new();
    for f in files {
        let tensors = candle_core::safetensors::load(&f, &Device::Cpu)
            .with_context(|| format!("reading {}", f.display()))?;
        for (name, t) in tensors {
            let t = t.to_dtype(DType::F32)?;
            w.insert(
                name,
                (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?),
            );
        }
    }
    if config.tie_embeddings {
        w.remove("lm_head.weight");
    }
    Ok((config, w))
}
