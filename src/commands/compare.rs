//! `logitprobe compare`: load A and every B once, score the same ids on all of them, write the
//! statistics, `compare.json`, `compare.csv`, the plots and `report.html`.

use crate::cli::{CompareArgs, EngineArgs, TraceArgs};
use crate::commands::trace::TracePlan;
use anyhow::Context;
use logitprobe::compare::{self, Chunk, CompareReport, InputInfo, SideInfo, Timing};
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

/// `BACKEND:MODEL` of one side.
#[derive(Debug, Clone)]
pub struct SideSpec {
    pub label: String,
    pub backend: Backend,
    pub model: String,
}

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

struct Loaded {
    info: SideInfo,
    source: Box<dyn LogitSource>,
    load_s: f64,
}

/// A side's engine options: compare scores with the engine's fastest kernels, as
/// llama-perplexity does (a shard's fingerprint records it with the rest).
fn scoring(
    engine: &EngineArgs,
    verbose: bool,
) -> anyhow::Result<logitprobe_backends::EngineOptions> {
    Ok(logitprobe_backends::EngineOptions {
        fast_scoring: true,
        ..engine.options(verbose)?
    })
}

fn load(side: &SideSpec, name: &str, engine: &EngineArgs, verbose: bool) -> anyhow::Result<Loaded> {
    let t = Instant::now();
    let fail = |e: anyhow::Error| {
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        usage!("side {name} ({}) failed to load: {msg}", side.label)
    };
    let resolved = logitprobe::hub::resolve(side.backend, &side.model, None).map_err(fail)?;
    let source =
        logitprobe_backends::open(side.backend, &resolved.path, &scoring(engine, verbose)?)
            .map_err(fail)?;
    let sha = if side.backend == Backend::Test {
        None
    } else {
        sha256_file(Path::new(&resolved.path))
    };
    let info = SideInfo::new(
        &side.label,
        side.backend.name(),
        &side.model,
        &resolved.path,
        sha,
        &*source,
    );
    Ok(Loaded {
        info,
        source,
        load_s: t.elapsed().as_secs_f64(),
    })
}

/// Every check that needs no model, so a typo fails in milliseconds.
fn read_input(args: &CompareArgs) -> anyhow::Result<Input> {
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
        return Ok(Input::TextFile {
            path: path.clone(),
            text,
        });
    }
    if let Some(path) = &args.trace {
        return match report::read(path)? {
            ReportInput::Trace(t) => {
                if t.steps.is_empty() {
                    return Err(usage!("--trace {} has no steps to score", path.display()));
                }
                Ok(Input::Trace {
                    path: path.clone(),
                    trace: t,
                })
            }
            ReportInput::Compare(_) => Err(usage!(
                "--trace {} is a compare.json; give an adaptive_token_trace.json",
                path.display()
            )),
        };
    }
    let prompt = args
        .prompt
        .clone()
        .ok_or_else(|| usage!("no input: pass --text-file, --prompt or --trace"))?;
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
    Ok(Input::Prompt(Box::new(TracePlan::from_args(&mut t)?)))
}

/// Runs `compare` end to end.
pub fn run(args: &CompareArgs, verbose: bool, command: Vec<String>) -> anyhow::Result<()> {
    let t_wall = Instant::now();
    let a_spec = parse_side("--a", &args.a)?;
    let b_specs = args
        .b
        .iter()
        .map(|b| parse_side("--b", b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let probe = args.probe.config()?;
    let input = read_input(args)?;
    let chunk_len = args.engine.ctx_size.unwrap_or(DEFAULT_CHUNK);
    if chunk_len < 4 {
        return Err(usage!(
            "--ctx-size {chunk_len} is too short to score anything: use 64 or more"
        ));
    }
    let corpus = matches!(input, Input::TextFile { .. });
    let shard = match args.shard.resolve()? {
        Some(s) if corpus => Some(s),
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
    let mut engines = [
        args.a_engine.over(&args.engine),
        args.b_engine.over(&args.engine),
    ];
    for (side, e) in ["--a-ctx-size", "--b-ctx-size"]
        .iter()
        .zip(engines.iter_mut())
    {
        if corpus {
            if let Some(c) = e.ctx_size.filter(|&c| c < chunk_len) {
                return Err(usage!(
                    "{side} {c} is shorter than the chunk length --ctx-size {chunk_len}: each side's context must hold a chunk"
                ));
            }
            e.ctx_size = Some(e.ctx_size.unwrap_or(chunk_len).max(chunk_len));
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    output::prepare_dir(&out)?;

    let mut timing = Timing::default();
    let mut a = load(&a_spec, "A", &engines[0], verbose)?;
    timing.load_a_s = a.load_s;
    let mut bs = Vec::new();
    for (i, spec) in b_specs.iter().enumerate() {
        let name = compare::b_name(i, b_specs.len());
        let b = load(spec, &name, &engines[1], verbose)?;
        compare::check_vocab(
            &*a.source,
            &*b.source,
            &format!("side {name} ({})", spec.label),
        )?;
        timing.load_b_s.push(b.load_s);
        bs.push(b);
    }

    // The ids both sides score, and what B's own tokenizer makes of the same text.
    let (chunks, input_info, b_text) = match input {
        Input::TextFile { path, text } => {
            // As llama-perplexity tokenizes its file (`common_tokenize(ctx, text, true)`): with
            // BOS in front when the model adds one, so the chunks cover the same tokens (a
            // text without it starts every chunk one token earlier on BOS models: Gemma 3's
            // PPL differed in the third decimal, SmolLM2's, which adds none, did not).
            let add_bos = a.source.info().add_bos;
            let ids = a.source.tokenize(&text, add_bos, false)?;
            if ids.is_empty() {
                return Err(usage!("--text-file {} holds no tokens", path.display()));
            }
            let info = a.source.info();
            let bos = if info.add_bos { info.bos } else { None };
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
            let text = text.clone();
            let b_tok: BTokenize =
                Box::new(move |b: &dyn Vocab| b.tokenize(&text, b.info().add_bos, false));
            (chunks, info, Some((b_tok, ids)))
        }
        Input::Prompt(plan) => {
            let given = plan.given_prompts();
            let inputs = prepare_prompts(&*a.source, &given, &plan.format)?;
            let t = Instant::now();
            let stop = AtomicBool::new(false);
            let (gens, _) = generate::generate(&mut *a.source, &inputs, &plan.gen, &mut [], &stop)?;
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
            let generated = a.source.detokenize(&gens[0].generated_ids, false);
            let b_tok: BTokenize = Box::new(move |b: &dyn Vocab| {
                let mut ids_b = prepare_prompts(b, &plan.given_prompts(), &plan.format)?
                    .remove(0)
                    .ids;
                ids_b.extend(b.tokenize(&generated, false, false)?);
                Ok(ids_b)
            });
            (
                vec![Chunk {
                    ids: ids.clone(),
                    first,
                }],
                info,
                Some((b_tok, ids)),
            )
        }
        Input::Trace { path, trace } => {
            let mut ids: Vec<TokenId> = trace.tokens.prompt_token_ids.clone();
            ids.extend(trace.steps.iter().map(|s| s.selected.token_id));
            let n_vocab = a.source.info().n_vocab;
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
            (
                vec![Chunk {
                    ids,
                    first: prompt_len.saturating_sub(1),
                }],
                info,
                None,
            )
        }
    };
    for (name, side) in std::iter::once(("A", &a)).chain(bs.iter().map(|b| ("B", b))) {
        let n_ctx = side.source.info().n_ctx;
        if let Some(c) = chunks.iter().find(|c| c.ids.len() > n_ctx) {
            return Err(usage!(
                "side {name} ({}) holds {n_ctx} tokens of context but the input needs {}: raise --ctx-size (or --{}-ctx-size)",
                side.info.label,
                c.ids.len(),
                name.to_lowercase()
            ));
        }
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
    if let Some(shard) = shard {
        let engine_options = [scoring(&engines[0], false)?, scoring(&engines[1], false)?];
        let job = CompareJob {
            args,
            engines: &engine_options,
            a: &a.info,
            b: &b_infos,
            input: &input_info,
            probe: &probe,
        };
        let shard_out = ShardOut {
            out: &out,
            shard,
            command,
            t_wall,
        };
        return run_shard(
            &job,
            &shard_out,
            &mut *a.source,
            &mut b_sources,
            &chunks,
            lens.as_ref(),
            timing,
            b_text,
        );
    }
    let total: u64 = chunks.iter().map(|c| c.scored() as u64).sum();
    if total == 0 {
        return Err(usage!(
            "the input leaves no position to score (A generated no token?): use a longer text, another --seed or --prompt, or more --max-new-tokens"
        ));
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} positions {rate} eta {eta}",
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
    });
    let t_score = Instant::now();
    let positions = compare::compare_chunks(
        &mut *a.source,
        &mut b_sources,
        &chunks,
        &probe,
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
    let score_s = t_score.elapsed().as_secs_f64();
    timing.positions_per_s = positions.len() as f64 / score_s.max(1e-9);

    let mut summaries = Vec::new();
    for (bi, b) in b_sources.iter().enumerate() {
        let mut s = compare::summarize(&positions, bi, &b_infos[bi].label);
        if let Some(lc) = &lens {
            s.lens = compare::summarize_lens(&positions, bi, &lc.layers);
        }
        if let Some((b_tokenize, ids_a)) = &b_text {
            let ids_b = b_tokenize(&**b)?;
            s.b_tokens = Some(ids_b.len());
            s.tokenizer_positions_differ = Some(compare::tokenization_difference(ids_a, &ids_b));
        }
        summaries.push(s);
    }
    timing.wall_s = t_wall.elapsed().as_secs_f64();
    let report = CompareReport {
        kind: compare::KIND.into(),
        format_version: compare::FORMAT_VERSION,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: trace::now_rfc3339(),
        command,
        a: a.info,
        b: b_infos,
        input: input_info,
        probe,
        summaries,
        timing,
        lens_layers: lens.as_ref().map(|l| l.layers.clone()),
        positions,
    };
    compare::write_files(&out, &report)?;

    print!("{}", compare::summary_table(&report));
    let t = &report.timing;
    println!();
    println!(
        "scored {} positions ({} tokens through each engine) in {:.2} s: {:.1} positions/s; A {:.1} tok/s, {}; load A {:.2} s, {}; wall {:.2} s",
        t.positions_scored,
        t.tokens_evaluated,
        score_s,
        t.positions_per_s,
        t.tokens_evaluated as f64 / t.score_a_s.max(1e-9),
        t.score_b_s
            .iter()
            .enumerate()
            .map(|(i, s)| format!(
                "{} {:.1} tok/s",
                compare::b_name(i, t.score_b_s.len()),
                t.tokens_evaluated as f64 / s.max(1e-9)
            ))
            .collect::<Vec<_>>()
            .join(", "),
        t.load_a_s,
        t.load_b_s
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{} {s:.2} s", compare::b_name(i, t.load_b_s.len())))
            .collect::<Vec<_>>()
            .join(", "),
        t.wall_s
    );
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// What decides a sharded comparison's outputs.
struct CompareJob<'a> {
    args: &'a CompareArgs,
    engines: &'a [logitprobe_backends::EngineOptions; 2],
    a: &'a SideInfo,
    b: &'a [SideInfo],
    input: &'a InputInfo,
    probe: &'a logitprobe::dist::probe::ProbeConfig,
}

impl CompareJob<'_> {
    /// The models and their digests, the corpus's digest, the chunking and the probe, and
    /// the engine options that move logits (not the thread counts).
    fn fingerprint(&self) -> anyhow::Result<serde_json::Value> {
        let side = |s: &SideInfo| serde_json::json!({"label": s.label, "sha256": s.model_sha256});
        let mut engines = serde_json::to_value(self.engines)?;
        if let Some(list) = engines.as_array_mut() {
            for e in list.iter_mut().filter_map(|e| e.as_object_mut()) {
                e.remove("threads");
                e.remove("threads_batch");
            }
        }
        Ok(serde_json::json!({
            "a": side(self.a),
            "b": self.b.iter().map(side).collect::<Vec<_>>(),
            "text_sha256": self.args.text_file.as_deref().and_then(logitprobe::hub::sha256_file),
            "ctx_size": self.input.ctx_size,
            "chunks": self.input.chunks,
            "score_all": self.input.score_all,
            "probe": self.probe,
            "engines": engines,
            "lens": self.args.lens.then(|| self.args.lens_layers.clone().unwrap_or_else(|| "all".into())),
        }))
    }
}

struct ShardOut<'a> {
    out: &'a Path,
    shard: logitprobe::cluster::shard::Shard,
    command: Vec<String>,
    t_wall: Instant,
}

/// Scores this shard's chunks that an earlier run of it did not, one record per chunk, then
/// the shard's record; `logitprobe merge` computes the statistics from all of them.
#[allow(clippy::too_many_arguments)]
fn run_shard(
    job: &CompareJob,
    so: &ShardOut,
    a: &mut dyn LogitSource,
    bs: &mut [Box<dyn LogitSource>],
    chunks: &[Chunk],
    lens: Option<&compare::LensCompare>,
    mut timing: Timing,
    b_text: Option<(BTokenize, Vec<TokenId>)>,
) -> anyhow::Result<()> {
    let shard = so.shard;
    logitprobe::cluster::shard::Plan {
        kind: "compare".into(),
        shards: shard.count,
        units: (0..chunks.len()).collect(),
        index_space: chunks.len(),
        job: job.fingerprint()?,
    }
    .claim(so.out)?;
    let dir = shard.dir(so.out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let firsts = compare::first_indices(chunks);
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
    let t_score = Instant::now();
    for &c in &todo {
        let positions = compare::compare_some_chunks(
            a,
            bs,
            &[(c, &chunks[c])],
            firsts[c],
            job.probe,
            lens,
            &mut timing,
            &|_| {},
        )?;
        compare::write_chunk_record(&dir, c, &positions)?;
    }
    let score_s = t_score.elapsed().as_secs_f64();
    timing.positions_per_s = timing.positions_scored as f64 / score_s.max(1e-9);
    let mut b_text_out = Vec::new();
    if let Some((b_tokenize, ids_a)) = &b_text {
        for b in bs.iter() {
            let ids_b = b_tokenize(&**b)?;
            b_text_out.push(compare::BText {
                b_tokens: ids_b.len(),
                tokenizer_positions_differ: compare::tokenization_difference(ids_a, &ids_b),
            });
        }
    }
    timing.wall_s = so.t_wall.elapsed().as_secs_f64();
    let record = compare::ShardRecord {
        kind: compare::SHARD_KIND.into(),
        shard,
        chunks: mine.len(),
        done_before: mine.len() - todo.len(),
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        finished_at: trace::now_rfc3339(),
        command: so.command.clone(),
        a: job.a.clone(),
        b: job.b.to_vec(),
        input: job.input.clone(),
        probe: job.probe.clone(),
        timing,
        b_text: b_text_out,
        lens_layers: lens.map(|l| l.layers.clone()),
    };
    output::write_json(&dir.join(compare::SHARD_JSON), &record)?;
    eprintln!(
        "wrote {} ({} chunks scored now); when every shard has finished: logitprobe merge {}",
        dir.display(),
        todo.len(),
        so.out.display()
    );
    Ok(())
}
