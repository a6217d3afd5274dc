//! What the comparison math costs on top of scoring, on SmolLM2-135M-Instruct: Q4_1 GGUF on
//! llama.cpp (A) against its fp32 ONNX twin on ONNX Runtime (B), chunks of the shipped corpus.
//!
//! Each round times (1) scoring every chunk with A and then with B, nothing else, and (2) the
//! whole `compare_chunks` (the same scoring plus KL, probe descriptions, ranks, Jaccard).
//! Rounds alternate; the medians and their ratio are printed. Goal: ratio ≤ 1.10.
//!
//! Run: `cargo bench --bench compare` (after models/fetch and models/export-onnx). Set
//! `BENCH_RUNS` (default 3) and `BENCH_CHUNKS` (default 2 chunks of 512 tokens).

mod common;

use common::cache;
use logitprobe::backends::{Backend, EngineOptions, LogitSource, Vocab};
use logitprobe::compare::{self, Timing};
use logitprobe::dist::probe::ProbeConfig;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` also runs benches with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let n_chunks: usize = std::env::var("BENCH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // As `compare` opens its sides.
    let opts = EngineOptions {
        ctx_size: Some(512),
        fast_scoring: true,
        ..Default::default()
    };
    let gguf = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let onnx = cache().join("SmolLM2-135M-Instruct-onnx");
    let mut a = logitprobe::backends::open(Backend::Llama, gguf.to_str().unwrap(), &opts)
        .expect("SmolLM2 GGUF: run models/fetch smollm2");
    let b = logitprobe::backends::open(Backend::Onnx, onnx.to_str().unwrap(), &opts)
        .expect("SmolLM2 ONNX twin: run models/export-onnx");
    let mut bs: Vec<Box<dyn LogitSource>> = vec![b];
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt"),
    )
    .unwrap();
    let ids = a.tokenize(&text, false, false).unwrap();
    let chunks = compare::corpus_chunks(&ids, 512, a.info().bos, false, Some(n_chunks));
    let probe = ProbeConfig::default();

    let (mut score_only, mut whole, mut math) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs {
        let t = Instant::now();
        for c in &chunks {
            std::hint::black_box(a.score_from(&c.ids, c.first).unwrap());
            std::hint::black_box(bs[0].score_from(&c.ids, c.first).unwrap());
        }
        score_only.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut timing = Timing::default();
        let positions = compare::compare_chunks(
            &mut *a,
            &mut bs,
            &chunks,
            &probe,
            None,
            &mut timing,
            &|_| {},
        )
        .unwrap();
        whole.push(t.elapsed().as_secs_f64());
        math.push(timing.metrics_s);
        eprintln!(
            "round {}: scoring alone {:.2} s, compare {:.2} s ({} positions, math {:.2} s)",
            round + 1,
            score_only[round],
            whole[round],
            positions.len(),
            timing.metrics_s
        );
    }
    let (s, w) = (median(score_only), median(whole));
    println!(
        "compare vs scoring alone, SmolLM2 Q4_1 (llama.cpp) vs fp32 twin (ONNX Runtime), {} chunks of 512, median of {runs}:",
        chunks.len()
    );
    println!("  scoring A and B alone: {s:.2} s");
    println!("  whole compare:         {w:.2} s");
    println!("  ratio: {:.3} (goal ≤ 1.10)", w / s);
    // The engines' own timing noise is larger than the math; its share, timed inside the same
    // runs, is the steadier number.
    let m = median(math);
    println!(
        "  comparison math inside compare: {m:.2} s = {:.1} % of it",
        100.0 * m / w
    );
}
