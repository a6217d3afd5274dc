//! One logits row in, a token and its distributions out: the row's sums and candidates
//! (SIMD kernels, the wide-nucleus search), the sampler's chain and draw, the descriptions of
//! the raw and processed distributions, and token logprobs. [`probe::Probe`] coordinates
//! them; the types they share live in [`row`].

pub mod describe;
pub mod kernels;
pub mod logprobs;
mod nucleus;
pub mod probe;
pub mod row;
pub mod sampler;
