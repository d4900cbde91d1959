//! Token sequences into padded batches, and the log-probabilities of their completions.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use std::sync::Arc;

use crate::fused::{AttnPlan, RowShape};
use crate::model::TrainModel;

/// A prompt and a completion (ending with the end-of-sequence token when it should be
/// learned), as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// A preference pair: one prompt, a chosen and a rejected completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Fits prompt + completion into `max_len` tokens: the completion keeps at least half the
/// budget (cut at its end), the prompt keeps its last tokens.
pub fn truncate(prompt: &[u32], completion: &[u32], max_len: usize) -> (Vec<u32>, Vec<u32>) {
    if prompt.len() + completion.len() <= max_len {
        return (prompt.to_vec(), completion.to_vec());
    }
    let c = completion
        .len()
        .min(max_len.saturating_sub(prompt.len()).max(max_len / 2));
    let p = max_len - c;
    (
        prompt[prompt.len().saturating_sub(p)..].to_vec(),
        completion[..c].to_vec(),
    )
}

/// Right-padded sequences and the positions whose next token is a completion token.
pub struct Packed {
    /// `[b, t]` token ids (u32).
    pub ids: Tensor,
    /// `[b, t]`, 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// `[n]` flattened `b * t` rows of the logits that predict a completion token.
    pub positions: Tensor,
    /// `[n]` the completion tokens they predict.
    pub targets: Tensor,
    pub target_ids: Vec<u32>,
    /// `[b, n]`, 1 where position k belongs to sequence i: sums token log-probs per sequence.
    pub owner: Tensor,
    /// Completion tokens per sequence.
    pub counts: Vec<usize>,
    /// The attention layout when rows are not plain causal sequences ([`pack_pairs`]).
    pub plan: Option<Arc<AttnPlan>>,
}

impl Packed {
    /// The batch from its host buffers, tensors on `device`: `ids` and `mask` `[b, t]`, and
    /// per sequence the (flattened row, token) of each completion token it predicts, in order.
    fn from_host(
        ids: Vec<u32>,
        mask: Vec<f32>,
        (b, t): (usize, usize),
        per_seq: &[Vec<(u32, u32)>],
        plan: Option<Arc<AttnPlan>>,
        device: &Device,
    ) -> Result<Self> {
        let counts: Vec<usize> = per_seq.iter().map(Vec::len).collect();
        let n: usize = counts.iter().sum();
        let (mut positions, mut targets) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut owner = vec![0f32; per_seq.len() * n];
        for (seq, items) in per_seq.iter().enumerate() {
            for &(pos, tok) in items {
                owner[seq * n + positions.len()] = 1.0;
                positions.push(pos);
                targets.push(tok);
            }
        }
        Ok(Packed {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_slice(&targets, n, device)?,
            target_ids: targets,
            owner: Tensor::from_vec(owner, (per_seq.len(), n), device)?,
            counts,
            plan,
        })
    }
}

/// Packs (prompt, completion) pairs, each already within the length budget.
pub fn pack(seqs: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Packed> {
    let b = seqs.len();
    let t = seqs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0f32; b * t];
    let mut per_seq: Vec<Vec<(u32, u32)>> = vec![Vec::new(); b];
    for (i, (p, c)) in seqs.iter().enumerate() {
        let full: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
        for (j, &tok) in full.iter().enumerate() {
            ids[i * t + j] = tok;
            mask[i * t + j] = 1.0;
        }
        // Position j predicts token j + 1; completion tokens start at p.len() (a completion
        // with no prompt cannot predict its first token).
        let start = p.len().max(1);
        for (j, &tok) in full.iter().enumerate().skip(start) {
            per_seq[i].push(((i * t + j - 1) as u32, tok));
        }
    }
    Packed::from_host(ids, mask, (b, t), &per_seq, None, device)
}

/// One preference pair after truncation: the prompt and answer of its chosen and of its
/// rejected sequence.
pub struct PairSeqs<'a> {
    pub chosen: (&'a [u32], &'a [u32]),
    pub rejected: (&'a [u32], &'a [u32]),
}

/// Packs preference pairs one row each: the prompt once, then the chosen and the rejected
/// answer as two branches that both see the prompt but not each other (see
/// [`RowShape`]), so the prompt's layers run once instead of twice. Where truncation left the
/// two sequences different prompts, the row holds both sequences whole as branches. Sequence
/// `i` of the result is pair `i`'s chosen answer, sequence `b + i` its rejected one, as
/// [`pack`] numbers `[chosen..., rejected...]`. Needs a model that
/// [`TrainModel::takes_layouts`].
pub fn pack_pairs(pairs: &[PairSeqs], pad: u32, device: &Device) -> Result<Packed> {
    let b = pairs.len();
    // (row tokens, shape, per branch: (start, own prompt length, completion)).
    type Branch<'a> = (usize, usize, &'a [u32]);
    let mut rows: Vec<(Vec<u32>, RowShape, [Branch; 2])> = Vec::with_capacity(b);
    for p in pairs {
        let ((pc, cc), (pr, rc)) = (p.chosen, p.rejected);
        if pc == pr {
            let tokens: Vec<u32> = pc.iter().chain(cc).chain(rc).copied().collect();
            let shape = RowShape {
                prefix: pc.len(),
                branches: vec![cc.len(), rc.len()],
            };
            let s = pc.len();
            rows.push((tokens, shape, [(s, 0, cc), (s + cc.len(), 0, rc)]));
        } else {
            let tokens: Vec<u32> = pc.iter().chain(cc).chain(pr).chain(rc).copied().collect();
            let (lc, lr) = (pc.len() + cc.len(), pr.len() + rc.len());
            let shape = RowShape {
                prefix: 0,
                branches: vec![lc, lr],
            };
            rows.push((tokens, shape, [(0, pc.len(), cc), (lc, pr.len(), rc)]));
        }
    }
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(2);
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0f32; b * t];
    // Per sequence (chosen 0..b, then rejected 0..b): predicting rows and targets.
    let mut per_seq: Vec<Vec<(u32, u32)>> = vec![Vec::new(); 2 * b];
    for (i, (tokens, shape, branches)) in rows.iter().enumerate() {
        ids[i * t..i * t + tokens.len()].copy_from_slice(tokens);
        mask[i * t..i * t + tokens.len()].fill(1.0);
        let prefix = shape.prefix;
        for (which, &(start, own, completion)) in branches.iter().enumerate() {
            // The branch sees prefix ++ its own tokens; visible index v is row index v below
            // the prefix, start + (v - prefix) above it.
            let row_of = |v: usize| if v < prefix { v } else { start + v - prefix };
            for (k, &tok) in completion.iter().enumerate() {
                let v = prefix + own + k;
                if v == 0 {
                    continue; // nothing before it to predict it from
                }
                per_seq[which * b + i].push(((i * t + row_of(v - 1)) as u32, tok));
            }
        }
    }
    let plan = AttnPlan::new(t, &rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>())?;
    Packed::from_host(ids, mask, (b, t), &per_seq, Some(Arc::new(plan)), device)
}

/// Log-probability of each completion token, `[n]`, through the model (differentiable).
pub fn token_logps(model: &TrainModel, batch: &Packed, train: bool) -> Result<Tensor> {
    let (b, t) = batch.ids.dims2()?;
    let hidden = model
        .hidden_planned(&batch.ids, Some(&batch.mask), batch.plan.as_ref(), train)?
        .reshape((b * t, model.config.hidden))?;
    let rows = hidden.index_select(&batch.positions, 0)?;
    let logits = model.head(&rows)?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return Ok(crate::kernels::token_logps(&logits, &batch.target_ids)?);
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)?;
    let picked = logits.gather(&batch.targets.unsqueeze(1)?, 1)?;
    Ok((picked - lse)?.squeeze(1)?)
}

/// Summed completion log-probability per sequence, `[b]`.
pub fn sequence_logps(model: &TrainModel, batch: &Packed, train: bool) -> Result<Tensor> {
    let tok = token_logps(model, batch, train)?;
    Ok(batch.owner.matmul(&tok.unsqueeze(1)?)?.squeeze(1)?)
}

/// Per-sequence sums as plain numbers (no graph).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
