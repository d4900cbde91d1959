//! Fused CPU operations with their backward passes, where composing candle's elementwise ops
//! would make several full passes over large tensors on one thread:
//!
//! - [`causal_softmax`]: `softmax(scale * x)` over the last dimension with the causal mask
//!   applied inside (no bias tensor), backward `scale * y * (g - sum(g * y))`;
//! - [`token_logps`]: `log_softmax(logits)[target]` per row, backward
//!   `g * (onehot(target) - softmax(logits))`;
//! - [`adamw_update`]: the AdamW step on a parameter in place, moments kept as plain vectors.
//!
//! Rows are split across threads with rayon. Off the CPU (or for non-f32 tensors) the callers
//! fall back to compositions of candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::vmath;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!("{what}: f32 only"))),
    }
}

/// Causal softmax over the last dimension of `[.., t, s]` scores: query `i` sees keys
/// `0..=i + (s - t)`; the rest get probability 0.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let dims = l.dims();
        let (t, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let offset = n.saturating_sub(t);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .enumerate()
            .for_each(|(r, (o, xr))| {
                let i = r % t;
                let keys = (i + offset + 1).min(n);
                let mut max = f32::NEG_INFINITY;
                for &v in &xr[..keys] {
                    max = max.max(v * self.scale);
                }
                let mut sum = 0f32;
                for (o, &v) in o[..keys].iter_mut().zip(&xr[..keys]) {
                    *o = (v * self.scale - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                o[..keys].iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(
            &g,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

/// `scale * y * (g - sum(g * y))` row by row.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(o, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *o = self.scale * a * (b - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scale * x)` with the causal mask, differentiable.
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

/// `log_softmax(logits)[target]` for each row of `[n, vocab]` logits.
struct TokenLogp {
    targets: Vec<u32>,
}

impl CustomOp1 for TokenLogp {
    fn name(&self) -> &'static str {
        "token-logp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let (n, v) = l.shape().dims2()?;
        if self.targets.len() != n {
            candle_core::bail!("token-logp: {} targets for {n} rows", self.targets.len());
        }
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                // Chunks of exponentials on the stack, so the loop vectorizes.
                let max = vmath::max(row);
                let mut sum = 0f32;
                let mut buf = [0f32; 256];
                for c in row.chunks(256) {
                    let b = &mut buf[..c.len()];
                    for (e, &z) in b.iter_mut().zip(c) {
                        *e = vmath::exp(z - max);
                    }
                    sum += vmath::sum(b);
                }
                row[t as usize] - max - sum.ln()
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(
            &g,
            &TokenLogpBackward {
                targets: self.targets.clone(),
            },
        )?))
    }
}

/// `g * (onehot(target) - softmax(logits))` row by row.
struct TokenLogpBackward {
    targets: Vec<u32>,
}

impl CustomOp2 for TokenLogpBackward {
    fn name(&self) -> &'static str {
        "token-logp-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let (_, v) = l1.shape().dims2()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .for_each(|((o, row), (&gi, &t))| {
                let max = vmath::max(row);
                for (o, &z) in o.iter_mut().zip(row) {
                    *o = vmath::exp(z - max);
                }
                let k = -gi / vmath::sum(o);
                o.iter_mut().for_each(|p| *p *= k);
                o[t as usize] += gi;
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Log-probability of `targets[i]` under row `i` of `logits` (`[n, vocab]` -> `[n]`).
pub fn token_logps(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1(TokenLogp {
        targets: targets.to_vec(),
    })
}

/// `Σ x²` of a contiguous f32 CPU tensor in f64, over threads; `None` for other tensors.
pub fn sum_of_squares(t: &Tensor) -> candle_core::Result<Option<f64>> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    Ok(Some(
        v[start..end]
            .par_chunks(1 << 14)
            .map(|c| vmath::dot(c, c) as f64)
            .sum(),
    ))
}

/// One AdamW step on a parameter, in place: `m`, `v` are its moments.
pub struct AdamStep<'a> {
    pub m: std::cell::RefCell<&'a mut [f32]>,
    pub v: std::cell::RefCell<&'a mut [f32]>,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 - beta^t for the bias corrections.
    pub bc1: f32,
    pub bc2: f32,
    /// Multiplies the gradient (global-norm clipping and accumulation scaling).
    pub grad_scale: f32,
}

impl InplaceOp2 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = contiguous(s2, l2, self.name())?;
        let (start, end) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: parameter must be contiguous".into()))?;
        let CpuStorage::F32(p) = s1 else {
            candle_core::bail!("adamw: f32 parameters only");
        };
        let p = &mut p[start..end];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if p.len() != g.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("adamw: shapes differ");
        }
        let decay = 1.0 - self.lr * self.weight_decay;
        let (lr, b1, b2, eps) = (self.lr, self.beta1, self.beta2, self.eps);
        let (bc1, bc2, scale) = (self.bc1, self.bc2, self.grad_scale);
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = g[i] * scale;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
                    p[i] = p[i] * decay - lr * update;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused kernels give the values and gradients of the compositions they replace.
    #[test]
    fn fused_kernels_match_their_compositions() {
        let dev = Device::Cpu;
        let mut seed = 3;
        let (b, h, t, s) = (2, 3, 5, 7);
        let x = Var::from_vec(rand(b * h * t * s, &mut seed), (b, h, t, s), &dev).unwrap();
        let w = Tensor::from_vec(rand(b * h * t * s, &mut seed), (b, h, t, s), &dev).unwrap();
        let scale = 0.37;
        let mut bias = vec![0f32; t * s];
        for i in 0..t {
            for j in (i + s - t + 1)..s {
                bias[i * s + j] = -1e9;
            }
        }
        let bias = Tensor::from_vec(bias, (1, 1, t, s), &dev).unwrap();
        let fused = causal_softmax(x.as_tensor(), scale).unwrap();
        let plain = crate::model::softmax_last(
            &(x.as_tensor() * scale)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap(),
        )
        .unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let g1 = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&plain * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (g1, g2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(g1, g2) < 1e-5, "{}", max_diff(g1, g2));

        let (n, v) = (4, 11);
        let logits = Var::from_vec(rand(n * v, &mut seed), (n, v), &dev).unwrap();
        let targets = [3u32, 0, 10, 7];
        let wt = Tensor::from_vec(vec![0.5f32, -1.0, 2.0, 1.5], n, &dev).unwrap();
        let fused = token_logps(logits.as_tensor(), &targets).unwrap();
        let ls = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let idx = Tensor::new(&targets[..], &dev)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let plain = ls.gather(&idx, 1).unwrap().squeeze(1).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let g1 = (&fused * &wt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&plain * &wt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (g1, g2) = (
            g1.get(logits.as_tensor()).unwrap(),
            g2.get(logits.as_tensor()).unwrap(),
        );
        assert!(max_diff(g1, g2) < 1e-6, "{}", max_diff(g1, g2));
    }
}
