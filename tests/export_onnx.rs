//! models/export-onnx and the GGUF reader on bad files: one line, exit 2, nothing written.

mod common;

use common::{assert_usage_error, smollm2, tiny};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn export(gguf: &Path, out: &Path) -> std::process::Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/export-onnx"))
        .arg(gguf)
        .arg(out)
        .output()
        .unwrap()
}

/// A copy of the tiny f32 GGUF with `edit` applied to its bytes.
fn edited(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = fs::read(tiny("tiny-f32.gguf")).unwrap();
    edit(&mut b);
    let p = dir.join("edited.gguf");
    fs::write(&p, b).unwrap();
    p
}

fn find(b: &[u8], what: &[u8]) -> usize {
    b.windows(what.len())
        .position(|w| w == what)
        .expect("pattern in header")
}

/// Sets the ggml type of `token_embd.weight` (name, n_dims u32, 2 dims u64, then the type).
fn set_tensor_type(b: &mut [u8], t: u32) {
    let at = find(b, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16;
    b[at..at + 4].copy_from_slice(&t.to_le_bytes());
}

fn check(o: &std::process::Output, out: &Path, needle: &str) {
    assert_usage_error(o, needle);
    assert!(!out.join("model.onnx").exists(), "nothing half-written");
}

#[test]
fn export_truncated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.gguf");
    fs::write(&p, &fs::read(smollm2()).unwrap()[..1 << 20]).unwrap();
    let out = tmp.path().join("o");
    check(&export(&p, &out), &out, "truncated or corrupt");
}

#[test]
fn export_not_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    fs::write(&p, "definitely not a model").unwrap();
    let out = tmp.path().join("o");
    check(&export(&p, &out), &out, "is not a GGUF file");
}

#[test]
fn export_unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let p = edited(tmp.path(), |b| {
        let at = find(b, b"\x05\x00\x00\x00\x00\x00\x00\x00llama");
        b[at + 8..at + 13].copy_from_slice(b"gemma");
    });
    let out = tmp.path().join("o");
    check(
        &export(&p, &out),
        &out,
        "architecture 'gemma' is not supported",
    );
}

#[test]
fn export_unsupported_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let p = edited(tmp.path(), |b| set_tensor_type(b, 99));
    let out = tmp.path().join("o");
    check(&export(&p, &out), &out, "tensor type");
}

#[test]
fn export_the_tiny_model_works() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = export(&tiny("tiny-f32.gguf"), &out);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in [
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[cfg(feature = "llama")]
#[test]
fn llama_refuses_an_unknown_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let p = edited(tmp.path(), |b| set_tensor_type(b, 99));
    let o = common::run(&[
        "trace",
        "--backend",
        "llama",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert_usage_error(&o, "ggml type 99 that this logitprobe does not know");
}
