//! Where llama.cpp's two scoring paths part: the same chunk of text scored with the
//! batch-invariant kernels (each row summed as if alone, what generation runs) and with the
//! batched ones (tinyBLAS, repacked weights, tiled flash attention: what llama-perplexity
//! runs), every decoder layer's output read on both, layer by layer.
//!
//! ```sh
//! cargo run --release --example kernel_paths -- MODEL.gguf [MODEL.gguf ...]
//! ```
//!
//! For each model and flash-attention setting it prints, per layer, the largest difference
//! of the layer's output relative to the output's own scale, and the first layer where the
//! two paths differ at all and where they differ beyond f32 rounding (a relative 1e-6); then
//! the logits' largest difference, the mean and largest KL between the two paths'
//! distributions, and how often their top tokens differ. Scoring runs at 1 thread, F16 KV
//! cache (`KV=f32` for an f32 one), 512 tokens of models/corpus/genesis-kjv.txt, the second
//! half scored. `OPS=L` also compares the operations inside layer L (`kq-L`, `kqv_out-L`,
//! `ffn_out-L` ...), to name the one where they part.

use logitprobe::backends::{self, Backend, CaptureSpec, EngineOptions, FlashAttn, Vocab};
use logitprobe::compare::stats;
use ndarray::Array2;

const CHUNK: usize = 512;

/// Each layer's output `[layers][rows × n_embd]`, the named tensors of `OPS`, and the
/// logits, on one path.
struct Pass {
    layers: Vec<Vec<f32>>,
    named: Vec<Option<Vec<f32>>>,
    logits: Array2<f32>,
}

/// The operations inside layer `OPS` (an environment variable) whose outputs are compared,
/// in graph order: llama.cpp's names for a llama-architecture layer.
fn ops() -> Vec<String> {
    let Ok(l) = std::env::var("OPS") else {
        return Vec::new();
    };
    [
        "attn_norm",
        "Qcur",
        "Kcur",
        "Vcur",
        "kq",
        "kq_soft_max",
        "kqv",
        "kqv_out",
        "attn_out",
        "ffn_inp",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_gate_par",
        "ffn_out",
    ]
    .iter()
    .map(|n| format!("{n}-{l}"))
    .collect()
}

fn score(path: &str, batched: bool, flash: FlashAttn, ids: &[u32]) -> anyhow::Result<Pass> {
    let options = EngineOptions {
        threads: Some(1),
        fast_scoring: batched,
        flash_attn: flash,
        ctx_size: Some(CHUNK),
        // KV=f32 keeps the KV cache in f32: whether the paths then meet says what the
        // F16 cache's products do.
        cache_type_k: std::env::var("KV").ok(),
        cache_type_v: std::env::var("KV").ok(),
        ..Default::default()
    };
    let mut src = backends::open(Backend::Llama, path, &options)?;
    let n_layer = src.architecture().map_or(0, |a| a.n_layer);
    src.set_capture(&CaptureSpec {
        hidden_layers: (0..n_layer).collect(),
        named: ops(),
        ..Default::default()
    })?;
    let logits = src.score_from(ids, CHUNK / 2)?;
    let captured = src.take_captured();
    let named = captured
        .first()
        .map(|c| c.named.clone())
        .unwrap_or_default();
    let mut layers = vec![Vec::new(); n_layer];
    for c in &captured {
        let hidden = c.hidden.as_ref().expect("captured layers");
        for (l, row) in hidden.outer_iter().enumerate() {
            layers[l].extend(row.iter());
        }
    }
    Ok(Pass {
        layers,
        named,
        logits,
    })
}

fn main() -> anyhow::Result<()> {
    let models: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        !models.is_empty(),
        "usage: kernel_paths MODEL.gguf [MODEL.gguf ...]"
    );
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt"),
    )?;
    for path in &models {
        let tokenizer = backends::open(Backend::Llama, path, &EngineOptions::default())?;
        let ids: Vec<u32> =
            tokenizer.tokenize(&text, tokenizer.info().add_bos, false)?[..CHUNK].to_vec();
        drop(tokenizer);
        for flash in [FlashAttn::Off, FlashAttn::On] {
            let lone = score(path, false, flash, &ids)?;
            let batched = score(path, true, flash, &ids)?;
            println!("\n{path} · flash attention {flash:?} · batch-invariant vs batched kernels");
            println!(
                "{:>6} {:>14} {:>14}",
                "layer", "max |Δ|", "max |Δ| / max |x|"
            );
            let (mut first_any, mut first_beyond) = (None, None);
            for (l, (x, y)) in lone.layers.iter().zip(&batched.layers).enumerate() {
                let scale = x
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()))
                    .max(f32::MIN_POSITIVE);
                let d = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let rel = d / scale;
                if d > 0.0 && first_any.is_none() {
                    first_any = Some(l);
                }
                if rel > 1e-6 && first_beyond.is_none() {
                    first_beyond = Some(l);
                }
                println!("{l:>6} {d:>14.3e} {rel:>14.3e}");
            }
            for (name, (x, y)) in ops().iter().zip(lone.named.iter().zip(&batched.named)) {
                match (x, y) {
                    (Some(x), Some(y)) if x.len() == y.len() => {
                        let scale = x
                            .iter()
                            .fold(0f32, |m, v| m.max(v.abs()))
                            .max(f32::MIN_POSITIVE);
                        let d = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        println!("{name:>14} {d:>14.3e} {:>14.3e}", d / scale);
                    }
                    _ => println!("{name:>14} {:>14}", "not captured (a view, or not f32)"),
                }
            }
            let (la, lb) = (&lone.logits, &batched.logits);
            let rows = la.nrows() - 1;
            let dl = la
                .iter()
                .zip(lb.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let mut klds = Vec::with_capacity(rows);
            let mut top = 0;
            for r in 0..rows {
                let (x, y) = (la.row(r), lb.row(r));
                let (x, y) = (x.as_slice().unwrap(), y.as_slice().unwrap());
                klds.push(stats::kl_divergence(x, y));
                let argmax = |v: &[f32]| {
                    v.iter()
                        .enumerate()
                        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
                };
                top += usize::from(argmax(x) != argmax(y));
            }
            let mean = klds.iter().sum::<f64>() / rows as f64;
            let max = klds.iter().cloned().fold(0f64, f64::max);
            println!(
                "first layer that differs: {:?}; first beyond f32 rounding (1e-6 of its scale): {:?}",
                first_any, first_beyond
            );
            println!(
                "logits: max |Δ| {dl:.3e}; KL(batch-invariant ‖ batched) mean {mean:.3e}, max {max:.3e}; top token differs at {top} of {rows} positions"
            );
        }
    }
    Ok(())
}
