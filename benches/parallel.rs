//! Batched decoding through the slots of the generation loop: tokens/s of 64 prompts × 32
//! new tokens on SmolLM2-135M-Instruct Q4_1 (llama.cpp) with `--parallel 8` against
//! `--parallel 1`, at 1 and 2 threads, measured side by side (alternating runs, medians).
//! Goal: ≥ 2× at 1 thread, since a batched decode reads the weights once for 8 tokens.
//!
//! Run: `cargo bench --bench parallel` (after models/fetch). `BENCH_RUNS` (default 3)
//! sets the alternations, `BENCH_THREADS` (default "1,2") the thread counts.

mod common;

use common::{cache, runs_and_threads};
use logitprobe::backends::{EngineOptions, LogitSource};
use logitprobe::generate::{self, GenerateConfig, PromptInput};
use logitprobe::probe::ProbeConfig;
use logitprobe::sampler::SamplingConfig;
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
        seed: 1,
        probe_enabled: true,
        logprobs: None,
        prompt_logprobs: false,
        inside: None,
    };
    // End-of-generation is left on: both settings decode exactly the same tokens.
    let mut feed = prompts.into_iter().map(Ok);
    let t = generate::run(
        src,
        &mut feed,
        &cfg,
        parallel,
        &mut [],
        &AtomicBool::new(false),
        &(),
    )
    .unwrap();
    (t.generated_tokens as f64 / t.wall_s, t.decode_tokens_per_s)
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
        let (mut one, mut eight) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            one.push(loop_tps(&mut src, 1));
            eight.push(loop_tps(&mut src, 8));
        }
        let m = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        let (one_all, eight_all) = (m(&one, |x| x.0), m(&eight, |x| x.0));
        let (one_dec, eight_dec) = (m(&one, |x| x.1), m(&eight, |x| x.1));
        println!(
            "llama.cpp Q4_1, {t} thread(s): --parallel 8 {eight_all:.1} tok/s, --parallel 1 {one_all:.1} tok/s, ratio = {:.2}× (decode steps alone: {eight_dec:.1} vs {one_dec:.1} tok/s, {:.2}×)",
            eight_all / one_all,
            eight_dec / one_dec
        );
    }
}
