//! GGML block formats the CPU path keeps quantized by converting them, exactly, into its own
//! kernel formats (see `quant` and `tiled`).
//!
//! Every format here is, per sub-block of 32 (or 16) values, an integer code times a scale plus
//! an offset. [`decode_row`] takes one weight row of GGML blocks apart into those codes, scales
//! and offsets: the numbers GGML's own dequantizer multiplies, with the K-quants' six-bit
//! sub-block scales already applied to their super-block scale in `f32` (as GGML does; an
//! `f16` times a six-bit integer is exact in `f32`). Nothing is rounded on the way, so the
//! kernels see the weights the file holds.
//!
//! | GGML type | block | value | becomes |
//! |---|---|---|---|
//! | `Q4_0` | 32 | `d (q - 8)`, q 4-bit | [`Family::Q4`]: `d q + m`, m = -8 d |
//! | `Q4_1` | 32 | `d q + m` | [`Family::Q4`] |
//! | `Q8_0` | 32 | `d q`, q signed 8-bit | [`Family::Q8`] (codes stored as their bytes) |
//! | `Q4_K` | 256 in 8 x 32 | `d sc q - dmin mn` | [`Family::Q4`]: d = d sc, m = -dmin mn |
//! | `Q5_0` | 32 | `d (q - 16)`, q 5-bit | [`Family::Q5`]: m = -16 d |
//! | `Q5_1` | 32 | `d q + m` | [`Family::Q5`] |
//! | `Q5_K` | 256 in 8 x 32 | `d sc q - dmin mn` | [`Family::Q5`] |
//! | `Q6_K` | 256 in 16 x 16 | `d sc (q - 32)`, q 6-bit | [`Family::Q6`]: per 16, d = d sc |

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use half::f16;

/// The kernel family a GGML type converts into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// 4-bit codes, a scale and an offset per 32 values (the `Q4_1` kernels).
    Q4,
    /// 5-bit codes, a scale and an offset per 32 values.
    Q5,
    /// 6-bit codes, value = scale * (code - 32), a scale per 16 values.
    Q6,
    /// Signed 8-bit codes (as their bytes), value = scale * code.
    Q8,
}

impl Family {
    /// Scales (and offsets) per 32 values.
    pub fn scales_per_block(self) -> usize {
        match self {
            Family::Q4 | Family::Q5 | Family::Q8 => 1,
            Family::Q6 => 2,
        }
    }
}

/// The family `dtype` converts into, if any.
pub fn family(dtype: GgmlDType) -> Option<Family> {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => Some(Family::Q4),
        GgmlDType::Q8_0 => Some(Family::Q8),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => Some(Family::Q5),
        GgmlDType::Q6K => Some(Family::Q6),
        _ => None,
    }
}

/// Bytes per block and values per block of a type [`family`] knows.
fn block_shape(dtype: GgmlDType) -> (usize, usize) {
    (dtype.type_size(), dtype.block_size())
}

/// Bytes one row of `cols` values takes in `dtype` (an error when `cols` is not a whole number
/// of blocks).
pub fn row_bytes(dtype: GgmlDType, cols: usize) -> Result<usize> {
    let (bytes, values) = block_shape(dtype);
    if !cols.is_multiple_of(values) {
        bail!("a {dtype:?} row of {cols} values is not a whole number of {values}-value blocks");
    }
    Ok(cols / values * bytes)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// GGML's `get_scale_min_k4`: the six-bit scale and minimum of sub-block `j` (0..8) of a
/// `Q4_K` / `Q5_K` super-block, from its 12 packed bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One row of GGML blocks decoded: `q[i]` the code of value `i`; `d[s]`, `m[s]` the scale and
/// offset of sub-block `s` (32 values for Q4 / Q5, 16 for Q6, whose `m` is left alone).
pub fn decode_row(dtype: GgmlDType, raw: &[u8], q: &mut [u8], d: &mut [f32], m: &mut [f32]) {
    let (bytes, values) = block_shape(dtype);
    debug_assert_eq!(raw.len() / bytes * values, q.len());
    for (bi, blk) in raw.chunks_exact(bytes).enumerate() {
        let q = &mut q[bi * values..(bi + 1) * values];
        match dtype {
            GgmlDType::Q4_0 => {
                let dd = f16_at(blk, 0);
                for j in 0..16 {
                    q[j] = blk[2 + j] & 0x0f;
                    q[j + 16] = blk[2 + j] >> 4;
                }
                d[bi] = dd;
                m[bi] = -8.0 * dd;
            }
            GgmlDType::Q4_1 => {
                for j in 0..16 {
                    q[j] = blk[4 + j] & 0x0f;
                    q[j + 16] = blk[4 + j] >> 4;
                }
                d[bi] = f16_at(blk, 0);
                m[bi] = f16_at(blk, 2);
            }
            GgmlDType::Q8_0 => {
                q.copy_from_slice(&blk[2..34]);
                d[bi] = f16_at(blk, 0);
            }
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                let dd = f16_at(blk, 0);
                let (mm, o) = if dtype == GgmlDType::Q5_0 {
                    (-16.0 * dd, 2)
                } else {
                    (f16_at(blk, 2), 4)
                };
                let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                let qs = &blk[o + 4..o + 20];
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                    q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
                d[bi] = dd;
                m[bi] = mm;
            }
            GgmlDType::Q4K | GgmlDType::Q5K => {
                let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let (qh, ql): (Option<&[u8]>, &[u8]) = if dtype == GgmlDType::Q5K {
                    (Some(&blk[16..48]), &blk[48..176])
                } else {
                    (None, &blk[16..144])
                };
                for pair in 0..4 {
                    let ql = &ql[32 * pair..32 * pair + 32];
                    for half in 0..2 {
                        let s = 2 * pair + half;
                        let (sc, mn) = scale_min_k4(s, scales);
                        d[bi * 8 + s] = dd * sc as f32;
                        m[bi * 8 + s] = -(dmin * mn as f32);
                        for l in 0..32 {
                            let nib = if half == 0 { ql[l] & 0x0f } else { ql[l] >> 4 };
                            let hi = qh.map_or(0, |h| ((h[l] >> s) & 1) << 4);
                            q[32 * s + l] = nib | hi;
                        }
                    }
                }
            }
            GgmlDType::Q6K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let dd = f16_at(blk, 208);
                for n in 0..2 {
                    let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
                    let y = &mut q[128 * n..128 * n + 128];
                    for l in 0..32 {
                        y[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                        y[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                        y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for s in 0..16 {
                    d[bi * 16 + s] = dd * (sc[s] as i8) as f32;
                }
            }
            _ => unreachable!("decode_row called with {dtype:?}"),
        }
    }
}

/// Takes one decoded row: its index, codes, sub-block scales and offsets.
pub type RowSink<'a> = dyn FnMut(usize, &[u8], &[f32], &[f32]) + 'a;

/// Reads the rows starting at a row into a buffer that holds a whole number of rows.
pub type ReadRows<'a> = dyn FnMut(usize, &mut [u8]) -> Result<()> + 'a;

/// Rows read at once: the tensor never has to be in memory whole, raw and converted at once.
const ROWS_PER_READ: usize = 64;

/// Decodes row after row of a `[rows, cols]` tensor in `dtype`, reading its blocks a few rows
/// at a time with `read`, and calls `f(row, q, d, m)` for each.
pub fn for_each_row(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    read: &mut ReadRows<'_>,
    f: &mut crate::blocks::RowSink<'_>,
) -> Result<()> {
    let Some(fam) = family(dtype) else {
        bail!("{dtype:?} has no converted kernel format");
    };
    let rb = row_bytes(dtype, cols)?;
    let subs = cols / 32 * fam.scales_per_block();
    let (mut q, mut d, mut m) = (vec![0u8; cols], vec![0f32; subs], vec![0f32; subs]);
    let mut buf = vec![0u8; rb * ROWS_PER_READ.min(rows)];
    let mut first = 0;
    while first < rows {
        let n = ROWS_PER_READ.min(rows - first);
        read(first, &mut buf[..n * rb])?;
        for (i, row) in buf[..n * rb].chunks_exact(rb).enumerate() {
            decode_row(dtype, row, &mut q, &mut d, &mut m);
            f(first + i, &q, &d, &m);
        }
        first += n;
    }
    Ok(())
}

/// A reader over a tensor's bytes in memory, after checking their length.
pub fn from_slice<'a>(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    raw: &'a [u8],
) -> Result<impl FnMut(usize, &mut [u8]) -> Result<()> + 'a> {
    let rb = row_bytes(dtype, cols)?;
    if raw.len() != rb * rows {
        bail!(
            "{dtype:?} weight [{rows}, {cols}] needs {} bytes, found {}",
            rb * rows,
            raw.len()
        );
    }
    Ok(move |first: usize, buf: &mut [u8]| {
        buf.copy_from_slice(&raw[first * rb..first * rb + buf.len()]);
        Ok(())
    })
}

/// The value of code `q` in sub-block scale `d` and offset `m` of `fam` (the reference the
/// conversions are tested against).
pub fn value(fam: Family, q: u8, d: f32, m: f32) -> f32 {
    match fam {
        Family::Q4 | Family::Q5 => d * q as f32 + m,
        Family::Q6 => d * (q as i32 - 32) as f32,
        Family::Q8 => d * (q as i8) as f32,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::quant::tests::lcg;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
    use candle_core::Device;

    /// Random but valid blocks of `dtype` for a `[rows, cols]` tensor: small positive `f16`
    /// scales, random bytes everywhere else.
    pub(crate) fn random_blocks(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        seed: &mut u64,
    ) -> Vec<u8> {
        let (bytes, values) = block_shape(dtype);
        let mut raw = Vec::new();
        for _ in 0..rows * cols / values {
            let mut blk: Vec<u8> = (0..bytes)
                .map(|_| ((lcg(seed) + 1.0) * 127.9) as u8)
                .collect();
            let scale =
                |seed: &mut u64| f16::from_f32(0.002 + lcg(seed).abs() * 0.01).to_le_bytes();
            match dtype {
                GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => {
                    blk[0..2].copy_from_slice(&scale(seed))
                }
                GgmlDType::Q5_1 | GgmlDType::Q4_1 => {
                    blk[0..2].copy_from_slice(&scale(seed));
                    blk[2..4].copy_from_slice(&f16::from_f32(lcg(seed) * 0.2).to_le_bytes());
                }
                GgmlDType::Q4K | GgmlDType::Q5K => {
                    blk[0..2].copy_from_slice(&scale(seed));
                    blk[2..4].copy_from_slice(&scale(seed));
                }
                GgmlDType::Q6K => blk[208..210].copy_from_slice(&scale(seed)),
                _ => unreachable!(),
            }
            raw.extend(blk);
        }
        raw
    }

    /// The values of a `[rows, cols]` tensor of `dtype` blocks, by candle's GGML dequantizer.
    pub(crate) fn ggml_dequantized(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Vec<f32> {
        qtensor_from_ggml(dtype, raw, vec![rows, cols], &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
    }

    pub(crate) const TYPES: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Every decoded value is, bit for bit, what candle's GGML dequantizer makes of the block.
    #[test]
    fn decoded_rows_are_ggmls_values() {
        let mut seed = 3u64;
        let (rows, cols) = (4, 512);
        for dtype in TYPES {
            let raw = random_blocks(dtype, rows, cols, &mut seed);
            let want = ggml_dequantized(dtype, rows, cols, &raw);
            let fam = family(dtype).unwrap();
            let per = 32 / fam.scales_per_block();
            let mut read = from_slice(dtype, rows, cols, &raw).unwrap();
            for_each_row(dtype, rows, cols, &mut read, &mut |r, q, d, m| {
                for c in 0..cols {
                    let s = c / per;
                    let mm = if fam == Family::Q6 { 0.0 } else { m[s] };
                    let got = value(fam, q[c], d[s], mm);
                    let exp = want[r * cols + c];
                    assert!(
                        (got - exp).abs() <= 1e-6 * exp.abs().max(1e-3),
                        "{dtype:?} row {r} col {c}: {got} vs {exp}"
                    );
                }
            })
            .unwrap();
        }
    }

    #[test]
    fn a_row_that_is_not_whole_blocks_is_an_error() {
        let err = from_slice(GgmlDType::Q4K, 1, 96, &[0u8; 144])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("whole number of 256-value blocks"),
            "{err}"
        );
    }
}
