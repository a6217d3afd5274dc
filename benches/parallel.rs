//! Batched decoding through the slots of the generation loop: tokens/s of 64 prompts × 32
//! new tokens on SmolLM2-135M-Instruct Q4_1 (llama.cpp) with `--parallel 8` against
//! `--parallel 1`, at 1 and 2 threads, measured side by side (alternating runs, medians).
//! Goal: ≥ 2× at 1 thread, since a batched decode reads the weights once for 8 tokens.
//!
//! Run: `cargo bench --bench parallel` (after models/fetch). `BENCH_RUNS` (default 3)
//! sets the alternations, `BENCH_THREADS` (default "1,2") the thread counts. With
//! `PEERS_LLAMA_BIN` (the folder `scripts/llama-tools ours` prints) it also runs llama.cpp's
//! own `llama-batched-bench` at 1 and 8 sequences in the same rounds: what batching gains in
//! the engine itself, the ceiling for the loop's ratio.

mod common;

use common::{cache, runs_and_threads};
use logitprobe::backends::{EngineOptions, LogitSource};
use logitprobe::dist::probe::ProbeConfig;
use logitprobe::dist::sampler::SamplingConfig;
use logitprobe::generate::{self, GenerateConfig, PromptInput};
use std::sync::atomic::AtomicBool;

const TOPICS: [&str; 8] = [
    "a lighthouse keeper",
    "the history of bread",
    "how rivers form",
    "a robot learning to paint",
    "the rules of chess",
    "a city under the sea",
    "why the sky is blue",
    "a letter to a friend",
];

/// Generated tokens per second of the whole loop over 64 prompts, and of its steps that
/// evaluated no prompt (pure decode).
fn loop_tps(src: &mut dyn LogitSource, parallel: usize) -> (f64, f64) {
    let prompts: Vec<PromptInput> = (0..64)
        .map(|i| {
            let text = format!(
                "Write a few sentences about {} (number {i}).",
                TOPICS[i % 8]
            );
            PromptInput {
                index: i,
                ids: src.tokenize(&text, src.info().add_bos, false).unwrap(),
                prompt: text.clone(),
                system_prompt: None,
                rendered: text,
                ..Default::default()
            }
        })
        .collect();
    let cfg = GenerateConfig {
        sampling: SamplingConfig::default(),
        probe: ProbeConfig::default(),
        max_new_tokens: 32,
        // Every prompt gets its 32 tokens, as llama-batched-bench decodes: with end-of-
        // generation on, most of these prompts end within a few tokens, and the run measures
        // prompt evaluation, which --parallel cannot speed up.
        ignore_eos: true,
        seed: 1,
        probe_enabled: true,
        logprobs: None,
        prompt_logprobs: false,
        inside: None,
    };
    // Both settings decode exactly the same tokens.
    let mut feed = prompts.into_iter().map(Ok);
    let t = generate::Generator::new(&cfg, parallel)
        .unwrap()
        .run(src, &mut feed, &mut [], &AtomicBool::new(false))
        .unwrap();
    (t.generated_tokens as f64 / t.wall_s, t.decode_tokens_per_s)
}

/// llama-batched-bench's generation tokens/s (S_TG) and overall tokens/s (S) at 1 and 8
/// sequences of a 16-token prompt and 32 new tokens each (its own prompts, not shared).
fn batched_bench(bin: &std::path::Path, gguf: &std::path::Path, threads: usize) -> [f64; 4] {
    let t = threads.to_string();
    let out = std::process::Command::new(bin.join("llama-batched-bench"))
        .args([
            "-m",
            gguf.to_str().unwrap(),
            "-c",
            "2048",
            "-b",
            "512",
            "-ub",
            "512",
        ])
        .args([
            "-npp", "16", "-ntg", "32", "-npl", "1,8", "-t", &t, "-tb", &t,
        ])
        .output()
        .expect("llama-batched-bench");
    assert!(out.status.success(), "llama-batched-bench failed");
    // Its table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    let rows: Vec<Vec<f64>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .filter_map(|c| c.trim().parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|r| r.len() == 10)
        .collect();
    assert_eq!(
        rows.len(),
        2,
        "llama-batched-bench printed no 1- and 8-sequence rows"
    );
    [rows[0][7], rows[1][7], rows[0][9], rows[1][9]]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("parallel bench: run with `cargo bench --bench parallel`");
        return;
    }
    let (runs, threads) = runs_and_threads(3);
    let gguf = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    println!("SmolLM2-135M-Instruct Q4_1, 64 prompts × 32 new tokens; medians of {runs} alternating runs");
    for &t in &threads {
        let opts = EngineOptions {
            threads: Some(t),
            ctx_size: Some(256),
            ..Default::default()
        };
        let mut src = logitprobe::backends::llama::LlamaSource::open(&gguf, &opts)
            .expect("run models/fetch first");
        loop_tps(&mut src, 8); // warm-up: the weights' pages come in
        let peers = std::env::var_os("PEERS_LLAMA_BIN").map(std::path::PathBuf::from);
        let (mut one, mut eight, mut engine) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            one.push(loop_tps(&mut src, 1));
            eight.push(loop_tps(&mut src, 8));
            if let Some(bin) = &peers {
                engine.push(batched_bench(bin, &gguf, t));
            }
        }
        let m = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        let (one_all, eight_all) = (m(&one, |x| x.0), m(&eight, |x| x.0));
        let (one_dec, eight_dec) = (m(&one, |x| x.1), m(&eight, |x| x.1));
        println!(
            "llama.cpp Q4_1, {t} thread(s): --parallel 8 {eight_all:.1} tok/s, --parallel 1 {one_all:.1} tok/s, ratio = {:.2}× (decode steps alone: {eight_dec:.1} vs {one_dec:.1} tok/s, {:.2}×)",
            eight_all / one_all,
            eight_dec / one_dec
        );
        if !engine.is_empty() {
            let e = |i: usize| median(engine.iter().map(|r| r[i]).collect());
            println!(
                "llama-batched-bench, same model and threads (16-token prompts, 32 new tokens): 8 sequences vs 1: generation {:.1} vs {:.1} tok/s, {:.2}×; overall {:.1} vs {:.1}, {:.2}×",
                e(1),
                e(0),
                e(1) / e(0),
                e(3),
                e(2),
                e(3) / e(2)
            );
        }
    }
}
