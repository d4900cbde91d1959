//! Training loops: SFT on (prompt, completion) examples and DPO on preference pairs against
//! stored reference log-probabilities. Both shuffle with a seed, accumulate gradients, report
//! every optimizer step, and can save their state every few steps and resume from it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{
    pack, pack_pairs, sequence_logps, to_vec, token_logps, truncate, Example, Pair, PairSeqs,
};
use crate::loss::{dpo_loss, sft_loss, DpoKind, DpoMetrics, DpoOptions};
use crate::model::TrainModel;
use crate::optim::{AdamW, OptimConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct LoopConfig {
    pub epochs: usize,
    /// Sequences (SFT) or pairs (DPO) per micro-batch.
    pub batch_size: usize,
    pub max_length: usize,
    pub seed: u64,
    pub optim: OptimConfig,
    /// Where to keep resumable state (`None`: no periodic saves).
    pub state_dir: Option<PathBuf>,
    /// Save the state every this many optimizer steps.
    pub save_every: usize,
    /// Token id used for padding.
    pub pad: u32,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            epochs: 1,
            batch_size: 4,
            max_length: 512,
            seed: 42,
            optim: OptimConfig::default(),
            state_dir: None,
            save_every: 50,
            pad: 0,
        }
    }
}

/// One optimizer step's report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// DPO metrics (means over the step's micro-batches).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoMetrics>,
    /// Tokens through the model in this step.
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub steps: usize,
    /// Steps restored from saved state instead of run.
    pub resumed_from: usize,
    pub last: Option<StepLog>,
}

/// Micro-batches of indices over all epochs, each epoch shuffled with `seed + epoch`.
fn schedule(n: usize, cfg: &LoopConfig) -> Vec<(usize, Vec<usize>)> {
    let mut out = Vec::new();
    for e in 0..cfg.epochs {
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(e as u64));
        idx.shuffle(&mut rng);
        for chunk in idx.chunks(cfg.batch_size.max(1)) {
            out.push((e, chunk.to_vec()));
        }
    }
    out
}

fn optimizer_steps(micro_batches: usize, accumulation: usize) -> usize {
    micro_batches.div_ceil(accumulation.max(1))
}

struct Resume {
    dir: Option<PathBuf>,
    fingerprint: String,
}

impl Resume {
    fn new(cfg: &LoopConfig, what: &str, n: usize) -> Self {
        Resume {
            dir: cfg.state_dir.clone(),
            fingerprint: format!(
                "{what} n={n} epochs={} batch={} accum={} seed={} lr={} max_len={}",
                cfg.epochs,
                cfg.batch_size,
                cfg.optim.accumulation,
                cfg.seed,
                cfg.optim.learning_rate,
                cfg.max_length
            ),
        }
    }

    /// Restores a matching saved state; returns the micro-batches it covers.
    fn restore(&self, opt: &mut AdamW) -> Result<usize> {
        let Some(dir) = &self.dir else { return Ok(0) };
        let state = dir.join("state.json");
        if !state.is_file() {
            return Ok(0);
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state)?)
            .with_context(|| format!("parsing {}", state.display()))?;
        if v["fingerprint"].as_str() != Some(self.fingerprint.as_str()) {
            tracing::warn!(
                "{}: saved training state is for another job; starting over",
                state.display()
            );
            return Ok(0);
        }
        opt.load(&dir.join("optimizer.safetensors"))?;
        Ok(v["micro_batches"].as_u64().unwrap_or(0) as usize)
    }

    fn save(&self, opt: &AdamW, micro_batches: usize) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        opt.save(&dir.join("optimizer.safetensors"))?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({
                "fingerprint": self.fingerprint,
                "micro_batches": micro_batches,
                "optimizer_steps": opt.steps_taken(),
            })
            .to_string(),
        )?;
        std::fs::rename(tmp, dir.join("state.json"))?;
        Ok(())
    }
}

/// Backpropagates micro-batch `mi` of `total`; when that completes an optimizer step (or ends
/// the data), saves the state if due and returns the step. Saved before the caller reports
/// it, so a run stopped by the report keeps the step.
fn step(
    model: &TrainModel,
    opt: &mut AdamW,
    loss: &candle_core::Tensor,
    resume: &Resume,
    cfg: &LoopConfig,
    mi: usize,
    total: usize,
) -> Result<Option<crate::optim::StepInfo>> {
    let last_micro = mi + 1 == total;
    let info = match opt.backward_step_with(loss, |l| model.backward(l))? {
        Some(i) => i,
        None if last_micro => opt.flush()?,
        None => return Ok(None),
    };
    if info.step % cfg.save_every.max(1) == 0 || last_micro {
        resume.save(opt, mi + 1)?;
    }
    Ok(Some(info))
}

/// Epochs done after micro-batch `mi` (fractional).
fn epoch_progress(epoch: usize, mi: usize, per_epoch: usize) -> f64 {
    let per = per_epoch.max(1);
    epoch as f64 + ((mi % per) + 1) as f64 / per as f64
}

/// Supervised fine-tuning: loss on completion tokens only (the prompt is masked).
pub fn sft(
    model: &TrainModel,
    data: &[Example],
    cfg: &LoopConfig,
    on_step: &mut dyn FnMut(&StepLog) -> Result<()>,
) -> Result<Summary> {
    let plan = schedule(data.len(), cfg);
    let mut ocfg = cfg.optim.clone();
    ocfg.total_steps = optimizer_steps(plan.len(), ocfg.accumulation);
    let mut opt = AdamW::new(model.vars(), ocfg.clone())?;
    let resume = Resume::new(cfg, "sft", data.len());
    let done = resume.restore(&mut opt)?;
    let resumed_from = opt.steps_taken();
    let per_epoch = plan.len() / cfg.epochs.max(1);
    let (mut losses, mut tokens, mut last) = (Vec::new(), 0usize, None);
    for (mi, (epoch, idx)) in plan.iter().enumerate().skip(done) {
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = idx
            .iter()
            .map(|&i| truncate(&data[i].prompt, &data[i].completion, cfg.max_length))
            .collect();
        let refs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let batch = pack(&refs, cfg.pad, model.device())?;
        tokens += seqs.iter().map(|(p, c)| p.len() + c.len()).sum::<usize>();
        let loss = sft_loss(&token_logps(model, &batch, true)?)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        if let Some(info) = step(model, &mut opt, &loss, &resume, cfg, mi, plan.len())? {
            let log = StepLog {
                step: info.step,
                epoch: epoch_progress(*epoch, mi, per_epoch),
                learning_rate: info.learning_rate,
                grad_norm: info.grad_norm,
                loss: losses.iter().sum::<f64>() / losses.len() as f64,
                dpo: None,
                tokens,
            };
            on_step(&log)?;
            last = Some(log);
            losses.clear();
            tokens = 0;
        }
    }
    Ok(Summary {
        steps: opt.steps_taken(),
        resumed_from,
        last,
    })
}

/// Summed completion log-probs of each pair's chosen and rejected answers under the frozen
/// `reference`, computed once per round.
pub fn reference_logps(
    reference: &TrainModel,
    pairs: &[Pair],
    cfg: &LoopConfig,
) -> Result<Vec<(f32, f32)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(cfg.batch_size.max(1)) {
        let (lc, lr, _) = pair_logps(reference, chunk, cfg, false)?;
        let (c, r) = (to_vec(&lc)?, to_vec(&lr)?);
        out.extend(c.into_iter().zip(r));
    }
    Ok(out)
}

/// Policy log-probs for a chunk of pairs: chosen `[b]`, rejected `[b]`, and the completion
/// token counts (chosen then rejected).
fn pair_logps(
    model: &TrainModel,
    pairs: &[Pair],
    cfg: &LoopConfig,
    train: bool,
) -> Result<(candle_core::Tensor, candle_core::Tensor, Vec<usize>)> {
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|p| truncate(&p.prompt, &p.chosen, cfg.max_length))
        .chain(
            pairs
                .iter()
                .map(|p| truncate(&p.prompt, &p.rejected, cfg.max_length)),
        )
        .collect();
    let b = pairs.len();
    let batch = if model.takes_layouts() {
        // One row per pair, the prompt computed once for both answers.
        let rows: Vec<PairSeqs> = (0..b)
            .map(|i| PairSeqs {
                chosen: (&seqs[i].0, &seqs[i].1),
                rejected: (&seqs[b + i].0, &seqs[b + i].1),
            })
            .collect();
        pack_pairs(&rows, cfg.pad, model.device())?
    } else {
        let refs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        pack(&refs, cfg.pad, model.device())?
    };
    let all = sequence_logps(model, &batch, train)?;
    Ok((all.narrow(0, 0, b)?, all.narrow(0, b, b)?, batch.counts))
}

/// DPO against stored reference log-probs (`refs[i]` for `pairs[i]`).
pub fn dpo(
    model: &TrainModel,
    pairs: &[Pair],
    refs: &[(f32, f32)],
    opts: &DpoOptions,
    cfg: &LoopConfig,
    on_step: &mut dyn FnMut(&StepLog) -> Result<()>,
) -> Result<Summary> {
    anyhow::ensure!(
        refs.len() == pairs.len(),
        "{} reference log-probs for {} pairs",
        refs.len(),
        pairs.len()
    );
    let plan = schedule(pairs.len(), cfg);
    let mut ocfg = cfg.optim.clone();
    ocfg.total_steps = optimizer_steps(plan.len(), ocfg.accumulation);
    let mut opt = AdamW::new(model.vars(), ocfg)?;
    let resume = Resume::new(cfg, "dpo", pairs.len());
    let done = resume.restore(&mut opt)?;
    let resumed_from = opt.steps_taken();
    let per_epoch = plan.len() / cfg.epochs.max(1);
    let (mut metrics, mut tokens, mut last) = (Vec::<DpoMetrics>::new(), 0usize, None);
    for (mi, (epoch, idx)) in plan.iter().enumerate().skip(done) {
        let chunk: Vec<Pair> = idx.iter().map(|&i| pairs[i].clone()).collect();
        let (pc, pr, counts) = pair_logps(model, &chunk, cfg, true)?;
        let b = chunk.len();
        tokens += chunk
            .iter()
            .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
            .sum::<usize>();
        let mut rc: Vec<f32> = idx.iter().map(|&i| refs[i].0).collect();
        let mut rr: Vec<f32> = idx.iter().map(|&i| refs[i].1).collect();
        let dev = model.device();
        let nc = candle_core::Tensor::from_vec(
            counts[..b]
                .iter()
                .map(|&n| n.max(1) as f32)
                .collect::<Vec<_>>(),
            b,
            dev,
        )?;
        let nr = candle_core::Tensor::from_vec(
            counts[b..]
                .iter()
                .map(|&n| n.max(1) as f32)
                .collect::<Vec<_>>(),
            b,
            dev,
        )?;
        let (pc, pr) = if opts.kind == DpoKind::Ipo {
            for i in 0..b {
                rc[i] /= counts[i].max(1) as f32;
                rr[i] /= counts[b + i].max(1) as f32;
            }
            ((&pc / &nc)?, (&pr / &nr)?)
        } else {
            (pc, pr)
        };
        let nll = (&pc / &nc)?.neg()?;
        let (loss, m) = dpo_loss(&pc, &pr, &rc, &rr, opts, Some(&nll))?;
        metrics.push(m);
        if let Some(info) = step(model, &mut opt, &loss, &resume, cfg, mi, plan.len())? {
            let n = metrics.len() as f64;
            let avg = |f: fn(&DpoMetrics) -> f64| metrics.iter().map(f).sum::<f64>() / n;
            let dm = DpoMetrics {
                loss: avg(|m| m.loss),
                rewards_chosen: avg(|m| m.rewards_chosen),
                rewards_rejected: avg(|m| m.rewards_rejected),
                rewards_margins: avg(|m| m.rewards_margins),
                rewards_accuracies: avg(|m| m.rewards_accuracies),
                logps_chosen: avg(|m| m.logps_chosen),
                logps_rejected: avg(|m| m.logps_rejected),
            };
            let log = StepLog {
                step: info.step,
                epoch: epoch_progress(*epoch, mi, per_epoch),
                learning_rate: info.learning_rate,
                grad_norm: info.grad_norm,
                loss: dm.loss,
                dpo: Some(dm),
                tokens,
            };
            on_step(&log)?;
            last = Some(log);
            metrics.clear();
            tokens = 0;
        }
    }
    Ok(Summary {
        steps: opt.steps_taken(),
        resumed_from,
        last,
    })
}
