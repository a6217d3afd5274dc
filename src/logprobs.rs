//! Token logprobs as OpenAI's `logprobs` reports them: the chosen token's log-probability
//! and the most likely tokens' at each position.
//!
//! Two meanings, as vLLM names them:
//! - [`LogprobsMode::Raw`]: log-softmax of the model's logits at temperature 1, whatever the
//!   sampling settings. What evaluation harnesses expect, and what `compare` scores
//!   (`x[token] − ln Σ e^x`, in f64).
//! - [`LogprobsMode::Processed`]: the distribution the sampler drew from, after penalties,
//!   temperature and the top-k / top-p / min-p filters (the trace's `processed` block).
//!   Filtered tokens have probability 0: their logprob is −∞.

use crate::compare::stats::log_sum_exp;
use crate::probe::Distribution;
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
    heap: BinaryHeap<Reverse<(OrdF32, Reverse<u32>)>>,
}

impl Logprobs {
    /// Log-softmax of `row` at temperature 1: `token`'s logprob and the `top` largest.
    ///
    /// ```
    /// use logitprobe::logprobs::Logprobs;
    ///
    /// let lp = Logprobs::default().raw(&[0.0, 2.0f32.ln(), 0.0], 2, 0);
    /// assert!((lp.logprob - 0.25f64.ln()).abs() < 1e-7);
    /// assert_eq!(lp.top[0].0, 1);
    /// assert_eq!(lp.top[1].0, 0, "ties go to the lower id");
    /// ```
    pub fn raw(&mut self, row: &[f32], top: usize, token: TokenId) -> TokenLogprobs {
        let lse = log_sum_exp(row);
        let lp = |id: u32| f64::from(row[id as usize]) - lse;
        let top = top.min(row.len());
        // One pass with a heap of the `top` best so far (the worst on top): nearly every entry
        // is turned away by one comparison, where a selection over the vocabulary would move
        // it. Better = larger logit, then lower id.
        self.heap.clear();
        if top > 0 {
            for (i, &x) in row.iter().enumerate() {
                let key = Reverse((OrdF32(x), Reverse(i as u32)));
                if self.heap.len() < top {
                    self.heap.push(key);
                } else if key < *self.heap.peek().expect("full heap") {
                    self.heap.pop();
                    self.heap.push(key);
                }
            }
        }
        let mut ids: Vec<u32> = self
            .heap
            .drain()
            .map(|Reverse((_, Reverse(i)))| i)
            .collect();
        ids.sort_unstable_by_key(|&i| (Reverse(OrdF32(row[i as usize])), i));
        let best = ids.into_iter().map(|i| (i, lp(i))).collect();
        TokenLogprobs {
            token,
            logprob: lp(token),
            top: best,
        }
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
        assert!((lp.logprob - (f64::from(row[7]) - lse)).abs() < 1e-12);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(f64::from(max) - lse, lp.top[0].1);
    }
}
