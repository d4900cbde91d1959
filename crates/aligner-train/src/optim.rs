//! AdamW (decoupled weight decay, bias-corrected moments, as PyTorch's `AdamW`), a warmup +
//! cosine learning-rate schedule, gradient accumulation and global-norm clipping. The moments
//! are ours (not candle-nn's private ones) so a training run can be saved and resumed exactly.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Fraction of the optimizer steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    /// Cosine decay to 0 after warmup; `false` keeps the rate constant.
    pub cosine: bool,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Clip the global gradient norm to this; `None` turns clipping off.
    pub max_grad_norm: Option<f64>,
    /// Optimizer steps in the whole run (for the schedule).
    pub total_steps: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            learning_rate: 5e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_ratio: 0.1,
            cosine: true,
            accumulation: 1,
            max_grad_norm: Some(1.0),
            total_steps: 1,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 1-based optimizer step.
    pub step: usize,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A parameter's first and second moments: plain vectors updated by the fused CPU kernel, or
/// tensors on other devices.
enum Moments {
    Cpu(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

pub struct AdamW {
    cfg: OptimConfig,
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    /// Optimizer steps taken.
    step: usize,
    /// Micro-batches accumulated since the last step.
    micro: usize,
    acc: Vec<Option<Tensor>>,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: OptimConfig) -> Result<Self> {
        if vars.is_empty() {
            bail!("nothing to train: the model has no trainable parameters");
        }
        if cfg.accumulation == 0 {
            bail!("gradient accumulation must be at least 1");
        }
        let moments = vars
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor();
                Ok(if t.device().is_cpu() && t.dtype() == DType::F32 {
                    Moments::Cpu(vec![0.0; t.elem_count()], vec![0.0; t.elem_count()])
                } else {
                    Moments::Device(t.zeros_like()?, t.zeros_like()?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let acc = vec![None; vars.len()];
        Ok(AdamW {
            cfg,
            vars,
            moments,
            step: 0,
            micro: 0,
            acc,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The rate at optimizer step `step` (1-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let c = &self.cfg;
        let total = c.total_steps.max(1) as f64;
        let warm = (c.warmup_ratio * total).ceil();
        let s = step as f64;
        if s <= warm && warm > 0.0 {
            return c.learning_rate * s / warm;
        }
        if !c.cosine {
            return c.learning_rate;
        }
        let progress = ((s - warm) / (total - warm).max(1.0)).clamp(0.0, 1.0);
        c.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// Backpropagates one micro-batch's loss (scaled by 1/accumulation) and, every
    /// `accumulation` micro-batches, takes an optimizer step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<Option<StepInfo>> {
        self.backward_step_with(loss, |l| Ok(l.backward()?))
    }

    /// [`Self::backward_step`] with the backward pass given, e.g. `|l| model.backward(l)`,
    /// which also collects the gradients the model's fused blocks keep outside candle's store.
    pub fn backward_step_with(
        &mut self,
        loss: &Tensor,
        backward: impl FnOnce(&Tensor) -> Result<GradStore>,
    ) -> Result<Option<StepInfo>> {
        let scaled = loss.affine(1.0 / self.cfg.accumulation as f64, 0.0)?;
        let grads = backward(&scaled)?;
        self.accumulate(&grads)?;
        self.micro += 1;
        if self.micro < self.cfg.accumulation {
            return Ok(None);
        }
        self.micro = 0;
        Ok(Some(self.apply()?))
    }

    /// Takes a step with what has been accumulated so far (the data ran out mid-way).
    pub fn flush(&mut self) -> Result<StepInfo> {
        self.micro = 0;
        self.apply()
    }

    fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for (i, (_, var)) in self.vars.iter().enumerate() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                self.acc[i] = Some(match self.acc[i].take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    fn apply(&mut self) -> Result<StepInfo> {
        let mut sq = 0f64;
        for g in self.acc.iter().flatten() {
            sq += match crate::kernels::sum_of_squares(g)? {
                Some(s) => s,
                None => g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
            };
        }
        let norm = sq.sqrt();
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let lr = self.lr_at(self.step);
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = self.acc[i].take() else {
                continue;
            };
            match &mut self.moments[i] {
                Moments::Cpu(m, v) => {
                    let g = g.contiguous()?;
                    let step = crate::kernels::AdamStep {
                        m: std::cell::RefCell::new(&mut m[..]),
                        v: std::cell::RefCell::new(&mut v[..]),
                        lr: lr as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        eps: c.eps as f32,
                        weight_decay: c.weight_decay as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        grad_scale: clip as f32,
                    };
                    var.as_tensor().inplace_op2(&g, &step)?;
                }
                Moments::Device(m0, v0) => {
                    let g = if clip != 1.0 { g.affine(clip, 0.0)? } else { g };
                    let m = ((&*m0 * c.beta1)? + g.affine(1.0 - c.beta1, 0.0)?)?;
                    let v = ((&*v0 * c.beta2)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
                    let update =
                        (m.affine(1.0 / bc1, 0.0)? / (v.affine(1.0 / bc2, 0.0)?.sqrt()? + c.eps)?)?;
                    let theta = var.as_tensor().detach();
                    let theta = if c.weight_decay > 0.0 {
                        theta.affine(1.0 - lr * c.weight_decay, 0.0)?
                    } else {
                        theta
                    };
                    var.set(&(theta - update.affine(lr, 0.0)?)?)?;
                    *m0 = m;
                    *v0 = v;
                }
            }
        }
        Ok(StepInfo {
            step: self.step,
            learning_rate: lr,
            grad_norm: norm,
        })
    }

    /// Writes the variables, both moments and the step count (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let t = var.as_tensor();
            map.insert(format!("param/{name}"), t.detach());
            let (m, v) = match &self.moments[i] {
                Moments::Cpu(m, v) => (
                    Tensor::from_slice(m, t.shape(), t.device())?,
                    Tensor::from_slice(v, t.shape(), t.device())?,
                ),
                Moments::Device(m, v) => (m.clone(), v.clone()),
            };
            map.insert(format!("m/{name}"), m);
            map.insert(format!("v/{name}"), v);
        }
        let dev = self.vars[0].1.as_tensor().device().clone();
        map.insert("step".into(), Tensor::new(&[self.step as u32], &dev)?);
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&map, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Restores what [`AdamW::save`] wrote (same parameter names and shapes).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.vars[0].1.as_tensor().device().clone();
        let map = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading {}", path.display()))?;
        let get = |k: &str| {
            map.get(k)
                .cloned()
                .with_context(|| format!("{}: `{k}` is missing", path.display()))
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let p = get(&format!("param/{name}"))?;
            if p.dims() != var.as_tensor().dims() {
                bail!("{}: `{name}` has another shape", path.display());
            }
            var.set(&p)?;
            let (m, v) = (get(&format!("m/{name}"))?, get(&format!("v/{name}"))?);
            self.moments[i] = match &self.moments[i] {
                Moments::Cpu(..) => Moments::Cpu(
                    m.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                ),
                Moments::Device(..) => Moments::Device(m, v),
            };
        }
        self.step = get("step")?.to_vec1::<u32>()?[0] as usize;
        self.micro = 0;
        self.acc.iter_mut().for_each(|a| *a = None);
        Ok(())
    }
}
