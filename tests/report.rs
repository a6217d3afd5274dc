//! Reports: the four PNG plots, report.html in a real browser, and `logitprobe report` on
//! files from disk (ours, Token Heatmap's sample, and bad ones).

mod common;

use common::cdp::Browser;
use common::{assert_usage_error, run, tiny};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Traces `steps` tokens from the test source (EOS suppressed) into `out`.
fn test_trace(out: &Path, steps: usize) {
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--model",
        "300:7:-100",
        "--prompt",
        "The plots",
        "--seed",
        "3",
        "--max-new-tokens",
        &steps.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
}

/// Decodes a PNG: (width, height, RGB(A) bytes).
fn decode(path: &Path) -> (u32, u32, Vec<u8>, usize) {
    let file = std::io::BufReader::new(
        fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    );
    let mut reader = png::Decoder::new(file)
        .read_info()
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    (info.width, info.height, buf, channels)
}

/// Asserts a drawn PNG of the given size: it decodes, and it is not blank (a good share of
/// non-white pixels and many distinct colours).
fn assert_plot(path: &Path, size: (u32, u32)) {
    let (w, h, px, ch) = decode(path);
    assert_eq!((w, h), size, "{} size", path.display());
    let pixels: Vec<&[u8]> = px.chunks(ch).collect();
    let inked = pixels.iter().filter(|p| p[..3] != [255, 255, 255]).count();
    let distinct: std::collections::HashSet<&[u8]> = pixels.iter().copied().collect();
    assert!(
        inked * 100 > pixels.len(),
        "{} is nearly blank ({inked} of {} pixels drawn)",
        path.display(),
        pixels.len()
    );
    assert!(
        distinct.len() > 16,
        "{} has {} colours",
        path.display(),
        distinct.len()
    );
}

fn trace_of(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("adaptive_token_trace.json")).unwrap())
        .unwrap()
}

/// The heatmap's rows: the largest k_used of the trace.
fn heatmap_rows(t: &Value) -> u32 {
    t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            [
                s["raw"]["k_used"].as_u64().unwrap(),
                s["processed"]["k_used"].as_u64().unwrap(),
            ]
        })
        .max()
        .unwrap() as u32
}

#[test]
fn trace_writes_every_plot_and_they_are_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 30);
    let t = trace_of(tmp.path());
    let rows = heatmap_rows(&t);
    // 56 px of rank labels, 64 px a step, 100 px of colour bar; 40 + 16 px a rank + 44 high.
    assert_plot(
        &tmp.path().join("adaptive_heatmap.png"),
        (56 + 30 * 64 + 100, 40 + rows * 16 + 44),
    );
    assert_plot(&tmp.path().join("entropy.png"), (1200, 500));
    assert_plot(&tmp.path().join("selected_probability.png"), (1200, 500));
    assert_plot(&tmp.path().join("raw_vs_processed.png"), (1400, 820));
    assert!(!tmp.path().join("adaptive_heatmap_2.png").exists());
    let html = fs::read_to_string(tmp.path().join("report.html")).unwrap();
    // The SVG namespace is a name, not a request.
    let refs = html.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !refs.contains("http://") && !refs.contains("https://"),
        "no network references"
    );
    assert!(
        !html.contains("<link") && !html.contains("src="),
        "no external assets"
    );
}

/// Issue 15 D11: one step with 200,000 candidates asked for a 7 GB heatmap and aborted. The
/// heatmap draws the first 256 ranks and its title says so.
#[test]
fn a_step_with_200000_candidates_draws_a_bounded_heatmap() {
    let tmp = tempfile::tempdir().unwrap();
    let trace_dir = tmp.path().join("trace");
    let o = run(&[
        "trace",
        "--backend",
        "test",
        "--model",
        "200000:1:-100",
        "--prompt",
        "wide",
        "--seed",
        "1",
        "--max-new-tokens",
        "1",
        "--temperature",
        "50",
        "--top-p",
        "1",
        "--min-k",
        "200000",
        "--max-k",
        "200000",
        "--mass-threshold",
        "1",
        "--no-plots",
        "--out",
        trace_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let t = trace_of(&trace_dir);
    assert_eq!(t["steps"][0]["raw"]["k_used"], 200000);
    let out = tmp.path().join("report");
    let o = run(&[
        "report",
        trace_dir
            .join("adaptive_token_trace.json")
            .to_str()
            .unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_plot(
        &out.join("adaptive_heatmap.png"),
        // A one-step heatmap is its minimum width; 256 ranks high.
        (720, 40 + 256 * 16 + 44),
    );
}

/// Issue 15 D16: a step whose logits row had no finite entry showed probability 1.0 and entropy
/// 0 like any certain step; only run.json said so. report.html marks it (from the run, or the
/// run.json beside a trace).
#[test]
fn degenerate_steps_are_marked_in_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 10);
    let run_path = tmp.path().join("run.json");
    let mut run_json: Value = serde_json::from_slice(&fs::read(&run_path).unwrap()).unwrap();
    run_json["prompts"][0]["degenerate_steps"] = serde_json::json!([3]);
    fs::write(&run_path, serde_json::to_vec(&run_json).unwrap()).unwrap();
    let out = tmp.path().join("again");
    let o = run(&[
        "report",
        tmp.path()
            .join("adaptive_token_trace.json")
            .to_str()
            .unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let html = fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains(r#"{"degenerate_steps":[3],"#),
        "marks in the page"
    );
    assert!(html.contains("No finite logit at this step"));
    // A trace of its own run: nothing marked.
    let first = fs::read_to_string(tmp.path().join("report.html")).unwrap();
    assert!(first.contains(r#"{"degenerate_steps":[],"#));
}

#[test]
fn long_traces_split_the_heatmap_into_pages() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 230);
    let rows = heatmap_rows(&trace_of(tmp.path()));
    let h = 40 + rows * 16 + 44;
    assert_plot(
        &tmp.path().join("adaptive_heatmap.png"),
        (56 + 100 * 64 + 100, h),
    );
    assert_plot(
        &tmp.path().join("adaptive_heatmap_2.png"),
        (56 + 100 * 64 + 100, h),
    );
    assert_plot(
        &tmp.path().join("adaptive_heatmap_3.png"),
        (56 + 30 * 64 + 100, h),
    );
    // Re-rendering a shorter trace into the same folder removes the stale pages.
    test_trace(tmp.path(), 20);
    assert!(!tmp.path().join("adaptive_heatmap_2.png").exists());
    assert!(!tmp.path().join("adaptive_heatmap_3.png").exists());
}

#[test]
fn report_renders_the_token_heatmap_sample_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = common::tokenheat("tokenheat-sample-trace.json");
    let o = run(&[
        "report",
        sample.to_str().unwrap(),
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in [
        "adaptive_heatmap.png",
        "entropy.png",
        "selected_probability.png",
        "raw_vs_processed.png",
    ] {
        let (w, h, _, _) = decode(&tmp.path().join(f));
        assert!(w > 0 && h > 0);
    }
    assert!(tmp.path().join("report.html").is_file());
    // Without --out it writes into ./report, never next to a shared input.
    let cwd = tempfile::tempdir().unwrap();
    let o = common::bin()
        .args(["report", sample.to_str().unwrap()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(cwd.path().join("report/report.html").is_file());
    assert!(!common::tokenheat("report.html").exists());
}

#[test]
fn report_redraws_a_trace_of_ours_identically() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 12);
    let again = tmp.path().join("again");
    let trace = tmp.path().join("adaptive_token_trace.json");
    let o = run(&[
        "report",
        trace.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in [
        "adaptive_heatmap.png",
        "entropy.png",
        "selected_probability.png",
        "raw_vs_processed.png",
        "report.html",
    ] {
        assert_eq!(
            fs::read(tmp.path().join(f)).unwrap(),
            fs::read(again.join(f)).unwrap(),
            "{f} differs when drawn again from the file"
        );
    }
}

/// Issue 32, item 6: a report killed while it drew left its plots under temporary names; the
/// next report into the folder removes them (and leaves the user's files alone).
#[test]
fn report_removes_what_a_killed_report_left() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 6);
    let again = tmp.path().join("again");
    fs::create_dir_all(&again).unwrap();
    let left = [".entropy.png.partial.png", ".report.html.partial"];
    for f in left {
        fs::write(again.join(f), b"cut short").unwrap();
    }
    fs::write(again.join("notes.txt"), b"mine").unwrap();
    let trace = tmp.path().join("adaptive_token_trace.json");
    let o = run(&[
        "report",
        trace.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for f in left {
        assert!(!again.join(f).exists(), "{f} is still there");
    }
    assert!(again.join("notes.txt").exists());
    assert!(again.join("entropy.png").exists());
}

fn assert_report_fails(input: &Path, needle: &str) {
    let out = tempfile::tempdir().unwrap();
    let o = run(&[
        "report",
        input.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_usage_error(&o, needle);
    let left: Vec<PathBuf> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

#[test]
fn bad_report_inputs_fail_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(&tmp.path().join("t"), 5);
    let good: Value = trace_of(&tmp.path().join("t"));
    let write = |name: &str, v: &Value| {
        let p = tmp.path().join(name);
        fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        p
    };

    assert_report_fails(&tmp.path().join("missing.json"), "cannot read");
    let p = tmp.path().join("garbage.json");
    fs::write(&p, "steps: [").unwrap();
    assert_report_fails(&p, "is not JSON");
    assert_report_fails(
        &write("other.json", &serde_json::json!({"name": "not a trace"})),
        "no \"schema_version\"",
    );

    let mut v = good.clone();
    v["schema_version"] = "3.1.0".into();
    assert_report_fails(&write("major3.json", &v), "schema major version 3");

    // The first schema violation, with its path.
    let mut v = good.clone();
    v["steps"][2]["raw"]["candidates"][0]["prob"] = 1.5.into();
    assert_report_fails(&write("prob.json", &v), "/steps/2/raw/candidates/0/prob");
    let mut v = good.clone();
    v["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("generation_params");
    assert_report_fails(&write("params.json", &v), "generation_params");
    let mut v = good.clone();
    v["steps"][0]["processed"]["entropy"] = "high".into();
    assert_report_fails(&write("entropy.json", &v), "/steps/0/processed/entropy");

    // Issue 15 D16: an integer beyond u32 failed without saying where.
    let mut v = good.clone();
    v["steps"][0]["selected"]["token_id"] = (1u64 << 40).into();
    assert_report_fails(&write("huge-id.json", &v), "at steps[0].selected.token_id");

    // Statistics are not re-derived: a trace whose numbers disagree with each other is drawn.
    let mut v = good;
    v["steps"][0]["raw"]["top_mass_used"] = 0.01.into();
    let p = write("odd-but-valid.json", &v);
    let out = tmp.path().join("odd-out");
    assert!(run(&[
        "report",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());

    let mut c: Value = serde_json::json!({"kind": "logitprobe-compare", "format_version": 1});
    c["a"] = Value::Null;
    assert_report_fails(
        &write("compare-bad.json", &c),
        "not a logitprobe compare.json",
    );
}

/// Issue 32, item 7: a long trace is read a step at a time, never as one JSON tree (which
/// took 17 times the file in memory: the text, the tree, its copy and the typed steps).
#[test]
fn a_20000_step_report_takes_memory_in_proportion_to_its_steps_only() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(&tmp.path().join("t"), 200);
    let mut t = trace_of(&tmp.path().join("t"));
    let steps: Vec<Value> = t["steps"].as_array().unwrap().clone();
    t["steps"] = Value::Array(Vec::new());
    // Written a step at a time: the child's peak RSS counts this process's pages until its
    // exec, so this process stays small.
    let text = serde_json::to_string(&t).unwrap();
    let (head, tail) = text.split_once(r#""steps":[]"#).unwrap();
    let path = tmp.path().join("long.json");
    let mut w = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    write!(w, r#"{head}"steps":["#).unwrap();
    for i in 0..20_000 {
        let mut s = steps[i % steps.len()].clone();
        s["step"] = i.into();
        let comma = if i > 0 { "," } else { "" };
        write!(w, "{comma}{s}").unwrap();
    }
    write!(w, "]{tail}").unwrap();
    w.flush().unwrap();
    drop(w);
    let file_kb = fs::metadata(&path).unwrap().len() as i64 / 1024;
    let out = tmp.path().join("out");
    let peak = common::peak_rss_kb(&[
        "report",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    // The typed steps and the plots' columns: 2.5 times the file with the program itself
    // (17 times before).
    assert!(
        peak < 4 * file_kb + 64 * 1024,
        "report of a {file_kb} KB trace peaked at {peak} KB"
    );
    assert!(out.join("report.html").exists());
}

/// The acceptance check in a real browser: one token element per generated token, a click
/// shows that token's candidates, and a screenshot is kept with the test output.
#[test]
fn report_html_works_in_headless_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    test_trace(tmp.path(), 24);
    let trace = trace_of(tmp.path());
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-browser");
    let mut browser = Browser::launch();
    browser.open(&tmp.path().join("report.html"));

    let n = browser.eval("document.querySelectorAll('#strip .tok').length");
    assert_eq!(n, 24, "one token element per generated token");
    // Issue 31, item 7: the token colours have a legend, as the served viewer's have.
    let legend = browser.eval("document.querySelector('#kld-legend').textContent");
    assert!(
        legend
            .as_str()
            .is_some_and(|l| l.contains("probability of the chosen token (raw)")),
        "{legend}"
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('#cands tr.cand').length"),
        0
    );
    browser.click("#strip .tok[data-i=\"5\"]");
    let step = &trace["steps"][5];
    let shown = browser.eval("document.querySelector('#details h2').textContent");
    assert!(shown.as_str().unwrap().starts_with("Step 5 "), "{shown}");
    let rows = browser.eval("Array.from(document.querySelectorAll('#cands .cands')).map(t => t.querySelectorAll('tr.cand').length)");
    assert_eq!(
        rows,
        serde_json::json!([
            step["raw"]["candidates"].as_array().unwrap().len(),
            step["processed"]["candidates"].as_array().unwrap().len()
        ]),
        "raw and processed candidates of step 5"
    );
    let first =
        browser.eval("document.querySelector('#cands tr.cand td:nth-child(3)').textContent");
    assert_eq!(
        first.as_str().unwrap(),
        step["raw"]["candidates"][0]["token_id"].to_string()
    );
    // The timeline cursors follow the selection.
    let cursors = browser.eval("Array.from(document.querySelectorAll('svg .cursor')).filter(c => c.getAttribute('visibility') === 'visible').length");
    assert_eq!(cursors, 3);
    // Toggles recolour the strip.
    let before =
        browser.eval("document.querySelector('#strip .tok[data-i=\"0\"]').style.background");
    browser.click("#distribution-processed");
    browser.click("#colour-logprob");
    let after =
        browser.eval("document.querySelector('#strip .tok[data-i=\"0\"]').style.background");
    assert_ne!(before, after);
    browser.screenshot(&artifacts.join("trace-report.png"));
    let (w, h, _, _) = decode(&artifacts.join("trace-report.png"));
    assert!(w >= 800 && h >= 600);
    eprintln!(
        "screenshot: {}",
        artifacts.join("trace-report.png").display()
    );

    // The compare view: one token per scored position, a click shows both sides.
    let cmp = tmp.path().join("cmp");
    let o = run(&[
        "compare",
        "--a",
        &format!("llama:{}", tiny("tiny-f32.gguf").display()),
        "--b",
        &format!("llama:{}", tiny("tiny-q8_0.gguf").display()),
        "--text-file",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/corpus/genesis-kjv.txt")
            .to_str()
            .unwrap(),
        "--ctx-size",
        "64",
        "--chunks",
        "2",
        "--out",
        cmp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let report: Value =
        serde_json::from_str(&fs::read_to_string(cmp.join("compare.json")).unwrap()).unwrap();
    let positions = report["positions"].as_array().unwrap();
    browser.open(&cmp.join("report.html"));
    assert_eq!(
        browser.eval("document.querySelectorAll('#strip .tok').length"),
        positions.len()
    );
    browser.click("#strip .tok[data-i=\"10\"]");
    let sides = browser.eval("Array.from(document.querySelectorAll('#cands .cands')).map(t => t.querySelectorAll('tr.cand').length)");
    assert_eq!(
        sides,
        serde_json::json!([
            positions[10]["a"]["candidates"].as_array().unwrap().len(),
            positions[10]["b"][0]["candidates"]
                .as_array()
                .unwrap()
                .len()
        ])
    );
    let summary = browser.eval("document.querySelector('#summary-table').textContent");
    assert!(summary.as_str().unwrap().contains("Mean KLD"));
    browser.screenshot(&artifacts.join("compare-report.png"));
}
