//! Top-p nuclei too wide to sort (a nearly flat row of a large vocabulary at a high
//! temperature: 10^5 tokens), found and drawn from without sorting them, with the same
//! tokens as the sorted walk.
//!
//! The sampler walks the processed order (logit descending, id ascending) adding f32 weights
//! in f64, and stops where the sum reaches the target. Those sums are exact when every weight
//! added is a multiple of the smallest one's ulp and the total stays below 2^52 of those ulps
//! (then every partial sum is an integer multiple of it below 2^52, representable in f64):
//! they do not depend on the order of the additions. Here a sample of the row brackets the
//! position, one vectorized pass sums the weights before and through the bracket, and only
//! the bracket (a few thousand entries) is sorted and walked. When the sums would not be
//! exact, or the bracket misses, the caller sorts as before; a miss costs time, never tokens.

use crate::compare::stats::exp_nonpos;
use crate::kernels::{self, Position};
use crate::probe::RowSums;
use multiversion::multiversion;

/// Entries in the row's sample.
const SAMPLE: usize = 2048;

/// Where the cumulative weight reached its target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    /// Entries up to and including it.
    pub n: usize,
    pub at: Position,
    /// The cumulative weight through it.
    pub cum: f64,
}

impl Found {
    pub(crate) fn id(&self) -> u32 {
        self.at as u32
    }
}

/// A top-p nucleus found by [`Wide::find`], with its sums for the processed description.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WideCut {
    /// Its last position; `cut.n` tokens, `cut.cum` their total weight.
    pub cut: Found,
    /// Σe^z and Σz·e^z over the nucleus ([`Wide::sums`]).
    pub s: f64,
    pub sz: f64,
}

/// Why [`Wide::find`] has no position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Miss {
    /// The sums up to the limit stay short of the target.
    NotReached,
    /// The sums would not be exact, or the sample's brackets missed.
    GaveUp,
}

/// Scratch of the wide-nucleus search; reused from row to row.
#[derive(Default)]
pub(crate) struct Wide {
    weights: Vec<f32>,
    sample: Vec<Position>,
    bracket: Vec<Position>,
}

/// Whether f64 sums of weights, each at least `min_weight`, totalling `total`, are exact.
fn exact(total: f64, min_weight: f32) -> bool {
    if min_weight == f32::INFINITY {
        return true;
    }
    // min_weight is a normal f32 (the exponential flushes what lies below 2^-126 to 0).
    let exponent = ((min_weight.to_bits() >> 23) & 0xff) as i32 - 127;
    total < 2f64.powi(exponent - 23 + 52)
}

impl Wide {
    /// The sampling weights of the whole row (`kernels::exp` of (l − max)·inv_t, the same
    /// bits as the sampler's).
    pub(crate) fn weigh(&mut self, row: &RowSums) {
        kernels::exp_weights(row.logits, row.max, row.inv_t, &mut self.weights);
    }

    /// The first position of the (logit desc, id asc) order, not past `limit`, at which the
    /// cumulative weight reaches `target` (`≥`, or `>` when `strict`): the sampler's walk
    /// over the sorted order, without the sort.
    pub(crate) fn find(
        &mut self,
        logits: &[f32],
        target: f64,
        strict: bool,
        limit: Position,
    ) -> Result<Found, Miss> {
        let reached = |c: f64| if strict { c > target } else { c >= target };
        let stride = (logits.len() / SAMPLE).max(1);
        self.sample.clear();
        self.sample.extend(
            (0..logits.len())
                .step_by(stride)
                .map(|i| kernels::position(logits[i], i as u32))
                .filter(|&k| k <= limit),
        );
        self.sample.sort_unstable();
        // Each sampled entry stands for `stride` entries of the row.
        let mut cum = 0f64;
        let mut at = self.sample.len();
        for (j, &k) in self.sample.iter().enumerate() {
            cum += f64::from(self.weights[k as u32 as usize]) * stride as f64;
            if cum >= target {
                at = j;
                break;
            }
        }
        let mut margin = 24;
        for _ in 0..3 {
            let hi = at.checked_sub(margin).map_or(0, |j| self.sample[j]);
            let lo = self.sample.get(at + margin).copied().unwrap_or(limit);
            self.bracket.clear();
            let m = kernels::prefix_mass(logits, &self.weights, hi, lo, &mut self.bracket);
            if !exact(m.through_lo, m.min_weight) {
                return Err(Miss::GaveUp);
            }
            if !reached(m.through_lo) {
                if lo == limit {
                    return Err(Miss::NotReached);
                }
                margin *= 4;
                continue;
            }
            if reached(m.before_hi) {
                margin *= 4;
                continue;
            }
            // Every sum from here on adds weights of entries up to `lo`: exact.
            self.bracket.sort_unstable();
            let (mut cum, mut n) = (m.before_hi, m.count_before_hi);
            for &k in &self.bracket {
                cum += f64::from(self.weights[k as u32 as usize]);
                n += 1;
                if reached(cum) {
                    return Ok(Found { n, at: k, cum });
                }
            }
            return Err(Miss::GaveUp);
        }
        Err(Miss::GaveUp)
    }

    /// [`Wide::find`] that never gives up: the sorted walk over everything up to `limit`
    /// when the search does (a draw has used its random number by then).
    pub(crate) fn find_or_walk(
        &mut self,
        logits: &[f32],
        target: f64,
        strict: bool,
        limit: Position,
    ) -> Result<Found, Miss> {
        match self.find(logits, target, strict, limit) {
            Err(Miss::GaveUp) => {}
            other => return other,
        }
        self.bracket.clear();
        self.bracket.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| kernels::position(l, i as u32))
                .filter(|&k| k <= limit),
        );
        self.bracket.sort_unstable();
        let mut cum = 0f64;
        for (j, &k) in self.bracket.iter().enumerate() {
            cum += f64::from(self.weights[k as u32 as usize]);
            if if strict { cum > target } else { cum >= target } {
                return Ok(Found {
                    n: j + 1,
                    at: k,
                    cum,
                });
            }
        }
        Err(Miss::NotReached)
    }

    /// Σe^z and Σz·e^z over the nucleus (the positions up to `cut.at`), z in f64 as the
    /// sorted path takes them; the exponentials vectorized (within 2e-16 of the standard
    /// library's), added in id order instead of the sorted order.
    pub(crate) fn sums(&self, row: &RowSums, cut: &Found) -> (f64, f64) {
        nucleus_sums(row.logits, row.max, row.inv_t64, cut.at)
    }
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
fn nucleus_sums(logits: &[f32], max: f32, inv_t: f64, cut: Position) -> (f64, f64) {
    const L: usize = 8;
    let max = f64::from(max);
    // Branch-free, so that the lanes vectorize: tokens outside add 0.
    #[inline(always)]
    fn term(l: f32, i: usize, max: f64, inv_t: f64, cut: Position) -> (f64, f64) {
        let inside = (kernels::position(l, i as u32) <= cut) & (l != f32::NEG_INFINITY);
        let z = if inside {
            (f64::from(l) - max) * inv_t
        } else {
            0.0
        };
        let e = exp_nonpos(z);
        (
            if inside { e } else { 0.0 },
            if inside { z * e } else { 0.0 },
        )
    }
    let (mut s, mut sz) = ([0f64; L], [0f64; L]);
    let mut chunks = logits.chunks_exact(L);
    for (c, chunk) in (&mut chunks).enumerate() {
        for j in 0..L {
            let (e, ze) = term(chunk[j], c * L + j, max, inv_t, cut);
            s[j] += e;
            sz[j] += ze;
        }
    }
    let (mut s, mut sz) = (s.iter().sum::<f64>(), sz.iter().sum::<f64>());
    let whole = logits.len() - chunks.remainder().len();
    for (k, &l) in chunks.remainder().iter().enumerate() {
        let (e, ze) = term(l, whole + k, max, inv_t, cut);
        s += e;
        sz += ze;
    }
    (s, sz)
}

#[cfg(test)]
mod tests {
    use crate::probe::{Probe, ProbeConfig, StepOptions, StepProbe};
    use crate::sampler::{Rng, SamplingConfig};

    fn rows() -> Vec<(&'static str, Vec<f32>)> {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let n = 151_936;
        let flat: Vec<f32> = (0..n).map(|_| 0.5 * uniform() as f32).collect();
        // Seven values: ties everywhere, the cut and the draw inside a run of equal logits.
        let tied: Vec<f32> = (0..n)
            .map(|_| (uniform() * 7.0).floor() as f32 * 0.05)
            .collect();
        let mut holes = flat.clone();
        for i in (0..n).step_by(97) {
            holes[i] = f32::NEG_INFINITY;
        }
        // +0 and −0 both present (their keys differ, the floats compare equal).
        let zeros: Vec<f32> = (0..n)
            .map(|i| match i % 3 {
                0 => 0.0,
                1 => -0.0,
                _ => -0.01 * (i % 11) as f32,
            })
            .collect();
        // A spread too wide for exact sums at T = 1: the search gives up, the sort decides.
        let spread: Vec<f32> = (0..n).map(|_| -40.0 * uniform() as f32).collect();
        // A few peaks above a flat floor of many tokens.
        let mut peaks = flat.clone();
        for j in 0..5 {
            peaks[j * 30_011] += 3.0;
        }
        vec![
            ("flat", flat),
            ("tied", tied),
            ("holes", holes),
            ("zeros", zeros),
            ("spread", spread),
            ("peaks", peaks),
        ]
    }

    fn step(
        probe: &mut Probe,
        row: &[f32],
        s: &SamplingConfig,
        seed: u64,
        forced: Option<u32>,
    ) -> StepProbe {
        let opts = StepOptions {
            probe: true,
            forced,
            processed_top: 20,
            raw_logprobs: Some(5),
        };
        probe
            .step_with(row, &[], s, &mut Rng::new(seed, 0), &opts)
            .unwrap()
    }

    /// The sorted walk adds ~1.5·10^5 terms one after the other: its rounding is bounded by
    /// n·2^-53 ≈ 1.7e-11 relative (1e-12 seen); the search's eight lanes in id order round
    /// less.
    fn close(a: f64, b: f64) -> bool {
        a == b || (a - b).abs() <= 2e-11 * a.abs().max(b.abs())
    }

    /// The wide-nucleus search against the sorted walk: the same selected token and kept
    /// count, the same raw description bit for bit, the processed one with its sums added in
    /// another order (within the sorted walk's rounding, 2e-11); on flat, tied, −∞-holed, ±0 and peaked rows, top-p 0.5
    /// to 0.999, drawn and forced (inside and outside the nucleus).
    #[test]
    fn wide_search_equals_the_sorted_walk() {
        let mut wide = Probe::new(ProbeConfig::default());
        let mut sorted = Probe::new(ProbeConfig::default());
        sorted.no_wide = true;
        for (name, row) in rows() {
            for (t, p) in [(0.8, 0.95), (1.0, 0.5), (1.3, 0.999), (0.8, 0.8)] {
                let s = SamplingConfig {
                    temperature: t,
                    top_p: p,
                    ..Default::default()
                };
                for seed in 0..6u64 {
                    let forced = match seed {
                        4 => Some(7),
                        // The lowest logit: outside any nucleus below 1.
                        5 => Some(
                            (0..row.len())
                                .min_by(|&a, &b| row[a].total_cmp(&row[b]))
                                .unwrap() as u32,
                        ),
                        _ => None,
                    };
                    let a = step(&mut wide, &row, &s, seed, forced);
                    let b = step(&mut sorted, &row, &s, seed, forced);
                    let what = format!("{name}, T {t}, top-p {p}, seed {seed}");
                    assert_eq!(a.selected, b.selected, "{what}: selected");
                    assert_eq!(a.raw, b.raw, "{what}: raw");
                    assert_eq!(a.raw_logprobs, b.raw_logprobs, "{what}: raw logprobs");
                    for (x, y) in [
                        (&a.processed, &b.processed),
                        (&a.processed_top, &b.processed_top),
                    ] {
                        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
                        assert_eq!(x.k_used, y.k_used, "{what}: k_used");
                        assert_eq!(x.selected_rank, y.selected_rank, "{what}: rank");
                        assert!(
                            close(x.entropy, y.entropy),
                            "{what}: entropy {} {}",
                            x.entropy,
                            y.entropy
                        );
                        assert!(
                            close(x.selected_prob, y.selected_prob),
                            "{what}: selected prob {} {} rank {} {}",
                            x.selected_prob,
                            y.selected_prob,
                            x.selected_rank,
                            y.selected_rank
                        );
                        assert!(close(x.top_mass_used, y.top_mass_used), "{what}: mass");
                        for (c, d) in x.candidates.iter().zip(&y.candidates) {
                            assert_eq!(c.token_id, d.token_id, "{what}: candidates");
                            assert!(close(c.prob, d.prob), "{what}: candidate prob");
                        }
                    }
                }
            }
        }
        assert!(wide.wide_taken > 100, "the search ran: {}", wide.wide_taken);
        assert_eq!(sorted.wide_taken, 0);
    }
}
