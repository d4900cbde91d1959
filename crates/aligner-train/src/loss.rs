//! The SFT and DPO objectives, with the metrics TRL reports under the same names.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Which DPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoKind {
    /// `-log σ(β·h)` (Rafailov et al.), with optional label smoothing (cDPO).
    Sigmoid,
    /// `(h - 1/(2β))²` (Azar et al.); TRL feeds it per-token average log-probs.
    Ipo,
    /// Sigmoid plus `alpha` times the NLL of the chosen completion (RPO).
    SigmoidNll { alpha: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoOptions {
    pub beta: f64,
    pub kind: DpoKind,
    /// Probability that a preference label is flipped (sigmoid losses only). 0 turns it off.
    pub label_smoothing: f64,
}

impl Default for DpoOptions {
    fn default() -> Self {
        DpoOptions {
            beta: 0.1,
            kind: DpoKind::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

/// Per-batch means, named as TRL names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DpoMetrics {
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

/// `log σ(x)`, stable for any x: `min(x, 0) - log(1 + e^{-|x|})`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

/// The DPO loss over a batch. `policy_*` are `[b]` tensors (differentiable), `ref_*` the
/// frozen reference's values. `chosen_nll` (`[b]`, mean token NLL of the chosen completion)
/// is needed by [`DpoKind::SigmoidNll`] only.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &[f32],
    ref_rejected: &[f32],
    opts: &DpoOptions,
    chosen_nll: Option<&Tensor>,
) -> Result<(Tensor, DpoMetrics)> {
    let dev = policy_chosen.device();
    let b = policy_chosen.dims1()?;
    if ref_chosen.len() != b || ref_rejected.len() != b {
        bail!(
            "reference log-probs for {} pairs, batch has {b}",
            ref_chosen.len()
        );
    }
    let rc = Tensor::from_slice(ref_chosen, b, dev)?;
    let rr = Tensor::from_slice(ref_rejected, b, dev)?;
    let chosen_ratio = (policy_chosen - &rc)?;
    let rejected_ratio = (policy_rejected - &rr)?;
    let h = (&chosen_ratio - &rejected_ratio)?;
    let beta = opts.beta;
    let per_pair = match opts.kind {
        DpoKind::Sigmoid | DpoKind::SigmoidNll { .. } => {
            let ls = opts.label_smoothing;
            let bh = h.affine(beta, 0.0)?;
            let mut l = log_sigmoid(&bh)?.affine(-(1.0 - ls), 0.0)?;
            if ls > 0.0 {
                l = (l + log_sigmoid(&bh.neg()?)?.affine(-ls, 0.0)?)?;
            }
            l
        }
        DpoKind::Ipo => h.affine(1.0, -1.0 / (2.0 * beta))?.sqr()?,
    };
    let mut loss = per_pair.mean_all()?;
    if let DpoKind::SigmoidNll { alpha } = opts.kind {
        let Some(nll) = chosen_nll else {
            bail!("the sigmoid + NLL loss needs the chosen completions' NLL");
        };
        loss = (loss + nll.mean_all()?.affine(alpha, 0.0)?)?;
    }
    let rc_r = crate::data::to_vec(&chosen_ratio)?;
    let rr_r = crate::data::to_vec(&rejected_ratio)?;
    let pc = crate::data::to_vec(policy_chosen)?;
    let pr = crate::data::to_vec(policy_rejected)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let chosen: Vec<f64> = rc_r.iter().map(|x| beta * *x as f64).collect();
    let rejected: Vec<f64> = rr_r.iter().map(|x| beta * *x as f64).collect();
    let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(a, b)| a - b).collect();
    let acc: Vec<f64> = chosen
        .iter()
        .zip(&rejected)
        .map(|(a, b)| if a > b { 1.0 } else { 0.0 })
        .collect();
    let metrics = DpoMetrics {
        loss: loss.to_scalar::<f32>()? as f64,
        rewards_chosen: mean(&chosen),
        rewards_rejected: mean(&rejected),
        rewards_margins: mean(&margins),
        rewards_accuracies: mean(&acc),
        logps_chosen: mean(&pc.iter().map(|x| *x as f64).collect::<Vec<_>>()),
        logps_rejected: mean(&pr.iter().map(|x| *x as f64).collect::<Vec<_>>()),
    };
    Ok((loss, metrics))
}

/// Mean negative log-likelihood over all completion tokens of a batch (token-weighted, as
/// TRL's SFT loss).
pub fn sft_loss(token_logps: &Tensor) -> Result<Tensor> {
    Ok(token_logps.mean_all()?.neg()?)
}
