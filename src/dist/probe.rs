//! The adaptive probe: one pass over a logits row, then the sampler's chain and draw
//! ([`crate::dist::sampler::Sampler`]) and the descriptions of the raw and processed
//! distributions ([`crate::dist::describe`]), all on the candidates that pass gathered.
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

use crate::dist::describe;
use crate::dist::kernels;
use crate::dist::logprobs::{self, TokenLogprobs};
use crate::dist::row::RowSums;
pub use crate::dist::row::{Candidate, Distribution, InvalidLogits, ProbeConfig, ProbeConfigError};
use crate::dist::sampler::{Kept, Rng, Sampler, SamplingConfig};
use logitprobe_backends::TokenId;

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepProbe {
    pub selected: TokenId,
    /// `None` when probing is off (the sampler still ran the whole chain).
    pub raw: Option<Distribution>,
    pub processed: Option<Distribution>,
    /// The row had no finite logit (or a +∞ one): the step fell back to greedy on the raw row.
    pub degenerate: bool,
    /// The processed distribution's top [`StepOptions::processed_top`] tokens (all its
    /// mass, no adaptive cut): the processed logprobs a server reports.
    pub processed_top: Option<Distribution>,
    /// The raw logprobs (log-softmax at temperature 1) [`StepOptions::raw_logprobs`] asked
    /// for, from this step's pass over the row.
    pub raw_logprobs: Option<TokenLogprobs>,
}

/// What [`Probe::step_with`] does beside drawing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOptions {
    /// Describe the raw and processed distributions.
    pub probe: bool,
    /// Take this token instead of drawing one (teacher forcing: a prompt's own next token);
    /// the descriptions then say how likely it was.
    pub forced: Option<TokenId>,
    /// Also describe the processed distribution's top this-many tokens (0: not).
    pub processed_top: usize,
    /// Also the raw logprobs of the selected token and of the top this-many tokens: what
    /// [`crate::dist::logprobs::Logprobs::raw`] computes, here without another pass over the row
    /// at temperature 1 (or when greedy), and without a second top-n selection.
    pub raw_logprobs: Option<usize>,
}

/// Nuclei estimated at this many tokens or more are found by [`crate::dist::nucleus::Wide`].
const WIDE_FROM: usize = 4096;

/// Reusable scratch for probing rows; one per thread.
#[derive(Default)]
pub struct Probe {
    pub config: ProbeConfig,
    blocks: Vec<f32>,
    select: Vec<u32>,
    cand: Vec<TokenId>,
    order_raw: Vec<TokenId>,
    order_proc: Vec<TokenId>,
    keys: Vec<u64>,
    sampler: Sampler,
    pub(crate) wide: crate::dist::nucleus::Wide,
    /// Tests turn the wide-nucleus search off to compare it with the sorted path.
    #[cfg(test)]
    pub(crate) no_wide: bool,
    #[cfg(test)]
    pub(crate) wide_taken: usize,
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
    /// use logitprobe::dist::probe::{Probe, ProbeConfig};
    /// use logitprobe::dist::sampler::{Rng, SamplingConfig};
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
    ) -> Result<StepProbe, InvalidLogits> {
        let opts = StepOptions {
            probe,
            ..Default::default()
        };
        self.step_with(logits, history, sampling, rng, &opts)
    }

    /// [`Probe::step`] with the options a server needs: a forced token (prompt positions)
    /// and the processed distribution's top tokens. A forced step leaves `rng` untouched.
    pub fn step_with(
        &mut self,
        logits: &[f32],
        history: &[TokenId],
        sampling: &SamplingConfig,
        rng: &mut Rng,
        opts: &StepOptions,
    ) -> Result<StepProbe, InvalidLogits> {
        assert!(!logits.is_empty(), "a logits row needs at least one entry");
        let probe = opts.probe;
        let top_n = opts.processed_top;
        let greedy = sampling.is_greedy();
        let inv_t64 = if greedy {
            1.0
        } else {
            1.0 / sampling.temperature
        };
        let inv_t = inv_t64 as f32;
        let max = kernels::block_max(logits, &mut self.blocks);
        if !max.is_finite() {
            return self.degenerate(logits, opts);
        }
        self.sampler.set_penalties(logits, history, sampling);
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
        let prow = row.shifted_to(self.sampler.penalized_max(&row));
        let (s_p, sz_p) = self.sampler.penalized_sums(&prow);
        let mut wide_searched = false;

        loop {
            let everything = t == f32::NEG_INFINITY;
            let valid_raw = self.order_raw(logits, t);
            // Without penalties both orders are the same sort of the same candidates.
            let valid_proc = if self.sampler.penalized.is_empty() {
                self.order_proc.clone_from(&self.order_raw);
                valid_raw
            } else {
                self.order_processed(logits, t)
            };
            let kept = if greedy {
                Some(Kept::Prefix(1))
            } else {
                self.sampler
                    .fill_weights(&prow, &self.order_proc, valid_proc);
                self.sampler.kept(s_p, valid_proc, everything, sampling)
            };
            let need_k = if probe { self.config.max_k } else { 0 }.max(top_n);
            let probe_ready = |valid: usize| need_k == 0 || everything || valid >= need_k;
            let kept = match kept {
                Some(Kept::All) if !probe_ready(valid_proc) => None,
                k if !probe_ready(valid_raw) => k.and(None),
                // Once per row: a search that gave up would give up again.
                None if !everything && !wide_searched && probe_ready(valid_proc) => {
                    // The draw's uniform number, taken below, is known now: the search
                    // finds the draw in the same pass as the nucleus.
                    let u = opts.forced.is_none().then(|| rng.peek_f64());
                    self.wide_nucleus(&prow, s_p, valid_proc, sampling, u, &mut wide_searched)
                }
                k => k,
            };
            let Some(kept) = kept else {
                // `everything` always decides; this only grows a finite threshold.
                debug_assert!(!everything);
                need = need.saturating_mul(4);
                t = self.gather(logits, need);
                continue;
            };
            let selected = match (opts.forced, &kept) {
                (Some(id), _) => id,
                (None, Kept::Prefix(n)) => {
                    self.sampler.draw_prefix(&self.order_proc, *n, greedy, rng)
                }
                (None, Kept::All) => self.sampler.draw_all(&prow, s_p, &self.order_proc, rng),
                (None, Kept::Wide(w)) => {
                    // draw_prefix's walk: the first token whose cumulative weight exceeds
                    // u · total; past the cut only when u · total rounds up to the total.
                    let target = rng.next_f64() * w.cut.cum;
                    match w.draw {
                        Some(found) => found.id(),
                        None => self
                            .wide
                            .draw_sorted(&prow, target, w.cut.at)
                            .unwrap_or(w.cut.id()),
                    }
                }
            };
            let describe_processed = |cfg: &ProbeConfig| {
                if greedy {
                    greedy_point_mass(self.order_proc[0], selected, cfg.eps)
                } else {
                    describe::processed(
                        cfg,
                        &self.sampler,
                        &self.order_proc,
                        &prow,
                        t,
                        valid_proc,
                        &kept,
                        s_p,
                        sz_p,
                        selected,
                    )
                }
            };
            let raw_logprobs = opts
                .raw_logprobs
                .filter(|&top| top <= valid_raw)
                .map(|top| {
                    // At temperature 1 the row pass took the normalizer's sum already.
                    let s1 = (inv_t64 == 1.0).then_some(s);
                    let lse = logprobs::log_normalizer(logits, max, s1);
                    logprobs::from_top(logits, lse, &self.order_raw[..top], selected)
                });
            let processed_top = (top_n > 0).then(|| {
                describe_processed(&ProbeConfig {
                    min_k: 1,
                    max_k: top_n,
                    mass_threshold: 1.0,
                    eps: f64::MIN_POSITIVE,
                })
            });
            if !probe {
                return Ok(StepProbe {
                    selected,
                    raw: None,
                    processed: None,
                    degenerate: false,
                    processed_top,
                    raw_logprobs,
                });
            }
            let raw = describe::raw(&self.config, &row, t, &self.order_raw, valid_raw, selected);
            let processed = describe_processed(&self.config);
            return Ok(StepProbe {
                selected,
                raw: Some(raw),
                processed: Some(processed),
                degenerate: false,
                processed_top,
                raw_logprobs,
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
    ) -> Result<Distribution, InvalidLogits> {
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
            return Ok(describe::point_mass(top, self.config.eps));
        }
        self.sampler.penalized.clear();
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
                return Ok(describe::raw(
                    &self.config,
                    &row,
                    t,
                    &self.order_raw,
                    valid,
                    selected,
                ));
            }
            need = need.saturating_mul(4);
            t = self.gather(logits, need);
        }
    }

    /// Top-p alone reaches past the gathered candidates (`valid` of them, exactly ordered)
    /// into a nucleus too wide to sort cheaply: finds it with [`crate::dist::nucleus::Wide`].
    /// `None`: not this case, or the search gave up; the caller gathers and sorts more.
    /// `searched` is set when the search ran.
    fn wide_nucleus(
        &mut self,
        row: &RowSums,
        s_p: f64,
        valid: usize,
        sampling: &SamplingConfig,
        u: Option<f64>,
        searched: &mut bool,
    ) -> Option<Kept> {
        #[cfg(test)]
        if self.no_wide {
            return None;
        }
        let plain_top_p = sampling.top_k == 0
            && sampling.min_p == 0.0
            && sampling.top_p < 1.0
            && !sampling.is_greedy()
            && self.sampler.penalized.is_empty();
        if !plain_top_p || valid == 0 {
            return None;
        }
        let target = sampling.top_p * s_p;
        if self.sampler.nucleus_at_least(valid, target) < WIDE_FROM as f64 {
            return None;
        }
        *searched = true;
        let cut = self.wide.find(row, s_p, target, u).ok()?;
        #[cfg(test)]
        {
            self.wide_taken += 1;
        }
        Some(Kept::Wide(cut))
    }

    /// The exp pass: Σe^z and Σz·e^z of the row, with the candidates for `need` gathered on
    /// the way (penalized ids included); returns the gather threshold and the two sums.
    fn exp_pass(
        &mut self,
        logits: &[f32],
        max: f32,
        inv_t: f32,
        need: usize,
    ) -> Result<(f32, f64, f64), InvalidLogits> {
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

    fn degenerate(
        &mut self,
        logits: &[f32],
        opts: &StepOptions,
    ) -> Result<StepProbe, InvalidLogits> {
        if logits.iter().any(|v| v.is_nan()) {
            return Err(first_nan(logits));
        }
        if !logits.contains(&f32::INFINITY) {
            return Err(InvalidLogits::NoFinite);
        }
        let top = argmax_lowest(logits);
        let selected = opts.forced.unwrap_or(top);
        let d = (opts.probe || opts.processed_top > 0)
            .then(|| greedy_point_mass(top, selected, self.config.eps));
        Ok(StepProbe {
            selected,
            raw: d.clone().filter(|_| opts.probe),
            processed: d.clone().filter(|_| opts.probe),
            degenerate: true,
            processed_top: d.filter(|_| opts.processed_top > 0),
            raw_logprobs: None,
        })
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
        kernels::logit_of_key(*nth)
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
        for &(id, _) in &self.sampler.penalized {
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
        keys.extend(
            self.cand
                .iter()
                .map(|&i| sort_key(self.sampler.lp(logits, i), i)),
        );
        keys.sort_unstable();
        self.order_proc.clear();
        self.order_proc.extend(keys.iter().map(|&k| k as TokenId));
        self.keys = keys;
        self.order_proc
            .iter()
            .take_while(|&&i| self.sampler.lp(logits, i) >= t)
            .count()
    }
}

/// A u64 whose ascending order is (logit descending, id ascending): sorting plain integers is
/// several times faster than sorting ids through a comparator that reads the logits.
#[inline]
pub(crate) fn sort_key(logit: f32, id: TokenId) -> u64 {
    kernels::position(logit, id)
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

fn first_nan(logits: &[f32]) -> InvalidLogits {
    InvalidLogits::Nan {
        token_id: logits.iter().position(|v| v.is_nan()).unwrap_or(0),
    }
}

/// All mass on `top`, seen from `selected` (a forced token other than `top` has probability 0).
fn greedy_point_mass(top: TokenId, selected: TokenId, eps: f64) -> Distribution {
    let mut d = describe::point_mass(top, eps);
    if selected != top {
        d.selected_prob = 0.0;
        d.selected_logprob = eps.ln();
        d.selected_rank = 2;
    }
    d
}
