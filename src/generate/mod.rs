//! The generation loop: a bounded set of slots decoded together through a [`LogitSource`],
//! refilled from a prompt iterator as sequences finish, the sampler and the probe on each
//! row, and each step handed to the [`Sink`]s, whose answer can end a sequence or the run.
//!
//! A prompt's tokens depend only on the seed, its text, its global index (which keys its
//! random stream) and the settings: never on how many slots there are, what else passes
//! through them, or the order in which they finish.

pub mod prompts;

use crate::dist::logprobs::{LogprobsMode, TokenLogprobs};
use crate::dist::probe::{InvalidLogits, Probe, ProbeConfig, StepOptions, StepProbe};
use crate::dist::sampler::{Rng, SamplingConfig};
use crate::lens::{Inside, PromptLogitLens};
pub use crate::schema::run::{StopReason, Timings};
use crate::schema::trace::{DistributionOut, SelectedToken, Step};
use crate::text::Pieces;
use anyhow::Context;
use logitprobe_backends::{usage, LogitSource, TokenId, Vocab};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One prompt, rendered and tokenized.
#[derive(Debug, Clone, Default)]
pub struct PromptInput {
    /// The prompt's global index: its line in a prompts file (0-based) or its position
    /// among the prompts given. Keys its random stream and names its output folder.
    pub index: usize,
    /// The user's prompt before any chat template.
    pub prompt: String,
    pub system_prompt: Option<String>,
    /// The text fed to the tokenizer (after the chat template, if any).
    pub rendered: String,
    pub ids: Vec<TokenId>,
    /// This prompt's own settings, where they differ from the run's (a server's request:
    /// each has its sampling settings, seed and logprobs).
    pub settings: Option<Arc<GenerateConfig>>,
    /// Chosen by the feed and handed back untouched, so that its sinks know whose prompt a
    /// step belongs to (a server's request id); 0 for prompts files.
    pub tag: u64,
}

impl PromptInput {
    /// The settings this prompt runs with: its own, or else the run's.
    pub fn settings<'a>(&'a self, run: &'a GenerateConfig) -> &'a GenerateConfig {
        self.settings.as_deref().unwrap_or(run)
    }
}

/// Settings of one generation run.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sampling: SamplingConfig,
    pub probe: ProbeConfig,
    pub max_new_tokens: usize,
    /// Generate past end-of-generation tokens, to `max_new_tokens` (llama.cpp's and vLLM's
    /// `ignore_eos`): every sequence the same length, as throughput benchmarks want.
    pub ignore_eos: bool,
    pub seed: u64,
    /// Off: the sampler runs but no distribution is described (for benchmarks).
    pub probe_enabled: bool,
    /// Token logprobs (the sampled token's and the top ones) of each step, in
    /// [`Generation::logprobs`]: what OpenAI's `logprobs` returns.
    pub logprobs: Option<LogprobsRequest>,
    /// Also the logprobs (and, with `probe_enabled`, the probe) of every prompt token after
    /// the first, teacher-forced, in [`Generation::prompt_logprobs`]: OpenAI's `echo`.
    pub prompt_logprobs: bool,
    /// The logit lens and attention at each step ([`Inside::prepare`] made the engine
    /// capture them); `None`: off.
    pub inside: Option<Arc<Inside>>,
}

/// Which logprobs a sequence reports, and how many top ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsRequest {
    pub top: usize,
    pub mode: LogprobsMode,
}

impl GenerateConfig {
    /// How many top raw logprobs the probe's step computes on the way (raw mode only).
    fn raw_logprobs(&self) -> Option<usize> {
        self.logprobs
            .filter(|r| r.mode == LogprobsMode::Raw)
            .map(|r| r.top)
    }

    /// How many of the processed distribution's top tokens the probe describes: the top
    /// logprobs in processed mode (at least the chosen token's), else none.
    fn processed_top(&self) -> usize {
        match self.logprobs {
            Some(LogprobsRequest {
                top,
                mode: LogprobsMode::Processed,
            }) => top.max(1),
            _ => 0,
        }
    }
}

/// What one prompt produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub steps: Vec<Step>,
    pub generated_ids: Vec<TokenId>,
    /// Bytes of the generated tokens, special tokens skipped.
    pub text: Vec<u8>,
    /// How many bytes of `text` are the output: less than `text.len()` when a stop string
    /// ended the sequence (the stop string and what followed it are not output).
    pub text_len: usize,
    /// Where the last token's bytes start in `text`.
    pub last_text_start: usize,
    pub stop: StopReason,
    /// Steps whose row had no finite logit and fell back to greedy.
    pub degenerate_steps: Vec<usize>,
    /// Per step, when the settings ask for logprobs.
    pub logprobs: Vec<TokenLogprobs>,
    /// Per prompt token after the first (the first has no prediction), when the settings
    /// ask for prompt logprobs.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// The probe of each prompt token after the first, with prompt logprobs and probing on.
    pub prompt_steps: Vec<Step>,
    /// The logit lens over the prompt positions, when asked.
    pub prompt_lens: Option<PromptLogitLens>,
}

impl Generation {
    fn new() -> Self {
        Generation {
            steps: Vec::new(),
            generated_ids: Vec::new(),
            text: Vec::new(),
            text_len: 0,
            last_text_start: 0,
            stop: StopReason::MaxNewTokens,
            degenerate_steps: Vec::new(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            prompt_steps: Vec::new(),
            prompt_lens: None,
        }
    }

    /// The output text (up to a stop string), as UTF-8 with invalid bytes replaced.
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.text[..self.text_len]).into_owned()
    }
}

/// A sink's answer to a step (ripgrep's `Sink` answers whether to go on searching).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End this sequence. `text_len`, when given, is where its output text ends (a stop
    /// string is not part of the output).
    StopSequence {
        text_len: Option<usize>,
    },
    /// End every sequence and take no more prompts.
    StopAll,
}

/// Receives what the loop produces: a prompt entering a slot, each of its steps, and its
/// finished generation. `source` is the engine, for token text.
pub trait Sink {
    fn begin(&mut self, _source: &dyn Vocab, _prompt: &PromptInput) -> anyhow::Result<()> {
        Ok(())
    }

    /// A step of `prompt`; `generation` already holds it. The answer can end the sequence
    /// or the run; a sink that only reads finished prompts keeps the default, `Continue`.
    fn step(
        &mut self,
        _source: &dyn Vocab,
        _prompt: &PromptInput,
        _generation: &Generation,
        _step: &Step,
    ) -> anyhow::Result<Control> {
        Ok(Control::Continue)
    }

    fn finish(
        &mut self,
        _source: &dyn Vocab,
        _prompt: &PromptInput,
        _generation: &Generation,
    ) -> anyhow::Result<()> {
        Ok(())
    }

    /// After each decode call: how far the run has come, prompt processing and generation
    /// each on its own clock (a long prompt is fed in chunks, each one call).
    fn progress(&mut self, _progress: &Progress) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Where a run stands after a decode call, for progress displays: prompt processing and
/// generation counted and clocked apart, so that a rate read from one is not diluted by the
/// other.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Prompt tokens the engine has processed so far, over every prompt taken.
    pub prompt_tokens: usize,
    /// Tokens generated so far.
    pub generated_tokens: usize,
    /// Seconds spent in calls that fed prompt tokens.
    pub prefill_s: f64,
    /// Seconds spent in calls that fed generated tokens only, and the tokens they gave.
    pub decode_s: f64,
    pub decode_tokens: usize,
}

/// Ends a sequence when its generated text contains one of the stop strings (llama.cpp's
/// and OpenAI's `stop`); its output text then ends before the string.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<Vec<u8>>,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        StopStrings {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        }
    }

    /// Where the earliest stop string starts in `text`, looking only where one could end
    /// in the bytes after `old_len` (what the last token added).
    pub fn find(&self, text: &[u8], old_len: usize) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| {
                let from = old_len.saturating_sub(s.len() - 1);
                text[from..]
                    .windows(s.len())
                    .position(|w| w == s.as_slice())
                    .map(|p| from + p)
            })
            .min()
    }
}

impl StopStrings {
    /// The answer to a step: stop where a stop string begins, else go on.
    pub fn control(&self, generation: &Generation) -> Control {
        match self.find(&generation.text, generation.last_text_start) {
            Some(at) => Control::StopSequence { text_len: Some(at) },
            None => Control::Continue,
        }
    }
}

impl Sink for StopStrings {
    fn step(
        &mut self,
        _source: &dyn Vocab,
        _prompt: &PromptInput,
        generation: &Generation,
        _step: &Step,
    ) -> anyhow::Result<Control> {
        Ok(self.control(generation))
    }
}

/// Where the loop takes its next prompt from when a slot is free: an iterator of prepared
/// prompts, [`crate::generate::prompts::Prepared`] (specs rendered and tokenized as they are taken),
/// or a server's queue of requests.
pub trait Prompts {
    /// The next prompt, `None` when there is none (now). `source` renders and tokenizes.
    /// `idle` says that no sequence is running: a feed that waits for prompts may block
    /// until one comes (best with a timeout, so that the loop sees Ctrl-C).
    fn next_prompt(
        &mut self,
        source: &dyn Vocab,
        idle: bool,
    ) -> Option<anyhow::Result<PromptInput>>;

    /// Whether more prompts can follow a `None` (a server's queue, until it closes); the
    /// loop ends when it has no sequence left and the feed is not open.
    fn is_open(&self) -> bool {
        false
    }
}

impl<I: Iterator<Item = anyhow::Result<PromptInput>>> Prompts for I {
    fn next_prompt(&mut self, _: &dyn Vocab, _: bool) -> Option<anyhow::Result<PromptInput>> {
        self.next()
    }
}

/// The generation loop: its settings and how many sequences it decodes together.
///
/// [`Generator::run`] takes prompts from a feed as slots free up, decodes the active slots in
/// one batch, samples and probes each row, and hands each step to the sinks, until each
/// sequence hits an end-of-generation token, `max_new_tokens`, the context length or a
/// sink's stop, or `stop` is raised (Ctrl-C).
#[derive(Debug, Clone, Copy)]
pub struct Generator<'a> {
    pub config: &'a GenerateConfig,
    pub slots: usize,
}

impl<'a> Generator<'a> {
    /// A loop of `slots` sequences (at least one).
    pub fn new(config: &'a GenerateConfig, slots: usize) -> anyhow::Result<Self> {
        if slots == 0 {
            return Err(usage!("0 parallel sequences run nothing: use 1 or more"));
        }
        Ok(Generator { config, slots })
    }

    /// Runs the prompts of `prompts` to their ends; what they produced went to `sinks`.
    pub fn run(
        &self,
        source: &mut dyn LogitSource,
        prompts: &mut dyn Prompts,
        sinks: &mut [&mut dyn Sink],
        stop: &AtomicBool,
    ) -> anyhow::Result<Timings> {
        source.begin(self.slots)?;
        let mut run = Run::new(self.config, &*source, self.slots);
        loop {
            if stop.load(Ordering::Relaxed) {
                run.finish_all(&*source, sinks, StopReason::Interrupted)?;
                break;
            }
            run.fill(source, prompts, sinks)?;
            let active = run.active();
            if active.is_empty() {
                if run.draining || !prompts.is_open() {
                    break;
                }
                continue;
            }
            let t_call = Instant::now();
            let decoded = run.decode(source, &active)?;
            let sampled = run.sample(&*source, &active, &decoded)?;
            let stop_all = run.dispatch(&*source, sinks, &active, sampled, &decoded)?;
            run.clock(t_call.elapsed(), decoded.has_prompt);
            let progress = run.progress();
            for sink in sinks.iter_mut() {
                sink.progress(&progress)?;
            }
            if stop_all {
                run.finish_all(&*source, sinks, StopReason::Cancelled)?;
                break;
            }
        }
        Ok(run.timings())
    }
}

/// A sequence in a slot.
struct Active {
    input: PromptInput,
    generation: Generation,
    rng: Rng,
    history: Vec<TokenId>,
    /// Tokens to feed at the next decode: the prompt, then the last sampled token.
    pending: Vec<TokenId>,
}

/// What one decode call returned for the active slots.
struct Decoded {
    logits: ndarray::Array2<f32>,
    /// Per active slot: whether it got a row for each position it fed (its prompt's).
    every: Vec<bool>,
    /// Per active slot: how many of its pending tokens it fed (fewer than pending while a
    /// long prompt goes in chunks).
    fed: Vec<usize>,
    /// Whether some slot fed its prompt (the call counts as prompt processing).
    has_prompt: bool,
    captured: Vec<logitprobe_backends::Captured>,
}

/// What sampling one active slot's row gave.
enum Sampled {
    /// A step, and the row its last position gave.
    Step(Box<StepProbe>, usize),
    /// None yet: the slot fed this many tokens of its prompt, and more follow.
    Prefilling(usize),
    /// None asked: the slot only scores its prompt.
    ScoreOnly,
    /// None possible: the row holds no finite logit, so the sequence ends.
    NoDistribution,
}

/// The state of one [`Generator::run`]: the slots and the scratch and clocks they share.
struct Run<'g> {
    cfg: &'g GenerateConfig,
    n_ctx: usize,
    eog: Vec<TokenId>,
    slots: Vec<Option<Active>>,
    probe: Probe,
    lp_probe: crate::dist::logprobs::Logprobs,
    pieces: Pieces,
    timings: Timings,
    probe_time: Duration,
    prefill: Duration,
    decode: Duration,
    decode_only_tokens: usize,
    /// Prompt tokens fed so far.
    prompt_fed: usize,
    /// The most prompt tokens a slot feeds in one call (see [`prefill_chunk`]).
    chunk: usize,
    /// The feed has no more prompts: finish what runs and end.
    draining: bool,
    t_start: Instant,
}

impl<'g> Run<'g> {
    fn new(cfg: &'g GenerateConfig, vocab: &dyn Vocab, n_slots: usize) -> Self {
        Run {
            cfg,
            n_ctx: vocab.info().n_ctx,
            eog: vocab.info().eog.clone(),
            slots: (0..n_slots).map(|_| None).collect(),
            probe: Probe::new(cfg.probe.clone()),
            lp_probe: Default::default(),
            pieces: Pieces::default(),
            timings: Timings::default(),
            probe_time: Duration::ZERO,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            decode_only_tokens: 0,
            prompt_fed: 0,
            chunk: prefill_chunk(vocab),
            draining: false,
            t_start: Instant::now(),
        }
    }

    fn active(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .collect()
    }

    /// Takes prompts from the feed into the free slots.
    fn fill(
        &mut self,
        source: &mut dyn LogitSource,
        prompts: &mut dyn Prompts,
        sinks: &mut [&mut dyn Sink],
    ) -> anyhow::Result<()> {
        if self.draining {
            return Ok(());
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let idle = self.slots.iter().all(Option::is_none);
            let Some(input) = prompts.next_prompt(&*source, idle) else {
                self.draining = !prompts.is_open();
                break;
            };
            let input = input?;
            check_prompt(&input, self.n_ctx)?;
            source.clear_slot(slot)?;
            for sink in sinks.iter_mut() {
                sink.begin(&*source, &input)?;
            }
            self.timings.prompts += 1;
            self.timings.prompt_tokens += input.ids.len();
            self.slots[slot] = Some(Active {
                rng: Rng::new(input.settings(self.cfg).seed, input.index as u64),
                history: input.ids.clone(),
                pending: input.ids.clone(),
                generation: Generation::new(),
                input,
            });
        }
        Ok(())
    }

    fn slot(&self, s: usize) -> &Active {
        self.slots[s].as_ref().expect("active")
    }

    /// Feeds each active slot's pending tokens in one call.
    fn decode(
        &mut self,
        source: &mut dyn LogitSource,
        active: &[usize],
    ) -> anyhow::Result<Decoded> {
        let cfg = self.cfg;
        let has_prompt = active
            .iter()
            .any(|&s| self.slot(s).generation.steps.is_empty());
        // A prompt with prompt logprobs (or the lens over its positions) gets a row for each
        // of its positions.
        let every: Vec<bool> = active
            .iter()
            .map(|&s| {
                let a = self.slot(s);
                let settings = a.input.settings(cfg);
                a.generation.steps.is_empty()
                    && (settings.prompt_logprobs
                        || settings
                            .inside
                            .as_ref()
                            .is_some_and(|i| i.config.lens_prompt))
            })
            .collect();
        // A prompt goes in chunks, one call each, so that progress can be shown and other
        // slots go on decoding meanwhile; not where every position's row is asked for, nor
        // with the lens or attention, which read the prompt in one piece.
        let fed: Vec<usize> = active
            .iter()
            .zip(&every)
            .map(|(&s, &every)| {
                let a = self.slot(s);
                let whole = every
                    || !a.generation.steps.is_empty()
                    || a.input.settings(cfg).inside.is_some();
                if whole {
                    a.pending.len()
                } else {
                    a.pending.len().min(self.chunk)
                }
            })
            .collect();
        let logits = {
            let batch: Vec<(usize, &[TokenId])> = active
                .iter()
                .zip(&fed)
                .map(|(&s, &n)| (s, &self.slot(s).pending[..n]))
                .collect();
            source.decode_rows(&batch, &every).context(if has_prompt {
                "prompt evaluation failed"
            } else {
                "decode failed"
            })?
        };
        for (&s, &n) in active.iter().zip(&fed) {
            if self.slot(s).generation.steps.is_empty() {
                self.prompt_fed += n;
            }
        }
        let captured = source.take_captured();
        let inside_on = active
            .iter()
            .any(|&s| self.slot(s).input.settings(cfg).inside.is_some());
        anyhow::ensure!(
            !inside_on || captured.len() == logits.nrows(),
            "the engine captured {} rows for {} logits rows",
            captured.len(),
            logits.nrows()
        );
        Ok(Decoded {
            logits,
            every,
            fed,
            has_prompt,
            captured,
        })
    }

    /// Describes each slot's prompt rows where asked, then samples and probes its last row.
    fn sample(
        &mut self,
        vocab: &dyn Vocab,
        active: &[usize],
        d: &Decoded,
    ) -> anyhow::Result<Vec<Sampled>> {
        let t_probe = Instant::now();
        let cfg = self.cfg;
        let mut sampled = Vec::with_capacity(active.len());
        let mut row = 0;
        for ((&s, &every), &fed) in active.iter().zip(&d.every).zip(&d.fed) {
            let a = self.slots[s].as_mut().expect("active");
            let settings = a.input.settings(cfg);
            if fed < a.pending.len() {
                // A chunk of a prompt that goes on: its one row (the chunk's last position)
                // is not a step.
                row += 1;
                sampled.push(Sampled::Prefilling(fed));
                continue;
            }
            let n_rows = if every { a.pending.len() } else { 1 };
            if let Some(inside) = settings.inside.as_deref() {
                if every && inside.config.lens_prompt {
                    a.generation.prompt_lens = Some(prompt_lens(
                        inside,
                        &d.captured[row..row + n_rows],
                        &a.input.ids,
                        vocab,
                        &mut self.pieces,
                    )?);
                }
            }
            if every && settings.prompt_logprobs {
                let rows = d.logits.slice(ndarray::s![row..row + n_rows - 1, ..]);
                describe_prompt(
                    &mut self.probe,
                    &mut self.lp_probe,
                    settings,
                    &a.input,
                    rows,
                    &mut a.generation,
                    vocab,
                    &mut self.pieces,
                )?;
            }
            row += n_rows;
            if settings.max_new_tokens == 0 {
                // Scoring only: the prompt's rows were all that was asked.
                sampled.push(Sampled::ScoreOnly);
                continue;
            }
            let row_logits = d.logits.row(row - 1);
            let row_logits = row_logits
                .as_slice()
                .context("logits rows must be contiguous")?;
            let step_idx = a.generation.steps.len();
            self.probe.config.clone_from(&settings.probe);
            let opts = StepOptions {
                probe: settings.probe_enabled,
                forced: None,
                processed_top: settings.processed_top(),
                raw_logprobs: settings.raw_logprobs(),
            };
            let stepped = self.probe.step_with(
                row_logits,
                &a.history,
                &settings.sampling,
                &mut a.rng,
                &opts,
            );
            let mut sp = match stepped {
                Ok(sp) => sp,
                // This sequence has nowhere to go; the others go on.
                Err(InvalidLogits::NoFinite) => {
                    sampled.push(Sampled::NoDistribution);
                    continue;
                }
                Err(e) => anyhow::bail!(
                    "prompt {}, step {step_idx}: {e}; the engine produced invalid logits",
                    a.input.index
                ),
            };
            if let Some(req) = settings.logprobs {
                let lp = match req.mode {
                    LogprobsMode::Raw => sp
                        .raw_logprobs
                        .take()
                        .unwrap_or_else(|| self.lp_probe.raw(row_logits, req.top, sp.selected)),
                    LogprobsMode::Processed => {
                        TokenLogprobs::from_distribution(sp.processed_top.as_ref(), sp.selected)
                    }
                };
                a.generation.logprobs.push(lp);
            }
            sampled.push(Sampled::Step(Box::new(sp), row - 1));
        }
        self.probe_time += t_probe.elapsed();
        Ok(sampled)
    }

    /// Appends each sampled token to its sequence, hands the step to the sinks and ends the
    /// sequences that are done. Whether a sink asked to stop everything.
    fn dispatch(
        &mut self,
        vocab: &dyn Vocab,
        sinks: &mut [&mut dyn Sink],
        active: &[usize],
        sampled: Vec<Sampled>,
        d: &Decoded,
    ) -> anyhow::Result<bool> {
        let mut stop_all = false;
        for (&s, sampled) in active.iter().zip(sampled) {
            let mut a = self.slots[s].take().expect("active");
            let (sp, last_row) = match sampled {
                Sampled::Step(sp, row) => (*sp, row),
                Sampled::Prefilling(fed) => {
                    a.pending.drain(..fed);
                    self.slots[s] = Some(a);
                    continue;
                }
                Sampled::ScoreOnly => {
                    finish(vocab, sinks, a, StopReason::MaxNewTokens)?;
                    continue;
                }
                Sampled::NoDistribution => {
                    finish(vocab, sinks, a, StopReason::NoFiniteLogits)?;
                    continue;
                }
            };
            let (max_new_tokens, ignore_eos) = {
                let settings = a.input.settings(self.cfg);
                (settings.max_new_tokens, settings.ignore_eos)
            };
            let step = self.step(vocab, &mut a, &sp, d.captured.get(last_row))?;
            a.generation.steps.push(step);
            self.timings.generated_tokens += 1;
            if !d.has_prompt {
                self.decode_only_tokens += 1;
            }
            let mut control = Control::Continue;
            let step = a.generation.steps.last().expect("just pushed");
            for sink in sinks.iter_mut() {
                let c = sink.step(vocab, &a.input, &a.generation, step)?;
                control = stronger(control, c);
            }
            let tok = sp.selected;
            let g = &mut a.generation;
            let reason = match control {
                Control::StopAll => {
                    stop_all = true;
                    Some(StopReason::Cancelled)
                }
                Control::StopSequence { text_len } => {
                    if let Some(n) = text_len {
                        g.text_len = n.min(g.text.len());
                        Some(StopReason::StopString)
                    } else {
                        Some(StopReason::Cancelled)
                    }
                }
                Control::Continue if self.eog.contains(&tok) && !ignore_eos => {
                    Some(StopReason::EndOfGeneration)
                }
                Control::Continue if g.generated_ids.len() >= max_new_tokens => {
                    Some(StopReason::MaxNewTokens)
                }
                Control::Continue if a.history.len() >= self.n_ctx => Some(StopReason::ContextFull),
                Control::Continue => None,
            };
            match reason {
                Some(r) => finish(vocab, sinks, a, r)?,
                None => {
                    a.pending.clear();
                    a.pending.push(tok);
                    self.slots[s] = Some(a);
                }
            }
        }
        Ok(stop_all)
    }

    /// The step record of `sp`, its token appended to the sequence's text and history.
    fn step(
        &mut self,
        vocab: &dyn Vocab,
        a: &mut Active,
        sp: &StepProbe,
        captured: Option<&logitprobe_backends::Captured>,
    ) -> anyhow::Result<Step> {
        let tok = sp.selected;
        let step_idx = a.generation.steps.len();
        if sp.degenerate {
            a.generation.degenerate_steps.push(step_idx);
        }
        let (logit_lens, attention) = match a.input.settings(self.cfg).inside.as_deref() {
            Some(inside) => {
                let t = Instant::now();
                let captured = captured.context("the engine captured nothing for this row")?;
                let got = inside_step(inside, captured, &a.history, tok, vocab, &mut self.pieces)?;
                self.probe_time += t.elapsed();
                got
            }
            None => (None, None),
        };
        let step = Step {
            step: step_idx,
            selected: SelectedToken {
                token_id: tok,
                token: self.pieces.get(vocab, tok),
            },
            raw: describe(sp.raw.as_ref(), vocab, &mut self.pieces),
            processed: describe(sp.processed.as_ref(), vocab, &mut self.pieces),
            logit_lens,
            attention,
        };
        let g = &mut a.generation;
        g.generated_ids.push(tok);
        g.last_text_start = g.text.len();
        if !vocab.is_special(tok) {
            if let Some(b) = vocab.token_bytes(tok) {
                g.text.extend_from_slice(&b);
            }
        }
        g.text_len = g.text.len();
        a.history.push(tok);
        Ok(step)
    }

    fn clock(&mut self, spent: Duration, prompt: bool) {
        if prompt {
            self.prefill += spent;
        } else {
            self.decode += spent;
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            prompt_tokens: self.prompt_fed,
            generated_tokens: self.timings.generated_tokens,
            prefill_s: self.prefill.as_secs_f64(),
            decode_s: self.decode.as_secs_f64(),
            decode_tokens: self.decode_only_tokens,
        }
    }

    fn finish_all(
        &mut self,
        vocab: &dyn Vocab,
        sinks: &mut [&mut dyn Sink],
        reason: StopReason,
    ) -> anyhow::Result<()> {
        for a in self.slots.iter_mut().filter_map(Option::take) {
            finish(vocab, sinks, a, reason)?;
        }
        Ok(())
    }

    fn timings(mut self) -> Timings {
        let t = &mut self.timings;
        t.prefill_s = self.prefill.as_secs_f64();
        t.decode_s = self.decode.as_secs_f64();
        t.probe_s = self.probe_time.as_secs_f64();
        t.wall_s = self.t_start.elapsed().as_secs_f64();
        t.decode_tokens_per_s = if t.decode_s > 0.0 {
            self.decode_only_tokens as f64 / t.decode_s
        } else {
            0.0
        };
        t.tokens_per_s = if t.wall_s > 0.0 {
            t.generated_tokens as f64 / t.wall_s
        } else {
            0.0
        };
        self.timings
    }
}

/// The most prompt tokens a slot feeds in one call: the engine's batch (`n_batch` in its
/// details), where an engine that splits a prompt itself (llama.cpp) splits it anyway, so
/// that a prompt fed chunk by chunk gives the same numbers as one fed whole. An engine that
/// names no batch takes a prompt whole.
fn prefill_chunk(vocab: &dyn Vocab) -> usize {
    vocab
        .info()
        .details
        .get("n_batch")
        .and_then(|v| v.as_u64())
        .filter(|&n| n > 0)
        .map_or(usize::MAX, |n| n as usize)
}

/// The teacher-forced view of a prompt: `rows[i]` predicts `ids[i + 1]`; its logprobs and,
/// with probing on, its probe (the selected token being the prompt's own).
#[allow(clippy::too_many_arguments)]
fn describe_prompt(
    probe: &mut Probe,
    lp_probe: &mut crate::dist::logprobs::Logprobs,
    settings: &GenerateConfig,
    input: &PromptInput,
    rows: ndarray::ArrayView2<'_, f32>,
    g: &mut Generation,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> anyhow::Result<()> {
    probe.config.clone_from(&settings.probe);
    let req = settings.logprobs;
    let processed_top = settings.processed_top();
    // The forced step draws nothing; the stream is only there to fill the argument.
    let mut rng = Rng::new(settings.seed, input.index as u64);
    for (i, row) in rows.outer_iter().enumerate() {
        let row = row.as_slice().context("logits rows must be contiguous")?;
        let next = input.ids[i + 1];
        let top = req.map_or(0, |r| r.top);
        if settings.probe_enabled || processed_top > 0 {
            let opts = StepOptions {
                probe: settings.probe_enabled,
                forced: Some(next),
                processed_top,
                raw_logprobs: settings.raw_logprobs(),
            };
            let mut sp = probe
                .step_with(row, &input.ids[..=i], &settings.sampling, &mut rng, &opts)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "prompt {}, prompt position {}: {e}; the engine produced invalid logits",
                        input.index,
                        i + 1
                    )
                })?;
            if settings.probe_enabled {
                g.prompt_steps.push(Step {
                    step: i,
                    selected: SelectedToken {
                        token_id: next,
                        token: pieces.get(source, next),
                    },
                    raw: describe(sp.raw.as_ref(), source, pieces),
                    processed: describe(sp.processed.as_ref(), source, pieces),
                    logit_lens: None,
                    attention: None,
                });
            }
            if processed_top > 0 {
                g.prompt_logprobs.push(TokenLogprobs::from_distribution(
                    sp.processed_top.as_ref(),
                    next,
                ));
                continue;
            }
            if let Some(lp) = sp.raw_logprobs.take() {
                g.prompt_logprobs.push(lp);
                continue;
            }
        }
        g.prompt_logprobs.push(lp_probe.raw(row, top, next));
    }
    Ok(())
}

/// A step's lens layers and attention layers, when captured.
type InsideStep = (
    Option<Vec<crate::lens::LogitLensLayer>>,
    Option<Vec<crate::lens::AttentionLayerEntry>>,
);

/// A step's lens (its layers' logits through the lens head, with `selected` as the chosen
/// token) and attention summaries (`history` is the sequence up to the query position).
fn inside_step(
    inside: &Inside,
    captured: &logitprobe_backends::Captured,
    history: &[TokenId],
    selected: TokenId,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> anyhow::Result<InsideStep> {
    let lens = match (&inside.head, &captured.hidden) {
        (Some(head), Some(hidden)) => {
            let logits = head.logits(hidden.view());
            Some(crate::lens::lens_step(
                logits.view(),
                &inside.lens_layers,
                selected,
                inside.lens_top_k(),
                source,
                pieces,
            ))
        }
        (Some(_), None) => anyhow::bail!("the engine captured no layer outputs for the lens"),
        _ => None,
    };
    let attention = if inside.attention_layers.is_empty() {
        None
    } else {
        anyhow::ensure!(
            captured.attention.len() == inside.attention_layers.len(),
            "the engine captured {} attention layers of {}",
            captured.attention.len(),
            inside.attention_layers.len()
        );
        Some(
            inside
                .attention_layers
                .iter()
                .zip(&captured.attention)
                .map(|(&layer, w)| {
                    let n = w.ncols().min(history.len());
                    crate::lens::attention_entry(
                        layer,
                        w.view(),
                        &history[..n],
                        inside.attention_top_k(),
                    )
                })
                .collect(),
        )
    };
    Ok((lens, attention))
}

/// The lens over a prompt's positions from their captures (`captured[p]` is position `p`).
fn prompt_lens(
    inside: &Inside,
    captured: &[logitprobe_backends::Captured],
    ids: &[TokenId],
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> anyhow::Result<PromptLogitLens> {
    let head = inside
        .head
        .as_ref()
        .context("the prompt lens needs the lens on")?;
    let mut positions = Vec::with_capacity(captured.len());
    for (p, (c, &id)) in captured.iter().zip(ids).enumerate() {
        let hidden = c
            .hidden
            .as_ref()
            .context("the engine captured no layer outputs for the prompt lens")?;
        let logits = head.logits(hidden.view());
        positions.push(crate::lens::lens_prompt_position(
            logits.view(),
            &inside.lens_layers,
            p,
            id,
            inside.lens_top_k(),
            source,
            pieces,
        ));
    }
    Ok(PromptLogitLens {
        schema_version: "1.0".into(),
        top_k: inside.lens_top_k(),
        num_layers: inside.arch.n_layer,
        positions,
    })
}

/// Sizes each slot's context for a job whose longest prompt, `longest` = (tokens, index),
/// is followed by up to `max_new_tokens` tokens: what the job needs (up to the model's trained
/// context), not a fixed 4096 tokens, which would be a KV cache of 4096 tokens per slot for
/// 16-token answers, or a long prompt refused below what the model was trained on. With
/// `fixed` (a context size the user gave) nothing is resized, only checked. Errs where the
/// longest prompt is past the model's trained context or leaves no room in the context.
/// Call it before [`LogitSource::begin`].
pub fn fit_context(
    source: &mut dyn LogitSource,
    longest: (usize, usize),
    max_new_tokens: usize,
    fixed: bool,
) -> anyhow::Result<()> {
    let (longest, longest_index) = longest;
    if !fixed {
        source.fit_context(longest + max_new_tokens)?;
    }
    let n_ctx = source.info().n_ctx;
    let trained = source
        .info()
        .details
        .get("n_ctx_train")
        .and_then(|v| v.as_u64());
    match trained.map(|t| t as usize) {
        // A prompt past what the model was trained on: a larger context would not help. (A
        // long answer is not refused: it stops where the context ends, context_full.)
        Some(t) if !fixed && t > 0 && longest >= t => {
            Err(logitprobe_backends::Error::BeyondTrainedContext {
                what: format!("prompt {longest_index}"),
                needed: longest + 1,
                model_ctx: t,
            }
            .into())
        }
        _ if longest >= n_ctx => Err(logitprobe_backends::Error::ContextFull {
            what: format!("prompt {longest_index}"),
            needed: longest + 1,
            n_ctx,
        }
        .into()),
        _ => Ok(()),
    }
}

/// Makes the slots of a run of `n_prompts` prompts ([`LogitSource::begin`]) and says how
/// many: `given`, or else the number of prompts, at most 8, halved until their KV cache fits
/// in memory.
pub fn open_slots(
    source: &mut dyn LogitSource,
    given: Option<usize>,
    n_prompts: usize,
) -> anyhow::Result<usize> {
    if let Some(n) = given {
        source.begin(n)?;
        return Ok(n);
    }
    let mut n = n_prompts.clamp(1, 8);
    loop {
        match source.begin(n) {
            Ok(()) => return Ok(n),
            Err(e)
                if n > 1
                    && matches!(
                        e.downcast_ref::<logitprobe_backends::Error>(),
                        Some(logitprobe_backends::Error::KvCacheTooLarge { .. })
                            | Some(logitprobe_backends::Error::KvCacheAlloc { .. })
                    ) =>
            {
                n /= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks that a prompt has tokens and leaves room in the context for one more.
pub fn check_prompt(input: &PromptInput, n_ctx: usize) -> anyhow::Result<()> {
    if input.ids.is_empty() {
        return Err(usage!(
            "prompt {} is empty after tokenization; give it some text",
            input.index
        ));
    }
    if input.ids.len() >= n_ctx {
        // One token of room is needed for the first generated token.
        return Err(logitprobe_backends::Error::ContextFull {
            what: format!("prompt {}", input.index),
            needed: input.ids.len() + 1,
            n_ctx,
        }
        .into());
    }
    Ok(())
}

/// The answer of several sinks: the strongest wins, and of two stop strings the earlier.
fn stronger(a: Control, b: Control) -> Control {
    use Control::*;
    match (a, b) {
        (StopAll, _) | (_, StopAll) => StopAll,
        (StopSequence { text_len: x }, StopSequence { text_len: y }) => StopSequence {
            text_len: x.into_iter().chain(y).min(),
        },
        (s @ StopSequence { .. }, Continue) | (Continue, s @ StopSequence { .. }) => s,
        (Continue, Continue) => Continue,
    }
}

fn finish(
    source: &dyn Vocab,
    sinks: &mut [&mut dyn Sink],
    mut a: Active,
    reason: StopReason,
) -> anyhow::Result<()> {
    a.generation.stop = reason;
    for sink in sinks.iter_mut() {
        sink.finish(source, &a.input, &a.generation)?;
    }
    Ok(())
}

/// Collects every generation, in prompt order (for callers that hold all prompts anyway).
struct Collect(Vec<Option<Generation>>);

impl Sink for Collect {
    fn finish(
        &mut self,
        _: &dyn Vocab,
        prompt: &PromptInput,
        generation: &Generation,
    ) -> anyhow::Result<()> {
        self.0[prompt.index] = Some(generation.clone());
        Ok(())
    }
}

/// Runs `prompts` (indexed `0..n` in order) in `n` slots and returns their generations in
/// order: the whole set decodes as one batch, for callers that hold every prompt anyway.
pub fn generate(
    source: &mut dyn LogitSource,
    prompts: &[PromptInput],
    cfg: &GenerateConfig,
    sinks: &mut [&mut dyn Sink],
    stop: &AtomicBool,
) -> anyhow::Result<(Vec<Generation>, Timings)> {
    anyhow::ensure!(
        prompts.iter().enumerate().all(|(i, p)| p.index == i),
        "generate: prompts must be indexed 0..n in order"
    );
    let mut collect = Collect(vec![None; prompts.len()]);
    let mut all: Vec<&mut dyn Sink> = Vec::with_capacity(sinks.len() + 1);
    for s in sinks.iter_mut() {
        all.push(&mut **s);
    }
    all.push(&mut collect);
    let mut iter = prompts.iter().cloned().map(Ok);
    let timings =
        Generator::new(cfg, prompts.len().max(1))?.run(source, &mut iter, &mut all, stop)?;
    drop(all);
    let gens = collect
        .0
        .into_iter()
        .map(|g| g.context("a prompt was not finished"))
        .collect::<anyhow::Result<_>>()?;
    Ok((gens, timings))
}

/// The trace form of a distribution; an empty one when probing was off.
fn describe(
    d: Option<&crate::dist::probe::Distribution>,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> DistributionOut {
    match d {
        Some(d) => DistributionOut::from_probe(d, source, pieces),
        None => DistributionOut {
            k_used: 0,
            entropy: 0.0,
            top_mass_used: 0.0,
            selected_prob: 0.0,
            selected_logprob: 0.0,
            selected_rank: 0,
            candidates: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_find_across_tokens_and_take_the_earliest() {
        let s = StopStrings::new(&["\n\n".into(), "END".into()]);
        assert_eq!(s.find(b"abc\n", 3), None);
        assert_eq!(s.find(b"abc\n\nx", 4), Some(3), "spans the token boundary");
        assert_eq!(s.find(b"xENDy\n\n", 1), Some(1));
        // Only text the last token could complete is searched.
        assert_eq!(s.find(b"END and more", 10), None);
    }
}
