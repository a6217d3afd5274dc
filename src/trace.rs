//! The trace: Token Heatmap's JSON schema (we write 2.0.0) and
//! `run.json`, which holds what that schema has no room for.
//!
//! Mapping where the schema is narrower than we are:
//! - greedy decoding is written as `temperature 1.0, sample_top_k 1` (the schema requires a
//!   positive temperature); run.json keeps the real settings;
//! - `device` is `cpu`, `cuda` or `mps` (Metal) and omitted for anything else;
//! - `dtype` is the dtype of the logits the engine produced.

use crate::generate::{GenerateConfig, Generation, PromptInput, StopReason, Timings};
use crate::probe::{Distribution, ProbeConfig};
use crate::sampler::SamplingConfig;
use crate::text::Pieces;
use logitprobe_backends::{LogitSource, ModelInfo, TokenId};
use serde::{Deserialize, Serialize};

/// The schema version we write.
pub const SCHEMA_VERSION: &str = "2.0.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub schema_version: String,
    /// Present when attention was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_metadata: Option<crate::inside::AttentionMetadata>,
    /// Present when the lens read the prompt positions too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logit_lens: Option<crate::inside::PromptLogitLens>,
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
    pub logit_lens: Option<Vec<crate::inside::LogitLensLayer>>,
    /// Each captured layer's attention at this step, ascending by layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<crate::inside::AttentionLayerEntry>>,
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
    pub fn from_probe(
        d: &Distribution,
        source: &dyn logitprobe_backends::LogitSource,
        pieces: &mut Pieces,
    ) -> Self {
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

/// Current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Builds the schema trace of one prompt. `generated_text` is the prompt and the output
/// text (up to a stop string), special tokens skipped, as the Token Heatmap tool writes it.
pub fn build_trace(
    source: &dyn LogitSource,
    model_label: &str,
    input: &PromptInput,
    generation: &Generation,
    gen: &GenerateConfig,
    use_chat_template: bool,
) -> Trace {
    let info: &ModelInfo = source.info();
    let mut pieces = Pieces::default();
    let mut text = Vec::new();
    for &id in &input.ids {
        if !source.is_special(id) {
            if let Some(b) = source.token_bytes(id) {
                text.extend_from_slice(&b);
            }
        }
    }
    text.extend_from_slice(&generation.text[..generation.text_len]);
    Trace {
        schema_version: SCHEMA_VERSION.into(),
        attention_metadata: gen.inside.as_ref().and_then(|i| i.attention_metadata()),
        prompt_logit_lens: generation.prompt_lens.clone(),
        metadata: Metadata {
            model: model_label.to_string(),
            prompt: input.prompt.clone(),
            system_prompt: input.system_prompt.clone(),
            use_chat_template,
            generated_text: String::from_utf8_lossy(&text).into_owned(),
            generated_at: now_rfc3339(),
            device: schema_device(&info.device),
            dtype: Some(info.logits_dtype.clone()),
            vocab_size: Some(info.tokenizer_vocab.max(1)),
            generation_params: GenerationParams::from_sampling(&gen.sampling, gen.max_new_tokens),
            probe_config: (&gen.probe).into(),
        },
        tokens: PromptTokens {
            prompt_token_ids: input.ids.clone(),
            prompt_tokens: input.ids.iter().map(|&id| pieces.get(source, id)).collect(),
        },
        steps: generation.steps.clone(),
    }
}

/// What `run.json` records: the run's settings and engine, and either one prompt (in a
/// prompt's folder, or at the top of a run of one prompt) or the run's totals (at the top
/// of a run of several, whose prompts are listed in `summary.csv`).
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub logitprobe_version: &'static str,
    pub command: Vec<String>,
    pub backend: &'static str,
    pub model: String,
    pub model_path: String,
    pub model_sha256: Option<String>,
    pub engine: String,
    pub engine_version: String,
    pub device: String,
    pub n_vocab: usize,
    pub tokenizer_vocab: usize,
    pub n_ctx: usize,
    pub logits_dtype: String,
    pub engine_options: logitprobe_backends::EngineOptions,
    pub engine_details: serde_json::Map<String, serde_json::Value>,
    pub seed: u64,
    pub seed_given: bool,
    pub sampling: SamplingConfig,
    pub probe: ProbeConfig,
    pub probe_enabled: bool,
    pub max_new_tokens: usize,
    /// End-of-generation tokens did not end a prompt.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub use_chat_template: bool,
    /// A chat template that replaced the model's: its name, `file:PATH` or `inline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Whether special-token text in plain prompts became token ids.
    pub parse_special: bool,
    /// Sequences decoded together.
    pub parallel: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<PromptRecord>>,
    /// Prompts finished, by stop reason (top of a run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reasons: Option<std::collections::BTreeMap<&'static str, usize>>,
    pub interrupted: bool,
    pub started_at: String,
    pub finished_at: String,
    pub load_s: f64,
    /// Which shard of a sharded run this is (a shard's own run.json only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardRecord>,
    /// The whole run's timings (top of a run only: a prompt's folder is written before the
    /// run ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// The logit lens and attention settings, when the run looked inside the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inside: Option<InsideRecord>,
}

/// How a run looked inside the model.
#[derive(Debug, Clone, Serialize)]
pub struct InsideRecord {
    pub lens_layers: Vec<usize>,
    pub lens_top_k: usize,
    pub lens_prompt: bool,
    /// Bytes of the f32 output head the lens holds.
    pub lens_head_bytes: Option<usize>,
    pub attention_layers: Vec<usize>,
    pub attention_top_k: usize,
}

impl From<&crate::inside::Inside> for InsideRecord {
    fn from(i: &crate::inside::Inside) -> Self {
        InsideRecord {
            lens_layers: i.lens_layers.clone(),
            lens_top_k: i.lens_top_k(),
            lens_prompt: i.config.lens_prompt,
            lens_head_bytes: i.head.as_ref().map(|h| h.bytes()),
            attention_layers: i.attention_layers.clone(),
            attention_top_k: i.attention_top_k(),
        }
    }
}

/// A shard's part of a sharded run.
#[derive(Debug, Clone, Serialize)]
pub struct ShardRecord {
    #[serde(flatten)]
    pub shard: crate::shard::Shard,
    /// Prompts of this shard.
    pub prompts: usize,
    /// Of those, the ones an earlier run of this shard had finished (not done again).
    pub done_before: usize,
}

/// One prompt of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRecord {
    pub index: usize,
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    pub rendered_prompt: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop_reason: StopReason,
    /// Steps whose logits row had no finite entry (greedy fallback on the raw row).
    pub degenerate_steps: Vec<usize>,
    pub out_dir: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_778_580_000), "2026-05-12T10:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
