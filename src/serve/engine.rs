//! The engine thread: requests come in as [`Job`]s through a bounded queue, become prompts of
//! the generation loop ([`crate::generate::Generator`]), and each step goes back to its request as
//! an [`Event`] through the request's own channel.

use super::Metrics;
use crate::dist::logprobs::TokenLogprobs;
use crate::generate::{
    self, Control, GenerateConfig, Generation, PromptInput, Prompts, Sink, StopReason, StopStrings,
};
use crate::schema::trace::Step;
use crate::text::chat::Message;
use logitprobe_backends::{LogitSource, TokenId, Vocab};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// What a request asks the model to continue.
#[derive(Debug, Clone)]
pub enum PromptKind {
    /// Plain text, tokenized with the model's own BOS rule and special tokens parsed.
    Text(String),
    /// Token ids, taken as they are (evaluation harnesses send these).
    Ids(Vec<TokenId>),
    /// Chat messages, rendered with the model's own chat template.
    Chat(Vec<Message>),
}

/// One request: its prompts, each run `n` times (choice `p * n + j`).
pub struct Job {
    pub id: u64,
    pub prompts: Vec<PromptKind>,
    pub n: usize,
    pub settings: Arc<GenerateConfig>,
    pub stop: Vec<String>,
    pub tx: UnboundedSender<Event>,
}

/// A token as a response shows it.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: TokenId,
    pub bytes: Vec<u8>,
    /// A control token (end-of-generation, BOS ...): not part of the generated text.
    pub special: bool,
    /// `None` for the first prompt token (nothing predicts it).
    pub logprobs: Option<TokenLogprobs>,
    /// Bytes of each top token, in `logprobs.top`'s order.
    pub top_bytes: Vec<Vec<u8>>,
    pub probe: Option<Step>,
}

/// What the engine tells a request.
#[derive(Debug)]
pub enum Event {
    /// The prompt's tokens (with logprobs when the request echoes them).
    Prompt {
        choice: usize,
        tokens: Vec<TokenOut>,
    },
    Token {
        choice: usize,
        token: Box<TokenOut>,
    },
    /// The choice ended; `text_len` bytes of its generated text are output.
    Done {
        choice: usize,
        reason: StopReason,
        text_len: usize,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request cannot run (a prompt too long, a template that fails, the engine failed).
    Error {
        status: u16,
        message: String,
        param: Option<&'static str>,
    },
}

/// Where a request's events go, and what it wants shown.
struct Route {
    tx: UnboundedSender<Event>,
    stops: StopStrings,
    echo: bool,
    left: usize,
}

type Routes = Rc<RefCell<HashMap<u64, Route>>>;

/// Pulls jobs off the queue and hands their prompts to the loop one by one.
struct Feed {
    jobs: Receiver<Job>,
    pending: VecDeque<PromptInput>,
    routes: Routes,
    metrics: Arc<Metrics>,
    open: bool,
    shutdown: Arc<AtomicBool>,
    /// The loop was idle and a request just woke it: requests sent together (a client's
    /// concurrent calls) get a moment to arrive, so their prompts go into one decode call
    /// instead of one call each.
    woke: Option<std::time::Instant>,
}

/// How long a woken feed waits for the requests that come with the first.
const GATHER: Duration = Duration::from_millis(3);

impl Feed {
    /// Renders and tokenizes a job's prompts; a bad one fails the whole request.
    fn expand(&mut self, source: &dyn Vocab, job: Job) {
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        let n_ctx = source.info().n_ctx;
        let mut inputs = Vec::new();
        for (p, kind) in job.prompts.iter().enumerate() {
            let ids = match tokenize(source, kind) {
                Ok(ids) => ids,
                Err(e) => {
                    let _ = job.tx.send(Event::Error {
                        status: 400,
                        message: e.to_string(),
                        param: Some(match kind {
                            PromptKind::Chat(_) => "messages",
                            _ => "prompt",
                        }),
                    });
                    return;
                }
            };
            if ids.is_empty() {
                let _ = job.tx.send(Event::Error {
                    status: 400,
                    message: format!("prompt {p} is empty after tokenization: give it some text"),
                    param: Some("prompt"),
                });
                return;
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= source.info().n_vocab) {
                let _ = job.tx.send(Event::Error {
                    status: 400,
                    message: format!(
                        "token id {bad} is outside the vocabulary of {} ids",
                        source.info().n_vocab
                    ),
                    param: Some("prompt"),
                });
                return;
            }
            let need = ids.len() + job.settings.max_new_tokens.max(1);
            if need > n_ctx {
                let _ = job.tx.send(Event::Error {
                    status: 400,
                    message: format!(
                        "this model's context holds {n_ctx} tokens, but the request needs {need} ({} in the prompt, {} to generate): shorten the prompt or lower max_tokens",
                        ids.len(),
                        job.settings.max_new_tokens
                    ),
                    param: Some(match kind {
                        PromptKind::Chat(_) => "messages",
                        _ => "prompt",
                    }),
                });
                return;
            }
            for j in 0..job.n {
                inputs.push(PromptInput {
                    index: p * job.n + j,
                    prompt: String::new(),
                    system_prompt: None,
                    rendered: String::new(),
                    ids: ids.clone(),
                    settings: Some(job.settings.clone()),
                    tag: job.id,
                });
            }
        }
        self.routes.borrow_mut().insert(
            job.id,
            Route {
                tx: job.tx,
                stops: StopStrings::new(&job.stop),
                echo: job.settings.prompt_logprobs,
                left: inputs.len(),
            },
        );
        self.pending.extend(inputs);
    }
}

fn tokenize(source: &dyn Vocab, kind: &PromptKind) -> anyhow::Result<Vec<TokenId>> {
    match kind {
        PromptKind::Ids(ids) => Ok(ids.clone()),
        PromptKind::Text(text) => {
            crate::generate::prompts::tokenize_prompt(source, text, false, true)
        }
        PromptKind::Chat(messages) => {
            let rendered = crate::text::chat::render_messages(source, messages)?;
            crate::generate::prompts::tokenize_prompt(source, &rendered, true, true)
        }
    }
}

impl Prompts for Feed {
    fn next_prompt(
        &mut self,
        source: &dyn Vocab,
        idle: bool,
    ) -> Option<anyhow::Result<PromptInput>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                // A client that left while its request waited frees nothing: skip it.
                let gone = self
                    .routes
                    .borrow()
                    .get(&p.tag)
                    .is_none_or(|r| r.tx.is_closed());
                if gone {
                    self.forget(p.tag);
                    continue;
                }
                return Some(Ok(p));
            }
            if self.shutdown.load(Ordering::Relaxed) {
                self.open = false;
                return None;
            }
            let gather = self
                .woke
                .and_then(|t| GATHER.checked_sub(t.elapsed()))
                .filter(|_| !idle);
            let job = if idle || gather.is_some() {
                let wait = gather.unwrap_or(Duration::from_millis(100));
                match self.jobs.recv_timeout(wait) {
                    Ok(job) => {
                        if idle {
                            self.woke = Some(std::time::Instant::now());
                        }
                        job
                    }
                    Err(RecvTimeoutError::Timeout) => return None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.open = false;
                        return None;
                    }
                }
            } else {
                match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.open = false;
                        return None;
                    }
                }
            };
            self.expand(source, job);
        }
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

impl Feed {
    /// Drops the queued prompts of a request whose client left.
    fn forget(&mut self, tag: u64) {
        self.pending.retain(|p| p.tag != tag);
        self.routes.borrow_mut().remove(&tag);
    }
}

/// Turns the loop's steps into events for their requests.
struct Responder {
    routes: Routes,
    metrics: Arc<Metrics>,
    /// Choices whose prompt event went out.
    prompt_sent: HashSet<(u64, usize)>,
}

impl Responder {
    fn token(
        source: &dyn Vocab,
        id: TokenId,
        logprobs: Option<&TokenLogprobs>,
        probe: Option<&Step>,
    ) -> TokenOut {
        let bytes = |t: TokenId| source.token_bytes(t).unwrap_or_default();
        TokenOut {
            id,
            bytes: bytes(id),
            special: source.is_special(id),
            top_bytes: logprobs
                .map(|l| l.top.iter().map(|&(t, _)| bytes(t)).collect())
                .unwrap_or_default(),
            logprobs: logprobs.cloned(),
            probe: probe.cloned(),
        }
    }

    fn send_prompt(&mut self, source: &dyn Vocab, input: &PromptInput, g: &Generation) {
        if !self.prompt_sent.insert((input.tag, input.index)) {
            return;
        }
        let routes = self.routes.borrow();
        let Some(route) = routes.get(&input.tag) else {
            return;
        };
        let tokens = if route.echo {
            input
                .ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    let lp = i.checked_sub(1).and_then(|k| g.prompt_logprobs.get(k));
                    let probe = i.checked_sub(1).and_then(|k| g.prompt_steps.get(k));
                    Self::token(source, id, lp, probe)
                })
                .collect()
        } else {
            Vec::new()
        };
        let _ = route.tx.send(Event::Prompt {
            choice: input.index,
            tokens,
        });
    }
}

impl Sink for Responder {
    fn begin(&mut self, _: &dyn Vocab, _: &PromptInput) -> anyhow::Result<()> {
        self.metrics.slots_busy.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn step(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
        step: &Step,
    ) -> anyhow::Result<Control> {
        self.send_prompt(source, input, g);
        self.metrics
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
        let routes = self.routes.borrow();
        let Some(route) = routes.get(&input.tag) else {
            return Ok(Control::StopSequence { text_len: None });
        };
        if route.tx.is_closed() {
            // The client left: its slot is free at the end of this step.
            return Ok(Control::StopSequence { text_len: None });
        }
        let settings = input.settings.as_deref();
        let probe = settings.is_some_and(|s| s.probe_enabled).then_some(step);
        let token = Self::token(source, step.selected.token_id, g.logprobs.last(), probe);
        let _ = route.tx.send(Event::Token {
            choice: input.index,
            token: Box::new(token),
        });
        Ok(route.stops.control(g))
    }

    fn finish(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
    ) -> anyhow::Result<()> {
        self.metrics.slots_busy.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .prompt_tokens
            .fetch_add(input.ids.len() as u64, Ordering::Relaxed);
        self.send_prompt(source, input, g);
        self.prompt_sent.remove(&(input.tag, input.index));
        let mut routes = self.routes.borrow_mut();
        if let Some(route) = routes.get_mut(&input.tag) {
            let _ = route.tx.send(Event::Done {
                choice: input.index,
                reason: g.stop,
                text_len: g.text_len,
                prompt_tokens: input.ids.len(),
                completion_tokens: g.generated_ids.len(),
            });
            route.left -= 1;
            if route.left == 0 {
                routes.remove(&input.tag);
            }
        }
        Ok(())
    }
}

/// Runs the engine until the queue closes (every handler gone) or `shutdown` is raised;
/// requests in flight at shutdown end with `finish_reason` "abort".
pub fn run(
    source: &mut dyn LogitSource,
    jobs: Receiver<Job>,
    base: &GenerateConfig,
    n_slots: usize,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) {
    let routes: Routes = Rc::default();
    let mut feed = Feed {
        jobs,
        pending: VecDeque::new(),
        routes: routes.clone(),
        metrics: metrics.clone(),
        open: true,
        shutdown: shutdown.clone(),
        woke: None,
    };
    let mut responder = Responder {
        routes: routes.clone(),
        metrics: metrics.clone(),
        prompt_sent: HashSet::new(),
    };
    while feed.open {
        let result = generate::Generator::new(base, n_slots)
            .and_then(|g| g.run(source, &mut feed, &mut [&mut responder], &shutdown));
        if let Err(e) = result {
            // An engine failure ends the requests in flight, not the server.
            tracing::error!("the engine failed: {e:#}");
            let message = format!("the engine failed: {e:#}");
            for (_, route) in routes.borrow_mut().drain() {
                let _ = route.tx.send(Event::Error {
                    status: 500,
                    message: message.clone(),
                    param: None,
                });
            }
            feed.pending.clear();
            responder.prompt_sent.clear();
            metrics.slots_busy.store(0, Ordering::Relaxed);
        }
        if shutdown.load(Ordering::Relaxed) {
            break;
        }
    }
}
