//! The endpoints: each turns its request into a [`Job`], then the engine's events into a
//! response, whole or as server-sent events.

use super::api::{
    char_offset, ApiError, ChatRequest, CompletionRequest, LlamaCompletionRequest, PromptField,
    SamplingFields, TextStream,
};
use super::engine::{Event, Job, PromptKind, TokenOut};
use super::extract::ApiJson;
use super::llama_server::{LlamaCompletion, LlamaProbability};
use super::openai::Response as OpenAiResponse;
use super::openai::{
    probe_list, ChatChoice, ChatCompletion, ChatDelta, ChatLogprob, ChatLogprobs, ChatMessageOut,
    Completion, CompletionChoice, CompletionLogprobs, ModelCard, ModelList, Usage,
};
use super::AppState;
use crate::dist::logprobs::LogprobsMode;
use crate::dist::sampler::SamplingConfig;
use crate::generate::{GenerateConfig, LogprobsRequest, StopReason};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

type AppStateRef = State<Arc<AppState>>;

#[derive(Serialize)]
pub struct Health {
    status: &'static str,
}

pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
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

pub async fn models(State(state): AppStateRef) -> Json<ModelList> {
    Json(ModelList {
        data: vec![ModelCard {
            created: state.created,
            id: state.model_id.clone(),
            max_model_len: state.n_ctx,
            object: "model",
            owned_by: "logitprobe",
            // A JSON value: its keys in the order they have always had.
            probe_config: serde_json::to_value(&state.cfg.probe).unwrap_or_default(),
        }],
        object: "list",
    })
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

/// A request checked and turned into what the engine runs.
struct Valid {
    prompts: Vec<PromptKind>,
    /// Choices per prompt.
    n: usize,
    settings: GenerateConfig,
    stop: Vec<String>,
    stream: bool,
}

impl Valid {
    fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// The settings of a job from a request's fields over the server's.
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

fn stop_strings(f: &SamplingFields) -> Vec<String> {
    f.stop.clone().map(|s| s.into_vec()).unwrap_or_default()
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

    fn finish_reason(&self) -> Option<&'static str> {
        self.done.map(|d| finish_reason(d.0))
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::MaxNewTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled | StopReason::Interrupted | StopReason::NoFiniteLogits => "abort",
    }
}

/// What an event was, once applied to its choice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Applied {
    Prompt,
    Token,
    Done,
}

/// The engine's events for one queued request, applied to its choices as they come: the one
/// stream every route reads, whole (folded by [`Events::collect`]) or as server-sent events.
struct Events {
    rx: UnboundedReceiver<Event>,
    choices: Vec<Choice>,
    /// The job's number, in response ids.
    job: u64,
}

impl Events {
    /// The next event, applied: what it was and the choice it touched; `None` once every
    /// choice is done.
    async fn next(&mut self) -> Result<Option<(Applied, usize)>, ApiError> {
        if self.choices.iter().all(|c| c.done.is_some()) {
            return Ok(None);
        }
        let ev = self.rx.recv().await.ok_or_else(lost)?;
        self.apply(ev).map(Some)
    }

    fn apply(&mut self, ev: Event) -> Result<(Applied, usize), ApiError> {
        match ev {
            Event::Prompt { choice, tokens } => {
                self.choices[choice].prompt = tokens;
                Ok((Applied::Prompt, choice))
            }
            Event::Token { choice, token } => {
                let c = &mut self.choices[choice];
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
                let c = &mut self.choices[choice];
                c.done = Some((reason, text_len));
                c.prompt_tokens = prompt_tokens;
                c.completion_tokens = completion_tokens;
                Ok((Applied::Done, choice))
            }
            Event::Error {
                status,
                message,
                param,
            } => Err(ApiError {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message,
                param: param.map(Into::into),
                code: (status == 400).then_some("invalid_prompt"),
            }),
        }
    }

    /// Waits for every choice to finish.
    async fn collect(mut self) -> Result<Vec<Choice>, ApiError> {
        while self.next().await?.is_some() {}
        Ok(self.choices)
    }
}

fn lost() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the server stopped before the request finished".into(),
        param: None,
        code: None,
    }
}

/// Queues a job; a full queue is 503.
fn submit(state: &AppState, valid: Valid) -> Result<Events, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let choices = (0..valid.choices())
        .map(|_| Choice::new(&valid.stop))
        .collect();
    let job = Job {
        id,
        prompts: valid.prompts,
        n: valid.n,
        settings: Arc::new(valid.settings),
        stop: valid.stop,
        tx,
    };
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match state.jobs.try_send(job) {
        Ok(()) => {
            state.metrics.requests.fetch_add(1, Ordering::Relaxed);
            Ok(Events {
                rx,
                choices,
                job: id,
            })
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

/// Tokens counted once per prompt however many choices it has, and each choice's own.
fn usage_of(choices: &[Choice], n: usize) -> Usage {
    let prompt: usize = choices
        .iter()
        .step_by(n.max(1))
        .map(|c| c.prompt_tokens)
        .sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    Usage {
        completion_tokens: completion,
        prompt_tokens: prompt,
        total_tokens: prompt + completion,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What one API makes of a request's events: one response once every choice is done, or a
/// chunk per event as they come.
trait Render: Send + 'static {
    type Whole: Serialize;
    type Chunk: Serialize + Send;

    fn whole(&self, choices: &[Choice], n: usize) -> Self::Whole;

    /// The chunks a stream starts with, before any event.
    fn opening(&self) -> Vec<Self::Chunk> {
        Vec::new()
    }

    /// The chunk for an event applied to `choice` (number `index`), if it shows one.
    fn chunk(&mut self, what: Applied, index: usize, choice: &mut Choice) -> Option<Self::Chunk>;

    /// What a stream ends with once every choice is done (OpenAI's usage chunk and
    /// `[DONE]`), as event data.
    fn closing(&self, choices: &[Choice], n: usize) -> Vec<String>;
}

/// Validate → submit → events, folded into one response or streamed as server-sent events.
/// `request` is the validated job and what makes its `Render` once the job has its number.
async fn respond<R: Render>(
    state: &AppState,
    request: Result<(Valid, impl FnOnce(u64) -> R), ApiError>,
) -> Response {
    let result = async {
        let (valid, make_render) = request?;
        let (stream, n) = (valid.stream, valid.n);
        let events = submit(state, valid)?;
        let render = make_render(events.job);
        if stream {
            return Ok(sse(events, render, n));
        }
        let choices = events.collect().await?;
        Ok(Json(render.whole(&choices, n)).into_response())
    }
    .await;
    result.unwrap_or_else(|e: ApiError| {
        state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        e.into_response()
    })
}

/// Server-sent events from a task that turns the request's events into chunks; when the
/// client leaves, the task drops the engine's channel and the slot frees at the next step.
fn sse<R: Render>(mut events: Events, mut render: R, n: usize) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |data: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(data))).await.is_ok() }
        };
        for chunk in render.opening() {
            if !send(json_text(&chunk)).await {
                return;
            }
        }
        loop {
            match events.next().await {
                Ok(None) => break,
                Ok(Some((what, index))) => {
                    let chunk = render.chunk(what, index, &mut events.choices[index]);
                    if let Some(chunk) = chunk {
                        if !send(json_text(&chunk)).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    // The stream has begun: the error goes as its last event.
                    let _ = send(json_text(&e.body("server_error"))).await;
                    return;
                }
            }
        }
        for data in render.closing(&events.choices, n) {
            if !send(data).await {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn json_text(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// OpenAI's end of a stream: the usage chunk when asked for, then `[DONE]`.
fn openai_closing(usage: Option<String>) -> Vec<String> {
    usage.into_iter().chain(["[DONE]".to_string()]).collect()
}

// ---------------------------------------------------------------------------------------
// POST /v1/completions

pub async fn completions(
    State(state): AppStateRef,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    let request = completion_job(&state, req);
    respond(&state, request).await
}

fn completion_job(
    state: &AppState,
    req: CompletionRequest,
) -> Result<(Valid, impl FnOnce(u64) -> CompletionRender), ApiError> {
    check_model(state, req.model.as_deref())?;
    let prompts = prompts_of(&req.prompt)?;
    let n = check_n(req.n)?;
    if let Some(k) = req.logprobs {
        check_top(state, k, "logprobs")?;
    }
    let (sampling, seed) = sampling(&req.sampling, openai_defaults())?;
    let settings = generate_config(
        state,
        JobSettings {
            sampling,
            seed,
            max_tokens: req.max_tokens.unwrap_or(16),
            ignore_eos: req.sampling.ignore_eos,
            logprobs: req.logprobs.map(|top| LogprobsRequest {
                top,
                mode: state.cfg.logprobs_mode,
            }),
            echo: req.echo,
            probe: req.probe,
        },
    );
    let valid = Valid {
        prompts,
        n,
        settings,
        stop: stop_strings(&req.sampling),
        stream: req.stream,
    };
    let (model, n_choices) = (state.model_id.clone(), valid.choices());
    let render = move |job| CompletionRender {
        head: Head::new(model, "cmpl", job),
        want_lp: req.logprobs.is_some(),
        echo: req.echo,
        probe: req.probe,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        chars: vec![0; n_choices],
    };
    Ok((valid, render))
}

/// What every OpenAI response and chunk starts with.
struct Head {
    id: String,
    created: u64,
    model: String,
}

impl Head {
    fn new(model: String, id_prefix: &str, job: u64) -> Self {
        Head {
            id: format!("{id_prefix}-{job}"),
            created: now(),
            model,
        }
    }

    fn response<C>(&self, object: &'static str, choices: Vec<C>) -> OpenAiResponse<C> {
        OpenAiResponse {
            choices,
            created: self.created,
            id: self.id.clone(),
            model: self.model.clone(),
            object,
            usage: None,
        }
    }

    /// The usage chunk that ends a stream, as event data.
    fn usage_chunk(&self, object: &'static str, choices: &[Choice], n: usize) -> String {
        json_text(&OpenAiResponse::<()> {
            usage: Some(usage_of(choices, n)),
            ..self.response(object, Vec::new())
        })
    }
}

struct CompletionRender {
    head: Head,
    want_lp: bool,
    echo: bool,
    probe: bool,
    include_usage: bool,
    /// Characters already streamed per choice (for `text_offset`).
    chars: Vec<usize>,
}

impl CompletionRender {
    /// A choice's echoed prompt: its logprobs, text and probe.
    fn prompt_part(&self, c: &Choice) -> (CompletionLogprobs, Vec<u8>) {
        let mut lp = CompletionLogprobs::default();
        let mut bytes = Vec::new();
        for t in &c.prompt {
            lp.push(t, char_offset(&bytes, bytes.len()));
            bytes.extend_from_slice(&t.bytes);
        }
        (lp, bytes)
    }

    fn prompt_ids(&self, c: &Choice) -> Option<Vec<logitprobe_backends::TokenId>> {
        (self.probe && self.echo).then(|| c.prompt.iter().map(|t| t.id).collect())
    }
}

impl Render for CompletionRender {
    type Whole = Completion;
    type Chunk = Completion;

    fn whole(&self, choices: &[Choice], n: usize) -> Completion {
        let out = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (mut lp, mut probes, echoed) = if self.echo {
                    let (lp, bytes) = self.prompt_part(c);
                    (lp, c.prompt.clone(), bytes)
                } else {
                    Default::default()
                };
                let base_chars = char_offset(&echoed, echoed.len());
                let mut gen: Vec<u8> = Vec::new();
                for t in &c.tokens {
                    lp.push(t, base_chars + char_offset(&gen, gen.len()));
                    if !t.special {
                        gen.extend_from_slice(&t.bytes);
                    }
                }
                probes.extend(c.tokens.iter().cloned());
                CompletionChoice {
                    finish_reason: c.finish_reason(),
                    index: i,
                    logprobs: self.want_lp.then_some(lp),
                    probe: self.probe.then(|| probe_list(&probes)),
                    prompt_token_ids: self.prompt_ids(c),
                    text: String::from_utf8_lossy(&echoed).into_owned() + &c.output(),
                }
            })
            .collect();
        Completion {
            usage: Some(usage_of(choices, n)),
            ..self.head.response(TEXT_COMPLETION, out)
        }
    }

    fn chunk(&mut self, what: Applied, index: usize, c: &mut Choice) -> Option<Completion> {
        let choice = |text: String, lp, probe, prompt_token_ids, finish_reason| CompletionChoice {
            finish_reason,
            index,
            logprobs: lp,
            probe,
            prompt_token_ids,
            text,
        };
        let one = match what {
            Applied::Prompt if self.echo => {
                let (lp, bytes) = self.prompt_part(c);
                self.chars[index] = char_offset(&bytes, bytes.len());
                choice(
                    String::from_utf8_lossy(&bytes).into_owned(),
                    self.want_lp.then_some(lp),
                    self.probe.then(|| probe_list(&c.prompt)),
                    self.prompt_ids(c),
                    None,
                )
            }
            Applied::Token => {
                let t = c.tokens.last().expect("just pushed");
                let text = c.text.ready();
                let mut lp = CompletionLogprobs::default();
                lp.push(t, self.chars[index]);
                self.chars[index] += text.chars().count();
                choice(
                    text,
                    self.want_lp.then_some(lp),
                    self.probe.then(|| probe_list(std::slice::from_ref(t))),
                    None,
                    None,
                )
            }
            Applied::Done => {
                let (reason, len) = c.done.expect("done");
                choice(
                    c.text.finish(len),
                    None,
                    None,
                    None,
                    Some(finish_reason(reason)),
                )
            }
            Applied::Prompt => return None,
        };
        Some(self.head.response(TEXT_COMPLETION, vec![one]))
    }

    fn closing(&self, choices: &[Choice], n: usize) -> Vec<String> {
        let usage = self.include_usage;
        openai_closing(usage.then(|| self.head.usage_chunk(TEXT_COMPLETION, choices, n)))
    }
}

// ---------------------------------------------------------------------------------------
// POST /v1/chat/completions

pub async fn chat_completions(
    State(state): AppStateRef,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Response {
    let request = chat_job(&state, req);
    respond(&state, request).await
}

fn chat_job(
    state: &AppState,
    req: ChatRequest,
) -> Result<(Valid, impl FnOnce(u64) -> ChatRender), ApiError> {
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
    let settings = generate_config(
        state,
        JobSettings {
            sampling,
            seed,
            // Without max_tokens a reply may run to the end of the context.
            max_tokens: req.max_tokens.unwrap_or(state.n_ctx),
            ignore_eos: req.sampling.ignore_eos,
            logprobs: req.logprobs.then_some(LogprobsRequest {
                top,
                mode: state.cfg.logprobs_mode,
            }),
            echo: false,
            probe: req.probe,
        },
    );
    let valid = Valid {
        prompts: vec![PromptKind::Chat(messages)],
        n,
        settings,
        stop: stop_strings(&req.sampling),
        stream: req.stream,
    };
    let model = state.model_id.clone();
    let render = move |job| ChatRender {
        head: Head::new(model, "chatcmpl", job),
        n,
        want_lp: req.logprobs,
        top,
        probe: req.probe,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    };
    Ok((valid, render))
}

struct ChatRender {
    head: Head,
    /// Choices (one prompt).
    n: usize,
    want_lp: bool,
    top: usize,
    probe: bool,
    include_usage: bool,
}

const CHAT_CHUNK: &str = "chat.completion.chunk";
const TEXT_COMPLETION: &str = "text_completion";

impl ChatRender {
    fn delta(&self, index: usize, delta: ChatDelta, lp: Option<ChatLogprobs>) -> ChatChoice {
        ChatChoice {
            delta: Some(delta),
            finish_reason: None,
            index,
            logprobs: lp,
            message: None,
            probe: None,
        }
    }
}

impl Render for ChatRender {
    type Whole = ChatCompletion;
    type Chunk = ChatCompletion;

    fn whole(&self, choices: &[Choice], n: usize) -> ChatCompletion {
        let out = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Control tokens (end-of-turn) are not content: they leave the logprobs too.
                let content: Vec<TokenOut> =
                    c.tokens.iter().filter(|t| !t.special).cloned().collect();
                ChatChoice {
                    delta: None,
                    finish_reason: c.finish_reason(),
                    index: i,
                    logprobs: self.want_lp.then(|| ChatLogprobs {
                        content: content
                            .iter()
                            .map(|t| ChatLogprob::of(t, self.top))
                            .collect(),
                    }),
                    message: Some(ChatMessageOut {
                        content: c.output(),
                        role: "assistant",
                    }),
                    probe: self.probe.then(|| probe_list(&content)),
                }
            })
            .collect();
        ChatCompletion {
            usage: Some(usage_of(choices, n)),
            ..self.head.response("chat.completion", out)
        }
    }

    fn opening(&self) -> Vec<ChatCompletion> {
        (0..self.n)
            .map(|i| {
                let role = ChatDelta {
                    content: Some(String::new()),
                    role: Some("assistant"),
                };
                self.head
                    .response(CHAT_CHUNK, vec![self.delta(i, role, None)])
            })
            .collect()
    }

    fn chunk(&mut self, what: Applied, index: usize, c: &mut Choice) -> Option<ChatCompletion> {
        let one = match what {
            Applied::Token => {
                let t = c.tokens.last().expect("just pushed").clone();
                if t.special {
                    return None;
                }
                let content = ChatDelta {
                    content: Some(c.text.ready()),
                    role: None,
                };
                let lp = self.want_lp.then(|| ChatLogprobs {
                    content: vec![ChatLogprob::of(&t, self.top)],
                });
                ChatChoice {
                    probe: self.probe.then(|| probe_list(std::slice::from_ref(&t))),
                    ..self.delta(index, content, lp)
                }
            }
            Applied::Done => {
                let (reason, len) = c.done.expect("done");
                let text = c.text.finish(len);
                let delta = ChatDelta {
                    content: (!text.is_empty()).then_some(text),
                    role: None,
                };
                ChatChoice {
                    finish_reason: Some(finish_reason(reason)),
                    ..self.delta(index, delta, None)
                }
            }
            Applied::Prompt => return None,
        };
        Some(self.head.response(CHAT_CHUNK, vec![one]))
    }

    fn closing(&self, choices: &[Choice], n: usize) -> Vec<String> {
        let usage = self.include_usage;
        openai_closing(usage.then(|| self.head.usage_chunk(CHAT_CHUNK, choices, n)))
    }
}

// ---------------------------------------------------------------------------------------
// POST /completion (llama-server's)

pub async fn llama_completion(
    State(state): AppStateRef,
    ApiJson(req): ApiJson<LlamaCompletionRequest>,
) -> Response {
    let request = llama_job(&state, req);
    respond(&state, request).await
}

fn stop_type(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration => "eos",
        StopReason::StopString => "word",
        StopReason::MaxNewTokens | StopReason::ContextFull => "limit",
        StopReason::Cancelled | StopReason::Interrupted | StopReason::NoFiniteLogits => "none",
    }
}

fn llama_job(
    state: &AppState,
    req: LlamaCompletionRequest,
) -> Result<(Valid, impl FnOnce(u64) -> LlamaRender), ApiError> {
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
    let valid = Valid {
        prompts,
        n: 1,
        settings,
        stop: stop_strings(&req.sampling),
        stream: req.stream,
    };
    let model = state.model_id.clone();
    let render = move |_| LlamaRender {
        model,
        want: req.n_probs > 0,
        post,
        probe: req.probe,
    };
    Ok((valid, render))
}

struct LlamaRender {
    model: String,
    want: bool,
    post: bool,
    probe: bool,
}

impl LlamaRender {
    fn probabilities(&self, tokens: &[TokenOut]) -> Option<Vec<LlamaProbability>> {
        self.want.then(|| {
            tokens
                .iter()
                .map(|t| LlamaProbability::of(t, self.post))
                .collect()
        })
    }

    /// The counts and reason a finished choice reports.
    fn finished(&self, c: &Choice, content: String) -> LlamaCompletion {
        let (reason, _) = c.done.expect("done");
        LlamaCompletion {
            content,
            model: Some(self.model.clone()),
            stop: true,
            stop_type: Some(stop_type(reason)),
            tokens_evaluated: Some(c.prompt_tokens),
            tokens_predicted: Some(c.completion_tokens),
            ..Default::default()
        }
    }
}

impl Render for LlamaRender {
    type Whole = LlamaCompletion;
    type Chunk = LlamaCompletion;

    fn whole(&self, choices: &[Choice], _: usize) -> LlamaCompletion {
        let c = &choices[0];
        LlamaCompletion {
            completion_probabilities: self.probabilities(&c.tokens),
            id_slot: Some(0),
            probe: self.probe.then(|| probe_list(&c.tokens)),
            truncated: Some(false),
            ..self.finished(c, c.output())
        }
    }

    fn chunk(&mut self, what: Applied, _: usize, c: &mut Choice) -> Option<LlamaCompletion> {
        match what {
            Applied::Token => {
                let t = std::slice::from_ref(c.tokens.last().expect("just pushed"));
                Some(LlamaCompletion {
                    completion_probabilities: self.probabilities(t),
                    content: c.text.ready(),
                    probe: self.probe.then(|| probe_list(t)),
                    stop: false,
                    ..Default::default()
                })
            }
            Applied::Done => {
                let (_, len) = c.done.expect("done");
                let content = c.text.finish(len);
                Some(self.finished(c, content))
            }
            Applied::Prompt => None,
        }
    }

    /// llama-server's stream ends with its `stop: true` chunk.
    fn closing(&self, _: &[Choice], _: usize) -> Vec<String> {
        Vec::new()
    }
}
