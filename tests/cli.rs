//! `logitprobe trace` end to end on the test source: outputs, determinism, batches, the
//! Token Heatmap schema, config files, Ctrl-C, and one test per kind of bad input.

mod common;

use common::{assert_usage_error, bin, run, trace_json};
use serde_json::Value;
use std::fs;
use std::path::Path;

const FILES: [&str; 5] = [
    "generated.txt",
    "adaptive_token_trace.csv",
    "adaptive_token_trace.json",
    "run.json",
    "steps.jsonl",
];

fn trace(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["trace", "--backend", "test", "--out", out.to_str().unwrap()];
    if !extra.contains(&"--seed") {
        args.extend(["--seed", "7"]);
    }
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "trace failed: {}", common::stderr(&o));
    o
}

#[test]
fn writes_every_output_file() {
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &["--prompt", "Hello there", "--max-new-tokens", "12"],
    );
    for f in FILES {
        assert!(tmp.path().join(f).is_file(), "{f} missing");
    }
    let csv = fs::read_to_string(tmp.path().join("adaptive_token_trace.csv")).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "step,source,rank,token_id,token,prob,logprob,selected_token_id,selected_token,selected_prob,selected_logprob,selected_rank,entropy,k_used"
    );
    let t = trace_json(tmp.path());
    assert_eq!(t["schema_version"], "2.0.0");
    let steps = t["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i);
        for src in ["raw", "processed"] {
            assert_eq!(
                s[src]["candidates"].as_array().unwrap().len() as u64,
                s[src]["k_used"].as_u64().unwrap()
            );
        }
    }
    let jsonl = fs::read_to_string(tmp.path().join("steps.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), steps.len());
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["seed"], 7);
    assert_eq!(run["backend"], "test");
    assert_eq!(run["interrupted"], false);
    assert!(run["timings"]["decode_tokens_per_s"].as_f64().is_some());
    // No temporary file is left behind.
    for e in fs::read_dir(tmp.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".partial"), "{name} left behind");
    }
}

#[test]
fn same_seed_gives_identical_outputs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "40",
        "--model",
        "5000:3",
    ];
    trace(a.path(), &args);
    trace(b.path(), &args);
    assert_eq!(trace_json(a.path()), trace_json(b.path()));
    for f in ["generated.txt", "adaptive_token_trace.csv", "steps.jsonl"] {
        assert_eq!(
            fs::read(a.path().join(f)).unwrap(),
            fs::read(b.path().join(f)).unwrap(),
            "{f} differs"
        );
    }
    let c = tempfile::tempdir().unwrap();
    trace(
        c.path(),
        &[
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "40",
            "--model",
            "5000:3",
            "--seed",
            "8",
        ],
    );
    assert_ne!(
        trace_json(a.path())["steps"],
        trace_json(c.path())["steps"],
        "another seed, other tokens"
    );
}

#[test]
fn a_batch_gives_the_same_traces_as_single_runs() {
    let prompts = ["The cat", "A much longer prompt about dogs", "x"];
    let batch = tempfile::tempdir().unwrap();
    let mut args = vec!["--max-new-tokens", "30", "--model", "1000:5"];
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    trace(batch.path(), &args);
    for (i, p) in prompts.iter().enumerate() {
        let single = tempfile::tempdir().unwrap();
        // Each prompt's stream is keyed by its index in the list, so a single run of prompt i
        // uses a prompts file with it at index i.
        let file = single.path().join("prompts.txt");
        let mut lines = vec!["placeholder"; i];
        lines.push(p);
        fs::write(&file, lines.join("\n")).unwrap();
        let out = single.path().join("out");
        trace(
            &out,
            &[
                "--max-new-tokens",
                "30",
                "--model",
                "1000:5",
                "--prompts-file",
                file.to_str().unwrap(),
            ],
        );
        let got = trace_json(&batch.path().join(format!("prompt-{i:03}")));
        let dir = if i == 0 {
            out.clone()
        } else {
            out.join(format!("prompt-{i:03}"))
        };
        assert_eq!(got, trace_json(&dir), "prompt {i}");
    }
    assert!(
        batch.path().join("run.json").is_file(),
        "a batch writes a summary run.json at the top"
    );

    // Greedy needs no stream: each prompt run alone equals its place in the batch.
    let batch = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--max-new-tokens",
        "30",
        "--model",
        "1000:5",
        "--temperature",
        "0",
    ];
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    trace(batch.path(), &args);
    for (i, p) in prompts.iter().enumerate() {
        let single = tempfile::tempdir().unwrap();
        trace(
            single.path(),
            &[
                "--max-new-tokens",
                "30",
                "--model",
                "1000:5",
                "--temperature",
                "0",
                "--prompt",
                p,
            ],
        );
        assert_eq!(
            trace_json(&batch.path().join(format!("prompt-{i:03}"))),
            trace_json(single.path()),
            "greedy prompt {i}"
        );
    }
}

#[test]
fn greedy_is_written_as_the_schema_allows() {
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &[
            "--prompt",
            "hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ],
    );
    let t = trace_json(tmp.path());
    assert_eq!(t["metadata"]["generation_params"]["temperature"], 1.0);
    assert_eq!(t["metadata"]["generation_params"]["sample_top_k"], 1);
    for s in t["steps"].as_array().unwrap() {
        assert_eq!(s["processed"]["selected_prob"], 1.0);
        assert_eq!(s["raw"]["selected_rank"], 1);
    }
}

#[test]
fn output_validates_against_the_token_heatmap_schema() {
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(common::tokenheat("tokenheat-trace.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &[
            "--prompt",
            "Hello <|im_start|>",
            "--max-new-tokens",
            "20",
            "--model",
            "300:1",
        ],
    );
    let ours: Value = serde_json::from_str(
        &fs::read_to_string(tmp.path().join("adaptive_token_trace.json")).unwrap(),
    )
    .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&ours)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "our trace violates the schema: {errors:?}"
    );
    // The check can fail: the sample is valid, a broken copy is not.
    let sample: Value = serde_json::from_str(
        &fs::read_to_string(common::tokenheat("tokenheat-sample-trace.json")).unwrap(),
    )
    .unwrap();
    assert!(validator.is_valid(&sample));
    let mut broken = sample.clone();
    broken["steps"][0]["raw"]["k_used"] = Value::from(0);
    assert!(!validator.is_valid(&broken));
    let mut broken = sample;
    broken["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("probe_config");
    assert!(!validator.is_valid(&broken));
}

#[test]
fn chat_template_and_system_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &[
            "--prompt",
            "hi",
            "--use-chat-template",
            "--system-prompt",
            "Be brief.",
            "--max-new-tokens",
            "3",
        ],
    );
    let t = trace_json(tmp.path());
    let ids: Vec<u64> = t["tokens"]["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        ids[0], 258,
        "special tokens in the rendered template are parsed"
    );
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["prompts"][0]["rendered_prompt"],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn config_file_fills_what_flags_leave_unset() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.yaml");
    fs::write(
        &cfg,
        "backend: test\nmodel: \"400:2\"\nprompt: From the config\nmax_new_tokens: 4\ntemperature: 0.5\nsample_top_k: 5\nseed: 99\ncapture_attention: false\n",
    )
    .unwrap();
    let out = tmp.path().join("o");
    let o = run(&[
        "trace",
        "--config",
        cfg.to_str().unwrap(),
        "--seed",
        "100",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run: Value =
        serde_json::from_str(&fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["seed"], 100, "flags override the file");
    assert_eq!(run["sampling"]["top_k"], 5, "sample_top_k is read as top_k");
    assert_eq!(run["sampling"]["temperature"], 0.5);
    assert_eq!(run["model"], "400:2");
}

#[test]
fn ctrl_c_keeps_the_finished_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args([
            "trace",
            "--backend",
            "test",
            "--model",
            "151936:1:-100",
            "--prompt",
            "go",
            "--max-new-tokens",
            "1000000",
        ])
        .args(["--seed", "1", "--out", tmp.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let jsonl = tmp.path().join("steps.jsonl");
    let start = std::time::Instant::now();
    while fs::read_to_string(&jsonl)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 5
    {
        assert!(start.elapsed().as_secs() < 60, "no steps written");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["interrupted"], true);
    let t = trace_json(tmp.path());
    let steps = t["steps"].as_array().unwrap().len();
    assert!(steps >= 5);
    assert_eq!(
        fs::read_to_string(&jsonl).unwrap().lines().count(),
        steps,
        "the final files cover the finished steps"
    );
}

/// Issue 15 D13: a run killed in a reused --out left the earlier run's complete-looking trace,
/// run.json and report beside its own steps.jsonl.
#[test]
fn a_killed_run_leaves_no_earlier_final_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = common::run(&[
        "trace",
        "--backend",
        "test",
        "--model",
        "300:0",
        "--prompt",
        "first run",
        "--seed",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(out.join("report.html").is_file() && out.join("entropy.png").is_file());
    fs::write(out.join("notes.txt"), "mine").unwrap();
    // So that the steps waited for below are the second run's.
    fs::remove_file(out.join("steps.jsonl")).unwrap();
    let mut child = bin()
        .args([
            "trace",
            "--backend",
            "test",
            "--model",
            "151936:1:-100",
            "--prompt",
            "second run",
            "--max-new-tokens",
            "1000000",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while fs::read_to_string(out.join("steps.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(start.elapsed().as_secs() < 60, "no steps written");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for f in [
        "run.json",
        "adaptive_token_trace.json",
        "adaptive_token_trace.csv",
        "generated.txt",
        "report.html",
        "entropy.png",
        "adaptive_heatmap.png",
    ] {
        assert!(
            !out.join(f).exists(),
            "{f} of the earlier run is still there"
        );
    }
    assert_eq!(
        fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine",
        "not ours: kept"
    );
}

fn bad(extra: &[&str], needle: &str) {
    common::assert_trace_fails("test", "300:0", "hi", extra, needle);
}

#[test]
fn bad_min_k_above_max_k() {
    bad(
        &["--min-k", "10", "--max-k", "5"],
        "--min-k 10 is larger than --max-k 5",
    );
}

#[test]
fn bad_min_k_zero() {
    bad(&["--min-k", "0"], "--min-k 0");
}

#[test]
fn bad_mass_threshold() {
    bad(
        &["--mass-threshold", "1.5"],
        "--mass-threshold 1.5 is outside (0, 1]",
    );
    bad(
        &["--mass-threshold", "0"],
        "--mass-threshold 0 is outside (0, 1]",
    );
}

#[test]
fn bad_temperature() {
    bad(&["--temperature", "-1"], "--temperature -1");
    // Issue 15 D8: a tiny temperature was blamed on the engine (exit 1).
    bad(&["--temperature", "1e-40"], "is too small to sample with");
}

/// Issue 15 D7: extreme penalties were accepted and wrote NaN (as `null`) into the trace.
#[test]
fn bad_extreme_penalties() {
    bad(&["--repeat-penalty", "1e-10"], "is outside [0.001, 1000]");
    bad(&["--presence-penalty=-3.4e38"], "is outside [-1000, 1000]");
    bad(&["--frequency-penalty", "1e9"], "--frequency-penalty");
}

/// At the bounds, the arithmetic stays finite: every probability in the trace is a number.
#[test]
fn penalties_at_their_bounds_keep_the_trace_finite() {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, v) in [
        ("--repeat-penalty", "0.001"),
        ("--repeat-penalty", "1000"),
        // An ordinary penalty on the top token at a low temperature: relative to the raw
        // maximum every processed weight underflowed.
        ("--repeat-penalty", "1.3"),
        ("--presence-penalty", "-1000"),
        ("--frequency-penalty", "-1000"),
        ("--frequency-penalty", "1000"),
    ] {
        let out = tmp.path().join(format!("{flag}{v}"));
        let o = common::run(&[
            "trace",
            "--backend",
            "test",
            "--model",
            "300:0",
            "--prompt",
            "a b a b a b",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.0001",
            "--seed",
            "1",
            flag,
            v,
            "--no-plots",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{flag} {v}: {}", common::stderr(&o));
        let text = std::fs::read_to_string(out.join("adaptive_token_trace.json")).unwrap();
        let t: serde_json::Value = serde_json::from_str(&text).unwrap();
        for step in t["steps"].as_array().unwrap() {
            for src in ["raw", "processed"] {
                for k in ["entropy", "selected_prob", "selected_logprob"] {
                    assert!(
                        step[src][k].is_number(),
                        "{flag} {v}: {src}.{k} = {}",
                        step[src][k]
                    );
                }
                let mut mass = 0.0;
                for c in step[src]["candidates"].as_array().unwrap() {
                    assert!(
                        c["prob"].is_number() && c["logprob"].is_number(),
                        "{flag} {v}: {src} candidate {c}"
                    );
                    mass += c["prob"].as_f64().unwrap();
                }
                assert!(mass <= 1.0 + 1e-9, "{flag} {v}: candidates hold {mass}");
            }
        }
    }
}

/// Issue 15 D14: FIFOs made `inspect` and `report` hang.
#[test]
fn fifos_are_refused_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("pipe.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path in our own temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let f = fifo.to_str().unwrap();
    common::assert_usage_error(
        &common::run(&["inspect", "--model", f]),
        "not a regular file",
    );
    common::assert_usage_error(&common::run(&["report", f]), "not a regular file");
    // A prompts file may be a stream (issue 31, item 5): one nothing writes to is refused
    // after a bounded wait.
    common::assert_usage_error(
        &common::run(&["trace", "--backend", "test", "--prompts-file", f]),
        "is a FIFO that nothing wrote to",
    );
    common::assert_usage_error(
        &common::run(&["trace", "--backend", "test", "--prompts-file", "/dev/zero"]),
        "not a regular file",
    );
}

#[test]
fn bad_top_p() {
    bad(&["--top-p", "0"], "--top-p 0 is outside (0, 1]");
    bad(&["--top-p", "1.2"], "--top-p 1.2 is outside (0, 1]");
}

#[test]
fn bad_empty_prompt() {
    let o = run(&["trace", "--backend", "test", "--prompt", ""]);
    assert_usage_error(&o, "prompt 1 is empty");
}

#[test]
fn bad_backend() {
    let o = run(&["trace", "--backend", "tensorflow", "--prompt", "hi"]);
    assert_usage_error(&o, "invalid value 'tensorflow'");
}

#[test]
fn bad_config_unreadable_or_unknown_key() {
    bad(&["--config", "/nonexistent/c.yaml"], "cannot read config");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, "temperature: 0.5\ntempreature: 0.7\n").unwrap();
    bad(
        &["--config", cfg.to_str().unwrap()],
        "unknown key 'tempreature'",
    );
    // Token Heatmap's capture keys: the lens and attention are taken (the test engine cannot
    // look inside, and says so), the others are refused by name.
    fs::write(&cfg, "capture_attention: true\n").unwrap();
    bad(
        &["--config", cfg.to_str().unwrap()],
        "cannot look inside the model",
    );
    fs::write(&cfg, "capture_activations: true\n").unwrap();
    bad(
        &["--config", cfg.to_str().unwrap()],
        "config key 'capture_activations': capturing activations is not available",
    );
    fs::write(&cfg, "capture_full_attention: false\nlens_layers: all\n").unwrap();
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--no-plots",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        tmp.path().join("ok").to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "keys set off are accepted: {}",
        common::stderr(&o)
    );
    fs::write(&cfg, "temperature: [1, 2\n").unwrap();
    bad(&["--config", cfg.to_str().unwrap()], "not valid YAML");
    // Issue 15 D16: a bad value under a flag that overrides it was never looked at.
    fs::write(&cfg, "temperature: hot\n").unwrap();
    bad(
        &["--config", cfg.to_str().unwrap(), "--temperature", "0.5"],
        "config key 'temperature' has a bad value",
    );
}

#[test]
fn bad_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompt",
        "hi",
        "--out",
        file.join("sub").to_str().unwrap(),
    ]);
    assert_usage_error(&o, "cannot write to output folder");
}

/// Issue 15 D12: a 2 MB model name went verbatim into every plot title (17 s of text layout).
#[test]
fn huge_model_names_are_shortened_in_titles() {
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
            "--model",
            "300:1",
        ],
    );
    let path = tmp.path().join("adaptive_token_trace.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    v["metadata"]["model"] = Value::from(format!("{}/model.gguf", "x".repeat(2 << 20)));
    fs::write(&path, v.to_string()).unwrap();
    let out = tmp.path().join("report");
    let o = common::run(&[
        "report",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let html = fs::read_to_string(out.join("report.html")).unwrap();
    let title = html
        .split("<title>")
        .nth(1)
        .unwrap()
        .split("</title>")
        .next()
        .unwrap();
    assert!(
        title.chars().count() <= 100 && title.ends_with("model.gguf"),
        "{title}"
    );
}

/// New-user issue, point 4: special-token text in a plain prompt is parsed by default (as
/// llama.cpp and Hugging Face do), --no-parse-special opts out, and run.json says which.
#[test]
fn special_tokens_are_parsed_unless_told_not_to() {
    let mut lens = Vec::new();
    for extra in [&[][..], &["--no-parse-special"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = vec!["--prompt", "Hello <|im_start|>", "--max-new-tokens", "2"];
        args.extend_from_slice(extra);
        trace(tmp.path(), &args);
        let t: Value = serde_json::from_str(
            &fs::read_to_string(tmp.path().join("adaptive_token_trace.json")).unwrap(),
        )
        .unwrap();
        let run: Value =
            serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap())
                .unwrap();
        assert_eq!(run["parse_special"], extra.is_empty());
        lens.push(t["tokens"]["prompt_token_ids"].as_array().unwrap().len());
    }
    assert_eq!(
        lens[0] + "<|im_start|>".len() - 1,
        lens[1],
        "one id against 12 bytes"
    );
}

/// --chat-template gives a model without one (a base model) a way in: a name or Jinja.
#[test]
fn chat_template_flags_replace_the_models_template() {
    let tmp = tempfile::tempdir().unwrap();
    trace(
        tmp.path(),
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--chat-template",
            "[{{ messages[0].content }}]",
        ],
    );
    let t: Value = serde_json::from_str(
        &fs::read_to_string(tmp.path().join("adaptive_token_trace.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        t["tokens"]["prompt_tokens"],
        serde_json::json!(["[", "h", "i", "]"])
    );
    assert_eq!(t["metadata"]["use_chat_template"], true);
    let run: Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["chat_template"], "inline");
    let file = tmp.path().join("t.jinja");
    fs::write(&file, "<{{ messages[0].content }}>").unwrap();
    let out = tmp.path().join("f");
    trace(
        &out,
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--chat-template-file",
            file.to_str().unwrap(),
        ],
    );
    let t: Value =
        serde_json::from_str(&fs::read_to_string(out.join("adaptive_token_trace.json")).unwrap())
            .unwrap();
    assert_eq!(
        t["tokens"]["prompt_tokens"],
        serde_json::json!(["<", "h", "i", ">"])
    );
    bad(&["--chat-template", "nosuch"], "neither a known name");
}

/// `logitprobe models | head -1` panicked in println! ("failed printing to stdout: Broken
/// pipe"); a closed stdout now ends the process quietly, as it ends `ls`.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::BufRead;
    // More lines than a pipe holds (64 KiB), so the writer is still writing when the reader
    // leaves.
    let text = "hello world ".repeat(8000);
    let model = common::tiny("tiny-f32.gguf");
    let mut child = bin()
        .args(["tokenize", "--model", model.to_str().unwrap(), &text])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone: the rest of the listing goes to a closed pipe.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(first.contains("tokens"), "{first}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 14 point 7: `--model smollm2` named the model `models/fetch smollm2` gets, and was
/// not found.
#[test]
fn the_fetched_models_have_aliases() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = common::run(&[
        "trace",
        "--model",
        "smollm2",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "1",
        "--seed",
        "1",
        "--threads",
        "1",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run: Value =
        serde_json::from_str(&fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["model_path"].as_str().unwrap(),
        common::smollm2().to_str().unwrap()
    );
    let o = bin()
        .args(["trace", "--model", "smollm2", "--prompt", "Hi"])
        .env("LOGITPROBE_CACHE", tmp.path().join("empty"))
        .output()
        .unwrap();
    common::assert_usage_error(&o, "run `models/fetch smollm2` first");
}

/// Issue 31, item 8: `logitprobe` alone prints its help on stderr and exits 2, as clap's
/// convention (and every other missing argument) has it.
#[test]
fn no_arguments_print_the_help_and_exit_2() {
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    assert!(common::stderr(&o).contains("Usage: logitprobe"));
}

/// Issue 32, item 3: text in an error that came from outside (a path, a model's metadata)
/// is shown with its control characters escaped, never written raw to the terminal.
#[test]
fn control_characters_in_errors_are_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("bad\u{1b}[31m\u{7}name.gguf");
    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        !err.chars().any(|c| c.is_control() && c != '\n'),
        "a raw control character: {err:?}"
    );
    assert!(err.contains(r"bad\u{1b}[31m\u{7}name.gguf"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Issue 32, item 4: a config that is not a regular file (a FIFO no one writes, /dev/zero) is
/// refused at once, not read until memory runs out or forever.
#[test]
fn a_config_that_is_no_regular_file_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("config.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for config in [fifo.to_str().unwrap(), "/dev/zero"] {
        let start = std::time::Instant::now();
        let o = run(&[
            "trace",
            "--backend",
            "test",
            "--prompt",
            "hi",
            "--config",
            config,
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
        assert!(
            common::stderr(&o).contains("not a regular file"),
            "{}",
            common::stderr(&o)
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
    let big = tmp.path().join("big.yaml");
    fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--prompt",
        "hi",
        "--config",
        big.to_str().unwrap(),
    ]);
    assert!(
        common::stderr(&o).contains("more than a config's"),
        "{}",
        common::stderr(&o)
    );
}
