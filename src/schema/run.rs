//! `run.json`: a run's settings and engine, its prompts or totals, and how it ended.

use crate::dist::row::ProbeConfig;
use crate::dist::sampler::SamplingConfig;
use serde::Serialize;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfGeneration,
    MaxNewTokens,
    ContextFull,
    /// A stop string appeared in the generated text.
    StopString,
    /// A sink ended the sequence or the run.
    Cancelled,
    Interrupted,
    /// The step's logits row held no finite value (every entry −∞): no distribution to
    /// sample, so the sequence ended before that step.
    NoFiniteLogits,
}

impl StopReason {
    /// The name written to run.json and summaries.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration => "end_of_generation",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::StopString => "stop_string",
            StopReason::Cancelled => "cancelled",
            StopReason::Interrupted => "interrupted",
            StopReason::NoFiniteLogits => "no_finite_logits",
        }
    }
}

/// Wall-clock split of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Engine time of the decode calls that evaluated prompt tokens (a refilled slot's
    /// prompt goes in the same call as the other slots' next tokens).
    pub prefill_s: f64,
    /// Engine and sampling time of the other steps.
    pub decode_s: f64,
    /// Sampling and probing (inside the two above: the engine's share is the rest).
    pub probe_s: f64,
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Generated tokens per second of the steps that evaluated no prompt.
    pub decode_tokens_per_s: f64,
    /// Generated tokens per second of the whole loop.
    pub tokens_per_s: f64,
    pub wall_s: f64,
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

impl From<&crate::lens::Inside> for InsideRecord {
    fn from(i: &crate::lens::Inside) -> Self {
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
    pub shard: crate::schema::shard::Shard,
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
