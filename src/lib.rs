//! logitprobe: see how a language model picks each next token.
//!
//! Logits come from an inference engine behind [`LogitSource`]; the sampler and the probe in
//! [`dist`] are the same whatever the engine, so the same seed and the same logits give the
//! same tokens and the same trace. The [`generate`] loop hands each finished step to
//! [`generate::Sink`]s; [`output`] writes the Token Heatmap trace files.
//!
//! The modules are layers, lowest first; a module imports only from the layers below it
//! (`tests/layers.rs` checks it):
//! [`util`], [`hub`], [`dist`], [`text`], [`lens`], [`schema`], [`generate`], [`report`],
//! [`output`], [`compare`], [`cluster`], [`serve`].

pub mod cluster;
pub mod compare;
pub mod dist;
pub mod generate;
pub mod hub;
pub mod lens;
pub mod output;
pub mod report;
pub mod schema;
pub mod serve;
pub mod text;
pub mod util;

pub use logitprobe_backends as backends;
pub use logitprobe_backends::{LogitSource, ModelInfo, TokenId, Vocab};

// The unit tests run under the allocator the binary installs, so that the memory budget of
// `util::budget` is tested as it runs.
#[cfg(test)]
#[global_allocator]
static ALLOC: util::budget::BudgetAlloc = util::budget::BudgetAlloc;
