//! `compare`'s reference: each B alone against A's rows kept on disk gives the numbers of
//! scoring A and B side by side; the reference is reused, refused when it was made for
//! another job or is damaged, and never left looking complete when writing it fails.

mod common;

use common::{assert_usage_error, run, smollm2, smollm2_onnx, tiny, SmallDisk};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt")
}

/// Runs compare with `args` and `--out out`; returns compare.json.
fn compare(out: &Path, args: &[&str]) -> Value {
    let mut all = vec!["compare"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap()]);
    let o = run(&all);
    assert!(o.status.success(), "compare failed: {}", common::stderr(&o));
    serde_json::from_str(&fs::read_to_string(out.join("compare.json")).unwrap()).unwrap()
}

/// `&str`s of owned arguments.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn fails(args: &[&str], needle: &str) {
    let mut all = vec!["compare"];
    all.extend_from_slice(args);
    assert_usage_error(&run(&all), needle);
}

/// The largest difference of every B's KLD and A's and B's log-probabilities, and the number
/// of positions whose same-top verdict differs.
fn differences(x: &Value, y: &Value) -> (f64, usize) {
    let (px, py) = (
        x["positions"].as_array().unwrap(),
        y["positions"].as_array().unwrap(),
    );
    assert_eq!(px.len(), py.len());
    let (mut worst, mut top) = (0f64, 0);
    for (p, q) in px.iter().zip(py) {
        assert_eq!(p["token_id"], q["token_id"]);
        let d = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
        worst = worst.max(d(&p["a"]["logprob"], &q["a"]["logprob"]));
        for (a, b) in p["b"]
            .as_array()
            .unwrap()
            .iter()
            .zip(q["b"].as_array().unwrap())
        {
            worst = worst.max(d(&a["kld"], &b["kld"]));
            worst = worst.max(d(&a["logprob"], &b["logprob"]));
            top += usize::from(a["top1_same"] != b["top1_same"]);
        }
    }
    (worst, top)
}

/// Every summary number of both reports to 4 significant digits.
fn same_summaries(x: &Value, y: &Value) {
    let four = |v: &Value| v.as_f64().map(|f| format!("{f:.3e}"));
    for (s, t) in x["summaries"]
        .as_array()
        .unwrap()
        .iter()
        .zip(y["summaries"].as_array().unwrap())
    {
        for k in [
            "ppl_a",
            "ppl_b",
            "ppl_ratio",
            "cor_ln_ppl",
            "rms_delta_p",
            "same_top_p",
        ] {
            assert_eq!(four(&s[k]), four(&t[k]), "{k}");
        }
        for k in ["mean", "median", "p99", "max"] {
            assert_eq!(four(&s["kld"][k]), four(&t["kld"][k]), "kld {k}");
        }
    }
}

#[test]
fn the_ladder_equals_the_sides_compared_together() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus();
    let q41 = format!("llama:{}", smollm2().display());
    let twin = format!("onnx:{}", smollm2_onnx().display());
    let tiny_a = format!("llama:{}", tiny("tiny-f32.gguf").display());
    let tiny_b = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let cases: [(&str, &str, Vec<&str>, &str); 3] = [
        // A on llama.cpp keeps head inputs; A on ONNX Runtime keeps logits.
        ("smollm2", &q41, vec![&twin, &q41], "head-input"),
        ("twin", &twin, vec![&q41], "logits"),
        ("tiny", &tiny_a, vec![&tiny_b, &tiny_a], "head-input"),
    ];
    for (name, a, bs, rows) in cases {
        let mut args = vec![
            "--a",
            a,
            "--text-file",
            c.to_str().unwrap(),
            "--ctx-size",
            "128",
            "--chunks",
            "3",
        ];
        for b in &bs {
            args.extend(["--b", b]);
        }
        let ladder = compare(&tmp.path().join(format!("{name}-ladder")), &args);
        args.push("--sides-together");
        let together = compare(&tmp.path().join(format!("{name}-together")), &args);
        assert_eq!(ladder["reference"]["rows"], rows, "{name}");
        assert!(together.get("reference").is_none());
        let (worst, top) = differences(&ladder, &together);
        println!(
            "{name}: ladder vs together: max |Δ| {worst:e}, same-top verdicts differing {top}"
        );
        assert!(worst <= 1e-6 && top == 0, "{name}: {worst} {top}");
        same_summaries(&ladder, &together);
        // A's logits kept for the B's (where the rows are head inputs) are the replay's bits.
        if rows == "head-input" {
            assert!(
                ladder["reference"]["a_logits_kept"].as_u64().unwrap() > 0,
                "{name}"
            );
            args.pop();
            args.extend(["--a-logits-spill-gb", "0"]);
            let replayed = compare(&tmp.path().join(format!("{name}-replayed")), &args);
            assert_eq!(replayed["reference"]["a_logits_kept"], 0, "{name}");
            assert_eq!(differences(&ladder, &replayed), (0.0, 0), "{name}");
        }
        // B = A: the reference gives A's own logits back, bit for bit.
        if bs.last() == Some(&a) {
            let last = bs.len() - 1;
            assert_eq!(ladder["summaries"][last]["kld"]["max"], 0.0, "{name}");
        }
    }
}

#[test]
fn a_reference_is_reused_and_a_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref");
    let c = corpus();
    let a = format!("llama:{}", smollm2().display());
    let twin = format!("onnx:{}", smollm2_onnx().display());
    let base = [
        "--text-file",
        c.to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "2",
        "--reference",
        reference.to_str().unwrap(),
    ];
    let mut args = vec!["--a", &a, "--b", &twin];
    args.extend(base);
    let first = compare(&tmp.path().join("first"), &args);
    assert_eq!(first["reference"]["chunks_scored"], 2);
    assert!(first["timing"]["a_tokens"].as_u64().unwrap() > 0);
    let again = compare(&tmp.path().join("again"), &args);
    assert_eq!(again["reference"]["chunks_reused"], 2);
    assert_eq!(again["reference"]["chunks_scored"], 0);
    assert_eq!(again["timing"]["a_tokens"], 0, "A is not run again");
    assert_eq!(differences(&first, &again), (0.0, 0));
    // Without A, and without the input: the reference holds both.
    let only_b = compare(
        &tmp.path().join("only-b"),
        &["--reference", reference.to_str().unwrap(), "--b", &twin],
    );
    assert_eq!(only_b["a"]["label"], first["a"]["label"]);
    assert_eq!(differences(&first, &only_b), (0.0, 0));
    // A reference alone, with no B.
    let o = run(&[
        "compare",
        "--a",
        &a,
        "--text-file",
        c.to_str().unwrap(),
        "--chunks",
        "1",
        "--ctx-size",
        "128",
        "--reference",
        tmp.path().join("alone").to_str().unwrap(),
        "--out",
        tmp.path().join("alone-out").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(tmp.path().join("alone/chunk-000000.f32").is_file());
}

#[test]
fn a_reference_made_for_another_job_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("ref");
    let r = r.to_str().unwrap();
    let c = corpus();
    let c = c.to_str().unwrap();
    let other_text = tmp.path().join("other.txt");
    fs::write(
        &other_text,
        fs::read_to_string(c).unwrap().replace("God", "Dog"),
    )
    .unwrap();
    let other_text = other_text.to_str().unwrap();
    let a = format!("llama:{}", tiny("tiny-f32.gguf").display());
    let other_a = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let job = |a: &str, text: &str, ctx: &str| -> Vec<String> {
        [
            "--a",
            a,
            "--b",
            a,
            "--text-file",
            text,
            "--ctx-size",
            ctx,
            "--chunks",
            "2",
            "--reference",
            r,
        ]
        .map(String::from)
        .to_vec()
    };
    compare(&out, &strs(&job(&a, c, "128")));
    for (mut args, needle) in [
        (job(&other_a, c, "128"), "was made with another a model"),
        (job(&a, other_text, "128"), "was made with another input"),
        (
            job(&a, c, "64"),
            "was made with another ctx size: 128 there, 64 in this run",
        ),
    ] {
        args.extend(["--out".to_string(), o.to_string()]);
        fails(&strs(&args), needle);
    }
    // A B of another vocabulary, with A not loaded: named at the first token that differs.
    fails(
        &["--reference", r, "--b", "test:384", "--out", o],
        "vocabulary mismatch at token id 0",
    );
    let none = tmp.path().join("none");
    fails(
        &["--reference", none.to_str().unwrap(), "--b", &a, "--out", o],
        "holds no reference, and no --a was given",
    );
}

#[test]
fn a_damaged_reference_is_refused_or_scored_again() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref");
    let r = reference.to_str().unwrap();
    let c = corpus();
    let a = format!("llama:{}", tiny("tiny-f32.gguf").display());
    let with_a = [
        "--a",
        &a,
        "--b",
        &a,
        "--text-file",
        c.to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "2",
        "--reference",
        r,
    ];
    let first = compare(&tmp.path().join("first"), &with_a);
    let chunk = reference.join("chunk-000001.f32");
    let bytes = fs::read(&chunk).unwrap();
    let out = tmp.path().join("out");
    let without_a = ["--reference", r, "--b", &a, "--out", out.to_str().unwrap()];

    // One flipped bit, same size: refused when read.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    fs::write(&chunk, &flipped).unwrap();
    fails(&without_a, "reference chunk");
    fails(&without_a, "do not match their sha256");

    // Truncated: without A it is missing; with A it is scored again, to the same numbers.
    fs::write(&chunk, &bytes[..bytes.len() / 2]).unwrap();
    fails(&without_a, "lacks 1 of its 2 chunks");
    let again = compare(&tmp.path().join("again"), &with_a);
    assert_eq!(again["reference"]["chunks_scored"], 1);
    assert_eq!(differences(&first, &again), (0.0, 0));

    // Not a reference at all.
    fs::write(
        reference.join("reference.json"),
        "{\"kind\": \"something else\"}",
    )
    .unwrap();
    fails(&without_a, "is not a logitprobe reference");
}

#[test]
fn a_full_disk_while_the_reference_is_written_leaves_no_complete_reference() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for the manifest and A's tokens, not for 4 chunks of 255 rows of 576 floats.
    let disk = SmallDisk::new(&tmp.path().join("small"), 1536);
    let reference = disk.0.join("ref");
    let c = corpus();
    let a = format!("llama:{}", smollm2().display());
    let out = tmp.path().join("out");
    let o = run(&[
        "compare",
        "--a",
        &a,
        "--b",
        &a,
        "--text-file",
        c.to_str().unwrap(),
        "--chunks",
        "4",
        "--reference",
        reference.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "No space left on device");
    let err = common::stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("free some space"), "{err}");
    assert!(!out.join("compare.json").exists());
    // What is there is whole (no temporary names), and holds fewer than the 4 chunks.
    let names: Vec<String> = fs::read_dir(&reference)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    let chunks = names.iter().filter(|n| n.starts_with("chunk-")).count();
    assert!(chunks < 4, "{names:?}");
    // Reusing it without A says what is missing.
    fails(
        &[
            "--reference",
            reference.to_str().unwrap(),
            "--b",
            &a,
            "--out",
            out.to_str().unwrap(),
        ],
        "chunks",
    );
}

#[test]
fn the_noise_floor_is_a_against_a_along_the_other_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus();
    let a = format!("llama:{}", tiny("tiny-f32.gguf").display());
    let b = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let args = [
        "--a",
        &a,
        "--b",
        &b,
        "--text-file",
        c.to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "2",
        "--noise-floor",
    ];
    let out = tmp.path().join("out");
    let mut all = vec!["compare"];
    all.extend(args);
    all.extend(["--out", out.to_str().unwrap()]);
    let o = run(&all);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("noise floor (A vs A)"), "{stdout}");
    let r: Value =
        serde_json::from_str(&fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let floor = &r["noise_floor"];
    assert!(floor["path"].as_str().unwrap().contains("batched kernels"));
    let mean = floor["summary"]["kld"]["mean"].as_f64().unwrap();
    let b_mean = r["summaries"][0]["kld"]["mean"].as_f64().unwrap();
    assert!(
        mean >= 0.0 && mean < b_mean,
        "floor {mean} under B's {b_mean}"
    );
    assert_eq!(
        floor["summary"]["positions"],
        r["summaries"][0]["positions"]
    );
    let html = fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("noise_floor"));
    // Only llama.cpp has another kernel path to take.
    let twin = format!("onnx:{}", smollm2_onnx().display());
    fails(
        &[
            "--a",
            &twin,
            "--b",
            &twin,
            "--text-file",
            c.to_str().unwrap(),
            "--ctx-size",
            "128",
            "--chunks",
            "1",
            "--noise-floor",
            "--out",
            out.to_str().unwrap(),
        ],
        "--noise-floor runs A along llama.cpp's other kernels",
    );
}

/// A llama-perplexity base file written from the test engine's own logits, as
/// llama-perplexity writes one: 3 chunks of 64 tokens over a 300-token vocabulary.
fn base_file(dir: &Path) -> PathBuf {
    use logitprobe::backends::{test_source::TestSource, LogitSource};
    let (n_ctx, n_vocab) = (64, 300);
    let tokens: Vec<i32> = (0..3 * n_ctx).map(|i| (i * 37 % 250) as i32).collect();
    let mut src = TestSource::new(n_vocab, 1);
    let rows: Vec<_> = tokens
        .chunks(n_ctx)
        .map(|c| {
            let ids: Vec<u32> = c.iter().map(|&t| t as u32).collect();
            src.score(&ids).unwrap()
        })
        .collect();
    let path = dir.join("base.kld");
    logitprobe::compare::kld_base::write_file(&path, n_ctx, n_vocab, &tokens, &|c, p| {
        rows[c].row(p).to_vec()
    })
    .unwrap();
    path
}

#[test]
fn a_llama_perplexity_base_file_stands_in_for_a() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_file(tmp.path());
    let b = base.to_str().unwrap();
    let r = compare(
        &tmp.path().join("out"),
        &["--a-logits", b, "--b", "test:300:1"],
    );
    // B is the model the file was written from: only the 16-bit rows stand between them.
    let s = &r["summaries"][0];
    assert_eq!(s["positions"], 3 * 31);
    assert!(s["kld"]["mean"].as_f64().unwrap() < 1e-6, "{}", s["kld"]);
    assert!(
        s["same_top_p"].as_f64().unwrap() > 0.98,
        "{}",
        s["same_top_p"]
    );
    // A's log-probability is the file's 16-bit one (clamped at 16 nats below the top, as
    // llama-perplexity reads it): within its step of B's where the clamp does not reach.
    for p in r["positions"].as_array().unwrap() {
        let (a, b) = (
            p["a"]["logprob"].as_f64().unwrap(),
            p["b"][0]["logprob"].as_f64().unwrap(),
        );
        if a > -15.0 {
            assert!((a - b).abs() < 1e-3, "{a} {b}");
        }
    }
    assert_eq!(r["input"]["kind"], "kld-base");
    // Another model is farther.
    let other = compare(
        &tmp.path().join("other"),
        &["--a-logits", b, "--b", "test:300:2"],
    );
    assert!(other["summaries"][0]["kld"]["mean"].as_f64().unwrap() > 1e-3);

    let out = tmp.path().join("bad");
    let o = out.to_str().unwrap();
    fails(
        &["--a-logits", b, "--b", "test:384", "--out", o],
        "the base file was written for a vocabulary of 300, B has 384",
    );
    let bytes = fs::read(&base).unwrap();
    let cut = tmp.path().join("cut.kld");
    fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    fails(
        &[
            "--a-logits",
            cut.to_str().unwrap(),
            "--b",
            "test:300:1",
            "--out",
            o,
        ],
        "the file is truncated",
    );
    fails(
        &[
            "--a-logits",
            c_path().as_str(),
            "--b",
            "test:300:1",
            "--out",
            o,
        ],
        "is not a llama-perplexity KL-divergence base file",
    );
}

fn c_path() -> String {
    corpus().display().to_string()
}
