//! Request bodies as OpenAI and llama-server name their fields, errors in OpenAI's shape, and
//! the pieces of responses (logprobs blocks, text that streams without splitting a character
//! or showing the start of a stop string).

use crate::text::chat::Message;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use logitprobe_backends::TokenId;
use serde::{Deserialize, Serialize};

/// What JSON holds for a logprob of −∞ (a token the sampler's filters removed): vLLM's value.
pub const NEG_INF_LOGPROB: f64 = -9999.0;

/// A logprob as JSON can hold it.
pub fn finite(lp: f64) -> f64 {
    if lp.is_finite() {
        lp
    } else {
        NEG_INF_LOGPROB
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(Into::into),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            400 | 405 | 413 | 422 => "invalid_request_error",
            503 => "server_overloaded",
            _ => "server_error",
        }
    }

    /// The body of this error, with `kind` as its `type`.
    pub fn body(&self, kind: &'static str) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                code: self.code,
                message: self.message.clone(),
                param: self.param.clone(),
                kind,
            },
        }
    }
}

/// `{"error": {...}}`, keys in the order they have always had.
#[derive(Debug, Serialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: Option<&'static str>,
    pub message: String,
    pub param: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body(self.kind());
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parses a request body; a type error names the field it is in.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    // `end` refuses bytes after the value (`{...} trailing`), as `serde_json::from_slice` does:
    // without it a body with garbage after its object ran as if it were whole.
    let parsed = serde_path_to_error::deserialize::<_, T>(&mut de)
        .map_err(|e| (e.path().to_string(), e.into_inner()))
        .and_then(|v| de.end().map(|()| v).map_err(|e| (".".to_string(), e)));
    match parsed {
        Ok(v) => Ok(v),
        Err((path, inner)) => {
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::bad_request(
                    format!("the request body is not valid JSON: {inner}"),
                    None,
                )
                .with_code("invalid_json"));
            }
            let param = (path != ".").then_some(path);
            let what = param.as_deref().unwrap_or("the request body");
            Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("{what}: {inner}"),
                param,
                code: Some("invalid_type"),
            })
        }
    }
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<TokenId>),
    IdLists(Vec<Vec<TokenId>>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields every endpoint shares (OpenAI's names; vLLM's and llama.cpp's
/// extras).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// 0 or −1: off (vLLM takes −1).
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    pub repetition_penalty: Option<f32>,
    /// llama-server sends −1 for "a fresh seed".
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    /// vLLM's and llama-server's extra: end-of-generation tokens do not end the choice.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// logitprobe's own: each token's raw and processed blocks, as `trace` writes them.
    #[serde(default)]
    pub probe: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A chat message's content: text, or OpenAI's list of parts (text parts only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub probe: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl ChatRequest {
    /// The messages as the chat template takes them; only text content is understood.
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "messages is empty: send at least one message",
                Some("messages"),
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::bad_request(
                                        format!(
                                            "messages[{i}] has a content part of type '{}': this model takes text only",
                                            p.kind
                                        ),
                                        Some(&format!("messages[{i}].content")),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}

/// llama-server's `POST /completion`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaCompletionRequest {
    pub prompt: PromptField,
    /// −1: until the context is full or the model ends.
    pub n_predict: Option<i64>,
    #[serde(default)]
    pub n_probs: usize,
    #[serde(default)]
    pub post_sampling_probs: bool,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub probe: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A token's text as the logprobs lists show it (partial UTF-8 bytes as U+FFFD; `bytes`
/// has them exactly).
pub fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A choice's text as it streams: bytes come a token at a time, text goes out only up to
/// where it can no longer change (a whole character, and not the start of a stop string).
#[derive(Debug, Default)]
pub struct TextStream {
    pub bytes: Vec<u8>,
    emitted: usize,
    stops: Vec<Vec<u8>>,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            bytes: Vec::new(),
            emitted: 0,
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// The text that can go out now.
    pub fn ready(&mut self) -> String {
        let mut safe = self.bytes.len();
        // Hold back a tail that a stop string could still start with.
        for s in &self.stops {
            for k in (1..=s.len().min(self.bytes.len())).rev() {
                if self.bytes.ends_with(&s[..k]) {
                    safe = safe.min(self.bytes.len() - k);
                    break;
                }
            }
        }
        self.take_to(safe, false)
    }

    /// The rest of the text, up to `len` bytes in all (where a stop string began).
    pub fn finish(&mut self, len: usize) -> String {
        self.take_to(len.min(self.bytes.len()), true)
    }

    fn take_to(&mut self, mut end: usize, last: bool) -> String {
        if end <= self.emitted {
            return String::new();
        }
        let tail = &self.bytes[self.emitted..end];
        if !last {
            // A character cut between tokens waits for its other bytes.
            if let Err(e) = std::str::from_utf8(tail) {
                if e.error_len().is_none() {
                    end = self.emitted + e.valid_up_to();
                }
            }
        }
        let text = String::from_utf8_lossy(&self.bytes[self.emitted..end]).into_owned();
        self.emitted = end;
        text
    }
}

/// Characters (as Python counts them) before byte `at`: what `text_offset` counts.
pub fn char_offset(bytes: &[u8], at: usize) -> usize {
    bytes[..at.min(bytes.len())]
        .iter()
        .filter(|&&b| (b & 0xC0) != 0x80)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_holds_back_stop_prefixes_and_cut_characters() {
        let mut t = TextStream::new(&["END".into()]);
        t.push(b"hello E");
        assert_eq!(t.ready(), "hello ");
        t.push(b"N");
        assert_eq!(t.ready(), "");
        t.push(b"D more");
        // The engine ends the sequence where END starts.
        assert_eq!(t.finish(6), "");
        let mut t = TextStream::new(&[]);
        t.push(&"é".as_bytes()[..1]);
        assert_eq!(t.ready(), "");
        t.push(&"é".as_bytes()[1..]);
        assert_eq!(t.ready(), "é");
        assert_eq!(char_offset("aé b".as_bytes(), 4), 3);
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse::<CompletionRequest>(br#"{"prompt": "x", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse::<CompletionRequest>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse::<CompletionRequest>(br#"{"prompt": "x"} trailing"#).unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        assert!(parse::<CompletionRequest>(b"{\"prompt\": \"x\"} \n").is_ok());
    }
}
