//! The trace: Token Heatmap's JSON schema (we write 2.0.0). `run.json`, which holds what
//! that schema has no room for, is [`crate::schema::run`].
//!
//! Mapping where the schema is narrower than we are:
//! - greedy decoding is written as `temperature 1.0, sample_top_k 1` (the schema requires a
//!   positive temperature); run.json keeps the real settings;
//! - `device` is `cpu`, `cuda` or `mps` (Metal) and omitted for anything else;
//! - `dtype` is the dtype of the logits the engine produced.

use crate::dist::row::{Distribution, ProbeConfig};
use crate::dist::sampler::SamplingConfig;
use crate::text::Pieces;
use logitprobe_backends::{TokenId, Vocab};
use serde::{Deserialize, Serialize};

/// The schema version we write.
pub const SCHEMA_VERSION: &str = "2.0.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub schema_version: String,
    /// Present when attention was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_metadata: Option<crate::lens::AttentionMetadata>,
    /// Present when the lens read the prompt positions too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logit_lens: Option<crate::lens::PromptLogitLens>,
    pub metadata: Metadata,
    pub tokens: PromptTokens,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub use_chat_template: bool,
    pub generated_text: String,
    pub generated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    pub generation_params: GenerationParams,
    pub probe_config: ProbeConfigOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub sample_top_k: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfigOut {
    pub min_k: usize,
    pub max_k: usize,
    pub mass_threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTokens {
    pub prompt_token_ids: Vec<TokenId>,
    pub prompt_tokens: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: usize,
    pub selected: SelectedToken,
    pub raw: DistributionOut,
    pub processed: DistributionOut,
    /// Each lens layer's view of this step, ascending by layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_lens: Option<Vec<crate::lens::LogitLensLayer>>,
    /// Each captured layer's attention at this step, ascending by layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<crate::lens::AttentionLayerEntry>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectedToken {
    pub token_id: TokenId,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributionOut {
    pub k_used: usize,
    pub entropy: f64,
    pub top_mass_used: f64,
    pub selected_prob: f64,
    pub selected_logprob: f64,
    pub selected_rank: usize,
    pub candidates: Vec<CandidateOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateOut {
    pub rank: usize,
    pub token_id: TokenId,
    pub token: String,
    pub prob: f64,
    pub logprob: f64,
}

impl DistributionOut {
    pub fn from_probe(d: &Distribution, source: &dyn Vocab, pieces: &mut Pieces) -> Self {
        DistributionOut {
            k_used: d.k_used,
            entropy: d.entropy,
            top_mass_used: d.top_mass_used,
            selected_prob: d.selected_prob,
            selected_logprob: d.selected_logprob,
            selected_rank: d.selected_rank,
            candidates: d
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| CandidateOut {
                    rank: i + 1,
                    token_id: c.token_id,
                    token: pieces.get(source, c.token_id),
                    prob: c.prob,
                    logprob: c.logprob,
                })
                .collect(),
        }
    }
}

impl GenerationParams {
    pub fn from_sampling(s: &SamplingConfig, max_new_tokens: usize) -> Self {
        if s.is_greedy() {
            GenerationParams {
                max_new_tokens,
                temperature: 1.0,
                top_p: 1.0,
                sample_top_k: 1,
            }
        } else {
            GenerationParams {
                max_new_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                sample_top_k: s.top_k,
            }
        }
    }
}

impl From<&ProbeConfig> for ProbeConfigOut {
    fn from(p: &ProbeConfig) -> Self {
        ProbeConfigOut {
            min_k: p.min_k,
            max_k: p.max_k,
            mass_threshold: p.mass_threshold,
            eps: Some(p.eps),
        }
    }
}

/// The schema's `device` for an engine's device name, if the schema has one for it.
pub fn schema_device(device: &str) -> Option<String> {
    match device {
        "cpu" => Some("cpu".into()),
        d if d.starts_with("cuda") => Some("cuda".into()),
        "metal" | "mps" => Some("mps".into()),
        _ => None,
    }
}

/// Current time as RFC 3339 (UTC, seconds), as the files write it.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `at` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_known_dates() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(1_778_580_000), "2026-05-12T10:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    }
}
