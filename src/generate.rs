//! The generation loop: one `[batch, vocab]` decode per step through a [`LogitSource`], the
//! sampler and the probe on each row, and each finished step handed to the [`Sink`]s.

use crate::probe::{Probe, ProbeConfig};
use crate::sampler::{Rng, SamplingConfig};
use crate::text::Pieces;
use crate::trace::{DistributionOut, SelectedToken, Step};
use anyhow::Context;
use logitprobe_backends::{usage, LogitSource, TokenId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One prompt, rendered and tokenized.
#[derive(Debug, Clone)]
pub struct PromptInput {
    /// The user's prompt before any chat template.
    pub prompt: String,
    pub system_prompt: Option<String>,
    /// The text fed to the tokenizer (after the chat template, if any).
    pub rendered: String,
    pub ids: Vec<TokenId>,
}

/// Settings of one generation run.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sampling: SamplingConfig,
    pub probe: ProbeConfig,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Off: the sampler runs but no distribution is described (for benchmarks).
    pub probe_enabled: bool,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfGeneration,
    MaxNewTokens,
    ContextFull,
    Interrupted,
}

/// What one prompt produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub steps: Vec<Step>,
    pub generated_ids: Vec<TokenId>,
    pub stop: StopReason,
    /// Steps whose row had no finite logit and fell back to greedy.
    pub degenerate_steps: Vec<usize>,
}

/// Wall-clock split of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Sampling and probing (inside the two above: the engine's share is the rest).
    pub probe_s: f64,
    pub generated_tokens: usize,
    /// Generated tokens per second of the decode phase (after the prompt).
    pub decode_tokens_per_s: f64,
}

/// Receives each finished step as the loop produces it (ripgrep's `Sink`, for traces).
pub trait Sink {
    fn step(&mut self, prompt_index: usize, step: &Step) -> anyhow::Result<()>;
}

/// Reports progress; the CLI draws a bar with it.
pub trait Progress {
    fn advance(&self, n: u64);
}

impl Progress for () {
    fn advance(&self, _: u64) {}
}

/// Runs every prompt as one batch until each hits an end-of-generation token,
/// `max_new_tokens`, the context length, or `stop` is raised (Ctrl-C).
pub fn generate(
    source: &mut dyn LogitSource,
    prompts: &[PromptInput],
    cfg: &GenerateConfig,
    sinks: &mut [&mut dyn Sink],
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> anyhow::Result<(Vec<Generation>, Timings)> {
    let info = source.info().clone();
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(usage!(
                "prompt {} is empty after tokenization; give a non-empty --prompt",
                i + 1
            ));
        }
        if p.ids.len() >= info.n_ctx {
            return Err(usage!(
                "prompt {} has {} tokens but the context holds {}; raise --ctx-size or shorten the prompt",
                i + 1,
                p.ids.len(),
                info.n_ctx
            ));
        }
    }
    source.begin(prompts.len())?;

    let mut probe = Probe::new(cfg.probe.clone());
    let mut rngs: Vec<Rng> = (0..prompts.len())
        .map(|i| Rng::new(cfg.seed, i as u64))
        .collect();
    let mut histories: Vec<Vec<TokenId>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let mut gens: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            steps: Vec::new(),
            generated_ids: Vec::new(),
            stop: StopReason::MaxNewTokens,
            degenerate_steps: Vec::new(),
        })
        .collect();
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut timings = Timings::default();
    let mut probe_time = Duration::ZERO;

    let mut pieces = Pieces::default();
    let t_prefill = Instant::now();
    let inputs: Vec<(usize, &[TokenId])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.ids.as_slice()))
        .collect();
    let mut logits = source.decode(&inputs).context("prompt evaluation failed")?;
    timings.prefill_s = t_prefill.elapsed().as_secs_f64();
    let t_decode = Instant::now();

    while !active.is_empty() {
        if stop.load(Ordering::Relaxed) {
            for &s in &active {
                gens[s].stop = StopReason::Interrupted;
            }
            break;
        }
        let mut next: Vec<usize> = Vec::with_capacity(active.len());
        let mut step_records = Vec::with_capacity(active.len());
        let t_probe = Instant::now();
        for (row, &seq) in active.iter().enumerate() {
            let row_logits = logits.row(row);
            let row_logits = row_logits
                .as_slice()
                .context("logits rows must be contiguous")?;
            let step_idx = gens[seq].steps.len();
            let sp = probe
                .step(
                    row_logits,
                    &histories[seq],
                    &cfg.sampling,
                    &mut rngs[seq],
                    cfg.probe_enabled,
                )
                .map_err(|e| {
                    anyhow::anyhow!(
                        "prompt {}, step {step_idx}: {e}; the engine produced invalid logits",
                        seq + 1
                    )
                })?;
            if sp.degenerate {
                gens[seq].degenerate_steps.push(step_idx);
            }
            step_records.push((seq, step_idx, sp));
        }
        probe_time += t_probe.elapsed();
        let src: &dyn LogitSource = &*source;
        for (seq, step_idx, sp) in step_records {
            let tok = sp.selected;
            let step = Step {
                step: step_idx,
                selected: SelectedToken {
                    token_id: tok,
                    token: pieces.get(src, tok),
                },
                raw: describe(sp.raw.as_ref(), src, &mut pieces),
                processed: describe(sp.processed.as_ref(), src, &mut pieces),
            };
            for sink in sinks.iter_mut() {
                sink.step(seq, &step)?;
            }
            let g = &mut gens[seq];
            g.steps.push(step);
            g.generated_ids.push(tok);
            histories[seq].push(tok);
            timings.generated_tokens += 1;
            progress.advance(1);
            if info.eog.contains(&tok) {
                g.stop = StopReason::EndOfGeneration;
            } else if g.generated_ids.len() >= cfg.max_new_tokens {
                g.stop = StopReason::MaxNewTokens;
            } else if histories[seq].len() >= info.n_ctx {
                g.stop = StopReason::ContextFull;
            } else {
                next.push(seq);
            }
        }
        active = next;
        if active.is_empty() {
            break;
        }
        let batch: Vec<(usize, &[TokenId])> = active
            .iter()
            .map(|&s| {
                (
                    s,
                    std::slice::from_ref(histories[s].last().expect("history is never empty")),
                )
            })
            .collect();
        logits = source.decode(&batch).context("decode failed")?;
    }
    timings.decode_s = t_decode.elapsed().as_secs_f64();
    timings.probe_s = probe_time.as_secs_f64();
    // The first token of each prompt comes from the prefill logits, so the decode phase
    // produced the rest.
    let decoded = timings.generated_tokens.saturating_sub(prompts.len());
    timings.decode_tokens_per_s = if timings.decode_s > 0.0 {
        decoded as f64 / timings.decode_s
    } else {
        0.0
    };
    Ok((gens, timings))
}

/// The trace form of a distribution; an empty one when probing was off.
fn describe(
    d: Option<&crate::probe::Distribution>,
    source: &dyn LogitSource,
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
