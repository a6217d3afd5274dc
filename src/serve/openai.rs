//! OpenAI's response bodies for completions and chat, whole and streamed, as typed structs.
//!
//! Fields are declared in alphabetical order, the order their JSON keys have always had.

use super::api::{finite, token_text};
use super::engine::TokenOut;
use logitprobe_backends::TokenId;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::Value;

/// A whole OpenAI response, one streamed chunk (no usage), or the usage chunk that ends a
/// stream (no choices); `C` is the API's choice.
#[derive(Debug, Serialize)]
pub struct Response<C> {
    pub choices: Vec<C>,
    pub created: u64,
    pub id: String,
    pub model: String,
    pub object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `/v1/completions`.
pub type Completion = Response<CompletionChoice>;

/// `/v1/chat/completions`.
pub type ChatCompletion = Response<ChatChoice>;

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub finish_reason: Option<&'static str>,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    /// logitprobe's own: each token's probe (`null` for a token without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<Value>>,
    /// With the probe and echo: the prompt's token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    pub text: String,
}

/// A completion's `logprobs` block.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f64>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<TopLogprobs>>,
}

impl CompletionLogprobs {
    /// Adds `t`, whose text starts at character `offset` of the choice's text.
    pub fn push(&mut self, t: &TokenOut, offset: usize) {
        self.tokens.push(token_text(&t.bytes));
        self.token_logprobs
            .push(t.logprobs.as_ref().map(|lp| finite(lp.logprob)));
        self.top_logprobs
            .push(t.logprobs.as_ref().map(|_| TopLogprobs::of(t)));
        self.text_offset.push(offset);
    }
}

/// The top logprobs of a completion token as OpenAI's `{token: logprob}` map, most likely
/// first as OpenAI and vLLM send them; of two tokens with the same text the likelier stays.
#[derive(Debug, Default)]
pub struct TopLogprobs(Vec<(String, f64)>);

impl TopLogprobs {
    pub fn of(t: &TokenOut) -> Self {
        let mut top: Vec<(String, f64)> = Vec::new();
        if let Some(lp) = &t.logprobs {
            for ((_, l), b) in lp.top.iter().zip(&t.top_bytes) {
                let text = token_text(b);
                if !top.iter().any(|(t, _)| *t == text) {
                    top.push((text, finite(*l)));
                }
            }
        }
        TopLogprobs(top)
    }
}

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// A chat choice: a `message` in a whole response, a `delta` in a chunk.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDelta>,
    pub finish_reason: Option<&'static str>,
    pub index: usize,
    pub logprobs: Option<ChatLogprobs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<Value>>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub content: String,
    pub role: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

/// One entry of chat's `logprobs.content`: a token and its top alternatives.
#[derive(Debug, Serialize)]
pub struct ChatLogprob {
    #[serde(flatten)]
    pub token: ChatTopLogprob,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// A token, its bytes and its logprob.
#[derive(Debug, Serialize)]
pub struct ChatTopLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f64,
    pub token: String,
}

impl ChatTopLogprob {
    fn new(bytes: &[u8], logprob: f64) -> Self {
        ChatTopLogprob {
            bytes: bytes.to_vec(),
            logprob: finite(logprob),
            token: token_text(bytes),
        }
    }
}

impl ChatLogprob {
    /// `t` with its `top` likeliest alternatives.
    pub fn of(t: &TokenOut, top: usize) -> Self {
        let lp = t.logprobs.as_ref();
        ChatLogprob {
            token: ChatTopLogprob::new(&t.bytes, lp.map_or(0.0, |l| l.logprob)),
            top_logprobs: lp
                .map(|lp| {
                    lp.top
                        .iter()
                        .zip(&t.top_bytes)
                        .take(top)
                        .map(|((_, l), b)| ChatTopLogprob::new(b, *l))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// `/v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub data: Vec<ModelCard>,
    pub object: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub created: u64,
    pub id: String,
    pub max_model_len: usize,
    pub object: &'static str,
    pub owned_by: &'static str,
    /// logitprobe's own: what `"probe": true` describes with.
    pub probe_config: Value,
}

/// The probe of each token, as `"probe": true` returns it (`null` where a token has none).
pub fn probe_list(tokens: &[TokenOut]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| {
            t.probe.as_ref().map_or(Value::Null, |s| {
                serde_json::to_value(s).unwrap_or(Value::Null)
            })
        })
        .collect()
}
