//! The device path: the same llama forward pass written with candle tensors and candle's
//! quantized matrix products, so it runs wherever candle does (`--features cuda` for NVIDIA
//! GPUs). On the CPU it serves as an independent reference for the SIMD path.
//!
//! Sequences in one call share their length (no padding): a batch is `[b, t]` token ids.

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::gguf::GgufFile;

struct DeviceLayer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

pub struct DeviceModel {
    pub device: Device,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    embed: Tensor,
    layers: Vec<DeviceLayer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of a batch, `[b, kv_heads, len, head_dim]` per layer.
pub struct DeviceCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}

impl DeviceCache {
    pub fn new(layers: usize) -> Self {
        DeviceCache {
            kv: vec![None; layers],
            len: 0,
        }
    }
}

fn c(e: candle_core::Error) -> anyhow::Error {
    anyhow!("candle: {e}")
}

impl DeviceModel {
    /// Llama-architecture GGUF files (interleaved rotary pairs).
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        if config.architecture != "llama" {
            bail!(
                "the device path runs llama-architecture GGUF files; found `{}`",
                config.architecture
            );
        }
        let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
        let layers_n = config.layers;
        let eps = config.rms_eps;
        let q = |n: &str| -> Result<QMatMul> {
            QMatMul::from_qtensor(file.qtensor(n, device)?).map_err(c)
        };
        let v =
            |n: &str| -> Result<Tensor> { file.qtensor(n, device)?.dequantize(device).map_err(c) };
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = |n: &str| format!("blk.{i}.{n}");
            layers.push(DeviceLayer {
                attn_norm: v(&p("attn_norm.weight"))?,
                wq: q(&p("attn_q.weight"))?,
                wk: q(&p("attn_k.weight"))?,
                wv: q(&p("attn_v.weight"))?,
                wo: q(&p("attn_output.weight"))?,
                ffn_norm: v(&p("ffn_norm.weight"))?,
                w_gate: q(&p("ffn_gate.weight"))?,
                w_up: q(&p("ffn_up.weight"))?,
                w_down: q(&p("ffn_down.weight"))?,
            });
        }
        let embed = v("token_embd.weight")?;
        let lm_head = if file.has("output.weight") {
            q("output.weight")?
        } else {
            q("token_embd.weight")?
        };
        let ctx = config.context.min(8192);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(ctx * half);
        let mut sin = Vec::with_capacity(ctx * half);
        let inv = config.inv_freqs();
        for p in 0..ctx {
            for freq in &inv {
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (ctx, half), device).map_err(c)?;
        let sin = Tensor::from_vec(sin, (ctx, half), device).map_err(c)?;
        Ok(DeviceModel {
            device: device.clone(),
            heads,
            kv_heads,
            head_dim,
            eps,
            embed,
            layers,
            norm: v("output_norm.weight")?,
            lm_head,
            cos,
            sin,
        })
    }

    /// Runs `tokens` (`[b][t]`, equal lengths) after what `cache` holds; returns the logits of
    /// the last position of each sequence, `[b][vocab]`.
    pub fn forward(&self, tokens: &[Vec<u32>], cache: &mut DeviceCache) -> Result<Vec<Vec<f32>>> {
        let b = tokens.len();
        let t = tokens.first().map_or(0, Vec::len);
        if b == 0 || t == 0 || tokens.iter().any(|s| s.len() != t) {
            bail!("the device path needs a non-empty batch of equal-length sequences");
        }
        let flat: Vec<u32> = tokens.concat();
        let ids = Tensor::from_vec(flat, (b * t,), &self.device).map_err(c)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)
            .and_then(|x| x.reshape((b, t, ())))
            .map_err(c)?;
        let pos = cache.len;
        let cos = self.cos.narrow(0, pos, t).map_err(c)?;
        let sin = self.sin.narrow(0, pos, t).map_err(c)?;
        let mask = if t > 1 {
            let total = pos + t;
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, total), &self.device).map_err(c)?)
        } else {
            None
        };
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        for (li, l) in self.layers.iter().enumerate() {
            let res = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &l.attn_norm, self.eps as f32).map_err(c)?;
            let split = |y: Tensor, n: usize| -> Result<Tensor> {
                y.reshape((b, t, n, hd))
                    .and_then(|y| y.transpose(1, 2))
                    .and_then(|y| y.contiguous())
                    .map_err(c)
            };
            let q = split(l.wq.forward(&xn).map_err(c)?, h)?;
            let k = split(l.wk.forward(&xn).map_err(c)?, kvh)?;
            let v = split(l.wv.forward(&xn).map_err(c)?, kvh)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin).map_err(c)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin).map_err(c)?;
            let (k, v) = match &cache.kv[li] {
                Some((pk, pv)) => (
                    Tensor::cat(&[pk, &k], 2).map_err(c)?,
                    Tensor::cat(&[pv, &v], 2).map_err(c)?,
                ),
                None => (k, v),
            };
            cache.kv[li] = Some((k.clone(), v.clone()));
            let group = h / kvh;
            let total = k.dim(2).map_err(c)?;
            let expand = |y: &Tensor| -> Result<Tensor> {
                y.unsqueeze(2)
                    .and_then(|y| y.expand((b, kvh, group, total, hd)))
                    .and_then(|y| y.reshape((b, h, total, hd)))
                    .map_err(c)
            };
            let (k, v) = (expand(&k)?, expand(&v)?);
            let scale = 1.0 / (hd as f64).sqrt();
            let mut att = q
                .matmul(&k.t().map_err(c)?)
                .and_then(|a| a * scale)
                .map_err(c)?;
            if let Some(m) = &mask {
                att = att.broadcast_add(m).map_err(c)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att).map_err(c)?;
            let y = att
                .matmul(&v)
                .and_then(|y| y.transpose(1, 2))
                .and_then(|y| y.reshape((b, t, h * hd)))
                .map_err(c)?;
            x = (l.wo.forward(&y).map_err(c)? + res).map_err(c)?;
            let res = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &l.ffn_norm, self.eps as f32).map_err(c)?;
            let g = l.w_gate.forward(&xn).and_then(|g| g.silu()).map_err(c)?;
            let u = l.w_up.forward(&xn).map_err(c)?;
            let d = l.w_down.forward(&(g * u).map_err(c)?).map_err(c)?;
            x = (d + res).map_err(c)?;
        }
        cache.len += t;
        let last = x
            .narrow(1, t - 1, 1)
            .and_then(|l| l.contiguous())
            .map_err(c)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.eps as f32).map_err(c)?;
        let logits = self
            .lm_head
            .forward(&last)
            .and_then(|l| l.squeeze(1))
            .and_then(|l| l.to_dtype(DType::F32))
            .and_then(|l| l.to_vec2::<f32>())
            .map_err(c)?;
        Ok(logits)
    }

    /// Greedy continuation of each prompt, `steps` tokens, all prompts in one batch.
    pub fn greedy(&self, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<Vec<u32>>> {
        let mut cache = DeviceCache::new(self.layers.len());
        let mut out = vec![Vec::new(); prompts.len()];
        let mut logits = self.forward(prompts, &mut cache)?;
        for _ in 0..steps {
            let next: Vec<Vec<u32>> = logits
                .iter()
                .map(|l| vec![crate::sampling::argmax(l)])
                .collect();
            for (o, n) in out.iter_mut().zip(&next) {
                o.push(n[0]);
            }
            if out[0].len() == steps {
                break;
            }
            logits = self.forward(&next, &mut cache)?;
        }
        Ok(out)
    }
}

/// The best device this build can use: the first CUDA GPU with `--features cuda`, else the CPU.
pub fn best_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}
