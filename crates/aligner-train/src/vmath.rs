//! Elementwise helpers written so the compiler vectorizes them: `exp` without a libm call,
//! and sums, dot products and maxima with independent lanes (a plain `iter().sum()` of
//! floats is one serial chain of additions).

const LANES: usize = 16;

/// `e^x` to about 2 ulp for `x` in `[-87, 88]`, 0 below (Cephes' range reduction and
/// polynomial; branch-free so loops over it vectorize).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let k = (xc * LOG2E + 0.5).floor();
    let r = xc - k * C1 - k * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// `1 / (1 + e^-a)`.
#[inline(always)]
pub fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> ([f32; LANES], &[f32]) {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = f(acc[i], c[i]);
        }
    }
    (acc, rest)
}

pub fn sum(xs: &[f32]) -> f32 {
    let (acc, rest) = lanes(xs, 0.0, |a, x| a + x);
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The largest element (NaNs are not propagated).
pub fn max(xs: &[f32]) -> f32 {
    // A plain comparison, unlike `f32::max`'s NaN rule, compiles to vector max instructions.
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let (acc, rest) = lanes(xs, f32::NEG_INFINITY, pick);
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| pick(a, b))
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `Σ a·b·c`.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for j in (0..full).step_by(LANES) {
        let (x, y, z) = (&a[j..j + LANES], &b[j..j + LANES], &c[j..j + LANES]);
        for i in 0..LANES {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    acc.iter().sum::<f32>() + (full..n).map(|i| a[i] * b[i] * c[i]).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn reductions_match_serial_ones() {
        let xs: Vec<f32> = (0..100).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        let ys: Vec<f32> = (0..100).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
        assert_eq!(sum(&xs), xs.iter().sum::<f32>());
        assert_eq!(max(&xs), 11.0);
        let d: f32 = xs.iter().zip(&ys).map(|(a, b)| a * b).sum();
        assert!((dot(&xs, &ys) - d).abs() < 1e-3);
        let d3: f32 = xs.iter().zip(&ys).map(|(a, b)| a * b * a).sum();
        assert!((dot3(&xs, &ys, &xs) - d3).abs() < 1e-2);
    }
}
