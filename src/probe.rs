//! The adaptive probe: what one logits row says about the next token, and the sampled token.
//!
//! Definitions (Token Heatmap's, so traces read the same in both tools):
//! - raw distribution = softmax(logits / T); processed = softmax of the sampler's filtered
//!   logits, filtered tokens having probability 0;
//! - candidates by descending probability, ties toward the lower token id;
//! - `k_used` = the smallest k whose cumulative probability reaches `mass_threshold`, clamped
//!   to `[min_k, max_k]` and never above the number of tokens with non-zero probability
//!   (in f64; `mass_threshold = 1` gives `min(max_k, that number)`);
//! - `entropy` = −Σ p ln p over the full vocabulary, in nats;
//! - `selected_logprob` = ln(p + eps); `selected_rank` = 1 + the number of tokens with a
//!   strictly larger probability.
//!
//! Cost per row is O(vocab) with no sort of the vocabulary: one pass for block maxima, then
//! one vectorized pass for Σe^z and Σz·e^z (entropy = ln S − Σz·e^z / S) that also gathers
//! the entries at or above the n-th largest block maximum (n = 2·max(max_k, top_k)), which
//! must hold the top n. Everything after that works on those few candidates.

use crate::kernels;
use crate::sampler::{Rng, SamplingConfig};
use logitprobe_backends::TokenId;
use serde::{Deserialize, Serialize};

/// How many candidates the probe keeps; the defaults are Token Heatmap's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    pub min_k: usize,
    pub max_k: usize,
    pub mass_threshold: f64,
    pub eps: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            min_k: 8,
            max_k: 64,
            mass_threshold: 0.95,
            eps: 1e-12,
        }
    }
}

impl ProbeConfig {
    /// Checks the settings; the message names the flag and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_k == 0 {
            return Err(
                "--min-k 0 is invalid: keep at least one candidate (--min-k 1 or more)".into(),
            );
        }
        if self.min_k > self.max_k {
            return Err(format!(
                "--min-k {} is larger than --max-k {}: make --min-k <= --max-k",
                self.min_k, self.max_k
            ));
        }
        if !(self.mass_threshold > 0.0 && self.mass_threshold <= 1.0) {
            return Err(format!(
                "--mass-threshold {} is outside (0, 1]: use e.g. 0.95",
                self.mass_threshold
            ));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(format!(
                "eps {} must be a small positive number such as 1e-12",
                self.eps
            ));
        }
        Ok(())
    }
}

/// One kept candidate of a distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub token_id: TokenId,
    pub prob: f64,
    pub logprob: f64,
}

/// The probe's description of one distribution (raw or processed) at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub k_used: usize,
    pub entropy: f64,
    pub top_mass_used: f64,
    pub selected_prob: f64,
    pub selected_logprob: f64,
    pub selected_rank: usize,
    /// `k_used` candidates by descending probability.
    pub candidates: Vec<Candidate>,
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepProbe {
    pub selected: TokenId,
    /// `None` when probing is off (the sampler still ran the whole chain).
    pub raw: Option<Distribution>,
    pub processed: Option<Distribution>,
    /// The row had no finite logit (or a +∞ one): the step fell back to greedy on the raw row.
    pub degenerate: bool,
}

/// A NaN in a logits row: the engine produced garbage, the run cannot go on.
#[derive(Debug)]
pub struct NanLogits {
    pub token_id: usize,
}

impl std::fmt::Display for NanLogits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the logits hold NaN (first at token id {})",
            self.token_id
        )
    }
}
impl std::error::Error for NanLogits {}

/// Which tokens survive the sampler's filters.
enum Kept {
    /// The first `n` of the processed order.
    Prefix(usize),
    /// Every token with a finite logit (no filter removed anything).
    All,
}

/// Reusable scratch for probing rows; one per thread.
#[derive(Default)]
pub struct Probe {
    pub config: ProbeConfig,
    blocks: Vec<f32>,
    select: Vec<u32>,
    cand: Vec<TokenId>,
    /// Distinct history tokens with their penalized logits, sorted by id.
    penalized: Vec<(TokenId, f32)>,
    counts: Vec<(TokenId, u32)>,
    order_raw: Vec<TokenId>,
    order_proc: Vec<TokenId>,
    keys: Vec<u64>,
    chunk_sums: Vec<f64>,
    /// Penalized logits of the exactly ordered processed prefix, and their sampling weights.
    lp_buf: Vec<f32>,
    weights: Vec<f32>,
}

/// The numbers that describe one row under one temperature.
struct RowSums<'a> {
    logits: &'a [f32],
    max: f32,
    inv_t: f32,
    /// 1/T in f64, for reported probabilities (an f32 z is off by ~1e-6 at |z| ≈ 10).
    inv_t64: f64,
    s: f64,
    sz: f64,
}

impl RowSums<'_> {
    #[inline]
    fn z(&self, l: f32) -> f32 {
        (l - self.max) * self.inv_t
    }
    #[inline]
    fn z64(&self, l: f32) -> f64 {
        (f64::from(l) - f64::from(self.max)) * self.inv_t64
    }
    /// Sampling weight: the deterministic f32 exponential, identical on every platform.
    #[inline]
    fn w(&self, l: f32) -> f32 {
        kernels::exp(self.z(l))
    }
    /// Reported probability under normalizer `s`: f64 exponential for accuracy in the tail.
    #[inline]
    fn p(&self, l: f32, s: f64) -> f64 {
        if l == f32::NEG_INFINITY {
            0.0
        } else {
            self.z64(l).exp() / s
        }
    }
}

impl Probe {
    pub fn new(config: ProbeConfig) -> Self {
        Probe {
            config,
            ..Default::default()
        }
    }

    /// Runs the sampler chain on one logits row, draws the next token and, when `probe` is
    /// set, describes the raw and the processed distribution.
    ///
    /// `history` is the sequence so far (prompt and generated), for the penalties.
    ///
    /// ```
    /// use logitprobe::probe::{Probe, ProbeConfig};
    /// use logitprobe::sampler::{Rng, SamplingConfig};
    ///
    /// let logits = [2.0f32, 1.0, 0.5, -1.0];
    /// let mut probe = Probe::new(ProbeConfig { min_k: 1, max_k: 4, ..Default::default() });
    /// let step = probe
    ///     .step(&logits, &[], &SamplingConfig::greedy(), &mut Rng::new(1, 0), true)
    ///     .unwrap();
    /// assert_eq!(step.selected, 0);
    /// assert_eq!(step.processed.unwrap().selected_prob, 1.0);
    /// ```
    pub fn step(
        &mut self,
        logits: &[f32],
        history: &[TokenId],
        sampling: &SamplingConfig,
        rng: &mut Rng,
        probe: bool,
    ) -> Result<StepProbe, NanLogits> {
        assert!(!logits.is_empty(), "a logits row needs at least one entry");
        let greedy = sampling.is_greedy();
        let inv_t64 = if greedy {
            1.0
        } else {
            1.0 / sampling.temperature
        };
        let inv_t = inv_t64 as f32;
        let max = kernels::block_max(logits, &mut self.blocks);
        if !max.is_finite() {
            return self.degenerate(logits, probe);
        }
        self.set_penalties(logits, history, sampling);
        // Gather enough candidates for the probe and the filters; grow when a filter reaches
        // past what was gathered (flat rows, large top-k). The first gather rides on the
        // exp pass, where a block costs little, so it takes twice what the probe shows: a
        // top-p nucleus somewhat wider than max_k then needs no second pass over the row.
        let mut need = self
            .config
            .max_k
            .max(sampling.top_k)
            .max(1)
            .saturating_mul(2);
        let (mut t, s, sz) = self.exp_pass(logits, max, inv_t, need)?;
        let row = RowSums {
            logits,
            max,
            inv_t,
            inv_t64,
            s,
            sz,
        };
        let (s_p, sz_p) = self.penalized_sums(&row);

        loop {
            let everything = t == f32::NEG_INFINITY;
            let valid_raw = self.order_raw(logits, t);
            // Without penalties both orders are the same sort of the same candidates.
            let valid_proc = if self.penalized.is_empty() {
                self.order_proc.clone_from(&self.order_raw);
                valid_raw
            } else {
                self.order_processed(logits, t)
            };
            let kept = if greedy {
                Some(Kept::Prefix(1))
            } else {
                self.fill_weights(&row, valid_proc);
                self.kept(s_p, valid_proc, everything, sampling)
            };
            let probe_ready = |valid: usize| !probe || everything || valid >= self.config.max_k;
            let kept = match kept {
                Some(Kept::All) if !probe_ready(valid_proc) => None,
                k if !probe_ready(valid_raw) => k.and(None),
                k => k,
            };
            let Some(kept) = kept else {
                // `everything` always decides; this only grows a finite threshold.
                debug_assert!(!everything);
                need = need.saturating_mul(4);
                t = self.gather(logits, need);
                continue;
            };
            let selected = match kept {
                Kept::Prefix(n) => self.draw_prefix(n, greedy, rng),
                Kept::All => self.draw_all(&row, s_p, rng),
            };
            if !probe {
                return Ok(StepProbe {
                    selected,
                    raw: None,
                    processed: None,
                    degenerate: false,
                });
            }
            let raw = self.describe_raw(&row, t, valid_raw, selected);
            let processed = if greedy {
                point_mass(selected, self.config.eps)
            } else {
                self.describe_processed(&row, t, valid_proc, &kept, s_p, sz_p, selected)
            };
            return Ok(StepProbe {
                selected,
                raw: Some(raw),
                processed: Some(processed),
                degenerate: false,
            });
        }
    }

    /// Describes `softmax(logits / temperature)` with `selected` as the selected token: the
    /// raw distribution without any sampling (used by `compare` and by scoring).
    pub fn describe(
        &mut self,
        logits: &[f32],
        temperature: f64,
        selected: TokenId,
    ) -> Result<Distribution, NanLogits> {
        let inv_t64 = if temperature > 0.0 {
            1.0 / temperature
        } else {
            1.0
        };
        let inv_t = inv_t64 as f32;
        let max = kernels::block_max(logits, &mut self.blocks);
        if !max.is_finite() {
            if logits.iter().any(|v| v.is_nan()) {
                return Err(first_nan(logits));
            }
            let top = argmax_lowest(logits);
            return Ok(point_mass(top, self.config.eps));
        }
        self.penalized.clear();
        let mut need = self.config.max_k;
        let (mut t, s, sz) = self.exp_pass(logits, max, inv_t, need)?;
        let row = RowSums {
            logits,
            max,
            inv_t,
            inv_t64,
            s,
            sz,
        };
        loop {
            let valid = self.order_raw(logits, t);
            if valid >= self.config.max_k.min(self.order_raw.len())
                || self.order_raw[..valid]
                    .iter()
                    .any(|&i| logits[i as usize] == f32::NEG_INFINITY)
                || t == f32::NEG_INFINITY
            {
                return Ok(self.describe_raw(&row, t, valid, selected));
            }
            need = need.saturating_mul(4);
            t = self.gather(logits, need);
        }
    }

    /// The exp pass: Σe^z and Σz·e^z of the row, with the candidates for `need` gathered on
    /// the way (penalized ids included); returns the gather threshold and the two sums.
    fn exp_pass(
        &mut self,
        logits: &[f32],
        max: f32,
        inv_t: f32,
        need: usize,
    ) -> Result<(f32, f64, f64), NanLogits> {
        let t = self.threshold(need);
        self.cand.clear();
        let gather = kernels::Gather {
            blocks: &self.blocks,
            threshold: t,
            ids: &mut self.cand,
        };
        let (s, sz) = kernels::exp_sums_gather(logits, max, inv_t, gather);
        if s.is_nan() || sz.is_nan() {
            return Err(first_nan(logits));
        }
        self.add_penalized(logits, t);
        Ok((t, s, sz))
    }

    fn degenerate(&mut self, logits: &[f32], probe: bool) -> Result<StepProbe, NanLogits> {
        if logits.iter().any(|v| v.is_nan()) {
            return Err(first_nan(logits));
        }
        let selected = argmax_lowest(logits);
        let d = probe.then(|| point_mass(selected, self.config.eps));
        Ok(StepProbe {
            selected,
            raw: d.clone(),
            processed: d,
            degenerate: true,
        })
    }

    fn set_penalties(&mut self, logits: &[f32], history: &[TokenId], sampling: &SamplingConfig) {
        self.penalized.clear();
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
    fn lp(&self, logits: &[f32], id: TokenId) -> f32 {
        if self.penalized.is_empty() {
            return logits[id as usize];
        }
        match self.penalized.binary_search_by_key(&id, |&(t, _)| t) {
            Ok(i) => self.penalized[i].1,
            Err(_) => logits[id as usize],
        }
    }

    /// Σe^z' and Σz'·e^z' of the penalized row.
    fn penalized_sums(&self, row: &RowSums) -> (f64, f64) {
        if self.penalized.is_empty() {
            return (row.s, row.sz);
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

    /// The `need`-th largest block maximum: every entry at or above it lies in a block whose
    /// maximum is at or above it, and there are at least `need` such entries. −∞ when there
    /// are no more blocks than `need` (then every id is a candidate).
    fn threshold(&mut self, need: usize) -> f32 {
        if self.blocks.len() <= need {
            return f32::NEG_INFINITY;
        }
        // Integer keys select several times faster than floats through a comparator.
        self.select.clear();
        self.select
            .extend(self.blocks.iter().map(|&b| (sort_key(b, 0) >> 32) as u32));
        let (_, nth, _) = self.select.select_nth_unstable(need - 1);
        f32_of_key(*nth)
    }

    /// Collects every id whose logit is at least the `need`-th largest block maximum, plus the
    /// penalized ids; returns that threshold (−∞ when everything was gathered).
    fn gather(&mut self, logits: &[f32], need: usize) -> f32 {
        let t = self.threshold(need);
        self.cand.clear();
        for (b, &bm) in self.blocks.iter().enumerate() {
            if bm >= t {
                let start = b * kernels::BLOCK;
                let end = (start + kernels::BLOCK).min(logits.len());
                kernels::collect(&logits[start..end], start, t, &mut self.cand);
            }
        }
        self.add_penalized(logits, t);
        t
    }

    /// Penalized ids below the threshold still join the candidates: a penalty can lift them.
    fn add_penalized(&mut self, logits: &[f32], t: f32) {
        for &(id, _) in &self.penalized {
            if logits[id as usize] < t {
                self.cand.push(id);
            }
        }
    }

    /// Sorts the candidates by raw logit (desc, id asc); returns how many lead the order
    /// exactly (logit ≥ threshold).
    fn order_raw(&mut self, logits: &[f32], t: f32) -> usize {
        self.keys.clear();
        self.keys.extend(
            self.cand
                .iter()
                .filter(|&&i| logits[i as usize] >= t)
                .map(|&i| sort_key(logits[i as usize], i)),
        );
        self.keys.sort_unstable();
        self.order_raw.clear();
        self.order_raw
            .extend(self.keys.iter().map(|&k| k as TokenId));
        self.order_raw.len()
    }

    /// Sorts the candidates by penalized logit; returns the exact-prefix length.
    fn order_processed(&mut self, logits: &[f32], t: f32) -> usize {
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        keys.extend(self.cand.iter().map(|&i| sort_key(self.lp(logits, i), i)));
        keys.sort_unstable();
        self.order_proc.clear();
        self.order_proc.extend(keys.iter().map(|&k| k as TokenId));
        self.keys = keys;
        self.order_proc
            .iter()
            .take_while(|&&i| self.lp(logits, i) >= t)
            .count()
    }

    /// Applies top-k, top-p and min-p to the processed order. `None`: the answer lies past
    /// the exactly ordered prefix (`valid` entries), gather more.
    fn kept(
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
        let mut kept = Kept::All;
        let mut domain_sum = s_p;
        if sampling.top_k > 0 {
            if valid < sampling.top_k && !everything {
                return None;
            }
            let n = finite_in(sampling.top_k.min(valid));
            domain_sum = (0..n).map(w).sum();
            kept = Kept::Prefix(n);
        }
        if sampling.top_p < 1.0 {
            let limit = match kept {
                Kept::Prefix(n) => n,
                Kept::All => finite_in(valid),
            };
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
                (Some(n), _) => Kept::Prefix(n),
                // Rounding left the whole domain just short of p: keep all of it.
                (None, Kept::Prefix(n)) => Kept::Prefix(n),
                (None, Kept::All) if everything || limit < valid => Kept::Prefix(limit.max(1)),
                (None, Kept::All) => return None,
            };
        }
        if sampling.min_p > 0.0 {
            let floor = sampling.min_p * w(0);
            let limit = match kept {
                Kept::Prefix(n) => n,
                Kept::All => finite_in(valid),
            };
            let n = (0..limit).take_while(|&i| w(i) >= floor).count().max(1);
            if n == valid && !everything && matches!(kept, Kept::All) {
                return None;
            }
            kept = Kept::Prefix(n);
        }
        Some(kept)
    }

    /// The sampling weights of the first `valid` tokens of the processed order (at least the
    /// first token: min-p reads it), computed once for the filters and the draw.
    fn fill_weights(&mut self, row: &RowSums, valid: usize) {
        let n = valid.max(1).min(self.order_proc.len());
        let mut lp = std::mem::take(&mut self.lp_buf);
        lp.clear();
        lp.extend(
            self.order_proc[..n]
                .iter()
                .map(|&id| self.lp(row.logits, id)),
        );
        kernels::exp_weights(&lp, row.max, row.inv_t, &mut self.weights);
        self.lp_buf = lp;
    }

    /// Draws from the first `n` tokens of the processed order, by their weights from
    /// [`Probe::fill_weights`].
    fn draw_prefix(&self, n: usize, greedy: bool, rng: &mut Rng) -> TokenId {
        if greedy || n == 1 {
            return self.order_proc[0];
        }
        let weights = |i: usize| f64::from(self.weights[i]);
        let total: f64 = (0..n).map(weights).sum();
        let target = rng.next_f64() * total;
        let mut cum = 0f64;
        for i in 0..n {
            cum += weights(i);
            if cum > target {
                return self.order_proc[i];
            }
        }
        self.order_proc[n - 1]
    }

    /// Draws from the whole (penalized) row, walking ids in order: no filter is active.
    ///
    /// Chunk sums (one vectorized pass) find the chunk where the cumulative weight passes
    /// the target; only that chunk is walked token by token.
    fn draw_all(&mut self, row: &RowSums, s_p: f64, rng: &mut Rng) -> TokenId {
        let target = rng.next_f64() * s_p;
        let len = kernels::CHUNK_LEN;
        kernels::chunk_sums(row.logits, row.max, row.inv_t, &mut self.chunk_sums);
        for &(id, l_pen) in &self.penalized {
            let l = row.logits[id as usize];
            if l != f32::NEG_INFINITY {
                self.chunk_sums[id as usize / len] += f64::from(row.w(l_pen)) - f64::from(row.w(l));
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
            .unwrap_or(self.order_proc[0])
    }

    fn describe_raw(&self, row: &RowSums, t: f32, valid: usize, selected: TokenId) -> Distribution {
        let l_sel = row.logits[selected as usize];
        let rank = if l_sel >= t {
            1 + self.order_raw[..valid]
                .iter()
                .filter(|&&i| row.logits[i as usize] > l_sel)
                .count()
        } else {
            1 + kernels::count_greater(row.logits, l_sel)
        };
        let order = &self.order_raw[..valid];
        self.describe_order(
            order,
            |i| row.logits[i as usize],
            row,
            row.s,
            row.sz,
            selected,
            rank,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn describe_processed(
        &self,
        row: &RowSums,
        t: f32,
        valid: usize,
        kept: &Kept,
        s_p: f64,
        sz_p: f64,
        selected: TokenId,
    ) -> Distribution {
        let lp = |i: TokenId| self.lp(row.logits, i);
        let l_sel = lp(selected);
        match *kept {
            Kept::Prefix(n) => {
                let order = &self.order_proc[..n];
                let (mut s, mut sz) = (0f64, 0f64);
                for &i in order {
                    let z = row.z64(lp(i));
                    s += z.exp();
                    sz += z * z.exp();
                }
                let rank = 1 + order.iter().filter(|&&i| lp(i) > l_sel).count();
                self.describe_order(order, lp, row, s, sz, selected, rank)
            }
            Kept::All => {
                let rank = if l_sel >= t {
                    1 + self.order_proc[..valid]
                        .iter()
                        .filter(|&&i| lp(i) > l_sel)
                        .count()
                } else {
                    let mut above = kernels::count_greater(row.logits, l_sel);
                    for &(id, l_pen) in &self.penalized {
                        above -= usize::from(row.logits[id as usize] > l_sel);
                        above += usize::from(l_pen > l_sel);
                    }
                    1 + above
                };
                self.describe_order(
                    &self.order_proc[..valid],
                    lp,
                    row,
                    s_p,
                    sz_p,
                    selected,
                    rank,
                )
            }
        }
    }

    /// The probe's rule over an exactly ordered prefix of a distribution with normalizer `s`.
    #[allow(clippy::too_many_arguments)]
    fn describe_order(
        &self,
        order: &[TokenId],
        logit: impl Fn(TokenId) -> f32,
        row: &RowSums,
        s: f64,
        sz: f64,
        selected: TokenId,
        rank: usize,
    ) -> Distribution {
        let cfg = &self.config;
        let mut candidates = Vec::with_capacity(cfg.max_k.min(order.len()));
        let mut cum = 0f64;
        let mut k_mass = None;
        for &id in order.iter().take(cfg.max_k) {
            let p = row.p(logit(id), s);
            // Sorted order: the first zero ends the tokens with non-zero probability.
            if p == 0.0 {
                break;
            }
            cum += p;
            candidates.push(Candidate {
                token_id: id,
                prob: p,
                logprob: (p + cfg.eps).ln(),
            });
            if k_mass.is_none() && cum >= cfg.mass_threshold {
                k_mass = Some(candidates.len());
            }
        }
        let nonzero = candidates.len();
        let k = if cfg.mass_threshold >= 1.0 {
            cfg.max_k
        } else {
            k_mass.unwrap_or(cfg.max_k)
        };
        let k = k.clamp(cfg.min_k, cfg.max_k).min(nonzero).max(1);
        candidates.truncate(k);
        let top_mass_used = candidates.iter().map(|c| c.prob).sum::<f64>().min(1.0);
        let selected_prob = row.p(logit(selected), s).min(1.0);
        Distribution {
            k_used: candidates.len(),
            entropy: (s.ln() - sz / s).max(0.0),
            top_mass_used,
            selected_prob,
            selected_logprob: (selected_prob + cfg.eps).ln(),
            selected_rank: rank,
            candidates,
        }
    }
}

/// A u64 whose ascending order is (logit descending, id ascending): sorting plain integers is
/// several times faster than sorting ids through a comparator that reads the logits.
#[inline]
fn sort_key(logit: f32, id: TokenId) -> u64 {
    let b = logit.to_bits();
    // IEEE-754 bits → an unsigned integer in ascending float order, then inverted.
    let ascending = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    (u64::from(!ascending) << 32) | u64::from(id)
}

/// The logit whose [`sort_key`] has `key` as its upper half.
#[inline]
fn f32_of_key(key: u32) -> f32 {
    let ascending = !key;
    f32::from_bits(if ascending & 0x8000_0000 != 0 {
        ascending & 0x7fff_ffff
    } else {
        !ascending
    })
}

fn point_mass(id: TokenId, eps: f64) -> Distribution {
    Distribution {
        k_used: 1,
        entropy: 0.0,
        top_mass_used: 1.0,
        selected_prob: 1.0,
        selected_logprob: (1.0 + eps).ln(),
        selected_rank: 1,
        candidates: vec![Candidate {
            token_id: id,
            prob: 1.0,
            logprob: (1.0 + eps).ln(),
        }],
    }
}

/// The first maximum (lowest id); +∞ wins; an all −∞ row gives id 0.
fn argmax_lowest(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

fn first_nan(logits: &[f32]) -> NanLogits {
    NanLogits {
        token_id: logits.iter().position(|v| v.is_nan()).unwrap_or(0),
    }
}
