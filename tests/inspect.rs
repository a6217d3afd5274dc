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
        "chat template: yes",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
}

#[cfg(feature = "onnx")]
#[test]
fn inspect_an_onnx_folder() {
    let s = out(&["inspect", "--model", tiny("genai").to_str().unwrap()]);
    for want in [
        "onnxruntime-genai",
        "kv_heads: 2",
        "logits: float32 x 384",
        "chat template: yes",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
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
