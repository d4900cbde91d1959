//! Fused CPU layers with hand-written backward passes, for the training step's hot path.
//!
//! Composed from candle's basic ops, one transformer layer is some sixty graph nodes, and on
//! the backward pass candle gives every node's input a zeroed gradient buffer plus an
//! addition: most of a step that is not matrix products went there. Each function here is a
//! single node with its own backward, and reads and writes the `[tokens, features]` layout the
//! linear layers produce, so no transposed copies are made:
//!
//! - [`linear`]: `x Wᵀ`; the backward computes `dx` and `dW` only for inputs that need them
//!   (a frozen base weight under LoRA gets none);
//! - [`rms_norm`]: `x / rms(x) * w`;
//! - [`swiglu`]: `silu(a) * u`;
//! - [`attention`]: rotary embedding of q and k, causal scaled-dot-product attention with
//!   grouped key/value heads (no repeated k/v), output `[tokens, heads * head_dim]`. The
//!   attention probabilities and rotated q/k are kept for the backward pass.
//!
//! Matrix products go to `gemm` (candle's own CPU matmul backend) with strides, rows are split
//! across threads with rayon. The model uses these on the CPU for f32 weights; elsewhere it
//! composes candle ops (see `model.rs`), and the tests below check each against that
//! composition, values and gradients.

// `unsafe` here: `gemm` takes raw pointers and strides (it is how the products read strided
// heads and write into shared outputs without copies), and the attention tasks write their own
// blocks of shared buffers through `SyncPtr`.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::sync::{Arc, Mutex};

use aligner_local::sync_ptr::SyncPtr;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::vmath::{self, sigmoid};

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!("{what}: f32 only"))),
    }
}

/// Runs `f` on the f32 contents of a contiguous CPU tensor.
fn read<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice(s, layout, what)?),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

fn cpu(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A matrix operand: pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct Mat(*const f32, isize, isize);

/// `dst[m × n] = lhs[m × k] · rhs[k × n]` (or `+=` with `accumulate`), the shape given as
/// `[m, n, k]` and every matrix by its pointer and strides.
///
/// # Safety
/// Every pointer must be valid for the elements its strides reach, and `dst` must not alias
/// the operands or memory another thread writes.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    par: Parallelism,
) {
    // SAFETY: gemm needs exactly what this function's caller promises: every pointer valid
    // for the elements its strides reach, `dst` aliasing neither operand nor another thread's
    // writes. Column stride comes before row stride in gemm's argument order.
    unsafe {
        gemm::gemm(
            m, n, k, dst, 1, dst_rs, accumulate, lhs.0, lhs.2, lhs.1, rhs.0, rhs.2, rhs.1, 1.0,
            1.0, false, false, false, par,
        )
    }
}

/// What a forward pass left in `slot` for the backward pass.
fn saved<T: Clone>(slot: &Mutex<Option<T>>, what: &str) -> Result<T> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: no forward state")))
}

// ---------------------------------------------------------------------------------------------
// linear

/// A two-input op of the fused path on CPU f32 tensors, run by candle as [`Op2`]: the forward
/// pass gets the inputs' data with their layouts, the backward pass the inputs and the
/// output's gradient (contiguous).
trait SliceOp2: Send + Sync {
    const NAME: &'static str;
    fn forward(&self, a: &[f32], la: &Layout, b: &[f32], lb: &Layout) -> Result<(Vec<f32>, Shape)>;
    fn backward(&self, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Grads2>;
}

/// The gradients of a two-input op's inputs (`None` where an input needs none).
type Grads2 = (Option<Tensor>, Option<Tensor>);

/// A [`SliceOp2`] as candle's [`CustomOp2`].
struct Op2<T>(T);

impl<T: SliceOp2> CustomOp2 for Op2<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(sa, la, T::NAME)?, slice(sb, lb, T::NAME)?);
        let (y, shape) = self.0.forward(a, la, b, lb)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Grads2> {
        self.0.backward(a, b, &g.contiguous()?)
    }
}

struct LinearOp;

impl SliceOp2 for LinearOp {
    const NAME: &'static str = "fused-linear";

    fn forward(&self, x: &[f32], lx: &Layout, w: &[f32], lw: &Layout) -> Result<(Vec<f32>, Shape)> {
        let (n, inp) = lx.shape().dims2()?;
        let (out, inp2) = lw.shape().dims2()?;
        if inp != inp2 {
            candle_core::bail!("fused-linear: input has {inp} features, weight {inp2}");
        }
        Ok((forward_new(x, w, n, inp, out), Shape::from((n, out))))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Grads2> {
        let dx = x.track_op().then(|| g.matmul(&w.detach())).transpose()?;
        let dw = w
            .track_op()
            .then(|| g.t()?.matmul(&x.detach()))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// `x Wᵀ` for `x` `[n, in]` and `W` `[out, in]` (CPU, f32).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Op2(LinearOp))
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNormOp {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = vmath::dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl SliceOp2 for RmsNormOp {
    const NAME: &'static str = "fused-rms-norm";

    fn forward(&self, x: &[f32], lx: &Layout, w: &[f32], _: &Layout) -> Result<(Vec<f32>, Shape)> {
        let mut y = vec![0f32; x.len()];
        norm_forward(x, w, self.eps, &mut y);
        Ok((y, lx.shape().clone()))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Grads2> {
        let eps = self.eps;
        let (dx, dw) = read(x, Self::NAME, |x| {
            read(w, Self::NAME, |w| {
                read(g, Self::NAME, |g| {
                    let d = w.len();
                    let inv: Vec<f32> = x.par_chunks(d).map(|r| inv_rms(r, eps)).collect();
                    let mut dx = vec![0f32; x.len()];
                    let dw = norm_grads(x, &inv, w, g, &mut dx);
                    Ok((dx, dw))
                })
            })
        })?;
        let dx = x.track_op().then(|| cpu(dx, x.shape())).transpose()?;
        let dw = w.track_op().then(|| cpu(dw, w.shape())).transpose()?;
        Ok((dx, dw))
    }
}

fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    if a.len() < b.len() {
        return add_into(b, a);
    }
    for (a, b) in a.iter_mut().zip(&b) {
        *a += b;
    }
    a
}

/// `x * rsqrt(mean(x²) + eps) * w` over the last dimension (CPU, f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Op2(RmsNormOp { eps: eps as f32 }))
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwiGluOp;

impl SliceOp2 for SwiGluOp {
    const NAME: &'static str = "fused-swiglu";

    fn forward(&self, a: &[f32], la: &Layout, u: &[f32], _: &Layout) -> Result<(Vec<f32>, Shape)> {
        if a.len() != u.len() {
            candle_core::bail!("fused-swiglu: shapes differ");
        }
        Ok((swiglu_forward(a, u), la.shape().clone()))
    }

    fn backward(&self, a: &Tensor, u: &Tensor, g: &Tensor) -> Result<Grads2> {
        let (da, du) = read(a, Self::NAME, |a| {
            read(u, Self::NAME, |u| {
                read(g, Self::NAME, |g| Ok(swiglu_backward(g, a, u)))
            })
        })?;
        Ok((Some(cpu(da, a.shape())?), Some(cpu(du, u.shape())?)))
    }
}

/// Elements per SwiGLU task.
const CHUNK: usize = 1 << 13;

/// `silu(a) * u` elementwise.
fn swiglu_forward(a: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (a, u))| {
            for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
                *y = a * sigmoid(a) * u;
            }
        });
    y
}

/// Gradients of `silu(a) * u` with respect to `a` and `u`, from the output's gradient `g`.
fn swiglu_backward(g: &[f32], a: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut da = vec![0f32; a.len()];
    let mut du = vec![0f32; a.len()];
    da.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            a.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK)),
        )
        .for_each(|((da, du), ((a, u), g))| {
            for i in 0..a.len() {
                let s = sigmoid(a[i]);
                da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                du[i] = g[i] * a[i] * s;
            }
        });
    (da, du)
}

/// `silu(a) * u` (CPU, f32).
pub fn swiglu(a: &Tensor, u: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&u.contiguous()?, Op2(SwiGluOp))
}

// ---------------------------------------------------------------------------------------------
// attention

/// Rotary tables in the rotate-half layout: `cos[p * head_dim + j]`, both halves filled.
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
}

/// Rotates every head of rows `[b * t, heads * hd]` in place, row `r` at rotary position
/// `positions[r]` (`inverse`: the transpose).
fn rotate(rope: &RopeTables, x: &mut [f32], row_width: usize, positions: &[u32], inverse: bool) {
    let hd = rope.head_dim;
    let half = hd / 2;
    x.par_chunks_mut(row_width)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let p = p as usize;
            let c = &rope.cos[p * hd..(p + 1) * hd];
            let s = &rope.sin[p * hd..(p + 1) * hd];
            for head in row.chunks_mut(hd) {
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    if inverse {
                        head[i] = x1 * c[i] + x2 * s[i + half];
                        head[i + half] = x2 * c[i + half] - x1 * s[i];
                    } else {
                        head[i] = x1 * c[i] - x2 * s[i];
                        head[i + half] = x2 * c[i + half] + x1 * s[i + half];
                    }
                }
            }
        });
}

/// Query rows per attention task: a block of rows attends to the keys up to its last row.
const ROWS: usize = 128;

/// How one row of a batch is laid out: a causal `prefix`, then `branches` (lengths) that each
/// see the prefix and their own earlier tokens but not one another. A prompt with its chosen
/// and rejected answers fits in one row this way, the prompt computed once. A plain sequence
/// is a prefix with no branches. Rows past the layout (padding) continue the last part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowShape {
    pub prefix: usize,
    pub branches: Vec<usize>,
}

impl RowShape {
    /// A causal sequence of `len` tokens.
    pub fn causal(len: usize) -> Self {
        RowShape {
            prefix: len,
            branches: Vec::new(),
        }
    }

    /// Tokens the layout covers (before padding).
    pub fn len(&self) -> usize {
        self.prefix + self.branches.iter().sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One attention task's query rows and the keys they see. Its score rows are `w` wide:
/// columns `0..pre` are keys `0..pre`, columns `pre..w` keys `br..br + (w - pre)`; query row
/// `r0 + j` sees the first `w - (m - 1 - j)` columns.
#[derive(Debug, Clone, Copy)]
struct Block {
    r0: usize,
    m: usize,
    pre: usize,
    br: usize,
    w: usize,
    /// Offset of its `m × w` probabilities in its (batch row, head) region.
    poff: usize,
    /// Offset of its `w` key rows in its (batch row, head) key-gradient region.
    koff: usize,
}

impl Block {
    /// (first score column, first key, count) of each key range.
    fn ranges(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        [(0, 0, self.pre), (self.pre, self.br, self.w - self.pre)]
            .into_iter()
            .filter(|r| r.2 > 0)
    }

    /// The score column of key `j`, if this block's queries see it.
    fn column(&self, j: usize) -> Option<usize> {
        if j < self.pre {
            Some(j)
        } else if j >= self.br && j < self.br + (self.w - self.pre) {
            Some(self.pre + j - self.br)
        } else {
            None
        }
    }
}

/// The attention layout of a batch: every row's blocks and every token's rotary position.
#[derive(Debug)]
pub struct AttnPlan {
    b: usize,
    t: usize,
    positions: Vec<u32>,
    rows: Vec<Vec<Block>>,
    /// Per batch row: probabilities and key rows of one head.
    psize: Vec<usize>,
    ksize: Vec<usize>,
}

impl AttnPlan {
    /// `b` causal sequences of `t` tokens (right-padded).
    pub fn causal(b: usize, t: usize) -> Self {
        Self::new(t, &vec![RowShape::causal(t); b]).expect("a causal layout is valid")
    }

    /// Rows of `t` tokens laid out as `shapes` says.
    pub fn new(t: usize, shapes: &[RowShape]) -> Result<Self> {
        let mut positions = Vec::with_capacity(shapes.len() * t);
        let mut rows = Vec::with_capacity(shapes.len());
        let (mut psize, mut ksize) = (Vec::new(), Vec::new());
        for s in shapes {
            if s.len() > t {
                candle_core::bail!("attention layout {s:?} does not fit rows of {t} tokens");
            }
            // Padding extends the last part.
            let mut parts = vec![s.prefix.min(t)];
            parts.extend(s.branches.iter().copied());
            let pad = t - s.len();
            *parts.last_mut().expect("a prefix") += pad;
            let pre_len = parts[0];
            let real = s.len();
            let row_positions = positions.len();
            let mut blocks = Vec::new();
            let (mut start, mut poff, mut koff) = (0, 0, 0);
            for (i, &len) in parts.iter().enumerate() {
                for r in start..start + len {
                    positions.push(if r >= real && real > 0 {
                        // Padding repeats the last token's position: its rows are never
                        // read, and it stays inside the rotary table.
                        positions[row_positions + real - 1]
                    } else if i == 0 {
                        r as u32
                    } else {
                        (pre_len + r - start) as u32
                    });
                }
                let mut r0 = start;
                while r0 < start + len {
                    let m = ROWS.min(start + len - r0);
                    let (pre, br) = if i == 0 {
                        (r0 + m, r0 + m)
                    } else {
                        (pre_len, start)
                    };
                    let w = pre + (r0 + m - br);
                    blocks.push(Block {
                        r0,
                        m,
                        pre,
                        br,
                        w,
                        poff,
                        koff,
                    });
                    poff += m * w;
                    koff += w;
                    r0 += m;
                }
                start += len;
            }
            psize.push(poff);
            ksize.push(koff);
            rows.push(blocks);
        }
        Ok(AttnPlan {
            b: shapes.len(),
            t,
            positions,
            rows,
            psize,
            ksize,
        })
    }

    /// The largest rotary position any row uses.
    pub fn max_position(&self) -> usize {
        self.positions.iter().copied().max().unwrap_or(0) as usize
    }

    /// Every (batch row, head, block) task.
    fn tasks(&self, heads: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (bi, blocks) in self.rows.iter().enumerate() {
            for h in 0..heads {
                out.extend((0..blocks.len()).map(|k| (bi, h, k)));
            }
        }
        out
    }

    /// Start of (batch row `bi`, head `h`)'s region in a per-head buffer of `size`s.
    fn region(size: &[usize], bi: usize, h: usize, heads: usize) -> usize {
        heads * size[..bi].iter().sum::<usize>() + h * size[bi]
    }
}

/// The attention's output and what its backward pass needs.
struct AttnOut {
    o: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    p: Vec<f32>,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// Rotated q `[b * t, heads * hd]` and k `[b * t, kv_heads * hd]`.
    q: Vec<f32>,
    k: Vec<f32>,
    /// Probabilities, each task's `m × w` rows (see [`Block`]).
    p: Vec<f32>,
}

struct AttentionOp {
    plan: Arc<AttnPlan>,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    rope: Arc<RopeTables>,
    saved: Mutex<Option<Arc<Saved>>>,
}

impl AttentionOp {
    fn hd(&self) -> usize {
        self.rope.head_dim
    }

    /// Rotates `q`, `k` and attends; keeps what the backward pass needs.
    ///
    /// Work is split by (batch row, head, block of query rows); a block only computes scores
    /// against the keys its rows can see (for a causal block `r0..r1`, keys `0..r1`).
    fn run(&self, mut q: Vec<f32>, mut k: Vec<f32>, v: &[f32]) -> AttnOut {
        let plan = &*self.plan;
        let (b, t, nh, nkv, hd) = (plan.b, plan.t, self.heads, self.kv_heads, self.hd());
        let (qw, kw) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        rotate(&self.rope, &mut q, qw, &plan.positions, false);
        rotate(&self.rope, &mut k, kw, &plan.positions, false);
        // Neither buffer is zeroed first: every element is written below (the scores by
        // gemm, then overwritten by the probabilities; the output by each head's gemms).
        let len_p = nh * plan.psize.iter().sum::<usize>();
        let mut p: Vec<f32> = Vec::with_capacity(len_p);
        let mut out: Vec<f32> = Vec::with_capacity(b * t * qw);
        let (pp, o) = (
            SyncPtr::spare_capacity(&mut p),
            SyncPtr::spare_capacity(&mut out),
        );
        let scale = self.scale;
        plan.tasks(nh).into_par_iter().for_each(|(bi, h, k_blk)| {
            let (pp, o) = (pp, o);
            let bl = plan.rows[bi][k_blk];
            let (r0, m, w) = (bl.r0, bl.m, bl.w);
            let kvh = h / group;
            let qb = Mat(
                q.as_ptr().wrapping_add((bi * t + r0) * qw + h * hd),
                qw as isize,
                1,
            );
            // SAFETY: this task's m × w probabilities lie inside p's capacity (the plan's
            // regions tile it); q/k/v reads stay inside batch row bi; output rows r0..r0+m of
            // head h are written by this task only.
            unsafe {
                let ph = pp.add(AttnPlan::region(&plan.psize, bi, h, nh) + bl.poff);
                for (col, key, n) in bl.ranges() {
                    // S[:, col..col + n] = q_h[r0..] k_kvh[key..key + n]ᵀ
                    matmul(
                        [m, n, hd],
                        ph.add(col),
                        w as isize,
                        false,
                        qb,
                        Mat(
                            k.as_ptr().add((bi * t + key) * kw + kvh * hd),
                            1,
                            kw as isize,
                        ),
                        Parallelism::None,
                    );
                }
                // gemm wrote all m × w scores.
                let rows = std::slice::from_raw_parts_mut(ph, m * w);
                for (j, row) in rows.chunks_mut(w).enumerate() {
                    let n = w - (m - 1 - j);
                    let max = vmath::max(&row[..n]);
                    for v in &mut row[..n] {
                        *v = vmath::exp((*v - max) * scale);
                    }
                    let inv = 1.0 / vmath::sum(&row[..n]);
                    row[..n].iter_mut().for_each(|v| *v *= inv);
                    row[n..].iter_mut().for_each(|v| *v = 0.0);
                }
                for (i, (col, key, n)) in bl.ranges().enumerate() {
                    // O_h[r0..] (+)= P[:, col..col + n] v_kvh[key..key + n]
                    matmul(
                        [m, hd, n],
                        o.add((bi * t + r0) * qw + h * hd),
                        qw as isize,
                        i > 0,
                        Mat(ph.add(col), w as isize, 1),
                        Mat(
                            v.as_ptr().add((bi * t + key) * kw + kvh * hd),
                            kw as isize,
                            1,
                        ),
                        Parallelism::None,
                    );
                }
            }
        });
        // SAFETY: the tasks' probability regions tile p; every (batch row, row, head) of the
        // output was written by the task whose block holds the row (blocks tile each row).
        unsafe {
            p.set_len(len_p);
            out.set_len(b * t * qw);
        }
        AttnOut { o: out, q, k, p }
    }

    /// Gradients of q, k (before rotation) and v from the output's gradient `g`.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        p: &[f32],
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let plan = &*self.plan;
        let (b, t, nh, nkv, hd) = (plan.b, plan.t, self.heads, self.kv_heads, self.hd());
        let (qw, kw) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        let scale = self.scale;
        let mut dq = vec![0f32; b * t * qw];
        // Per task, the gradients of the keys and values it saw (its w key rows), summed per
        // key and kv head afterwards.
        let len_k = nh * plan.ksize.iter().sum::<usize>() * hd;
        let mut dkh = vec![0f32; len_k];
        let mut dvh = vec![0f32; len_k];
        let (dqp, dkp, dvp) = (
            SyncPtr::new(&mut dq),
            SyncPtr::new(&mut dkh),
            SyncPtr::new(&mut dvh),
        );
        plan.tasks(nh).into_par_iter().for_each(|(bi, h, k_blk)| {
            let (dqp, dkp, dvp) = (dqp, dkp, dvp);
            let bl = plan.rows[bi][k_blk];
            let (r0, m, w) = (bl.r0, bl.m, bl.w);
            let kvh = h / group;
            let ph = &p[AttnPlan::region(&plan.psize, bi, h, nh) + bl.poff..][..m * w];
            let kreg = (AttnPlan::region(&plan.ksize, bi, h, nh) + bl.koff) * hd;
            let go = Mat(
                g.as_ptr().wrapping_add((bi * t + r0) * qw + h * hd),
                qw as isize,
                1,
            );
            let qb = Mat(
                q.as_ptr().wrapping_add((bi * t + r0) * qw + h * hd),
                qw as isize,
                1,
            );
            let key =
                |buf: &[f32], j: usize| buf.as_ptr().wrapping_add((bi * t + j) * kw + kvh * hd);
            let mut ds = vec![0f32; m * w];
            // SAFETY: operands in bounds as in the forward pass; ds is this task's, and so are
            // its w key rows of dkh/dvh; dq rows r0..r0+m of head h are written by it only.
            unsafe {
                for (col, j, n) in bl.ranges() {
                    // dP[:, col..] = dO v[j..j + n]ᵀ
                    matmul(
                        [m, n, hd],
                        ds.as_mut_ptr().add(col),
                        w as isize,
                        false,
                        go,
                        Mat(key(v, j), 1, kw as isize),
                        Parallelism::None,
                    );
                    // dV rows = P[:, col..]ᵀ dO
                    matmul(
                        [n, hd, m],
                        dvp.add(kreg + col * hd),
                        hd as isize,
                        false,
                        Mat(ph.as_ptr().add(col), 1, w as isize),
                        go,
                        Parallelism::None,
                    );
                }
            }
            // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
            for (dr, pr) in ds.chunks_mut(w).zip(ph.chunks(w)) {
                let dot = vmath::dot(dr, pr);
                for (d, &p) in dr.iter_mut().zip(pr) {
                    *d = scale * p * (*d - dot);
                }
            }
            // SAFETY: as above: ds (m × w) and the k/q operands are read in bounds; dq rows
            // r0..r0+m of head h and this task's w key rows of dkh (its `kreg` region) are
            // written by this task only.
            unsafe {
                for (i, (col, j, n)) in bl.ranges().enumerate() {
                    // dQ_h[r0..] (+)= dS[:, col..] k[j..j + n]
                    matmul(
                        [m, hd, n],
                        dqp.add((bi * t + r0) * qw + h * hd),
                        qw as isize,
                        i > 0,
                        Mat(ds.as_ptr().add(col), w as isize, 1),
                        Mat(key(k, j), kw as isize, 1),
                        Parallelism::None,
                    );
                    // dK rows = dS[:, col..]ᵀ q_h[r0..]
                    matmul(
                        [n, hd, m],
                        dkp.add(kreg + col * hd),
                        hd as isize,
                        false,
                        Mat(ds.as_ptr().add(col), 1, w as isize),
                        qb,
                        Parallelism::None,
                    );
                }
            }
        });
        // Sum each kv group's heads and the blocks that saw each key into [b * t, kv_heads * hd].
        let gather = |part: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; b * t * kw];
            out.par_chunks_mut(kw).enumerate().for_each(|(r, row)| {
                let (bi, j) = (r / t, r % t);
                for (kvh, dst) in row.chunks_mut(hd).enumerate() {
                    for h in kvh * group..(kvh + 1) * group {
                        let base = AttnPlan::region(&plan.ksize, bi, h, nh);
                        for bl in &plan.rows[bi] {
                            let Some(c) = bl.column(j) else { continue };
                            let src = &part[(base + bl.koff + c) * hd..][..hd];
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            });
            out
        };
        let mut dk = gather(&dkh);
        let dv = gather(&dvh);
        rotate(&self.rope, &mut dq, qw, &plan.positions, true);
        rotate(&self.rope, &mut dk, kw, &plan.positions, true);
        (dq, dk, dv)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t) = (self.plan.b, self.plan.t);
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.hd());
        let (qw, kw) = (nh * hd, nkv * hd);
        let q = slice(s1, l1, self.name())?;
        let k = slice(s2, l2, self.name())?;
        let v = slice(s3, l3, self.name())?;
        if q.len() != b * t * qw || k.len() != b * t * kw || v.len() != b * t * kw {
            candle_core::bail!("fused-attention: q/k/v shapes do not match [{b}*{t}, heads*{hd}]");
        }
        let r = self.run(q.to_vec(), k.to_vec(), v);
        *self.saved.lock().expect("attention state") = Some(Arc::new(Saved {
            q: r.q,
            k: r.k,
            p: r.p,
        }));
        Ok((CpuStorage::F32(r.o), Shape::from((b * t, qw))))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = saved(&self.saved, "fused-attention")?;
        let (b, t) = (self.plan.b, self.plan.t);
        let (qw, kw) = (self.heads * self.hd(), self.kv_heads * self.hd());
        let g = g.contiguous()?;
        let (dq, dk, dv) = read(v, self.name(), |v| {
            read(&g, "fused-attention", |g| {
                Ok(self.backward(&saved.q, &saved.k, v, &saved.p, g))
            })
        })?;
        Ok((
            Some(cpu(dq, &Shape::from((b * t, qw)))?),
            Some(cpu(dk, &Shape::from((b * t, kw)))?),
            Some(cpu(dv, &Shape::from((b * t, kw)))?),
        ))
    }
}

/// Checks that a plan and head shapes suit the fused attention.
fn check_shapes(plan: &AttnPlan, heads: usize, kv_heads: usize, rope: &RopeTables) -> Result<()> {
    if !heads.is_multiple_of(kv_heads)
        || !rope.head_dim.is_multiple_of(2)
        || rope.cos.len() < (plan.max_position() + 1) * rope.head_dim
    {
        candle_core::bail!("fused-attention: unsupported shape");
    }
    Ok(())
}

/// Attention of `q` `[b * t, heads * hd]` over `k`, `v` `[b * t, kv_heads * hd]` laid out as
/// `plan` says (causal sequences, or shared prefixes with branches), with the rotary embedding
/// applied to q and k first; returns `[b * t, heads * hd]` (CPU, f32).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &Arc<AttnPlan>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    rope: &Arc<RopeTables>,
) -> Result<Tensor> {
    check_shapes(plan, heads, kv_heads, rope)?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttentionOp {
            plan: plan.clone(),
            heads,
            kv_heads,
            scale: scale as f32,
            rope: rope.clone(),
            saved: Mutex::new(None),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// whole blocks

/// Where a trainable weight's gradient accumulates during the backward pass of a fused block,
/// outside candle's gradient store: the block writes `dW` with one accumulating matrix
/// product instead of handing candle a tensor to add to a zeroed buffer. `TrainModel::backward`
/// moves what it holds into the gradient store.
#[derive(Default)]
pub struct GradSink(Mutex<Option<Vec<f32>>>);

impl GradSink {
    /// Takes the accumulated gradient, leaving the sink empty.
    pub fn take(&self) -> Option<Vec<f32>> {
        self.0.lock().expect("gradient sink").take()
    }

    /// `+= f(buffer)` on a buffer of `len` floats; `f` gets whether the buffer holds values.
    fn with(&self, len: usize, f: impl FnOnce(&mut [f32], bool)) {
        let mut guard = self.0.lock().expect("gradient sink");
        match guard.as_mut() {
            Some(buf) => f(buf, true),
            None => {
                let mut buf = vec![0f32; len];
                f(&mut buf, false);
                *guard = Some(buf);
            }
        }
    }
}

/// A weight of a fused block and, when it trains, its gradient sink.
#[derive(Clone)]
pub struct BlockWeight {
    pub value: Tensor,
    pub sink: Option<Arc<GradSink>>,
}

/// Contents of a contiguous CPU f32 tensor, copied (small weights: norms and biases).
fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `x[n, in] Wᵀ` for `W` `[out, in]` into a new buffer (not zeroed first: gemm writes it all).
fn forward_new(x: &[f32], w: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    // SAFETY: x is n × inp, w is out × inp (read as its transpose); gemm writes all n × out
    // elements of y's capacity (`accumulate` is off, so none is read) before the length is set.
    unsafe {
        forward_raw(x, w, y.as_mut_ptr(), n, inp, out, false);
        y.set_len(n * out);
    }
    y
}

/// `y[n, out] (+)= x[n, in] Wᵀ` for `W` `[out, in]`.
fn forward_mm(x: &[f32], w: &[f32], y: &mut [f32], n: usize, inp: usize, out: usize, acc: bool) {
    // SAFETY: slices sized n × inp, out × inp and n × out.
    unsafe { forward_raw(x, w, y.as_mut_ptr(), n, inp, out, acc) }
}

/// `y[n, out] (+)= x[n, in] Wᵀ` for `W` `[out, in]`, with `y` as a pointer (the matrix product
/// shared by [`forward_new`] and [`forward_mm`]).
///
/// # Safety
/// `x` holds n × inp values and `w` out × inp; `y` is valid for writing n × out values (and
/// reading them when `acc`) and aliases neither operand.
unsafe fn forward_raw(
    x: &[f32],
    w: &[f32],
    y: *mut f32,
    n: usize,
    inp: usize,
    out: usize,
    acc: bool,
) {
    // SAFETY: the caller's promise above is what `matmul` needs for these strides.
    unsafe {
        matmul(
            [n, out, inp],
            y,
            out as isize,
            acc,
            Mat(x.as_ptr(), inp as isize, 1),
            Mat(w.as_ptr(), 1, inp as isize),
            threads(),
        )
    }
}

/// `dx[n, in] (+)= g[n, out] W` for `W` `[out, in]`.
fn input_grad(g: &[f32], w: &[f32], dx: &mut [f32], n: usize, inp: usize, out: usize, acc: bool) {
    // SAFETY: slices sized n × out, out × inp and n × inp.
    unsafe {
        matmul(
            [n, inp, out],
            dx.as_mut_ptr(),
            inp as isize,
            acc,
            Mat(g.as_ptr(), out as isize, 1),
            Mat(w.as_ptr(), inp as isize, 1),
            threads(),
        )
    }
}

/// `dW[out, in] += gᵀ x` into the weight's sink, and `db[out] += Σ_rows g` into the bias's.
fn weight_grad(
    w: &BlockWeight,
    bias: Option<&BlockWeight>,
    g: &[f32],
    x: &[f32],
    n: usize,
    inp: usize,
    out: usize,
) {
    if let Some(sink) = &w.sink {
        sink.with(out * inp, |dw, acc| {
            // SAFETY: g is n × out (read transposed), x is n × inp, dw is out × inp.
            unsafe {
                matmul(
                    [out, inp, n],
                    dw.as_mut_ptr(),
                    inp as isize,
                    acc,
                    Mat(g.as_ptr(), 1, out as isize),
                    Mat(x.as_ptr(), inp as isize, 1),
                    threads(),
                )
            }
        });
    }
    if let Some(sink) = bias.and_then(|b| b.sink.as_ref()) {
        sink.with(out, |db, _| {
            for row in g.chunks(out) {
                for (d, &v) in db.iter_mut().zip(row) {
                    *d += v;
                }
            }
        });
    }
}

/// RMSNorm forward: `h = x · inv · w` row by row; returns `inv` per row.
fn norm_forward(x: &[f32], w: &[f32], eps: f32, h: &mut [f32]) -> Vec<f32> {
    let d = w.len();
    let mut inv = vec![0f32; x.len() / d];
    h.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(inv.par_iter_mut())
        .for_each(|((hr, xr), inv)| {
            *inv = inv_rms(xr, eps);
            for ((h, &x), &w) in hr.iter_mut().zip(xr).zip(w) {
                *h = x * *inv * w;
            }
        });
    inv
}

/// RMSNorm backward on rows of `x` with their `inv` (1 / rms): `dx += inv·(dh∘w) −
/// x·inv³/d·Σ(dh∘w∘x)`; returns `dw = Σ_rows dh∘x·inv`.
fn norm_grads(x: &[f32], inv: &[f32], w: &[f32], dh: &[f32], dx: &mut [f32]) -> Vec<f32> {
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dh.par_chunks(d)))
        .zip(inv.par_iter())
        .fold(
            || vec![0f32; d],
            |mut acc, ((dxr, (xr, gr)), &inv)| {
                let dot: f32 = vmath::dot3(xr, gr, w);
                let c = dot * inv * inv * inv / d as f32;
                for ((((o, &x), &g), &w), a) in
                    dxr.iter_mut().zip(xr).zip(gr).zip(w).zip(acc.iter_mut())
                {
                    *o += inv * g * w - x * c;
                    *a += g * x * inv;
                }
                acc
            },
        )
        .reduce(|| vec![0f32; d], add_into)
}

/// The backward pass of a pre-norm residual block `y = x + f(rms_norm(x))`: `inner` gets `x`
/// and `dy` and returns the gradient at the norm's output; `dx = dy` plus that gradient
/// carried back through the norm (whose weight gradient goes to its sink).
fn residual_norm_backward(
    op: &str,
    x: &Tensor,
    g: &Tensor,
    inv: &[f32],
    norm: &BlockWeight,
    inner: impl FnOnce(&[f32], &[f32]) -> Result<Vec<f32>>,
) -> Result<Option<Tensor>> {
    let g = g.contiguous()?;
    let dx = read(x, op, |x| {
        read(&g, op, |g| {
            let dh = inner(x, g)?;
            // Residual: dx starts as dy.
            let mut dx = g.to_vec();
            let nv = to_vec(&norm.value)?;
            norm_backward(x, inv, norm, &nv, &dh, &mut dx);
            Ok(dx)
        })
    })?;
    Ok(Some(cpu(dx, x.shape())?))
}

/// [`norm_grads`] with `dw` added to the norm weight's sink.
fn norm_backward(x: &[f32], inv: &[f32], w: &BlockWeight, wv: &[f32], dh: &[f32], dx: &mut [f32]) {
    let dw = norm_grads(x, inv, wv, dh, dx);
    if let Some(sink) = &w.sink {
        sink.with(dw.len(), |buf, _| {
            for (b, v) in buf.iter_mut().zip(&dw) {
                *b += v;
            }
        });
    }
}

fn add_bias(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len()).for_each(|row| {
        for (y, &b) in row.iter_mut().zip(b) {
            *y += b;
        }
    });
}

/// The weights of one layer's attention half.
#[derive(Clone)]
pub struct AttentionWeights {
    pub norm: BlockWeight,
    pub q: BlockWeight,
    pub k: BlockWeight,
    pub v: BlockWeight,
    pub o: BlockWeight,
    /// q/k/v biases (Qwen2).
    pub bias: Option<[BlockWeight; 3]>,
}

/// `x + o_proj(attention(rope(q, k), v))` on `rms_norm(x)`: a whole attention half of a
/// layer as one graph node.
struct AttentionBlock {
    w: AttentionWeights,
    plan: Arc<AttnPlan>,
    heads: usize,
    kv_heads: usize,
    eps: f32,
    rope: Arc<RopeTables>,
    saved: Mutex<Option<Arc<BlockSaved>>>,
}

/// Activations one block keeps for its backward pass.
struct BlockSaved {
    inv: Vec<f32>,
    h: Vec<f32>,
    /// Attention: rotated q, k, then v, probabilities, output. MLP: gate, up, activation.
    a: Vec<Vec<f32>>,
}

/// The gradient `Σ g_j W_j` of an input `[n, d]` that several projections `W_j` (`[out_j, d]`)
/// read, from their outputs' gradients `g_j`.
fn input_grads(parts: &[(&[f32], &Tensor, usize)], n: usize, d: usize) -> Result<Vec<f32>> {
    let mut dx = vec![0f32; n * d];
    for (j, (g, w, out)) in parts.iter().enumerate() {
        weight_slice(w, |m| {
            input_grad(g, m, &mut dx, n, d, *out, j > 0);
            Ok(())
        })?;
    }
    Ok(dx)
}

/// Backward of a block's last projection (`y = x · wᵀ`, no bias): accumulates the weight's
/// gradient from `g` (n × out) and `x` (n × inp), and returns the input's gradient (n × inp).
fn output_backward(
    w: &BlockWeight,
    g: &[f32],
    x: &[f32],
    n: usize,
    inp: usize,
    out: usize,
) -> Result<Vec<f32>> {
    weight_grad(w, None, g, x, n, inp, out);
    let mut dx = vec![0f32; n * inp];
    weight_slice(&w.value, |m| {
        input_grad(g, m, &mut dx, n, inp, out, false);
        Ok(())
    })?;
    Ok(dx)
}

fn weight_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    read(t, "fused block weight", f)
}

impl AttentionBlock {
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let hd = self.rope.head_dim;
        (
            self.plan.b * self.plan.t,
            self.heads * hd,
            self.kv_heads * hd,
            hd,
            self.heads * hd,
        )
    }

    fn core(&self) -> AttentionOp {
        AttentionOp {
            plan: self.plan.clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            scale: 1.0 / (self.rope.head_dim as f32).sqrt(),
            rope: self.rope.clone(),
            saved: Mutex::new(None),
        }
    }
}

impl CustomOp1 for AttentionBlock {
    fn name(&self) -> &'static str {
        "fused-attention-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (n, qw, kw, _, _) = self.dims();
        let d = x.len() / n;
        let w = &self.w;
        let norm = to_vec(&w.norm.value)?;
        let mut h = vec![0f32; n * d];
        let inv = norm_forward(x, &norm, self.eps, &mut h);
        let mut q = weight_slice(&w.q.value, |m| Ok(forward_new(&h, m, n, d, qw)))?;
        let mut k = weight_slice(&w.k.value, |m| Ok(forward_new(&h, m, n, d, kw)))?;
        let mut v = weight_slice(&w.v.value, |m| Ok(forward_new(&h, m, n, d, kw)))?;
        if let Some([bq, bk, bv]) = &w.bias {
            add_bias(&mut q, &to_vec(&bq.value)?);
            add_bias(&mut k, &to_vec(&bk.value)?);
            add_bias(&mut v, &to_vec(&bv.value)?);
        }
        let r = self.core().run(q, k, &v);
        let (qr, kr, p, o) = (r.q, r.k, r.p, r.o);
        let mut y = x.to_vec();
        weight_slice(&w.o.value, |wo| {
            forward_mm(&o, wo, &mut y, n, qw, d, true);
            Ok(())
        })?;
        *self.saved.lock().expect("block state") = Some(Arc::new(BlockSaved {
            inv,
            h,
            a: vec![qr, kr, v, p, o],
        }));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let saved = saved(&self.saved, self.name())?;
        let (n, qw, kw, _, _) = self.dims();
        let w = &self.w;
        residual_norm_backward(self.name(), x, g, &saved.inv, &w.norm, |x, g| {
            let d = x.len() / n;
            let [qr, kr, v, p, o] = &saved.a[..] else {
                candle_core::bail!("fused block: bad state");
            };
            let h = &saved.h;
            let d_o = output_backward(&w.o, g, o, n, qw, d)?;
            let (dq, dk, dv) = self.core().backward(qr, kr, v, p, &d_o);
            let (bq, bk, bv) = match &w.bias {
                Some([a, b, c]) => (Some(a), Some(b), Some(c)),
                None => (None, None, None),
            };
            weight_grad(&w.q, bq, &dq, h, n, d, qw);
            weight_grad(&w.k, bk, &dk, h, n, d, kw);
            weight_grad(&w.v, bv, &dv, h, n, d, kw);
            input_grads(
                &[
                    (&dq, &w.q.value, qw),
                    (&dk, &w.k.value, kw),
                    (&dv, &w.v.value, kw),
                ],
                n,
                d,
            )
        })
    }
}

/// The weights of one layer's MLP half.
#[derive(Clone)]
pub struct MlpWeights {
    pub norm: BlockWeight,
    pub gate: BlockWeight,
    pub up: BlockWeight,
    pub down: BlockWeight,
}

/// `x + down(silu(gate(h)) * up(h))` with `h = rms_norm(x)`, as one graph node.
struct MlpBlock {
    w: MlpWeights,
    inter: usize,
    eps: f32,
    saved: Mutex<Option<Arc<BlockSaved>>>,
}

impl CustomOp1 for MlpBlock {
    fn name(&self) -> &'static str {
        "fused-mlp-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (n, d) = l.shape().dims2()?;
        let i = self.inter;
        let w = &self.w;
        let norm = to_vec(&w.norm.value)?;
        let mut h = vec![0f32; n * d];
        let inv = norm_forward(x, &norm, self.eps, &mut h);
        let gate = weight_slice(&w.gate.value, |m| Ok(forward_new(&h, m, n, d, i)))?;
        let up = weight_slice(&w.up.value, |m| Ok(forward_new(&h, m, n, d, i)))?;
        let act = swiglu_forward(&gate, &up);
        let mut y = x.to_vec();
        weight_slice(&w.down.value, |m| {
            forward_mm(&act, m, &mut y, n, i, d, true);
            Ok(())
        })?;
        *self.saved.lock().expect("block state") = Some(Arc::new(BlockSaved {
            inv,
            h,
            a: vec![gate, up, act],
        }));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let saved = saved(&self.saved, self.name())?;
        let w = &self.w;
        let i = self.inter;
        let (n, d) = x.dims2()?;
        residual_norm_backward(self.name(), x, g, &saved.inv, &w.norm, |_, g| {
            let [gate, up, act] = &saved.a[..] else {
                candle_core::bail!("fused block: bad state");
            };
            let h = &saved.h;
            let d_act = output_backward(&w.down, g, act, n, i, d)?;
            let (da, du) = swiglu_backward(&d_act, gate, up);
            weight_grad(&w.gate, None, &da, h, n, d, i);
            weight_grad(&w.up, None, &du, h, n, d, i);
            input_grads(&[(&da, &w.gate.value, i), (&du, &w.up.value, i)], n, d)
        })
    }
}

/// `x + o_proj(attention(…))` of one layer on `x` `[b * t, hidden]` (CPU, f32, no LoRA).
#[allow(clippy::too_many_arguments)]
pub fn attention_block(
    x: &Tensor,
    w: &AttentionWeights,
    plan: &Arc<AttnPlan>,
    heads: usize,
    kv_heads: usize,
    eps: f64,
    rope: &Arc<RopeTables>,
) -> Result<Tensor> {
    check_shapes(plan, heads, kv_heads, rope)?;
    block(
        x,
        w.sink_count() > 0,
        AttentionBlock {
            w: w.clone(),
            plan: plan.clone(),
            heads,
            kv_heads,
            eps: eps as f32,
            rope: rope.clone(),
            saved: Mutex::new(None),
        },
    )
}

/// `x + mlp(rms_norm(x))` of one layer on `x` `[n, hidden]` (CPU, f32, no LoRA).
pub fn mlp_block(x: &Tensor, w: &MlpWeights, intermediate: usize, eps: f64) -> Result<Tensor> {
    let trains = [&w.norm, &w.gate, &w.up, &w.down]
        .iter()
        .any(|w| w.sink.is_some());
    block(
        x,
        trains,
        MlpBlock {
            w: w.clone(),
            inter: intermediate,
            eps: eps as f32,
            saved: Mutex::new(None),
        },
    )
}

impl AttentionWeights {
    fn sink_count(&self) -> usize {
        let mut all = vec![&self.norm, &self.q, &self.k, &self.v, &self.o];
        if let Some(b) = &self.bias {
            all.extend(b.iter());
        }
        all.iter().filter(|w| w.sink.is_some()).count()
    }
}

/// Applies a block; when its weights train but its input does not track gradients (the
/// lowest trained layer), the input is made a graph leaf so candle still calls the block's
/// backward pass, which fills the weights' sinks.
fn block<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, trains: bool, op: C) -> Result<Tensor> {
    let x = x.contiguous()?;
    if trains && !x.track_op() {
        let leaf = candle_core::Var::from_tensor(&x)?;
        return leaf.as_tensor().apply_op1(op);
    }
    x.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    fn rand(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
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

    /// Fused attention over several row blocks (the last one partial), two batch rows and
    /// grouped kv heads, against rotary + repeated kv + masked softmax from candle ops.
    #[test]
    fn attention_matches_its_composition_across_row_blocks() {
        let dev = Device::Cpu;
        let (b, t, nh, nkv, hd) = (2, 2 * ROWS + 37, 4, 2, 8);
        let mut seed = 7;
        let q = Var::from_vec(rand(b * t * nh * hd, &mut seed), (b * t, nh * hd), &dev).unwrap();
        let k = Var::from_vec(rand(b * t * nkv * hd, &mut seed), (b * t, nkv * hd), &dev).unwrap();
        let v = Var::from_vec(rand(b * t * nkv * hd, &mut seed), (b * t, nkv * hd), &dev).unwrap();
        let w = Tensor::from_vec(rand(b * t * nh * hd, &mut seed), (b * t, nh * hd), &dev).unwrap();
        let half = hd / 2;
        let (mut cos, mut sin) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        for p in 0..t {
            for i in 0..half {
                let a = p as f64 * 10_000f64.powf(-(2.0 * i as f64) / hd as f64);
                for j in [i, i + half] {
                    cos[p * hd + j] = a.cos() as f32;
                    sin[p * hd + j] = a.sin() as f32;
                }
            }
        }
        let rope = Arc::new(RopeTables {
            cos: cos.clone(),
            sin: sin.clone(),
            head_dim: hd,
        });
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &Arc::new(AttnPlan::causal(b, t)),
            nh,
            nkv,
            scale,
            &rope,
        )
        .unwrap();

        let cos = Tensor::from_vec(cos, (t, hd), &dev).unwrap();
        let sin = Tensor::from_vec(sin, (t, hd), &dev).unwrap();
        let heads = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let qh = crate::model::rope(&heads(q.as_tensor(), nh), &cos, &sin).unwrap();
        let kh = crate::model::rope(&heads(k.as_tensor(), nkv), &cos, &sin).unwrap();
        let vh = heads(v.as_tensor(), nkv);
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, nkv, nh / nkv, t, hd))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, nh, t, hd))
                .unwrap()
        };
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                mask[i * t + j] = -1e9;
            }
        }
        let mask = Tensor::from_vec(mask, (1, 1, t, t), &dev).unwrap();
        let scores = (qh.matmul(&repeat(&kh).t().unwrap()).unwrap() * scale).unwrap();
        let att = crate::model::softmax_last(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let plain = att
            .matmul(&repeat(&vh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b * t, nh * hd))
            .unwrap();
        assert!(
            max_diff(&fused, &plain) < 1e-5,
            "{}",
            max_diff(&fused, &plain)
        );
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (
                gf.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap(),
            );
            let big = c
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap()
                .max_all()
                .unwrap();
            let big = big.to_scalar::<f32>().unwrap();
            assert!(big > 0.0);
            assert!(
                max_diff(a, c) < 1e-4 * big.max(1.0),
                "d{name}: {}",
                max_diff(a, c)
            );
        }
    }
}
