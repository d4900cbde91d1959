//! Token sequences into padded batches, and the log-probabilities of their completions.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

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
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut owners = Vec::new();
    let mut counts = Vec::with_capacity(b);
    for (i, (p, c)) in seqs.iter().enumerate() {
        let full: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
        for (j, &tok) in full.iter().enumerate() {
            ids[i * t + j] = tok;
            mask[i * t + j] = 1.0;
        }
        // Position j predicts token j + 1; completion tokens start at p.len() (a completion
        // with no prompt cannot predict its first token).
        let start = p.len().max(1);
        for j in start..full.len() {
            positions.push((i * t + j - 1) as u32);
            targets.push(full[j]);
            owners.push(i);
        }
        counts.push(full.len() - start);
    }
    let n = positions.len();
    let mut owner = vec![0f32; b * n];
    for (k, &i) in owners.iter().enumerate() {
        owner[i * n + k] = 1.0;
    }
    Ok(Packed {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        positions: Tensor::from_vec(positions, n, device)?,
        targets: Tensor::from_slice(&targets, n, device)?,
        target_ids: targets,
        owner: Tensor::from_vec(owner, (b, n), device)?,
        counts,
    })
}

/// Log-probability of each completion token, `[n]`, through the model (differentiable).
pub fn token_logps(model: &TrainModel, batch: &Packed, train: bool) -> Result<Tensor> {
    let (b, t) = batch.ids.dims2()?;
    let hidden = model
        .hidden(&batch.ids, Some(&batch.mask), train)?
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
