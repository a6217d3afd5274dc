//! The types the probe and its helpers share: the probe's settings, a described
//! distribution, and the sums of one row under one temperature.

use crate::dist::kernels;
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
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ProbeConfigError> {
        if self.min_k == 0 {
            return Err(ProbeConfigError::MinKZero);
        }
        if self.min_k > self.max_k {
            return Err(ProbeConfigError::MinKAboveMaxK {
                min_k: self.min_k,
                max_k: self.max_k,
            });
        }
        if !(self.mass_threshold > 0.0 && self.mass_threshold <= 1.0) {
            return Err(ProbeConfigError::MassThreshold(self.mass_threshold));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(ProbeConfigError::Eps(self.eps));
        }
        Ok(())
    }
}

/// A [`ProbeConfig`] out of its range; the messages name the settings by their field names
/// (a front end says them its own way).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeConfigError {
    #[error("min_k 0 is invalid: keep at least one candidate (min_k 1 or more)")]
    MinKZero,
    #[error("min_k {min_k} is larger than max_k {max_k}: make min_k <= max_k")]
    MinKAboveMaxK { min_k: usize, max_k: usize },
    #[error("mass_threshold {0} is outside (0, 1]: use e.g. 0.95")]
    MassThreshold(f64),
    #[error("eps {0} must be a small positive number such as 1e-12")]
    Eps(f64),
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

/// A logits row the probe cannot describe: the engine or the model is broken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidLogits {
    /// A NaN: the run cannot go on.
    #[error("the logits hold NaN (first at token id {token_id})")]
    Nan { token_id: usize },
    /// Every entry −∞: no token has any probability, so there is no distribution to sample
    /// or describe (the sequence ends there).
    #[error(
        "the logits row holds no finite value (every entry is -inf), so it has no distribution"
    )]
    NoFinite,
}
/// The numbers that describe one row under one temperature, from the row pass.
#[derive(Clone, Copy)]
pub(crate) struct RowSums<'a> {
    pub(crate) logits: &'a [f32],
    pub(crate) max: f32,
    pub(crate) inv_t: f32,
    /// 1/T in f64, for reported probabilities (an f32 z is off by ~1e-6 at |z| ≈ 10).
    pub(crate) inv_t64: f64,
    pub(crate) s: f64,
    pub(crate) sz: f64,
}

impl<'a> RowSums<'a> {
    /// The same row's sums taken relative to `max` (≥ the row's own maximum): a penalty that
    /// lifts a logit far above the row's maximum (a repeat penalty of 0.001 multiplies a
    /// positive logit by 1000) would make e^z overflow relative to the raw maximum, and the
    /// processed distribution NaN. The raw sums shrink by e^(−d); what underflows was
    /// negligible next to the lifted logit.
    pub(crate) fn shifted_to(&self, max: f32) -> RowSums<'a> {
        if max == self.max {
            return *self;
        }
        if max < self.max {
            // A penalty lowered the maximum: the sums come from the penalized row itself
            // (`Sampler::penalized_sums`), not from these.
            return RowSums {
                max,
                s: f64::NAN,
                sz: f64::NAN,
                ..*self
            };
        }
        let d = (f64::from(max) - f64::from(self.max)) * self.inv_t64;
        let scale = (-d).exp();
        RowSums {
            logits: self.logits,
            max,
            inv_t: self.inv_t,
            inv_t64: self.inv_t64,
            s: self.s * scale,
            // Σ (z − d) e^(z − d) = e^(−d) (Σ z e^z − d Σ e^z)
            sz: scale * (self.sz - d * self.s),
        }
    }

    #[inline]
    pub(crate) fn z(&self, l: f32) -> f32 {
        (l - self.max) * self.inv_t
    }
    #[inline]
    pub(crate) fn z64(&self, l: f32) -> f64 {
        (f64::from(l) - f64::from(self.max)) * self.inv_t64
    }
    /// Sampling weight: the deterministic f32 exponential, identical on every platform.
    #[inline]
    pub(crate) fn w(&self, l: f32) -> f32 {
        kernels::exp(self.z(l))
    }
    /// Reported probability under normalizer `s`: f64 exponential for accuracy in the tail.
    #[inline]
    pub(crate) fn p(&self, l: f32, s: f64) -> f64 {
        if l == f32::NEG_INFINITY {
            0.0
        } else {
            self.z64(l).exp() / s
        }
    }
}
