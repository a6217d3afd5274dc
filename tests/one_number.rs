//! One number per token: `trace`, `serve` (echo, at any --parallel), `compare --trace` and the
//! library's `score` give the same logprob for the same model, tokens and engine settings
//! (llama.cpp's batch-invariant kernels everywhere), whatever else shares the batch. The
//! logits are the same bits on every path; trace, compare and score read them through the
//! same probe (0 apart), serve's echo through its logprobs module (within 1e-10).

mod common;

use common::server::{post, Server};
use logitprobe::backends::{self, Backend, EngineOptions};
use logitprobe::dist::probe::{Probe, ProbeConfig};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

/// The largest |Δ| between two lists of logprobs.
fn worst(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// Every path's logprob of each generated token of a 32-token greedy trace of `model`.
fn agree(model: &Path, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let m = model.to_str().unwrap();
    let trace_dir = tmp.path().join("trace");
    let o = common::run(&[
        "trace",
        "--model",
        m,
        "-p",
        "The capital of France is",
        "--temperature",
        "0",
        // Enough tokens that scoring them in one batch crosses ggml's 64-query tile (its
        // tiled flash attention) while trace decodes them one query at a time.
        "--max-new-tokens",
        "96",
        "--ignore-eos",
        "--no-plots",
        "-o",
        trace_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let t = common::trace_json(&trace_dir);
    let prompt: Vec<u32> = t["tokens"]["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let steps = t["steps"].as_array().unwrap();
    let generated: Vec<u32> = steps
        .iter()
        .map(|s| s["selected"]["token_id"].as_u64().unwrap() as u32)
        .collect();
    let traced: Vec<f64> = steps
        .iter()
        .map(|s| s["raw"]["selected_logprob"].as_f64().unwrap())
        .collect();
    let mut ids = prompt.clone();
    ids.extend(&generated);

    // compare --trace: A's logprob of each generated token.
    let out = tmp.path().join("compare");
    let trace_file = trace_dir.join("adaptive_token_trace.json");
    let side = format!("llama:{m}");
    let o = common::run(&[
        "compare",
        "--a",
        &side,
        "--b",
        &side,
        "--trace",
        trace_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let compared: Vec<f64> = report["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["a"]["logprob"].as_f64().unwrap())
        .collect();

    // The library's score.
    let mut src = backends::open(Backend::Llama, m, &EngineOptions::default()).unwrap();
    let logits = src.score(&ids).unwrap();
    let mut probe = Probe::new(ProbeConfig::default());
    let scored: Vec<f64> = (prompt.len()..ids.len())
        .map(|i| {
            let row = logits.row(i - 1);
            let d = probe
                .describe(row.as_slice().unwrap(), 1.0, ids[i])
                .unwrap();
            d.selected_logprob
        })
        .collect();
    drop(src);

    // serve's echo of the ids, alone and among other prompts at --parallel 4.
    let server = Server::start(&["--model", m, "--parallel", "4"]);
    let others: Vec<Vec<u32>> = (1..4).map(|k| ids[..ids.len() - 3 * k].to_vec()).collect();
    let mut echoed = Vec::new();
    for batch in [vec![ids.clone()], [vec![ids.clone()], others].concat()] {
        let (status, resp) = post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": batch, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
        );
        assert_eq!(status, 200, "{resp}");
        let c = resp["choices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["index"] == 0)
            .unwrap();
        let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
        echoed.push(
            lps[prompt.len()..]
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect::<Vec<f64>>(),
        );
    }
    drop(server);

    // Bit for bit through the probe; the server's logprobs module sums in another order.
    let d = [
        ("compare --trace", worst(&traced, &compared), 0.0),
        ("score", worst(&traced, &scored), 0.0),
        ("serve echo", worst(&traced, &echoed[0]), 1e-9),
        (
            "serve echo among 4 at --parallel 4",
            worst(&traced, &echoed[1]),
            1e-9,
        ),
    ];
    for (path, d, bound) in d {
        println!(
            "{name}: trace vs {path}: max |Δ logprob| {d:.2e} over {} tokens",
            traced.len()
        );
        assert!(d <= bound, "{name}: trace vs {path}: {d}");
    }
}

#[test]
fn smollm2_q4_1_gives_one_number_per_token() {
    agree(&common::smollm2(), "SmolLM2 Q4_1");
}

/// F16 weights: generation's lone rows go through logitprobe's one-row copy of tinyBLAS's
/// sums, prompts and chunks through tinyBLAS itself (backends/src/cpu_kernels/tinyblas.rs).
#[test]
fn smollm2_f16_gives_one_number_per_token() {
    agree(&common::smollm2_f16(), "SmolLM2 F16");
}

/// K-quants (Q4_K, Q6_K): prompts and chunks of 8 rows or more run ggml's tiled kernel,
/// fewer rows logitprobe's copy of its sums (backends/src/cpu_kernels/kquants.rs).
#[test]
fn gemma3_q4_k_m_gives_one_number_per_token() {
    let gemma = common::cache_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        gemma.is_file(),
        "{} is missing: run models/fetch gemma3",
        gemma.display()
    );
    agree(&gemma, "Gemma 3 Q4_K_M");
}

#[test]
fn tiny_ggufs_give_one_number_per_token() {
    agree(&common::tiny("tiny-f32.gguf"), "tiny F32");
    agree(&common::tiny("tiny-q8_0.gguf"), "tiny Q8_0");
}
