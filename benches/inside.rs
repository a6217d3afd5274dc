//! What looking inside the model costs, on SmolLM2-135M-Instruct (30 layers), measured side
//! by side in one run (alternating runs, medians) and printed as ratios:
//!
//! - decode tokens/s with the logit lens on every layer vs off, llama.cpp (Q4_1 GGUF) and ONNX
//!   Runtime (the fp32 twin);
//! - the same with attention summaries on every layer (llama.cpp without flash attention, the
//!   ONNX twin's standard-op attention), against a run without flash attention;
//! - the lens's own arithmetic: the head product and the distributions, per step.
//!
//! Run: `cargo bench --bench inside` (after models/fetch and models/export-onnx). Set
//! `BENCH_RUNS` (default 3) and `BENCH_THREADS` (default "1,2").

mod common;

use common::{cache, decode_once, runs_and_threads};
use logitprobe::backends::{Backend, EngineOptions, FlashAttn, LogitSource};
use logitprobe::lens::{Inside, InsideConfig, Layers};
use std::sync::Arc;
use std::time::Instant;

const NEW_TOKENS: usize = 48;

/// Decode tokens/s of one generation, and the seconds spent sampling, probing and in the lens.
fn decode(src: &mut dyn LogitSource, inside: Option<Arc<Inside>>) -> (f64, f64) {
    let t = decode_once(src, NEW_TOKENS, true, inside);
    (t.decode_tokens_per_s, t.probe_s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn open(backend: Backend, model: &str, threads: usize, flash: FlashAttn) -> Box<dyn LogitSource> {
    let opts = EngineOptions {
        threads: Some(threads),
        ctx_size: Some(256),
        flash_attn: flash,
        ..Default::default()
    };
    logitprobe::backends::open(backend, model, &opts).unwrap()
}

fn with(src: &mut dyn LogitSource, lens: bool, attention: bool) -> Arc<Inside> {
    let cfg = InsideConfig {
        lens: lens.then_some((Layers::All, 8)),
        lens_prompt: false,
        attention: attention.then_some((Layers::All, 8)),
    };
    Arc::new(Inside::prepare(src, &cfg).unwrap())
}

fn main() {
    // `cargo test --all-targets` also runs benches, without --bench: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("inside bench: run with `cargo bench --bench inside`");
        return;
    }
    let (runs, threads) = runs_and_threads(3);
    let gguf = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let onnx = cache().join("SmolLM2-135M-Instruct-onnx");
    assert!(
        gguf.is_file() && onnx.join("model.onnx").is_file(),
        "run models/fetch and models/export-onnx first"
    );
    println!("SmolLM2-135M-Instruct, {NEW_TOKENS} new tokens, decode tok/s, medians of {runs}");
    for &t in &threads {
        for (name, backend, model) in [
            ("llama.cpp Q4_1", Backend::Llama, gguf.to_str().unwrap()),
            ("ONNX Runtime fp32", Backend::Onnx, onnx.to_str().unwrap()),
        ] {
            // Attention needs flash attention off on llama.cpp: its baseline is off too.
            let mut plain = open(backend, model, t, FlashAttn::Off);
            let mut lens = open(backend, model, t, FlashAttn::Off);
            let lens_inside = with(&mut *lens, true, false);
            let mut attn = open(backend, model, t, FlashAttn::Off);
            let attn_inside = with(&mut *attn, false, true);
            let (mut off, mut on, mut at, mut lens_s) = (vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                off.push(decode(&mut *plain, None).0);
                let (tps, probe_s) = decode(&mut *lens, Some(lens_inside.clone()));
                on.push(tps);
                lens_s.push(probe_s / NEW_TOKENS as f64);
                at.push(decode(&mut *attn, Some(attn_inside.clone())).0);
            }
            let (off, on, at) = (median(off), median(on), median(at));
            println!(
                "{t} thread{} {name:<18} off {off:>6.1}  lens (30 layers) {on:>6.1} ({:.2}×)  attention (30 layers) {at:>6.1} ({:.2}×); sampling, probe and lens {:.1} ms/step",
                if t == 1 { " " } else { "s" },
                on / off,
                at / off,
                1e3 * median(lens_s)
            );
        }
    }
    // The lens's arithmetic alone: 30 layer outputs through SmolLM2's head (49,152 × 576).
    let mut src = open(Backend::Llama, gguf.to_str().unwrap(), 1, FlashAttn::Auto);
    let head = src.lens_head().unwrap();
    let hidden = ndarray::Array2::<f32>::from_shape_fn((30, head.n_embd()), |(i, j)| {
        ((i * 7 + j * 13) % 17) as f32 / 17.0 - 0.5
    });
    let t0 = Instant::now();
    let n = 5;
    for _ in 0..n {
        std::hint::black_box(head.logits(hidden.view()));
    }
    println!(
        "lens head product, 30 rows through 49,152 × 576 (Q8_0 rows, llama.cpp's kernels): {:.1} ms",
        1e3 * t0.elapsed().as_secs_f64() / n as f64
    );
}
