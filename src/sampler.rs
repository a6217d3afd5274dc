//! Sampling settings and the seeded random stream each prompt draws from.
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

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

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

    /// Checks the settings; the message names the flag and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite() && self.temperature <= 1e4) {
            return Err(format!(
                "--temperature {} is invalid: use 0 for greedy or a positive number such as 0.8",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "--top-p {} is outside (0, 1]: use e.g. 0.95, or 1 to turn top-p off",
                self.top_p
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(format!(
                "--min-p {} is outside [0, 1): use e.g. 0.05, or 0 to turn min-p off",
                self.min_p
            ));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "--repeat-penalty {} must be a positive number (1 turns it off)",
                self.repeat_penalty
            ));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err("--presence-penalty and --frequency-penalty must be finite numbers".into());
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
