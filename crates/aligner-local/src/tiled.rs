//! Quantized weights repacked sixteen rows at a time, for AVX-512 VNNI.
//!
//! In GGML's layout each weight row is a run of blocks, and a product multiplies one weight
//! row by one activation row: every block then costs a horizontal reduction and scalar scale
//! work. Here the blocks of sixteen consecutive rows are interleaved four bytes at a time, so
//! one 512-bit register holds four consecutive values of each of the sixteen rows and one
//! `vpdpbusd` against four broadcast activation bytes advances sixteen dot products at once.
//! The scales of the sixteen rows sit next to each other and are applied with one vector
//! multiply-add per block. Nothing is reduced across lanes: lane `l` of the accumulator is
//! output column `16 g + l`.
//!
//! Every output element is computed the same way whatever the batch size (block by block:
//! the exact integer dot product, then `acc = (dw * da) * isum + acc` fused, the `Q4_1` minimum
//! term in its own fused accumulator, the two added at the end), so a row's result has the
//! same bits alone and in a batch. [`scalar`] is the same arithmetic one element at a time,
//! the reference the vector kernels are tested against.
//!
//! `Q8_0` weights are stored with 128 added (as unsigned bytes, which `vpdpbusd` needs); the
//! product subtracts `128 * sum(a)` per block, which keeps the integer sum exact.

// `unsafe` here: the AVX-512 kernels (`avx512`) and the AVX2 ones (`avx2`: intrinsics with raw-pointer loads and stores,
// called only after the run-time CPU feature check) and the per-group output pointers they
// store through (from `SyncPtr`).
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use rayon::prelude::*;

use crate::quant::{ActQ8, ActRow, QK};
use crate::sync_ptr::SyncPtr;

/// Weight rows per group.
pub const LANES: usize = 16;

/// Whether this CPU runs the tiled kernels (`ALIGNER_NO_AVX512=1` turns them off, for
/// comparing against the row-wise kernels).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::env::var_os("ALIGNER_NO_AVX512").is_none()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `Q4_1` weights in groups of sixteen rows. Per (group, block): 256 bytes of nibbles (four
/// 64-byte chunks; chunk `c`, lane `l` holds packed bytes `4c..4c+4` of row `16 g + l`, whose
/// low nibbles are values `4c..4c+4` and high nibbles values `16+4c..16+4c+4`), then the
/// sixteen scales `d` and minimums `m` in their own arrays.
pub struct Q4_1x16 {
    pub rows: usize,
    pub cols: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// `Q8_0` weights in groups of sixteen rows: per (group, block) eight 64-byte chunks (chunk
/// `c`, lane `l`: values `4c..4c+4` of row `16 g + l`, plus 128, as unsigned bytes), and the
/// sixteen scales.
pub struct Q8_0x16 {
    pub rows: usize,
    pub cols: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
}

/// 5-bit codes (`Q5_0`, `Q5_1`, `Q5_K`) in groups of sixteen rows: per (group, block) the
/// low nibbles as in [`Q4_1x16`], then 64 bytes of fifth bits (lane `l`'s 32-bit word holds the
/// fifth bit of value `4c + j` at bit `8j + c` and of value `16 + 4c + j` at bit `8j + 4 + c`, so
/// one shift and one mask put each chunk's fifth bits on bit 4 of its bytes), then the sixteen
/// scales `d` and offsets `m` (value = d * code + m). `Q5_0` is symmetric (value = d * (code -
/// 16)): it keeps no offsets, and its products subtract `16 * sum(a)` from the integer sum, as
/// for `Q8_0`.
pub struct Q5x16 {
    pub rows: usize,
    pub cols: usize,
    qs: Vec<u8>,
    qh: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// 6-bit codes (`Q6_K`) in groups of sixteen rows: per (group, block) eight 64-byte chunks as in
/// [`Q8_0x16`] (the codes 0..64 as they are), then two scales per row, one per half-block of
/// 16 values: value = d * (code - 32).
pub struct Q6x16 {
    pub rows: usize,
    pub cols: usize,
    qs: Vec<u8>,
    /// Per (group, block): the sixteen first-half scales, then the sixteen second-half ones.
    d: Vec<f32>,
}

/// Emits `concat` for a tiled type whose per-group arrays are the fields listed: groups are
/// independent, so stacking rows just appends each array.
macro_rules! concat_fn {
    ($($arr:ident),+) => {
        /// The rows of `parts` stacked (groups are independent, so their arrays just append).
        pub fn concat(parts: Vec<Self>) -> Self {
            let cols = parts[0].cols;
            let mut out = Self {
                rows: 0,
                cols,
                $($arr: Vec::new(),)+
            };
            for p in parts {
                assert_eq!(p.cols, cols);
                out.rows += p.rows;
                $(out.$arr.extend_from_slice(&p.$arr);)+
            }
            out
        }
    };
}

/// For row `r` of a tiled matrix with `cols` columns, per block `b` in order: `(b, gb, l)`,
/// where `gb = g * nb + b` indexes the row's (group, block) and `l` is its lane.
fn row_blocks(cols: usize, r: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let nb = cols / QK;
    let (g, l) = (r / LANES, r % LANES);
    (0..nb).map(move |b| (b, g * nb + b, l))
}

impl Q4_1x16 {
    /// From GGML's row-wise layout (16 packed bytes, one `d` and one `m` per block).
    pub fn from_rowwise(rows: usize, cols: usize, qs: &[u8], d: &[f32], m: &[f32]) -> Self {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 256];
        let mut td = vec![0f32; groups * nb * LANES];
        let mut tm = vec![0f32; groups * nb * LANES];
        for r in 0..rows {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let src = (r * nb + b) * 16;
                let gb = g * nb + b;
                for c in 0..4 {
                    let dst = gb * 256 + c * 64 + l * 4;
                    tq[dst..dst + 4].copy_from_slice(&qs[src + 4 * c..src + 4 * c + 4]);
                }
                td[gb * LANES + l] = d[r * nb + b];
                tm[gb * LANES + l] = m[r * nb + b];
            }
        }
        Q4_1x16 {
            rows,
            cols,
            qs: tq,
            d: td,
            m: tm,
        }
    }

    /// From decoded rows: `row(r, q, d, m)` gives row `r`'s codes (one byte per value, 0..16)
    /// and its per-block scales and offsets.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        mut row: impl FnMut(&mut crate::blocks::RowSink<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 256];
        let mut td = vec![0f32; groups * nb * LANES];
        let mut tm = vec![0f32; groups * nb * LANES];
        row(&mut |r, q, d, m| {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let gb = g * nb + b;
                let q = &q[b * QK..(b + 1) * QK];
                for c in 0..4 {
                    for j in 0..4 {
                        tq[gb * 256 + c * 64 + l * 4 + j] = q[4 * c + j] | (q[16 + 4 * c + j] << 4);
                    }
                }
                td[gb * LANES + l] = d[b];
                tm[gb * LANES + l] = m[b];
            }
        })?;
        Ok(Q4_1x16 {
            rows,
            cols,
            qs: tq,
            d: td,
            m: tm,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    concat_fn!(qs, d, m);

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (b, gb, l) in row_blocks(self.cols, r) {
            let (d, m) = (self.d[gb * LANES + l], self.m[gb * LANES + l]);
            for c in 0..4 {
                for j in 0..4 {
                    let q = self.qs[gb * 256 + c * 64 + l * 4 + j];
                    out[b * QK + 4 * c + j] = d * (q & 0x0f) as f32 + m;
                    out[b * QK + 16 + 4 * c + j] = d * (q >> 4) as f32 + m;
                }
            }
        }
    }

    /// `out[m, rows] = a · selfᵀ` for activations quantized as `Q8_1` (with sums).
    pub fn matmul(&self, a: &ActQ8, m: usize, out: &mut [f32]) {
        grouped_matmul(self.rows, self.cols, a, m, out, Kind::Q4_1, |gb, nb| {
            Group {
                qs: &self.qs[gb * 256..(gb + nb) * 256],
                qh: &[],
                d: &self.d[gb * LANES..(gb + nb) * LANES],
                m: &self.m[gb * LANES..(gb + nb) * LANES],
            }
        });
    }
}

impl Q8_0x16 {
    /// From GGML's row-wise layout (32 signed bytes and one `d` per block).
    pub fn from_rowwise(rows: usize, cols: usize, qs: &[i8], d: &[f32]) -> Self {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 512];
        let mut td = vec![0f32; groups * nb * LANES];
        for r in 0..rows {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let src = (r * nb + b) * QK;
                let gb = g * nb + b;
                for c in 0..8 {
                    let dst = gb * 512 + c * 64 + l * 4;
                    for j in 0..4 {
                        tq[dst + j] = (qs[src + 4 * c + j] as u8) ^ 0x80;
                    }
                }
                td[gb * LANES + l] = d[r * nb + b];
            }
        }
        Q8_0x16 {
            rows,
            cols,
            qs: tq,
            d: td,
        }
    }

    /// From decoded rows: `row(r, q, d, _)` gives row `r`'s signed codes (as their bytes) and
    /// its per-block scales.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        mut row: impl FnMut(&mut crate::blocks::RowSink<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 512];
        let mut td = vec![0f32; groups * nb * LANES];
        row(&mut |r, q, d, _| {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let gb = g * nb + b;
                for c in 0..8 {
                    let dst = gb * 512 + c * 64 + l * 4;
                    for j in 0..4 {
                        tq[dst + j] = q[b * QK + 4 * c + j] ^ 0x80;
                    }
                }
                td[gb * LANES + l] = d[b];
            }
        })?;
        Ok(Q8_0x16 {
            rows,
            cols,
            qs: tq,
            d: td,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.qs.len() + 4 * self.d.len()
    }

    concat_fn!(qs, d);

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (b, gb, l) in row_blocks(self.cols, r) {
            let d = self.d[gb * LANES + l];
            for c in 0..8 {
                for j in 0..4 {
                    let q = (self.qs[gb * 512 + c * 64 + l * 4 + j] ^ 0x80) as i8;
                    out[b * QK + 4 * c + j] = d * q as f32;
                }
            }
        }
    }

    /// `out[m, rows] = a · selfᵀ` for activations quantized as `Q8_0`.
    pub fn matmul(&self, a: &ActQ8, m: usize, out: &mut [f32]) {
        grouped_matmul(self.rows, self.cols, a, m, out, Kind::Q8_0, |gb, nb| {
            Group {
                qs: &self.qs[gb * 512..(gb + nb) * 512],
                qh: &[],
                d: &self.d[gb * LANES..(gb + nb) * LANES],
                m: &[],
            }
        });
    }
}

impl Q5x16 {
    /// From decoded rows: `row(r, q, d, m)` fills row `r`'s codes (one byte per value, 0..32)
    /// and its per-block scales and offsets.
    /// `symmetric`: the offsets are `-16 d` (`Q5_0`), and are not kept.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        symmetric: bool,
        mut row: impl FnMut(&mut crate::blocks::RowSink<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 256];
        let mut th = vec![0u8; groups * nb * 64];
        let mut td = vec![0f32; groups * nb * LANES];
        let mut tm = vec![0f32; if symmetric { 0 } else { groups * nb * LANES }];
        row(&mut |r, q, d, m| {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let gb = g * nb + b;
                let q = &q[b * QK..(b + 1) * QK];
                let mut hbits = 0u32;
                for c in 0..4 {
                    for j in 0..4 {
                        let (lo, hi) = (q[4 * c + j], q[16 + 4 * c + j]);
                        tq[gb * 256 + c * 64 + l * 4 + j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                        hbits |= ((lo >> 4) as u32 & 1) << (8 * j + c);
                        hbits |= ((hi >> 4) as u32 & 1) << (8 * j + 4 + c);
                    }
                }
                th[gb * 64 + l * 4..gb * 64 + l * 4 + 4].copy_from_slice(&hbits.to_le_bytes());
                td[gb * LANES + l] = d[b];
                if !symmetric {
                    tm[gb * LANES + l] = m[b];
                }
            }
        })?;
        Ok(Q5x16 {
            rows,
            cols,
            qs: tq,
            qh: th,
            d: td,
            m: tm,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.qs.len() + self.qh.len() + 4 * (self.d.len() + self.m.len())
    }

    concat_fn!(qs, qh, d, m);

    /// Whether the offsets are implied (`Q5_0`): only such weights stack with each other.
    pub fn symmetric(&self) -> bool {
        self.m.is_empty()
    }

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (b, gb, l) in row_blocks(self.cols, r) {
            let d = self.d[gb * LANES + l];
            let o = gb * 64 + l * 4;
            let hw = u32::from_le_bytes(self.qh[o..o + 4].try_into().expect("four bytes"));
            for c in 0..4 {
                for j in 0..4 {
                    let byte = self.qs[gb * 256 + c * 64 + l * 4 + j];
                    let lo = (byte & 0x0f) | ((((hw >> (8 * j + c)) & 1) as u8) << 4);
                    let hi = (byte >> 4) | ((((hw >> (8 * j + 4 + c)) & 1) as u8) << 4);
                    for (i, q) in [(4 * c + j, lo), (16 + 4 * c + j, hi)] {
                        out[b * QK + i] = if self.symmetric() {
                            d * (q as i32 - 16) as f32
                        } else {
                            d * q as f32 + self.m[gb * LANES + l]
                        };
                    }
                }
            }
        }
    }

    /// `out[m, rows] = a · selfᵀ` for activations quantized as `Q8_1` (with sums).
    pub fn matmul(&self, a: &ActQ8, m: usize, out: &mut [f32]) {
        grouped_matmul(self.rows, self.cols, a, m, out, Kind::Q5, |gb, nb| Group {
            qs: &self.qs[gb * 256..(gb + nb) * 256],
            qh: &self.qh[gb * 64..(gb + nb) * 64],
            d: &self.d[gb * LANES..(gb + nb) * LANES],
            m: if self.symmetric() {
                &[]
            } else {
                &self.m[gb * LANES..(gb + nb) * LANES]
            },
        });
    }
}

impl Q6x16 {
    /// From decoded rows: `row(r, q, d, _)` fills row `r`'s codes (0..64) and its scales, one
    /// per 16 values.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        mut row: impl FnMut(&mut crate::blocks::RowSink<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        assert!(rows.is_multiple_of(LANES) && cols.is_multiple_of(QK));
        let nb = cols / QK;
        let groups = rows / LANES;
        let mut tq = vec![0u8; groups * nb * 512];
        let mut td = vec![0f32; groups * nb * 2 * LANES];
        row(&mut |r, q, d, _| {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let gb = g * nb + b;
                for c in 0..8 {
                    let dst = gb * 512 + c * 64 + l * 4;
                    tq[dst..dst + 4].copy_from_slice(&q[b * QK + 4 * c..b * QK + 4 * c + 4]);
                }
                td[gb * 2 * LANES + l] = d[2 * b];
                td[gb * 2 * LANES + LANES + l] = d[2 * b + 1];
            }
        })?;
        Ok(Q6x16 {
            rows,
            cols,
            qs: tq,
            d: td,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.qs.len() + 4 * self.d.len()
    }

    concat_fn!(qs, d);

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (b, gb, l) in row_blocks(self.cols, r) {
            for c in 0..8 {
                let d = self.d[gb * 2 * LANES + (c / 4) * LANES + l];
                for j in 0..4 {
                    let q = self.qs[gb * 512 + c * 64 + l * 4 + j];
                    out[b * QK + 4 * c + j] = d * (q as i32 - 32) as f32;
                }
            }
        }
    }

    /// `out[m, rows] = a · selfᵀ` for activations quantized as `Q8_0` (with half-block sums).
    pub fn matmul(&self, a: &ActQ8, m: usize, out: &mut [f32]) {
        grouped_matmul(self.rows, self.cols, a, m, out, Kind::Q6, |gb, nb| Group {
            qs: &self.qs[gb * 512..(gb + nb) * 512],
            qh: &[],
            d: &self.d[gb * 2 * LANES..(gb + nb) * 2 * LANES],
            m: &[],
        });
    }
}

/// `out[m, rows] = a · wᵀ` for repacked weights whose group of sixteen rows starting at block
/// `gb` (of `nb` per row) is `group(gb, nb)`.
fn grouped_matmul<'w>(
    rows: usize,
    cols: usize,
    a: &ActQ8,
    m: usize,
    out: &mut [f32],
    kind: Kind,
    group: impl Fn(usize, usize) -> Group<'w> + Sync,
) {
    let nb = cols / QK;
    let act: Vec<ActRow<'_>> = (0..m).map(|r| a.row(r)).collect();
    par_groups(out, m, rows, cols, |g, r0, rn, out_rows| {
        tile(&group(g * nb, nb), &act[r0..r0 + rn], out_rows, kind);
    });
}

/// One group's weights (all blocks of sixteen rows).
pub(crate) struct Group<'a> {
    qs: &'a [u8],
    /// Fifth bits (`Q5` only).
    qh: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Q4_1,
    Q8_0,
    Q5,
    Q6,
}

/// One group against up to four activation rows: `out_rows[i]` points at the sixteen
/// outputs of `act[i]`.
fn tile(w: &Group<'_>, act: &[ActRow<'_>], out_rows: [*mut f32; 4], kind: Kind) {
    let rn = act.len();
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked); the kernels assert the slice
            // lengths they read, and each out_rows[i] (i < rn) points at 16 writable floats
            // that no other task writes.
            unsafe {
                match (kind, rn) {
                    (Kind::Q4_1, 4) => avx512::q4_1::<4>(w, act, out_rows),
                    (Kind::Q4_1, 3) => avx512::q4_1::<3>(w, act, out_rows),
                    (Kind::Q4_1, 2) => avx512::q4_1::<2>(w, act, out_rows),
                    (Kind::Q4_1, _) => avx512::q4_1::<1>(w, act, out_rows),
                    (Kind::Q8_0, 4) => avx512::q8_0::<4>(w, act, out_rows),
                    (Kind::Q8_0, 3) => avx512::q8_0::<3>(w, act, out_rows),
                    (Kind::Q8_0, 2) => avx512::q8_0::<2>(w, act, out_rows),
                    (Kind::Q8_0, _) => avx512::q8_0::<1>(w, act, out_rows),
                    (Kind::Q5, 4) if w.m.is_empty() => avx512::q5::<4, true>(w, act, out_rows),
                    (Kind::Q5, 4) => avx512::q5::<4, false>(w, act, out_rows),
                    (Kind::Q5, 3) if w.m.is_empty() => avx512::q5::<3, true>(w, act, out_rows),
                    (Kind::Q5, 3) => avx512::q5::<3, false>(w, act, out_rows),
                    (Kind::Q5, 2) if w.m.is_empty() => avx512::q5::<2, true>(w, act, out_rows),
                    (Kind::Q5, 2) => avx512::q5::<2, false>(w, act, out_rows),
                    (Kind::Q5, _) if w.m.is_empty() => avx512::q5::<1, true>(w, act, out_rows),
                    (Kind::Q5, _) => avx512::q5::<1, false>(w, act, out_rows),
                    (Kind::Q6, 4) => avx512::q6::<4>(w, act, out_rows),
                    (Kind::Q6, 3) => avx512::q6::<3>(w, act, out_rows),
                    (Kind::Q6, 2) => avx512::q6::<2>(w, act, out_rows),
                    (Kind::Q6, _) => avx512::q6::<1>(w, act, out_rows),
                }
            }
            return;
        }
        if matches!(kind, Kind::Q5 | Kind::Q6) && avx2::available() {
            for (row, &o) in act.iter().zip(&out_rows) {
                // SAFETY: the CPU has AVX2 and FMA (checked); the kernels assert the slice
                // lengths they read, and `o` points at 16 writable floats only this task
                // writes.
                unsafe {
                    match kind {
                        Kind::Q5 if w.m.is_empty() => avx2::q5::<true>(w, row, o),
                        Kind::Q5 => avx2::q5::<false>(w, row, o),
                        _ => avx2::q6(w, row, o),
                    }
                }
            }
            return;
        }
    }
    for (row, &o) in act.iter().zip(&out_rows) {
        let v = scalar::dot(w, row, kind);
        // SAFETY: o points at 16 writable floats of `out` that only this task writes (see
        // `par_groups`), and `v` is a local array, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), o, LANES) };
    }
}

/// Runs `f(group, r0, rn, out_rows)` for every group and every tile of up to four activation
/// rows, groups split across threads.
fn par_groups<F>(out: &mut [f32], m: usize, n: usize, k: usize, f: F)
where
    F: Fn(usize, usize, usize, [*mut f32; 4]) + Sync,
{
    assert_eq!(out.len(), m * n, "matmul output shape");
    let ptr = SyncPtr::new(out);
    let groups = n / LANES;
    let run = |g: usize| {
        let p = ptr;
        let mut r0 = 0;
        while r0 < m {
            let rn = (m - r0).min(4);
            // SAFETY: (r0 + i) < m and 16 g + 16 <= n: inside `out`; only this task writes
            // the columns of group g. Rows past rn are never written.
            let rows =
                std::array::from_fn(|i| unsafe { p.add((r0 + i.min(rn - 1)) * n + g * LANES) });
            f(g, r0, rn, rows);
            r0 += rn;
        }
    };
    // Below ~32k multiply-adds a fork-join costs more than it saves.
    if m * n * k < 32_768 {
        (0..groups).for_each(run);
    } else {
        (0..groups).into_par_iter().with_min_len(2).for_each(run);
    }
}

/// The reference: the kernels' arithmetic one lane at a time.
pub(crate) mod scalar {
    use super::{Group, Kind, LANES};
    use crate::quant::{ActRow, QK};

    pub fn dot(w: &Group<'_>, row: &ActRow<'_>, kind: Kind) -> [f32; LANES] {
        let nb = match kind {
            Kind::Q6 => w.d.len() / (2 * LANES),
            _ => w.d.len() / LANES,
        };
        let mut acc = [0f32; LANES];
        let mut macc = [0f32; LANES];
        for b in 0..nb {
            let y = &row.qs[b * QK..(b + 1) * QK];
            for l in 0..LANES {
                let mut isum = 0i32;
                match kind {
                    Kind::Q4_1 | Kind::Q5 => {
                        let hw = if kind == Kind::Q5 {
                            let o = b * 64 + l * 4;
                            u32::from_le_bytes(w.qh[o..o + 4].try_into().unwrap())
                        } else {
                            0
                        };
                        for c in 0..4 {
                            for j in 0..4 {
                                let q = w.qs[b * 256 + c * 64 + l * 4 + j];
                                let lo5 = (((hw >> (8 * j + c)) & 1) << 4) as i32;
                                let hi5 = (((hw >> (8 * j + 4 + c)) & 1) << 4) as i32;
                                isum += ((q & 0x0f) as i32 | lo5) * y[4 * c + j] as i32;
                                isum += ((q >> 4) as i32 | hi5) * y[16 + 4 * c + j] as i32;
                            }
                        }
                        if kind == Kind::Q5 && w.m.is_empty() {
                            isum -= 16 * row.qsum[b];
                        }
                    }
                    Kind::Q8_0 => {
                        for c in 0..8 {
                            for j in 0..4 {
                                let q = w.qs[b * 512 + c * 64 + l * 4 + j];
                                isum += q as i32 * y[4 * c + j] as i32;
                            }
                        }
                        isum -= 128 * row.qsum[b];
                    }
                    Kind::Q6 => {
                        let mut half = [0i32; 2];
                        for c in 0..8 {
                            for j in 0..4 {
                                let q = w.qs[b * 512 + c * 64 + l * 4 + j];
                                half[c / 4] += q as i32 * y[4 * c + j] as i32;
                            }
                        }
                        let lo = row.qlo[b];
                        let i0 = half[0] - 32 * lo;
                        let i1 = half[1] - 32 * (row.qsum[b] - lo);
                        let s0 = w.d[b * 2 * LANES + l] * row.d[b];
                        let s1 = w.d[b * 2 * LANES + LANES + l] * row.d[b];
                        acc[l] = s0.mul_add(i0 as f32, acc[l]);
                        acc[l] = s1.mul_add(i1 as f32, acc[l]);
                        continue;
                    }
                }
                let scale = w.d[b * LANES + l] * row.d[b];
                acc[l] = scale.mul_add(isum as f32, acc[l]);
                if kind == Kind::Q4_1 || (kind == Kind::Q5 && !w.m.is_empty()) {
                    macc[l] = w.m[b * LANES + l].mul_add(row.s[b], macc[l]);
                }
            }
        }
        std::array::from_fn(|l| acc[l] + macc[l])
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Group, LANES};
    use crate::quant::{ActRow, QK};
    use std::arch::x86_64::*;

    /// Four activation bytes starting at `p`, as one 32-bit lane broadcast to all sixteen.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        // SAFETY: the caller keeps p + 4 inside the activation row.
        _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
    }

    /// # Safety
    /// AVX-512 F/BW/VNNI; `out[i]` (i < R) points at 16 writable floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q4_1<const R: usize>(w: &Group<'_>, rows: &[ActRow<'_>], out: [*mut f32; 4]) {
        let nb = w.d.len() / LANES;
        assert!(w.qs.len() >= nb * 256 && w.m.len() >= nb * LANES && rows.len() >= R);
        for r in &rows[..R] {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb && r.s.len() >= nb);
        }
        let low = _mm512_set1_epi8(0x0f);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut macc = [_mm512_setzero_ps(); R];
        let (wq, wd, wm) = (w.qs.as_ptr(), w.d.as_ptr(), w.m.as_ptr());
        for b in 0..nb {
            // SAFETY: reads at block b < nb, inside the lengths asserted above.
            unsafe {
                let base = wq.add(b * 256);
                let w0 = _mm512_loadu_si512(base as *const _);
                let w1 = _mm512_loadu_si512(base.add(64) as *const _);
                let w2 = _mm512_loadu_si512(base.add(128) as *const _);
                let w3 = _mm512_loadu_si512(base.add(192) as *const _);
                let l0 = _mm512_and_si512(w0, low);
                let l1 = _mm512_and_si512(w1, low);
                let l2 = _mm512_and_si512(w2, low);
                let l3 = _mm512_and_si512(w3, low);
                let h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), low);
                let h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), low);
                let h2 = _mm512_and_si512(_mm512_srli_epi16(w2, 4), low);
                let h3 = _mm512_and_si512(_mm512_srli_epi16(w3, 4), low);
                let dw = _mm512_loadu_ps(wd.add(b * LANES));
                let mw = _mm512_loadu_ps(wm.add(b * LANES));
                for i in 0..R {
                    let y = rows[i].qs.as_ptr().add(b * QK);
                    let mut s0 = _mm512_dpbusd_epi32(zero, l0, bcast4(y));
                    let mut s1 = _mm512_dpbusd_epi32(zero, h0, bcast4(y.add(16)));
                    s0 = _mm512_dpbusd_epi32(s0, l1, bcast4(y.add(4)));
                    s1 = _mm512_dpbusd_epi32(s1, h1, bcast4(y.add(20)));
                    s0 = _mm512_dpbusd_epi32(s0, l2, bcast4(y.add(8)));
                    s1 = _mm512_dpbusd_epi32(s1, h2, bcast4(y.add(24)));
                    s0 = _mm512_dpbusd_epi32(s0, l3, bcast4(y.add(12)));
                    s1 = _mm512_dpbusd_epi32(s1, h3, bcast4(y.add(28)));
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*rows[i].d.get_unchecked(b)));
                    acc[i] = _mm512_fmadd_ps(scale, isum, acc[i]);
                    macc[i] =
                        _mm512_fmadd_ps(mw, _mm512_set1_ps(*rows[i].s.get_unchecked(b)), macc[i]);
                }
            }
        }
        for i in 0..R {
            // SAFETY: out[i] points at 16 writable floats (caller).
            unsafe { _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], macc[i])) };
        }
    }

    /// # Safety
    /// As [`q4_1`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q8_0<const R: usize>(w: &Group<'_>, rows: &[ActRow<'_>], out: [*mut f32; 4]) {
        let nb = w.d.len() / LANES;
        assert!(w.qs.len() >= nb * 512 && rows.len() >= R);
        for r in &rows[..R] {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb && r.qsum.len() >= nb);
        }
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); R];
        let (wq, wd) = (w.qs.as_ptr(), w.d.as_ptr());
        for b in 0..nb {
            // SAFETY: reads at block b < nb, inside the lengths asserted above.
            unsafe {
                let base = wq.add(b * 512);
                let wv: [__m512i; 8] =
                    std::array::from_fn(|c| _mm512_loadu_si512(base.add(64 * c) as *const _));
                let dw = _mm512_loadu_ps(wd.add(b * LANES));
                for i in 0..R {
                    let y = rows[i].qs.as_ptr().add(b * QK);
                    let mut s0 = _mm512_dpbusd_epi32(zero, wv[0], bcast4(y));
                    let mut s1 = _mm512_dpbusd_epi32(zero, wv[1], bcast4(y.add(4)));
                    s0 = _mm512_dpbusd_epi32(s0, wv[2], bcast4(y.add(8)));
                    s1 = _mm512_dpbusd_epi32(s1, wv[3], bcast4(y.add(12)));
                    s0 = _mm512_dpbusd_epi32(s0, wv[4], bcast4(y.add(16)));
                    s1 = _mm512_dpbusd_epi32(s1, wv[5], bcast4(y.add(20)));
                    s0 = _mm512_dpbusd_epi32(s0, wv[6], bcast4(y.add(24)));
                    s1 = _mm512_dpbusd_epi32(s1, wv[7], bcast4(y.add(28)));
                    let bias = _mm512_set1_epi32(128 * *rows[i].qsum.get_unchecked(b));
                    let isum = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*rows[i].d.get_unchecked(b)));
                    acc[i] = _mm512_fmadd_ps(scale, isum, acc[i]);
                }
            }
        }
        let zero_ps = _mm512_setzero_ps();
        for i in 0..R {
            // SAFETY: out[i] points at 16 writable floats (caller).
            unsafe { _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], zero_ps)) };
        }
    }

    /// # Safety
    /// As [`q4_1`]; `w.qh` holds the blocks' fifth bits; `SYM`: no offsets, the codes are
    /// centred on 16 (`Q5_0`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q5<const R: usize, const SYM: bool>(
        w: &Group<'_>,
        rows: &[ActRow<'_>],
        out: [*mut f32; 4],
    ) {
        let nb = w.d.len() / LANES;
        assert!(w.qs.len() >= nb * 256 && w.qh.len() >= nb * 64);
        assert!(SYM || w.m.len() >= nb * LANES);
        assert!(rows.len() >= R);
        for r in &rows[..R] {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb && r.qsum.len() >= nb);
            assert!(SYM || r.s.len() >= nb);
        }
        let low = _mm512_set1_epi8(0x0f);
        let bit4 = _mm512_set1_epi8(0x10);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut macc = [_mm512_setzero_ps(); R];
        let (wq, wh, wd, wm) = (w.qs.as_ptr(), w.qh.as_ptr(), w.d.as_ptr(), w.m.as_ptr());
        for b in 0..nb {
            // SAFETY: reads at block b < nb, inside the lengths asserted above.
            unsafe {
                let base = wq.add(b * 256);
                let w0 = _mm512_loadu_si512(base as *const _);
                let w1 = _mm512_loadu_si512(base.add(64) as *const _);
                let w2 = _mm512_loadu_si512(base.add(128) as *const _);
                let w3 = _mm512_loadu_si512(base.add(192) as *const _);
                let qh = _mm512_loadu_si512(wh.add(b * 64) as *const _);
                // 0xF8: a | (b & c), the nibble with its fifth bit put on bit 4.
                let l0 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(w0, low),
                    _mm512_slli_epi32::<4>(qh),
                    bit4,
                );
                let l1 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(w1, low),
                    _mm512_slli_epi32::<3>(qh),
                    bit4,
                );
                let l2 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(w2, low),
                    _mm512_slli_epi32::<2>(qh),
                    bit4,
                );
                let l3 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(w3, low),
                    _mm512_slli_epi32::<1>(qh),
                    bit4,
                );
                let h0 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(_mm512_srli_epi16(w0, 4), low),
                    qh,
                    bit4,
                );
                let h1 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(_mm512_srli_epi16(w1, 4), low),
                    _mm512_srli_epi32::<1>(qh),
                    bit4,
                );
                let h2 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(_mm512_srli_epi16(w2, 4), low),
                    _mm512_srli_epi32::<2>(qh),
                    bit4,
                );
                let h3 = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_and_si512(_mm512_srli_epi16(w3, 4), low),
                    _mm512_srli_epi32::<3>(qh),
                    bit4,
                );
                let dw = _mm512_loadu_ps(wd.add(b * LANES));
                let mw = if SYM {
                    _mm512_setzero_ps()
                } else {
                    _mm512_loadu_ps(wm.add(b * LANES))
                };
                for i in 0..R {
                    let y = rows[i].qs.as_ptr().add(b * QK);
                    let mut s0 = _mm512_dpbusd_epi32(zero, l0, bcast4(y));
                    let mut s1 = _mm512_dpbusd_epi32(zero, h0, bcast4(y.add(16)));
                    s0 = _mm512_dpbusd_epi32(s0, l1, bcast4(y.add(4)));
                    s1 = _mm512_dpbusd_epi32(s1, h1, bcast4(y.add(20)));
                    s0 = _mm512_dpbusd_epi32(s0, l2, bcast4(y.add(8)));
                    s1 = _mm512_dpbusd_epi32(s1, h2, bcast4(y.add(24)));
                    s0 = _mm512_dpbusd_epi32(s0, l3, bcast4(y.add(12)));
                    s1 = _mm512_dpbusd_epi32(s1, h3, bcast4(y.add(28)));
                    let mut si = _mm512_add_epi32(s0, s1);
                    if SYM {
                        let bias = _mm512_set1_epi32(16 * *rows[i].qsum.get_unchecked(b));
                        si = _mm512_sub_epi32(si, bias);
                    }
                    let isum = _mm512_cvtepi32_ps(si);
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*rows[i].d.get_unchecked(b)));
                    acc[i] = _mm512_fmadd_ps(scale, isum, acc[i]);
                    if !SYM {
                        let sa = _mm512_set1_ps(*rows[i].s.get_unchecked(b));
                        macc[i] = _mm512_fmadd_ps(mw, sa, macc[i]);
                    }
                }
            }
        }
        for i in 0..R {
            // SAFETY: out[i] points at 16 writable floats (caller).
            unsafe { _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], macc[i])) };
        }
    }

    /// # Safety
    /// As [`q4_1`]; the activation rows carry half-block sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q6<const R: usize>(w: &Group<'_>, rows: &[ActRow<'_>], out: [*mut f32; 4]) {
        let nb = w.d.len() / (2 * LANES);
        assert!(w.qs.len() >= nb * 512 && rows.len() >= R);
        for r in &rows[..R] {
            assert!(r.qs.len() >= nb * QK && r.d.len() >= nb);
            assert!(r.qsum.len() >= nb && r.qlo.len() >= nb);
        }
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); R];
        let (wq, wd) = (w.qs.as_ptr(), w.d.as_ptr());
        for b in 0..nb {
            // SAFETY: reads at block b < nb, inside the lengths asserted above.
            unsafe {
                let base = wq.add(b * 512);
                let wv: [__m512i; 8] =
                    std::array::from_fn(|c| _mm512_loadu_si512(base.add(64 * c) as *const _));
                let d0 = _mm512_loadu_ps(wd.add(b * 2 * LANES));
                let d1 = _mm512_loadu_ps(wd.add(b * 2 * LANES + LANES));
                for i in 0..R {
                    let y = rows[i].qs.as_ptr().add(b * QK);
                    let mut a0 = _mm512_dpbusd_epi32(zero, wv[0], bcast4(y));
                    let mut a1 = _mm512_dpbusd_epi32(zero, wv[1], bcast4(y.add(4)));
                    let mut b0 = _mm512_dpbusd_epi32(zero, wv[4], bcast4(y.add(16)));
                    let mut b1 = _mm512_dpbusd_epi32(zero, wv[5], bcast4(y.add(20)));
                    a0 = _mm512_dpbusd_epi32(a0, wv[2], bcast4(y.add(8)));
                    a1 = _mm512_dpbusd_epi32(a1, wv[3], bcast4(y.add(12)));
                    b0 = _mm512_dpbusd_epi32(b0, wv[6], bcast4(y.add(24)));
                    b1 = _mm512_dpbusd_epi32(b1, wv[7], bcast4(y.add(28)));
                    let lo = *rows[i].qlo.get_unchecked(b);
                    let hi = *rows[i].qsum.get_unchecked(b) - lo;
                    let i0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(
                        _mm512_add_epi32(a0, a1),
                        _mm512_set1_epi32(32 * lo),
                    ));
                    let i1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(
                        _mm512_add_epi32(b0, b1),
                        _mm512_set1_epi32(32 * hi),
                    ));
                    let da = _mm512_set1_ps(*rows[i].d.get_unchecked(b));
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d0, da), i0, acc[i]);
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d1, da), i1, acc[i]);
                }
            }
        }
        for i in 0..R {
            // SAFETY: out[i] points at 16 writable floats (caller).
            unsafe { _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], _mm512_setzero_ps())) };
        }
    }
}

/// The 5- and 6-bit kernels for CPUs with AVX2 but not AVX-512 VNNI, on the same sixteen-row
/// layout: each 64-byte chunk is two 256-bit halves of eight rows, multiplied with
/// `vpmaddubsw` (no overflow: codes below 64 times activations within 127, two at a time) and
/// summed to 32 bits with `vpmaddwd`. Per output the arithmetic is [`scalar`]'s, so the
/// results have its bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Group, LANES};
    use crate::quant::{ActRow, QK};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }

    /// Four activation bytes at `p`, broadcast to all eight 32-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        // SAFETY: the caller keeps p + 4 inside the activation row.
        _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
    }

    /// The four-byte dot products of unsigned `w` and signed `a`, summed into `acc` per lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot4(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(w, a);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// # Safety
    /// AVX2 and FMA; `out` points at 16 writable floats; `w` holds whole blocks of 5-bit codes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q5<const SYM: bool>(w: &Group<'_>, row: &ActRow<'_>, out: *mut f32) {
        let nb = w.d.len() / LANES;
        assert!(w.qs.len() >= nb * 256 && w.qh.len() >= nb * 64);
        assert!(SYM || w.m.len() >= nb * LANES);
        assert!(row.qs.len() >= nb * QK && row.d.len() >= nb && row.qsum.len() >= nb);
        assert!(SYM || row.s.len() >= nb);
        let low = _mm256_set1_epi8(0x0f);
        let bit4 = _mm256_set1_epi8(0x10);
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            let mut macc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: reads at block b < nb and half < 2, inside the lengths asserted.
                unsafe {
                    let base = w.qs.as_ptr().add(b * 256 + half * 32);
                    let qh = _mm256_loadu_si256(w.qh.as_ptr().add(b * 64 + half * 32) as *const _);
                    let y = row.qs.as_ptr().add(b * QK);
                    let chunk = |c: usize| _mm256_loadu_si256(base.add(64 * c) as *const _);
                    let lo = |wc: __m256i, h: __m256i| {
                        _mm256_or_si256(_mm256_and_si256(wc, low), _mm256_and_si256(h, bit4))
                    };
                    let hi = |wc: __m256i, h: __m256i| {
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(wc, 4), low),
                            _mm256_and_si256(h, bit4),
                        )
                    };
                    let (w0, w1, w2, w3) = (chunk(0), chunk(1), chunk(2), chunk(3));
                    let mut isum = _mm256_setzero_si256();
                    isum = dot4(isum, lo(w0, _mm256_slli_epi32(qh, 4)), bcast4(y));
                    isum = dot4(isum, lo(w1, _mm256_slli_epi32(qh, 3)), bcast4(y.add(4)));
                    isum = dot4(isum, lo(w2, _mm256_slli_epi32(qh, 2)), bcast4(y.add(8)));
                    isum = dot4(isum, lo(w3, _mm256_slli_epi32(qh, 1)), bcast4(y.add(12)));
                    isum = dot4(isum, hi(w0, qh), bcast4(y.add(16)));
                    isum = dot4(isum, hi(w1, _mm256_srli_epi32(qh, 1)), bcast4(y.add(20)));
                    isum = dot4(isum, hi(w2, _mm256_srli_epi32(qh, 2)), bcast4(y.add(24)));
                    isum = dot4(isum, hi(w3, _mm256_srli_epi32(qh, 3)), bcast4(y.add(28)));
                    if SYM {
                        isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * row.qsum[b]));
                    }
                    let dw = _mm256_loadu_ps(w.d.as_ptr().add(b * LANES + half * 8));
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(row.d[b]));
                    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc);
                    if !SYM {
                        let mw = _mm256_loadu_ps(w.m.as_ptr().add(b * LANES + half * 8));
                        macc = _mm256_fmadd_ps(mw, _mm256_set1_ps(row.s[b]), macc);
                    }
                }
            }
            // SAFETY: out points at 16 writable floats (caller); half * 8 + 8 <= 16.
            unsafe { _mm256_storeu_ps(out.add(half * 8), _mm256_add_ps(acc, macc)) };
        }
    }

    /// # Safety
    /// AVX2 and FMA; `out` points at 16 writable floats; `w` holds whole blocks of 6-bit codes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q6(w: &Group<'_>, row: &ActRow<'_>, out: *mut f32) {
        let nb = w.d.len() / (2 * LANES);
        assert!(w.qs.len() >= nb * 512);
        assert!(row.qs.len() >= nb * QK && row.d.len() >= nb);
        assert!(row.qsum.len() >= nb && row.qlo.len() >= nb);
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: reads at block b < nb and half < 2, inside the lengths asserted.
                unsafe {
                    let base = w.qs.as_ptr().add(b * 512 + half * 32);
                    let y = row.qs.as_ptr().add(b * QK);
                    let mut a0 = _mm256_setzero_si256();
                    let mut a1 = _mm256_setzero_si256();
                    for c in 0..4 {
                        let wc = _mm256_loadu_si256(base.add(64 * c) as *const _);
                        a0 = dot4(a0, wc, bcast4(y.add(4 * c)));
                        let wc = _mm256_loadu_si256(base.add(64 * (c + 4)) as *const _);
                        a1 = dot4(a1, wc, bcast4(y.add(16 + 4 * c)));
                    }
                    let lo = row.qlo[b];
                    let hi = row.qsum[b] - lo;
                    let i0 = _mm256_sub_epi32(a0, _mm256_set1_epi32(32 * lo));
                    let i1 = _mm256_sub_epi32(a1, _mm256_set1_epi32(32 * hi));
                    let da = _mm256_set1_ps(row.d[b]);
                    let d0 = _mm256_loadu_ps(w.d.as_ptr().add(b * 2 * LANES + half * 8));
                    let d1 = _mm256_loadu_ps(w.d.as_ptr().add(b * 2 * LANES + LANES + half * 8));
                    acc = _mm256_fmadd_ps(_mm256_mul_ps(d0, da), _mm256_cvtepi32_ps(i0), acc);
                    acc = _mm256_fmadd_ps(_mm256_mul_ps(d1, da), _mm256_cvtepi32_ps(i1), acc);
                }
            }
            // SAFETY: out points at 16 writable floats (caller); half * 8 + 8 <= 16.
            unsafe { _mm256_storeu_ps(out.add(half * 8), _mm256_add_ps(acc, _mm256_setzero_ps())) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::{lcg, random_q4_1};
    use crate::quant::Weight;

    fn rowwise_parts(w: &Weight) -> (&[u8], &[f32], &[f32]) {
        match w {
            Weight::Q4_1 { qs, d, m, .. } => (qs, d, m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn repacked_rows_read_back_as_the_original_rows() {
        let mut seed = 21u64;
        let (rows, cols) = (32, 96);
        let w = Weight::q4_1_rowwise(rows, cols, &random_q4_1(rows, cols, &mut seed)).unwrap();
        let (qs, d, m) = rowwise_parts(&w);
        let t = Q4_1x16::from_rowwise(rows, cols, qs, d, m);
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            w.row_f32(r, &mut a);
            t.row_f32(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        let q8: Vec<i8> = (0..rows * cols)
            .map(|_| (lcg(&mut seed) * 127.0) as i8)
            .collect();
        let d8: Vec<f32> = (0..rows * cols / QK)
            .map(|_| lcg(&mut seed).abs())
            .collect();
        let t8 = Q8_0x16::from_rowwise(rows, cols, &q8, &d8);
        for r in 0..rows {
            t8.row_f32(r, &mut b);
            for c in 0..cols {
                assert_eq!(b[c], d8[(r * cols + c) / QK] * q8[r * cols + c] as f32);
            }
        }
    }

    /// The vector kernels give the reference's bits, for every tile height, and are close to
    /// the dequantized product.
    #[test]
    fn kernels_give_the_reference_bits() {
        let mut seed = 9u64;
        let (rows, cols) = (48, 160);
        let w = Weight::q4_1_rowwise(rows, cols, &random_q4_1(rows, cols, &mut seed)).unwrap();
        let (qs, d, mn) = rowwise_parts(&w);
        let t4 = Q4_1x16::from_rowwise(rows, cols, qs, d, mn);
        let q8: Vec<i8> = (0..rows * cols)
            .map(|_| (lcg(&mut seed) * 127.0) as i8)
            .collect();
        let d8: Vec<f32> = (0..rows * cols / QK)
            .map(|_| lcg(&mut seed).abs() * 0.05)
            .collect();
        let t8 = Q8_0x16::from_rowwise(rows, cols, &q8, &d8);
        let nb = cols / QK;
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
            for kind in [Kind::Q4_1, Kind::Q8_0] {
                let a = ActQ8::quantize(&x, m, cols, kind == Kind::Q4_1);
                let mut out = vec![0f32; m * rows];
                let mut dense = vec![0f32; cols];
                match kind {
                    Kind::Q4_1 => t4.matmul(&a, m, &mut out),
                    _ => t8.matmul(&a, m, &mut out),
                }
                for g in 0..rows / LANES {
                    let group = match kind {
                        Kind::Q4_1 => Group {
                            qh: &[],
                            qs: &t4.qs[g * nb * 256..(g + 1) * nb * 256],
                            d: &t4.d[g * nb * LANES..(g + 1) * nb * LANES],
                            m: &t4.m[g * nb * LANES..(g + 1) * nb * LANES],
                        },
                        Kind::Q8_0 => Group {
                            qh: &[],
                            qs: &t8.qs[g * nb * 512..(g + 1) * nb * 512],
                            d: &t8.d[g * nb * LANES..(g + 1) * nb * LANES],
                            m: &[],
                        },
                        _ => unreachable!(),
                    };
                    for r in 0..m {
                        let want = scalar::dot(&group, &a.row(r), kind);
                        let got = &out[r * rows + g * LANES..r * rows + (g + 1) * LANES];
                        assert_eq!(got, &want[..], "{kind:?} m={m} group {g} row {r}");
                        for (l, v) in got.iter().enumerate() {
                            match kind {
                                Kind::Q4_1 => t4.row_f32(g * LANES + l, &mut dense),
                                _ => t8.row_f32(g * LANES + l, &mut dense),
                            }
                            let xr = &x[r * cols..(r + 1) * cols];
                            let exact = crate::quant::dot_f32(&dense, xr);
                            let bound: f32 = dense
                                .iter()
                                .zip(xr)
                                .map(|(p, q)| (p * q).abs())
                                .sum::<f32>()
                                / 100.0;
                            assert!((exact - v).abs() < bound + 1e-4, "{exact} vs {v}");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod converted {
    use super::*;
    use crate::blocks::tests::{ggml_dequantized, random_blocks, TYPES};
    use crate::quant::tests::lcg;
    use crate::quant::Weight;

    fn group_of(w: &Weight, g: usize) -> (Group<'_>, Kind) {
        match w {
            Weight::Q5x16(t) => {
                let nb = t.cols / QK;
                let gb = g * nb;
                let grp = Group {
                    qs: &t.qs[gb * 256..(gb + nb) * 256],
                    qh: &t.qh[gb * 64..(gb + nb) * 64],
                    d: &t.d[gb * LANES..(gb + nb) * LANES],
                    m: if t.symmetric() {
                        &[]
                    } else {
                        &t.m[gb * LANES..(gb + nb) * LANES]
                    },
                };
                (grp, Kind::Q5)
            }
            Weight::Q6x16(t) => {
                let nb = t.cols / QK;
                let gb = g * nb;
                let grp = Group {
                    qs: &t.qs[gb * 512..(gb + nb) * 512],
                    qh: &[],
                    d: &t.d[gb * 2 * LANES..(gb + nb) * 2 * LANES],
                    m: &[],
                };
                (grp, Kind::Q6)
            }
            Weight::Q4_1x16(t) => {
                let nb = t.cols / QK;
                let gb = g * nb;
                let grp = Group {
                    qs: &t.qs[gb * 256..(gb + nb) * 256],
                    qh: &[],
                    d: &t.d[gb * LANES..(gb + nb) * LANES],
                    m: &t.m[gb * LANES..(gb + nb) * LANES],
                };
                (grp, Kind::Q4_1)
            }
            Weight::Q8_0x16(t) => {
                let nb = t.cols / QK;
                let gb = g * nb;
                let grp = Group {
                    qs: &t.qs[gb * 512..(gb + nb) * 512],
                    qh: &[],
                    d: &t.d[gb * LANES..(gb + nb) * LANES],
                    m: &[],
                };
                (grp, Kind::Q8_0)
            }
            other => panic!("not tiled: {}", other.kind()),
        }
    }

    /// GGML's 4-, 5-, 6- and 8-bit formats kept quantized: every row reads back as GGML
    /// dequantizes it, the products have the scalar reference's bits for every tile height,
    /// and they are close to the dequantized product.
    #[test]
    fn converted_formats_read_back_as_ggml_and_multiply_as_the_reference() {
        let mut seed = 41u64;
        let (rows, cols) = (32, 512);
        for dtype in TYPES {
            let raw = random_blocks(dtype, rows, cols, &mut seed);
            let w = Weight::from_ggml_bytes(dtype, rows, cols, &raw)
                .unwrap()
                .unwrap();
            let want = ggml_dequantized(dtype, rows, cols, &raw);
            let mut dense = vec![0f32; rows * cols];
            for r in 0..rows {
                w.row_f32(r, &mut dense[r * cols..(r + 1) * cols]);
            }
            for (i, (g, e)) in dense.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1e-3),
                    "{dtype:?} value {i}: {g} vs {e}"
                );
            }
            for m in 1..=6 {
                let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
                let mut out = vec![0f32; m * rows];
                w.matmul(&x, m, &mut out);
                let tiled_kind = !matches!(w, Weight::Q4_1 { .. } | Weight::Q8_0 { .. });
                let a = ActQ8::quantize(&x, m, cols, true);
                for r in 0..m {
                    let xr = &x[r * cols..(r + 1) * cols];
                    for c in 0..rows {
                        let v = out[r * rows + c];
                        let wr = &dense[c * cols..(c + 1) * cols];
                        let exact = crate::quant::dot_f32(wr, xr);
                        let bound: f32 =
                            wr.iter().zip(xr).map(|(p, q)| (p * q).abs()).sum::<f32>() / 100.0;
                        assert!(
                            (exact - v).abs() < bound + 1e-4,
                            "{dtype:?} m={m} ({r}, {c}): {exact} vs {v}"
                        );
                    }
                    if tiled_kind {
                        for g in 0..rows / LANES {
                            let (grp, kind) = group_of(&w, g);
                            let want = scalar::dot(&grp, &a.row(r), kind);
                            let got = &out[r * rows + g * LANES..r * rows + (g + 1) * LANES];
                            assert_eq!(got, &want[..], "{dtype:?} m={m} group {g} row {r}");
                            #[cfg(target_arch = "x86_64")]
                            if matches!(kind, Kind::Q5 | Kind::Q6) && avx2::available() {
                                let mut v = [0f32; LANES];
                                // SAFETY: AVX2 and FMA present (checked); `v` holds 16 floats;
                                // the group holds whole blocks.
                                unsafe {
                                    match kind {
                                        Kind::Q5 if grp.m.is_empty() => {
                                            avx2::q5::<true>(&grp, &a.row(r), v.as_mut_ptr())
                                        }
                                        Kind::Q5 => {
                                            avx2::q5::<false>(&grp, &a.row(r), v.as_mut_ptr())
                                        }
                                        _ => avx2::q6(&grp, &a.row(r), v.as_mut_ptr()),
                                    }
                                }
                                assert_eq!(v, want, "AVX2 {dtype:?} group {g} row {r}");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod agree {
    use crate::quant::tests::{lcg, random_q4_1};
    use crate::quant::Weight;

    /// Tiled and row-wise products are the same integer sums, scaled in another order.
    #[test]
    fn tiled_and_rowwise_products_agree() {
        let mut seed = 77u64;
        let (rows, cols, m) = (64, 576, 5);
        let raw = random_q4_1(rows, cols, &mut seed);
        let rw = Weight::q4_1_rowwise(rows, cols, &raw).unwrap();
        let tw = Weight::q4_1_rowwise(rows, cols, &raw)
            .unwrap()
            .into_fastest_layout();
        let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
        let (mut a, mut b) = (vec![0f32; m * rows], vec![0f32; m * rows]);
        rw.matmul(&x, m, &mut a);
        tw.matmul(&x, m, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{i}: {p} vs {q}");
        }
        let mut raw8 = Vec::new();
        for _ in 0..rows * cols / 32 {
            raw8.extend(half::f16::from_f32(0.01 + lcg(&mut seed).abs() * 0.02).to_le_bytes());
            for _ in 0..32 {
                raw8.push((lcg(&mut seed) * 127.0) as i8 as u8);
            }
        }
        let rw = Weight::q8_0_rowwise(rows, cols, &raw8).unwrap();
        let tw = Weight::q8_0_rowwise(rows, cols, &raw8)
            .unwrap()
            .into_fastest_layout();
        assert_eq!(tw.kind(), "q8_0");
        rw.matmul(&x, m, &mut a);
        tw.matmul(&x, m, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                "q8_0 {i}: {p} vs {q}"
            );
        }
    }
}
