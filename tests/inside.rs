//! Inside the model (issue 19): the logit lens and attention summaries on both engines.
//!
//! - the lens of the last layer (through the final norm and the head) is the engine's own
//!   logits, on f32 and quantized models alike (llama.cpp's head is multiplied by its own
//!   kernels, with its activation quantization);
//! - the tiny twins (llama.cpp f32 without flash attention, f32 KV cache, vs ONNX Runtime)
//!   agree layer by layer and in attention;
//! - SmolLM2 Q4_1 on llama.cpp vs its fp32 ONNX twin: per-layer lens agreement, printed;
//! - traces with the lens and attention validate against Token Heatmap's schema, draw their
//!   plots, redraw with `report`, and render in a browser;
//! - capture changes no logits, and gives the same traces at any --parallel;
//! - bad inputs fail on one line.

mod common;

use common::cdp::Browser;
use common::gguf::{Gguf, Val};
use common::{assert_trace_fails, run, smollm2, smollm2_onnx, stderr, tiny};
use serde_json::Value;
use std::fs;
use std::path::Path;

/// Exact settings for the llama.cpp side of an engine comparison.
const EXACT: [&str; 6] = [
    "--flash-attn",
    "off",
    "--cache-type-k",
    "f32",
    "--cache-type-v",
    "f32",
];

/// Runs `trace` on `model` at temperature 1 (so the raw distribution is the model's own)
/// and returns its trace.
fn trace(model: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "In the beginning God created",
        "--temperature",
        "1",
        "--top-p",
        "1",
        "--seed",
        "3",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    common::trace_json(out)
}

fn steps(t: &Value) -> &Vec<Value> {
    t["steps"].as_array().expect("steps")
}

#[test]
fn the_last_layers_lens_is_the_engines_own_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, std::path::PathBuf, Vec<&str>)> = vec![
        ("tiny f32 GGUF", tiny("tiny-f32.gguf"), EXACT.to_vec()),
        ("tiny Q8_0 GGUF", tiny("tiny-q8_0.gguf"), vec![]),
        ("tiny optimum ONNX", tiny("optimum"), vec![]),
        ("tiny genai ONNX", tiny("genai"), vec![]),
        ("SmolLM2 Q4_1 GGUF", smollm2(), vec![]),
        ("SmolLM2 fp32 ONNX", smollm2_onnx(), vec![]),
    ];
    for (i, (name, model, extra)) in cases.into_iter().enumerate() {
        let mut args = vec![
            "--capture-logit-lens",
            "--lens-top-k",
            "16",
            "--no-plots",
            "--max-new-tokens",
            "6",
        ];
        args.extend(extra);
        let t = trace(&model, &tmp.path().join(format!("m{i}")), &args);
        let mut worst = 0f64;
        for s in steps(&t) {
            let lens = s["logit_lens"].as_array().expect("a lens per step");
            let last = lens.last().unwrap();
            let raw = &s["raw"];
            // The same top token, and every lens candidate the probe kept has its logprob.
            assert_eq!(
                last["top_k"][0]["token_id"], raw["candidates"][0]["token_id"],
                "{name}"
            );
            for c in last["top_k"].as_array().unwrap() {
                if let Some(r) = raw["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["token_id"] == c["token_id"])
                {
                    let d = (c["logprob"].as_f64().unwrap() - r["logprob"].as_f64().unwrap()).abs();
                    worst = worst.max(d);
                }
            }
            let d = (last["selected_token_prob"].as_f64().unwrap().ln()
                - raw["selected_prob"].as_f64().unwrap().ln())
            .abs();
            worst = worst.max(d);
            assert_eq!(last["selected_token_rank"], raw["selected_rank"], "{name}");
        }
        println!("{name}: last layer's lens vs the engine's logits: max |Δ logprob| {worst:.2e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

/// The largest difference of `key` (a number) between two JSON arrays of objects.
fn max_diff(a: &Value, b: &Value, keys: &[&str]) -> f64 {
    let mut worst = 0f64;
    for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
        for k in keys {
            let d = (x[*k].as_f64().unwrap() - y[*k].as_f64().unwrap()).abs();
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn tiny_twins_agree_layer_by_layer_and_in_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = [
        "--capture-logit-lens",
        "--lens-prompt",
        "--capture-attention",
        "--max-new-tokens",
        "8",
        "--no-plots",
    ];
    let mut llama_flags = flags.to_vec();
    llama_flags.extend(EXACT);
    let a = trace(
        &tiny("tiny-f32.gguf"),
        &tmp.path().join("llama"),
        &llama_flags,
    );
    let b = trace(&tiny("optimum"), &tmp.path().join("onnx"), &flags);
    let lens_only = [
        "--capture-logit-lens",
        "--max-new-tokens",
        "8",
        "--no-plots",
    ];
    let g = trace(&tiny("genai"), &tmp.path().join("genai"), &lens_only);
    let (mut dp, mut da) = (0f64, 0f64);
    for (i, (sa, sb)) in steps(&a).iter().zip(steps(&b)).enumerate() {
        assert_eq!(sa["selected"], sb["selected"], "step {i}");
        for other in [sb, &steps(&g)[i]] {
            for (la, lb) in sa["logit_lens"]
                .as_array()
                .unwrap()
                .iter()
                .zip(other["logit_lens"].as_array().unwrap())
            {
                let ids = |l: &Value| -> Vec<Value> {
                    l["top_k"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["token_id"].clone())
                        .collect()
                };
                assert_eq!(ids(la), ids(lb), "step {i} layer {}", la["layer_idx"]);
                assert_eq!(la["selected_token_rank"], lb["selected_token_rank"]);
                dp = dp.max(max_diff(&la["top_k"], &lb["top_k"], &["prob"]));
                dp = dp.max(max_diff(
                    &Value::Array(vec![la.clone()]),
                    &Value::Array(vec![lb.clone()]),
                    &["entropy", "selected_token_prob"],
                ));
            }
        }
        da = da.max(max_diff(
            &sa["attention"],
            &sb["attention"],
            &["entropy", "self_weight", "bos_weight"],
        ));
        for (xa, xb) in sa["attention"]
            .as_array()
            .unwrap()
            .iter()
            .zip(sb["attention"].as_array().unwrap())
        {
            for col in [
                "entropy",
                "self_weight",
                "bos_weight",
                "top1_weight",
                "induction",
            ] {
                for (u, v) in xa["per_head"][col]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(xb["per_head"][col].as_array().unwrap())
                {
                    da = da.max((u.as_f64().unwrap() - v.as_f64().unwrap()).abs());
                }
            }
            da = da.max(max_diff(
                &xa["top_positions"],
                &xb["top_positions"],
                &["weight"],
            ));
        }
    }
    // The prompt positions' lens too.
    let (pa, pb) = (&a["prompt_logit_lens"], &b["prompt_logit_lens"]);
    assert_eq!(
        pa["positions"].as_array().unwrap().len(),
        a["tokens"]["prompt_token_ids"].as_array().unwrap().len()
    );
    for (x, y) in pa["positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(pb["positions"].as_array().unwrap())
    {
        for (lx, ly) in x["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["layers"].as_array().unwrap())
        {
            dp = dp.max(max_diff(&lx["top_k"], &ly["top_k"], &["prob"]));
        }
    }
    println!("tiny twins: lens max |Δp| {dp:.2e}, attention max |Δ| {da:.2e}");
    assert!(dp < 1e-3 && da < 1e-3, "lens {dp}, attention {da}");
}

#[test]
fn smollm2_on_both_engines_agrees_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let o = run(&[
        "compare",
        "--a",
        &format!("llama:{}", smollm2().display()),
        "--b",
        &format!("onnx:{}", smollm2_onnx().display()),
        "--text-file",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/corpus/genesis-kjv.txt")
            .to_str()
            .unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "2",
        "--lens",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let layers = report["summaries"][0]["lens"]
        .as_array()
        .expect("a lens summary");
    assert_eq!(layers.len(), 30);
    println!("SmolLM2 Q4_1 (llama.cpp) vs fp32 twin (ONNX Runtime), logit lens per layer:");
    println!("layer  mean KLD(A‖B)   same top-1");
    for l in layers {
        let kld = l["kld"]["mean"].as_f64().unwrap();
        let same = l["same_top1"].as_f64().unwrap();
        println!("{:>5}  {kld:>12.6}   {:>6.1}%", l["layer"], 100.0 * same);
        // Quantized weights move every layer a little, none a lot.
        assert!(
            kld < 0.05 && same > 0.85,
            "layer {}: {kld} {same}",
            l["layer"]
        );
    }
    // The last layer's lens is each side's logits: its KL is the comparison's own.
    let last = layers.last().unwrap()["kld"]["mean"].as_f64().unwrap();
    let own = report["summaries"][0]["kld"]["mean"].as_f64().unwrap();
    assert!(
        (last - own).abs() <= 1e-3 * own.max(1e-9),
        "{last} vs {own}"
    );
    assert!(out.join("lens_kld_per_layer.png").is_file());
    assert!(String::from_utf8_lossy(&o.stdout).contains("logit lens, per layer"));
}

#[test]
fn capture_changes_no_logits_and_no_trace_at_any_parallel() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    fs::write(
        &prompts,
        "In the beginning\nAnd God said\nLet there be light\n",
    )
    .unwrap();
    let model = tiny("tiny-f32.gguf");
    let run_file = |out: &str, extra: &[&str]| {
        let dir = tmp.path().join(out);
        let mut args = vec![
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--prompts-file",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--seed",
            "9",
            "--no-plots",
            "--threads",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        dir
    };
    let inside = [
        "--capture-logit-lens",
        "--lens-prompt",
        "--capture-attention",
        "--flash-attn",
        "off",
    ];
    let mut p1 = inside.to_vec();
    p1.extend(["--parallel", "1"]);
    let mut p3 = inside.to_vec();
    p3.extend(["--parallel", "3"]);
    let one = run_file("one", &p1);
    let three = run_file("three", &p3);
    let plain = run_file("plain", &["--flash-attn", "off", "--parallel", "3"]);
    for p in ["prompt-000", "prompt-001", "prompt-002"] {
        let a = common::trace_json(&one.join(p));
        let b = common::trace_json(&three.join(p));
        assert_eq!(a, b, "{p}: the same trace at --parallel 1 and 3");
        let c = common::trace_json(&plain.join(p));
        for (x, y) in steps(&a).iter().zip(steps(&c)) {
            assert_eq!(x["raw"], y["raw"], "{p}: capture changed the logits");
            assert_eq!(x["selected"], y["selected"]);
        }
    }
}

#[test]
fn lens_traces_validate_draw_redraw_and_render() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t");
    let mut flags = vec![
        "--capture-logit-lens",
        "--lens-prompt",
        "--capture-attention",
        "--lens-step",
        "2",
        "--max-new-tokens",
        "10",
    ];
    flags.extend(EXACT);
    let t = trace(&tiny("tiny-f32.gguf"), &out, &flags);
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(common::tokenheat("tokenheat-trace.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let written: Value =
        serde_json::from_str(&fs::read_to_string(out.join("adaptive_token_trace.json")).unwrap())
            .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&written)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        t["attention_metadata"]["captured_layers"],
        serde_json::json!([0, 1])
    );
    for png in [
        "logit_lens.png",
        "selected_rank_heatmap.png",
        "attention_layer_head_grid.png",
    ] {
        let bytes = fs::read(out.join(png)).unwrap_or_else(|_| panic!("{png} drawn"));
        let mut d = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; d.output_buffer_size().unwrap()];
        let info = d.next_frame(&mut buf).unwrap();
        assert!(info.width >= 600 && info.height >= 150, "{png}");
        // Drawn: the image is not one colour.
        assert!(buf.iter().any(|&b| b != buf[0]), "{png} is blank");
    }
    // `report` draws the same set from the trace alone.
    let again = tmp.path().join("r");
    let o = run(&[
        "report",
        out.join("adaptive_token_trace.json").to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--lens-step",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "logit_lens.png",
        "selected_rank_heatmap.png",
        "attention_layer_head_grid.png",
    ] {
        assert_eq!(
            fs::read(out.join(f)).unwrap(),
            fs::read(again.join(f)).unwrap(),
            "{f} redrawn identically"
        );
    }
    // A Token Heatmap trace's prompt lens (no entropy, no logprob) is read too.
    let mut th = written.clone();
    for p in th["prompt_logit_lens"]["positions"].as_array_mut().unwrap() {
        for l in p["layers"].as_array_mut().unwrap() {
            l.as_object_mut().unwrap().remove("entropy");
            for c in l["top_k"].as_array_mut().unwrap() {
                c.as_object_mut().unwrap().remove("logprob");
            }
        }
    }
    let th_path = tmp.path().join("th.json");
    fs::write(&th_path, th.to_string()).unwrap();
    let o = run(&[
        "report",
        th_path.to_str().unwrap(),
        "--out",
        tmp.path().join("th").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The report's Logit lens view: a cell per layer and position, a click shows its
    // candidates; a step's details show its lens and attention.
    let mut browser = Browser::launch();
    browser.open(&out.join("report.html"));
    let n_prompt = t["tokens"]["prompt_token_ids"].as_array().unwrap().len();
    let cols = n_prompt - 1 + steps(&t).len();
    assert_eq!(
        browser.eval("document.querySelectorAll('table.lens td.cell').length"),
        2 * cols,
        "two layers by every position"
    );
    browser.click("table.lens tr:nth-child(3) td.cell:last-child");
    let h = browser.eval("document.querySelector('#details h2').textContent");
    assert!(
        h.as_str()
            .unwrap()
            .starts_with("Logit lens · layer 1 · step 9"),
        "{h}"
    );
    let rows = browser.eval("document.querySelectorAll('#details tr.cand').length");
    assert_eq!(rows, 8, "the lens's top 8");
    browser.click("#strip .tok[data-i=\"2\"]");
    let titles = browser.eval(
        "Array.from(document.querySelectorAll('#details .cands h2')).map(h => h.textContent)",
    );
    let titles = titles.to_string();
    assert!(
        titles.contains("Logit lens at this step") && titles.contains("Attention at this step"),
        "{titles}"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("inside-report.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn bad_inside_inputs_fail_on_one_line() {
    let tiny_f32 = tiny("tiny-f32.gguf");
    let m = tiny_f32.to_str().unwrap();
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--capture-logit-lens", "--lens-layers", "99"],
        "--lens-layers",
    );
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--capture-attention", "--attention-layers", "0,2"],
        "attention layer 2 is beyond the model's 2 decoder layers",
    );
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--capture-attention", "--flash-attn", "on"],
        "--flash-attn off",
    );
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--capture-logit-lens", "--lens-layers", "0,x"],
        "'x' is not a layer number",
    );
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--lens-top-k", "3"],
        "--capture-logit-lens",
    );
    assert_trace_fails(
        "onnx",
        tiny("genai").to_str().unwrap(),
        "hi",
        &["--capture-attention"],
        "GroupQueryAttention",
    );
    assert_trace_fails(
        "test",
        "300",
        "hi",
        &["--capture-logit-lens"],
        "cannot look inside",
    );

    // An architecture whose output head the lens does not know: the tiny model as EXAONE
    // (a llama-shaped graph llama.cpp loads under that name).
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Gguf::read(&tiny_f32);
    g.kv =
        g.kv.into_iter()
            .map(|(k, v)| match k.strip_prefix("llama.") {
                Some(rest) => (format!("exaone.{rest}"), v),
                None => (k, v),
            })
            .collect();
    g.set("general.architecture", Val::Str(b"exaone".to_vec()));
    let exaone = tmp.path().join("exaone.gguf");
    g.write(&exaone);
    let ok = run(&[
        "trace",
        "--model",
        exaone.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--no-plots",
        "--out",
        tmp.path().join("ok").to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "llama.cpp runs it: {}", stderr(&ok));
    assert_trace_fails(
        "llama",
        exaone.to_str().unwrap(),
        "hi",
        &["--capture-logit-lens"],
        "does not know how architecture 'exaone'",
    );

    // A config's layer list is a string, as Token Heatmap writes it.
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, "capture_logit_lens: true\nlens_layers: [0, 1]\n").unwrap();
    assert_trace_fails(
        "llama",
        m,
        "hi",
        &["--config", cfg.to_str().unwrap()],
        "config key 'lens_layers'",
    );
}
