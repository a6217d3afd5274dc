//! The [`LogitSource`] trait: what every engine gives the layers above, and the settings
//! that open one.

use crate::error::Error;
use crate::inside::{Architecture, CaptureSpec, Captured, LensHead};
use ndarray::Array2;
use serde::Serialize;
use std::sync::Arc;

/// A token id as the model's vocabulary numbers it.
pub type TokenId = u32;

/// The most sequences one engine decodes together: llama.cpp's own limit (`LLAMA_MAX_SEQ`),
/// and the bound for every engine, so a `--parallel` of 10^19 is an error and not an
/// allocation of that many slots.
pub const MAX_SLOTS: usize = 256;

/// Refuses more slots than [`MAX_SLOTS`].
pub fn check_slots(n_slots: usize) -> Result<(), Error> {
    if n_slots > MAX_SLOTS {
        return Err(Error::TooManySlots {
            slots: n_slots,
            max: MAX_SLOTS,
        });
    }
    Ok(())
}

/// What a source tells about the model it runs.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// A short name: the file or folder name, or the repo id.
    pub name: String,
    /// Engine name, e.g. `llama.cpp`, `onnxruntime`, `test`.
    pub engine: String,
    /// Version of the engine as it reports itself.
    pub engine_version: String,
    /// Where the forward pass runs: `cpu`, `cuda`, `metal`, ...
    pub device: String,
    /// Width of a logits row. Can exceed `tokenizer_vocab` (padded embedding matrices).
    pub n_vocab: usize,
    /// Number of ids the tokenizer defines; ids at or beyond it have no piece.
    pub tokenizer_vocab: usize,
    /// Maximum sequence length (prompt + generated) the source will accept.
    pub n_ctx: usize,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Every id that ends a generation (eos, `<|im_end|>`, `<|eot_id|>`, ...).
    pub eog: Vec<TokenId>,
    /// Whether the model's own tokenizer rules add BOS to a plain prompt.
    pub add_bos: bool,
    /// dtype of the logits the engine produces before we widen them to f32.
    pub logits_dtype: String,
    /// Engine settings and model facts that belong in `run.json` (flash attention, KV cache
    /// type, tensor types, execution provider ...).
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// What a model's token ids mean: their bytes, which are special, the tokenizer and chat
/// template. What only reads or writes token text (the writers, the server's responses) gets
/// this, not the engine.
pub trait Vocab {
    /// The model and engine, described.
    fn info(&self) -> &ModelInfo;

    /// Token ids of `text`. `add_bos` adds BOS when the model has one; `parse_special` turns
    /// special-token text such as `<|im_start|>` into its id instead of plain text.
    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>>;

    /// The bytes of one token (byte-level BPE pieces can be partial UTF-8), or `None` for an id
    /// the tokenizer does not define (padding columns of the logits).
    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>>;

    /// Whether `id` is a control / special token (skipped in generated text).
    fn is_special(&self, id: TokenId) -> bool;

    /// The model's own chat template (Jinja source), if it ships one.
    fn chat_template(&self) -> Option<String>;

    /// Decoded text of `ids`; special tokens are skipped when `skip_special`.
    fn detokenize(&self, ids: &[TokenId], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            if let Some(b) = self.token_bytes(id) {
                bytes.extend_from_slice(&b);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// One inference engine with a model loaded.
///
/// A source decodes up to `n` sequences together, one per *slot* (llama-server's word): slots
/// are numbered `0..n` by [`LogitSource::begin`], each with its own KV cache sized for the
/// context. [`LogitSource::decode`] takes the new tokens of some slots (a whole prompt when a
/// sequence starts, one token a step after that) and returns the logits of each one's last
/// position, in the order given. When a sequence ends, [`LogitSource::clear_slot`] empties its
/// KV cache and the next prompt starts there, so memory depends on `n`, never on how many
/// prompts pass through.
pub trait LogitSource: Vocab {
    /// Makes `n_slots` empty slots (allocating their KV cache when the number changes).
    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()>;

    /// Empties one slot's KV cache so that a new sequence can start in it.
    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()>;

    /// Sizes each slot's context for a job that needs at most `n_tokens` (its longest prompt
    /// plus the tokens to generate), when that is less than the context it has: a KV cache
    /// sized for the model's whole context multiplies memory by the slot count for nothing.
    /// Engines whose KV cache grows with the sequence keep the default, which does nothing.
    /// Call it before [`LogitSource::begin`].
    fn fit_context(&mut self, _n_tokens: usize) -> anyhow::Result<()> {
        Ok(())
    }

    /// Feeds new tokens to some sequences and returns `[batch.len(), n_vocab]` logits of each
    /// sequence's last position. Every entry must have at least one token.
    fn decode(&mut self, batch: &[(usize, &[TokenId])]) -> anyhow::Result<Array2<f32>> {
        self.decode_rows(batch, &[])
    }

    /// [`LogitSource::decode`], where an entry whose flag in `every_position` is set gets a
    /// row for each token it feeds (row `i` predicts the token after its `i`-th), not only
    /// the last: the prompt logprobs a server echoes, computed in the same call as the other
    /// slots' steps. Rows follow the batch order; a missing flag counts as unset.
    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>>;

    /// Teacher-forced scoring: `[tokens.len(), n_vocab]` logits where row `i` predicts
    /// `tokens[i + 1]`. Uses its own KV cache state: call [`LogitSource::begin`] again before
    /// decoding.
    fn score(&mut self, tokens: &[TokenId]) -> anyhow::Result<Array2<f32>> {
        self.score_from(tokens, 0)
    }

    /// [`LogitSource::score`] of the rows from `first` on: `[tokens.len() - first, n_vocab]`
    /// logits where row `r` predicts `tokens[first + r + 1]`; the tokens before `first` are
    /// context only. The engine computes no logits (and captures nothing) for them, as
    /// llama-perplexity asks only for a chunk's scored half: the output head over a large
    /// vocabulary is a good share of a forward pass. `first` ≤ `tokens.len()`.
    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>>;

    /// The decoder's shape (layers, heads, widths), where the engine knows it.
    fn architecture(&self) -> Option<Architecture> {
        None
    }

    /// How fast this machine decodes one sequence at `threads` CPU threads right now: tokens
    /// per second over `steps` single-token steps after a short prompt, in a slot of its own
    /// (call [`LogitSource::begin`] again afterwards). `None`: the engine has no thread
    /// setting to try.
    fn decode_rate(&mut self, _threads: usize, _steps: usize) -> anyhow::Result<Option<f64>> {
        Ok(None)
    }

    /// Looks inside the model from the next decode on: each decoder layer's output (the
    /// residual stream the logit lens reads) and attention weights, for the layers `spec`
    /// names; an empty spec turns it off. Call it before [`LogitSource::begin`]. An engine
    /// that cannot read a part says why (a typed [`Error`]).
    fn set_capture(&mut self, spec: &CaptureSpec) -> anyhow::Result<()> {
        if spec.is_empty() {
            return Ok(());
        }
        Err(Error::CaptureUnsupported {
            engine: self.info().engine.clone(),
        }
        .into())
    }

    /// What the last [`LogitSource::decode_rows`] or [`LogitSource::score`] captured, one
    /// entry per logits row it returned, in the same order; empty when capture is off.
    fn take_captured(&mut self) -> Vec<Captured> {
        Vec::new()
    }

    /// The model's final norm and output head, which turn a captured layer output into
    /// logits (the logit lens). Read from the model once, on the first call.
    fn lens_head(&mut self) -> anyhow::Result<Arc<LensHead>> {
        Err(Error::CaptureUnsupported {
            engine: self.info().engine.clone(),
        }
        .into())
    }
}

impl<T: Vocab + ?Sized> Vocab for Box<T> {
    fn info(&self) -> &ModelInfo {
        (**self).info()
    }
    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>> {
        (**self).tokenize(text, add_bos, parse_special)
    }
    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        (**self).token_bytes(id)
    }
    fn is_special(&self, id: TokenId) -> bool {
        (**self).is_special(id)
    }
    fn chat_template(&self) -> Option<String> {
        (**self).chat_template()
    }
    fn detokenize(&self, ids: &[TokenId], skip_special: bool) -> String {
        (**self).detokenize(ids, skip_special)
    }
}

impl<T: LogitSource + ?Sized> LogitSource for Box<T> {
    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()> {
        (**self).begin(n_slots)
    }
    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        (**self).clear_slot(slot)
    }
    fn fit_context(&mut self, n_tokens: usize) -> anyhow::Result<()> {
        (**self).fit_context(n_tokens)
    }
    fn decode(&mut self, batch: &[(usize, &[TokenId])]) -> anyhow::Result<Array2<f32>> {
        (**self).decode(batch)
    }
    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        (**self).decode_rows(batch, every_position)
    }
    fn score(&mut self, tokens: &[TokenId]) -> anyhow::Result<Array2<f32>> {
        (**self).score(tokens)
    }
    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        (**self).score_from(tokens, first)
    }
    fn architecture(&self) -> Option<Architecture> {
        (**self).architecture()
    }
    fn decode_rate(&mut self, threads: usize, steps: usize) -> anyhow::Result<Option<f64>> {
        (**self).decode_rate(threads, steps)
    }
    fn set_capture(&mut self, spec: &CaptureSpec) -> anyhow::Result<()> {
        (**self).set_capture(spec)
    }
    fn take_captured(&mut self) -> Vec<Captured> {
        (**self).take_captured()
    }
    fn lens_head(&mut self) -> anyhow::Result<Arc<LensHead>> {
        (**self).lens_head()
    }
}

/// How many logits rows [`LogitSource::decode_rows`] returns for `batch`.
pub fn rows_of(batch: &[(usize, &[TokenId])], every_position: &[bool]) -> usize {
    batch
        .iter()
        .enumerate()
        .map(|(i, (_, t))| {
            if every_position.get(i).copied().unwrap_or(false) {
                t.len()
            } else {
                1
            }
        })
        .sum()
}

/// Physical CPU cores, as llama.cpp's `cpu_get_num_physical_cores` counts them on Linux:
/// distinct sets of hyper-thread siblings. Its default thread count: a second thread on one
/// core only slows the matrix kernels down.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sets = std::collections::HashSet::new();
    for cpu in 0..logical.max(1) * 4 {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings");
        if let Ok(s) = std::fs::read_to_string(path) {
            sets.insert(s.trim().to_string());
        }
    }
    if sets.is_empty() {
        logical
    } else {
        sets.len().min(logical)
    }
}

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// GGUF models through llama.cpp.
    Llama,
    /// ONNX exports through ONNX Runtime.
    Onnx,
    /// The deterministic in-memory test source (no model file).
    Test,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Llama => "llama",
            Backend::Onnx => "onnx",
            Backend::Test => "test",
        }
    }
}

/// Flash attention setting of llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    On,
    Off,
    #[default]
    Auto,
}

/// Engine settings shared by every engine (each reads what applies to it).
#[derive(Debug, Clone, Serialize, Default)]
pub struct EngineOptions {
    /// CPU threads for the forward pass; `None` picks the engine's default.
    pub threads: Option<usize>,
    /// llama.cpp: CPU threads for prompt processing and scoring; `None`: as `threads`.
    pub threads_batch: Option<usize>,
    /// Context length; `None` uses the model's own (capped to keep memory sane).
    pub ctx_size: Option<usize>,
    /// llama.cpp logical batch size for prompt evaluation and scoring.
    pub batch_size: Option<usize>,
    /// llama.cpp layers to offload to a GPU.
    pub n_gpu_layers: u32,
    pub flash_attn: FlashAttn,
    /// llama.cpp KV cache types (`f16` default, `f32` for exact comparisons, `q8_0` ...).
    pub cache_type_k: Option<String>,
    pub cache_type_v: Option<String>,
    /// ONNX Runtime device: `cpu`, `cuda` or `auto`.
    pub device: Option<String>,
    /// ONNX Runtime shared library to load.
    pub ort_lib: Option<std::path::PathBuf>,
    /// Show the engine's own log lines (through `tracing`).
    pub verbose: bool,
    /// Teacher-forced scoring ([`LogitSource::score_from`]) with the engine's fastest
    /// kernels, which may sum a row in another order than generation does: on llama.cpp's
    /// CPU backend llamafile's tinyBLAS and the tiled flash attention, as llama-perplexity
    /// runs (llama-bench's F16 prompt speed is twice what it is without tinyBLAS). Off,
    /// scoring gives the same numbers as a prompt's evaluation in `trace` or `serve`.
    /// `compare` turns it on.
    pub fast_scoring: bool,
}
