//! Weight matrices and the matrix products of the CPU path.
//!
//! Quantized weights keep GGML's block formats (32 values per block) with the block scales
//! widened to `f32` at load time. Products with a quantized weight first quantize the
//! activations the way llama.cpp does (`Q8_1` for `Q4_1` weights, `Q8_0` for `Q8_0` weights,
//! scales rounded through `f16`), so every output element is the same integer dot product
//! llama.cpp computes, summed block by block in the same order.
//!
//! Each output element is computed by one thread from one weight row and one activation row,
//! independently of how many rows are in the batch: a prompt's greedy output is bit-identical
//! batched and alone.

// `unsafe` here: the x86 SIMD kernels (`simd`: intrinsics with raw-pointer loads, called only
// after run-time CPU feature checks) and the column-parallel writes of the products (through
// `SyncPtr`).
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use half::{bf16, f16};
use rayon::prelude::*;

use crate::blocks::{self, Family};
use crate::sync_ptr::SyncPtr;
use crate::tiled::{self, Q4_1x16, Q5x16, Q6x16, Q8_0x16};

pub const QK: usize = 32;

/// A `[rows, cols]` weight (rows = output features, cols = input features).
pub enum Weight {
    /// GGML Q4_1: value = d * q + m, q in 0..16. `qs` holds 16 bytes per block: byte j has
    /// element j in its low nibble and element j + 16 in its high nibble.
    Q4_1 {
        rows: usize,
        cols: usize,
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// GGML Q8_0: value = d * q.
    Q8_0 {
        rows: usize,
        cols: usize,
        qs: Vec<i8>,
        d: Vec<f32>,
    },
    F32 {
        rows: usize,
        cols: usize,
        w: Vec<f32>,
    },
    Bf16 {
        rows: usize,
        cols: usize,
        w: Vec<bf16>,
    },
    /// Q4_1 repacked sixteen rows at a time for the AVX-512 VNNI kernels.
    Q4_1x16(Q4_1x16),
    /// Q8_0 repacked sixteen rows at a time for the AVX-512 VNNI kernels.
    Q8_0x16(Q8_0x16),
    /// 5-bit codes (GGML `Q5_0`, `Q5_1`, `Q5_K`), sixteen rows at a time.
    Q5x16(Q5x16),
    /// 6-bit codes with a scale per 16 values (GGML `Q6_K`), sixteen rows at a time.
    Q6x16(Q6x16),
}

impl Weight {
    /// `(rows, cols)`: output and input dimensions.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Q4_1 { rows, cols, .. }
            | Weight::Q8_0 { rows, cols, .. }
            | Weight::F32 { rows, cols, .. }
            | Weight::Bf16 { rows, cols, .. } => (*rows, *cols),
            Weight::Q4_1x16(w) => (w.rows, w.cols),
            Weight::Q8_0x16(w) => (w.rows, w.cols),
            Weight::Q5x16(w) => (w.rows, w.cols),
            Weight::Q6x16(w) => (w.rows, w.cols),
        }
    }

    pub fn rows(&self) -> usize {
        self.shape().0
    }

    pub fn cols(&self) -> usize {
        self.shape().1
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Weight::Q4_1 { .. } | Weight::Q4_1x16(_) => "q4_1",
            Weight::Q8_0 { .. } | Weight::Q8_0x16(_) => "q8_0",
            Weight::F32 { .. } => "f32",
            Weight::Bf16 { .. } => "bf16",
            Weight::Q5x16(_) => "q5",
            Weight::Q6x16(_) => "q6",
        }
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        match self {
            Weight::Q4_1 { qs, d, m, .. } => qs.len() + 4 * (d.len() + m.len()),
            Weight::Q8_0 { qs, d, .. } => qs.len() + 4 * d.len(),
            Weight::F32 { w, .. } => 4 * w.len(),
            Weight::Bf16 { w, .. } => 2 * w.len(),
            Weight::Q4_1x16(w) => w.size_bytes(),
            Weight::Q8_0x16(w) => w.size_bytes(),
            Weight::Q5x16(w) => w.size_bytes(),
            Weight::Q6x16(w) => w.size_bytes(),
        }
    }

    /// From GGML Q4_1 blocks (`d: f16, m: f16, qs: [u8; 16]`, 20 bytes each), in the
    /// fastest layout for this CPU.
    pub fn from_q4_1_bytes(rows: usize, cols: usize, raw: &[u8]) -> anyhow::Result<Self> {
        Ok(Self::q4_1_rowwise(rows, cols, raw)?.into_fastest_layout())
    }

    /// The rows of `parts` stacked into one weight, when they share a format and a column
    /// count (every layout here is row-major or group-major, so their arrays append);
    /// otherwise the parts come back unchanged.
    pub fn concat_rows(parts: Vec<Weight>) -> Result<Weight, Vec<Weight>> {
        let same = parts.iter().all(|p| {
            std::mem::discriminant(p) == std::mem::discriminant(&parts[0])
                && p.cols() == parts[0].cols()
                && match (p, &parts[0]) {
                    (Weight::Q5x16(a), Weight::Q5x16(b)) => a.symmetric() == b.symmetric(),
                    _ => true,
                }
        });
        if parts.is_empty() || !same {
            return Err(parts);
        }
        let cols = parts[0].cols();
        let rows = parts.iter().map(Weight::rows).sum();
        // The repacked parts of one variant, stacked by that type's own `concat`.
        macro_rules! concat_repacked {
            ($variant:ident) => {
                Weight::$variant($variant::concat(
                    parts
                        .into_iter()
                        .map(|p| match p {
                            Weight::$variant(w) => w,
                            _ => unreachable!("checked above"),
                        })
                        .collect(),
                ))
            };
        }
        // Unquantized parts of one variant: their rows appended in order.
        macro_rules! concat_plain {
            ($variant:ident) => {{
                let mut w = Vec::new();
                for p in parts {
                    if let Weight::$variant { w: a, .. } = p {
                        w.extend(a);
                    }
                }
                Weight::$variant { rows, cols, w }
            }};
        }
        Ok(match &parts[0] {
            Weight::Q4_1x16(_) => concat_repacked!(Q4_1x16),
            Weight::Q8_0x16(_) => concat_repacked!(Q8_0x16),
            Weight::Q5x16(_) => concat_repacked!(Q5x16),
            Weight::Q6x16(_) => concat_repacked!(Q6x16),
            Weight::Q4_1 { .. } => {
                let (mut qs, mut d, mut m) = (Vec::new(), Vec::new(), Vec::new());
                for p in parts {
                    if let Weight::Q4_1 {
                        qs: a, d: b, m: c, ..
                    } = p
                    {
                        qs.extend(a);
                        d.extend(b);
                        m.extend(c);
                    }
                }
                Weight::Q4_1 {
                    rows,
                    cols,
                    qs,
                    d,
                    m,
                }
            }
            Weight::Q8_0 { .. } => {
                let (mut qs, mut d) = (Vec::new(), Vec::new());
                for p in parts {
                    if let Weight::Q8_0 { qs: a, d: b, .. } = p {
                        qs.extend(a);
                        d.extend(b);
                    }
                }
                Weight::Q8_0 { rows, cols, qs, d }
            }
            Weight::F32 { .. } => concat_plain!(F32),
            Weight::Bf16 { .. } => concat_plain!(Bf16),
        })
    }

    /// Repacks Q4_1 / Q8_0 weights for the tiled AVX-512 VNNI kernels where this CPU has
    /// them and the row count is a multiple of 16; anything else is returned as it is.
    pub fn into_fastest_layout(self) -> Self {
        if !tiled::available() || !self.rows().is_multiple_of(tiled::LANES) {
            return self;
        }
        match self {
            Weight::Q4_1 {
                rows,
                cols,
                qs,
                d,
                m,
            } => Weight::Q4_1x16(Q4_1x16::from_rowwise(rows, cols, &qs, &d, &m)),
            Weight::Q8_0 { rows, cols, qs, d } => {
                Weight::Q8_0x16(Q8_0x16::from_rowwise(rows, cols, &qs, &d))
            }
            other => other,
        }
    }

    /// From GGML Q4_1 blocks, in GGML's row-wise layout whatever the CPU.
    pub fn q4_1_rowwise(rows: usize, cols: usize, raw: &[u8]) -> anyhow::Result<Self> {
        let dtype = candle_core::quantized::GgmlDType::Q4_1;
        Self::rowwise(
            dtype,
            rows,
            cols,
            &mut blocks::from_slice(dtype, rows, cols, raw)?,
        )
    }

    /// From GGML blocks of a type [`blocks::family`] knows (`Q4_0`, `Q4_1`, `Q4_K`, `Q5_0`,
    /// `Q5_1`, `Q5_K`, `Q6_K`, `Q8_0`), read a few rows at a time with `read` and converted
    /// exactly: 4-bit codes into the `Q4_1` kernels' format, 8-bit codes into the `Q8_0`
    /// kernels' (both sixteen rows at a time where this CPU has AVX-512 VNNI, GGML's row-wise
    /// layout elsewhere), 5- and 6-bit codes into [`Q5x16`] / [`Q6x16`] (the AVX-512 kernels where
    /// the CPU has them, else the AVX2 ones, else their scalar reference). `None` when the format has no
    /// conversion, or is 5- or 6-bit and the rows do not come in sixteens.
    pub fn from_ggml(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        read: &mut blocks::ReadRows<'_>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(fam) = blocks::family(dtype) else {
            return Ok(None);
        };
        let tiled_rows = rows.is_multiple_of(tiled::LANES);
        let each =
            |f: &mut crate::blocks::RowSink<'_>| blocks::for_each_row(dtype, rows, cols, read, f);
        Ok(Some(match fam {
            Family::Q4 if tiled_rows && tiled::available() => {
                Weight::Q4_1x16(Q4_1x16::from_rows(rows, cols, each)?)
            }
            Family::Q8 if tiled_rows && tiled::available() => {
                Weight::Q8_0x16(Q8_0x16::from_rows(rows, cols, each)?)
            }
            Family::Q4 | Family::Q8 => Self::rowwise(dtype, rows, cols, read)?,
            _ if !tiled_rows => return Ok(None),
            Family::Q5 => {
                let symmetric = dtype == candle_core::quantized::GgmlDType::Q5_0;
                Weight::Q5x16(Q5x16::from_rows(rows, cols, symmetric, each)?)
            }
            Family::Q6 => Weight::Q6x16(Q6x16::from_rows(rows, cols, each)?),
        }))
    }

    /// 4- or 8-bit codes (`Q4_0`, `Q4_1`, `Q4_K`, `Q8_0`) in GGML's row-wise layout.
    fn rowwise(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        read: &mut blocks::ReadRows<'_>,
    ) -> anyhow::Result<Self> {
        let nb = cols / QK;
        match blocks::family(dtype) {
            Some(Family::Q4) => {
                let mut qs = vec![0u8; rows * nb * 16];
                let mut d = vec![0f32; rows * nb];
                let mut m = vec![0f32; rows * nb];
                blocks::for_each_row(dtype, rows, cols, read, &mut |r, q, dr, mr| {
                    for b in 0..nb {
                        let bi = r * nb + b;
                        for j in 0..16 {
                            qs[bi * 16 + j] = q[b * QK + j] | (q[b * QK + j + 16] << 4);
                        }
                    }
                    d[r * nb..(r + 1) * nb].copy_from_slice(dr);
                    m[r * nb..(r + 1) * nb].copy_from_slice(mr);
                })?;
                Ok(Weight::Q4_1 {
                    rows,
                    cols,
                    qs,
                    d,
                    m,
                })
            }
            Some(Family::Q8) => {
                let mut qs = vec![0i8; rows * cols];
                let mut d = vec![0f32; rows * nb];
                blocks::for_each_row(dtype, rows, cols, read, &mut |r, q, dr, _| {
                    for (o, &v) in qs[r * cols..(r + 1) * cols].iter_mut().zip(q) {
                        *o = v as i8;
                    }
                    d[r * nb..(r + 1) * nb].copy_from_slice(dr);
                })?;
                Ok(Weight::Q8_0 { rows, cols, qs, d })
            }
            _ => anyhow::bail!("{dtype:?} has no row-wise kernel format"),
        }
    }

    /// [`Weight::from_ggml`] over a whole tensor's bytes in memory.
    pub fn from_ggml_bytes(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> anyhow::Result<Option<Self>> {
        let mut read = blocks::from_slice(dtype, rows, cols, raw)?;
        Self::from_ggml(dtype, rows, cols, &mut read)
    }

    /// From GGML Q8_0 blocks (`d: f16, qs: [i8; 32]`, 34 bytes each).
    pub fn from_q8_0_bytes(rows: usize, cols: usize, raw: &[u8]) -> anyhow::Result<Self> {
        Ok(Self::q8_0_rowwise(rows, cols, raw)?.into_fastest_layout())
    }

    /// f32 weights quantized to Q8_0 as GGML does it (per 32 values: scale amax/127 stored as
    /// f16, values rounded to the nearest integer), row-wise.
    pub fn quantize_q8_0(rows: usize, cols: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), rows * cols);
        assert_eq!(cols % QK, 0);
        let nb = rows * cols / QK;
        let mut qs = Vec::with_capacity(nb * QK);
        let mut d = Vec::with_capacity(nb);
        for block in w.chunks_exact(QK) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dd = amax / 127.0;
            let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
            d.push(f16::from_f32(dd).to_f32());
            qs.extend(block.iter().map(|v| (v * id).round() as i8));
        }
        Weight::Q8_0 { rows, cols, qs, d }
    }

    /// From GGML Q8_0 blocks, in GGML's row-wise layout whatever the CPU.
    pub fn q8_0_rowwise(rows: usize, cols: usize, raw: &[u8]) -> anyhow::Result<Self> {
        let dtype = candle_core::quantized::GgmlDType::Q8_0;
        Self::rowwise(
            dtype,
            rows,
            cols,
            &mut blocks::from_slice(dtype, rows, cols, raw)?,
        )
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        debug_assert_eq!(out.len(), cols);
        match self {
            Weight::Q4_1 { qs, d, m, .. } => {
                let nb = cols / QK;
                for b in 0..nb {
                    let bi = r * nb + b;
                    let q = &qs[bi * 16..bi * 16 + 16];
                    for j in 0..16 {
                        out[b * QK + j] = d[bi] * (q[j] & 0x0f) as f32 + m[bi];
                        out[b * QK + j + 16] = d[bi] * (q[j] >> 4) as f32 + m[bi];
                    }
                }
            }
            Weight::Q8_0 { qs, d, .. } => {
                let nb = cols / QK;
                for b in 0..nb {
                    let bi = r * nb + b;
                    for j in 0..QK {
                        out[b * QK + j] = d[bi] * qs[bi * QK + j] as f32;
                    }
                }
            }
            Weight::Q4_1x16(w) => w.row_f32(r, out),
            Weight::Q8_0x16(w) => w.row_f32(r, out),
            Weight::Q5x16(w) => w.row_f32(r, out),
            Weight::Q6x16(w) => w.row_f32(r, out),
            Weight::F32 { w, .. } => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            Weight::Bf16 { w, .. } => {
                for (o, x) in out.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                    *o = x.to_f32();
                }
            }
        }
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows(), self.cols());
        assert_eq!(x.len(), m * k, "matmul input shape");
        assert_eq!(out.len(), m * n, "matmul output shape");
        match self {
            Weight::Q4_1 { qs, d, m: mins, .. } => {
                let a = ActQ8::quantize(x, m, k, true);
                let nb = k / QK;
                let one = |c: usize, r: usize| {
                    let w = c * nb;
                    dot_q4_1_q8_1(
                        &qs[w * 16..(w + nb) * 16],
                        &d[w..w + nb],
                        &mins[w..w + nb],
                        a.row(r),
                    )
                };
                let four = |c: usize, r: usize| {
                    let w = c * nb;
                    dot4_q4_1_q8_1(
                        &qs[w * 16..(w + nb) * 16],
                        &d[w..w + nb],
                        &mins[w..w + nb],
                        [a.row(r), a.row(r + 1), a.row(r + 2), a.row(r + 3)],
                    )
                };
                par_columns4(out, m, n, k, &one, Some(&four));
            }
            Weight::Q8_0 { qs, d, .. } => {
                let a = ActQ8::quantize(x, m, k, false);
                let nb = k / QK;
                let one = |c: usize, r: usize| {
                    let w = c * nb;
                    dot_q8_0_q8_0(&qs[w * QK..(w + nb) * QK], &d[w..w + nb], a.row(r))
                };
                let four = |c: usize, r: usize| {
                    let w = c * nb;
                    dot4_q8_0_q8_0(
                        &qs[w * QK..(w + nb) * QK],
                        &d[w..w + nb],
                        [a.row(r), a.row(r + 1), a.row(r + 2), a.row(r + 3)],
                    )
                };
                par_columns4(out, m, n, k, &one, Some(&four));
            }
            Weight::Q4_1x16(w) => w.matmul(&ActQ8::quantize(x, m, k, true), m, out),
            Weight::Q8_0x16(w) => w.matmul(&ActQ8::quantize(x, m, k, false), m, out),
            Weight::Q5x16(w) => w.matmul(&ActQ8::quantize(x, m, k, true), m, out),
            Weight::Q6x16(w) => w.matmul(&ActQ8::quantize(x, m, k, false), m, out),
            Weight::F32 { w, .. } => {
                par_columns(out, m, n, k, |c, r| {
                    dot_f32(&w[c * k..(c + 1) * k], &x[r * k..(r + 1) * k])
                });
            }
            Weight::Bf16 { w, .. } => {
                par_columns(out, m, n, k, |c, r| {
                    dot_bf16(&w[c * k..(c + 1) * k], &x[r * k..(r + 1) * k])
                });
            }
        }
    }
}

/// Quantized activations, one row per input row.
pub struct ActQ8 {
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    /// `d * sum(qs)` per block (Q8_1 only).
    s: Vec<f32>,
    /// `sum(qs)` per block.
    qsum: Vec<i32>,
    /// `sum(qs)` over the first 16 values of each block.
    qlo: Vec<i32>,
}

pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub qsum: &'a [i32],
    pub qlo: &'a [i32],
}

/// One row's slices as `ActQ8::quantize` zips them: input, codes, scales, then sums, integer
/// sums and first-half integer sums.
type RowParts<'a> = (
    ((&'a [f32], &'a mut [i8]), &'a mut [f32]),
    (&'a mut [f32], (&'a mut [i32], &'a mut [i32])),
);

impl ActQ8 {
    pub fn quantize(x: &[f32], m: usize, k: usize, with_sums: bool) -> Self {
        let nb = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = vec![0f32; m * nb];
        let mut s = vec![0f32; if with_sums { m * nb } else { 0 }];
        let mut qsum = vec![0i32; m * nb];
        let mut qlo = vec![0i32; m * nb];
        let row = |(((xr, qr), dr), (sr, (ir, lr))): RowParts<'_>| {
            for (b, (xb, qb)) in xr.chunks_exact(QK).zip(qr.chunks_exact_mut(QK)).enumerate() {
                let (dd, sum) = quantize_block(xb, qb);
                dr[b] = f16::from_f32(dd).to_f32();
                ir[b] = sum;
                lr[b] = qb[..QK / 2].iter().map(|&v| v as i32).sum();
                if with_sums {
                    sr[b] = f16::from_f32(sum as f32 * dd).to_f32();
                }
            }
        };
        let s_rows: Vec<&mut [f32]> = if with_sums {
            s.chunks_mut(nb).collect()
        } else {
            (0..m).map(|_| &mut [][..]).collect()
        };
        let work = x
            .chunks_exact(k)
            .zip(qs.chunks_exact_mut(k))
            .zip(d.chunks_exact_mut(nb))
            .zip(
                s_rows
                    .into_iter()
                    .zip(qsum.chunks_exact_mut(nb).zip(qlo.chunks_exact_mut(nb))),
            );
        // Quantizing is ~1/500 of the product that follows; split it only when it is large.
        if m * k >= 1 << 15 {
            work.par_bridge().for_each(row);
        } else {
            work.for_each(row);
        }
        ActQ8 {
            nb,
            qs,
            d,
            s,
            qsum,
            qlo,
        }
    }

    #[inline]
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.nb;
        ActRow {
            qs: &self.qs[r * nb * QK..(r + 1) * nb * QK],
            d: &self.d[r * nb..(r + 1) * nb],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[r * nb..(r + 1) * nb]
            },
            qsum: &self.qsum[r * nb..(r + 1) * nb],
            qlo: &self.qlo[r * nb..(r + 1) * nb],
        }
    }
}

/// One block as llama.cpp's x86 quantizer does it: scale by 127/amax, round half to even.
/// Returns the unrounded scale and the sum of the quantized values.
#[inline]
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    {
        if tiled::available() {
            // SAFETY: AVX-512 F/BW present (checked); both blocks hold QK values.
            return unsafe { simd::quantize_block_avx512(xb, qb) };
        }
    }
    quantize_block_scalar(xb, qb)
}

fn quantize_block_scalar(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let mut amax = [0f32; 8];
    for c in xb.chunks_exact(8) {
        for i in 0..8 {
            amax[i] = amax[i].max(c[i].abs());
        }
    }
    let amax = amax.iter().fold(0f32, |a, &v| a.max(v));
    let dd = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qb.iter_mut().zip(xb) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (dd, sum)
}

/// Columns per task: a weight chunk stays in cache while every input row uses it.
const COLS_PER_TASK: usize = 32;

/// `out[r * n + c] = f(c, r)` for every row and column, split by columns across threads.
fn par_columns<F>(out: &mut [f32], m: usize, n: usize, k: usize, f: F)
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    par_columns4(
        out,
        m,
        n,
        k,
        &f,
        None::<&fn(usize, usize) -> Option<[f32; 4]>>,
    );
}

/// As [`par_columns`], with `f4(c, r)` computing rows r..r+4 of column c at once when it can
/// (`None`: it cannot, use `f`). Both must give the same bits for a row.
fn par_columns4<F, G>(out: &mut [f32], m: usize, n: usize, k: usize, f: &F, f4: Option<&G>)
where
    F: Fn(usize, usize) -> f32 + Sync,
    G: Fn(usize, usize) -> Option<[f32; 4]> + Sync,
{
    let ptr = SyncPtr::new(out);
    let tasks = n.div_ceil(COLS_PER_TASK);
    let run = |t: usize| {
        let p = ptr;
        let c0 = t * COLS_PER_TASK;
        let c1 = (c0 + COLS_PER_TASK).min(n);
        let mut r = 0;
        if let Some(f4) = f4 {
            while r + 4 <= m {
                for c in c0..c1 {
                    match f4(c, r) {
                        Some(v) => {
                            for (i, x) in v.iter().enumerate() {
                                // SAFETY: r + i < m and c < n: inside `out` (len m * n, as
                                // `Weight::matmul` asserts); no other task writes column c.
                                unsafe { p.write((r + i) * n + c, *x) };
                            }
                        }
                        None => {
                            for i in 0..4 {
                                // SAFETY: r + i < m and c < n: inside `out` (len m * n); no
                                // other task writes column c.
                                unsafe { p.write((r + i) * n + c, f(c, r + i)) };
                            }
                        }
                    }
                }
                r += 4;
            }
        }
        for r in r..m {
            for c in c0..c1 {
                let v = f(c, r);
                // SAFETY: r < m and c < n, so the index is inside `out` (len m * n), and no
                // other task writes column c.
                unsafe { p.write(r * n + c, v) };
            }
        }
    };
    // Below ~32k multiply-adds a fork-join costs more than it saves.
    if m * n * k < 32_768 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Four activation rows against one weight row, with the same arithmetic per row as
/// [`dot_q4_1_q8_1`] (so the same bits); `None` where no 4-row kernel applies.
pub fn dot4_q4_1_q8_1(qs: &[u8], d: &[f32], m: &[f32], a: [ActRow<'_>; 4]) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx_vnni() {
            // SAFETY: the CPU supports AVX2, FMA and AVX-VNNI (checked at run time).
            return Some(unsafe { simd::dot4_q4_1_q8_1_vnni(qs, d, m, &a) });
        }
    }
    let _ = (qs, d, m, a);
    None
}

/// Four activation rows against one Q8_0 weight row (same bits as [`dot_q8_0_q8_0`]).
pub fn dot4_q8_0_q8_0(qs: &[i8], d: &[f32], a: [ActRow<'_>; 4]) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx_vnni() {
            // SAFETY: the CPU supports AVX2, FMA and AVX-VNNI (checked at run time).
            return Some(unsafe { simd::dot4_q8_0_q8_0_vnni(qs, d, &a) });
        }
    }
    let _ = (qs, d, a);
    None
}

pub fn dot_q4_1_q8_1(qs: &[u8], d: &[f32], m: &[f32], a: ActRow<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx_vnni() {
            // SAFETY: the CPU supports AVX2, FMA and AVX-VNNI (checked at run time).
            return unsafe { simd::dot_q4_1_q8_1_vnni(qs, d, m, &a) };
        }
        if simd::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { simd::dot_q4_1_q8_1_avx2(qs, d, m, &a) };
        }
    }
    dot_q4_1_q8_1_scalar(qs, d, m, &a)
}

pub fn dot_q4_1_q8_1_scalar(qs: &[u8], d: &[f32], m: &[f32], a: &ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    let mut summs = 0f32;
    for b in 0..d.len() {
        let q = &qs[b * 16..b * 16 + 16];
        let y = &a.qs[b * QK..b * QK + QK];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (q[j] & 0x0f) as i32 * y[j] as i32;
            isum += (q[j] >> 4) as i32 * y[j + 16] as i32;
        }
        acc += d[b] * a.d[b] * isum as f32;
        summs += m[b] * a.s[b];
    }
    acc + summs
}

pub fn dot_q8_0_q8_0(qs: &[i8], d: &[f32], a: ActRow<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx_vnni() {
            // SAFETY: the CPU supports AVX2, FMA and AVX-VNNI (checked at run time).
            return unsafe { simd::dot_q8_0_q8_0_vnni(qs, d, &a) };
        }
        if simd::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { simd::dot_q8_0_q8_0_avx2(qs, d, &a) };
        }
    }
    dot_q8_0_q8_0_scalar(qs, d, &a)
}

pub fn dot_q8_0_q8_0_scalar(qs: &[i8], d: &[f32], a: &ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for b in 0..d.len() {
        let x = &qs[b * QK..b * QK + QK];
        let y = &a.qs[b * QK..b * QK + QK];
        let isum: i32 = x.iter().zip(y).map(|(&p, &q)| p as i32 * q as i32).sum();
        acc += d[b] * a.d[b] * isum as f32;
    }
    acc
}

/// f32 dot product with eight independent accumulators (vectorizes).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let cw = w.chunks_exact(8);
    let cx = x.chunks_exact(8);
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] = a[i].to_f32().mul_add(b[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += a.to_f32() * b;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{ActRow, QK};
    use std::arch::x86_64::*;

    pub fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// `ALIGNER_NO_VNNI=1` forces the AVX2 kernels (for comparing the two).
    pub fn has_avx_vnni() -> bool {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            has_avx2()
                && std::is_x86_feature_detected!("avxvnni")
                && std::env::var_os("ALIGNER_NO_VNNI").is_none()
        })
    }

    /// [`super::quantize_block_scalar`] sixteen lanes at a time (same bits: the same
    /// multiply, round half to even by the default rounding mode, exact integer sum).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_block_avx512(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
        assert!(xb.len() >= QK && qb.len() >= QK);
        // SAFETY: 32 values read and written, inside the lengths asserted above.
        unsafe {
            let x0 = _mm512_loadu_ps(xb.as_ptr());
            let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            let dd = amax / 127.0;
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
            _mm_storeu_si128(qb.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(
                qb.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            (dd, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))
        }
    }

    /// A Q4_1 × Q8_1 row dot product; `$step` turns the unsigned weight nibbles `$ux` and the
    /// signed activations `$sy` (32 bytes each) into eight f32 partial sums.
    macro_rules! dot_q4_1_q8_1_kernel {
        (
            $(#[$meta:meta])*
            $name:ident, |$ux:ident, $sy:ident| $step:expr
        ) => {
            $(#[$meta])*
            pub unsafe fn $name(qs: &[u8], d: &[f32], m: &[f32], a: &ActRow<'_>) -> f32 {
                let nb = d.len();
                assert!(qs.len() >= nb * 16 && a.qs.len() >= nb * QK && a.d.len() >= nb);
                assert!(m.len() >= nb && a.s.len() >= nb);
                let mut acc = _mm256_setzero_ps();
                let mut summs = 0f32;
                let low = _mm256_set1_epi8(0x0f);
                let (wq, wd, wm) = (qs.as_ptr(), d.as_ptr(), m.as_ptr());
                let (aq, ad, asum) = (a.qs.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
                for b in 0..nb {
                    // SAFETY: every pointer is read at block b < nb, inside the lengths
                    // asserted above; loads are unaligned.
                    unsafe {
                        summs += *wm.add(b) * *asum.add(b);
                        let packed = _mm_loadu_si128(wq.add(b * 16) as *const __m128i);
                        let $sy = _mm256_loadu_si256(aq.add(b * QK) as *const __m256i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                        let $ux = _mm256_and_si256(both, low);
                        let xy = $step;
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(*wd.add(b) * *ad.add(b)), xy, acc);
                    }
                }
                hsum(acc) + summs
            }
        };
    }

    dot_q4_1_q8_1_kernel!(
        /// # Safety
        /// The CPU must support AVX2, FMA and AVX-VNNI; slices hold `d.len()` blocks.
        #[target_feature(enable = "avx2,fma,avxvnni")]
        dot_q4_1_q8_1_vnni,
        |ux, sy| _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ux, sy))
    );

    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-VNNI; slices hold `d.len()` blocks.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot4_q4_1_q8_1_vnni(
        qs: &[u8],
        d: &[f32],
        m: &[f32],
        a: &[ActRow<'_>; 4],
    ) -> [f32; 4] {
        let nb = d.len();
        assert!(qs.len() >= nb * 16 && m.len() >= nb);
        for r in a {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb && r.s.len() >= nb);
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        let low = _mm256_set1_epi8(0x0f);
        let (wq, wd, wm) = (qs.as_ptr(), d.as_ptr(), m.as_ptr());
        let aq = a.each_ref().map(|r| r.qs.as_ptr());
        let ad = a.each_ref().map(|r| r.d.as_ptr());
        let asum = a.each_ref().map(|r| r.s.as_ptr());
        for b in 0..nb {
            // SAFETY: every pointer is read at block b < nb, inside the lengths asserted
            // above; loads are unaligned.
            unsafe {
                let packed = _mm_loadu_si128(wq.add(b * 16) as *const __m128i);
                let qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
                let (db, mb) = (*wd.add(b), *wm.add(b));
                for i in 0..4 {
                    summs[i] += mb * *asum[i].add(b);
                    let qy = _mm256_loadu_si256(aq[i].add(b * QK) as *const __m256i);
                    let xy =
                        _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), qx, qy));
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(db * *ad[i].add(b)), xy, acc[i]);
                }
            }
        }
        [
            hsum(acc[0]) + summs[0],
            hsum(acc[1]) + summs[1],
            hsum(acc[2]) + summs[2],
            hsum(acc[3]) + summs[3],
        ]
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-VNNI; slices hold `d.len()` blocks.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot4_q8_0_q8_0_vnni(qs: &[i8], d: &[f32], a: &[ActRow<'_>; 4]) -> [f32; 4] {
        let nb = d.len();
        assert!(qs.len() >= nb * QK);
        for r in a {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb);
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        let (wq, wd) = (qs.as_ptr(), d.as_ptr());
        let aq = a.each_ref().map(|r| r.qs.as_ptr());
        let ad = a.each_ref().map(|r| r.d.as_ptr());
        for b in 0..nb {
            // SAFETY: every pointer is read at block b < nb, inside the lengths asserted
            // above; loads are unaligned.
            unsafe {
                let qx = _mm256_loadu_si256(wq.add(b * QK) as *const __m256i);
                let ax = _mm256_sign_epi8(qx, qx);
                let db = *wd.add(b);
                for i in 0..4 {
                    let qy = _mm256_loadu_si256(aq[i].add(b * QK) as *const __m256i);
                    let sy = _mm256_sign_epi8(qy, qx);
                    let xy =
                        _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy));
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(db * *ad[i].add(b)), xy, acc[i]);
                }
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    /// Emits the `Q8_0 · Q8_0` row dot product `$name` with the attributes `$meta` (its
    /// `#[target_feature]` among them; a macro, not a generic, for that reason). Per block:
    /// `|x|` (unsigned) times `y` with the sign of `x`, reduced to eight `f32` partial sums by
    /// `$step` (which names those two vectors `$ax` and `$sy`), then scaled by `d[b] * a.d[b]`
    /// into a fused accumulator.
    macro_rules! dot_q8_0_q8_0_kernel {
        (
            $(#[$meta:meta])*
            $name:ident, |$ax:ident, $sy:ident| $step:expr
        ) => {
            $(#[$meta])*
            // `b` indexes the scales and both code arrays at once.
            #[allow(clippy::needless_range_loop)]
            pub unsafe fn $name(qs: &[i8], d: &[f32], a: &ActRow<'_>) -> f32 {
                let nb = d.len();
                assert!(qs.len() >= nb * QK && a.qs.len() >= nb * QK && a.d.len() >= nb);
                let mut acc = _mm256_setzero_ps();
                for b in 0..nb {
                    // SAFETY: bounds asserted above; unaligned loads.
                    let (qx, qy) = unsafe {
                        (
                            _mm256_loadu_si256(qs.as_ptr().add(b * QK) as *const __m256i),
                            _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i),
                        )
                    };
                    let $ax = _mm256_sign_epi8(qx, qx);
                    let $sy = _mm256_sign_epi8(qy, qx);
                    let xy = $step;
                    let scale = _mm256_set1_ps(d[b] * a.d[b]);
                    acc = _mm256_fmadd_ps(scale, xy, acc);
                }
                hsum(acc)
            }
        };
    }

    dot_q8_0_q8_0_kernel!(
        /// # Safety
        /// The CPU must support AVX2, FMA and AVX-VNNI; slices hold `d.len()` blocks.
        #[target_feature(enable = "avx2,fma,avxvnni")]
        dot_q8_0_q8_0_vnni,
        |ax, sy| _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy))
    );

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Unsigned bytes (0..16) times signed bytes, summed in pairs, then in fours, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_sum_us8(ux: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ux, sy);
        let ones = _mm256_set1_epi16(1);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, ones))
    }

    dot_q4_1_q8_1_kernel!(
        /// # Safety
        /// The CPU must support AVX2 and FMA; slices hold `d.len()` blocks.
        #[target_feature(enable = "avx2,fma")]
        dot_q4_1_q8_1_avx2,
        |ux, sy| mul_sum_us8(ux, sy)
    );

    dot_q8_0_q8_0_kernel!(
        /// # Safety
        /// The CPU must support AVX2 and FMA; slices hold `d.len()` blocks.
        #[target_feature(enable = "avx2,fma")]
        dot_q8_0_q8_0_avx2,
        |ax, sy| mul_sum_us8(ax, sy)
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    pub(crate) fn random_q4_1(rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let mut raw = Vec::new();
        for _ in 0..rows * cols / QK {
            raw.extend(f16::from_f32(lcg(seed).abs() * 0.1).to_le_bytes());
            raw.extend(f16::from_f32(lcg(seed) * 0.5).to_le_bytes());
            for _ in 0..16 {
                raw.push(((lcg(seed) + 1.0) * 127.9) as u8);
            }
        }
        raw
    }

    #[test]
    fn simd_and_scalar_kernels_agree_and_match_dequantized_product() {
        let mut seed = 7u64;
        let (rows, cols, m) = (70, 96, 5);
        let w = Weight::q4_1_rowwise(rows, cols, &random_q4_1(rows, cols, &mut seed)).unwrap();
        let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
        let mut out = vec![0f32; m * rows];
        w.matmul(&x, m, &mut out);
        let a = ActQ8::quantize(&x, m, cols, true);
        let mut dense = vec![0f32; cols];
        for r in 0..m {
            for c in 0..rows {
                let Weight::Q4_1 { qs, d, m: mins, .. } = &w else {
                    unreachable!()
                };
                let nb = cols / QK;
                let s = dot_q4_1_q8_1_scalar(
                    &qs[c * nb * 16..(c + 1) * nb * 16],
                    &d[c * nb..(c + 1) * nb],
                    &mins[c * nb..(c + 1) * nb],
                    &a.row(r),
                );
                let v = out[r * rows + c];
                assert!((s - v).abs() <= 1e-4 * (1.0 + s.abs()), "{s} vs {v}");
                w.row_f32(c, &mut dense);
                let exact = dot_f32(&dense, &x[r * cols..(r + 1) * cols]);
                assert!(
                    (exact - v).abs() < 0.05 * (1.0 + exact.abs()),
                    "{exact} vs {v}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_simd_kernel_gives_the_scalar_result() {
        let mut seed = 5u64;
        let (rows, cols) = (8, 256);
        let w = Weight::q4_1_rowwise(rows, cols, &random_q4_1(rows, cols, &mut seed)).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
        let a1 = ActQ8::quantize(&x, 1, cols, true);
        let Weight::Q4_1 { qs, d, m, .. } = &w else {
            unreachable!()
        };
        let nb = cols / QK;
        let want = dot_q4_1_q8_1_scalar(&qs[..nb * 16], &d[..nb], &m[..nb], &a1.row(0));
        if simd::has_avx2() {
            // SAFETY: `has_avx2` just found AVX2 and FMA; the slices hold nb blocks.
            let got =
                unsafe { simd::dot_q4_1_q8_1_avx2(&qs[..nb * 16], &d[..nb], &m[..nb], &a1.row(0)) };
            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
        if simd::has_avx_vnni() {
            // SAFETY: `has_avx_vnni` just found AVX2, FMA and AVX-VNNI; the slices hold nb
            // blocks.
            let got =
                unsafe { simd::dot_q4_1_q8_1_vnni(&qs[..nb * 16], &d[..nb], &m[..nb], &a1.row(0)) };
            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
        let q8: Vec<i8> = (0..cols).map(|_| (lcg(&mut seed) * 127.0) as i8).collect();
        let d8: Vec<f32> = (0..nb).map(|_| lcg(&mut seed).abs()).collect();
        let a0 = ActQ8::quantize(&x, 1, cols, false);
        let want = dot_q8_0_q8_0_scalar(&q8, &d8, &a0.row(0));
        if simd::has_avx2() {
            // SAFETY: `has_avx2` just found AVX2 and FMA; q8, d8 and the row hold nb blocks.
            let got = unsafe { simd::dot_q8_0_q8_0_avx2(&q8, &d8, &a0.row(0)) };
            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
        if simd::has_avx_vnni() {
            // SAFETY: `has_avx_vnni` just found AVX2, FMA and AVX-VNNI; q8, d8 and the row
            // hold nb blocks.
            let got = unsafe { simd::dot_q8_0_q8_0_vnni(&q8, &d8, &a0.row(0)) };
            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn vector_quantizer_gives_the_scalar_bits() {
        let mut seed = 13u64;
        let mut x: Vec<f32> = (0..QK * 64).map(|_| lcg(&mut seed) * 3.0).collect();
        // Exact halves (ties), zeros and an all-zero block.
        for (i, v) in x.iter_mut().take(QK).enumerate() {
            *v = i as f32 - 15.5;
        }
        x[QK..2 * QK].iter_mut().for_each(|v| *v = 0.0);
        for (xb, _) in x.chunks_exact(QK).zip(0..) {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let want = quantize_block_scalar(xb, &mut a);
            let got = quantize_block(xb, &mut b);
            assert_eq!((want, a), (got, b));
        }
    }

    #[test]
    fn q8_0_product_matches_dequantized_product() {
        let mut seed = 11u64;
        let (rows, cols, m) = (40, 64, 3);
        let mut raw = Vec::new();
        for _ in 0..rows * cols / QK {
            raw.extend(f16::from_f32(0.01 + lcg(&mut seed).abs() * 0.02).to_le_bytes());
            for _ in 0..QK {
                raw.push((lcg(&mut seed) * 127.0) as i8 as u8);
            }
        }
        let w = Weight::from_q8_0_bytes(rows, cols, &raw).unwrap();
        let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
        let mut out = vec![0f32; m * rows];
        w.matmul(&x, m, &mut out);
        let mut dense = vec![0f32; cols];
        for r in 0..m {
            for c in 0..rows {
                w.row_f32(c, &mut dense);
                let xr = &x[r * cols..(r + 1) * cols];
                let exact = dot_f32(&dense, xr);
                // Activation quantization errs by at most half a step per value.
                let bound: f32 = dense
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| (a * b).abs())
                    .sum::<f32>()
                    / 100.0;
                let v = out[r * rows + c];
                assert!((exact - v).abs() < bound + 1e-4, "{exact} vs {v}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let mut seed = 3u64;
        let (rows, cols) = (64, 128);
        let raw = random_q4_1(rows, cols, &mut seed);
        let fastest = Weight::from_q4_1_bytes(rows, cols, &raw).unwrap();
        let rowwise = Weight::q4_1_rowwise(rows, cols, &raw).unwrap();
        let x: Vec<f32> = (0..16 * cols).map(|_| lcg(&mut seed)).collect();
        for w in [fastest, rowwise] {
            // 16 rows: four tiles of four; 7 rows: a tile of four and one of three.
            for m in [16usize, 7] {
                let mut batch = vec![0f32; m * rows];
                w.matmul(&x[..m * cols], m, &mut batch);
                for r in 0..m {
                    let mut one = vec![0f32; rows];
                    w.matmul(&x[r * cols..(r + 1) * cols], 1, &mut one);
                    assert_eq!(one, batch[r * rows..(r + 1) * rows], "{} row {r}", w.kind());
                }
            }
        }
    }
}
