//! The ONNX Runtime engine on SmolLM2's ONNX twin (models/export-onnx) and on broken models.
#![cfg(feature = "onnx")]

mod common;

use common::{bad_onnx, cache_dir, run, smollm2_onnx};
use logitprobe::backends::onnx::OnnxSource;
use logitprobe::backends::{EngineOptions, LogitSource, Vocab};
use serde_json::Value;
use std::fs;
use std::path::Path;

fn opts() -> EngineOptions {
    EngineOptions {
        threads: Some(1),
        ..Default::default()
    }
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

#[test]
fn capital_of_france() {
    let mut src = OnnxSource::open(&smollm2_onnx(), &opts()).unwrap();
    assert!(
        !src.info().add_bos,
        "SmolLM2's GGUF adds no BOS, nor does its twin"
    );
    let ids = src
        .tokenize("The capital of France is", src.info().add_bos, false)
        .unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    src.begin(1).unwrap();
    let logits = src.decode(&[(0, &ids)]).unwrap();
    assert_eq!(argmax(logits.row(0)), 7042);
    assert_eq!(src.token_bytes(7042).unwrap(), b" Paris");
    assert_eq!(src.info().eos, Some(2));
    assert!(src.info().eog.contains(&2));
    assert!(src.chat_template().unwrap().contains("im_start"));
    // Special tokens are parsed only when asked.
    assert_eq!(src.tokenize("<|im_start|>", false, true).unwrap(), [1]);
    assert!(src.tokenize("<|im_start|>", false, false).unwrap().len() > 1);
}

#[test]
fn a_padded_batch_equals_single_runs_and_kv_cache_equals_scoring() {
    let mut src = OnnxSource::open(&smollm2_onnx(), &opts()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village far away,",
        "2 + 2 =",
    ]
    .iter()
    .map(|p| src.tokenize(p, false, false).unwrap())
    .collect();
    assert!(prompts[0].len() != prompts[1].len(), "different lengths");
    src.begin(3).unwrap();
    let batch: Vec<(usize, &[u32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.as_slice()))
        .collect();
    let first = src.decode(&batch).unwrap();
    let step: Vec<u32> = (0..3).map(|i| argmax(first.row(i)) as u32).collect();
    let second = src
        .decode(&[(0, &step[0..1]), (1, &step[1..2]), (2, &step[2..3])])
        .unwrap();
    // A finished sequence leaves the batch: the others go on.
    let third_ids = [argmax(second.row(0)) as u32, argmax(second.row(2)) as u32];
    let third = src
        .decode(&[(0, &third_ids[0..1]), (2, &third_ids[1..2])])
        .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut full = p.clone();
        full.push(step[i]);
        let scored = src.score(&full).unwrap();
        let d1 = first
            .row(i)
            .iter()
            .zip(scored.row(p.len() - 1))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let d2 = second
            .row(i)
            .iter()
            .zip(scored.row(p.len()))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d1 < 1e-4,
            "prompt {i}: batched prefill vs single differs by {d1}"
        );
        assert!(
            d2 < 1e-4,
            "prompt {i}: batched decode step vs single differs by {d2}"
        );
    }
    for (r, i) in [0usize, 2].iter().enumerate() {
        let mut full = prompts[*i].clone();
        full.extend([step[*i], third_ids[r]]);
        let scored = src.score(&full).unwrap();
        let d = third
            .row(r)
            .iter()
            .zip(scored.row(full.len() - 1))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "prompt {i} after compaction differs by {d}");
    }
}

#[test]
fn trace_writes_the_same_output_set() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_onnx();
    let o = run(&[
        "trace",
        "--backend",
        "onnx",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in [
        "generated.txt",
        "adaptive_token_trace.csv",
        "adaptive_token_trace.json",
        "run.json",
        "steps.jsonl",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f}");
    }
    let t: Value = serde_json::from_str(
        &fs::read_to_string(tmp.path().join("adaptive_token_trace.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(t["steps"][0]["selected"]["token"], " Paris");
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["engine"], "onnxruntime");
    assert_eq!(run["device"], "cpu");
    assert_eq!(
        run["engine_details"]["execution_provider"],
        "CPUExecutionProvider"
    );
    assert!(run["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

fn bad(model: &Path, extra: &[&str], needle: &str) {
    common::assert_trace_fails("onnx", model.to_str().unwrap(), "t1 t2", extra, needle);
}

#[test]
fn the_tiny_ok_model_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = bad_onnx("ok");
    let o = run(&[
        "trace",
        "--backend",
        "onnx",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "t1 t2",
        "--max-new-tokens",
        "3",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "the control model must load: {}",
        common::stderr(&o)
    );
}

#[test]
fn bad_no_model_onnx() {
    bad(&bad_onnx("no-model"), &[], "no model.onnx");
}

#[test]
fn bad_no_logits_output() {
    bad(&bad_onnx("no-logits"), &[], "has no 'logits' output");
}

#[test]
fn bad_unpaired_kv() {
    bad(&bad_onnx("unpaired-kv"), &[], "do not pair");
}

/// Issue 15 D9: logits of an unexpected shape (no position; a batch of 2 for 1 sequence)
/// panicked with `index < dim`.
#[test]
fn bad_logits_shape_is_an_error_not_a_panic() {
    bad(
        &bad_onnx("empty-logits"),
        &[],
        "the model's logits have shape [1, 0, 8] for a batch of 1 and 2 tokens",
    );
    bad(
        &bad_onnx("batch2-logits"),
        &[],
        "the model's logits have shape [2, 2, 8] for a batch of 1 and 2 tokens",
    );
}

/// Issue 15 D10: ONNX Runtime's own coloured log lines leaked into stderr beside the error
/// (an export whose attention_mask input was renamed failed inside a kernel, and ONNX
/// Runtime's default logger printed two ANSI-coloured lines before our one); issue 32 item
/// 2: it is now refused before any run, naming the input.
#[test]
fn bad_renamed_input_is_one_line() {
    bad(&bad_onnx("renamed-input"), &[], "has no 'input_ids' input");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(common::tiny("optimum")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let model = fs::read(dst.join("model.onnx")).unwrap();
    let (from, to) = (b"attention_mask", b"attention_masq");
    let mut renamed = model.clone();
    for i in 0..model.len() - from.len() {
        if &model[i..i + from.len()] == from {
            renamed[i..i + from.len()].copy_from_slice(to);
        }
    }
    fs::write(dst.join("model.onnx"), renamed).unwrap();
    let o = run(&[
        "trace",
        "--backend",
        "onnx",
        "--model",
        dst.to_str().unwrap(),
        "--prompt",
        "t1",
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    // Refused before the first run (issue 32, item 2), naming the input and the graph's.
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "the user's to fix: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: ")
            && err.contains("input \"attention_masq\" is not one this engine feeds")
            && err.contains("the graph has no attention_mask: was one renamed?")
            && err.contains("the graph's inputs are input_ids, attention_masq"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "no ANSI colours: {err}");
}

#[test]
fn bad_tokenizer_larger_than_logits() {
    bad(
        &bad_onnx("small-logits"),
        &[],
        "the tokenizer defines 10 tokens but the model's logits have 4",
    );
}

#[test]
fn bad_no_onnx_runtime_library() {
    bad(
        &bad_onnx("ok"),
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
        "does not exist",
    );
}

#[test]
fn bad_onnx_runtime_too_old() {
    let old = cache_dir().join("onnxruntime-old/libonnxruntime.so.1.20.1");
    assert!(
        old.is_file(),
        "run models/fetch onnxruntime-old first (scripts/test does)"
    );
    bad(
        &bad_onnx("ok"),
        &["--ort-lib", old.to_str().unwrap()],
        "expected version >= '1.31.x', but got '1.20.1'",
    );
}

#[test]
fn bad_cuda_that_cannot_register() {
    bad(
        &bad_onnx("ok"),
        &["--device", "cuda"],
        "the CUDA execution provider cannot register",
    );
}

#[test]
fn auto_device_picks_cpu_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = bad_onnx("ok");
    let o = run(&[
        "trace",
        "--backend",
        "onnx",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "t1",
        "--device",
        "auto",
        "--max-new-tokens",
        "2",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(
        common::stderr(&o).contains("device auto: CUDA unavailable"),
        "{}",
        common::stderr(&o)
    );
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["device"], "cpu");
}

/// New-user issue, point 5: the engine follows the model path unless --backend says, and a
/// --backend that contradicts the path says which one to use.
#[test]
fn the_engine_follows_the_model_path() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = common::tiny("optimum");
    let o = common::run(&[
        "trace",
        "--model",
        folder.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run.json")).unwrap())
            .unwrap();
    assert_eq!(run["engine"], "onnxruntime", "{run}");
    let gguf = common::tiny("tiny-f32.gguf");
    common::assert_trace_fails(
        "onnx",
        gguf.to_str().unwrap(),
        "hi",
        &[],
        "is a GGUF file: use --backend llama",
    );
    common::assert_trace_fails(
        "llama",
        folder.to_str().unwrap(),
        "hi",
        &[],
        "use --backend onnx",
    );
}

/// A copy of the tiny optimum export with `file` replaced by `content`.
fn tiny_with(file: &str, content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(common::tiny("optimum")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::write(dst.join(file), content).unwrap();
    (tmp, dst)
}

/// Issue 15 D16: an id above u32 wrapped around to another token (4294967303 became 7); a
/// config that is JSON but not an object, or not UTF-8, was taken as absent.
#[test]
fn bad_config_files_are_named_not_ignored() {
    let (_t, m) = tiny_with("config.json", br#"{"eos_token_id": 4294967303}"#);
    bad(
        &m,
        &[],
        "config.json eos_token_id 4294967303 is not a token id",
    );
    let (_t, m) = tiny_with("generation_config.json", br#"{"eos_token_id": [2, -1]}"#);
    bad(
        &m,
        &[],
        "generation_config.json eos_token_id -1 is not a token id",
    );
    let (_t, m) = tiny_with("config.json", b"[]");
    bad(&m, &[], "config.json is JSON but not an object (an array)");
    let (_t, m) = tiny_with("tokenizer_config.json", b"{\"bos_token\": \"\xff\"}");
    bad(&m, &[], "tokenizer_config.json is not UTF-8");
}

/// The tiny genai export as the builder writes it (`past_present_share_buffer`: the KV cache
/// in buffers that GroupQueryAttention appends to in place) and the same export told not to
/// share: the same bits at every step, across the buffer growing past its first 256
/// positions, a slot reused after `clear_slot`, several tokens fed on top of a cache, and
/// scoring.
#[test]
fn shared_kv_buffers_give_the_same_bits_as_a_grown_cache() {
    let genai = common::tiny("genai");
    let config = std::fs::read_to_string(genai.join("genai_config.json")).unwrap();
    assert!(config.contains("\"past_present_share_buffer\": true"));
    let tmp = tempfile::tempdir().unwrap();
    let unshared = tmp.path().join("m");
    std::fs::create_dir_all(&unshared).unwrap();
    for e in std::fs::read_dir(&genai).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), unshared.join(e.file_name())).unwrap();
    }
    std::fs::write(
        unshared.join("genai_config.json"),
        config.replace(
            "\"past_present_share_buffer\": true",
            "\"past_present_share_buffer\": false",
        ),
    )
    .unwrap();
    let mut shared = OnnxSource::open(&genai, &opts()).unwrap();
    let mut grown = OnnxSource::open(&unshared, &opts()).unwrap();
    assert_eq!(
        shared.info().details["kv_cache"],
        "shared past/present buffers (past_present_share_buffer)"
    );
    assert_eq!(grown.info().details["kv_cache"], "present becomes past");
    let prompt = shared
        .tokenize("In the beginning God created", false, false)
        .unwrap();
    let other = shared.tokenize("And the earth was", false, false).unwrap();
    let mut history = Vec::new();
    for src in [&mut shared, &mut grown] {
        src.begin(2).unwrap();
        let mut rows = Vec::new();
        let mut next = prompt.clone();
        // Slot 1 decodes beside slot 0, then is cleared and takes another prompt.
        rows.push(src.decode(&[(0, &next), (1, &other)]).unwrap());
        for step in 0..300 {
            let last = rows.last().unwrap();
            next = vec![argmax(last.row(0)) as u32];
            if step == 10 {
                src.clear_slot(1).unwrap();
                rows.push(src.decode(&[(0, &next), (1, &prompt)]).unwrap());
            } else if step == 20 {
                // Three tokens at once on top of slot 0's cache, logits at every position.
                let three = [next[0], 5, 6];
                rows.push(src.decode_rows(&[(0, &three)], &[true]).unwrap());
            } else {
                rows.push(src.decode(&[(0, &next)]).unwrap());
            }
        }
        let scored = src.score(&[prompt.as_slice(), &other].concat()).unwrap();
        rows.push(scored);
        history.push(rows);
    }
    let (a, b) = (&history[0], &history[1]);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.shape(), y.shape(), "call {i}");
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "call {i}: the shared KV cache changed the logits"
        );
    }
}

/// tokenizers 0.22 panics on a tokenizer.json cut short inside its "decoder" (found by the
/// mutation suite, MUTATION_SEED=8751912148238971813): every cut is a one-line error, exit 2.
#[test]
fn bad_truncated_tokenizer_json_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::tiny("optimum");
    for entry in fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let full = fs::read(src.join("tokenizer.json")).unwrap();
    let decoder = full
        .windows(9)
        .position(|w| w == b"\"decoder\"")
        .expect("the tiny tokenizer has a decoder");
    for cut in [decoder + 12, decoder + 20, full.len() / 2, full.len() - 1] {
        fs::write(tmp.path().join("tokenizer.json"), &full[..cut]).unwrap();
        bad(tmp.path(), &[], "tokenizer.json");
    }
}

/// Issue 32, item 1: a logits row with no finite value (every entry −∞) has no distribution.
/// The sequence it belongs to ends before that step, the others go on, and the run says so
/// on one line and exits 1; nothing in the files looks like a step that was not.
#[test]
fn a_row_of_minus_infinity_ends_its_sequence_and_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = bad_onnx("minus-inf-row"); // the row after token t3 is −∞ everywhere
    let o = run(&[
        "trace",
        "--backend",
        "onnx",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "t1",
        "--prompt",
        "t3",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--no-plots",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: prompt 1 stopped at step 0: its logits row holds no finite value"),
        "{err}"
    );
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1);
    let read = |p: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(tmp.path().join(p)).unwrap()).unwrap()
    };
    let fine = read("prompt-000/adaptive_token_trace.json");
    assert_eq!(
        fine["steps"].as_array().unwrap().len(),
        3,
        "the other prompt went on"
    );
    let broken = read("prompt-001/adaptive_token_trace.json");
    assert!(broken["steps"].as_array().unwrap().is_empty());
    let runj = read("run.json");
    assert_eq!(runj["stop_reasons"]["no_finite_logits"], 1);
    assert_eq!(runj["stop_reasons"]["max_new_tokens"], 1);
    assert_eq!(
        read("prompt-001/run.json")["prompts"][0]["stop_reason"],
        "no_finite_logits"
    );
}
