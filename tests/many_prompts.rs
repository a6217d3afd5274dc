//! Many prompts through a bounded, refilled set of slots: traces independent of
//! `--parallel`, stable prompt identity, memory independent of the prompt count, `--stop`,
//! and the bad inputs of the loop.

mod common;

use common::{assert_usage_error, run, smollm2, stderr};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny")
        .join(name)
}

/// A prompts file of `n` distinct prompts of a few different lengths.
fn prompts_file(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "the", "river", "of", "light", "and", "stone", "under", "a", "sky",
    ];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let len = 1 + i % 7;
            let mut s = format!("Line {i}:");
            for k in 0..len {
                s.push(' ');
                s.push_str(words[(i * 3 + k) % words.len()]);
            }
            s
        })
        .collect();
    let p = dir.join("prompts.txt");
    fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn trace_ok(args: &[&str]) {
    let o = run(&[&["trace"], args].concat());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A trace with its timestamp removed.
fn trace_at(dir: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("adaptive_token_trace.json")).unwrap())
            .unwrap();
    v["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("generated_at");
    v
}

fn parallel_does_not_change_traces(backend: &str, model: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let file = prompts_file(tmp.path(), 24);
    let model = model.to_str().unwrap();
    let mut outs = Vec::new();
    for p in ["1", "4", "16"] {
        let out = tmp.path().join(format!("p{p}"));
        trace_ok(&[
            "--backend",
            backend,
            "--model",
            model,
            "--prompts-file",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--seed",
            "3",
            "--parallel",
            p,
            "--no-plots",
            "--out",
            out.to_str().unwrap(),
        ]);
        outs.push(out);
    }
    for i in 0..24 {
        let name = format!("prompt-{i:03}");
        let a = trace_at(&outs[0].join(&name));
        for out in &outs[1..] {
            assert_eq!(a, trace_at(&out.join(&name)), "{backend} {name} in {out:?}");
        }
    }
    // Prompt 17 alone, at its index (blank lines keep their numbers), gives the same trace.
    let alone_file = tmp.path().join("alone.txt");
    let line = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .nth(17)
        .unwrap()
        .to_string();
    fs::write(&alone_file, format!("{}{line}\n", "\n".repeat(17))).unwrap();
    let alone = tmp.path().join("alone");
    trace_ok(&[
        "--backend",
        backend,
        "--model",
        model,
        "--prompts-file",
        alone_file.to_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--no-plots",
        "--out",
        alone.to_str().unwrap(),
    ]);
    assert_eq!(trace_at(&outs[1].join("prompt-017")), trace_at(&alone));
}

#[test]
fn parallel_does_not_change_traces_llama() {
    parallel_does_not_change_traces("llama", &tiny("tiny-f32.gguf"));
}

#[test]
fn parallel_does_not_change_traces_llama_q8_0() {
    parallel_does_not_change_traces("llama", &tiny("tiny-q8_0.gguf"));
}

#[test]
fn parallel_does_not_change_traces_onnx() {
    parallel_does_not_change_traces("onnx", &tiny("optimum"));
}

#[test]
fn parallel_does_not_change_traces_smollm2() {
    parallel_does_not_change_traces("llama", &smollm2());
}

fn memory_does_not_grow_with_the_prompt_count(backend: &str, model: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for n in [200, 2000] {
        let dir = tmp.path().join(format!("n{n}"));
        fs::create_dir(&dir).unwrap();
        let file = prompts_file(&dir, n);
        let out = dir.join("out");
        let peak = common::peak_rss_kb(&[
            "trace",
            "--backend",
            backend,
            "--model",
            model.to_str().unwrap(),
            "--prompts-file",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "4",
            "--seed",
            "1",
            "--no-plots",
            "--out",
            out.to_str().unwrap(),
        ]);
        let folders = fs::read_dir(&out)
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                e.file_name().to_string_lossy().starts_with("prompt-")
                    && e.path().join("adaptive_token_trace.json").is_file()
            })
            .count();
        assert_eq!(folders, n, "{backend}: one complete folder per prompt");
        let width = if n == 2000 { 4 } else { 3 };
        assert!(out
            .join(format!("prompt-{:0width$}", n - 1, width = width))
            .is_dir());
        let summary = fs::read_to_string(out.join("summary.csv")).unwrap();
        assert_eq!(summary.lines().count(), n + 1, "a summary row per prompt");
        println!("{backend}: {n} prompts, peak RSS {peak} KB");
        peaks.push(peak as f64);
    }
    let ratio = peaks[1] / peaks[0];
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{backend}: peak RSS {} KB for 2000 prompts vs {} KB for 200 (ratio {ratio:.3})",
        peaks[1],
        peaks[0]
    );
}

#[test]
fn memory_does_not_grow_with_the_prompt_count_llama() {
    memory_does_not_grow_with_the_prompt_count("llama", &tiny("tiny-f32.gguf"));
}

#[test]
fn memory_does_not_grow_with_the_prompt_count_onnx() {
    memory_does_not_grow_with_the_prompt_count("onnx", &tiny("optimum"));
}

#[test]
fn stop_ends_one_sequence_at_the_string() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "--backend",
        "test",
        "--model",
        "1000:5:-100",
        "--prompt",
        "The cat",
        "--prompt",
        "A dog",
        "--max-new-tokens",
        "40",
        "--temperature",
        "0",
        "--no-plots",
    ];
    let free = tmp.path().join("free");
    trace_ok(&[&base[..], &["--out", free.to_str().unwrap()]].concat());
    let text0 = fs::read_to_string(free.join("prompt-000/generated.txt")).unwrap();
    let gen0 = trace_at(&free.join("prompt-000"))["metadata"]["generated_text"]
        .as_str()
        .unwrap()
        .to_string();
    let gen1 = trace_at(&free.join("prompt-001"))["metadata"]["generated_text"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string from the middle of prompt 0's continuation that prompt 1's lacks.
    let cont0 = &gen0["The cat".len()..];
    let chars: Vec<char> = cont0.chars().collect();
    let stop = (5..chars.len() - 3)
        .map(|i| chars[i..i + 3].iter().collect::<String>())
        .find(|s| !gen1.contains(s.as_str()) && cont0.find(s.as_str()).unwrap() >= 5)
        .expect("a stop string only prompt 0 generates");
    let cut = tmp.path().join("cut");
    trace_ok(
        &[
            &base[..],
            &["--stop", &stop, "--out", cut.to_str().unwrap()],
        ]
        .concat(),
    );
    let t0 = trace_at(&cut.join("prompt-000"));
    let want = format!("The cat{}", &cont0[..cont0.find(stop.as_str()).unwrap()]);
    assert_eq!(t0["metadata"]["generated_text"], want.as_str());
    assert!(!t0["metadata"]["generated_text"]
        .as_str()
        .unwrap()
        .contains(&stop));
    assert!(text0.contains(&stop));
    let steps = t0["steps"].as_array().unwrap().len();
    assert!(steps < 40, "prompt 0 stopped early ({steps} steps)");
    assert_eq!(
        trace_at(&cut.join("prompt-001")),
        trace_at(&free.join("prompt-001")),
        "the other sequence is untouched"
    );
    let run: Value =
        serde_json::from_str(&fs::read_to_string(cut.join("prompt-000/run.json")).unwrap())
            .unwrap();
    assert_eq!(run["prompts"][0]["stop_reason"], "stop_string");
    let summary = fs::read_to_string(cut.join("summary.csv")).unwrap();
    assert!(summary.contains("stop_string"), "{summary}");
}

#[test]
fn bad_parallel_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompt",
        "hi",
        "--parallel",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "--parallel 0");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn bad_parallel_whose_kv_cache_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // 256 slots × 8192 tokens × 30 layers × (K + V) × 192 × f16 = 45 GiB.
    let o = run(&[
        "trace",
        "--backend",
        "llama",
        "--model",
        smollm2().to_str().unwrap(),
        "--prompt",
        "hi",
        "--parallel",
        "256",
        "--ctx-size",
        "8192",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "lower --parallel or --ctx-size");
    let err = stderr(&o);
    assert!(err.contains("45.0 GiB"), "says how much it needs: {err}");
    assert!(!out.join("steps.jsonl").exists(), "nothing half-written");
    let o = run(&[
        "trace",
        "--backend",
        "llama",
        "--model",
        tiny("tiny-f32.gguf").to_str().unwrap(),
        "--prompt",
        "hi",
        "--parallel",
        "300",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "use --parallel 256 or less");
}

#[test]
fn bad_prompts_file_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.jsonl");
    fs::write(
        &file,
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n{\"prompt\": \"c\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompts-file",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "line 3: not a JSONL prompt");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn a_thousand_prompts_on_llama_use_a_bounded_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let file = prompts_file(tmp.path(), 1000);
    let out = tmp.path().join("out");
    trace_ok(&[
        "--backend",
        "llama",
        "--model",
        tiny("tiny-f32.gguf").to_str().unwrap(),
        "--prompts-file",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "2",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ]);
    let run: Value =
        serde_json::from_str(&fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["parallel"], 8, "the default: at most 8");
    assert_eq!(run["timings"]["prompts"], 1000);
}

/// New-user issue, point 2: without --ctx-size a slot's context is sized for the job (its
/// longest prompt plus --max-new-tokens, in llama.cpp's 256-cell steps), not the model's 4096:
/// the same tokens and traces at a fraction of the memory. On SmolLM2, 8 slots: 50 chat
/// prompts × 16 tokens peaked at 881 MB with the model's context and 217 MB fitted.
#[test]
fn the_context_fits_the_job_unless_ctx_size_says() {
    let tmp = tempfile::tempdir().unwrap();
    let file = prompts_file(tmp.path(), 16);
    let model = smollm2();
    let mut peaks = Vec::new();
    for (name, ctx) in [("fitted", None), ("model", Some("4096"))] {
        let out = tmp.path().join(name);
        let mut args = vec![
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--prompts-file",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
            "--no-plots",
            "--parallel",
            "8",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(c) = ctx {
            args.extend(["--ctx-size", c]);
        }
        peaks.push(common::peak_rss_kb(&args));
    }
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("fitted/run.json")).unwrap())
            .unwrap();
    assert_eq!(run["engine_details"]["n_ctx"], 256, "fitted to the job");
    for i in 0..16 {
        let p = format!("prompt-{i:03}");
        let a = trace_at(&tmp.path().join("fitted").join(&p));
        let b = trace_at(&tmp.path().join("model").join(&p));
        let ids = |v: &Value| -> Vec<Value> {
            v["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["selected"]["token_id"].clone())
                .collect()
        };
        assert!(
            a["steps"] == b["steps"],
            "{p}: the steps differ with the context size: {:?} vs {:?}, entropy {} vs {}",
            ids(&a),
            ids(&b),
            a["steps"][0]["raw"]["entropy"],
            b["steps"][0]["raw"]["entropy"]
        );
    }
    assert!(
        peaks[0] * 2 < peaks[1],
        "peak RSS {} kB fitted vs {} kB with the model's context",
        peaks[0],
        peaks[1]
    );
}

/// `--ignore-eos` (llama.cpp's flag, vLLM's and llama-server's `ignore_eos`): every prompt
/// runs to --max-new-tokens, and the steps up to where end-of-generation used to stop a
/// prompt are the same steps.
#[test]
fn ignore_eos_runs_every_prompt_to_max_new_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let file = prompts_file(tmp.path(), 4);
    let trace_to = |out: &Path, extra: &[&str]| {
        let args = [
            &[
                "--backend",
                "test",
                // A large end-of-sequence bias: without --ignore-eos every prompt ends early.
                "--model",
                "400:1:6",
                "--prompts-file",
                file.to_str().unwrap(),
                "--max-new-tokens",
                "12",
                "--seed",
                "1",
                "--no-plots",
                "--out",
                out.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        trace_ok(&args);
        let run: Value =
            serde_json::from_str(&fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        run
    };
    let (stopping, going) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = trace_to(&stopping, &[]);
    let b = trace_to(&going, &["--ignore-eos"]);
    assert_eq!(a["stop_reasons"]["end_of_generation"], 4, "{a}");
    assert!(a.get("ignore_eos").is_none(), "off is not written");
    assert_eq!(b["stop_reasons"]["max_new_tokens"], 4, "{b}");
    assert_eq!(b["timings"]["generated_tokens"], 4 * 12);
    assert_eq!(b["ignore_eos"], true);
    for p in 0..4 {
        let dir = format!("prompt-{p:03}");
        let (sa, sb) = (trace_at(&stopping.join(&dir)), trace_at(&going.join(&dir)));
        let (sa, sb) = (
            sa["steps"].as_array().unwrap(),
            sb["steps"].as_array().unwrap(),
        );
        assert!(
            sa.len() < 12 && sb.len() == 12,
            "{dir}: {} and {}",
            sa.len(),
            sb.len()
        );
        assert_eq!(
            sa[..],
            sb[..sa.len()],
            "{dir}: the same steps up to the end"
        );
    }
}

/// Issue 31, item 5: prompts from standard input, a process substitution and a FIFO give the
/// traces a file gives; a FIFO nothing writes to is refused after a bounded wait.
#[test]
fn prompts_stream_from_stdin_a_pipe_and_a_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "{\"prompt\": \"a\"}\n\nplain words\n";
    let file = tmp.path().join("p.jsonl");
    fs::write(&file, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_logitprobe");
    let common = "--backend test --model 300:0 --max-new-tokens 4 --seed 5 --no-plots";
    let trace = |name: &str, from: &str| {
        let out = tmp.path().join(name);
        let line = format!("{bin} trace {common} --out {} {from}", out.display());
        let o = std::process::Command::new("bash")
            .args(["-c", &line])
            .output()
            .unwrap();
        assert!(o.status.success(), "{line}: {}", stderr(&o));
        out
    };
    let read = |out: &Path, i: usize| {
        let mut t: Value = serde_json::from_str(
            &fs::read_to_string(out.join(format!("prompt-00{i}/adaptive_token_trace.json")))
                .unwrap(),
        )
        .unwrap();
        t["metadata"]["generated_at"] = Value::Null;
        t
    };
    let plain = trace("file", &format!("--prompts-file {}", file.display()));
    let stdin = trace(
        "stdin",
        &format!("--prompts-file - < <(cat {})", file.display()),
    );
    let substituted = trace(
        "substituted",
        &format!("--prompts-file <(cat {})", file.display()),
    );
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let fed = trace(
        "fed",
        &format!(
            "--prompts-file {0} & (sleep 1; cat {1} > {0}); wait $!",
            fifo.display(),
            file.display()
        ),
    );
    for out in [&stdin, &substituted, &fed] {
        // Line numbers are the prompts' indices, blank line included, as from the file.
        for i in [0, 2] {
            assert_eq!(read(out, i), read(&plain, i), "{}", out.display());
        }
        assert!(!out.join("prompt-001").exists());
    }

    // Nothing writes to the FIFO: refused after the wait, naming what it waited for.
    let out = tmp.path().join("nobody");
    let t = std::time::Instant::now();
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompts-file",
        fifo.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "is a FIFO that nothing wrote to in 10 s");
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    assert!(!out.exists(), "nothing written");
}

/// A long prompt goes through the loop in chunks of the engine's batch (one call each, while
/// the other slots decode), which shows prompt progress: its trace is the one of a prompt fed
/// whole, alone or beside others.
fn chunked_prompts_keep_their_numbers(model: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let long = |i: usize| {
        (0..40 + 25 * i)
            .map(|k| format!("w{}", (k * 7 + i) % 13))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let lines = [
        long(3),
        "A short one.".into(),
        long(1),
        long(5),
        "Another.".into(),
    ];
    let file = tmp.path().join("prompts.txt");
    fs::write(&file, lines.join("\n") + "\n").unwrap();
    let model = model.to_str().unwrap();
    let mut outs = Vec::new();
    // Batches of 4096: every prompt whole; of 16 and 64: long prompts in many calls.
    for (batch, parallel) in [("4096", "1"), ("16", "1"), ("16", "3"), ("64", "5")] {
        let out = tmp.path().join(format!("b{batch}-p{parallel}"));
        trace_ok(&[
            "--backend",
            "llama",
            "--model",
            model,
            "--prompts-file",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--seed",
            "7",
            "--batch-size",
            batch,
            "--parallel",
            parallel,
            "--threads",
            "1",
            "--no-plots",
            "--out",
            out.to_str().unwrap(),
        ]);
        outs.push(out);
    }
    for i in 0..lines.len() {
        let name = format!("prompt-{i:03}");
        let a = trace_at(&outs[0].join(&name));
        for out in &outs[1..] {
            assert_eq!(a, trace_at(&out.join(&name)), "{name} in {out:?}");
        }
    }
}

#[test]
fn chunked_prompts_keep_their_numbers_llama() {
    chunked_prompts_keep_their_numbers(&tiny("tiny-f32.gguf"));
}

#[test]
fn chunked_prompts_keep_their_numbers_llama_q8_0() {
    chunked_prompts_keep_their_numbers(&tiny("tiny-q8_0.gguf"));
}

#[test]
fn chunked_prompts_keep_their_numbers_smollm2() {
    chunked_prompts_keep_their_numbers(&smollm2());
}
