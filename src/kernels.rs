//! Vectorizable passes over one logits row.
//!
//! Every pass uses plain IEEE-754 adds and multiplies in a fixed order (16 lanes, no fused
//! multiply-add), so the results are bit-identical whatever SIMD width the CPU offers: the
//! same logits give the same probabilities, and so the same sampled token, on every machine.
//! `multiversion` compiles each pass for wider vector units and picks one at run time; that
//! changes the speed, never the numbers.

use multiversion::multiversion;

const LANES: usize = 16;
/// Elements summed in f32 lanes before the partial sums move to f64: keeps the relative error
/// of a 151,936-entry sum near 1e-7.
const CHUNK: usize = LANES * 4;
/// Size of the blocks whose maxima steer the top-k gather.
pub const BLOCK: usize = 64;

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 × 2^23: adding it rounds to an integer and leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this, e^z is under f32's smallest normal number and is taken as 0.
const Z_MIN: f32 = -87.0;
const Z_MAX: f32 = 88.0;

/// e^r on |r| ≤ ln2/2: Taylor series to degree 6, truncation error ≤ 1.2e-7.
#[inline(always)]
fn poly(r: f32) -> f32 {
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p * r + 1.0
}

/// e^z, within ~3 ulp, deterministic on every platform. NaN stays NaN; z < −87 (and −∞) → 0.
#[inline(always)]
pub fn exp(z: f32) -> f32 {
    let zc = if z > Z_MAX { Z_MAX } else { z };
    let zc = if zc < Z_MIN { Z_MIN } else { zc };
    let k = zc * LOG2E + ROUND_MAGIC;
    let n = k - ROUND_MAGIC;
    let n_int = (k.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = (zc - n * LN2_HI) - n * LN2_LO;
    let p = poly(r);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    let e = p * scale;
    if z < Z_MIN {
        0.0
    } else {
        e
    }
}

/// Fills `blocks` with the maximum of each [`BLOCK`]-sized block of `x` and returns the row
/// maximum, or NaN when the row holds a NaN. An all −∞ row gives −∞.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn block_max(x: &[f32], blocks: &mut Vec<f32>) -> f32 {
    blocks.clear();
    let mut total = f32::NEG_INFINITY;
    // NaN != NaN: a lane adds NaN to its sum once it meets one, so one NaN poisons the row.
    let mut poison = [0f32; LANES];
    let mut chunks = x.chunks_exact(BLOCK);
    for c in &mut chunks {
        let mut m = [f32::NEG_INFINITY; LANES];
        for part in c.chunks_exact(LANES) {
            for j in 0..LANES {
                m[j] = if part[j] > m[j] { part[j] } else { m[j] };
                poison[j] += if part[j].is_nan() { f32::NAN } else { 0.0 };
            }
        }
        let mut b = m[0];
        for &v in &m[1..] {
            b = if v > b { v } else { b };
        }
        blocks.push(b);
        total = if b > total { b } else { total };
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut b = f32::NEG_INFINITY;
        for &v in rem {
            b = if v > b { v } else { b };
            if v.is_nan() {
                poison[0] = f32::NAN;
            }
        }
        blocks.push(b);
        total = if b > total { b } else { total };
    }
    if poison.iter().any(|p| p.is_nan()) {
        f32::NAN
    } else {
        total
    }
}

/// Σ e^z and Σ z·e^z over the row, z = (x − max)·inv_t ≤ 0, summed in f32 lanes per
/// chunk and f64 across chunks.
///
/// The same arithmetic as [`exp`], lane-wise so it compiles to vector code, and leaner: z is
/// never positive here, and z < −87 (−∞ included) is clamped to −87, where e^z ≈ 1.6e-38
/// adds nothing measurable. NaN is not detected here: [`block_max`] reports it.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn exp_sums(x: &[f32], max: f32, inv_t: f32) -> (f64, f64) {
    let mut s64 = [0f64; LANES];
    let mut sz64 = [0f64; LANES];
    let mut chunks = x.chunks_exact(CHUNK);
    for c in &mut chunks {
        let mut s = [0f32; LANES];
        let mut sz = [0f32; LANES];
        for part in c.chunks_exact(LANES) {
            for j in 0..LANES {
                let z = (part[j] - max) * inv_t;
                let z = if z < Z_MIN { Z_MIN } else { z };
                let k = z * LOG2E + ROUND_MAGIC;
                let n = k - ROUND_MAGIC;
                let bits = (k.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
                let r = (z - n * LN2_HI) - n * LN2_LO;
                let p = poly(r);
                let e = p * f32::from_bits((bits.wrapping_add(127) as u32) << 23);
                s[j] += e;
                sz[j] += z * e;
            }
        }
        for j in 0..LANES {
            s64[j] += f64::from(s[j]);
            sz64[j] += f64::from(sz[j]);
        }
    }
    let mut s = s64.iter().sum::<f64>();
    let mut sz = sz64.iter().sum::<f64>();
    for &v in chunks.remainder() {
        let z = (v - max) * inv_t;
        let z = if z < Z_MIN { Z_MIN } else { z };
        let e = exp(z);
        s += f64::from(e);
        sz += f64::from(z) * f64::from(e);
    }
    (s, sz)
}

/// Number of entries strictly greater than `v` (a rank over the full row).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn count_greater(x: &[f32], v: f32) -> usize {
    let mut acc = [0u32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    let mut total = 0usize;
    for (i, c) in (&mut chunks).enumerate() {
        for j in 0..LANES {
            acc[j] += u32::from(c[j] > v);
        }
        // Flush before a u32 lane could overflow on absurdly long rows.
        if i % (1 << 20) == (1 << 20) - 1 {
            total += acc.iter().map(|&a| a as usize).sum::<usize>();
            acc = [0; LANES];
        }
    }
    total += acc.iter().map(|&a| a as usize).sum::<usize>();
    total + chunks.remainder().iter().filter(|&&x| x > v).count()
}

/// Σx: the cost of reading the row once, the floor the probe's benchmark compares with.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut z = -87.0f32;
        while z <= 20.0 {
            let want = f64::from(z).exp();
            let got = f64::from(exp(z));
            worst = worst.max(((got - want) / want).abs());
            z += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn passes_match_scalar() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 5.0)
            .collect();
        let mut blocks = Vec::new();
        let m = block_max(&x, &mut blocks);
        assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(blocks.len(), 1000usize.div_ceil(BLOCK));
        let (s, sz) = exp_sums(&x, m, 1.25);
        let (rs, rsz) = x.iter().fold((0f64, 0f64), |(a, b), &v| {
            let z = f64::from((v - m) * 1.25);
            (a + z.exp(), b + z * z.exp())
        });
        assert!((s - rs).abs() / rs < 1e-6);
        assert!((sz - rsz).abs() / rsz.abs() < 1e-6);
        assert_eq!(
            count_greater(&x, 0.0),
            x.iter().filter(|&&v| v > 0.0).count()
        );
        let mut y = x.clone();
        y[500] = f32::NAN;
        assert!(block_max(&y, &mut blocks).is_nan());
        y[500] = f32::NEG_INFINITY;
        assert_eq!(block_max(&y, &mut blocks), m);
    }
}
