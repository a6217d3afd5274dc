//! The engines' errors: what an engine refuses, typed, and the user's mistakes it finds.

use std::path::PathBuf;

/// An error the user caused (bad path, bad setting, unusable model): the CLI prints it on one
/// line and exits with code 2, where engine failures exit with 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What an engine refuses, typed so that a front end can say which of its own settings to
/// change (the library names none): the CLI maps each to its flags and exit code 2.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The KV cache of `slots` sequences of `n_ctx` tokens needs more memory than there is.
    #[error("the KV cache for {slots} parallel sequence{} of {n_ctx} tokens needs {} but {} of memory is available", plural(*.slots), human_bytes(*.needed_bytes), human_bytes(*.available_bytes))]
    KvCacheTooLarge {
        slots: usize,
        n_ctx: usize,
        needed_bytes: u64,
        available_bytes: u64,
    },
    /// More sequences decoded together than the engine can hold.
    #[error("{slots} parallel sequences are more than the engine's limit of {max}")]
    TooManySlots { slots: usize, max: usize },
    /// The engine could not make a KV cache of `slots` sequences of `n_ctx` tokens.
    #[error("could not allocate the KV cache for {slots} parallel sequence{} of {n_ctx} tokens (about {}): {reason}", plural(*.slots), human_bytes(*.needed_bytes))]
    KvCacheAlloc {
        slots: usize,
        n_ctx: usize,
        needed_bytes: u64,
        reason: String,
    },
    /// `what` (a sequence, a text to score) needs more tokens than the context holds.
    #[error("{what} needs {needed} tokens but the context holds {n_ctx}")]
    ContextFull {
        what: String,
        needed: usize,
        n_ctx: usize,
    },
    /// `what` (a prompt and its answer) needs more tokens than the model was trained on.
    #[error("{what} needs {needed} tokens, more than the model's trained context of {model_ctx}")]
    BeyondTrainedContext {
        what: String,
        needed: usize,
        model_ctx: usize,
    },
    /// The context asked for is longer than the model's own.
    #[error("a context of {n_ctx} tokens is beyond the model's trained context {model_ctx}; use {model_ctx} or less")]
    ContextBeyondModel { n_ctx: usize, model_ctx: usize },
    /// The model file cannot be opened at all.
    #[error("cannot open model {}: {reason}", .path.display())]
    ModelUnreadable { path: PathBuf, reason: String },
    /// The file is not a GGUF (it may be another engine's model).
    #[error("{} is not a GGUF file (no GGUF magic)", .path.display())]
    NotGguf { path: PathBuf },
    /// Layers offloaded to a GPU, but llama.cpp was built for the CPU only.
    #[error("offloading {n_gpu_layers} layers needs a GPU build of llama.cpp")]
    NeedsGpuBuild { n_gpu_layers: u32 },
    /// A quantized V cache without flash attention, which llama.cpp cannot run.
    #[error("a quantized V cache ({cache_type_v}) needs flash attention")]
    QuantizedVNeedsFlashAttn { cache_type_v: String },
    /// An ONNX Runtime device this build does not know.
    #[error("device {device} is unknown: use cpu, cuda or auto")]
    UnknownDevice { device: String },
    /// The CUDA execution provider failed to register.
    #[error("the CUDA execution provider cannot register ({reason}); install onnxruntime-gpu with CUDA 13 and cuDNN 9")]
    CudaUnavailable { reason: String },
    /// No ONNX Runtime library anywhere it is looked for.
    #[error("no ONNX Runtime library found")]
    OrtLibNotFound,
    /// The ONNX Runtime library given does not exist.
    #[error("ONNX Runtime library {} does not exist", .path.display())]
    OrtLibMissing { path: PathBuf },
    /// This build lacks the engine.
    #[error("this logitprobe was built without the {engine} engine")]
    EngineNotBuilt { engine: &'static str },
    /// The test source's model spec is malformed.
    #[error("test backend model '{spec}' is invalid: use VOCAB[:SEED[:EOS_BIAS]] with VOCAB >= {min_vocab}")]
    BadTestModel { spec: String, min_vocab: usize },
    /// The engine cannot look inside the model (no logit lens, no attention).
    #[error("the {engine} engine cannot look inside the model (no logit lens, no attention)")]
    CaptureUnsupported { engine: String },
    /// A layer asked for (by the lens, or attention) beyond the model's decoder layers.
    #[error("{} layer {layer} is beyond the model's {n_layer} decoder layers (0 to {})", .part.name(), .n_layer.saturating_sub(1))]
    LayerOutOfRange {
        part: InsidePart,
        layer: usize,
        n_layer: usize,
    },
    /// Attention weights asked for while flash attention fuses them away (llama.cpp).
    #[error("flash attention fuses the attention softmax, so its weights cannot be read")]
    AttentionNeedsFlashAttnOff,
    /// The export computes attention in one fused node whose weights are not an output.
    #[error("this export computes attention in fused {op} nodes, whose weights are not an output; attention needs an export with standard ops (optimum)")]
    AttentionFused { op: String },
    /// Sliding-window layers reuse KV cells past the window, so a weight's column is no
    /// longer its position (llama.cpp's SWA cache).
    #[error("the model's sliding-window layers ({n_swa} tokens) reuse KV cells in a context of {n_ctx}, so attention positions cannot be told apart; use a context of {n_swa} tokens or less")]
    AttentionWindowed { n_swa: usize, n_ctx: usize },
    /// The logit lens does not know how this architecture turns a layer output into logits.
    #[error("the logit lens does not know how architecture '{arch}' turns a layer's output into logits (it knows {known})")]
    LensUnknownArchitecture { arch: String, known: &'static str },
    /// The model's final norm or output head cannot be read for the lens.
    #[error("the logit lens cannot read the model's output head: {reason}")]
    LensHeadUnreadable { reason: String },
    /// The export's graph does not show its decoder layers the way the lens finds them.
    #[error("cannot find the decoder layers in this export's graph: {reason}")]
    GraphNotUnderstood { reason: String },
}

/// Which look inside the model a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsidePart {
    LogitLens,
    Attention,
}

impl InsidePart {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            InsidePart::LogitLens => "logit lens",
            InsidePart::Attention => "attention",
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Shorthand for returning a [`UsageError`].
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        ::anyhow::Error::new($crate::UsageError(format!($($arg)*)))
    };
}

/// Bytes for people: MiB below a GiB, else GiB with one decimal.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.0} MiB", (b / (1024.0 * 1024.0)).ceil())
    }
}
