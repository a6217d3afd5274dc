//! `logitprobe inspect` and `logitprobe tokenize`.

mod common;

use common::{bin, tiny};

fn out(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn inspect_a_gguf() {
    let s = out(&[
        "inspect",
        "--model",
        tiny("tiny-q8_0.gguf").to_str().unwrap(),
    ]);
    for want in [
        "architecture: llama",
        "layers: 2",
        "KV heads: 2",
        "Q8_0",
        "bits per weight",
        "pre-tokenizer smollm",
        "add_bos: false",
        "bos: 1 \"<|im_start|>\"",
        "end-of-generation: 0 \"<|endoftext|>\", 2 \"<|im_end|>\"",
        "chat template: 4 lines",
        "  | {% for message in messages %}",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
}

#[cfg(feature = "onnx")]
#[test]
fn inspect_an_onnx_folder() {
    let s = out(&["inspect", "--model", tiny("genai").to_str().unwrap()]);
    for want in [
        "onnxruntime-genai layout",
        "KV heads: 2",
        "head dim: 16",
        "layers: 2",
        // The builder's symbolic KV dims, as the graph names them.
        "past_key_values.0.key F32 [batch_size, 2, past_sequence_length, kv_cache_dim] (and 3 more like it)",
        "logits F32 [batch, seq, 384]",
        "fused: GroupQueryAttention",
        "--capture-attention does not",
        "F32        23 tensors",
        "end-of-generation: 0 \"<|endoftext|>\", 2 \"<|im_end|>\"",
        "chat template: 4 lines",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
    let s = out(&["inspect", "--model", tiny("optimum").to_str().unwrap()]);
    assert!(s.contains("standard ops only"), "{s}");
}

/// Issue 14 point 10: inspect read an ONNX model by loading it (8.7 s and 940 MB for SmolLM2's
/// twin). It reads the graph's metadata only now: far below the model's size in memory.
#[cfg(feature = "onnx")]
#[test]
fn inspect_reads_no_weights() {
    let twin = common::smollm2_onnx();
    let size = std::fs::metadata(twin.join("model.onnx")).unwrap().len();
    let peak = common::peak_rss_kb(&["inspect", "--model", twin.to_str().unwrap()]) as u64 * 1024;
    assert!(
        peak < size / 4,
        "inspect peaked at {peak} bytes for a {size}-byte model"
    );
}

#[cfg(all(feature = "llama", feature = "onnx"))]
#[test]
fn tokenize_one_and_two_models() {
    let g = tiny("tiny-f32.gguf");
    let s = out(&[
        "tokenize",
        "--model",
        g.to_str().unwrap(),
        "Let there be light",
    ]);
    assert!(s.contains("tokens"), "{s}");
    let o = tiny("optimum");
    let s = out(&[
        "tokenize",
        "--model",
        g.to_str().unwrap(),
        "--model",
        o.to_str().unwrap(),
        "--special",
        "<|im_start|>user 12",
    ]);
    assert!(s.contains("the two tokenizations are identical"), "{s}");
    // Special-token parsing changes the ids: the comparison says where.
    let s = out(&["tokenize", "--model", g.to_str().unwrap(), "<|im_start|>"]);
    assert!(s.lines().count() > 3, "plain text is several tokens: {s}");
}
