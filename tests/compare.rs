//! `logitprobe compare`: the acceptance runs on the tiny twins and SmolLM2, the statistics
//! against a direct f64 computation, and each bad input.

mod common;

use common::{assert_usage_error, run, smollm2, smollm2_onnx, tiny};
use logitprobe::backends::{self, LogitSource, ModelInfo, TokenId, Vocab};
use logitprobe::compare::{self, stats, Chunk, Timing};
use logitprobe::dist::probe::ProbeConfig;
use ndarray::Array2;
use proptest::prelude::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt")
}

fn llama(name: &str) -> String {
    format!("llama:{}", tiny(name).display())
}

/// Runs compare into a fresh folder; returns (compare.json, stdout).
fn compare(args: &[&str]) -> (Value, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut all = vec!["compare"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap()]);
    let o = run(&all);
    assert!(o.status.success(), "compare failed: {}", common::stderr(&o));
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    for f in [
        "compare.csv",
        "kld_per_position.png",
        "kld_histogram.png",
        "delta_entropy_per_position.png",
        "report.html",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    (report, String::from_utf8_lossy(&o.stdout).into_owned(), tmp)
}

fn klds(report: &Value, b: usize) -> Vec<f64> {
    report["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["b"][b]["kld"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_model_against_itself_is_identical() {
    let m = llama("tiny-f32.gguf");
    let (r, stdout, _t) = compare(&[
        "--a",
        &m,
        "--b",
        &m,
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "3",
    ]);
    let k = klds(&r, 0);
    assert_eq!(k.len(), 3 * 63, "second half of each 128-token chunk");
    assert!(
        k.iter().all(|&v| v <= 1e-9),
        "max KLD {}",
        k.iter().cloned().fold(0.0, f64::max)
    );
    let s = &r["summaries"][0];
    assert_eq!(s["same_top_p"], 1.0);
    assert_eq!(s["ppl_ratio"], 1.0);
    assert_eq!(s["tokenizer_positions_differ"], 0);
    assert!(stdout.contains("Same top p"), "{stdout}");
    // llama-perplexity's rows that were missing (issue 14 point 13).
    for row in ["PPL(B)-PPL(A)", "75.0% Δp", "25.0% Δp"] {
        assert!(stdout.contains(row), "{row} in {stdout}");
    }
    assert_eq!(s["delta_p"]["p75"], 0.0);
    // --score-all scores every position of a chunk.
    let (all, _, _t2) = compare(&[
        "--a",
        &m,
        "--b",
        &m,
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "64",
        "--chunks",
        "1",
        "--score-all",
    ]);
    assert_eq!(all["positions"].as_array().unwrap().len(), 63);
    assert_eq!(all["positions"][0]["pos"], 0);
    // `report` draws a compare.json again.
    let again = _t.path().join("again");
    let input = _t.path().join("out/compare.json");
    let o = run(&[
        "report",
        input.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in [
        "kld_per_position.png",
        "kld_histogram.png",
        "delta_entropy_per_position.png",
        "report.html",
    ] {
        assert!(again.join(f).is_file(), "{f}");
    }
}

#[test]
fn tiny_twins_llama_f32_and_onnx_agree() {
    let (r, _, _t) = compare(&[
        "--a",
        &llama("tiny-f32.gguf"),
        "--a-cache-type-k",
        "f32",
        "--a-cache-type-v",
        "f32",
        "--a-flash-attn",
        "off",
        "--b",
        &format!("onnx:{}", tiny("optimum").display()),
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "256",
        "--chunks",
        "4",
    ]);
    let s = &r["summaries"][0];
    let mean = s["kld"]["mean"].as_f64().unwrap();
    assert!(mean <= 1e-6, "mean KLD {mean}");
    assert_eq!(r["a"]["details"]["cache_type_k"], "f32");
    assert_eq!(r["a"]["details"]["flash_attn"], "off");
    assert_eq!(r["b"][0]["engine"], "onnxruntime");
}

#[test]
fn a_quantization_ladder_gives_one_row_per_b() {
    let (r, stdout, _t) = compare(&[
        "--a",
        &llama("tiny-f32.gguf"),
        "--cache-type-k",
        "f32",
        "--cache-type-v",
        "f32",
        "--flash-attn",
        "off",
        "--b",
        &llama("tiny-q8_0.gguf"),
        "--b",
        &format!("onnx:{}", tiny("optimum").display()),
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "4",
    ]);
    let s = r["summaries"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    // Q8_0 moves the distributions, but keeps the top token almost everywhere.
    let q8 = &s[0];
    assert!(q8["kld"]["mean"].as_f64().unwrap() > 0.0);
    assert!(q8["same_top_p"].as_f64().unwrap() >= 0.90, "{q8}");
    assert!(s[1]["kld"]["mean"].as_f64().unwrap() <= 1e-6);
    assert!(stdout.contains("B1") && stdout.contains("B2"), "{stdout}");
    // The plain engine flags set both sides; the KV types show in each header.
    assert_eq!(r["b"][0]["details"]["cache_type_k"], "f32");
    assert_eq!(
        r["timing"]["tokens_evaluated"],
        4 * 128,
        "A scored each chunk once"
    );
    assert!(fs::metadata(_t.path().join("out/kld_histogram_b2.png")).is_ok());
}

#[test]
fn side_flags_apply_to_their_side_only() {
    let (r, _, _t) = compare(&[
        "--a",
        &llama("tiny-f32.gguf"),
        "--a-cache-type-k",
        "f32",
        "--a-flash-attn",
        "off",
        "--b",
        &llama("tiny-f32.gguf"),
        "--b-cache-type-v",
        "f32",
        "--b-flash-attn",
        "on",
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "64",
        "--chunks",
        "1",
    ]);
    assert_eq!(r["a"]["details"]["cache_type_k"], "f32");
    assert_eq!(r["a"]["details"]["cache_type_v"], "f16");
    assert_eq!(r["b"][0]["details"]["cache_type_k"], "f16");
    assert_eq!(r["b"][0]["details"]["cache_type_v"], "f32");
    assert_eq!(r["a"]["details"]["flash_attn"], "off");
    assert_eq!(r["b"][0]["details"]["flash_attn"], "on");
}

#[test]
fn prompt_and_trace_inputs_score_the_same_ids() {
    let a = llama("tiny-f32.gguf");
    let b = format!("onnx:{}", tiny("optimum").display());
    let (r, _, t) = compare(&[
        "--a",
        &a,
        "--b",
        &b,
        "--prompt",
        "In the beginning",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
    ]);
    assert_eq!(r["input"]["kind"], "prompt");
    let n = r["positions"].as_array().unwrap().len();
    assert!(
        (1..=12).contains(&n),
        "one position per generated token, got {n}"
    );
    // The same tokens, as a trace written by `trace`, re-scored.
    let tr = t.path().join("trace");
    let o = run(&[
        "trace",
        "--backend",
        "llama",
        "--model",
        tiny("tiny-f32.gguf").to_str().unwrap(),
        "--prompt",
        "In the beginning",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
        "--out",
        tr.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (r2, _, _t2) = compare(&[
        "--a",
        &a,
        "--b",
        &b,
        "--trace",
        tr.join("adaptive_token_trace.json").to_str().unwrap(),
    ]);
    assert_eq!(r2["input"]["kind"], "trace");
    let ids = |r: &Value| -> Vec<u64> {
        r["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["token_id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        ids(&r),
        ids(&r2),
        "the prompt run and the trace of the same seed score the same tokens"
    );
}

#[test]
fn smollm2_q4_1_against_its_onnx_twin_on_the_corpus() {
    let (r, stdout, _t) = compare(&[
        "--a",
        &format!("llama:{}", smollm2().display()),
        "--b",
        &format!("onnx:{}", smollm2_onnx().display()),
        "--text-file",
        corpus().to_str().unwrap(),
        "--ctx-size",
        "256",
        "--chunks",
        "3",
    ]);
    let s = &r["summaries"][0];
    for key in [
        "ppl_a",
        "ppl_a_err",
        "ppl_b",
        "ppl_b_err",
        "cor_ln_ppl",
        "ln_ppl_ratio",
        "ln_ppl_ratio_err",
        "ppl_ratio",
        "ppl_ratio_err",
        "rms_delta_p",
        "rms_delta_p_err",
        "same_top_p",
        "same_top_p_err",
    ] {
        assert!(
            s[key].as_f64().is_some_and(f64::is_finite),
            "{key} = {}",
            s[key]
        );
    }
    for spread in ["kld", "delta_p"] {
        for key in [
            "mean", "stderr", "max", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1",
            "p0_1", "min",
        ] {
            assert!(
                s[spread][key].as_f64().is_some_and(f64::is_finite),
                "{spread}.{key}"
            );
        }
    }
    let mean = s["kld"]["mean"].as_f64().unwrap();
    assert!(mean > 0.0 && mean < 0.1, "Q4_1 vs fp32 mean KLD {mean}");
    assert!(s["same_top_p"].as_f64().unwrap() > 0.8);
    for name in [
        "PPL(A)",
        "PPL(B)",
        "Cor(ln PPL(B), ln PPL(A))",
        "ln(PPL(B)/PPL(A))",
        "Mean KLD",
        "Maximum KLD",
        "99.9% KLD",
        "Median KLD",
        "0.1% KLD",
        "Minimum KLD",
        "Mean Δp",
        "RMS Δp",
        "Same top p",
        "tok/s",
        "wall",
    ] {
        assert!(stdout.contains(name), "{name} printed:\n{stdout}");
    }
    // Headers name both sides fully.
    let a = &r["a"];
    assert!(a["details"]["tensor_types"]["Q4_1"].is_object());
    assert!(a["model_sha256"].as_str().unwrap().len() == 64);
    assert!(a["description"].as_str().unwrap().contains("bpw"));
    let b = r["b"][0]["description"].as_str().unwrap();
    assert!(
        b.contains("CPUExecutionProvider") && b.contains("F32 · 32.00 bpw"),
        "{b}"
    );
}

// ---------------------------------------------------------------- statistics vs direct f64

fn softmax64(x: &[f32]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

proptest! {
    #[test]
    fn kl_matches_the_direct_sum(
        a in prop::collection::vec(-30f32..30.0, 1..300),
        noise in prop::collection::vec(-2f32..2.0, 300),
        shift in -20f32..20.0,
        hidden in prop::collection::vec(0usize..300, 0..4),
    ) {
        // B's logits shifted (the divergence does not see a shift, but the two terms it is
        // computed from do); A with a few tokens it never gives (−∞).
        let mut a = a;
        for &h in &hidden {
            if h < a.len() - 1 {
                a[h] = f32::NEG_INFINITY;
            }
        }
        let b: Vec<f32> = a.iter().zip(&noise).map(|(x, n)| x + n + shift).collect();
        let b: Vec<f32> = b.iter().zip(&a).map(|(&y, &x)| if x.is_finite() { y } else { 1.0 }).collect();
        let (pa, pb) = (softmax64(&a), softmax64(&b));
        let direct: f64 = pa.iter().zip(&pb).filter(|(p, _)| **p > 0.0).map(|(p, q)| p * (p / q).ln()).sum();
        let got = stats::kl_divergence(&a, &b);
        prop_assert!((got - direct).abs() <= 1e-12 + 1e-9 * direct, "{got} vs {direct}");
        prop_assert_eq!(stats::kl_divergence(&a, &a), 0.0);
    }

    #[test]
    fn spreads_match_sorting_and_direct_formulas(v in prop::collection::vec(-1e3f64..1e3, 2..200)) {
        let s = stats::Spread::of(&v);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        prop_assert!((s.mean - mean).abs() < 1e-9);
        prop_assert!((s.stderr - (var / n).sqrt()).abs() < 1e-9);
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        prop_assert_eq!(s.min, sorted[0]);
        prop_assert_eq!(s.max, sorted[sorted.len() - 1]);
        // numpy's linear percentile, written out.
        for (q, got) in [(0.5, s.median), (0.99, s.p99), (0.001, s.p0_1), (0.9, s.p90)] {
            let h = (sorted.len() - 1) as f64 * q;
            let want = sorted[h.floor() as usize] + (h - h.floor()) * (sorted[h.ceil() as usize] - sorted[h.floor() as usize]);
            prop_assert!((got - want).abs() < 1e-9, "q {q}: {got} vs {want}");
        }
    }

    #[test]
    fn correlation_matches_statrs(x in prop::collection::vec(-10f64..10.0, 3..100), k in -3f64..3.0) {
        let y: Vec<f64> = x.iter().enumerate().map(|(i, v)| k * v + ((i * 7919) % 13) as f64).collect();
        let want = statrs_pearson(&x, &y);
        let got = stats::correlation(&x, &y);
        prop_assert!((got.is_nan() && want.is_nan()) || (got - want).abs() < 1e-9, "{got} vs {want}");
    }
}

/// Pearson's r from statrs' covariance and standard deviations.
fn statrs_pearson(x: &[f64], y: &[f64]) -> f64 {
    use statrs::statistics::Statistics;
    let cov = x.iter().covariance(y.iter());
    cov / (x.iter().std_dev() * y.iter().std_dev())
}

#[test]
fn summary_statistics_of_known_positions() {
    // Three positions, hand-made: PPL, ratios, Same top p and RMS Δp by hand.
    let side = |p: f64| compare::SideAt {
        prob: p,
        logprob: p.ln(),
        entropy: 1.0,
        k_used: 1,
        candidates: vec![],
    };
    let b = |p: f64, pa: f64, kld: f64, same: bool| compare::BAt {
        prob: p,
        logprob: p.ln(),
        entropy: 1.0,
        k_used: 1,
        candidates: vec![],
        kld,
        delta_p: p - pa,
        top1_same: same,
        b_rank_of_a_top1: 1,
        delta_entropy: 0.0,
        jaccard: 1.0,
        lens_kld: None,
        lens_top1_same: None,
    };
    let pos = |i: usize, pa: f64, pb: f64, kld: f64, same: bool| compare::Position {
        index: i,
        chunk: 0,
        pos: i,
        token_id: 0,
        token: String::new(),
        a: side(pa),
        b: vec![b(pb, pa, kld, same)],
    };
    let ps = vec![
        pos(0, 0.5, 0.25, 0.1, true),
        pos(1, 0.25, 0.5, 0.2, true),
        pos(2, 0.125, 0.125, 0.3, false),
    ];
    let s = compare::summarize(&ps, 0, "B");
    let ppl = (-(0.5f64.ln() + 0.25f64.ln() + 0.125f64.ln()) / 3.0).exp();
    assert!((s.ppl_a - ppl).abs() < 1e-12 && (s.ppl_b - ppl).abs() < 1e-12);
    assert!(s.ln_ppl_ratio.abs() < 1e-12 && (s.ppl_ratio - 1.0).abs() < 1e-12);
    assert!((s.same_top_p - 2.0 / 3.0).abs() < 1e-12);
    assert!((s.kld.mean - 0.2).abs() < 1e-12 && (s.kld.median - 0.2).abs() < 1e-12);
    let rms = ((0.25f64.powi(2) * 2.0) / 3.0).sqrt();
    assert!((s.rms_delta_p - rms).abs() < 1e-12);
}

// ---------------------------------------------------------------- A is scored once

/// A test source that counts its scoring calls.
struct Counting {
    inner: backends::test_source::TestSource,
    scores: usize,
}

impl Vocab for Counting {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>> {
        self.inner.tokenize(text, add_bos, parse_special)
    }
    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        self.inner.token_bytes(id)
    }
    fn is_special(&self, id: TokenId) -> bool {
        self.inner.is_special(id)
    }
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template()
    }
}

impl LogitSource for Counting {
    fn begin(&mut self, n_seqs: usize) -> anyhow::Result<()> {
        self.inner.begin(n_seqs)
    }
    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        self.inner.clear_slot(slot)
    }
    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        self.inner.decode_rows(batch, every_position)
    }
    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        self.scores += 1;
        self.inner.score_from(tokens, first)
    }
}

#[test]
fn a_is_scored_once_per_chunk_whatever_the_number_of_bs() {
    let mut a = Counting {
        inner: backends::test_source::TestSource::new(300, 1),
        scores: 0,
    };
    let mut bs: Vec<Box<dyn LogitSource>> = vec![
        Box::new(backends::test_source::TestSource::new(300, 1)),
        Box::new(backends::test_source::TestSource::new(300, 2)),
    ];
    let ids: Vec<TokenId> = (0..200).map(|i| (i * 37 % 250) as TokenId).collect();
    let chunks = compare::corpus_chunks(&ids, 64, None, false, None);
    assert_eq!(chunks.len(), 3);
    let mut timing = Timing::default();
    let positions = compare::compare_chunks(
        &mut a,
        &mut bs,
        &chunks,
        &ProbeConfig::default(),
        None,
        &mut timing,
        &|_| {},
    )
    .unwrap();
    assert_eq!(a.scores, 3);
    assert_eq!(positions.len(), 3 * 31);
    assert!(positions
        .iter()
        .all(|p| p.b.len() == 2 && p.b[0].kld == 0.0 && p.b[1].kld > 0.0));
    let chunk = &Chunk {
        ids: ids[..10].to_vec(),
        first: 9,
    };
    assert_eq!(chunk.scored(), 0);
}

// ---------------------------------------------------------------- bad input

fn assert_compare_fails(args: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut all = vec!["compare"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap()]);
    assert_usage_error(&run(&all), needle);
    let left: Vec<_> = fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing half-written: {left:?}");
}

#[test]
fn vocabulary_mismatch_names_the_first_differing_id() {
    let c = corpus();
    let c = c.to_str().unwrap();
    assert_compare_fails(
        &["--a", "test:300", "--b", "test:400", "--text-file", c],
        "logits 400 wide but A's are 300 wide",
    );
    assert_compare_fails(
        &[
            "--a",
            &llama("tiny-f32.gguf"),
            "--b",
            "test:384",
            "--text-file",
            c,
        ],
        "vocabulary mismatch at token id 0",
    );
}

#[test]
fn empty_and_short_corpora_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "  \n").unwrap();
    let m = llama("tiny-f32.gguf");
    assert_compare_fails(
        &["--a", &m, "--b", &m, "--text-file", empty.to_str().unwrap()],
        "is empty",
    );
    let short = tmp.path().join("short.txt");
    fs::write(
        &short,
        "In the beginning God created the heaven and the earth.",
    )
    .unwrap();
    assert_compare_fails(
        &[
            "--a",
            &m,
            "--b",
            &m,
            "--text-file",
            short.to_str().unwrap(),
            "--ctx-size",
            "128",
        ],
        "fewer than one --ctx-size 128 chunk",
    );
    assert_compare_fails(
        &[
            "--a",
            &m,
            "--b",
            &m,
            "--text-file",
            tmp.path().join("nope.txt").to_str().unwrap(),
        ],
        "cannot read --text-file",
    );
}

#[test]
fn ctx_size_beyond_a_models_context_is_refused() {
    let m = llama("tiny-f32.gguf");
    let c = corpus();
    assert_compare_fails(
        &[
            "--a",
            &m,
            "--b",
            &m,
            "--text-file",
            c.to_str().unwrap(),
            "--ctx-size",
            "4096",
        ],
        "beyond the model's trained context",
    );
    assert_compare_fails(
        &[
            "--a",
            &m,
            "--b",
            &m,
            "--text-file",
            c.to_str().unwrap(),
            "--ctx-size",
            "256",
            "--b-ctx-size",
            "128",
        ],
        "--b-ctx-size 128 is shorter than the chunk length",
    );
}

#[test]
fn a_side_that_fails_to_load_is_named() {
    let m = llama("tiny-f32.gguf");
    let c = corpus();
    let c = c.to_str().unwrap();
    assert_compare_fails(
        &["--a", &m, "--b", "onnx:/no/such/model", "--text-file", c],
        "side B (onnx:/no/such/model) failed to load",
    );
    let bad = common::bad_onnx("no-logits");
    assert_compare_fails(
        &[
            "--a",
            &m,
            "--b",
            &format!("onnx:{}", bad.display()),
            "--text-file",
            c,
        ],
        "side B",
    );
    assert_compare_fails(
        &["--a", "gguf:x.gguf", "--b", &m, "--text-file", c],
        "is not BACKEND:MODEL",
    );
    assert_compare_fails(
        &["--a", "llama:/no/such.gguf", "--b", &m, "--text-file", c],
        "side A (llama:/no/such.gguf) failed to load",
    );
}

#[test]
fn exactly_one_input_is_required() {
    assert_compare_fails(
        &["--a", "test:300", "--b", "test:300"],
        "no input: pass --text-file, --prompt or --trace",
    );
    assert_compare_fails(
        &[
            "--a",
            "test:300",
            "--b",
            "test:300",
            "--text-file",
            "x.txt",
            "--prompt",
            "y",
        ],
        "cannot be used with",
    );
}
