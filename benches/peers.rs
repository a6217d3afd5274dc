//! logitprobe against the tools a user would pick instead, on this machine, side by side in
//! one run: each row alternates ours and theirs `BENCH_RUNS` times (default 3) and prints
//! the medians and their ratio, at `BENCH_THREADS` CPU threads (default 1).
//!
//! | row | ours | theirs |
//! |---|---|---|
//! | compare | `logitprobe compare` F16 vs Q4_1 SmolLM2, 16 chunks of 512 | `llama-perplexity --kl-divergence-base` then `--kl-divergence` |
//! | scoring | teacher-forced scoring of 512-token chunks (the scored half's logits) | `llama-bench -p 512` |
//! | (scoring, pp512's work) | the same chunks with the last position's logits only, as `llama-bench` asks: what the scored half's output head costs | `llama-bench -p 512` |
//! | decode | 128 tokens through `trace`'s loop with the probe on, Q4_1 | `llama-bench -n 128` |
//! | prefill | a prompt of 512, 2048, 4096 and 8192 tokens of the corpus through `trace`'s loop (its `prefill_s`), Q4_1, F16 KV cache, flash attention on, batches of 512; 8191 tokens for 8192 (the model's trained context, where a prompt needs room for one more) | `llama-bench -p N -n 0 -fa 1 -ctk f16 -ctv f16 -b 512 -ub 512 --no-warmup` |
//! | probe | a nearly flat 151,936-entry row under top-p 0.95 | the same probe on a language-model-like row |
//!
//! `PEERS_ROWS` (e.g. `decode,probe`) runs only those rows; `PEERS_PREFILL` (e.g. `512,2048`)
//! the prefill row's prompt lengths (`PEERS_PREFILL_BATCHED=0` leaves out its batched-kernel
//! diagnostic, a third of its time).
//!
//! `scripts/bench-vs-peers` prepares what it needs (llama.cpp's tools built from the sources
//! logitprobe vendors, the F16 model) and runs it with `PEERS_LLAMA_BIN` (folder of
//! llama-bench and llama-perplexity) and `PEERS_F16` (F16 GGUF); without them the llama.cpp
//! rows say so and are skipped. The ONNX row (against onnxruntime-genai) is
//! `scripts/bench-onnx-genai`, which bench-vs-peers runs after this one.

mod common;

use common::{cache, decode_once, median};
use logitprobe::backends::{Backend, EngineOptions, LogitSource, Vocab};
use logitprobe::dist::probe::{Probe, ProbeConfig};
use logitprobe::dist::sampler::{Rng, SamplingConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

struct Row {
    what: String,
    ours: f64,
    theirs: f64,
    unit: &'static str,
    /// On ours / theirs: a time ratio for times, a throughput ratio for rates.
    goal: &'static str,
}

/// Runs a command, failing loudly with its stderr: a peer that fails makes no row.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The seconds a command took: wall-clock, and the CPU time (user + system) it used.
#[derive(Clone, Copy)]
struct Took {
    wall: f64,
    cpu: f64,
}

/// Runs `cmd` and measures it. The CPU time leaves out what a shared machine takes from the
/// run (another tenant's turn on the core, the hypervisor's steal), which the wall-clock
/// time counts: two runs of the same work differ less in it.
fn timed(cmd: &mut Command) -> Took {
    let cpu = children_cpu_s();
    let t = Instant::now();
    run(cmd);
    Took {
        wall: t.elapsed().as_secs_f64(),
        cpu: children_cpu_s() - cpu,
    }
}

/// User + system seconds of every child process waited for so far (getrusage's
/// RUSAGE_CHILDREN).
fn children_cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_CHILDREN is a valid `who`.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(usage.ru_utime) + s(usage.ru_stime)
}

/// llama-bench's mean tokens/s for one test (`-p N -n 0` or `-p 0 -n N`).
fn llama_bench(bin: &Path, model: &Path, threads: usize, pp: usize, tg: usize) -> f64 {
    let json = run(Command::new(bin.join("llama-bench")).args([
        "-m",
        model.to_str().unwrap(),
        "-t",
        &threads.to_string(),
        "-p",
        &pp.to_string(),
        "-n",
        &tg.to_string(),
        "-r",
        "1",
        "-o",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("llama-bench -o json");
    v[0]["avg_ts"].as_f64().expect("avg_ts")
}

/// llama-bench's tokens/s for a prompt of `n` tokens at the prefill row's settings (F16 KV
/// cache, flash attention on, batches of 512, no warmup: the prompt is one run either way).
fn llama_bench_prompt(bin: &Path, model: &Path, threads: usize, n: usize) -> f64 {
    let json = run(Command::new(bin.join("llama-bench")).args([
        "-m",
        model.to_str().unwrap(),
        "-t",
        &threads.to_string(),
        "-p",
        &n.to_string(),
        "-n",
        "0",
        "-fa",
        "1",
        "-ctk",
        "f16",
        "-ctv",
        "f16",
        "-b",
        "512",
        "-ub",
        "512",
        "-r",
        "1",
        "--no-warmup",
        "-o",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("llama-bench -o json");
    v[0]["avg_ts"].as_f64().expect("avg_ts")
}

/// Ours for the prefill row: `ids` as one prompt through the loop `trace` runs (in chunks of
/// the engine's batch, probe on, one token sampled), in tokens/s of its `prefill_s`.
fn prefill_once(src: &mut dyn LogitSource, ids: &[logitprobe::backends::TokenId]) -> f64 {
    use logitprobe::generate::{generate, GenerateConfig, PromptInput};
    let prompts = [PromptInput {
        index: 0,
        ids: ids.to_vec(),
        ..Default::default()
    }];
    let cfg = GenerateConfig {
        sampling: SamplingConfig::default(),
        probe: ProbeConfig::default(),
        max_new_tokens: 1,
        ignore_eos: true,
        seed: 1,
        probe_enabled: true,
        logprobs: None,
        prompt_logprobs: false,
        inside: None,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let timings = generate(src, &prompts, &cfg, &mut [], &stop).unwrap().1;
    ids.len() as f64 / timings.prefill_s
}

/// CPU seconds used so far by this process (`libc::RUSAGE_SELF`) or by its finished
/// children (`libc::RUSAGE_CHILDREN`): steadier than wall time on a shared machine.
fn cpu_s(who: i32) -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn opts(threads: usize, ctx: usize) -> EngineOptions {
    EngineOptions {
        threads: Some(threads),
        ctx_size: Some(ctx),
        ..Default::default()
    }
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt")
}

/// Rows like a language model's (Gumbel noise plus a few dominant tokens), and nearly flat
/// ones (every logit within half a nat), 151,936 wide: µs per probe step of each.
fn probe_rows(runs: usize) -> (f64, f64) {
    const VOCAB: usize = 151_936;
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut normal: Vec<f32> = (0..VOCAB).map(|_| -(-uniform().ln()).ln() as f32).collect();
    for (j, boost) in [14.0f32, 12.5, 11.0, 9.0, 6.0].iter().enumerate() {
        normal[j * 104_729 % VOCAB] += boost;
    }
    let flat: Vec<f32> = (0..VOCAB).map(|_| 0.5 * uniform() as f32).collect();
    let sampling = SamplingConfig::default();
    let mut probe = Probe::new(ProbeConfig::default());
    let mut rng = Rng::new(1, 0);
    let mut time = |row: &[f32]| {
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(probe.step(row, &[], &sampling, &mut rng, true).unwrap());
        }
        t.elapsed().as_secs_f64() / 20.0 * 1e6
    };
    let (mut vn, mut vf) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(5) {
        vn.push(time(&normal));
        vf.push(time(&flat));
    }
    (median(vf), median(vn))
}

fn main() {
    // `cargo test --all-targets` also runs benches with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("peers bench: run scripts/bench-vs-peers");
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let env_path = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let q4 = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        q4.exists(),
        "{} missing: run models/fetch smollm2",
        q4.display()
    );
    let rows_wanted = std::env::var("PEERS_ROWS").ok();
    let want = |row: &str| {
        rows_wanted
            .as_deref()
            .is_none_or(|w| w.split(',').any(|r| r.trim() == row))
    };
    let bin = env_path("PEERS_LLAMA_BIN");
    let f16 = env_path("PEERS_F16");
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let tmp = std::env::temp_dir().join(format!("logitprobe-peers-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    match (&bin, &f16) {
        (Some(bin), Some(f16)) => {
            if want("compare") {
            // Row: the whole compare against llama-perplexity's two passes.
            let chunks = "16";
            let t = threads.to_string();
            // Ours with the batch-invariant kernels (the default: one number per token) and
            // with llama-perplexity's batched ones (--scoring-kernels batched).
            let (mut ours, mut batched, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..runs {
                let compare = |out: &Path, kernels: &str| {
                    timed(Command::new(env!("CARGO_BIN_EXE_logitprobe")).args([
                        "compare",
                        "--a",
                        &format!("llama:{}", f16.display()),
                        "--b",
                        &format!("llama:{}", q4.display()),
                        "--text-file",
                        corpus().to_str().unwrap(),
                        "--chunks",
                        chunks,
                        "--threads",
                        &t,
                        "--scoring-kernels",
                        kernels,
                        "--out",
                        out.to_str().unwrap(),
                    ]))
                };
                ours.push(compare(&tmp.join(format!("compare-{r}")), "batch-invariant"));
                batched.push(compare(&tmp.join(format!("compare-batched-{r}")), "batched"));
                let base = tmp.join("base.kld");
                let ppl = |model: &Path, kld: &[&str]| {
                    let mut c = Command::new(bin.join("llama-perplexity"));
                    c.args(["-m", model.to_str().unwrap(), "-f"])
                        .arg(corpus())
                        .args(["-c", "512", "--chunks", chunks, "-t", &t])
                        .args(kld);
                    timed(&mut c)
                };
                let b = base.to_str().unwrap();
                let (first, second) = (
                    ppl(f16, &["--kl-divergence-base", b]),
                    ppl(&q4, &["--kl-divergence-base", b, "--kl-divergence"]),
                );
                theirs.push(Took {
                    wall: first.wall + second.wall,
                    cpu: first.cpu + second.cpu,
                });
                eprintln!(
                    "compare round {}: ours {:.1} s (batched kernels {:.1} s), llama-perplexity \
                     {:.1} s; CPU time {:.1} s ({:.1} s), {:.1} s",
                    r + 1,
                    ours[r].wall,
                    batched[r].wall,
                    theirs[r].wall,
                    ours[r].cpu,
                    batched[r].cpu,
                    theirs[r].cpu
                );
            }
            let of = |v: &[Took], f: fn(&Took) -> f64| median(v.iter().map(f).collect());
            let p = of(&theirs, |t| t.wall);
            rows.push(Row {
                what: "compare F16 vs Q4_1, 16 chunks of 512 (wall)".into(),
                ours: of(&ours, |t| t.wall),
                theirs: p,
                unit: "s",
                goal: "≤ 1.05 (time)",
            });
            rows.push(Row {
                what: "the same, CPU time (user + system)".into(),
                ours: of(&ours, |t| t.cpu),
                theirs: of(&theirs, |t| t.cpu),
                unit: "s",
                goal: "(time)",
            });
            rows.push(Row {
                what: "the same with --scoring-kernels batched (llama-perplexity's kernels)".into(),
                ours: of(&batched, |t| t.wall),
                theirs: p,
                unit: "s",
                goal: "(its kernels)",
            });
            }

            if want("scoring") {
            // Row: scoring throughput on F16, with the kernels compare scores with by default
            // (batch-invariant) and, as llama-bench runs, the batched ones.
            let open = |fast: bool| {
                logitprobe::backends::open(
                    Backend::Llama,
                    f16.to_str().unwrap(),
                    &EngineOptions {
                        fast_scoring: fast,
                        ..opts(threads, 512)
                    },
                )
                .expect("F16 model")
            };
            let mut src = open(false);
            let mut src_batched = open(true);
            let text = std::fs::read_to_string(corpus()).unwrap();
            let ids = src.tokenize(&text, src.info().add_bos, false).unwrap();
            let chunks = logitprobe::compare::corpus_chunks(&ids, 512, src.info().bos, false, Some(4));
            let (mut ours, mut theirs, mut last_only, mut batched) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            // Tokens per second over the chunks, asking for the logits from `first(c)` on.
            let score = |src: &mut Box<dyn LogitSource>,
                         first: &dyn Fn(&logitprobe::compare::Chunk) -> usize| {
                let t = Instant::now();
                let mut n = 0;
                for c in &chunks {
                    std::hint::black_box(src.score_from(&c.ids, first(c)).unwrap());
                    n += c.ids.len();
                }
                n as f64 / t.elapsed().as_secs_f64()
            };
            for r in 0..runs {
                ours.push(score(&mut src, &|c| c.first));
                batched.push(score(&mut src_batched, &|c| c.first));
                theirs.push(llama_bench(bin, f16, threads, 512, 0));
                // llama-bench's prompt asks for the last position's logits only: the same
                // work here says how much of the gap the scored half's output head is.
                last_only.push(score(&mut src_batched, &|c| c.ids.len() - 1));
                eprintln!(
                    "scoring round {}: ours {:.1} tok/s (batched kernels {:.1}; {:.1} with the \
                     last position's logits only), llama-bench pp512 {:.1} tok/s",
                    r + 1,
                    ours[r],
                    batched[r],
                    last_only[r],
                    theirs[r]
                );
            }
            drop(src);
            drop(src_batched);
            let batched = median(batched);
            let last_only = median(last_only);
            let (o, p) = (median(ours), median(theirs));
            rows.push(Row {
                what: "scoring F16, 512-token chunks vs llama-bench pp512".into(),
                ours: o,
                theirs: p,
                unit: "tok/s",
                goal: "≥ 0.9",
            });
            rows.push(Row {
                what: "scoring F16 as above with the batched kernels (--scoring-kernels batched)"
                    .into(),
                ours: batched,
                theirs: p,
                unit: "tok/s",
                goal: "(its kernels)",
            });
            rows.push(Row {
                what: "scoring F16, batched kernels, last position's logits only vs llama-bench pp512"
                    .into(),
                ours: last_only,
                theirs: p,
                unit: "tok/s",
                goal: "(pp512's work)",
            });
            }

            if want("prefill") {
                // Rows: prompt processing of long prompts, Q4_1 (issue 31).
                let sizes: Vec<usize> = std::env::var("PEERS_PREFILL")
                    .ok()
                    .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
                    .unwrap_or_else(|| vec![512, 2048, 4096, 8192]);
                let text = std::fs::read_to_string(corpus()).unwrap();
                for &n in &sizes {
                    let open_with = |ctx: usize, fast: bool| {
                        logitprobe::backends::open(
                            Backend::Llama,
                            q4.to_str().unwrap(),
                            &EngineOptions {
                                flash_attn: logitprobe::backends::FlashAttn::On,
                                fast_scoring: fast,
                                ..opts(threads, ctx)
                            },
                        )
                        .expect("Q4_1 model")
                    };
                    let open = |ctx: usize| open_with(ctx, false);
                    let trained = open(512)
                        .info()
                        .details
                        .get("n_ctx_train")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(u64::MAX) as usize;
                    // A prompt leaves room for the token after it.
                    let ctx = (n + 1).next_multiple_of(256).min(trained);
                    let mut src = open(ctx);
                    let ids = src.tokenize(&text, false, false).unwrap();
                    let ids = &ids[..n.min(ctx - 1)];
                    // The same prompt through llama.cpp's batched kernels (what llama-bench
                    // runs; scoring's `fast_scoring`), the last position's logits only: what
                    // the batch-invariant kernels cost.
                    // (PEERS_PREFILL_BATCHED=0 skips it, for a shorter run.)
                    let mut batched_src = (std::env::var("PEERS_PREFILL_BATCHED").as_deref() != Ok("0"))
                        .then(|| open_with(ctx, true));
                    let (mut ours, mut batched, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
                    // Tokens per CPU second, ours and llama-bench's (its whole process: with
                    // loading the model, a few tenths of a second).
                    let (mut ours_cpu, mut theirs_cpu) = (Vec::new(), Vec::new());
                    let len = ids.len() as f64;
                    for r in 0..runs {
                        let c = cpu_s(libc::RUSAGE_SELF);
                        ours.push(prefill_once(&mut *src, ids));
                        ours_cpu.push(len / (cpu_s(libc::RUSAGE_SELF) - c));
                        if let Some(b) = &mut batched_src {
                            let t = Instant::now();
                            std::hint::black_box(b.score_from(ids, ids.len() - 1).unwrap());
                            batched.push(len / t.elapsed().as_secs_f64());
                        } else {
                            batched.push(f64::NAN);
                        }
                        let c = cpu_s(libc::RUSAGE_CHILDREN);
                        theirs.push(llama_bench_prompt(bin, &q4, threads, n));
                        theirs_cpu.push(n as f64 / (cpu_s(libc::RUSAGE_CHILDREN) - c));
                        eprintln!(
                            "prefill {n} round {}: ours {:.1} tok/s ({} tokens; {:.1} per CPU s; \
                             batched kernels {:.1}), llama-bench pp{n} {:.1} tok/s ({:.1} per CPU s)",
                            r + 1,
                            ours[r],
                            ids.len(),
                            ours_cpu[r],
                            batched[r],
                            theirs[r],
                            theirs_cpu[r]
                        );
                    }
                    drop(batched_src);
                    rows.push(Row {
                        what: format!(
                            "prompt processing Q4_1, {} tokens vs llama-bench pp{n} (F16 KV, flash attention on)",
                            ids.len()
                        ),
                        ours: median(ours),
                        theirs: median(theirs),
                        unit: "tok/s",
                        goal: "≥ 0.95",
                    });
                    rows.push(Row {
                        what: format!(
                            "the same {} tokens through the batched kernels (llama-bench's)",
                            ids.len()
                        ),
                        ours: median(batched),
                        theirs: rows.last().unwrap().theirs,
                        unit: "tok/s",
                        goal: "(its kernels)",
                    });
                    rows.push(Row {
                        what: format!(
                            "prompt processing per CPU second, {} tokens (llama-bench: its process, loading included)",
                            ids.len()
                        ),
                        ours: median(ours_cpu),
                        theirs: median(theirs_cpu),
                        unit: "tok/CPU-s",
                        goal: "≥ 0.95",
                    });
                }
            }

            if want("decode") {
            // Row: decode with the probe on.
            let mut src =
                logitprobe::backends::open(Backend::Llama, q4.to_str().unwrap(), &opts(threads, 512))
                    .unwrap();
            // llama-bench warms up with a run of its own before it measures: so do we.
            decode_once(&mut src, 16, true, None);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for r in 0..runs {
                let timings = decode_once(&mut src, 128, true, None);
                assert_eq!(timings.generated_tokens, 128, "the decode row needs 128 tokens");
                ours.push(timings.decode_tokens_per_s);
                theirs.push(llama_bench(bin, &q4, threads, 0, 128));
                eprintln!(
                    "decode round {}: ours {:.1} tok/s, llama-bench tg128 {:.1} tok/s",
                    r + 1,
                    ours[r],
                    theirs[r]
                );
            }
            let (o, p) = (median(ours), median(theirs));
            rows.push(Row {
                what: "decode Q4_1, 128 tokens, probe on vs llama-bench tg128".into(),
                ours: o,
                theirs: p,
                unit: "tok/s",
                goal: "≥ 0.98",
            });
            }
        }
        _ => skipped.push(
            "compare, scoring, decode, prefill: PEERS_LLAMA_BIN and PEERS_F16 not set (run scripts/bench-vs-peers)"
                .into(),
        ),
    }

    if want("probe") {
        let (flat, normal) = probe_rows(runs);
        rows.push(Row {
            what: "probe, flat 151,936 row under top-p 0.95 vs a normal row".into(),
            ours: flat,
            theirs: normal,
            unit: "µs",
            goal: "≤ 2 (time)",
        });
    }

    let _ = std::fs::remove_dir_all(&tmp);
    println!("\nlogitprobe vs peers, {threads} thread(s), medians of {runs} alternating runs:\n");
    println!("| what | logitprobe | peer | ratio | goal |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} {} | {:.1} {} | {:.2} | {} |",
            r.what,
            r.ours,
            r.unit,
            r.theirs,
            r.unit,
            r.ours / r.theirs,
            r.goal
        );
    }
    for s in skipped {
        println!("skipped: {s}");
    }
}
