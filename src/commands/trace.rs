//! `logitprobe trace`: load a model, generate from the prompts, write the trace files.

use crate::cli::TraceArgs;
use logitprobe::dist::sampler::{self, SamplingConfig};
use logitprobe::generate::prompts::{self, PromptList, PromptSpec, PromptsFile};
use logitprobe::generate::{
    self, GenerateConfig, Generation, PromptInput, Sink, StopReason, StopStrings,
};
use logitprobe::output::parquet::{ParquetTrace, RowGroupBounds};
use logitprobe::output::{self, PromptDirs, StepsJsonl, TraceWriter};
use logitprobe::schema::run::{self as run_record, RunRecord};
use logitprobe::schema::trace;
use logitprobe_backends::{usage, Backend, LogitSource, Vocab};
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
    pub prompts: PromptList,
    /// `--parallel`, when given.
    pub parallel: Option<usize>,
    pub stop: Vec<String>,
    pub plots: bool,
    pub format: prompts::PromptFormat,
    /// Where a chat template that replaces the model's came from (a name, a file, or
    /// "inline"), for run.json.
    pub chat_template_source: Option<String>,
    pub gen: GenerateConfig,
    pub seed_given: bool,
    pub out: PathBuf,
    /// The part of a sharded run this process does.
    pub shard: Option<logitprobe::cluster::shard::Shard>,
    /// The logit lens and attention, when asked.
    pub inside: logitprobe::lens::InsideConfig,
    /// The step logit_lens.png shows.
    pub lens_step: usize,
    /// `--format parquet`: the run's tables instead of a folder per prompt.
    pub parquet: bool,
}

impl TracePlan {
    /// The prompts as (prompt, system message) pairs, for callers that take a few given
    /// on the command line.
    pub fn given_prompts(&self) -> Vec<(String, Option<String>)> {
        match &self.prompts {
            PromptList::Given(v) => v
                .iter()
                .map(|p| (p.prompt.clone(), p.system_prompt.clone()))
                .collect(),
            PromptList::File(_) => Vec::new(),
        }
    }

    /// Validates every setting; errors name the flag and the fix.
    pub fn from_args(args: &mut TraceArgs) -> anyhow::Result<Self> {
        let sampling = SamplingConfig {
            temperature: args.sampling.temperature.unwrap_or(0.8),
            top_k: args.sampling.top_k.unwrap_or(0),
            top_p: args.sampling.top_p.unwrap_or(0.95),
            min_p: args.sampling.min_p.unwrap_or(0.0),
            repeat_penalty: args.sampling.repeat_penalty.unwrap_or(1.0),
            presence_penalty: args.sampling.presence_penalty.unwrap_or(0.0),
            frequency_penalty: args.sampling.frequency_penalty.unwrap_or(0.0),
        };
        sampling.validate()?;
        let probe = args.probe.config()?;
        let max_new_tokens = args.sampling.max_new_tokens.unwrap_or(64);
        if max_new_tokens == 0 {
            return Err(usage!(
                "--max-new-tokens 0 generates nothing: use 1 or more"
            ));
        }
        let explicit: Option<Backend> = args.backend.map(Into::into);
        let model = match (&args.model, explicit) {
            (Some(m), _) => m.clone(),
            (None, Some(Backend::Test)) => "300:0".into(),
            (None, _) => return Err(usage!("no model given: pass --model with a GGUF file, an ONNX folder, a Hugging Face repo id or an alias from `logitprobe models`")),
        };
        // The engine follows the path (a .gguf file: llama.cpp; a folder or .onnx: ONNX
        // Runtime), as inspect does; a --backend that contradicts it is refused.
        let backend = logitprobe::hub::infer_backend(&model, explicit);
        logitprobe::hub::check_backend_fits(backend, &model)?;
        if !args.prompt.is_empty() && args.prompts_file.is_some() {
            return Err(usage!(
                "--prompt and --prompts-file were both given: use one (a prompt's index is its place in the one list)"
            ));
        }
        let prompts = match &args.prompts_file {
            Some(file) => PromptList::File(PromptsFile::scan(file, args.system_prompt.as_deref())?),
            None => PromptList::Given(
                args.prompt
                    .iter()
                    .enumerate()
                    .map(|(index, p)| PromptSpec {
                        index,
                        prompt: p.clone(),
                        system_prompt: args.system_prompt.clone(),
                    })
                    .collect(),
            ),
        };
        if let (true, PromptList::File(f)) = (prompts.is_empty(), &prompts) {
            return Err(usage!(
                "--prompts-file {} holds no prompt ({} lines, all blank); give one prompt per line",
                f.path.display(),
                f.lines
            ));
        }
        if prompts.is_empty() {
            return Err(usage!(
                "no prompt given: pass --prompt \"...\" (repeatable) or --prompts-file FILE"
            ));
        }
        if let PromptList::Given(v) = &prompts {
            for p in v {
                if p.prompt.is_empty() {
                    return Err(usage!(
                        "prompt {} is empty: give some text to continue",
                        p.index + 1
                    ));
                }
            }
        }
        let (chat_template, chat_template_source) = match (
            &args.chat_template,
            &args.chat_template_file,
        ) {
            (Some(t), _) => {
                let named = logitprobe::text::chat::NAMED_TEMPLATES
                    .iter()
                    .any(|(n, _)| n == t);
                if !named && !t.contains("{%") && !t.contains("{{") {
                    return Err(usage!(
                        "--chat-template {t} is neither a known name ({}) nor Jinja source: use one of the names, or --chat-template-file FILE",
                        logitprobe::text::chat::NAMED_TEMPLATES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    ));
                }
                (
                    Some(logitprobe::text::chat::template_source(t)),
                    Some(if named { t.clone() } else { "inline".into() }),
                )
            }
            (None, Some(f)) => (
                Some(std::fs::read_to_string(f).map_err(|e| {
                    usage!("cannot read --chat-template-file {}: {e}", f.display())
                })?),
                Some(format!("file:{}", f.display())),
            ),
            (None, None) => (None, None),
        };
        let use_chat_template = args.use_chat_template || chat_template.is_some();
        if !use_chat_template {
            if args.system_prompt.is_some() {
                return Err(usage!("--system-prompt needs --use-chat-template: a system message only exists inside a chat template"));
            }
            if let PromptList::File(f) = &prompts {
                if let Some(n) = f.first_system_line {
                    return Err(usage!(
                        "{} line {}: a system_prompt needs --use-chat-template (a system message only exists inside a chat template)",
                        f.path.display(),
                        n + 1
                    ));
                }
            }
        }
        if args.parallel == Some(0) {
            return Err(usage!("--parallel 0 decodes nothing: use 1 or more"));
        }
        let shard = match (args.shard.resolve()?, &prompts) {
            (Some(s), PromptList::File(_)) => Some(s),
            (Some(s), PromptList::Given(_)) if args.shard.asked() => {
                return Err(usage!(
                    "--shard {}/{} needs --prompts-file: a sharded trace splits a file's prompts",
                    s.index,
                    s.count
                ))
            }
            // A Slurm array task running a --prompt of its own is not a shard of anything.
            _ => None,
        };
        if let Some(s) = &shard {
            if args.sampling.seed.is_none() {
                return Err(usage!(
                    "{} needs --seed: every shard must sample with the same seed (or run the whole file with --shard 0/1)",
                    s.describe()
                ));
            }
        }
        let inside = args.inside.config()?;
        let parquet = args.format == Some(crate::cli::OutputFormat::Parquet);
        if parquet {
            if let Some(s) = &shard {
                return Err(usage!(
                    "--format parquet writes one set of tables for the whole run and cannot run as {} (merge joins per-prompt folders): drop --shard (and --shards, or the array task's environment), or use --format json",
                    s.describe()
                ));
            }
            if !inside.is_off() {
                return Err(usage!(
                    "--capture-logit-lens and --capture-attention have no columns in the Parquet tables: use --format json with them, or drop them"
                ));
            }
        }
        Ok(TracePlan {
            backend,
            model,
            model_file: args.model_file.clone(),
            prompts,
            parallel: args.parallel,
            stop: args.stop.clone(),
            // Plots are drawn per prompt folder; Parquet has none.
            plots: !args.no_plots && !parquet,
            format: prompts::PromptFormat {
                use_chat_template,
                chat_template,
                parse_special: !args.no_parse_special,
            },
            chat_template_source,
            gen: GenerateConfig {
                sampling,
                probe,
                max_new_tokens,
                ignore_eos: args.sampling.ignore_eos,
                seed: args.sampling.seed.unwrap_or_else(sampler::fresh_seed),
                probe_enabled: !args.no_probe,
                logprobs: None,
                prompt_logprobs: false,
                inside: None,
            },
            inside,
            parquet,
            lens_step: args.inside.lens_step.unwrap_or(0),
            seed_given: args.sampling.seed.is_some(),
            out: args.out.clone().unwrap_or_else(|| PathBuf::from("outputs")),
            shard,
        })
    }
}

/// What decides a sharded trace's outputs, so shards of two jobs never share a folder: the
/// model and its digest, the prompts file's digest, every setting of sampling, probe and
/// format, and the engine options that move logits (not the thread counts).
fn job_fingerprint(
    plan: &TracePlan,
    args: &TraceArgs,
    opts: &logitprobe_backends::EngineOptions,
    model_sha256: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let PromptList::File(file) = &plan.prompts else {
        anyhow::bail!("a sharded trace reads a prompts file");
    };
    let mut engine = serde_json::to_value(opts)?;
    if let Some(m) = engine.as_object_mut() {
        m.remove("threads");
        m.remove("threads_batch");
    }
    Ok(serde_json::json!({
        "backend": plan.backend.name(),
        "model": plan.model,
        "model_file": plan.model_file,
        "model_sha256": model_sha256,
        "prompts_sha256": logitprobe::hub::sha256_file(file.readable_path()),
        "system_prompt": file.default_system,
        "format": plan.format,
        "chat_template": plan.format.chat_template,
        "seed": plan.gen.seed,
        "sampling": plan.gen.sampling,
        "probe": plan.gen.probe,
        "probe_enabled": plan.gen.probe_enabled,
        "max_new_tokens": plan.gen.max_new_tokens,
        "ignore_eos": plan.gen.ignore_eos,
        "stop": plan.stop,
        "plots": plan.plots,
        "inside": format!("{:?}", plan.inside),
        "ctx_size": args.engine.ctx_size,
        "engine": engine,
    }))
}

/// llama.cpp's threads spin waiting for each other at every op: on a machine already busy,
/// more threads than free cores collapse decoding (0.8 tok/s against 37.6 with one thread on
/// SmolLM2, measured on a loaded 2-vCPU machine). Says so before the run, with the fix.
fn busy_machine_hint(backend: Backend, opts: &logitprobe_backends::EngineOptions) {
    // For people at a terminal; scripts and tests read stderr for errors only.
    if backend != Backend::Llama || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    let threads = opts
        .threads
        .unwrap_or_else(logitprobe_backends::physical_cores);
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
    if let Some(load) = load {
        let free = logical as f64 - load;
        if threads > 1 && free < threads as f64 - 0.5 {
            eprintln!(
                "hint: the machine is busy (load {load:.1} on {logical} CPUs) and llama.cpp runs {threads} threads that wait for each other; if decoding is slow, try --threads {}",
                (free.floor() as usize).max(1)
            );
        }
    }
}

/// After a llama.cpp run with several threads (at a terminal, or with LOGITPROBE_HINTS=1):
/// measures one thread's decode rate on this machine now, and when the run decoded at less
/// than half of it, says so with the fix: llama.cpp's threads wait for each other at every
/// op, and on a busy machine more threads can be many times slower than one.
fn slow_threads_hint(
    source: &mut dyn LogitSource,
    backend: Backend,
    opts: &logitprobe_backends::EngineOptions,
    decode_tps: f64,
) -> anyhow::Result<()> {
    let asked = std::env::var_os("LOGITPROBE_HINTS").is_some_and(|v| v == "1");
    let threads = opts
        .threads
        .unwrap_or_else(logitprobe_backends::physical_cores);
    if backend != Backend::Llama
        || threads < 2
        || decode_tps <= 0.0
        || !(asked || std::io::IsTerminal::is_terminal(&std::io::stderr()))
    {
        return Ok(());
    }
    let Some(one) = source.decode_rate(1, 16)? else {
        return Ok(());
    };
    if asked {
        eprintln!(
            "threads: {threads} decoded {decode_tps:.1} tok/s; one thread decodes {one:.1} tok/s here now"
        );
    }
    if decode_tps < 0.5 * one {
        eprintln!(
            "hint: decoding ran at {decode_tps:.1} tok/s with {threads} threads, but one thread decodes {one:.1} tok/s on this machine now: its threads wait for each other when the cores are busy; try --threads 1"
        );
    }
    Ok(())
}

/// Where the prompts' outputs go: a folder each (JSON, CSV, plots), or the run's Parquet
/// tables.
enum Files {
    // Boxed: both are large (the run's record, the Arrow builders).
    Folders(Box<TraceWriter>),
    Parquet(Box<ParquetTrace>),
}

impl Files {
    /// Waits for every file to be written; the writer's first error, if any. When the run
    /// failed (`ok` false), Parquet tables are dropped rather than made final.
    fn close(&mut self, ok: bool) -> anyhow::Result<()> {
        match self {
            Files::Folders(w) => w.close(),
            Files::Parquet(w) if ok => w.close(),
            Files::Parquet(w) => {
                w.abort();
                Ok(())
            }
        }
    }

    fn stop_reasons(&self) -> &std::collections::BTreeMap<&'static str, usize> {
        match self {
            Files::Folders(w) => &w.stop_reasons,
            Files::Parquet(w) => &w.stop_reasons,
        }
    }

    fn last(&self) -> Option<&run_record::PromptRecord> {
        match self {
            Files::Folders(w) => w.last.as_ref(),
            Files::Parquet(w) => w.last.as_ref(),
        }
    }
}

impl Sink for Files {
    fn finish(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
    ) -> anyhow::Result<()> {
        match self {
            Files::Folders(w) => w.finish(source, input, g),
            Files::Parquet(w) => w.finish(source, input, g),
        }
    }
}

/// The row-group bounds of `--format parquet`: the library's, or with the hidden
/// LOGITPROBE_PARQUET_ROWS=N (for tests) N step rows, 4 N candidate rows and N prompt rows.
fn parquet_bounds() -> anyhow::Result<RowGroupBounds> {
    match std::env::var("LOGITPROBE_PARQUET_ROWS") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(RowGroupBounds::from_steps(n)),
            _ => Err(usage!(
                "LOGITPROBE_PARQUET_ROWS={v:?} is not a positive number of rows"
            )),
        },
        Err(_) => Ok(RowGroupBounds::default()),
    }
}

/// Progress on stderr when it is a terminal: prompt processing (tokens of the prompts) and
/// generation as two bars, each with the rate and ETA of its own calls, so that a long
/// prompt shows progress while it is read and does not slow the generation's rate.
struct Bar(Option<Bars>);

struct Bars {
    // Holds the two bars' lines together; dropped with them.
    multi: indicatif::MultiProgress,
    prompt: indicatif::ProgressBar,
    decode: indicatif::ProgressBar,
}

impl Bar {
    fn new(prompt_tokens: u64, new_tokens: u64) -> Self {
        Bar(
            std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let multi = indicatif::MultiProgress::new();
                let bar = |len: u64, template: &str| {
                    let b = multi.add(indicatif::ProgressBar::new(len));
                    b.set_style(
                        indicatif::ProgressStyle::with_template(template).expect("valid template"),
                    );
                    b
                };
                Bars {
                    prompt: bar(
                        prompt_tokens,
                        "{spinner} prompt {bar:40} {pos}/{len} tokens {msg}",
                    ),
                    decode: bar(
                        new_tokens,
                        "{spinner} decode {bar:40} {pos}/{len} tokens {msg}",
                    ),
                    multi,
                }
            }),
        )
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.prompt.finish_and_clear();
            b.decode.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

/// "151.2 tok/s eta 12s" from `done` of `len` units in `secs`; empty before any.
fn rate_eta(done: usize, len: u64, secs: f64) -> String {
    if done == 0 || secs <= 0.0 {
        return String::new();
    }
    let rate = done as f64 / secs;
    let left = len.saturating_sub(done as u64) as f64 / rate;
    format!(
        "{rate:.1} tok/s eta {}",
        indicatif::HumanDuration(std::time::Duration::from_secs_f64(left))
    )
}

impl Sink for Bar {
    fn progress(&mut self, p: &generate::Progress) -> anyhow::Result<()> {
        if let Some(b) = &self.0 {
            b.prompt.set_position(p.prompt_tokens as u64);
            let len = b.prompt.length().unwrap_or(0);
            b.prompt
                .set_message(rate_eta(p.prompt_tokens, len, p.prefill_s));
            b.decode.set_position(p.generated_tokens as u64);
            // The rate of the calls that only decoded: prompt processing is the other bar's.
            let len = b.decode.length().unwrap_or(0);
            let left = len.saturating_sub(p.generated_tokens as u64);
            b.decode.set_message(rate_eta(
                p.decode_tokens,
                p.decode_tokens as u64 + left,
                p.decode_s,
            ));
        }
        Ok(())
    }
}

/// Prints one line per finished prompt.
struct Console {
    several: bool,
    /// Prompts that ended at a logits row with no finite value: (index, step).
    no_distribution: Vec<(usize, usize)>,
}

impl Sink for Console {
    fn finish(&mut self, _: &dyn Vocab, input: &PromptInput, g: &Generation) -> anyhow::Result<()> {
        print_summary(self.several, input, g);
        if g.stop == StopReason::NoFiniteLogits {
            self.no_distribution.push((input.index, g.steps.len()));
        }
        Ok(())
    }
}

/// The error for prompts that ended at a logits row with no finite value; their files and
/// run.json are written (run.json's stop_reasons count them).
fn no_distribution_error(failed: &[(usize, usize)]) -> anyhow::Error {
    let (index, step) = failed[0];
    let others = match failed.len() {
        1 => String::new(),
        n => format!(" (and {} more prompts)", n - 1),
    };
    anyhow::anyhow!(
        "prompt {index} stopped at step {step}{others}: its logits row holds no finite value (every entry -inf), so there is no distribution to sample; the model or its export is broken"
    )
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Finished,
    /// By Ctrl-C (SIGINT) or SIGTERM, after the step in progress: what was finished is
    /// written and run.json says `interrupted`. Holds the signal's number.
    Interrupted(i32),
}

/// SIGINT and SIGTERM, caught: `stop` is raised by either (the loop finishes its step and
/// ends), `terminated` by SIGTERM alone (a job's time limit, an eviction), which tells the
/// exit code.
struct Signals {
    stop: Arc<AtomicBool>,
    terminated: Arc<AtomicBool>,
}

impl Signals {
    fn catch() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = Arc::new(AtomicBool::new(false));
        let terminated = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(SIGINT, stop.clone())?;
        signal_hook::flag::register(SIGTERM, stop.clone())?;
        signal_hook::flag::register(SIGTERM, terminated.clone())?;
        Ok(Signals { stop, terminated })
    }

    fn ended(&self, interrupted: bool) -> Ended {
        use std::sync::atomic::Ordering::Relaxed;
        match (interrupted, self.terminated.load(Relaxed)) {
            (false, _) => Ended::Finished,
            (true, true) => Ended::Interrupted(signal_hook::consts::SIGTERM),
            (true, false) => Ended::Interrupted(signal_hook::consts::SIGINT),
        }
    }
}

/// Runs `trace` end to end.
pub fn run(args: &mut TraceArgs, verbose: bool, command: Vec<String>) -> anyhow::Result<Ended> {
    // The signals are caught before anything is created: one while the model loads ends the
    // run before its first step, as interrupted (run.json says so), not as a kill that leaves
    // an empty folder behind.
    let signals = Signals::catch()?;
    let stop = signals.stop.clone();
    let started_at = trace::now_rfc3339();
    let plan = TracePlan::from_args(args)?;
    output::prepare_dir(&plan.out)?;
    let opts = args.engine.options(verbose)?;

    let t_load = Instant::now();
    let resolved = logitprobe::hub::resolve(plan.backend, &plan.model, plan.model_file.as_deref())?;
    let mut source = logitprobe_backends::open(plan.backend, &resolved.path, &opts)?;
    let load_s = t_load.elapsed().as_secs_f64();
    busy_machine_hint(plan.backend, &opts);

    // Every prompt is rendered and tokenized once before anything is written, so a bad one
    // fails the run at once instead of after hours; the loop tokenizes each again when it
    // takes it, so no list of ids is held.
    // A shard checks them all too: a bad prompt anywhere fails every shard at once, and all
    // shards size their context alike.
    let (mut longest, mut longest_index) = (0, 0);
    let mut indices = Vec::new();
    // The prompt-processing bar's length: every prompt's tokens (a shard's: (index, tokens),
    // summed over those it runs once they are known).
    let (mut prompt_total, mut lengths) = (0usize, Vec::new());
    for spec in plan.prompts.iter()? {
        let input = prompts::prepare(&*source, &spec?, &plan.format)?;
        // Empty prompts now; lengths once the context is fitted.
        generate::check_prompt(&input, usize::MAX)?;
        if input.ids.len() > longest {
            (longest, longest_index) = (input.ids.len(), input.index);
        }
        if plan.shard.is_some() {
            indices.push(input.index);
            lengths.push((input.index, input.ids.len()));
        } else {
            prompt_total += input.ids.len();
        }
    }
    // Without --ctx-size, each slot's context holds what this job needs (up to the model's
    // trained context), not a fixed 4096 tokens.
    generate::fit_context(
        &mut *source,
        (longest, longest_index),
        plan.gen.max_new_tokens,
        opts.ctx_size.is_some(),
    )?;
    let mut gen = plan.gen.clone();
    if !plan.inside.is_off() {
        gen.inside = Some(Arc::new(logitprobe::lens::Inside::prepare(
            &mut *source,
            &plan.inside,
        )?));
    }
    let n = plan.prompts.len();
    let model_sha256 = if plan.backend == Backend::Test {
        None
    } else {
        logitprobe::hub::sha256_file(Path::new(&resolved.path))
    };
    let dirs = PromptDirs::new(&plan.out, n, plan.prompts.index_space());
    // A shard takes its own prompts, less those an earlier run of it finished.
    let mut todo = None;
    let mut shard_record = None;
    if let Some(shard) = plan.shard {
        let job = job_fingerprint(&plan, args, &opts, model_sha256.clone())?;
        let resumed = logitprobe::cluster::shard::resume_trace(
            shard,
            &indices,
            plan.prompts.index_space(),
            job,
            &dirs,
        )?;
        eprintln!(
            "{}: {} of {} prompts, {} done before",
            shard.describe(),
            resumed.record.prompts,
            n,
            resumed.record.done_before
        );
        todo = Some(resumed.todo);
        shard_record = Some(resumed.record);
    }
    let n_run = todo.as_ref().map_or(n, |t| t.len());
    let parallel = generate::open_slots(&mut *source, plan.parallel, n_run)?;

    let total = (n_run * plan.gen.max_new_tokens) as u64;
    prompt_total += lengths
        .iter()
        .filter(|(i, _)| todo.as_ref().is_none_or(|t| t.contains(i)))
        .map(|&(_, n)| n)
        .sum::<usize>();
    drop(lengths);
    let mut bar = Bar::new(prompt_total as u64, total);

    let info = source.info().clone();
    let mut record = RunRecord {
        logitprobe_version: env!("CARGO_PKG_VERSION"),
        command,
        backend: plan.backend.name(),
        model: plan.model.clone(),
        model_path: resolved.path.clone(),
        model_sha256,
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
        ignore_eos: plan.gen.ignore_eos,
        stop: plan.stop.clone(),
        use_chat_template: plan.format.use_chat_template,
        chat_template: plan.chat_template_source.clone(),
        parse_special: plan.format.parse_special,
        parallel,
        prompts: None,
        stop_reasons: None,
        interrupted: false,
        started_at,
        finished_at: String::new(),
        load_s,
        shard: None,
        timings: None,
        inside: gen.inside.as_deref().map(run_record::InsideRecord::from),
    };
    // A shard's steps, rows and record go in its own folder; the prompt folders are shared.
    let top = match plan.shard {
        Some(s) => s.dir(&plan.out),
        None => plan.out.clone(),
    };
    // Parquet: the tables hold the steps; no steps.jsonl.
    let mut jsonl = if plan.parquet {
        output::clear_previous_run(&top)?;
        None
    } else if plan.shard.is_some() {
        Some(StepsJsonl::append(&top.join(output::STEPS_JSONL))?)
    } else {
        output::clear_previous_run(&top)?;
        Some(StepsJsonl::create(&top)?)
    };
    let mut stops = StopStrings::new(&plan.stop);
    let summary = (!dirs.single).then(|| output::SummaryFile {
        path: top.join(output::SUMMARY_CSV),
        append: plan.shard.is_some(),
    });
    let mut writer = if plan.parquet {
        Files::Parquet(Box::new(ParquetTrace::new(
            &top,
            parquet_bounds()?,
            summary,
        )?))
    } else {
        Files::Folders(Box::new(TraceWriter::new(
            dirs.clone(),
            &plan.model,
            &gen,
            plan.format.use_chat_template,
            record.clone(),
            output::WriterFiles {
                plots: plan.plots,
                summary,
                interrupt: Some(stop.clone()),
                lens_step: plan.lens_step,
            },
        )?))
    };
    let mut console = Console {
        several: n > 1,
        no_distribution: Vec::new(),
    };
    let specs = plan.prompts.iter()?;
    let mut inputs = prompts::Prepared {
        specs: specs.filter(|spec| match (spec, &todo) {
            (Ok(s), Some(todo)) => todo.contains(&s.index),
            _ => true,
        }),
        format: plan.format.clone(),
    };
    let result = {
        let mut sinks: Vec<&mut dyn Sink> = Vec::new();
        if let Some(j) = &mut jsonl {
            sinks.push(j);
        }
        if !plan.stop.is_empty() {
            sinks.push(&mut stops);
        }
        sinks.push(&mut writer);
        sinks.push(&mut console);
        sinks.push(&mut bar);
        generate::Generator::new(&gen, parallel)
            .and_then(|g| g.run(&mut *source, &mut inputs, &mut sinks, &stop))
    };
    bar.finish();
    let closed = writer.close(result.is_ok());
    let timings = result?;
    closed?;

    // A signal after the last step, while plots were drawn, interrupts too: the plots not
    // yet drawn were skipped.
    let interrupted = writer
        .stop_reasons()
        .contains_key(StopReason::Interrupted.name())
        || stop.load(std::sync::atomic::Ordering::Relaxed);
    record.interrupted = interrupted;
    record.finished_at = trace::now_rfc3339();
    record.stop_reasons = Some(writer.stop_reasons().clone());
    if n == 1 {
        record.prompts = writer.last().cloned().map(|p| vec![p]);
    }
    let tokens = timings.generated_tokens;
    let tps = timings.decode_tokens_per_s;
    slow_threads_hint(&mut *source, plan.backend, &opts, tps)?;
    record.timings = Some(timings);
    record.shard = shard_record;
    output::write_json(&top.join(output::RUN_JSON), &record)?;
    eprintln!(
        "wrote {} ({} prompt{}, {} tokens, {:.1} tok/s decode, {} parallel)",
        top.display(),
        n_run,
        if n_run == 1 { "" } else { "s" },
        tokens,
        tps,
        parallel
    );
    if plan.shard.is_some() {
        eprintln!(
            "when every shard has finished: logitprobe merge {}",
            plan.out.display()
        );
    }
    if interrupted && plan.parquet {
        eprintln!(
            "interrupted: the prompts finished, and those cut short (stop reason interrupted), are in the tables"
        );
    } else if interrupted {
        eprintln!(
            "interrupted: what was finished is written; plots and report.html not drawn yet can be drawn with `logitprobe report {}`",
            top.display()
        );
    }
    if !console.no_distribution.is_empty() {
        return Err(no_distribution_error(&console.no_distribution));
    }
    Ok(signals.ended(interrupted))
}

fn print_summary(several: bool, input: &PromptInput, g: &Generation) {
    let steps = &g.steps;
    let count = steps.len().max(1) as f64;
    let mean = |f: &dyn Fn(&trace::Step) -> f64| steps.iter().map(f).sum::<f64>() / count;
    let lowest = steps.iter().min_by(|a, b| {
        a.raw
            .selected_prob
            .total_cmp(&b.raw.selected_prob)
            .then(a.step.cmp(&b.step))
    });
    let label = if several {
        format!("prompt {} ", input.index)
    } else {
        String::new()
    };
    match &input.system_prompt {
        Some(s) => println!(
            "{label}[system {s:?}] {:?} → {:?}",
            input.prompt,
            g.output_text()
        ),
        None => println!("{label}{:?} → {:?}", input.prompt, g.output_text()),
    }
    print!(
        "  {} tokens ({}); mean entropy raw {:.3} / processed {:.3} nats; mean k_used raw {:.1} / processed {:.1}",
        g.generated_ids.len(),
        g.stop.name().replace('_', " "),
        mean(&|s| s.raw.entropy),
        mean(&|s| s.processed.entropy),
        mean(&|s| s.raw.k_used as f64),
        mean(&|s| s.processed.k_used as f64),
    );
    match lowest {
        Some(s) => println!(
            "; lowest raw selected_prob {:.4} at step {} ({:?})",
            s.raw.selected_prob, s.step, s.selected.token
        ),
        None => println!(),
    }
}
