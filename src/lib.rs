//! logitprobe: see how a language model picks each next token.
//!
//! Logits come from an inference engine behind [`LogitSource`]; the [`sampler`] and the
//! [`probe`] here are the same whatever the engine, so the same seed and the same logits give
//! the same tokens and the same trace. The [`generate`] loop hands each finished step to
//! [`generate::Sink`]s; [`output`] writes the Token Heatmap trace files.

pub mod chat;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod describe;
pub mod generate;
pub mod inside;
pub mod kernels;
pub mod logprobs;
pub mod merge;
pub mod models;
mod nucleus;
pub mod output;
pub mod plot;
pub mod probe;
pub mod prompts;
pub mod report;
pub mod sampler;
pub mod serve;
pub mod shard;
pub mod slurm;
pub mod text;
pub mod trace;

pub use logitprobe_backends as backends;
pub use logitprobe_backends::{LogitSource, ModelInfo, TokenId};
