//! `logitprobe trace`: load a model, generate from the prompts, write the trace files.

use crate::chat;
use crate::cli::TraceArgs;
use crate::generate::{self, GenerateConfig, Generation, PromptInput, Sink, StopReason, Timings};
use crate::output::{self, StepsJsonl};
use crate::probe::ProbeConfig;
use crate::sampler::{self, SamplingConfig};
use crate::text::Pieces;
use crate::trace::{self, GenerationParams, Metadata, PromptTokens, Trace};
use anyhow::Context;
use logitprobe_backends::{usage, Backend, LogitSource, ModelInfo};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Everything `trace` resolved from flags, config and defaults, before any model loads.
#[derive(Debug, Clone)]
pub struct TracePlan {
    pub backend: Backend,
    pub model: String,
    pub model_file: Option<String>,
    pub prompts: Vec<(String, Option<String>)>,
    pub use_chat_template: bool,
    pub gen: GenerateConfig,
    pub seed_given: bool,
    pub out: PathBuf,
}

impl TracePlan {
    /// Validates every setting; errors name the flag and the fix.
    pub fn from_args(args: &mut TraceArgs) -> anyhow::Result<Self> {
        args.apply_config()?;
        let sampling = SamplingConfig {
            temperature: args.sampling.temperature.unwrap_or(0.8),
            top_k: args.sampling.top_k.unwrap_or(0),
            top_p: args.sampling.top_p.unwrap_or(0.95),
            min_p: args.sampling.min_p.unwrap_or(0.0),
            repeat_penalty: args.sampling.repeat_penalty.unwrap_or(1.0),
            presence_penalty: args.sampling.presence_penalty.unwrap_or(0.0),
            frequency_penalty: args.sampling.frequency_penalty.unwrap_or(0.0),
        };
        sampling.validate().map_err(|e| usage!("{e}"))?;
        let probe = args.probe.config()?;
        let max_new_tokens = args.sampling.max_new_tokens.unwrap_or(64);
        if max_new_tokens == 0 {
            return Err(usage!(
                "--max-new-tokens 0 generates nothing: use 1 or more"
            ));
        }
        let backend: Backend = args.backend.map(Into::into).unwrap_or(Backend::Llama);
        let model = match (&args.model, backend) {
            (Some(m), _) => m.clone(),
            (None, Backend::Test) => "300:0".into(),
            (None, _) => return Err(usage!("no model given: pass --model with a GGUF file, an ONNX folder, a Hugging Face repo id or an alias from `logitprobe models`")),
        };
        let mut prompts: Vec<(String, Option<String>)> = args
            .prompt
            .iter()
            .map(|p| (p.clone(), args.system_prompt.clone()))
            .collect();
        if let Some(file) = &args.prompts_file {
            prompts.extend(read_prompts_file(file, args.system_prompt.as_deref())?);
        }
        if prompts.is_empty() {
            return Err(usage!(
                "no prompt given: pass --prompt \"...\" (repeatable) or --prompts-file FILE"
            ));
        }
        for (i, (p, _)) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(usage!(
                    "prompt {} is empty: give some text to continue",
                    i + 1
                ));
            }
        }
        let use_chat_template = args.use_chat_template;
        if !use_chat_template && prompts.iter().any(|(_, s)| s.is_some()) {
            return Err(usage!("--system-prompt needs --use-chat-template: a system message only exists inside a chat template"));
        }
        Ok(TracePlan {
            backend,
            model,
            model_file: args.model_file.clone(),
            prompts,
            use_chat_template,
            gen: GenerateConfig {
                sampling,
                probe,
                max_new_tokens,
                seed: args.sampling.seed.unwrap_or_else(sampler::fresh_seed),
                probe_enabled: !args.no_probe,
            },
            seed_given: args.sampling.seed.is_some(),
            out: args.out.clone().unwrap_or_else(|| PathBuf::from("outputs")),
        })
    }
}

/// One line a prompt, or JSONL objects with `prompt` and optional `system_prompt`.
fn read_prompts_file(
    path: &Path,
    default_system: Option<&str>,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage!("cannot read --prompts-file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            #[derive(serde::Deserialize)]
            struct Row {
                prompt: String,
                system_prompt: Option<String>,
            }
            let row: Row = serde_json::from_str(line).map_err(|e| {
                usage!(
                    "{} line {}: not a JSONL prompt ({e}); use {{\"prompt\": \"...\"}}",
                    path.display(),
                    n + 1
                )
            })?;
            out.push((
                row.prompt,
                row.system_prompt.or(default_system.map(String::from)),
            ));
        } else {
            out.push((line.to_string(), default_system.map(String::from)));
        }
    }
    Ok(out)
}

/// What `run.json` records beside each trace.
#[derive(Debug, Serialize)]
pub struct RunRecord {
    pub logitprobe_version: &'static str,
    pub command: Vec<String>,
    pub backend: &'static str,
    pub model: String,
    pub model_path: String,
    pub model_sha256: Option<String>,
    pub engine: String,
    pub engine_version: String,
    pub device: String,
    pub n_vocab: usize,
    pub tokenizer_vocab: usize,
    pub n_ctx: usize,
    pub logits_dtype: String,
    pub engine_options: logitprobe_backends::EngineOptions,
    pub engine_details: serde_json::Map<String, serde_json::Value>,
    pub seed: u64,
    pub seed_given: bool,
    pub sampling: SamplingConfig,
    pub probe: ProbeConfig,
    pub probe_enabled: bool,
    pub max_new_tokens: usize,
    pub use_chat_template: bool,
    pub prompts: Vec<PromptRecord>,
    pub interrupted: bool,
    pub started_at: String,
    pub finished_at: String,
    pub load_s: f64,
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct PromptRecord {
    pub index: usize,
    pub prompt: String,
    pub rendered_prompt: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop_reason: StopReason,
    /// Steps whose logits row had no finite entry (greedy fallback on the raw row).
    pub degenerate_steps: Vec<usize>,
    pub out_dir: String,
}

/// sha256 of a model file (or of `model.onnx` in a model folder).
pub fn sha256_file(path: &Path) -> Option<String> {
    use sha2::Digest;
    let file = if path.is_dir() {
        path.join("model.onnx")
    } else {
        path.to_path_buf()
    };
    let mut f = std::fs::File::open(file).ok()?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(format!("{:x}", h.finalize()))
}

/// Renders and tokenizes the prompts with the source's own rules.
pub fn prepare_prompts(
    source: &dyn LogitSource,
    prompts: &[(String, Option<String>)],
    use_chat_template: bool,
) -> anyhow::Result<Vec<PromptInput>> {
    let info = source.info();
    prompts
        .iter()
        .map(|(p, sys)| {
            let (rendered, parse_special) = if use_chat_template {
                (chat::render_for(source, p, sys.as_deref())?, true)
            } else {
                (p.clone(), false)
            };
            // A chat template writes its own BOS where the model wants one.
            let add_bos = info.add_bos
                && !(use_chat_template
                    && info.bos.is_some_and(|b| {
                        source
                            .token_bytes(b)
                            .is_some_and(|bytes| rendered.as_bytes().starts_with(&bytes))
                    }));
            let ids = source.tokenize(&rendered, add_bos, parse_special)?;
            Ok(PromptInput {
                prompt: p.clone(),
                system_prompt: sys.clone(),
                rendered,
                ids,
            })
        })
        .collect()
}

/// Builds the schema trace of one prompt.
pub fn build_trace(
    source: &dyn LogitSource,
    model_label: &str,
    input: &PromptInput,
    generation: &Generation,
    plan_gen: &GenerateConfig,
    use_chat_template: bool,
) -> Trace {
    let info: &ModelInfo = source.info();
    let mut pieces = Pieces::default();
    let mut all = input.ids.clone();
    all.extend_from_slice(&generation.generated_ids);
    Trace {
        schema_version: trace::SCHEMA_VERSION.into(),
        metadata: Metadata {
            model: model_label.to_string(),
            prompt: input.prompt.clone(),
            system_prompt: input.system_prompt.clone(),
            use_chat_template,
            generated_text: source.detokenize(&all, true),
            generated_at: trace::now_rfc3339(),
            device: trace::schema_device(&info.device),
            dtype: Some(info.logits_dtype.clone()),
            vocab_size: Some(info.tokenizer_vocab.max(1)),
            generation_params: GenerationParams::from_sampling(
                &plan_gen.sampling,
                plan_gen.max_new_tokens,
            ),
            probe_config: (&plan_gen.probe).into(),
        },
        tokens: PromptTokens {
            prompt_token_ids: input.ids.clone(),
            prompt_tokens: input.ids.iter().map(|&id| pieces.get(source, id)).collect(),
        },
        steps: generation.steps.clone(),
    }
}

/// Progress bar on stderr when it is a terminal.
struct Bar(Option<indicatif::ProgressBar>);

impl generate::Progress for Bar {
    fn advance(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

/// Runs `trace` end to end. Returns whether the run was interrupted.
pub fn run(args: &mut TraceArgs, verbose: bool, command: Vec<String>) -> anyhow::Result<bool> {
    let started_at = trace::now_rfc3339();
    let plan = TracePlan::from_args(args)?;
    output::prepare_dir(&plan.out)?;
    let opts = args.engine.options(verbose);

    let t_load = Instant::now();
    let resolved = crate::models::resolve(plan.backend, &plan.model, plan.model_file.as_deref())?;
    let mut source = logitprobe_backends::open(plan.backend, &resolved.path, &opts)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let inputs = prepare_prompts(&*source, &plan.prompts, plan.use_chat_template)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed in the same process (tests call run twice);
        // the first one keeps working for the whole process.
        let _ = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Relaxed));
    }
    let total = (inputs.len() * plan.gen.max_new_tokens) as u64;
    let bar = Bar(
        std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bar:40} {pos}/{len} tokens {per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        }),
    );
    let mut jsonl = StepsJsonl::create(&plan.out)?;
    let mut sinks: [&mut dyn Sink; 1] = [&mut jsonl];
    let (gens, timings) =
        generate::generate(&mut *source, &inputs, &plan.gen, &mut sinks, &stop, &bar)?;
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    let interrupted = gens.iter().any(|g| g.stop == StopReason::Interrupted);

    let info = source.info().clone();
    let n = inputs.len();
    let prompt_records: Vec<PromptRecord> = inputs
        .iter()
        .zip(&gens)
        .enumerate()
        .map(|(i, (input, g))| PromptRecord {
            index: i,
            prompt: input.prompt.clone(),
            rendered_prompt: input.rendered.clone(),
            prompt_tokens: input.ids.len(),
            generated_tokens: g.generated_ids.len(),
            stop_reason: g.stop,
            degenerate_steps: g.degenerate_steps.clone(),
            out_dir: output::prompt_dir(&plan.out, i, n).display().to_string(),
        })
        .collect();
    let record = RunRecord {
        logitprobe_version: env!("CARGO_PKG_VERSION"),
        command,
        backend: plan.backend.name(),
        model: plan.model.clone(),
        model_path: resolved.path.clone(),
        model_sha256: if plan.backend == Backend::Test {
            None
        } else {
            sha256_file(Path::new(&resolved.path))
        },
        engine: info.engine.clone(),
        engine_version: info.engine_version.clone(),
        device: info.device.clone(),
        n_vocab: info.n_vocab,
        tokenizer_vocab: info.tokenizer_vocab,
        n_ctx: info.n_ctx,
        logits_dtype: info.logits_dtype.clone(),
        engine_options: opts.clone(),
        engine_details: info.details.clone(),
        seed: plan.gen.seed,
        seed_given: plan.seed_given,
        sampling: plan.gen.sampling.clone(),
        probe: plan.gen.probe.clone(),
        probe_enabled: plan.gen.probe_enabled,
        max_new_tokens: plan.gen.max_new_tokens,
        use_chat_template: plan.use_chat_template,
        prompts: prompt_records,
        interrupted,
        started_at,
        finished_at: trace::now_rfc3339(),
        load_s,
        timings,
    };
    for (i, (input, g)) in inputs.iter().zip(&gens).enumerate() {
        let t = build_trace(
            &*source,
            &plan.model,
            input,
            g,
            &plan.gen,
            plan.use_chat_template,
        );
        let dir = output::prompt_dir(&plan.out, i, n);
        output::write_prompt_files(&dir, &t, &record)
            .with_context(|| format!("writing the outputs of prompt {}", i + 1))?;
        crate::report::write_trace_report(&dir, &t)
            .with_context(|| format!("drawing the plots of prompt {}", i + 1))?;
        print_summary(i, n, input, g, &source.detokenize(&g.generated_ids, true));
    }
    if n > 1 {
        output::write_json(&plan.out.join(output::RUN_JSON), &record)?;
    }
    eprintln!(
        "wrote {} ({} tokens, {:.1} tok/s decode)",
        plan.out.display(),
        record.timings.generated_tokens,
        record.timings.decode_tokens_per_s
    );
    Ok(interrupted)
}

fn print_summary(i: usize, n: usize, input: &PromptInput, g: &Generation, text: &str) {
    let steps = &g.steps;
    let count = steps.len().max(1) as f64;
    let mean = |f: &dyn Fn(&trace::Step) -> f64| steps.iter().map(f).sum::<f64>() / count;
    let lowest = steps.iter().min_by(|a, b| {
        a.raw
            .selected_prob
            .total_cmp(&b.raw.selected_prob)
            .then(a.step.cmp(&b.step))
    });
    let label = if n > 1 {
        format!("prompt {} ", i + 1)
    } else {
        String::new()
    };
    println!("{label}{:?} → {:?}", input.prompt, text);
    print!(
        "  {} tokens ({:?}); mean entropy raw {:.3} / processed {:.3} nats; mean k_used raw {:.1} / processed {:.1}",
        g.generated_ids.len(),
        g.stop,
        mean(&|s| s.raw.entropy),
        mean(&|s| s.processed.entropy),
        mean(&|s| s.raw.k_used as f64),
        mean(&|s| s.processed.k_used as f64),
    );
    match lowest {
        Some(s) => println!(
            "; lowest selected_prob {:.4} at step {} ({:?})",
            s.raw.selected_prob, s.step, s.selected.token
        ),
        None => println!(),
    }
}
