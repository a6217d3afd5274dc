//! The llama.cpp engine on the real default model, SmolLM2-135M-Instruct Q4_1.
#![cfg(feature = "llama")]

mod common;

use common::{run, smollm2, stderr, tiny, trace_json};
use logitprobe::backends::llama::LlamaSource;
use logitprobe::backends::{EngineOptions, LogitSource, Vocab};
use serde_json::Value;
use std::fs;
use std::path::Path;

fn opts() -> EngineOptions {
    EngineOptions {
        threads: Some(1),
        ctx_size: Some(512),
        ..Default::default()
    }
}

fn trace(out: &Path, extra: &[&str]) {
    let model = smollm2();
    let mut args = vec![
        "trace",
        "--backend",
        "llama",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
    ];
    args.extend(["--ctx-size", "512", "--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
}

#[test]
fn capital_of_france() {
    let mut src = LlamaSource::open(&smollm2(), &opts()).unwrap();
    let ids = src
        .tokenize("The capital of France is", src.info().add_bos, false)
        .unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    src.begin(1).unwrap();
    let logits = src.decode(&[(0, &ids)]).unwrap();
    let row = logits.row(0);
    let top = (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap();
    assert_eq!(top, 7042);
    assert_eq!(src.token_bytes(7042).unwrap(), b" Paris");
    assert_eq!(src.info().n_vocab, 49152);
    assert_eq!(src.info().eos, Some(2));
    assert!(src.chat_template().unwrap().contains("im_start"));
}

#[test]
fn batched_decode_equals_one_by_one_and_scoring() {
    let mut src = LlamaSource::open(&smollm2(), &opts()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village",
        "2 + 2 =",
    ]
    .iter()
    .map(|p| src.tokenize(p, false, false).unwrap())
    .collect();
    src.begin(3).unwrap();
    let batch: Vec<(usize, &[u32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.as_slice()))
        .collect();
    let together = src.decode(&batch).unwrap();
    let next = [(0, &[7042u32][..]), (1, &[11][..]), (2, &[216][..])];
    let together2 = src.decode(&next).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        src.begin(1).unwrap();
        let alone = src.decode(&[(0, p)]).unwrap();
        let max = together
            .row(i)
            .iter()
            .zip(alone.row(0))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(
            max, 0.0,
            "prompt {i}: batched logits differ from one-by-one by {max}"
        );
        let alone2 = src.decode(&[(0, next[i].1)]).unwrap();
        let max = together2
            .row(i)
            .iter()
            .zip(alone2.row(0))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(max, 0.0, "prompt {i}, step 2 (KV cache): differs by {max}");
    }
    // Teacher-forced scoring gives the same last-position logits, within float noise of a
    // different batch shape.
    let scored = src.score(&prompts[0]).unwrap();
    assert_eq!(scored.nrows(), prompts[0].len());
    let last = scored.row(prompts[0].len() - 1);
    let max = last
        .iter()
        .zip(together.row(0))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-3, "scoring differs by {max}");
}

#[test]
fn trace_writes_outputs_and_is_repeatable() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "16",
        "--seed",
        "3",
    ];
    trace(a.path(), &args);
    trace(b.path(), &args);
    for f in [
        "generated.txt",
        "adaptive_token_trace.csv",
        "adaptive_token_trace.json",
        "run.json",
        "steps.jsonl",
    ] {
        assert!(a.path().join(f).is_file(), "{f}");
    }
    assert_eq!(trace_json(a.path()), trace_json(b.path()));
    let t = trace_json(a.path());
    assert_eq!(
        t["tokens"]["prompt_token_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(t["steps"][0]["raw"]["candidates"][0]["token"], " Paris");
    let run: Value =
        serde_json::from_str(&fs::read_to_string(a.path().join("run.json")).unwrap()).unwrap();
    let d = &run["engine_details"];
    assert_eq!(d["flash_attn"], "on (auto)");
    assert_eq!(d["cache_type_k"], "f16");
    assert!(d["tensor_types"]["Q4_1"]["tensors"].as_u64().unwrap() > 100);
    assert!(d["bits_per_weight"].as_f64().unwrap() > 4.0);
    assert!(run["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        run["model_sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
}

#[test]
fn batch_of_three_equals_single_runs() {
    let prompts = [
        "The capital of France is",
        "My favourite colour is",
        "def add(a, b):",
    ];
    for sampled in [false, true] {
        let batch = tempfile::tempdir().unwrap();
        let mut args = vec!["--max-new-tokens", "12", "--seed", "11"];
        if !sampled {
            args.extend(["--temperature", "0"]);
        }
        for p in &prompts {
            args.extend(["--prompt", p]);
        }
        trace(batch.path(), &args);
        for (i, p) in prompts.iter().enumerate() {
            let single = tempfile::tempdir().unwrap();
            let mut args = vec!["--max-new-tokens", "12", "--seed", "11"];
            if !sampled {
                args.extend(["--temperature", "0"]);
            }
            // The sampled stream is keyed by the prompt's index: run prompt i at index i with
            // other text before it.
            let file = single.path().join("p.txt");
            let mut lines = vec!["Hello"; i];
            lines.push(p);
            fs::write(&file, lines.join("\n")).unwrap();
            let out = single.path().join("o");
            if sampled {
                args.extend(["--prompts-file", file.to_str().unwrap()]);
            } else {
                args.extend(["--prompt", p]);
            }
            trace(&out, &args);
            let dir = if sampled && i > 0 {
                out.join(format!("prompt-{i:03}"))
            } else {
                out.clone()
            };
            assert_eq!(
                trace_json(&batch.path().join(format!("prompt-{i:03}"))),
                trace_json(&dir),
                "prompt {i} (sampled: {sampled})"
            );
        }
    }
}

fn bad(model: &Path, extra: &[&str], needle: &str) {
    common::assert_trace_fails("llama", model.to_str().unwrap(), "hi", extra, needle);
}

/// A copy of SmolLM2 with `from` replaced by `to` (same length) in the header.
fn patched(dir: &Path, from: &[u8], to: &[u8]) -> std::path::PathBuf {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(smollm2()).unwrap();
    let header = &mut bytes[..4 << 20];
    let at = header
        .windows(from.len())
        .position(|w| w == from)
        .expect("key in header");
    header[at..at + to.len()].copy_from_slice(to);
    let p = dir.join("patched.gguf");
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_missing_file() {
    bad(Path::new("/nonexistent/model.gguf"), &[], "not found");
}

#[test]
fn bad_truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.gguf");
    let bytes = fs::read(smollm2()).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    bad(&p, &[], "is truncated");
    fs::write(&p, &bytes[..1000]).unwrap();
    bad(&p, &[], "truncated");
}

#[test]
fn bad_not_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    fs::write(&p, "this is not a model at all").unwrap();
    bad(&p, &[], "is not a GGUF file");
}

#[test]
fn bad_unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    // general.architecture = "llama" → "lolma": keys and offsets keep their lengths.
    let p = patched(
        tmp.path(),
        b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
        b"\x05\x00\x00\x00\x00\x00\x00\x00lolma",
    );
    bad(&p, &[], "architecture 'lolma' is unknown");
}

#[test]
fn bad_prompt_longer_than_context() {
    let long = "word ".repeat(400);
    bad(
        &smollm2(),
        &["--ctx-size", "64", "--prompt", &long],
        "raise --ctx-size",
    );
}

#[test]
fn bad_gpu_layers_without_gpu_build() {
    bad(&smollm2(), &["--n-gpu-layers", "10"], "needs a GPU build");
}

#[test]
fn bad_chat_template_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = patched(
        tmp.path(),
        b"tokenizer.chat_template",
        b"tokenizer.chat_templatX",
    );
    bad(&p, &["--use-chat-template"], "has no chat template");
}

/// Issue 15 D15: an unbounded --threads took 30 s for 2 tokens at 1000 and hung at 100000.
#[test]
fn bad_thread_counts_name_the_machines_cpus() {
    let tiny = common::tiny("tiny-f32.gguf");
    for (flag, n) in [
        ("--threads", "100000"),
        ("--threads-batch", "1000"),
        ("--threads", "0"),
    ] {
        bad(&tiny, &[flag, n], "logical CPUs");
    }
}

/// --threads-batch sets prompt processing apart from generation, and run.json says both.
#[test]
fn threads_batch_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::tiny("tiny-f32.gguf");
    let o = run(&[
        "trace",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--threads",
        "1",
        "--threads-batch",
        "2",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["engine_details"]["threads"], 1);
    assert_eq!(run["engine_details"]["threads_batch"], 2);
}

/// The tiny f32 GGUF rewritten by `change`, in its own folder.
fn mutated(
    change: impl FnOnce(&mut common::gguf::Gguf),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = common::gguf::Gguf::read(&common::tiny("tiny-f32.gguf"));
    change(&mut g);
    let p = tmp.path().join("mutated.gguf");
    g.write(&p);
    (tmp, p)
}

/// Issue 15 D1 and D2: metadata the header check let through made llama.cpp abort (SIGABRT)
/// or llama-cpp-2 panic. Each is now a one-line error, exit 2.
#[test]
fn bad_metadata_llama_cpp_would_abort_on() {
    use common::gguf::Val;
    type Change = Box<dyn Fn(&mut common::gguf::Gguf)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "no layers",
            Box::new(|g| {
                g.set("llama.block_count", Val::U32(0));
            }),
            "llama.block_count is 0, outside the 1 to 512 layers",
        ),
        (
            "513 layers",
            Box::new(|g| {
                g.set("llama.block_count", Val::U32(513));
            }),
            "llama.block_count is 513",
        ),
        (
            "alignment 1",
            Box::new(|g| {
                g.set("general.alignment", Val::U32(1));
            }),
            "general.alignment is 1, not a power of two of at least 8",
        ),
        (
            "negative epsilon",
            Box::new(|g| {
                g.set("llama.attention.layer_norm_rms_epsilon", Val::F32(-1.0));
            }),
            "layer_norm_rms_epsilon is -1, not a positive number",
        ),
        (
            "NaN epsilon",
            Box::new(|g| {
                g.set("llama.attention.layer_norm_rms_epsilon", Val::F32(f32::NAN));
            }),
            "layer_norm_rms_epsilon is NaN",
        ),
        (
            "duplicate token",
            Box::new(|g| {
                let t = g.tokens_mut();
                t[20] = t[19].clone();
            }),
            "token 20 of tokenizer.ggml.tokens repeats token 19",
        ),
        (
            "non-UTF-8 token",
            Box::new(|g| {
                g.tokens_mut()[30] = Val::Str(vec![0xff, 0xfe]);
            }),
            "token 30 of tokenizer.ggml.tokens is not UTF-8",
        ),
        (
            "no tokenizer",
            Box::new(|g| {
                g.set("tokenizer.ggml.model", Val::Str(b"none".to_vec()));
            }),
            "the file has no tokenizer",
        ),
        (
            "SentencePiece on BPE",
            Box::new(|g| {
                g.set("tokenizer.ggml.model", Val::Str(b"llama".to_vec()));
            }),
            "lacks its byte tokens",
        ),
        (
            "context 2^31",
            Box::new(|g| {
                g.set("llama.context_length", Val::U64(1 << 31));
            }),
            "llama.context_length is 2147483648",
        ),
    ];
    for (what, change, needle) in cases {
        let (_t, p) = mutated(change);
        let o = run(&[
            "trace",
            "--model",
            p.to_str().unwrap(),
            "--prompt",
            "a",
            "--out",
            _t.path().join("out").to_str().unwrap(),
        ]);
        assert!(o.status.code().is_some(), "{what}: killed by a signal");
        common::assert_usage_error(&o, needle);
        assert!(
            !_t.path().join("out/run.json").exists(),
            "{what}: nothing written"
        );
    }
}

/// Issue 15 D3: a corrupt key quoted raw put kilobytes of binary into the "one line".
#[test]
fn a_corrupt_key_is_quoted_short_and_escaped() {
    use common::gguf::Val;
    let (_t, p) = mutated(|g| {
        let key: String = (0..5000).map(|i| char::from(1 + (i % 30) as u8)).collect();
        g.kv.push((key, Val::Raw(99, Vec::new())));
    });
    let o = run(&["inspect", "--model", p.to_str().unwrap()]);
    common::assert_usage_error(&o, "unknown metadata value type 99");
    let err = common::stderr(&o);
    assert!(err.len() < 600, "{} bytes: {err}", err.len());
    assert!(err.contains("\\u{1}\\u{2}"), "escaped: {err}");
    assert!(err.contains("(5000 bytes)"), "{err}");
}

/// Issue 15 D4: llama.cpp's refusals said only "null result from llama cpp"; its log line
/// with the reason is in the message now.
#[test]
fn llama_cpp_s_own_reason_is_in_the_message() {
    use common::gguf::Val;
    let (_t, p) = mutated(|g| {
        g.set("llama.embedding_length", Val::U32(32));
    });
    let o = run(&[
        "trace",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "a",
        "--out",
        _t.path().join("out").to_str().unwrap(),
    ]);
    common::assert_usage_error(&o, "invalid n_rot: 16, expected 8");
    assert!(
        !common::stderr(&o).contains("null result"),
        "{}",
        common::stderr(&o)
    );
}

/// Issue 15 D5: more sequences in one decode than --batch-size aborted llama.cpp
/// (`n_outputs_max <= cparams.n_outputs_max`), also when the batch is clamped to the context.
#[test]
fn more_sequences_than_the_batch_size_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny("tiny-f32.gguf");
    let out = tmp.path().join("three");
    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--prompt",
        "c",
        "--max-new-tokens",
        "2",
        "--batch-size",
        "2",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(out.join("prompt-002/run.json").is_file());
    let prompts = tmp.path().join("p.txt");
    fs::write(
        &prompts,
        (0..129).map(|i| format!("p {i}\n")).collect::<String>(),
    )
    .unwrap();
    let out = tmp.path().join("many");
    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--parallel",
        "129",
        "--max-new-tokens",
        "2",
        "--ctx-size",
        "128",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(out.join("prompt-128/run.json").is_file());
}

/// Issue 14 point 6: run.json names the llama.cpp this build carries, and the name cannot go
/// stale: the crate version it states is the one Cargo.lock pins.
#[test]
fn run_json_names_the_llama_cpp_build() {
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let pinned = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .expect("llama-cpp-sys-2 in Cargo.lock");
    assert_eq!(pinned, logitprobe::backends::llama::LLAMA_CPP_SYS_VERSION);
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "trace",
        "--model",
        tiny("tiny-f32.gguf").to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
        "--no-plots",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("run.json")).unwrap()).unwrap();
    let b = &r["engine_details"]["llama_cpp_build"];
    assert_eq!(b["crate"], format!("llama-cpp-sys-2 {pinned}"));
    assert_eq!(b["llamafile"], "ON");
    // The link noted llama.cpp's CPU backend (backends/src/cpu_kernels.rs): generation runs
    // the batch-invariant kernels (tests/many_prompts.rs checks what they are for).
    assert_eq!(r["engine_details"]["cpu_kernels"], "batch-invariant");
    assert!(b["ggml_version"].as_str().unwrap().starts_with("0."), "{b}");
    assert!(b["system_info"].as_str().unwrap().contains("CPU"), "{b}");
}

/// Issue 14 point 3: after a run with several threads, logitprobe measures one thread's decode
/// rate on the machine as it is now, and says to use --threads 1 when the run was far slower
/// (at a terminal; LOGITPROBE_HINTS=1 asks for it, and prints both rates).
#[test]
fn several_threads_are_measured_against_one() {
    let tmp = tempfile::tempdir().unwrap();
    let o = common::bin()
        .env("LOGITPROBE_HINTS", "1")
        .args([
            "trace",
            "--model",
            tiny("tiny-f32.gguf").to_str().unwrap(),
            "--prompt",
            "In the beginning",
            "--max-new-tokens",
            "8",
            // Eight steps whatever the tiny model samples (its end token is likely).
            "--ignore-eos",
            "--threads",
            "2",
            "--no-plots",
            "--out",
            tmp.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("threads: 2 decoded "))
        .unwrap_or_else(|| panic!("no measurement in: {err}"));
    let one: f64 = line
        .split("one thread decodes ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(one > 0.0, "{line}");
    // The trace itself is untouched by the measurement.
    let t = trace_json(tmp.path());
    assert_eq!(t["steps"].as_array().unwrap().len(), 8);
}

/// Issue 31, item 3: without --ctx-size the context is fitted to the job before prompts are
/// checked, up to the model's trained context (SmolLM2: 8192), not capped at 4096; a prompt
/// past the trained context is refused at once, naming it.
#[test]
fn a_long_prompt_fits_the_context_up_to_the_trained_one() {
    let tmp = tempfile::tempdir().unwrap();
    let m = common::smollm2();
    let trace = |words: usize, out: &str| {
        run(&[
            "trace",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            &"word ".repeat(words),
            "--max-new-tokens",
            "1",
            "--no-plots",
            "--out",
            tmp.path().join(out).to_str().unwrap(),
        ])
    };
    let o = trace(5000, "long");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("long/run.json")).unwrap()).unwrap();
    assert!(run_json["prompts"][0]["prompt_tokens"].as_u64().unwrap() > 4096);
    assert!(run_json["n_ctx"].as_u64().unwrap() > 4096);
    let o = trace(8300, "too-long");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("more than the model's trained context of 8192"),
        "{}",
        common::stderr(&o)
    );
}
