//! The sampler: its settings, the chain it runs on a row ([`Sampler`]) and the seeded random
//! stream each prompt draws from.
//!
//! The chain, in order (the same one `--help` and the README describe):
//!
//! 1. penalties over the whole sequence so far, prompt included (as `transformers` does):
//!    repetition (`l / r` for positive logits, `l · r` for negative ones), presence
//!    (`l − p` once a token has appeared), frequency (`l − f · count`);
//! 2. temperature (`l / T`; `T = 0` is greedy);
//! 3. top-k: the k most likely tokens (ties toward the lower id);
//! 4. top-p: the smallest most-likely prefix whose probability, renormalized after top-k,
//!    reaches p;
//! 5. min-p: tokens whose probability is at least `min_p ×` the top one's.
//!
//! The RNG is ChaCha20 from `rand_chacha`, keyed by `seed_from_u64(seed)` and set to stream
//! `prompt_index`, so each prompt's tokens depend only on the seed, its index and the logits,
//! never on what else is in the batch. One `u64` is drawn per sampled step and mapped to
//! `[0, 1)` with 53 bits; the token is the first in (logit desc, id asc) order whose
//! cumulative weight exceeds `u · total`.

use crate::dist::kernels;
use crate::dist::row::RowSums;
use logitprobe_backends::TokenId;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

/// A sampling setting out of its range. `setting` is its snake_case name; a front end says
/// it its own way (the CLI as a flag, the server as a request field).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{setting} {value} {rule}")]
pub struct BadSetting {
    pub setting: &'static str,
    pub value: String,
    pub rule: String,
}

/// The smallest temperature above 0 (greedy) that sampling takes.
pub const MIN_TEMPERATURE: f64 = 1e-4;

/// Bounds of the repetition penalty (a divisor or factor of the logit).
pub const MIN_REPEAT_PENALTY: f32 = 1e-3;
pub const MAX_REPEAT_PENALTY: f32 = 1e3;
/// Bound of the presence and frequency penalties' magnitude.
pub const MAX_ADDITIVE_PENALTY: f32 = 1e3;

/// Sampling settings; the defaults are the Token Heatmap tool's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f64,
    /// 0 disables min-p.
    pub min_p: f64,
    /// 1.0 disables the repetition penalty.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Checks the settings; the error names the setting (snake_case, as a config file or a
    /// request names it) and what it accepts.
    pub fn validate(&self) -> Result<(), BadSetting> {
        let bad = |setting, value: String, rule: &str| {
            Err(BadSetting {
                setting,
                value,
                rule: rule.into(),
            })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite() && self.temperature <= 1e4) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "is invalid: use 0 for greedy or a positive number such as 0.8",
            );
        }
        if self.temperature > 0.0 && self.temperature < MIN_TEMPERATURE {
            // 1/T overflows f32 (1e-40) or every weight but the top one underflows: the
            // answer would be greedy with extra steps, or NaN.
            return bad(
                "temperature",
                self.temperature.to_string(),
                "is too small to sample with: use 0 for greedy, or 0.0001 or more",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                self.top_p.to_string(),
                "is outside (0, 1]: use e.g. 0.95, or 1 to turn top-p off",
            );
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                self.min_p.to_string(),
                "is outside [0, 1): use e.g. 0.05, or 0 to turn min-p off",
            );
        }
        // Bounds that keep every penalized logit finite in f32 after the temperature (a
        // penalty of -3.4e38 overflows to infinity, and infinity minus infinity is NaN), far
        // beyond what changes a choice: llama.cpp's users set 1.1, OpenAI allows ±2.
        if !(MIN_REPEAT_PENALTY..=MAX_REPEAT_PENALTY).contains(&self.repeat_penalty) {
            return bad(
                "repeat_penalty",
                self.repeat_penalty.to_string(),
                "is outside [0.001, 1000]: use e.g. 1.1, or 1 to turn it off",
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-MAX_ADDITIVE_PENALTY..=MAX_ADDITIVE_PENALTY).contains(&v) {
                return bad(
                    name,
                    v.to_string(),
                    "is outside [-1000, 1000]: use e.g. 0.5, or 0 to turn it off",
                );
            }
        }
        Ok(())
    }

    /// The penalized logit of a token seen `count` times so far.
    pub fn penalize(&self, logit: f32, count: u32) -> f32 {
        if count == 0 {
            return logit;
        }
        let mut l = logit;
        if self.repeat_penalty != 1.0 {
            l = if l > 0.0 {
                l / self.repeat_penalty
            } else {
                l * self.repeat_penalty
            };
        }
        l - self.presence_penalty - self.frequency_penalty * count as f32
    }
}

/// Which tokens survive the sampler's filters.
pub(crate) enum Kept {
    /// The first `n` of the processed order.
    Prefix(usize),
    /// Every token with a finite logit (no filter removed anything).
    All,
    /// A top-p nucleus wider than the candidates, found without sorting it
    /// ([`crate::dist::nucleus`]): the first `cut.n` of the processed order.
    Wide(crate::dist::nucleus::WideCut),
}

/// The sampler chain of one row: penalties, temperature, top-k / top-p / min-p, and the draw.
///
/// It works on what the probe's single pass over the row produced: the row's sums
/// (`RowSums`) and the candidates gathered on the way, sorted by penalized logit (the
/// processed order). Its scratch is reused from row to row.
#[derive(Default)]
pub struct Sampler {
    /// Distinct history tokens with their penalized logits, sorted by id.
    pub(crate) penalized: Vec<(TokenId, f32)>,
    counts: Vec<(TokenId, u32)>,
    chunk_sums: Vec<f64>,
    /// Penalized logits of the exactly ordered processed prefix, and their sampling weights.
    lp_buf: Vec<f32>,
    weights: Vec<f32>,
    /// The whole penalized row, made only when a penalty lowered the row's maximum: the
    /// processed sums are then taken over it relative to its own maximum (relative to the
    /// raw one, every processed weight could underflow at a low temperature).
    pen_row: Vec<f32>,
    use_pen_row: bool,
}

impl Sampler {
    pub(crate) fn set_penalties(
        &mut self,
        logits: &[f32],
        history: &[TokenId],
        sampling: &SamplingConfig,
    ) {
        self.penalized.clear();
        self.use_pen_row = false;
        if !sampling.has_penalties() || history.is_empty() {
            return;
        }
        self.counts.clear();
        self.counts.extend(
            history
                .iter()
                .filter(|&&t| (t as usize) < logits.len())
                .map(|&t| (t, 1u32)),
        );
        self.counts.sort_unstable_by_key(|&(t, _)| t);
        self.counts.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        self.penalized.extend(
            self.counts
                .iter()
                .map(|&(t, c)| (t, sampling.penalize(logits[t as usize], c))),
        );
    }

    #[inline]
    pub(crate) fn lp(&self, logits: &[f32], id: TokenId) -> f32 {
        if self.penalized.is_empty() {
            return logits[id as usize];
        }
        match self.penalized.binary_search_by_key(&id, |&(t, _)| t) {
            Ok(i) => self.penalized[i].1,
            Err(_) => logits[id as usize],
        }
    }

    /// Σe^z' and Σz'·e^z' of the penalized row.
    /// The maximum of the penalized row (`row.max` without penalties). When a penalty
    /// lowered the raw maximum, the whole penalized row is made once, and the processed
    /// sums and the draw use it.
    pub(crate) fn penalized_max(&mut self, row: &RowSums) -> f32 {
        let lifted = self
            .penalized
            .iter()
            .map(|&(_, lp)| lp)
            .fold(f32::NEG_INFINITY, f32::max);
        let lowered = self
            .penalized
            .iter()
            .any(|&(id, lp)| row.logits[id as usize] == row.max && lp < row.max);
        if !lowered {
            return lifted.max(row.max);
        }
        self.pen_row.clear();
        self.pen_row.extend_from_slice(row.logits);
        for &(id, lp) in &self.penalized {
            self.pen_row[id as usize] = lp;
        }
        self.use_pen_row = true;
        self.pen_row
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// Σe^z and Σz·e^z of the penalized row; `row` is shifted to the penalized maximum.
    pub(crate) fn penalized_sums(&self, row: &RowSums) -> (f64, f64) {
        if self.penalized.is_empty() {
            return (row.s, row.sz);
        }
        if self.use_pen_row {
            return kernels::exp_sums(&self.pen_row, row.max, row.inv_t);
        }
        let (mut removed, mut added, mut removed_z, mut added_z) = (0f64, 0f64, 0f64, 0f64);
        for &(t, lp) in &self.penalized {
            let l = row.logits[t as usize];
            if l != f32::NEG_INFINITY {
                let (z, zp) = (row.z64(l), row.z64(lp));
                removed += z.exp();
                removed_z += z * z.exp();
                added += zp.exp();
                added_z += zp * zp.exp();
            }
        }
        if removed > 0.5 * row.s {
            // The penalized tokens held most of the mass: subtracting would cancel digits.
            let mut copy = row.logits.to_vec();
            for &(t, lp) in &self.penalized {
                copy[t as usize] = lp;
            }
            return kernels::exp_sums(&copy, row.max, row.inv_t);
        }
        (row.s - removed + added, row.sz - removed_z + added_z)
    }

    /// The sampling weights of the first `valid` tokens of the processed order (at least the
    /// first token: min-p reads it), computed once for the filters and the draw.
    pub(crate) fn fill_weights(&mut self, row: &RowSums, order: &[TokenId], valid: usize) {
        let n = valid.max(1).min(order.len());
        let mut lp = std::mem::take(&mut self.lp_buf);
        lp.clear();
        lp.extend(order[..n].iter().map(|&id| self.lp(row.logits, id)));
        kernels::exp_weights(&lp, row.max, row.inv_t, &mut self.weights);
        self.lp_buf = lp;
    }

    /// At least how many tokens a top-p nucleus reaching `target` holds, when the first
    /// `valid` of the processed order fell short of it: those, plus what the rest needs if
    /// each weighed as much as the last of them (none weighs more). Gathering and sorting
    /// more candidates is cheaper than the wide search below a few thousand.
    pub(crate) fn nucleus_at_least(&self, valid: usize, target: f64) -> f64 {
        let held = &self.weights[..valid.min(self.weights.len())];
        let Some(&last) = held.last() else {
            return 0.0;
        };
        let short = target - held.iter().map(|&w| f64::from(w)).sum::<f64>();
        if last > 0.0 {
            held.len() as f64 + short.max(0.0) / f64::from(last)
        } else {
            // The rest weighs nothing: no more tokens can reach the target.
            held.len() as f64
        }
    }

    /// Applies top-k, top-p and min-p to the processed order. `None`: the answer lies past
    /// the exactly ordered prefix (`valid` entries), gather more.
    pub(crate) fn kept(
        &self,
        s_p: f64,
        valid: usize,
        everything: bool,
        sampling: &SamplingConfig,
    ) -> Option<Kept> {
        let w = |i: usize| f64::from(self.weights[i]);
        // Tokens with −∞ logits are never kept; they sort last.
        let finite_in = |n: usize| {
            (0..n)
                .take_while(|&i| self.lp_buf[i] != f32::NEG_INFINITY)
                .count()
        };
        // The kept prefix; `None`: everything (no filter removed a token yet).
        let mut kept: Option<usize> = None;
        let mut domain_sum = s_p;
        if sampling.top_k > 0 {
            if valid < sampling.top_k && !everything {
                return None;
            }
            let n = finite_in(sampling.top_k.min(valid));
            domain_sum = (0..n).map(w).sum();
            kept = Some(n);
        }
        if sampling.top_p < 1.0 {
            let limit = kept.unwrap_or_else(|| finite_in(valid));
            let target = sampling.top_p * domain_sum;
            let mut cum = 0f64;
            let mut reached = None;
            for i in 0..limit {
                cum += w(i);
                if cum >= target {
                    reached = Some(i + 1);
                    break;
                }
            }
            kept = match (reached, kept) {
                (Some(n), _) => Some(n),
                // Rounding left the whole domain just short of p: keep all of it.
                (None, Some(n)) => Some(n),
                (None, None) if everything || limit < valid => Some(limit.max(1)),
                (None, None) => return None,
            };
        }
        if sampling.min_p > 0.0 {
            let floor = sampling.min_p * w(0);
            let limit = kept.unwrap_or_else(|| finite_in(valid));
            let n = (0..limit).take_while(|&i| w(i) >= floor).count().max(1);
            if n == valid && !everything && kept.is_none() {
                return None;
            }
            kept = Some(n);
        }
        Some(kept.map_or(Kept::All, Kept::Prefix))
    }

    /// Draws from the first `n` tokens of the processed order, by their weights from
    /// [`Sampler::fill_weights`].
    pub(crate) fn draw_prefix(
        &self,
        order: &[TokenId],
        n: usize,
        greedy: bool,
        rng: &mut Rng,
    ) -> TokenId {
        if greedy || n == 1 {
            return order[0];
        }
        let weights = |i: usize| f64::from(self.weights[i]);
        let total: f64 = (0..n).map(weights).sum();
        let target = rng.next_f64() * total;
        let mut cum = 0f64;
        for (i, &id) in order[..n].iter().enumerate() {
            cum += weights(i);
            if cum > target {
                return id;
            }
        }
        order[n - 1]
    }

    /// Draws from the whole (penalized) row, walking ids in order: no filter is active.
    ///
    /// Chunk sums (one vectorized pass) find the chunk where the cumulative weight passes
    /// the target; only that chunk is walked token by token.
    pub(crate) fn draw_all(
        &mut self,
        row: &RowSums,
        s_p: f64,
        order: &[TokenId],
        rng: &mut Rng,
    ) -> TokenId {
        let target = rng.next_f64() * s_p;
        let len = kernels::CHUNK_LEN;
        if self.use_pen_row {
            kernels::chunk_sums(&self.pen_row, row.max, row.inv_t, &mut self.chunk_sums);
        } else {
            kernels::chunk_sums(row.logits, row.max, row.inv_t, &mut self.chunk_sums);
            for &(id, l_pen) in &self.penalized {
                let l = row.logits[id as usize];
                if l != f32::NEG_INFINITY {
                    self.chunk_sums[id as usize / len] +=
                        f64::from(row.w(l_pen)) - f64::from(row.w(l));
                }
            }
        }
        let mut cum = 0f64;
        for (c, &chunk_sum) in self.chunk_sums.iter().enumerate() {
            if cum + chunk_sum <= target {
                cum += chunk_sum;
                continue;
            }
            let start = c * len;
            for id in start as TokenId..(start + len).min(row.logits.len()) as TokenId {
                let l = self.lp(row.logits, id);
                if l == f32::NEG_INFINITY {
                    continue;
                }
                cum += f64::from(row.w(l));
                if cum > target {
                    return id;
                }
            }
            // The token-by-token sum fell a rounding short of the chunk sum: go on from it.
        }
        // Rounding left the whole row just short of the target: the last finite token.
        (0..row.logits.len() as TokenId)
            .rev()
            .find(|&id| self.lp(row.logits, id) != f32::NEG_INFINITY)
            .unwrap_or(order[0])
    }
}

/// The seeded random stream of one prompt.
pub struct Rng {
    inner: ChaCha20Rng,
}

impl Rng {
    /// The stream of prompt `prompt_index` under `seed`.
    pub fn new(seed: u64, prompt_index: u64) -> Self {
        let mut inner = ChaCha20Rng::seed_from_u64(seed);
        inner.set_stream(prompt_index);
        Rng { inner }
    }

    /// A uniform draw in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.inner.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The draw [`Rng::next_f64`] will return next, without taking it.
    pub(crate) fn peek_f64(&self) -> f64 {
        Rng {
            inner: self.inner.clone(),
        }
        .next_f64()
    }
}

/// A seed for runs that did not ask for one: from the clock, recorded in run.json.
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep it short enough to retype.
    (t ^ (t >> 29)) % 1_000_000_007
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_independent_and_repeatable() {
        let a: Vec<f64> = {
            let mut r = Rng::new(42, 0);
            (0..4).map(|_| r.next_f64()).collect()
        };
        let b: Vec<f64> = {
            let mut r = Rng::new(42, 0);
            (0..4).map(|_| r.next_f64()).collect()
        };
        let c: Vec<f64> = {
            let mut r = Rng::new(42, 1);
            (0..4).map(|_| r.next_f64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn penalties() {
        let s = SamplingConfig {
            repeat_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        assert_eq!(s.penalize(4.0, 0), 4.0);
        assert_eq!(s.penalize(4.0, 2), 4.0 / 2.0 - 0.5 - 0.5);
        assert_eq!(s.penalize(-4.0, 1), -8.0 - 0.5 - 0.25);
    }
}
