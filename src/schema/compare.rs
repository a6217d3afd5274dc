//! `compare.json` and a compare shard's records: the sides, the input, every scored
//! position with A's and each B's view of it, and llama-perplexity's summaries.

use crate::dist::row::ProbeConfig;
use logitprobe_backends::TokenId;
use serde::{Deserialize, Serialize};

pub const COMPARE_JSON: &str = "compare.json";
pub const COMPARE_CSV: &str = "compare.csv";

/// The `kind` of a `compare.json`, which tells it apart from a trace.
pub const KIND: &str = "logitprobe-compare";
/// Version of the `compare.json` layout.
pub const FORMAT_VERSION: u32 = 1;

/// One side of a comparison, described fully enough to reproduce it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideInfo {
    /// `backend:model` as given.
    pub label: String,
    pub backend: String,
    pub model: String,
    pub model_path: String,
    pub model_sha256: Option<String>,
    /// Bytes of the model on disk (the file, or an ONNX folder's files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    pub engine: String,
    pub engine_version: String,
    pub device: String,
    pub n_vocab: usize,
    pub tokenizer_vocab: usize,
    pub n_ctx: usize,
    pub logits_dtype: String,
    /// Tensor types and bits per weight, KV cache type, flash attention, execution provider
    /// ... as the engine reports them.
    pub details: serde_json::Map<String, serde_json::Value>,
    /// One line for headers.
    pub description: String,
}

/// What was scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputInfo {
    /// `prompt`, `text-file` or `trace`.
    pub kind: String,
    /// The prompt, or the file's path.
    pub source: String,
    /// Chunk length (corpus input).
    pub ctx_size: Option<usize>,
    pub chunks: usize,
    pub score_all: bool,
    /// Tokens of the input in A's tokenization.
    pub tokens: usize,
    pub description: String,
}

/// A candidate as `compare.json` stores it (the trace's field names). Probabilities are written
/// with f32 precision, 9 significant digits: plenty to read and plot, and a corpus run holds
/// hundreds of thousands of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cand {
    pub rank: usize,
    pub token_id: TokenId,
    pub token: String,
    #[serde(serialize_with = "as_f32")]
    #[serde(deserialize_with = "f64_or_nan")]
    pub prob: f64,
    #[serde(serialize_with = "as_f32")]
    #[serde(deserialize_with = "f64_or_nan")]
    pub logprob: f64,
}

fn as_f32<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f32(*v as f32)
}

/// JSON has no NaN or infinity: serde_json writes them as `null` (a standard error over one
/// position, a KL of +∞ where B rules out a token A allows). Read `null` back as NaN.
pub fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A list of numbers where JSON's `null` (how serde_json writes NaN and ±∞) reads as NaN.
fn vec_f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    let v = Option::<Vec<Option<f64>>>::deserialize(d)?;
    Ok(v.map(|v| v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect()))
}

/// One side's view of one position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideAt {
    /// Probability and log-probability of the actual next token (f64 log-softmax).
    #[serde(deserialize_with = "f64_or_nan")]
    pub prob: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub logprob: f64,
    /// Entropy in nats of the full distribution.
    #[serde(deserialize_with = "f64_or_nan")]
    pub entropy: f64,
    /// The probe's adaptive k (its rule and settings, temperature 1).
    pub k_used: usize,
    pub candidates: Vec<Cand>,
}

/// B's view of one position, and how it differs from A's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BAt {
    #[serde(deserialize_with = "f64_or_nan")]
    pub prob: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub logprob: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub entropy: f64,
    pub k_used: usize,
    pub candidates: Vec<Cand>,
    /// KL(A‖B) in nats over the full vocabulary.
    #[serde(deserialize_with = "f64_or_nan")]
    pub kld: f64,
    /// p_B − p_A of the actual next token.
    #[serde(deserialize_with = "f64_or_nan")]
    pub delta_p: f64,
    pub top1_same: bool,
    /// 1 + the number of tokens B gives a strictly larger logit than A's top-1.
    pub b_rank_of_a_top1: usize,
    /// H(B) − H(A), nats.
    #[serde(deserialize_with = "f64_or_nan")]
    pub delta_entropy: f64,
    /// |top-k_A ∩ top-k_B| / |top-k_A ∪ top-k_B| of the adaptive sets.
    #[serde(deserialize_with = "f64_or_nan")]
    pub jaccard: f64,
    /// With `--lens`: KL(A‖B) of the two sides' logit-lens distributions at each lens layer
    /// (the report's `lens_layers`), nats.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "vec_f64_or_nan"
    )]
    pub lens_kld: Option<Vec<f64>>,
    /// With `--lens`: whether both sides' lens top-1 tokens agree at each lens layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens_top1_same: Option<Vec<bool>>,
}

/// How far apart two sides' lens distributions are at one layer, over every position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LensLayerSummary {
    pub layer: usize,
    /// KL(A‖B) of the lens distributions: mean ± error and percentiles, nats.
    pub kld: Spread,
    /// Fraction of positions where both sides' lens top-1 tokens agree.
    #[serde(deserialize_with = "f64_or_nan")]
    pub same_top1: f64,
}

/// One scored position: the logits at `pos` of chunk `chunk` predicting `token_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Position {
    /// Running index over all scored positions.
    pub index: usize,
    pub chunk: usize,
    pub pos: usize,
    /// The actual next token.
    pub token_id: TokenId,
    pub token: String,
    pub a: SideAt,
    /// One entry per B, in the order given.
    pub b: Vec<BAt>,
}

/// llama-perplexity's summary of one B against A.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub label: String,
    pub positions: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_a: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_a_err: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_b: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_b_err: f64,
    /// Cor(ln PPL(A), ln PPL(B)): correlation of the per-token log-probabilities.
    #[serde(deserialize_with = "f64_or_nan")]
    pub cor_ln_ppl: f64,
    /// ln(PPL(B) / PPL(A)).
    #[serde(deserialize_with = "f64_or_nan")]
    pub ln_ppl_ratio: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ln_ppl_ratio_err: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_ratio: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ppl_ratio_err: f64,
    pub kld: Spread,
    pub delta_p: Spread,
    #[serde(deserialize_with = "f64_or_nan")]
    pub rms_delta_p: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub rms_delta_p_err: f64,
    /// Fraction of positions where both top-1 tokens are the same.
    #[serde(deserialize_with = "f64_or_nan")]
    pub same_top_p: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub same_top_p_err: f64,
    /// Tokens in B's own tokenization of the input (`None` when the input is ids).
    pub b_tokens: Option<usize>,
    /// Positions where B's own tokenization differs from A's ids.
    pub tokenizer_positions_differ: Option<usize>,
    /// With `--lens`: per lens layer, how far B's lens is from A's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens: Option<Vec<LensLayerSummary>>,
}

impl Summary {
    /// PPL(B) − PPL(A) and its uncertainty, as llama-perplexity prints "Mean PPL(Q)-PPL(base)":
    /// the two PPLs' errors with their covariance, Cor · σ_lnA · σ_lnB · PPL(A) · PPL(B).
    pub fn ppl_difference(&self) -> (f64, f64) {
        let cov = self.cor_ln_ppl * self.ppl_a_err * self.ppl_b_err;
        let var = self.ppl_a_err.powi(2) + self.ppl_b_err.powi(2) - 2.0 * cov;
        (self.ppl_b - self.ppl_a, var.max(0.0).sqrt())
    }
}

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    #[serde(deserialize_with = "f64_or_nan")]
    pub load_a_s: f64,
    pub load_b_s: Vec<f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub generate_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub score_a_s: f64,
    pub score_b_s: Vec<f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub metrics_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub wall_s: f64,
    /// Tokens that went through each B's forward pass (A's too, when it scored them all).
    pub tokens_evaluated: usize,
    /// Tokens that went through A's forward pass in this run (none when its reference had
    /// every chunk).
    #[serde(default)]
    pub a_tokens: usize,
    pub positions_scored: usize,
    /// Scored positions per second of the whole comparison (load time excluded).
    #[serde(deserialize_with = "f64_or_nan")]
    pub positions_per_s: f64,
}

/// What `compare.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub kind: String,
    pub format_version: u32,
    pub logitprobe_version: String,
    pub created_at: String,
    pub command: Vec<String>,
    pub a: SideInfo,
    pub b: Vec<SideInfo>,
    pub input: InputInfo,
    pub probe: ProbeConfig,
    pub summaries: Vec<Summary>,
    pub timing: Timing,
    /// The layers `--lens` compared (each position's `lens_kld` follows this order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens_layers: Option<Vec<usize>>,
    /// A's reference, when the sides ran one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceUse>,
    /// A against A along another arithmetic path, with `--noise-floor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_floor: Option<NoiseFloor>,
    pub positions: Vec<Position>,
}

/// What a shard of a sharded comparison writes when it finishes, next to its chunks'
/// records: everything the merged `compare.json` needs besides the positions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardRecord {
    pub kind: String,
    pub shard: crate::schema::shard::Shard,
    /// Chunks of this shard, and of those the ones an earlier run of it had scored.
    pub chunks: usize,
    pub done_before: usize,
    pub logitprobe_version: String,
    pub finished_at: String,
    pub command: Vec<String>,
    pub a: SideInfo,
    pub b: Vec<SideInfo>,
    pub input: InputInfo,
    pub probe: ProbeConfig,
    pub timing: Timing,
    /// B's own tokenization of the whole corpus, per B.
    pub b_text: Vec<BText>,
    /// The layers `--lens` compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens_layers: Option<Vec<usize>>,
}

pub const SHARD_KIND: &str = "logitprobe-compare-shard";
pub const SHARD_JSON: &str = "shard.json";

/// How B's own tokenizer splits the corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BText {
    pub b_tokens: usize,
    pub tokenizer_positions_differ: usize,
}

/// The record of chunk `c`'s scored positions in a shard's folder.
pub fn chunk_record_path(shard_dir: &std::path::Path, c: usize) -> std::path::PathBuf {
    shard_dir.join(format!("chunk-{c:06}.json"))
}

/// How side B number `i` (0-based) of `n` is named in tables, plots and errors: `B` when it
/// is the only one, `B1`, `B2`, ... in a ladder.
pub fn b_name(i: usize, n: usize) -> String {
    if n > 1 {
        format!("B{}", i + 1)
    } else {
        "B".into()
    }
}

fn nan() -> f64 {
    f64::NAN
}

/// llama-perplexity's distribution summary of a per-position value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    #[serde(deserialize_with = "f64_or_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub stderr: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub max: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p99_9: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p99: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p95: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p90: f64,
    /// 75th and 25th percentiles: llama-perplexity prints them for Δp (older compare.json
    /// files lack them: NaN).
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub p75: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub median: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub p25: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p10: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p5: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p1: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub p0_1: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub min: f64,
}

/// The `kind` of a reference's manifest.
pub const REFERENCE_KIND: &str = "logitprobe-reference";
/// Version of the reference layout (the manifest and its chunk files).
pub const REFERENCE_FORMAT_VERSION: u32 = 1;
/// The manifest of a reference folder.
pub const REFERENCE_JSON: &str = "reference.json";

/// What a reference keeps of each of A's scored positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceRows {
    /// The output head's input (`n_embd` values), turned back into A's logits through A's
    /// own output head with the kernels A's engine ran: the same numbers, bit for bit.
    HeadInput,
    /// The logits row itself (`n_vocab` values), where the head cannot be replayed exactly.
    Logits,
}

/// The token ids of one chunk a reference holds A's rows for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceChunk {
    pub ids: Vec<TokenId>,
    /// Rows `first..ids.len() - 1` are scored.
    pub first: usize,
}

/// Which vocabulary A's rows are over, to refuse a B of another one without A at hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabDigest {
    pub n_vocab: usize,
    pub tokenizer_vocab: usize,
    /// sha256 of every token's bytes in id order (each as its length, then the bytes).
    pub sha256: String,
}

/// Where a head-input reference reads A's output head back from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSource {
    /// A's model file.
    pub path: String,
    /// Its size and modification time when the reference was made: a file that still has
    /// both is not hashed again.
    pub bytes: u64,
    pub modified_unix_s: u64,
    pub sha256: Option<String>,
}

/// `reference.json`: A's side of a comparison, kept so that each B can be compared with it
/// alone in memory, and so that a later run can skip A.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceManifest {
    pub kind: String,
    pub format_version: u32,
    pub logitprobe_version: String,
    pub created_at: String,
    /// What must match for a run to reuse this reference, field by field.
    pub job: serde_json::Map<String, serde_json::Value>,
    pub rows: ReferenceRows,
    /// Values per row: `n_embd` for head inputs, `n_vocab` for logits.
    pub width: usize,
    /// Why the rows are logits, when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_because: Option<String>,
    pub a: SideInfo,
    pub input: InputInfo,
    pub vocab: VocabDigest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadSource>,
    pub chunks: Vec<ReferenceChunk>,
}

/// How a comparison used its reference (in `compare.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceUse {
    pub dir: String,
    pub rows: ReferenceRows,
    pub width: usize,
    /// Bytes of the chunk files this comparison compares against (the reference's size for
    /// its chunks).
    pub bytes: u64,
    /// Bytes of A's logits kept in a temporary file for the B's while the run lasted (0 when
    /// A's output head was replayed for each B, or the rows are logits).
    #[serde(default)]
    pub a_logits_kept: u64,
    /// Chunks scored by A in this run, and chunks found already there.
    pub chunks_scored: usize,
    pub chunks_reused: usize,
}

/// How far A moves from itself when only the arithmetic changes: the floor under every B's
/// KLD, below which a difference is the kernels' and not the quantization's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoiseFloor {
    /// The other path A ran along.
    pub path: String,
    /// llama-perplexity's statistics of that A against A.
    pub summary: Summary,
}
