//! `logitprobe compare`: A's reference, then each B alone against it (or, with `--lens` and
//! `--sides-together`, every side at once); the statistics, `compare.json`, `compare.csv`, the
//! plots and `report.html`.

use crate::cli::{CompareArgs, EngineArgs, ScoringKernels, TraceArgs};
use crate::commands::trace::TracePlan;
use anyhow::Context;
use logitprobe::cluster::shard::Shard;
use logitprobe::compare::kld_base::KldBase;
use logitprobe::compare::ladder::{self, BPass};
use logitprobe::compare::logits_spill::LogitsSpill;
use logitprobe::compare::reference::{self, ReferenceReader};
use logitprobe::compare::side::SideSpec;
use logitprobe::compare::{self, Chunk, CompareReport, InputInfo, SideInfo, Timing};
use logitprobe::dist::probe::ProbeConfig;
use logitprobe::generate;
use logitprobe::generate::prompts::prepare_prompts;
use logitprobe::hub::sha256_file;
use logitprobe::output;
use logitprobe::report::{self, ReportInput};
use logitprobe::schema::trace;
use logitprobe_backends::{usage, Backend, LogitSource, TokenId, Vocab};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Chunk length when `--ctx-size` is not given (llama-perplexity's default is the model's
/// context; 512 keeps a laptop run short and is what its published KLD tables use).
pub const DEFAULT_CHUNK: usize = 512;

/// `--out` when not given.
pub const DEFAULT_OUT: &str = "outputs/compare";

/// Parses `llama:path`, `onnx:folder`, `test:VOCAB[:SEED]`.
pub fn parse_side(flag: &str, spec: &str) -> anyhow::Result<SideSpec> {
    let bad = || {
        usage!("{flag} {spec:?} is not BACKEND:MODEL; use e.g. {flag} llama:model.gguf, {flag} onnx:model-folder or {flag} test:384")
    };
    let (backend, model) = spec.split_once(':').ok_or_else(bad)?;
    let backend = match backend {
        "llama" => Backend::Llama,
        "onnx" => Backend::Onnx,
        "test" => Backend::Test,
        _ => return Err(bad()),
    };
    if model.is_empty() {
        return Err(bad());
    }
    Ok(SideSpec {
        label: spec.to_string(),
        backend,
        model: model.to_string(),
    })
}

enum Input {
    TextFile {
        path: PathBuf,
        text: String,
    },
    Prompt(Box<TracePlan>),
    Trace {
        path: PathBuf,
        trace: Box<trace::Trace>,
    },
}

/// How B's own tokenizer splits the input text.
type BTokenize = Box<dyn Fn(&dyn Vocab) -> anyhow::Result<Vec<TokenId>>>;

/// A side's engine options: batch-invariant kernels unless --scoring-kernels batched asks
/// for llama-perplexity's (a reference's and a shard's fingerprint record which).
fn scoring(
    engine: &EngineArgs,
    verbose: bool,
) -> anyhow::Result<logitprobe_backends::EngineOptions> {
    engine.options(verbose)
}

/// The engine options that move logits, as a reference or a shard plan records them (not
/// the thread counts, nor the log switch).
fn engine_job(engine: &EngineArgs) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(scoring(engine, false)?)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("threads");
        o.remove("threads_batch");
        o.remove("verbose");
    }
    Ok(v)
}

/// Every check that needs no model, so a typo fails in milliseconds.
fn read_input(args: &CompareArgs) -> anyhow::Result<Option<Input>> {
    if let Some(path) = &args.text_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage!(
                "cannot read --text-file {}: {e}; give a UTF-8 text file",
                path.display()
            )
        })?;
        if text.trim().is_empty() {
            return Err(usage!(
                "--text-file {} is empty: give a corpus of at least one --ctx-size chunk of text",
                path.display()
            ));
        }
        return Ok(Some(Input::TextFile {
            path: path.clone(),
            text,
        }));
    }
    if let Some(path) = &args.trace {
        return match report::read(path)? {
            ReportInput::Trace(t) => {
                if t.steps.is_empty() {
                    return Err(usage!("--trace {} has no steps to score", path.display()));
                }
                Ok(Some(Input::Trace {
                    path: path.clone(),
                    trace: t,
                }))
            }
            ReportInput::Compare(_) => Err(usage!(
                "--trace {} is a compare.json; give an adaptive_token_trace.json",
                path.display()
            )),
        };
    }
    let Some(prompt) = args.prompt.clone() else {
        return Ok(None);
    };
    // The trace command's own checks and defaults for the sampling flags.
    let mut t = TraceArgs {
        model: Some("A".into()),
        prompt: vec![prompt],
        system_prompt: args.system_prompt.clone(),
        use_chat_template: args.use_chat_template,
        sampling: args.sampling.clone(),
        probe: args.probe.clone(),
        ..Default::default()
    };
    Ok(Some(Input::Prompt(Box::new(TracePlan::from_args(&mut t)?))))
}

/// What the flags ask for, checked before any model loads.
struct Setup {
    a: Option<SideSpec>,
    bs: Vec<SideSpec>,
    probe: ProbeConfig,
    input: Option<Input>,
    /// The chunk length: --ctx-size, else the reference's, else [`DEFAULT_CHUNK`].
    chunk_len: usize,
    shard: Option<Shard>,
    /// A's and B's engine flags.
    engines: [EngineArgs; 2],
    out: PathBuf,
    /// `--format parquet`: positions.parquet beside compare.json.
    parquet: bool,
}

impl Setup {
    fn from_args(args: &CompareArgs) -> anyhow::Result<Setup> {
        let a = args
            .a
            .as_deref()
            .map(|a| parse_side("--a", a))
            .transpose()?;
        let bs = args
            .b
            .iter()
            .map(|b| parse_side("--b", b))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if a.is_none() && args.reference.is_none() && args.a_logits.is_none() {
            return Err(usage!(
                "no A: pass --a BACKEND:MODEL, --reference DIR holding an earlier run's reference, or --a-logits FILE from llama-perplexity"
            ));
        }
        if bs.is_empty() && (args.reference.is_none() || args.sides_together || args.lens) {
            return Err(usage!(
                "no B to compare with A: pass --b BACKEND:MODEL (repeat it for a ladder)"
            ));
        }
        if !(args.a_logits_spill_gb.is_finite() && args.a_logits_spill_gb >= 0.0) {
            return Err(usage!(
                "--a-logits-spill-gb {} is not a size: give GB as a number ≥ 0 (0 replays A's head for each B)",
                args.a_logits_spill_gb
            ));
        }
        if args.noise_floor {
            match &a {
                Some(a) if a.backend == Backend::Llama => {}
                Some(_) => {
                    return Err(usage!(
                        "--noise-floor runs A along llama.cpp's other kernels: A must be a llama: model"
                    ))
                }
                None => return Err(usage!("--noise-floor scores A again: pass --a")),
            }
        }
        let probe = args.probe.config()?;
        let input = read_input(args)?;
        if input.is_none()
            && args.a_logits.is_none()
            && (args.reference.is_none() || args.a.is_some())
        {
            return Err(usage!("no input: pass --text-file, --prompt or --trace"));
        }
        let chunk_len = args.engine.ctx_size.unwrap_or(DEFAULT_CHUNK);
        if chunk_len < 4 {
            return Err(usage!(
                "--ctx-size {chunk_len} is too short to score anything: use 64 or more"
            ));
        }
        let corpus = matches!(input, Some(Input::TextFile { .. }));
        let shard = match args.shard.resolve()? {
            Some(s) if corpus || input.is_none() => Some(s),
            Some(s) if args.shard.asked() => {
                return Err(usage!(
                    "--shard {}/{} needs --text-file: a sharded compare splits a corpus's chunks",
                    s.index,
                    s.count
                ))
            }
            // A Slurm array task comparing a --prompt of its own is not a shard of anything.
            _ => None,
        };
        let parquet = args.format == Some(crate::cli::OutputFormat::Parquet);
        if let (true, Some(s)) = (parquet, &shard) {
            return Err(usage!(
                "--format parquet is not written by a sharded compare ({}; merge writes compare.json and compare.csv): drop --format parquet, or run without --shard",
                s.describe()
            ));
        }
        let batched = args.scoring_kernels == ScoringKernels::Batched;
        let engines = [
            EngineArgs {
                fast_scoring: batched,
                ..args.a_engine.over(&args.engine)
            },
            EngineArgs {
                fast_scoring: batched,
                ..args.b_engine.over(&args.engine)
            },
        ];
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
        output::prepare_dir(&out)?;
        Ok(Setup {
            a,
            bs,
            probe,
            input,
            chunk_len,
            shard,
            engines,
            out,
            parquet,
        })
    }

    /// A side's engine flags for chunks of `chunk_len` tokens of a corpus: each side's
    /// context must hold a chunk.
    fn engine_for(&self, side: usize, corpus_chunk: Option<usize>) -> anyhow::Result<EngineArgs> {
        let mut e = self.engines[side].clone();
        if let Some(len) = corpus_chunk {
            if let Some(c) = e.ctx_size.filter(|&c| c < len) {
                return Err(usage!(
                    "--{}-ctx-size {c} is shorter than the chunk length --ctx-size {len}: each side's context must hold a chunk",
                    ["a", "b"][side]
                ));
            }
            e.ctx_size = Some(e.ctx_size.unwrap_or(len).max(len));
        }
        Ok(e)
    }

    /// The fields of a reference's job this run determines: A and its engine flags when A
    /// is given, the input and its chunking when an input is given.
    fn reference_job(
        &self,
        args: &CompareArgs,
        a_located: Option<&(String, Option<String>)>,
    ) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let mut job = serde_json::Map::new();
        if let Some((path, sha)) = a_located {
            job.insert(
                "a_model".into(),
                sha.clone().unwrap_or_else(|| path.clone()).into(),
            );
            let corpus = matches!(self.input, Some(Input::TextFile { .. }));
            // One field per setting, so that a mismatch names it.
            let engine = engine_job(&self.engine_for(0, corpus.then_some(self.chunk_len))?)?;
            for (k, v) in engine.as_object().into_iter().flatten() {
                if k != "ctx_size" {
                    job.insert(format!("a_{k}"), v.clone());
                }
            }
        }
        match &self.input {
            Some(Input::TextFile { text, .. }) => {
                use sha2::Digest;
                let sha = format!("{:x}", sha2::Sha256::digest(text.as_bytes()));
                job.insert("input".into(), format!("text-file sha256 {sha}").into());
                job.insert("ctx_size".into(), self.chunk_len.into());
                job.insert("chunks".into(), serde_json::to_value(args.chunks)?);
                job.insert("score_all".into(), args.score_all.into());
            }
            Some(Input::Trace { path, .. }) => {
                let sha = sha256_file(path).unwrap_or_default();
                job.insert("input".into(), format!("trace sha256 {sha}").into());
            }
            Some(Input::Prompt(_)) => {
                job.insert(
                    "input".into(),
                    format!(
                        "prompt {:?}, system {:?}, chat template {}, {:?}",
                        args.prompt, args.system_prompt, args.use_chat_template, args.sampling
                    )
                    .into(),
                );
            }
            None => {}
        }
        Ok(job)
    }
}

/// The ids every side scores, what they are, and how B's own tokenizer splits the text.
struct Prepared {
    chunks: Vec<Chunk>,
    info: InputInfo,
    b_text: Option<(BTokenize, Vec<TokenId>)>,
}

/// Turns the input into chunks of ids with A: its tokenizer, and for a prompt its
/// continuation.
fn prepare(
    input: Input,
    a: &mut dyn LogitSource,
    args: &CompareArgs,
    chunk_len: usize,
    timing: &mut Timing,
) -> anyhow::Result<Prepared> {
    Ok(match input {
        Input::TextFile { path, text } => {
            // As llama-perplexity tokenizes its file.
            let (ids, bos) = compare::corpus_tokens(&*a, &text)?;
            if ids.is_empty() {
                return Err(usage!("--text-file {} holds no tokens", path.display()));
            }
            let chunks = compare::corpus_chunks(&ids, chunk_len, bos, args.score_all, args.chunks);
            if chunks.is_empty() {
                return Err(usage!(
                    "--text-file {} has {} tokens, fewer than one --ctx-size {chunk_len} chunk: use --ctx-size {} or a longer text",
                    path.display(),
                    ids.len(),
                    (ids.len() / 2).max(4)
                ));
            }
            let scored: usize = chunks.iter().map(Chunk::scored).sum();
            let info = InputInfo {
                kind: "text-file".into(),
                source: path.display().to_string(),
                ctx_size: Some(chunk_len),
                chunks: chunks.len(),
                score_all: args.score_all,
                tokens: ids.len(),
                description: format!(
                    "{} · {} tokens · {} chunk{} of {chunk_len} · {} positions scored ({})",
                    path.display(),
                    ids.len(),
                    chunks.len(),
                    if chunks.len() == 1 { "" } else { "s" },
                    scored,
                    if args.score_all {
                        "every position"
                    } else {
                        "second half of each chunk"
                    }
                ),
            };
            Prepared {
                chunks,
                info,
                b_text: Some((text_tokenizer(text), ids)),
            }
        }
        Input::Prompt(plan) => {
            let given = plan.given_prompts();
            let inputs = prepare_prompts(&*a, &given, &plan.format)?;
            let t = Instant::now();
            let stop = AtomicBool::new(false);
            let (gens, _) = generate::generate(a, &inputs, &plan.gen, &mut [], &stop)?;
            timing.generate_s = t.elapsed().as_secs_f64();
            let input = &inputs[0];
            let mut ids = input.ids.clone();
            ids.extend_from_slice(&gens[0].generated_ids);
            let info = InputInfo {
                kind: "prompt".into(),
                source: input.prompt.clone(),
                ctx_size: None,
                chunks: 1,
                score_all: false,
                tokens: ids.len(),
                description: format!(
                    "prompt {:?} · {} prompt tokens + {} generated by A (seed {}, temperature {})",
                    input.prompt,
                    input.ids.len(),
                    gens[0].generated_ids.len(),
                    plan.gen.seed,
                    plan.gen.sampling.temperature
                ),
            };
            let first = input.ids.len() - 1;
            let generated = a.detokenize(&gens[0].generated_ids, false);
            let b_tok: BTokenize = Box::new(move |b: &dyn Vocab| {
                let mut ids_b = prepare_prompts(b, &plan.given_prompts(), &plan.format)?
                    .remove(0)
                    .ids;
                ids_b.extend(b.tokenize(&generated, false, false)?);
                Ok(ids_b)
            });
            Prepared {
                chunks: vec![Chunk {
                    ids: ids.clone(),
                    first,
                }],
                info,
                b_text: Some((b_tok, ids)),
            }
        }
        Input::Trace { path, trace } => {
            let mut ids: Vec<TokenId> = trace.tokens.prompt_token_ids.clone();
            ids.extend(trace.steps.iter().map(|s| s.selected.token_id));
            let n_vocab = a.info().n_vocab;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= n_vocab) {
                return Err(usage!(
                    "--trace {} holds token id {bad}, beyond A's vocabulary of {n_vocab}: re-score it with the model that wrote it",
                    path.display()
                ));
            }
            let prompt_len = trace.tokens.prompt_token_ids.len();
            let info = InputInfo {
                kind: "trace".into(),
                source: path.display().to_string(),
                ctx_size: None,
                chunks: 1,
                score_all: false,
                tokens: ids.len(),
                description: format!(
                    "trace {} · {prompt_len} prompt tokens + {} generated (model {})",
                    path.display(),
                    trace.steps.len(),
                    trace.metadata.model
                ),
            };
            Prepared {
                chunks: vec![Chunk {
                    ids,
                    first: prompt_len.saturating_sub(1),
                }],
                info,
                b_text: None,
            }
        }
    })
}

/// How a B's own tokenizer splits a corpus.
fn text_tokenizer(text: String) -> BTokenize {
    Box::new(move |b: &dyn Vocab| b.tokenize(&text, b.info().add_bos, false))
}

/// Refuses a side whose context cannot hold the longest chunk.
fn check_context(
    name: &str,
    label: &str,
    source: &dyn Vocab,
    chunks: &[Chunk],
) -> anyhow::Result<()> {
    let n_ctx = source.info().n_ctx;
    if let Some(c) = chunks.iter().find(|c| c.ids.len() > n_ctx) {
        let flag = if name == "A" { "a" } else { "b" };
        return Err(usage!(
            "side {name} ({label}) holds {n_ctx} tokens of context but the input needs {}: raise --ctx-size (or --{flag}-ctx-size)",
            c.ids.len()
        ));
    }
    Ok(())
}

/// A progress bar over `total` positions, on a terminal only.
fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:>3} {bar:40} {pos}/{len} positions {rate} eta {eta}",
            )
            .expect("valid template")
            // indicatif's own {per_sec} prints four decimals ("30.7072/s").
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = std::fmt::Write::write_fmt(w, format_args!("{:.0}/s", s.per_sec()));
                },
            ),
        );
        b
    })
}

/// Runs `compare` end to end.
pub fn run(args: &CompareArgs, verbose: bool, command: Vec<String>) -> anyhow::Result<()> {
    let t_wall = Instant::now();
    let setup = Setup::from_args(args)?;
    if let Some(path) = &args.a_logits {
        run_against_base(args, setup, path, verbose, command, t_wall)
    } else if args.sides_together || args.lens {
        run_together(args, setup, verbose, command, t_wall)
    } else {
        run_one_at_a_time(args, setup, verbose, command, t_wall)
    }
}

/// What the comparison found, before it is written.
struct Outcome {
    a: SideInfo,
    b: Vec<SideInfo>,
    input: InputInfo,
    positions: Vec<compare::Position>,
    /// Per B: its own tokenization of the input (tokens, positions that differ from A's).
    b_text: Vec<Option<compare::BText>>,
    lens_layers: Option<Vec<usize>>,
    reference: Option<compare::ReferenceUse>,
    noise_floor: Option<compare::NoiseFloor>,
    timing: Timing,
    score_s: f64,
}

/// `compare.json`, the CSV, the plots and the report, and the table on the terminal.
fn finish(
    setup: &Setup,
    mut o: Outcome,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    o.timing.positions_per_s = o.positions.len() as f64 / o.score_s.max(1e-9);
    let mut summaries = Vec::new();
    for (bi, b) in o.b.iter().enumerate() {
        let mut s = compare::summarize(&o.positions, bi, &b.label);
        if let Some(layers) = &o.lens_layers {
            s.lens = compare::summarize_lens(&o.positions, bi, layers);
        }
        if let Some(Some(t)) = o.b_text.get(bi) {
            s.b_tokens = Some(t.b_tokens);
            s.tokenizer_positions_differ = Some(t.tokenizer_positions_differ);
        }
        summaries.push(s);
    }
    o.timing.wall_s = t_wall.elapsed().as_secs_f64();
    let report = CompareReport {
        kind: compare::KIND.into(),
        format_version: compare::FORMAT_VERSION,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: trace::now_rfc3339(),
        command,
        a: o.a,
        b: o.b,
        input: o.input,
        probe: setup.probe.clone(),
        summaries,
        timing: o.timing,
        lens_layers: o.lens_layers,
        reference: o.reference,
        noise_floor: o.noise_floor,
        positions: o.positions,
    };
    compare::write_files_with(
        &setup.out,
        &report,
        compare::FileOptions {
            positions_parquet: setup.parquet,
        },
    )?;

    print!("{}", compare::summary_table(&report));
    if report.b.len() > 1 {
        println!();
        print!("{}", compare::ladder_table(&report));
    }
    let t = &report.timing;
    let b_rates = t
        .score_b_s
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "{} {:.1} tok/s",
                compare::b_name(i, t.score_b_s.len()),
                t.tokens_evaluated as f64 / s.max(1e-9)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let a_rate = if t.score_a_s > 0.0 {
        format!("A {:.1} tok/s", t.a_tokens as f64 / t.score_a_s)
    } else {
        "A read from its stored rows".into()
    };
    println!();
    println!(
        "scored {} positions ({} tokens through each B) in {:.2} s: {:.1} positions/s; {a_rate}, {b_rates}; load A {:.2} s, {}; wall {:.2} s",
        t.positions_scored,
        t.tokens_evaluated,
        o.score_s,
        t.positions_per_s,
        t.load_a_s,
        t.load_b_s
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{} {s:.2} s", compare::b_name(i, t.load_b_s.len())))
            .collect::<Vec<_>>()
            .join(", "),
        t.wall_s
    );
    if let Some(r) = &report.reference {
        let kept = if r.a_logits_kept > 0 {
            format!(
                " (A's logits kept for the B's while the run lasted: {})",
                logitprobe_backends::human_bytes(r.a_logits_kept)
            )
        } else {
            String::new()
        };
        println!(
            "reference {}: {} rows of {} values, {}{kept}; {} chunks scored by A now, {} reused",
            r.dir,
            match r.rows {
                compare::ReferenceRows::HeadInput => "head-input",
                compare::ReferenceRows::Logits => "logits",
            },
            r.width,
            logitprobe_backends::human_bytes(r.bytes),
            r.chunks_scored,
            r.chunks_reused
        );
    }
    eprintln!("wrote {}", setup.out.display());
    Ok(())
}

/// A and every B loaded at once, each chunk scored by all of them: what `--lens` needs
/// (both sides' layers at each position) and `--sides-together` asks for.
fn run_together(
    args: &CompareArgs,
    setup: Setup,
    verbose: bool,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    let (Some(a_spec), Some(input)) = (setup.a.clone(), setup.input.as_ref()) else {
        return Err(usage!(
            "--lens and --sides-together score A in this run: pass --a and an input"
        ));
    };
    let corpus = matches!(input, Input::TextFile { .. }).then_some(setup.chunk_len);
    let mut timing = Timing::default();
    let mut a = a_spec.open("A", &scoring(&setup.engine_for(0, corpus)?, verbose)?, None)?;
    timing.load_a_s = a.load_s;
    let mut bs = Vec::new();
    for (i, spec) in setup.bs.iter().enumerate() {
        let name = compare::b_name(i, setup.bs.len());
        let b = spec.open(
            &name,
            &scoring(&setup.engine_for(1, corpus)?, verbose)?,
            None,
        )?;
        compare::check_vocab(
            &*a.source,
            &*b.source,
            &format!("side {name} ({})", spec.label),
        )?;
        timing.load_b_s.push(b.load_s);
        bs.push(b);
    }
    let input = read_input(args)?.expect("checked above");
    let prepared = prepare(input, &mut *a.source, args, setup.chunk_len, &mut timing)?;
    check_context("A", &a.info.label, &*a.source, &prepared.chunks)?;
    for (i, b) in bs.iter().enumerate() {
        check_context(
            &compare::b_name(i, bs.len()),
            &b.info.label,
            &*b.source,
            &prepared.chunks,
        )?;
    }
    let mut b_sources: Vec<Box<dyn LogitSource>> = Vec::new();
    let mut b_infos = Vec::new();
    for b in bs {
        b_sources.push(b.source);
        b_infos.push(b.info);
    }
    let lens = if args.lens {
        let layers = match &args.lens_layers {
            Some(l) => {
                logitprobe::lens::Layers::parse(l).map_err(|e| usage!("--lens-layers {e}"))?
            }
            None => logitprobe::lens::Layers::All,
        };
        Some(compare::LensCompare::prepare(
            &mut *a.source,
            &mut b_sources,
            &layers,
        )?)
    } else {
        None
    };
    let numbered: Vec<(usize, &Chunk)> = prepared
        .chunks
        .iter()
        .enumerate()
        .filter(|(c, _)| setup.shard.is_none_or(|s| s.takes(*c)))
        .collect();
    if let Some(shard) = setup.shard {
        let job = CompareJob {
            args,
            engines: [
                engine_job(&setup.engine_for(0, corpus)?)?,
                engine_job(&setup.engine_for(1, corpus)?)?,
            ],
            a: (a.info.label.clone(), a.info.model_sha256.clone()),
            b: b_infos
                .iter()
                .map(|b| (b.label.clone(), b.model_sha256.clone()))
                .collect(),
            input: &prepared.info,
            probe: &setup.probe,
        };
        let todo = claim_shard(&job, &setup.out, shard, &prepared.chunks)?;
        let firsts = compare::first_indices(&prepared.chunks);
        let t_score = Instant::now();
        for &c in &todo {
            let positions = compare::compare_some_chunks(
                &mut *a.source,
                &mut b_sources,
                &[(c, &prepared.chunks[c])],
                firsts[c],
                &setup.probe,
                lens.as_ref(),
                &mut timing,
                &|_| {},
            )?;
            compare::write_chunk_record(&shard.dir(&setup.out), c, &positions)?;
        }
        let b_text = b_sources
            .iter()
            .map(|b| b_text_of(&prepared.b_text, &**b))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return finish_shard(
            &setup,
            ShardDone {
                shard,
                chunks: &prepared.chunks,
                todo: todo.len(),
                a: a.info,
                b: b_infos,
                input: prepared.info,
                b_text: b_text.into_iter().flatten().collect(),
                lens_layers: lens.map(|l| l.layers),
                timing,
                score_s: t_score.elapsed().as_secs_f64(),
            },
            command,
            t_wall,
        );
    }
    let total: u64 = numbered.iter().map(|(_, c)| c.scored() as u64).sum();
    if total == 0 {
        return Err(usage!(
            "the input leaves no position to score (A generated no token?): use a longer text, another --seed or --prompt, or more --max-new-tokens"
        ));
    }
    let bar = progress_bar(total);
    let t_score = Instant::now();
    let positions = compare::compare_some_chunks(
        &mut *a.source,
        &mut b_sources,
        &numbered,
        0,
        &setup.probe,
        lens.as_ref(),
        &mut timing,
        &|n| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        },
    )?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    timing.a_tokens = timing.tokens_evaluated;
    let b_text = b_sources
        .iter()
        .map(|b| b_text_of(&prepared.b_text, &**b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outcome = Outcome {
        a: a.info,
        b: b_infos,
        input: prepared.info,
        positions,
        b_text,
        lens_layers: lens.map(|l| l.layers),
        reference: None,
        noise_floor: None,
        timing,
        score_s: t_score.elapsed().as_secs_f64(),
    };
    finish(&setup, outcome, command, t_wall)
}

/// How B's own tokenizer splits the input, where the input is text.
fn b_text_of(
    b_text: &Option<(BTokenize, Vec<TokenId>)>,
    b: &dyn Vocab,
) -> anyhow::Result<Option<compare::BText>> {
    let Some((tokenize, ids_a)) = b_text else {
        return Ok(None);
    };
    let ids_b = tokenize(b)?;
    Ok(Some(compare::BText {
        b_tokens: ids_b.len(),
        tokenizer_positions_differ: compare::tokenization_difference(ids_a, &ids_b),
    }))
}

/// A's side of the comparison: the reference, made or completed with A where it lacks
/// chunks this run compares, and reused as it is where it has them all (A is not even
/// loaded then).
struct ReferenceReady {
    reader: ReferenceReader,
    chunks: Vec<Chunk>,
    input: InputInfo,
    b_text: Option<(BTokenize, Vec<TokenId>)>,
    scored: usize,
    reused: usize,
}

fn ready_reference(
    args: &CompareArgs,
    setup: &mut Setup,
    dir: &Path,
    verbose: bool,
    timing: &mut Timing,
) -> anyhow::Result<ReferenceReady> {
    std::fs::create_dir_all(dir)
        .map_err(|e| usage!("cannot make the reference folder {}: {e}", dir.display()))?;
    let a_located = setup.a.as_ref().map(|a| a.locate("A")).transpose()?;
    let job = setup.reference_job(args, a_located.as_ref())?;
    let mut manifest = reference::read_manifest(dir);
    if args.reference.is_none() {
        // The reference in --out's own folder is this run's: one made for another job (or
        // damaged) is made anew, not refused.
        let stale = match &manifest {
            Ok(Some(m)) => reference::check_job(dir, m, &job).is_err(),
            Ok(None) => false,
            Err(_) => true,
        };
        if stale && setup.shard.is_some() {
            // Shards of one job share the folder: one removing it would take the chunks
            // other shards are writing.
            return Err(usage!(
                "{} holds a reference for another job, and shards share it: remove it, or give this job another --out",
                dir.display()
            ));
        }
        if stale {
            eprintln!(
                "{} holds a reference for another job: making it anew",
                dir.display()
            );
            std::fs::remove_dir_all(dir)?;
            std::fs::create_dir_all(dir)?;
            manifest = Ok(None);
        }
    }
    let manifest = manifest?;
    if let Some(m) = &manifest {
        reference::check_job(dir, m, &job)?;
    }
    let mine = |n: usize| -> Vec<usize> {
        (0..n)
            .filter(|&c| setup.shard.is_none_or(|s| s.takes(c)))
            .collect()
    };
    if let Some(m) = manifest {
        let chunks = reference::chunks_of(&m);
        let missing: Vec<usize> = mine(chunks.len())
            .into_iter()
            .filter(|&c| !reference::chunk_present(dir, c, chunks[c].scored(), m.width))
            .collect();
        let reused = mine(chunks.len()).len() - missing.len();
        let mut head = None;
        let mut spill = None;
        if !missing.is_empty() {
            let Some(a_spec) = setup.a.clone() else {
                return Err(reference::ReferenceError::Incomplete {
                    dir: dir.to_path_buf(),
                    missing: missing.len(),
                    total: chunks.len(),
                }
                .into());
            };
            let corpus = (m.input.kind == "text-file").then_some(setup.chunk_len);
            let options = scoring(&setup.engine_for(0, corpus)?, verbose)?;
            let mut a = a_spec.open("A", &options, a_located)?;
            timing.load_a_s = a.load_s;
            check_context("A", &a.info.label, &*a.source, &chunks)?;
            let (rows, h, because) = reference::prepare_capture(&mut *a.source);
            if rows != m.rows {
                return Err(anyhow::anyhow!(
                    "A can no longer give the reference's {:?} rows: {}",
                    m.rows,
                    because.unwrap_or_default()
                ));
            }
            head = h;
            spill = logits_spill(args, dir, &chunks, &mine(chunks.len()), m.vocab.n_vocab)
                .filter(|_| m.rows == compare::ReferenceRows::HeadInput);
            for &c in &missing {
                let scored = reference::score_chunk(&mut *a.source, &chunks[c], m.rows, timing)?;
                reference::write_chunk(dir, c, &scored.rows)?;
                if let Some(s) = &mut spill {
                    s.put(c, &scored.logits);
                }
            }
        }
        let input = m.input.clone();
        // With A not run, the first reader replays A's head and keeps what it gets: worth it
        // where another reads the rows after it.
        let readers = setup.bs.len() + usize::from(args.noise_floor);
        let spill = spill.or_else(|| {
            (m.rows == compare::ReferenceRows::HeadInput && readers > 1)
                .then(|| logits_spill(args, dir, &chunks, &mine(chunks.len()), m.vocab.n_vocab))
                .flatten()
        });
        let mut reader = ReferenceReader::new(dir, m, head)?;
        if let Some(s) = spill {
            reader.keep_logits(s);
        }
        return Ok(ReferenceReady {
            reader,
            chunks,
            input,
            // A's tokens of the whole text are not kept (its chunks are): B's own
            // tokenization is compared when A tokenizes the text in the same run.
            b_text: None,
            scored: missing.len(),
            reused,
        });
    }
    let Some(a_spec) = setup.a.clone() else {
        return Err(reference::ReferenceError::Missing {
            dir: dir.to_path_buf(),
        }
        .into());
    };
    let input = setup.input.take().expect("an input, checked with A");
    let corpus = matches!(input, Input::TextFile { .. }).then_some(setup.chunk_len);
    let options = scoring(&setup.engine_for(0, corpus)?, verbose)?;
    let mut a = a_spec.open("A", &options, a_located.clone())?;
    timing.load_a_s = a.load_s;
    let prepared = prepare(input, &mut *a.source, args, setup.chunk_len, timing)?;
    check_context("A", &a.info.label, &*a.source, &prepared.chunks)?;
    let todo = mine(prepared.chunks.len());
    let (mut rows, head, mut because) = reference::prepare_capture(&mut *a.source);
    let mut width = 0;
    let mut first_scored = None;
    // Head inputs only where A's head gives A's logits back bit for bit: checked on the
    // first chunk, before anything is written.
    if let (Some(&c), Some(h)) = (todo.first(), &head) {
        let scored = reference::score_chunk(&mut *a.source, &prepared.chunks[c], rows, timing)?;
        if let Some(d) = reference::replay_differs(h, &scored) {
            rows = compare::ReferenceRows::Logits;
            because = Some(format!(
                "A's output head, replayed with ggml's one-row kernels, differs from its logits by up to {d:e} (A's engine ran other kernels)"
            ));
            let _ = a
                .source
                .set_capture(&logitprobe_backends::CaptureSpec::default());
            first_scored = Some((
                c,
                reference::Scored {
                    rows: scored.logits,
                    logits: Default::default(),
                },
            ));
        } else {
            width = scored.rows.ncols();
            first_scored = Some((c, scored));
        }
    }
    if rows == compare::ReferenceRows::Logits {
        width = a.info.n_vocab;
    }
    let model_path = Path::new(&a.info.model_path);
    let manifest = compare::ReferenceManifest {
        kind: compare::REFERENCE_KIND.into(),
        format_version: compare::REFERENCE_FORMAT_VERSION,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: trace::now_rfc3339(),
        job,
        rows,
        width,
        logits_because: because.filter(|_| rows == compare::ReferenceRows::Logits),
        a: a.info.clone(),
        input: prepared.info.clone(),
        vocab: reference::vocab_digest(&*a.source),
        head: (rows == compare::ReferenceRows::HeadInput)
            .then(|| reference::head_source(model_path, a.info.model_sha256.clone()))
            .flatten(),
        chunks: reference::chunk_records(&prepared.chunks),
    };
    reference::write_vocab(dir, &reference::vocab_pieces(&*a.source))?;
    reference::write_manifest(dir, &manifest)?;
    let mut spill = (rows == compare::ReferenceRows::HeadInput)
        .then(|| logits_spill(args, dir, &prepared.chunks, &todo, a.info.n_vocab))
        .flatten();
    for &c in &todo {
        let scored = match first_scored.take() {
            Some((fc, scored)) if fc == c => scored,
            _ => reference::score_chunk(&mut *a.source, &prepared.chunks[c], rows, timing)?,
        };
        reference::write_chunk(dir, c, &scored.rows)?;
        if let Some(s) = &mut spill {
            s.put(c, &scored.logits);
        }
    }
    let head = head.filter(|_| rows == compare::ReferenceRows::HeadInput);
    drop(a);
    let mut reader = ReferenceReader::new(dir, manifest, head)?;
    if let Some(s) = spill {
        reader.keep_logits(s);
    }
    Ok(ReferenceReady {
        reader,
        chunks: prepared.chunks,
        input: prepared.info,
        b_text: prepared.b_text,
        scored: todo.len(),
        reused: 0,
    })
}

/// A spill for A's logits of the chunks `mine` of `chunks`, as --a-logits-spill-gb allows and
/// the disk beside the reference `dir` has room for.
fn logits_spill(
    args: &CompareArgs,
    dir: &Path,
    chunks: &[Chunk],
    mine: &[usize],
    n_vocab: usize,
) -> Option<LogitsSpill> {
    let bytes = mine
        .iter()
        .map(|&c| (chunks[c].scored() * n_vocab * 4) as u64)
        .sum();
    LogitsSpill::new(dir, bytes, (args.a_logits_spill_gb * 1e9) as u64)
}

/// A's reference first, then each B alone against it: one model in memory at a time. A
/// reference this run made in its own --out goes with a run that fails (one given with
/// --reference stays: it is A's, whatever went wrong with a B).
fn run_one_at_a_time(
    args: &CompareArgs,
    setup: Setup,
    verbose: bool,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    let dir = args
        .reference
        .clone()
        .unwrap_or_else(|| setup.out.join("reference"));
    // A shard's reference is its job's, shared with the other shards: it stays.
    let made_here = args.reference.is_none() && setup.shard.is_none() && !dir.exists();
    for (i, b) in setup.bs.iter().enumerate() {
        b.check(&compare::b_name(i, setup.bs.len()))?;
    }
    let result = one_at_a_time(args, setup, &dir, verbose, command, t_wall);
    if result.is_err() && made_here {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn one_at_a_time(
    args: &CompareArgs,
    mut setup: Setup,
    dir: &Path,
    verbose: bool,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    let dir = dir.to_path_buf();
    let mut timing = Timing::default();
    let t_score = Instant::now();
    let ready = ready_reference(args, &mut setup, &dir, verbose, &mut timing)?;
    let a_tokens = timing.tokens_evaluated;
    let ReferenceReady {
        mut reader,
        chunks,
        input,
        b_text,
        scored,
        reused,
    } = ready;
    if setup.bs.is_empty() {
        eprintln!(
            "wrote the reference {} ({} chunks scored now, {} there before); compare Bs with it: --reference {} --b BACKEND:MODEL",
            dir.display(),
            scored,
            reused,
            dir.display()
        );
        return Ok(());
    }
    let numbered: Vec<(usize, &Chunk)> = chunks
        .iter()
        .enumerate()
        .filter(|(c, _)| setup.shard.is_none_or(|s| s.takes(*c)))
        .collect();
    let corpus =
        (input.kind == "text-file").then(|| chunks.iter().map(|c| c.ids.len()).max().unwrap_or(0));
    let b_options = scoring(&setup.engine_for(1, corpus)?, verbose)?;
    let firsts = compare::first_indices(&chunks);
    // A shard's plan names every B: each is hashed here once, and loaded with its hash.
    let mut located: Vec<Option<(String, Option<String>)>> = vec![None; setup.bs.len()];
    let todo = match setup.shard {
        Some(shard) => {
            for (i, b) in setup.bs.iter().enumerate() {
                located[i] = Some(b.locate(&compare::b_name(i, setup.bs.len()))?);
            }
            let job = CompareJob {
                args,
                engines: [
                    serde_json::Value::Object(
                        reader
                            .manifest
                            .job
                            .iter()
                            .filter(|(k, _)| k.starts_with("a_") && *k != "a_model")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    ),
                    engine_job(&setup.engine_for(1, corpus)?)?,
                ],
                a: (
                    reader.manifest.a.label.clone(),
                    reader.manifest.a.model_sha256.clone(),
                ),
                b: setup
                    .bs
                    .iter()
                    .zip(&located)
                    .map(|(b, l)| (b.label.clone(), l.as_ref().and_then(|l| l.1.clone())))
                    .collect(),
                input: &input,
                probe: &setup.probe,
            };
            Some(claim_shard(&job, &setup.out, shard, &chunks)?)
        }
        None => None,
    };
    let numbered: Vec<(usize, &Chunk)> = match &todo {
        Some(todo) => todo.iter().map(|&c| (c, &chunks[c])).collect(),
        None => numbered,
    };
    let pass = BPass {
        chunks: &numbered,
        firsts: &firsts,
        probe: &setup.probe,
    };
    let total: u64 = numbered.iter().map(|(_, c)| c.scored() as u64).sum();
    if total == 0 && todo.is_none() {
        return Err(usage!(
            "the input leaves no position to score (A generated no token?): use a longer text, another --seed or --prompt, or more --max-new-tokens"
        ));
    }
    let a_pieces = reference::read_vocab(&dir)?;
    let bar = progress_bar(total * setup.bs.len() as u64);
    let mut per_chunk: Vec<Vec<compare::Position>> = Vec::new();
    let mut b_infos = Vec::new();
    let mut b_texts = Vec::new();
    for (bi, spec) in setup.bs.iter().enumerate() {
        let name = compare::b_name(bi, setup.bs.len());
        if let Some(b) = &bar {
            b.set_message(name.clone());
        }
        let mut b = spec.open(&name, &b_options, located[bi].take())?;
        timing.load_b_s.push(b.load_s);
        ladder::check_vocab_pieces(
            &reader.manifest.vocab,
            &a_pieces,
            &*b.source,
            &format!("side {name} ({})", spec.label),
        )?;
        check_context(&name, &spec.label, &*b.source, &chunks)?;
        pass.run(
            &mut *b.source,
            bi,
            &name,
            &mut reader,
            &mut per_chunk,
            &mut timing,
            &|n| {
                if let Some(b) = &bar {
                    b.inc(n);
                }
            },
        )?;
        b_texts.push(b_text_of(&b_text, &*b.source)?);
        b_infos.push(b.info);
        // Dropped here, before the next B loads.
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let noise_floor = if args.noise_floor {
        Some(noise_floor(
            &setup,
            &pass,
            &mut reader,
            &per_chunk,
            corpus,
            verbose,
        )?)
    } else {
        None
    };
    timing.tokens_evaluated = numbered.iter().map(|(_, c)| c.ids.len()).sum();
    timing.a_tokens = a_tokens;
    let reference_use = compare::ReferenceUse {
        dir: dir.display().to_string(),
        rows: reader.manifest.rows,
        width: reader.manifest.width,
        bytes: numbered
            .iter()
            .map(|(_, c)| reference::chunk_file_bytes(c.scored(), reader.manifest.width))
            .sum(),
        a_logits_kept: reader.logits_kept(),
        chunks_scored: scored,
        chunks_reused: reused,
    };
    if let (Some(shard), Some(todo)) = (setup.shard, &todo) {
        let dir_shard = shard.dir(&setup.out);
        for (k, &(c, _)) in numbered.iter().enumerate() {
            compare::write_chunk_record(&dir_shard, c, &per_chunk[k])?;
        }
        timing.positions_scored = per_chunk.iter().map(Vec::len).sum();
        return finish_shard(
            &setup,
            ShardDone {
                shard,
                chunks: &chunks,
                todo: todo.len(),
                a: reader.manifest.a.clone(),
                b: b_infos,
                input,
                b_text: b_texts.into_iter().flatten().collect(),
                lens_layers: None,
                timing,
                score_s: t_score.elapsed().as_secs_f64(),
            },
            command,
            t_wall,
        );
    }
    let positions: Vec<compare::Position> = per_chunk.into_iter().flatten().collect();
    timing.positions_scored = positions.len();
    let outcome = Outcome {
        a: reader.manifest.a.clone(),
        b: b_infos,
        input,
        positions,
        b_text: b_texts,
        lens_layers: None,
        reference: Some(reference_use),
        noise_floor,
        timing,
        score_s: t_score.elapsed().as_secs_f64(),
    };
    finish(&setup, outcome, command, t_wall)
}

/// A against A along llama.cpp's other kernels (batched where A ran batch-invariant, and
/// the other way round): how far the arithmetic alone moves A's distributions, beside which
/// a small KLD reads as quantization or as noise.
fn noise_floor(
    setup: &Setup,
    pass: &BPass,
    reference: &mut ReferenceReader,
    per_chunk: &[Vec<compare::Position>],
    corpus: Option<usize>,
    verbose: bool,
) -> anyhow::Result<compare::NoiseFloor> {
    let Some(a_spec) = &setup.a else {
        return Err(usage!("--noise-floor scores A again: pass --a"));
    };
    if a_spec.backend != Backend::Llama {
        return Err(usage!(
            "--noise-floor runs A along llama.cpp's other kernels: A must be a llama: model"
        ));
    }
    let mut engine = setup.engine_for(0, corpus)?;
    engine.fast_scoring = !engine.fast_scoring;
    let path = if engine.fast_scoring {
        "A with llama.cpp's batched kernels (llama-perplexity's)"
    } else {
        "A with the batch-invariant kernels"
    };
    let mut a = a_spec.open("A (noise floor)", &scoring(&engine, verbose)?, None)?;
    let mut floor: Vec<Vec<compare::Position>> = per_chunk
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|p| compare::Position {
                    b: Vec::new(),
                    ..p.clone()
                })
                .collect()
        })
        .collect();
    let mut timing = Timing::default();
    pass.run(
        &mut *a.source,
        0,
        "A (noise floor)",
        reference,
        &mut floor,
        &mut timing,
        &|_| {},
    )?;
    let positions: Vec<compare::Position> = floor.into_iter().flatten().collect();
    Ok(compare::NoiseFloor {
        path: path.into(),
        summary: compare::summarize(&positions, 0, path),
    })
}

/// Each B against a llama-perplexity `--kl-divergence-base` file as A.
fn run_against_base(
    args: &CompareArgs,
    setup: Setup,
    path: &Path,
    verbose: bool,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    let mut base = KldBase::open(path)?;
    let n_chunks = args
        .chunks
        .map_or(base.n_chunk(), |n| n.min(base.n_chunk()));
    if setup.shard.is_some() {
        return Err(usage!(
            "--a-logits runs in one process: drop --shard (and run it outside a Slurm array)"
        ));
    }
    let mine: Vec<usize> = (0..n_chunks).collect();
    let n_ctx = base.n_ctx();
    let b_options = scoring(&setup.engine_for(1, Some(n_ctx))?, verbose)?;
    let mut timing = Timing::default();
    let t_score = Instant::now();
    let total = (n_chunks * base.n_scored()) as u64;
    let bar = progress_bar(total * setup.bs.len() as u64);
    let mut per_chunk: Vec<Vec<compare::Position>> = Vec::new();
    let mut b_infos = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    for (bi, spec) in setup.bs.iter().enumerate() {
        let name = compare::b_name(bi, setup.bs.len());
        if let Some(b) = &bar {
            b.set_message(name.clone());
        }
        let mut b = spec.open(&name, &b_options, None)?;
        timing.load_b_s.push(b.load_s);
        base.check_vocab(b.info.n_vocab)
            .map_err(|e| usage!("side {name} ({}): {e}", spec.label))?;
        // As llama-perplexity evaluates the stored tokens: BOS in place of each chunk's
        // first token when the model adds one.
        let info = b.source.info();
        let bos = if info.add_bos { info.bos } else { None };
        let these: Vec<Chunk> = mine
            .iter()
            .map(|&c| Chunk {
                ids: base.eval_tokens(c, bos),
                first: base.scored_positions().start,
            })
            .collect();
        if chunks.is_empty() {
            chunks = these;
        } else if chunks.iter().zip(&these).any(|(x, y)| x.ids != y.ids) {
            return Err(usage!(
                "side {name} ({}) starts chunks with another BOS than B1: compare models of one family",
                spec.label
            ));
        }
        check_context(&name, &spec.label, &*b.source, &chunks)?;
        let numbered: Vec<(usize, &Chunk)> = chunks.iter().enumerate().collect();
        let firsts = compare::first_indices(&chunks);
        let pass = BPass {
            chunks: &numbered,
            firsts: &firsts,
            probe: &setup.probe,
        };
        pass.run(
            &mut *b.source,
            bi,
            &name,
            &mut ladder::BaseRows::new(&mut base),
            &mut per_chunk,
            &mut timing,
            &|n| {
                if let Some(b) = &bar {
                    b.inc(n);
                }
            },
        )?;
        b_infos.push(b.info);
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let positions: Vec<compare::Position> = per_chunk.into_iter().flatten().collect();
    timing.tokens_evaluated = chunks.iter().map(|c| c.ids.len()).sum();
    timing.positions_scored = positions.len();
    let file = path.display().to_string();
    let a = SideInfo {
        label: format!("llama-perplexity base {file}"),
        backend: "kld-base".into(),
        model: file.clone(),
        model_path: file.clone(),
        model_sha256: None,
        model_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
        engine: "llama-perplexity --kl-divergence-base".into(),
        engine_version: String::new(),
        device: String::new(),
        n_vocab: base.n_vocab(),
        tokenizer_vocab: base.n_vocab(),
        n_ctx,
        logits_dtype: "u16 log-probabilities (16 nats below the top clamped)".into(),
        details: serde_json::Map::new(),
        description: format!(
            "A · llama-perplexity --kl-divergence-base {file} · 16-bit log-probabilities"
        ),
    };
    let input = InputInfo {
        kind: "kld-base".into(),
        source: file.clone(),
        ctx_size: Some(n_ctx),
        chunks: n_chunks,
        score_all: false,
        tokens: n_chunks * n_ctx,
        description: format!(
            "the tokens of {file} · {n_chunks} chunk{} of {n_ctx} · {} positions scored (second half of each chunk)",
            if n_chunks == 1 { "" } else { "s" },
            positions.len()
        ),
    };
    let outcome = Outcome {
        a,
        b: b_infos,
        input,
        positions,
        b_text: Vec::new(),
        lens_layers: None,
        reference: None,
        noise_floor: None,
        timing,
        score_s: t_score.elapsed().as_secs_f64(),
    };
    finish(&setup, outcome, command, t_wall)
}

/// What decides a sharded comparison's outputs.
struct CompareJob<'a> {
    args: &'a CompareArgs,
    /// A's and B's engine options that move logits.
    engines: [serde_json::Value; 2],
    /// Label and sha256 of A and of each B.
    a: (String, Option<String>),
    b: Vec<(String, Option<String>)>,
    input: &'a InputInfo,
    probe: &'a ProbeConfig,
}

impl CompareJob<'_> {
    /// The models and their digests, the corpus's digest, the chunking and the probe, and
    /// the engine options that move logits (not the thread counts).
    fn fingerprint(&self) -> anyhow::Result<serde_json::Value> {
        let side = |s: &(String, Option<String>)| serde_json::json!({"label": s.0, "sha256": s.1});
        Ok(serde_json::json!({
            "a": side(&self.a),
            "b": self.b.iter().map(side).collect::<Vec<_>>(),
            "text_sha256": self.args.text_file.as_deref().and_then(logitprobe::hub::sha256_file),
            "ctx_size": self.input.ctx_size,
            "chunks": self.input.chunks,
            "score_all": self.input.score_all,
            "probe": self.probe,
            "engines": self.engines,
            "lens": self.args.lens.then(|| self.args.lens_layers.clone().unwrap_or_else(|| "all".into())),
        }))
    }
}

/// Claims the shard's part of the job in `out` and returns its chunks that an earlier run
/// of it did not finish.
fn claim_shard(
    job: &CompareJob,
    out: &Path,
    shard: Shard,
    chunks: &[Chunk],
) -> anyhow::Result<Vec<usize>> {
    logitprobe::cluster::shard::Plan {
        kind: "compare".into(),
        shards: shard.count,
        units: (0..chunks.len()).collect(),
        index_space: chunks.len(),
        job: job.fingerprint()?,
    }
    .claim(out)?;
    let dir = shard.dir(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mine: Vec<usize> = (0..chunks.len()).filter(|&c| shard.takes(c)).collect();
    let todo: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|&c| !compare::chunk_record_path(&dir, c).is_file())
        .collect();
    eprintln!(
        "{}: {} of {} chunks, {} done before",
        shard.describe(),
        mine.len(),
        chunks.len(),
        mine.len() - todo.len()
    );
    Ok(todo)
}

/// A shard's work, done.
struct ShardDone<'a> {
    shard: Shard,
    chunks: &'a [Chunk],
    /// Chunks scored in this run.
    todo: usize,
    a: SideInfo,
    b: Vec<SideInfo>,
    input: InputInfo,
    b_text: Vec<compare::BText>,
    lens_layers: Option<Vec<usize>>,
    timing: Timing,
    score_s: f64,
}

/// The shard's record, beside its chunks' records; `logitprobe merge` computes the
/// statistics from all of them.
fn finish_shard(
    setup: &Setup,
    mut d: ShardDone,
    command: Vec<String>,
    t_wall: Instant,
) -> anyhow::Result<()> {
    let mine = (0..d.chunks.len()).filter(|&c| d.shard.takes(c)).count();
    d.timing.positions_per_s = d.timing.positions_scored as f64 / d.score_s.max(1e-9);
    d.timing.wall_s = t_wall.elapsed().as_secs_f64();
    let dir = d.shard.dir(&setup.out);
    let record = compare::ShardRecord {
        kind: compare::SHARD_KIND.into(),
        shard: d.shard,
        chunks: mine,
        done_before: mine - d.todo,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        finished_at: trace::now_rfc3339(),
        command,
        a: d.a,
        b: d.b,
        input: d.input,
        probe: setup.probe.clone(),
        timing: d.timing,
        b_text: d.b_text,
        lens_layers: d.lens_layers,
    };
    output::write_json(&dir.join(compare::SHARD_JSON), &record)?;
    eprintln!(
        "wrote {} ({} chunks scored now); when every shard has finished: logitprobe merge {}",
        dir.display(),
        d.todo,
        setup.out.display()
    );
    Ok(())
}
