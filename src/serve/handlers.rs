//! The endpoints: each turns its request into a [`Job`], then the engine's events into a
//! response, whole or as server-sent events.

use super::api::{
    char_offset, chat_logprob, finite, llama_probability, parse, token_text, top_map, ApiError,
    ChatRequest, CompletionRequest, LlamaCompletionRequest, PromptField, SamplingFields,
    TextStream,
};
use super::engine::{Event, Job, PromptKind, TokenOut};
use super::AppState;
use crate::dist::logprobs::LogprobsMode;
use crate::dist::sampler::SamplingConfig;
use crate::generate::{GenerateConfig, LogprobsRequest, StopReason};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

type AppStateRef = State<Arc<AppState>>;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint: use /v1/completions, /v1/chat/completions, /v1/models, /completion, /health or /metrics".into(),
        param: None,
        code: Some("not_found"),
    }
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let want = match uri.path() {
        "/v1/models" | "/metrics" | "/health" | "/" => "GET",
        _ => "POST",
    };
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} takes {want}, not {method}", uri.path()),
        param: None,
        code: Some("method_not_allowed"),
    }
}

pub async fn viewer() -> Html<&'static str> {
    Html(include_str!("viewer.html"))
}

pub async fn models(State(state): AppStateRef) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "logitprobe",
            "max_model_len": state.n_ctx,
            // logitprobe's own: what "probe": true describes with.
            "probe_config": state.cfg.probe,
        }]
    }))
}

pub async fn metrics(State(state): AppStateRef) -> Response {
    let m = &state.metrics;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: i64| {
        out.push_str(&format!(
            "# HELP logitprobe_{name} {help}\n# TYPE logitprobe_{name} {kind}\nlogitprobe_{name} {value}\n"
        ));
    };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
    put(
        "requests_total",
        "counter",
        "Generation requests accepted.",
        get(&m.requests),
    );
    put(
        "requests_rejected_total",
        "counter",
        "Requests refused (bad request, full queue).",
        get(&m.rejected),
    );
    put(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens evaluated.",
        get(&m.prompt_tokens),
    );
    put(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        get(&m.generation_tokens),
    );
    put(
        "queue_length",
        "gauge",
        "Requests waiting for a slot.",
        m.queued.load(Ordering::Relaxed).max(0),
    );
    put(
        "slots_busy",
        "gauge",
        "Slots running a sequence.",
        m.slots_busy.load(Ordering::Relaxed).max(0),
    );
    put(
        "slots_total",
        "gauge",
        "Slots (sequences decoded together).",
        state.n_slots as i64,
    );
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// The request body, or the error for one that is too large or cut off.
fn body_of(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        ApiError {
            status,
            message: if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request body is larger than this server's limit of {} bytes",
                    state.cfg.max_body_bytes
                )
            } else {
                format!("the request body could not be read: {e}")
            },
            param: None,
            code: (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large"),
        }
    })
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != state.model_id => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model '{m}' does not exist on this server: it serves '{}' (see /v1/models)",
                state.model_id
            ),
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
        _ => Ok(()),
    }
}

/// The request's sampling settings over `defaults`, checked, and its seed.
fn sampling(
    f: &SamplingFields,
    defaults: SamplingConfig,
) -> Result<(SamplingConfig, u64), ApiError> {
    let s = SamplingConfig {
        temperature: f.temperature.unwrap_or(defaults.temperature),
        top_k: match f.top_k {
            Some(k) if k > 0 => k as usize,
            Some(_) => 0,
            None => defaults.top_k,
        },
        top_p: f.top_p.unwrap_or(defaults.top_p),
        min_p: f.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: f.repetition_penalty.unwrap_or(defaults.repeat_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(defaults.frequency_penalty),
    };
    s.validate().map_err(|e| {
        let param = if e.setting == "repeat_penalty" {
            "repetition_penalty"
        } else {
            e.setting
        };
        ApiError::bad_request(format!("{param} {} {}", e.value, e.rule), Some(param))
    })?;
    let seed = match f.seed {
        Some(s) if s >= 0 => s as u64,
        _ => crate::dist::sampler::fresh_seed(),
    };
    Ok((s, seed))
}

fn check_top(state: &AppState, n: usize, param: &str) -> Result<(), ApiError> {
    if n > state.cfg.max_logprobs {
        return Err(ApiError::bad_request(
            format!(
                "{param} {n} is above this server's limit of {}: ask for fewer (the server's max-logprobs setting sets the limit)",
                state.cfg.max_logprobs
            ),
            Some(param),
        ));
    }
    Ok(())
}

fn check_n(n: Option<usize>) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=128).contains(&n) {
        return Err(ApiError::bad_request(
            format!("n {n} is out of range: use 1 to 128"),
            Some("n"),
        ));
    }
    Ok(n)
}

fn prompts_of(p: &PromptField) -> Result<Vec<PromptKind>, ApiError> {
    let v: Vec<PromptKind> = match p {
        PromptField::Text(t) => vec![PromptKind::Text(t.clone())],
        PromptField::Texts(v) => v.iter().cloned().map(PromptKind::Text).collect(),
        PromptField::Ids(ids) => vec![PromptKind::Ids(ids.clone())],
        PromptField::IdLists(v) => v.iter().cloned().map(PromptKind::Ids).collect(),
    };
    if v.is_empty() {
        return Err(ApiError::bad_request(
            "prompt is an empty list: send at least one prompt",
            Some("prompt"),
        ));
    }
    Ok(v)
}

/// Queues a job; a full queue is 503.
fn submit(
    state: &AppState,
    prompts: Vec<PromptKind>,
    n: usize,
    settings: GenerateConfig,
    stop: Vec<String>,
) -> Result<(UnboundedReceiver<Event>, u64), ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        id,
        prompts,
        n,
        settings: Arc::new(settings),
        stop,
        tx,
    };
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match state.jobs.try_send(job) {
        Ok(()) => {
            state.metrics.requests.fetch_add(1, Ordering::Relaxed);
            Ok((rx, id))
        }
        Err(e) => {
            state.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let message = match e {
                std::sync::mpsc::TrySendError::Full(_) => format!(
                    "the server is busy: {} requests are already waiting for a slot; retry later",
                    state.cfg.max_queue
                ),
                std::sync::mpsc::TrySendError::Disconnected(_) => {
                    "the server is shutting down".to_string()
                }
            };
            Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message,
                param: None,
                code: Some("queue_full"),
            })
        }
    }
}

/// What the engine said about one choice.
struct Choice {
    prompt: Vec<TokenOut>,
    tokens: Vec<TokenOut>,
    text: TextStream,
    done: Option<(StopReason, usize)>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Choice {
    fn new(stop: &[String]) -> Self {
        Choice {
            prompt: Vec::new(),
            tokens: Vec::new(),
            text: TextStream::new(stop),
            done: None,
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }

    /// The generated text, up to a stop string.
    fn output(&self) -> String {
        let len = self.done.map_or(self.text.bytes.len(), |d| d.1);
        String::from_utf8_lossy(&self.text.bytes[..len.min(self.text.bytes.len())]).into_owned()
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::MaxNewTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled | StopReason::Interrupted => "abort",
    }
}

fn engine_error(status: u16, message: String, param: Option<&'static str>) -> ApiError {
    ApiError {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        message,
        param: param.map(Into::into),
        code: (status == 400).then_some("invalid_prompt"),
    }
}

/// What an event was, once applied to its choice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Applied {
    Prompt,
    Token,
    Done,
}

/// Applies one event to its choice; returns what it was and the choice it touched.
fn apply(choices: &mut [Choice], ev: Event) -> Result<(Applied, usize), ApiError> {
    match ev {
        Event::Prompt { choice, tokens } => {
            choices[choice].prompt = tokens;
            Ok((Applied::Prompt, choice))
        }
        Event::Token { choice, token } => {
            let c = &mut choices[choice];
            if !token.special {
                c.text.push(&token.bytes);
            }
            c.tokens.push(*token);
            Ok((Applied::Token, choice))
        }
        Event::Done {
            choice,
            reason,
            text_len,
            prompt_tokens,
            completion_tokens,
        } => {
            let c = &mut choices[choice];
            c.done = Some((reason, text_len));
            c.prompt_tokens = prompt_tokens;
            c.completion_tokens = completion_tokens;
            Ok((Applied::Done, choice))
        }
        Event::Error {
            status,
            message,
            param,
        } => Err(engine_error(status, message, param)),
    }
}

/// The next event of a stream, applied; `None` when the stream has ended (with an error
/// event sent to the client).
async fn next_applied(
    rx: &mut UnboundedReceiver<Event>,
    choices: &mut [Choice],
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Option<(Applied, usize)> {
    let Some(ev) = rx.recv().await else {
        send_error(tx, lost()).await;
        return None;
    };
    match apply(choices, ev) {
        Ok(x) => Some(x),
        Err(e) => {
            send_error(tx, e).await;
            None
        }
    }
}

/// OpenAI's end of a stream: the usage chunk when asked for, then `[DONE]`.
async fn end_stream(tx: &mpsc::Sender<Result<SseEvent, Infallible>>, usage: Option<Value>) {
    if let Some(v) = usage {
        if !send(tx, &v).await {
            return;
        }
    }
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
}

fn lost() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the server stopped before the request finished".into(),
        param: None,
        code: None,
    }
}

/// Waits for every choice to finish.
async fn collect(
    rx: &mut UnboundedReceiver<Event>,
    n_choices: usize,
    stop: &[String],
) -> Result<Vec<Choice>, ApiError> {
    let mut choices: Vec<Choice> = (0..n_choices).map(|_| Choice::new(stop)).collect();
    while choices.iter().any(|c| c.done.is_none()) {
        let ev = rx.recv().await.ok_or_else(lost)?;
        apply(&mut choices, ev)?;
    }
    Ok(choices)
}

fn usage_of(choices: &[Choice], n: usize) -> Value {
    // Each prompt counts once, however many choices it has.
    let prompt: usize = choices
        .iter()
        .step_by(n.max(1))
        .map(|c| c.prompt_tokens)
        .sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn probe_list(tokens: &[TokenOut]) -> Value {
    Value::Array(
        tokens
            .iter()
            .map(|t| t.probe.as_ref().map_or(Value::Null, |s| json!(s)))
            .collect(),
    )
}

/// A completions `logprobs` block for `tokens`, whose text starts at character `offset`.
struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl CompletionLogprobs {
    fn new() -> Self {
        CompletionLogprobs {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        }
    }

    fn push(&mut self, t: &TokenOut, offset: usize) {
        self.tokens.push(Value::from(token_text(&t.bytes)));
        match &t.logprobs {
            Some(lp) => {
                self.token_logprobs.push(Value::from(finite(lp.logprob)));
                self.top_logprobs.push(top_map(t));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
        }
        self.text_offset.push(Value::from(offset));
    }

    fn json(self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// Settings of a job from the request's fields.
struct JobSettings {
    sampling: SamplingConfig,
    seed: u64,
    max_tokens: usize,
    ignore_eos: bool,
    logprobs: Option<LogprobsRequest>,
    echo: bool,
    probe: bool,
}

fn generate_config(state: &AppState, s: JobSettings) -> GenerateConfig {
    GenerateConfig {
        sampling: s.sampling,
        probe: state.cfg.probe.clone(),
        max_new_tokens: s.max_tokens,
        ignore_eos: s.ignore_eos,
        seed: s.seed,
        probe_enabled: s.probe,
        logprobs: s.logprobs,
        prompt_logprobs: s.echo,
        inside: None,
    }
}

/// OpenAI's defaults: temperature 1 and no filters.
fn openai_defaults() -> SamplingConfig {
    SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
    }
}

fn rejected(state: &AppState, e: ApiError) -> Response {
    state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

/// Server-sent events from a task that turns engine events into JSON chunks; when the
/// client leaves, the task drops the engine's channel and the slot frees at the next step.
fn sse(
    build: impl FnOnce(mpsc::Sender<Result<SseEvent, Infallible>>) -> tokio::task::JoinHandle<()>,
) -> Response {
    let (tx, rx) = mpsc::channel(64);
    build(tx);
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn send(tx: &mpsc::Sender<Result<SseEvent, Infallible>>, v: &Value) -> bool {
    tx.send(Ok(SseEvent::default().data(v.to_string())))
        .await
        .is_ok()
}

async fn send_error(tx: &mpsc::Sender<Result<SseEvent, Infallible>>, e: ApiError) {
    let v = json!({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}});
    let _ = send(tx, &v).await;
}

// ---------------------------------------------------------------------------------------
// POST /v1/completions

pub async fn completions(
    State(state): AppStateRef,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => rejected(&state, e),
    }
}

async fn completions_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body, state)?;
    let req: CompletionRequest = parse(&body)?;
    check_model(state, req.model.as_deref())?;
    let prompts = prompts_of(&req.prompt)?;
    let n = check_n(req.n)?;
    if let Some(k) = req.logprobs {
        check_top(state, k, "logprobs")?;
    }
    let (sampling, seed) = sampling(&req.sampling, openai_defaults())?;
    let stop = req
        .sampling
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    let max_tokens = req.max_tokens.unwrap_or(16);
    let settings = generate_config(
        state,
        JobSettings {
            sampling,
            seed,
            max_tokens,
            ignore_eos: req.sampling.ignore_eos,
            logprobs: req.logprobs.map(|top| LogprobsRequest {
                top,
                mode: state.cfg.logprobs_mode,
            }),
            echo: req.echo,
            probe: req.probe,
        },
    );
    let n_choices = prompts.len() * n;
    let (mut rx, job) = submit(state, prompts, n, settings, stop.clone())?;
    let id = format!("cmpl-{job}");
    let model = state.model_id.clone();
    let created = now();
    let want_lp = req.logprobs.is_some();
    let echo = req.echo;
    let probe = req.probe;

    if !req.stream {
        let choices = collect(&mut rx, n_choices, &stop).await?;
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut text = String::new();
                let mut lp = CompletionLogprobs::new();
                let mut all_bytes: Vec<u8> = Vec::new();
                let mut probes = Vec::new();
                if echo {
                    for t in &c.prompt {
                        lp.push(t, char_offset(&all_bytes, all_bytes.len()));
                        all_bytes.extend_from_slice(&t.bytes);
                    }
                    text.push_str(&String::from_utf8_lossy(&all_bytes));
                    probes.extend(c.prompt.iter().cloned());
                }
                let base_chars = char_offset(&all_bytes, all_bytes.len());
                let mut gen: Vec<u8> = Vec::new();
                for t in &c.tokens {
                    lp.push(t, base_chars + char_offset(&gen, gen.len()));
                    if !t.special {
                        gen.extend_from_slice(&t.bytes);
                    }
                }
                probes.extend(c.tokens.iter().cloned());
                text.push_str(&c.output());
                let mut choice = json!({
                    "index": i,
                    "text": text,
                    "logprobs": if want_lp { lp.json() } else { Value::Null },
                    "finish_reason": c.done.map(|d| finish_reason(d.0)),
                });
                if probe {
                    choice["probe"] = probe_list(&probes);
                    if echo {
                        choice["prompt_token_ids"] =
                            json!(c.prompt.iter().map(|t| t.id).collect::<Vec<_>>());
                    }
                }
                choice
            })
            .collect();
        return Ok(Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage_of(&choices, n),
        }))
        .into_response());
    }

    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    Ok(sse(move |tx| {
        tokio::spawn(async move {
            let mut choices: Vec<Choice> = (0..n_choices).map(|_| Choice::new(&stop)).collect();
            // Characters already streamed per choice (for text_offset).
            let mut chars = vec![0usize; n_choices];
            let chunk = |index: usize,
                         text: String,
                         lp: Option<Value>,
                         probe_v: Option<Value>,
                         finish: Option<&str>| {
                let mut c =
                    json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish});
                if let Some(p) = probe_v {
                    c["probe"] = p;
                }
                json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [c]})
            };
            while choices.iter().any(|c| c.done.is_none()) {
                let Some((kind, idx)) = next_applied(&mut rx, &mut choices, &tx).await else {
                    return;
                };
                let c = &mut choices[idx];
                let v = match kind {
                    Applied::Prompt if echo => {
                        let mut lp = CompletionLogprobs::new();
                        let mut bytes = Vec::new();
                        for t in &c.prompt {
                            lp.push(t, char_offset(&bytes, bytes.len()));
                            bytes.extend_from_slice(&t.bytes);
                        }
                        chars[idx] = char_offset(&bytes, bytes.len());
                        let mut v = chunk(
                            idx,
                            String::from_utf8_lossy(&bytes).into_owned(),
                            want_lp.then(|| lp.json()),
                            probe.then(|| probe_list(&c.prompt)),
                            None,
                        );
                        if probe {
                            v["choices"][0]["prompt_token_ids"] =
                                json!(c.prompt.iter().map(|t| t.id).collect::<Vec<_>>());
                        }
                        v
                    }
                    Applied::Token => {
                        let t = c.tokens.last().expect("just pushed");
                        let text = c.text.ready();
                        let mut lp = CompletionLogprobs::new();
                        lp.push(t, chars[idx]);
                        chars[idx] += text.chars().count();
                        chunk(
                            idx,
                            text,
                            want_lp.then(|| lp.json()),
                            probe.then(|| probe_list(std::slice::from_ref(t))),
                            None,
                        )
                    }
                    Applied::Done => {
                        let (reason, len) = c.done.expect("done");
                        let text = c.text.finish(len);
                        chunk(idx, text, None, None, Some(finish_reason(reason)))
                    }
                    _ => continue,
                };
                if !send(&tx, &v).await {
                    return;
                }
            }
            let usage = include_usage.then(|| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage_of(&choices, n)}));
            end_stream(&tx, usage).await;
        })
    }))
}

// ---------------------------------------------------------------------------------------
// POST /v1/chat/completions

pub async fn chat_completions(
    State(state): AppStateRef,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => rejected(&state, e),
    }
}

async fn chat_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body, state)?;
    let req: ChatRequest = parse(&body)?;
    check_model(state, req.model.as_deref())?;
    let messages = req.messages()?;
    let n = check_n(req.n)?;
    let top = req.top_logprobs.unwrap_or(0);
    check_top(state, top, "top_logprobs")?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::bad_request(
            "top_logprobs needs logprobs: true",
            Some("top_logprobs"),
        ));
    }
    let (sampling, seed) = sampling(&req.sampling, openai_defaults())?;
    let stop = req
        .sampling
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    // Without max_tokens a reply may run to the end of the context.
    let max_tokens = req.max_tokens.unwrap_or(state.n_ctx);
    let settings = generate_config(
        state,
        JobSettings {
            sampling,
            seed,
            max_tokens,
            ignore_eos: req.sampling.ignore_eos,
            logprobs: req.logprobs.then_some(LogprobsRequest {
                top,
                mode: state.cfg.logprobs_mode,
            }),
            echo: false,
            probe: req.probe,
        },
    );
    let (mut rx, job) = submit(
        state,
        vec![PromptKind::Chat(messages)],
        n,
        settings,
        stop.clone(),
    )?;
    let id = format!("chatcmpl-{job}");
    let model = state.model_id.clone();
    let created = now();
    let want_lp = req.logprobs;
    let probe = req.probe;
    // Control tokens (end-of-turn) are not content: they leave the logprobs too.
    let content_tokens =
        |c: &Choice| -> Vec<TokenOut> { c.tokens.iter().filter(|t| !t.special).cloned().collect() };

    if !req.stream {
        let choices = collect(&mut rx, n, &stop).await?;
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let toks = content_tokens(c);
                let mut choice = json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.output()},
                    "logprobs": if want_lp {
                        json!({"content": toks.iter().map(|t| chat_logprob(t, top)).collect::<Vec<_>>()})
                    } else {
                        Value::Null
                    },
                    "finish_reason": c.done.map(|d| finish_reason(d.0)),
                });
                if probe {
                    choice["probe"] = probe_list(&toks);
                }
                choice
            })
            .collect();
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage_of(&choices, n),
        }))
        .into_response());
    }

    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    Ok(sse(move |tx| {
        tokio::spawn(async move {
            let mut choices: Vec<Choice> = (0..n).map(|_| Choice::new(&stop)).collect();
            let chunk = |index: usize,
                         delta: Value,
                         lp: Option<Value>,
                         probe_v: Option<Value>,
                         finish: Option<&str>| {
                let mut c = json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish});
                if let Some(p) = probe_v {
                    c["probe"] = p;
                }
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [c]})
            };
            for i in 0..n {
                if !send(
                    &tx,
                    &chunk(
                        i,
                        json!({"role": "assistant", "content": ""}),
                        None,
                        None,
                        None,
                    ),
                )
                .await
                {
                    return;
                }
            }
            while choices.iter().any(|c| c.done.is_none()) {
                let Some((kind, idx)) = next_applied(&mut rx, &mut choices, &tx).await else {
                    return;
                };
                let c = &mut choices[idx];
                let v = match kind {
                    Applied::Token => {
                        let t = c.tokens.last().expect("just pushed").clone();
                        if t.special {
                            continue;
                        }
                        let text = c.text.ready();
                        chunk(
                            idx,
                            json!({"content": text}),
                            want_lp.then(|| json!({"content": [chat_logprob(&t, top)]})),
                            probe.then(|| probe_list(std::slice::from_ref(&t))),
                            None,
                        )
                    }
                    Applied::Done => {
                        let (reason, len) = c.done.expect("done");
                        let text = c.text.finish(len);
                        let delta = if text.is_empty() {
                            json!({})
                        } else {
                            json!({"content": text})
                        };
                        chunk(idx, delta, None, None, Some(finish_reason(reason)))
                    }
                    _ => continue,
                };
                if !send(&tx, &v).await {
                    return;
                }
            }
            let usage = include_usage.then(|| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage_of(&choices, n)}));
            end_stream(&tx, usage).await;
        })
    }))
}

// ---------------------------------------------------------------------------------------
// POST /completion (llama-server's)

pub async fn llama_completion(
    State(state): AppStateRef,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match llama_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => rejected(&state, e),
    }
}

fn stop_type(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration => "eos",
        StopReason::StopString => "word",
        StopReason::MaxNewTokens | StopReason::ContextFull => "limit",
        StopReason::Cancelled | StopReason::Interrupted => "none",
    }
}

async fn llama_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body, state)?;
    let req: LlamaCompletionRequest = parse(&body)?;
    let prompts = prompts_of(&req.prompt)?;
    if prompts.len() != 1 {
        return Err(ApiError::bad_request(
            "/completion takes one prompt: send a string or a list of token ids",
            Some("prompt"),
        ));
    }
    check_top(state, req.n_probs, "n_probs")?;
    // llama-server's defaults.
    let defaults = SamplingConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        ..SamplingConfig::default()
    };
    let (sampling, seed) = sampling(&req.sampling, defaults)?;
    let stop = req
        .sampling
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    let max_tokens = match req.n_predict {
        Some(n) if n >= 0 => n as usize,
        _ => state.n_ctx,
    };
    let post = req.post_sampling_probs;
    let settings = generate_config(
        state,
        JobSettings {
            sampling,
            seed,
            max_tokens,
            ignore_eos: req.sampling.ignore_eos,
            logprobs: (req.n_probs > 0).then_some(LogprobsRequest {
                top: req.n_probs,
                mode: if post {
                    LogprobsMode::Processed
                } else {
                    LogprobsMode::Raw
                },
            }),
            echo: false,
            probe: req.probe,
        },
    );
    let (mut rx, _) = submit(state, prompts, 1, settings, stop.clone())?;
    let model = state.model_id.clone();
    let want = req.n_probs > 0;
    let probe = req.probe;
    let probs = move |toks: &[TokenOut]| -> Value {
        Value::Array(toks.iter().map(|t| llama_probability(t, post)).collect())
    };

    if !req.stream {
        let choices = collect(&mut rx, 1, &stop).await?;
        let c = &choices[0];
        let (reason, _) = c.done.expect("collected");
        let mut v = json!({
            "content": c.output(),
            "id_slot": 0,
            "stop": true,
            "model": model,
            "tokens_predicted": c.completion_tokens,
            "tokens_evaluated": c.prompt_tokens,
            "stop_type": stop_type(reason),
            "truncated": false,
        });
        if want {
            v["completion_probabilities"] = probs(&c.tokens);
        }
        if probe {
            v["probe"] = probe_list(&c.tokens);
        }
        return Ok(Json(v).into_response());
    }

    Ok(sse(move |tx| {
        tokio::spawn(async move {
            let mut choices = vec![Choice::new(&stop)];
            loop {
                let Some((kind, _)) = next_applied(&mut rx, &mut choices, &tx).await else {
                    return;
                };
                let c = &mut choices[0];
                let v = match kind {
                    Applied::Token => {
                        let t = c.tokens.last().expect("just pushed");
                        let mut v = json!({"content": c.text.ready(), "stop": false});
                        if want {
                            v["completion_probabilities"] = probs(std::slice::from_ref(t));
                        }
                        if probe {
                            v["probe"] = probe_list(std::slice::from_ref(t));
                        }
                        v
                    }
                    Applied::Done => {
                        let (reason, len) = c.done.expect("done");
                        json!({
                            "content": c.text.finish(len),
                            "stop": true,
                            "model": model,
                            "tokens_predicted": c.completion_tokens,
                            "tokens_evaluated": c.prompt_tokens,
                            "stop_type": stop_type(reason),
                        })
                    }
                    _ => continue,
                };
                if !send(&tx, &v).await || kind == Applied::Done {
                    return;
                }
            }
        })
    }))
}
