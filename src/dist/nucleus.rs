//! Top-p nuclei too wide to sort (a nearly flat row of a large vocabulary at a high
//! temperature: 10^5 tokens), found and drawn from without sorting them, with the same
//! tokens as the sorted walk.
//!
//! The sampler walks the processed order (logit descending, id ascending) adding f32 weights
//! in f64, and stops where the sum reaches the target. Those sums are exact when every weight
//! added is a multiple of the smallest one's ulp and the total stays below 2^52 of those ulps
//! (then every partial sum is an integer multiple of it below 2^52, representable in f64):
//! they do not depend on the order of the additions.
//!
//! So: a histogram of a sample of the row guesses two places, the nucleus's end and the
//! draw (the uniform number is known before the draw), and puts a bracket of logits around
//! each. One set of vectorized passes ([`kernels::bracket_pass`]) sums the weights above
//! each bracket, lists the few thousand entries inside it, and takes the f64 sums the
//! processed description needs; a weighted quickselect finds each place inside its list.
//! A bracket that missed is widened for another pass; when the sums would not be exact, or
//! three passes missed, the caller sorts as before: a miss costs time, never tokens.
//!
//! What remains of the cost, against a row whose nucleus is a few tokens: the f64
//! exponentials of the nucleus's Σe^z and Σz·e^z (its description agrees with the sorted
//! path's to 2e-11, which f32 sums cannot), and the f32 weights again (the raw pass sums
//! them without keeping them, which keeps that pass lean for every other row).

use crate::dist::kernels::{self, Bracket, Position, Weighted};
use crate::dist::row::RowSums;

/// Entries in the row's sample.
const SAMPLE: usize = 4096;
/// Bins of the sample's histogram.
const BINS: usize = 1024;
/// Passes over the row, each with brackets four times wider, before the caller sorts.
const TRIES: usize = 3;

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

/// A top-p nucleus found by [`Wide::find`], with its sums for the processed description and
/// the draw from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WideCut {
    /// Its last position; `cut.n` tokens, `cut.cum` their total weight.
    pub cut: Found,
    /// Σe^z and Σz·e^z over the nucleus ([`nucleus_sums`]).
    pub s: f64,
    pub sz: f64,
    /// The token drawn with the uniform number [`Wide::find`] was given: the first position
    /// whose cumulative weight exceeds u · `cut.cum`. `None`: not asked, or the search missed
    /// it ([`Wide::draw_sorted`] then finds it).
    pub draw: Option<Found>,
}

/// Why [`Wide::find`] has no nucleus.
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
    /// The sampled logits and their weights, then the sample's histogram.
    logits: Vec<f32>,
    weights: Vec<f32>,
    bins: Bins,
    /// The row's total weight.
    total: f64,
    lists: kernels::BracketLists,
    /// The sorted walk's positions, when every bracket missed a draw.
    sorted: Vec<Position>,
    /// Passes over the row, and draws left to [`Wide::draw_sorted`]: the tests check that
    /// the brackets rarely miss.
    #[cfg(test)]
    pub(crate) passes: usize,
    #[cfg(test)]
    pub(crate) sorted_draws: usize,
}

/// The sample's histogram: bin b holds z in (−(b+1)/per_z, −b/per_z], so bin 0 holds the
/// highest logits.
#[derive(Default)]
struct Bins {
    max: f32,
    inv_t: f32,
    per_z: f32,
    count: Vec<usize>,
    weight: Vec<f64>,
}

impl Bins {
    fn of(&self, z: f32) -> usize {
        ((-z * self.per_z) as usize).min(BINS - 1)
    }

    /// The logit at the top of bin `b`: the entries above it lie in the bins before.
    fn logit_at(&self, b: usize) -> f32 {
        self.max - b as f32 / self.per_z / self.inv_t
    }
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

/// A lower bound of the non-zero weights at or above logit `lo`: the weight at `lo` less a
/// margin (the f32 exponential, within 4 ulp of e^z, can be off monotone by that much, and
/// an f32 z is monotone in the logit), or the row's smallest (`row_min`, ∞ when the pass did
/// not look) when larger or when the bracket reaches the end of the row.
fn min_weight_from(row: &RowSums, lo: f32, row_min: f32) -> f32 {
    if lo > f32::NEG_INFINITY {
        let at_lo = kernels::exp(row.z(lo)) * (1.0 - 1e-6);
        if row_min.is_finite() {
            at_lo.max(row_min)
        } else {
            at_lo
        }
    } else {
        row_min
    }
}

/// What one place in the order is searched for: the first position, not past `limit`, at
/// which the cumulative weight reaches `target` (`≥`, or `>` when `strict`).
#[derive(Debug, Clone, Copy)]
struct Goal {
    target: f64,
    strict: bool,
    limit: Position,
}

impl Goal {
    fn reached(&self, cum: f64) -> bool {
        if self.strict {
            cum > self.target
        } else {
            cum >= self.target
        }
    }
}

impl Wide {
    /// The top-p nucleus of `row`: the first position of the (logit desc, id asc) order at
    /// which the cumulative weight reaches `target`, the sampler's walk over the sorted order
    /// without the sort; with `u`, also the draw from it (`u · cum`, strictly exceeded).
    /// `total` is the row's total weight, as the sampler has it.
    ///
    /// A sample of the row estimates both places; one pass over the row sums the weights
    /// above each estimate's bracket and lists the entries inside it; a weighted quickselect
    /// walks each list. A bracket that missed is widened for the next pass.
    pub(crate) fn find(
        &mut self,
        row: &RowSums,
        total: f64,
        target: f64,
        u: Option<f64>,
    ) -> Result<WideCut, Miss> {
        self.take_sample(row);
        self.total = total;
        let cut_goal = Goal {
            target,
            strict: false,
            limit: Position::MAX,
        };
        let mut cut: Option<(Found, kernels::ExpSums64)> = None;
        let mut draw: Option<Found> = None;
        let mut widen = 1.0;
        for _ in 0..TRIES {
            let draw_goal = u.filter(|_| draw.is_none()).map(|u| match cut {
                Some((c, _)) => Goal {
                    target: u * c.cum,
                    strict: true,
                    limit: c.at,
                },
                // The nucleus's weight is not known yet: estimated by the target it reaches.
                None => Goal {
                    target: u * target,
                    strict: true,
                    limit: Position::MAX,
                },
            });
            let brackets = [
                match cut {
                    None => self.bracket(&cut_goal, widen),
                    Some(_) => Bracket::EMPTY,
                },
                match draw_goal {
                    Some(g) => self.bracket(&g, widen),
                    None => Bracket::EMPTY,
                },
            ];
            let pass = kernels::bracket_pass(
                row.logits,
                row.max,
                row.inv_t,
                row.inv_t64,
                brackets,
                &mut self.lists,
            );
            let masses = pass.brackets;
            #[cfg(test)]
            {
                self.passes += 1;
            }
            for (q, m) in masses.iter().enumerate() {
                let through = m.above
                    + self.lists.between[q]
                        .iter()
                        .map(|e| f64::from(e.1))
                        .sum::<f64>();
                if !exact(
                    through,
                    min_weight_from(row, brackets[q].lo, pass.min_weight),
                ) {
                    return Err(Miss::GaveUp);
                }
            }
            if cut.is_none() {
                match walk(&mut self.lists.between[0], masses[0].above, &cut_goal) {
                    Some(found) if !cut_goal.reached(masses[0].above) => {
                        let c = Found {
                            n: masses[0].count_above + found.0,
                            at: found.1 .0,
                            cum: found.2,
                        };
                        // The entries the walk passed: the start of the reordered list.
                        self.logits.clear();
                        self.logits.extend(
                            self.lists.between[0][..found.0]
                                .iter()
                                .map(|e| row.logits[e.0 as u32 as usize]),
                        );
                        let inside = kernels::exp_sums64_above(
                            &self.logits,
                            row.max,
                            row.inv_t64,
                            f32::NEG_INFINITY,
                        );
                        let sums = kernels::ExpSums64 {
                            s: pass.sums.s + inside.s,
                            sz: pass.sums.sz + inside.sz,
                        };
                        cut = Some((c, sums));
                    }
                    None if brackets[0].lo == f32::NEG_INFINITY => return Err(Miss::NotReached),
                    _ => {}
                }
            }
            if let (Some(u), Some(_), Some((c, _))) = (u, draw_goal, cut) {
                let g = Goal {
                    target: u * c.cum,
                    strict: true,
                    limit: c.at,
                };
                draw = if g.target >= c.cum {
                    // u · cum rounded up to cum: the walk runs off the end of the nucleus.
                    Some(c)
                } else if g.reached(masses[1].above) {
                    None
                } else {
                    // The bracket may have come from the estimate; its sums hold for any goal.
                    walk(&mut self.lists.between[1], masses[1].above, &g).map(
                        |(n, (at, _), cum)| Found {
                            n: masses[1].count_above + n,
                            at,
                            cum,
                        },
                    )
                };
            }
            if cut.is_some() && (draw.is_some() || u.is_none()) {
                break;
            }
            widen *= 4.0;
        }
        let (cut, sums) = cut.ok_or(Miss::GaveUp)?;
        Ok(WideCut {
            cut,
            s: sums.s,
            sz: sums.sz,
            draw,
        })
    }

    /// A histogram of every `stride`-th entry of the row by z (the scaled logit), [`BINS`]
    /// bins over the sample's range of z, with each bin's count and weight: where the
    /// cumulative weight reaches a target, without sorting the sample.
    fn take_sample(&mut self, row: &RowSums) {
        let stride = (row.logits.len() / SAMPLE).max(1);
        self.logits.clear();
        self.logits.extend(row.logits.iter().step_by(stride));
        kernels::exp_weights(&self.logits, row.max, row.inv_t, &mut self.weights);
        // Below e^-87 the weights are 0: the range stops there.
        let z_min = self
            .logits
            .iter()
            .map(|&l| row.z(l))
            .fold(0f32, f32::min)
            .max(-87.0);
        let per_z = if z_min < 0.0 {
            BINS as f32 / -z_min
        } else {
            0.0
        };
        let bins = &mut self.bins;
        (bins.max, bins.inv_t, bins.per_z) = (row.max, row.inv_t, per_z);
        bins.count.clear();
        bins.count.resize(BINS, 0);
        bins.weight.clear();
        bins.weight.resize(BINS, 0.0);
        for (&l, &w) in self.logits.iter().zip(&self.weights) {
            let b = self.bins.of(row.z(l));
            self.bins.count[b] += 1;
            self.bins.weight[b] += f64::from(w);
        }
    }

    /// The bracket the sample puts around `goal`: the bin where the sample's cumulative
    /// weight reaches it, widened on each side by three standard deviations of a sampled
    /// count (times `widen`), in whole bins.
    fn bracket(&self, goal: &Goal, widen: f64) -> Bracket {
        let bins = &self.bins;
        // As a share of the row's weight, which the caller knows: the sample's own total
        // is off by about 1/√SAMPLE, more than the whole tail past a top-p of 0.999.
        let target = goal.target / self.total * bins.weight.iter().sum::<f64>();
        let mut cum = 0f64;
        let mut before = 0usize;
        let mut at = BINS;
        for b in 0..BINS {
            cum += bins.weight[b];
            if if goal.strict {
                cum > target
            } else {
                cum >= target
            } {
                at = b;
                break;
            }
            before += bins.count[b];
        }
        let len = self.logits.len() as f64;
        let spread = (before as f64 * (len - before as f64) / len).sqrt();
        let margin = ((3.0 * spread + 16.0) * widen) as usize;
        // Up from the bin: whole bins until they hold the margin.
        let (mut hi, mut held) = (at.min(BINS), 0);
        while hi > 0 && held < margin {
            hi -= 1;
            held += bins.count[hi];
        }
        let (mut lo, mut held) = (at, 0);
        while lo < BINS && held < margin {
            held += bins.count[lo];
            lo += 1;
        }
        // Past the limit nothing counts: the bracket need not reach further down.
        let floor = match goal.limit {
            Position::MAX => f32::NEG_INFINITY,
            limit => kernels::logit_of_key((limit >> 32) as u32),
        };
        Bracket {
            hi: if hi == 0 {
                f32::INFINITY
            } else {
                bins.logit_at(hi)
            },
            lo: if lo >= BINS {
                floor
            } else {
                bins.logit_at(lo).max(floor)
            },
        }
    }

    /// The sampler's draw from a nucleus [`Wide::find`] did not draw from: the sorted walk over
    /// every position up to `limit` (slow, and rare: every bracket missed).
    pub(crate) fn draw_sorted(
        &mut self,
        row: &RowSums,
        target: f64,
        limit: Position,
    ) -> Option<u32> {
        #[cfg(test)]
        {
            self.sorted_draws += 1;
        }
        // The pass that found the nucleus left this row's weights.
        let weights = &self.lists.weights;
        self.sorted.clear();
        self.sorted.extend(
            row.logits
                .iter()
                .enumerate()
                .map(|(i, &l)| kernels::position(l, i as u32))
                .filter(|&k| k <= limit),
        );
        self.sorted.sort_unstable();
        let mut cum = 0f64;
        for &k in &self.sorted {
            cum += f64::from(weights[k as u32 as usize]);
            if cum > target {
                return Some(k as u32);
            }
        }
        None
    }
}

/// The first of `entries`, in position order and not past the goal's limit, at which `base`
/// plus their cumulative weight reaches the goal: (entries through it, it, the cumulative
/// weight). A weighted quickselect: linear time, where sorting would cost n·log n. Reorders
/// `entries`: those up to the one found come first. Its sums are exact when the weights'
/// are (see the module's comment), so it stops where the sorted walk stops.
fn walk(entries: &mut [Weighted], base: f64, goal: &Goal) -> Option<(usize, Weighted, f64)> {
    let mut s = partition(entries, |e| e.0 <= goal.limit);
    let (mut cum, mut count) = (base, 0);
    loop {
        if s.len() <= 32 {
            s.sort_unstable_by_key(|e| e.0);
            for &e in s.iter() {
                cum += f64::from(e.1);
                count += 1;
                if goal.reached(cum) {
                    return Some((count, e, cum));
                }
            }
            return None;
        }
        let mid = s.len() / 2;
        let (left, &mut pivot, right) =
            std::mem::take(&mut s).select_nth_unstable_by_key(mid, |e| e.0);
        let left_sum: f64 = left.iter().map(|e| f64::from(e.1)).sum();
        if goal.reached(cum + left_sum) {
            s = left;
            continue;
        }
        cum += left_sum + f64::from(pivot.1);
        count += left.len() + 1;
        if goal.reached(cum) {
            return Some((count, pivot, cum));
        }
        s = right;
    }
}

/// Moves the entries that `keep` holds for to the front, in their order; returns them.
fn partition<T>(v: &mut [T], keep: impl Fn(&T) -> bool) -> &mut [T] {
    let mut n = 0;
    for i in 0..v.len() {
        if keep(&v[i]) {
            v.swap(n, i);
            n += 1;
        }
    }
    &mut v[..n]
}

#[cfg(test)]
mod tests {
    use crate::dist::probe::{Probe, ProbeConfig, StepOptions, StepProbe};
    use crate::dist::sampler::{Rng, SamplingConfig};

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
        // One pass for the nucleus and the draw, nearly always: a bracket that missed costs
        // a pass, a draw left to the sorted walk a sort of the row.
        let (passes, sorted_draws) = (wide.wide.passes, wide.wide.sorted_draws);
        assert!(
            passes <= wide.wide_taken + wide.wide_taken / 20,
            "{passes} passes for {} searches",
            wide.wide_taken
        );
        assert!(
            sorted_draws * 50 <= wide.wide_taken,
            "{sorted_draws} sorted draws"
        );
    }
}
