//! llama-server's `/completion` response body, whole and streamed, as typed structs.
//!
//! Fields are declared in alphabetical order, the order their JSON keys have always had.

use super::api::{finite, token_text};
use super::engine::TokenOut;
use logitprobe_backends::TokenId;
use serde::Serialize;
use serde_json::Value;

/// The whole response (`id_slot`, `truncated` and the counts set), a token's chunk (`stop`
/// false) or the final chunk (`stop` true, with the counts).
#[derive(Debug, Default, Serialize)]
pub struct LlamaCompletion {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_probabilities: Option<Vec<LlamaProbability>>,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_slot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<Value>>,
    pub stop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_evaluated: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_predicted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
}

/// One entry of `completion_probabilities`: log-probabilities before sampling, or
/// probabilities after it (`post_sampling_probs`), with its top alternatives.
#[derive(Debug, Serialize)]
pub struct LlamaProbability {
    #[serde(flatten)]
    pub token: LlamaTop,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<LlamaTop>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_probs: Option<Vec<LlamaTop>>,
}

/// A token and its logprob or probability.
#[derive(Debug, Serialize)]
pub struct LlamaTop {
    pub bytes: Vec<u8>,
    pub id: TokenId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prob: Option<f64>,
    pub token: String,
}

impl LlamaTop {
    fn new(id: TokenId, bytes: &[u8], l: f64, post_sampling: bool) -> Self {
        let (logprob, prob) = split(l, post_sampling);
        LlamaTop {
            bytes: bytes.to_vec(),
            id,
            logprob,
            prob,
            token: token_text(bytes),
        }
    }
}

/// A logprob as llama-server shows it: itself, or its probability after sampling.
fn split(l: f64, post_sampling: bool) -> (Option<f64>, Option<f64>) {
    if post_sampling {
        (None, Some(if l.is_finite() { l.exp() } else { 0.0 }))
    } else {
        (Some(finite(l)), None)
    }
}

impl LlamaProbability {
    pub fn of(t: &TokenOut, post_sampling: bool) -> Self {
        let lp = t.logprobs.as_ref();
        let tops: Vec<LlamaTop> = lp
            .map(|lp| {
                lp.top
                    .iter()
                    .zip(&t.top_bytes)
                    .map(|(&(id, l), b)| LlamaTop::new(id, b, l, post_sampling))
                    .collect()
            })
            .unwrap_or_default();
        let (top_logprobs, top_probs) = if post_sampling {
            (None, Some(tops))
        } else {
            (Some(tops), None)
        };
        LlamaProbability {
            token: LlamaTop::new(t.id, &t.bytes, lp.map_or(0.0, |l| l.logprob), post_sampling),
            top_logprobs,
            top_probs,
        }
    }
}
