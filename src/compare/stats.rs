//! The numbers of `compare`: log-softmax statistics and KL divergence of two logits rows in
//! f64, and llama-perplexity's summary statistics over positions.

pub use crate::schema::compare::Spread;
use multiversion::multiversion;

const LANES: usize = 8;

/// e^x for x ≤ 0 in f64 (x < −708 gives 0): Cody–Waite reduction to |r| ≤ ln2/2 and a
/// degree-12 Taylor polynomial, relative error ≈ 2e-16. Written lane-wise so the row passes
/// below vectorize; the standard library's `exp` is a scalar call per element.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: the high part has trailing zero bits, so n·LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52: adding it rounds to an integer
    let x = if x < -708.0 { -708.0 } else { x };
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Horner form of Σ r^i / i!, i = 0..12.
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let bits = (k.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    p * f64::from_bits(((bits + 1023) as u64) << 52)
}

/// ln Σ e^x over a row, in f64. Infinite entries: −∞ adds nothing; a row of all −∞ gives −∞.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let max = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        return f64::from(max);
    }
    f64::from(max) + sum_exp(x, f64::from(max)).ln()
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
fn sum_exp(x: &[f32], max: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += exp_nonpos(f64::from(c[j]) - max);
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in chunks.remainder() {
        s += exp_nonpos(f64::from(v) - max);
    }
    s
}

/// KL(A‖B) = Σ p_A (ln p_A − ln p_B) in nats, with p = softmax(logits), all in f64.
///
/// Tokens with p_A = 0 add nothing; a token B gives −∞ where A does not makes the divergence
/// +∞ (as it is). Two passes over the rows, not three: with Z = Σ e^(a−max_A),
/// KL = Σ e^(a−max_A)·(a − b) / Z − (lse_A − lse_B), so A's exponentials give its log-sum-exp
/// and the divergence at once (lse_A bit for bit as [`log_sum_exp`] makes it, so equal rows
/// give 0 exactly). The shift between the rows' logits cancels between the two terms, to
/// ~1e-15 nats.
pub fn kl_divergence(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let lse_b = log_sum_exp(b);
    let max = a
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        // No distribution, or one with an infinite logit: left to the per-token form.
        return kl_sum(a, b, log_sum_exp(a), lse_b).max(0.0);
    }
    let max = f64::from(max);
    let (z, s) = exp_sums(a, b, max);
    let lse_a = max + z.ln();
    // Rounding can leave −1e-17 for equal rows; KL is never negative.
    (s / z - (lse_a - lse_b)).max(0.0)
}

/// Σ e^(a−max) (summed as [`sum_exp`] sums it) and Σ e^(a−max)·(a − b) over the tokens A
/// gives a probability.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
fn exp_sums(a: &[f32], b: &[f32], max: f64) -> (f64, f64) {
    let mut z = [0f64; LANES];
    let mut s = [0f64; LANES];
    let term = |x: f32, y: f32| -> (f64, f64) {
        let e = exp_nonpos(f64::from(x) - max);
        if x == f32::NEG_INFINITY {
            (e, 0.0)
        } else {
            (e, e * (f64::from(x) - f64::from(y)))
        }
    };
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            let (e, t) = term(x[j], y[j]);
            z[j] += e;
            s[j] += t;
        }
    }
    let (mut z_sum, mut s_sum): (f64, f64) = (z.iter().sum(), s.iter().sum());
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        let (e, t) = term(x, y);
        z_sum += e;
        s_sum += t;
    }
    (z_sum, s_sum)
}

/// Σ p_A (ln p_A − ln p_B) token by token, from both rows' log-sum-exp.
fn kl_sum(a: &[f32], b: &[f32], lse_a: f64, lse_b: f64) -> f64 {
    let term = |x: f32, y: f32| -> f64 {
        let la = f64::from(x) - lse_a;
        if la == f64::NEG_INFINITY {
            return 0.0;
        }
        let lb = f64::from(y) - lse_b;
        exp_nonpos(la.min(0.0)) * (la - lb)
    };
    a.iter().zip(b).map(|(&x, &y)| term(x, y)).sum()
}

/// Mean and its standard error (sample standard deviation / √n).
pub fn mean_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// Pearson correlation of two equally long series (NaN when either is constant).
pub fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    sxy / (sxx * syy).sqrt()
}

/// The `q`-th quantile (0 ≤ q ≤ 1) of sorted values, interpolating linearly between the two
/// nearest ranks (numpy's default).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let (mean, stderr) = mean_stderr(values);
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| quantile_sorted(&s, p);
        Spread {
            mean,
            stderr,
            max: s.last().copied().unwrap_or(f64::NAN),
            p99_9: q(0.999),
            p99: q(0.99),
            p95: q(0.95),
            p90: q(0.90),
            p75: q(0.75),
            median: q(0.5),
            p25: q(0.25),
            p10: q(0.10),
            p5: q(0.05),
            p1: q(0.01),
            p0_1: q(0.001),
            min: s.first().copied().unwrap_or(f64::NAN),
        }
    }

    /// Δp's rows in llama-perplexity's order: [`Spread::rows`] with the 75th and 25th
    /// percentiles.
    pub fn rows_with_quartiles(&self) -> Vec<(&'static str, f64)> {
        let mut v = self.rows().to_vec();
        v.insert(5, ("75.0%", self.p75));
        v.insert(7, ("25.0%", self.p25));
        v
    }

    /// (name, value) rows in llama-perplexity's order.
    pub fn rows(&self) -> [(&'static str, f64); 11] {
        [
            ("Maximum", self.max),
            ("99.9%", self.p99_9),
            ("99.0%", self.p99),
            ("95.0%", self.p95),
            ("90.0%", self.p90),
            ("Median", self.median),
            ("10.0%", self.p10),
            ("5.0%", self.p5),
            ("1.0%", self.p1),
            ("0.1%", self.p0_1),
            ("Minimum", self.min),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_for_delta_p_and_older_files_without_them() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        let sp = Spread::of(&v);
        assert_eq!((sp.p75, sp.median, sp.p25), (75.0, 50.0, 25.0));
        let names: Vec<&str> = sp.rows_with_quartiles().iter().map(|r| r.0).collect();
        assert_eq!(&names[4..9], ["90.0%", "75.0%", "Median", "25.0%", "10.0%"]);
        let mut json = serde_json::to_value(&sp).unwrap();
        json.as_object_mut().unwrap().remove("p75");
        let back: Spread = serde_json::from_value(json).unwrap();
        assert!(back.p75.is_nan() && back.p25 == 25.0);
    }

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        let mut x = 0.0f64;
        while x > -745.0 {
            let (got, want) = (exp_nonpos(x), x.max(-708.0).exp());
            assert!(
                (got - want).abs() <= 4.0 * f64::EPSILON * want,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.0137;
        }
    }

    #[test]
    fn quantiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert_eq!(quantile_sorted(&v, 0.5), 2.5);
        assert!((quantile_sorted(&v, 0.1) - 1.3).abs() < 1e-12);
    }
}
