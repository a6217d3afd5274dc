//! The [`LogitSource`] trait and the inference engines behind it.
//!
//! A source owns a model, its tokenizer and its KV cache. It hands out `[batch, vocab]` f32
//! logits and nothing else: sampling and probing live in the `logitprobe` crate, so the same
//! seed and the same logits give the same tokens whatever the engine.
//!
//! Engines, each behind a cargo feature:
//! - `llama`: GGUF models through llama.cpp ([`llama::LlamaSource`]).
//! - `onnx`: ONNX exports through ONNX Runtime ([`onnx::OnnxSource`]).
//!
//! [`test_source::TestSource`] is always built: a deterministic in-memory source that lets the
//! generation loop, the writers and the reports be tested without any engine.
//!
//! ```
//! use logitprobe_backends::{test_source::TestSource, LogitSource, Vocab};
//!
//! let mut src = TestSource::new(300, 7);
//! let prompt = src.tokenize("Hello", false, false).unwrap();
//! src.begin(1).unwrap();
//! let logits = src.decode(&[(0, prompt.as_slice())]).unwrap();
//! assert_eq!(logits.shape(), &[1, 300]);
//! ```

#[cfg(feature = "llama")]
pub mod cpu_kernels;
mod error;
pub mod formats;
#[cfg(feature = "onnx")]
pub mod hf;
pub mod inside;
mod open;
mod source;
pub mod test_source;

#[cfg(feature = "llama")]
pub mod llama;
#[cfg(feature = "onnx")]
pub mod onnx;

pub use error::{human_bytes, Error, InsidePart, UsageError};
pub use formats::gguf;
pub use inside::{Architecture, CaptureSpec, Captured, LensHead};
pub use open::{open, open_test_source};
pub use source::{
    check_slots, physical_cores, rows_of, Backend, EngineOptions, FlashAttn, LogitSource,
    ModelInfo, TokenId, Vocab, MAX_SLOTS,
};
