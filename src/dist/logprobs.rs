//! Token logprobs as OpenAI's `logprobs` reports them: the chosen token's log-probability
//! and the most likely tokens' at each position.
//!
//! Two meanings, as vLLM names them:
//! - [`LogprobsMode::Raw`]: log-softmax of the model's logits at temperature 1, whatever the
//!   sampling settings. What evaluation harnesses expect, and what `compare` scores:
//!   `x[token] − ln Σ e^x`, with the probe's f32 exponentials summed in f64 (within 2e-7 of
//!   `compare`'s f64 exponentials; a server computes it for every token, `compare` once per
//!   position of a whole corpus).
//! - [`LogprobsMode::Processed`]: the distribution the sampler drew from, after penalties,
//!   temperature and the top-k / top-p / min-p filters (the trace's `processed` block).
//!   Filtered tokens have probability 0: their logprob is −∞.

use crate::dist::kernels;
use crate::dist::row::Distribution;
use logitprobe_backends::TokenId;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Which distribution logprobs describe.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum LogprobsMode {
    /// Log-softmax of the logits at temperature 1.
    #[default]
    #[value(name = "raw_logprobs")]
    #[serde(rename = "raw_logprobs")]
    Raw,
    /// The sampler's distribution, after penalties, temperature and filters.
    #[value(name = "processed_logprobs")]
    #[serde(rename = "processed_logprobs")]
    Processed,
}

/// One position's logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenId,
    pub logprob: f64,
    /// The most likely tokens by descending logprob (ties toward the lower id).
    pub top: Vec<(TokenId, f64)>,
}

impl TokenLogprobs {
    /// From the probe's description of a distribution: its candidates are the top tokens.
    /// No description (the probe was off) gives the token alone with logprob 0.
    pub fn from_distribution(d: Option<&Distribution>, token: TokenId) -> Self {
        match d {
            Some(d) => TokenLogprobs {
                token,
                logprob: if d.selected_prob > 0.0 {
                    d.selected_prob.ln()
                } else {
                    f64::NEG_INFINITY
                },
                top: d
                    .candidates
                    .iter()
                    .filter(|c| c.prob > 0.0)
                    .map(|c| (c.token_id, c.prob.ln()))
                    .collect(),
            },
            None => TokenLogprobs {
                token,
                logprob: 0.0,
                top: Vec::new(),
            },
        }
    }
}

/// Computes raw logprobs; holds the scratch of the top-n selection.
#[derive(Debug, Default)]
pub struct Logprobs {
    blocks: Vec<f32>,
    heap: BinaryHeap<Reverse<(OrdF32, Reverse<u32>)>>,
    ids: Vec<u32>,
}

impl Logprobs {
    /// Log-softmax of `row` at temperature 1: `token`'s logprob and the `top` largest.
    ///
    /// ```
    /// use logitprobe::dist::logprobs::Logprobs;
    ///
    /// let lp = Logprobs::default().raw(&[0.0, 2.0f32.ln(), 0.0], 2, 0);
    /// assert!((lp.logprob - 0.25f64.ln()).abs() < 1e-7);
    /// assert_eq!(lp.top[0].0, 1);
    /// assert_eq!(lp.top[1].0, 0, "ties go to the lower id");
    /// ```
    pub fn raw(&mut self, row: &[f32], top: usize, token: TokenId) -> TokenLogprobs {
        let max = kernels::block_max(row, &mut self.blocks);
        let lse = log_normalizer(row, max, None);
        let top = top.min(row.len());
        // A heap of the `top` best so far (the worst on top), fed block by block: once it is
        // full, a block whose maximum does not beat the worst is skipped whole (its ids are
        // all higher, so a tie loses too). Better = larger logit, then lower id.
        self.heap.clear();
        if top > 0 {
            for (b, &bm) in self.blocks.iter().enumerate() {
                if self.heap.len() == top {
                    let Reverse((OrdF32(worst), _)) = *self.heap.peek().expect("full heap");
                    if bm <= worst {
                        continue;
                    }
                }
                let start = b * kernels::BLOCK;
                let end = (start + kernels::BLOCK).min(row.len());
                for (i, &x) in row[start..end].iter().enumerate() {
                    let key = Reverse((OrdF32(x), Reverse((start + i) as u32)));
                    if self.heap.len() < top {
                        self.heap.push(key);
                    } else if key < *self.heap.peek().expect("full heap") {
                        self.heap.pop();
                        self.heap.push(key);
                    }
                }
            }
        }
        self.ids.clear();
        self.ids
            .extend(self.heap.drain().map(|Reverse((_, Reverse(i)))| i));
        self.ids
            .sort_unstable_by_key(|&i| (Reverse(OrdF32(row[i as usize])), i));
        from_top(row, lse, &self.ids, token)
    }
}

/// `ln Σ e^x` of a row whose maximum is `max`: `max + ln Σ e^(x − max)`, the exponentials
/// the probe's ([`kernels::exp_sums`] at temperature 1). `s` is that sum when the probe
/// already took it; a row without a finite maximum gives `max`.
pub(crate) fn log_normalizer(row: &[f32], max: f32, s: Option<f64>) -> f64 {
    if !max.is_finite() {
        return f64::from(max);
    }
    let s = s.unwrap_or_else(|| kernels::exp_sums(row, max, 1.0).0);
    f64::from(max) + s.ln()
}

/// `token`'s logprob and the top ids' (already in order), under the normalizer `lse`.
pub(crate) fn from_top(row: &[f32], lse: f64, top: &[TokenId], token: TokenId) -> TokenLogprobs {
    let lp = |id: TokenId| f64::from(row[id as usize]) - lse;
    TokenLogprobs {
        token,
        logprob: lp(token),
        top: top.iter().map(|&i| (i, lp(i))).collect(),
    }
}

/// Total order of f32 for the selection (NaN rows are refused before they get here).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}

impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_matches_a_direct_log_softmax() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let lp = Logprobs::default().raw(&row, 5, 7);
        let lse = row.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((lp.logprob - (f64::from(row[7]) - lse)).abs() < 2e-7);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        assert!((f64::from(max) - lse - lp.top[0].1).abs() < 2e-7);
    }

    /// The block-skipping heap picks what sorting the whole row picks: ties toward the lower
    /// id, maxima in any block, rows shorter than a block and than `top`.
    #[test]
    fn top_equals_a_full_sort() {
        let mut lp = Logprobs::default();
        for (len, seed) in [(1000usize, 1u64), (64, 2), (5, 3), (4097, 4), (130, 5)] {
            let mut s = seed;
            // Few distinct values: many ties across blocks.
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % 17) as f32 * 0.25
                })
                .collect();
            for top in [0, 1, 3, 20, len, len + 3] {
                let got: Vec<u32> = lp.raw(&row, top, 0).top.iter().map(|t| t.0).collect();
                let mut all: Vec<u32> = (0..len as u32).collect();
                all.sort_by_key(|&i| (Reverse(OrdF32(row[i as usize])), i));
                all.truncate(top.min(len));
                assert_eq!(got, all, "len {len}, top {top}");
            }
        }
    }

    /// The probe's step hands out the same raw logprobs, bit for bit, as a pass of its own:
    /// at temperature 1 (the row pass's sum reused), another temperature, greedy, and with
    /// a penalty (raw logprobs ignore it).
    #[test]
    fn the_probe_step_gives_the_same_raw_logprobs() {
        use crate::dist::probe::{Probe, ProbeConfig, StepOptions};
        use crate::dist::sampler::{Rng, SamplingConfig};
        let mut s = 7u64;
        let row: Vec<f32> = (0..50_000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
            })
            .collect();
        let mut probe = Probe::new(ProbeConfig::default());
        let mut lp = Logprobs::default();
        for sampling in [
            SamplingConfig {
                temperature: 1.0,
                ..Default::default()
            },
            SamplingConfig::default(),
            SamplingConfig::greedy(),
            SamplingConfig {
                repeat_penalty: 1.3,
                ..Default::default()
            },
        ] {
            for top in [0, 1, 20] {
                let opts = StepOptions {
                    probe: true,
                    raw_logprobs: Some(top),
                    ..Default::default()
                };
                let sp = probe
                    .step_with(&row, &[3, 9, 3], &sampling, &mut Rng::new(1, 0), &opts)
                    .unwrap();
                let direct = lp.raw(&row, top, sp.selected);
                assert_eq!(sp.raw_logprobs, Some(direct), "{sampling:?}, top {top}");
            }
        }
    }
}
