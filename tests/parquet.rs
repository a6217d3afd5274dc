//! `--format parquet` (issue 33): the built binary on the tiny twins and the test source.
//! Every value of steps.parquet, candidates.parquet and prompts.parquet equals the JSON trace
//! of the same prompts, seed and settings, bit for bit; a many-prompt run with a small bound
//! writes several row groups, none splitting a prompt; an interrupted run leaves whole,
//! readable tables; `compare --format parquet`'s positions.parquet equals compare.json; the
//! options that need a folder per prompt are refused on one line.

mod common;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int8Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use common::{bin, run, stderr, tiny};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// A Parquet file: its number of row groups and its rows, as batches.
fn read(path: &Path) -> (usize, Vec<RecordBatch>) {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let b = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let groups = b.metadata().num_row_groups();
    let batches = b.build().unwrap().map(Result::unwrap).collect();
    (groups, batches)
}

fn u32s(b: &RecordBatch, name: &str) -> Vec<u32> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no {name}"));
    c.as_primitive::<UInt32Type>().values().to_vec()
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<f64> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no {name}"));
    c.as_primitive::<Float64Type>().values().to_vec()
}

fn strs(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no {name}"));
    c.as_string::<i32>()
        .iter()
        .map(|s| s.map(str::to_string))
        .collect()
}

/// A dictionary-encoded string column, decoded.
fn dict_strs(b: &RecordBatch, name: &str) -> Vec<String> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no {name}"));
    let keys: Vec<usize>;
    let values;
    if let Some(d) = c.as_dictionary_opt::<Int8Type>() {
        keys = d.keys().values().iter().map(|&k| k as usize).collect();
        values = d.values().clone();
    } else {
        let d = c.as_dictionary::<Int32Type>();
        keys = d.keys().values().iter().map(|&k| k as usize).collect();
        values = d.values().clone();
    }
    let values = values.as_string::<i32>();
    keys.iter().map(|&k| values.value(k).to_string()).collect()
}

fn as_f64(v: &Value) -> f64 {
    // JSON writes NaN and ±∞ as null.
    v.as_f64().unwrap_or(f64::NAN)
}

fn as_u32(v: &Value) -> u32 {
    v.as_u64().expect("an integer") as u32
}

/// Equal bits, or both NaN-like where JSON could only say null.
fn same(json: &Value, parquet: f64, what: &str) {
    if json.is_null() {
        assert!(!parquet.is_finite(), "{what}: JSON null, Parquet {parquet}");
    } else {
        assert_eq!(
            as_f64(json).to_bits(),
            parquet.to_bits(),
            "{what}: JSON {json}, Parquet {parquet}"
        );
    }
}

fn write_prompts(dir: &Path, n: usize) -> std::path::PathBuf {
    let kinds = [
        "The capital of France is",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "Q: What is 17 times 23?\nA:",
        "Les chats sont",
        "List three colours:",
        "🙂 emoji and ünïcödé",
    ];
    let text: String = (0..n)
        .map(|i| format!("{} {i}\n", kinds[i % kinds.len()].replace('\n', " ")))
        .collect();
    let path = dir.join("prompts.txt");
    fs::write(&path, text).unwrap();
    path
}

fn trace(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = bin();
    c.arg("trace").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "trace {args:?} failed: {}", stderr(&o));
    o
}

/// A candidate: distribution, rank, token id, token, and the bits of prob and logprob.
type Candidate = (String, u32, u32, String, u64, u64);

/// One step row and its candidates, keyed by (prompt_index, step).
#[derive(Debug, Default)]
struct Tables {
    steps: BTreeMap<(u32, u32), Vec<(String, u64)>>,
    candidates: BTreeMap<(u32, u32), Vec<Candidate>>,
}

/// The steps and candidates of the Parquet tables, as comparable values.
fn parquet_tables(dir: &Path) -> Tables {
    let mut t = Tables::default();
    let (_, steps) = read(&dir.join("steps.parquet"));
    for b in &steps {
        let (p, s) = (u32s(b, "prompt_index"), u32s(b, "step"));
        let token = strs(b, "token");
        let token_id = u32s(b, "token_id");
        for i in 0..b.num_rows() {
            let mut row = vec![
                ("token_id".to_string(), token_id[i] as u64),
                ("token".to_string(), hash(token[i].as_deref().unwrap())),
            ];
            for d in ["raw", "processed"] {
                for c in [
                    "entropy",
                    "top_mass_used",
                    "selected_prob",
                    "selected_logprob",
                ] {
                    let name = format!("{d}_{c}");
                    row.push((name.clone(), f64s(b, &name)[i].to_bits()));
                }
                for c in ["k_used", "selected_rank"] {
                    let name = format!("{d}_{c}");
                    row.push((name.clone(), u32s(b, &name)[i] as u64));
                }
            }
            let old = t.steps.insert((p[i], s[i]), row);
            assert!(old.is_none(), "step {} of prompt {} twice", s[i], p[i]);
        }
    }
    let (_, cands) = read(&dir.join("candidates.parquet"));
    for b in &cands {
        let (p, s) = (u32s(b, "prompt_index"), u32s(b, "step"));
        let dist = dict_strs(b, "distribution");
        let (rank, id) = (u32s(b, "rank"), u32s(b, "token_id"));
        let token = strs(b, "token");
        let (prob, logprob) = (f64s(b, "prob"), f64s(b, "logprob"));
        for i in 0..b.num_rows() {
            t.candidates.entry((p[i], s[i])).or_default().push((
                dist[i].clone(),
                rank[i],
                id[i],
                token[i].clone().unwrap(),
                prob[i].to_bits(),
                logprob[i].to_bits(),
            ));
        }
    }
    t
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The same values from the JSON traces of `dir`'s prompt folders.
fn json_tables(traces: &[(u32, Value)]) -> Tables {
    let mut t = Tables::default();
    for (p, trace) in traces {
        for step in trace["steps"].as_array().unwrap() {
            let s = as_u32(&step["step"]);
            let mut row = vec![
                (
                    "token_id".to_string(),
                    step["selected"]["token_id"].as_u64().unwrap(),
                ),
                (
                    "token".to_string(),
                    hash(step["selected"]["token"].as_str().unwrap()),
                ),
            ];
            for d in ["raw", "processed"] {
                for c in [
                    "entropy",
                    "top_mass_used",
                    "selected_prob",
                    "selected_logprob",
                ] {
                    row.push((format!("{d}_{c}"), as_f64(&step[d][c]).to_bits()));
                }
                for c in ["k_used", "selected_rank"] {
                    row.push((format!("{d}_{c}"), step[d][c].as_u64().unwrap()));
                }
                for c in step[d]["candidates"].as_array().unwrap() {
                    t.candidates.entry((*p, s)).or_default().push((
                        d.to_string(),
                        as_u32(&c["rank"]),
                        as_u32(&c["token_id"]),
                        c["token"].as_str().unwrap().to_string(),
                        as_f64(&c["prob"]).to_bits(),
                        as_f64(&c["logprob"]).to_bits(),
                    ));
                }
            }
            t.steps.insert((*p, s), row);
        }
    }
    t
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Every step and candidate value of the Parquet tables equals the JSON traces' of the same
/// run (same prompts, seed and settings), and prompts.parquet equals each prompt's run.json
/// and trace metadata; the folder holds no per-prompt folder, no steps.jsonl.
#[test]
fn parquet_equals_the_json_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 9;
    let prompts = write_prompts(tmp.path(), n);
    let model = tiny("tiny-f32.gguf");
    let (json, pq) = (tmp.path().join("json"), tmp.path().join("pq"));
    let common_args = |out: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "--prompts-file",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--seed",
            "11",
            "--temperature",
            "0.9",
            "--top-k",
            "30",
            "--top-p",
            "0.9",
            "--parallel",
            "3",
            "--no-plots",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let a = common_args(&json);
    trace(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let mut b = common_args(&pq);
    b.extend(["--format".into(), "parquet".into()]);
    trace(&b.iter().map(String::as_str).collect::<Vec<_>>(), &[]);

    let mut names: Vec<String> = fs::read_dir(&pq)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "candidates.parquet",
            "prompts.parquet",
            "run.json",
            "steps.parquet",
            "summary.csv"
        ]
    );
    let traces: Vec<(u32, Value)> = (0..n)
        .map(|i| {
            let dir = json.join(format!("prompt-{i:03}"));
            (i as u32, read_json(&dir.join("adaptive_token_trace.json")))
        })
        .collect();
    let want = json_tables(&traces);
    let got = parquet_tables(&pq);
    assert!(want.steps.len() > 50, "{} steps", want.steps.len());
    assert_eq!(got.steps.len(), want.steps.len());
    for (k, row) in &want.steps {
        assert_eq!(got.steps.get(k), Some(row), "step {k:?}");
    }
    let n_cand: usize = want.candidates.values().map(Vec::len).sum();
    assert!(n_cand > want.steps.len() * 2);
    assert_eq!(got.candidates, want.candidates);

    // prompts.parquet: one row per prompt, each as the prompt's run.json and trace say.
    let (_, batches) = read(&pq.join("prompts.parquet"));
    let mut rows = 0;
    for b in &batches {
        let index = u32s(b, "prompt_index");
        let prompt = strs(b, "prompt");
        let stop = strs(b, "stop_reason");
        let text = strs(b, "generated_text");
        let (pt, gt) = (u32s(b, "prompt_tokens"), u32s(b, "generated_tokens"));
        let mean = f64s(b, "mean_entropy_raw");
        let sys = b.column_by_name("system_prompt").unwrap();
        for i in 0..b.num_rows() {
            rows += 1;
            let dir = json.join(format!("prompt-{:03}", index[i]));
            let run = read_json(&dir.join("run.json"));
            let p = &run["prompts"][0];
            let (_, trace) = &traces[index[i] as usize];
            assert_eq!(prompt[i].as_deref(), p["prompt"].as_str());
            assert_eq!(stop[i].as_deref(), p["stop_reason"].as_str());
            assert_eq!(pt[i] as u64, p["prompt_tokens"].as_u64().unwrap());
            assert_eq!(gt[i] as u64, p["generated_tokens"].as_u64().unwrap());
            assert_eq!(
                text[i].as_deref(),
                trace["metadata"]["generated_text"].as_str()
            );
            assert!(sys.is_null(i));
            let steps = trace["steps"].as_array().unwrap();
            let m = steps
                .iter()
                .map(|s| as_f64(&s["raw"]["entropy"]))
                .sum::<f64>()
                / steps.len() as f64;
            assert_eq!(mean[i].to_bits(), m.to_bits());
        }
    }
    assert_eq!(rows, n);

    // summary.csv: the JSON run's rows, without the folder.
    let rows = |path: &Path| -> BTreeMap<String, Vec<String>> {
        let mut r = csv::Reader::from_path(path).unwrap();
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                let mut v: Vec<String> = rec.iter().map(String::from).collect();
                v[1].clear();
                (v[0].clone(), v)
            })
            .collect()
    };
    assert_eq!(
        rows(&pq.join("summary.csv")),
        rows(&json.join("summary.csv"))
    );
    let run = read_json(&pq.join("run.json"));
    assert_eq!(run["interrupted"], false);
    assert_eq!(
        run["stop_reasons"],
        read_json(&json.join("run.json"))["stop_reasons"]
    );

    // A JSON run into the folder removes the tables; a Parquet run removes the folders.
    trace(
        &[
            "--backend",
            "test",
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--max-new-tokens",
            "2",
            "--out",
            pq.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!pq.join("steps.parquet").exists());
    assert!(pq.join("prompt-000/adaptive_token_trace.json").exists());
    trace(
        &[
            "--backend",
            "test",
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--max-new-tokens",
            "2",
            "--format",
            "parquet",
            "--out",
            pq.to_str().unwrap(),
        ],
        &[],
    );
    assert!(pq.join("steps.parquet").exists());
    assert!(!pq.join("prompt-000").exists());
    assert!(!pq.join("steps.jsonl").exists());
}

/// One prompt: the tables, and run.json lists it (as a one-prompt JSON run's does).
#[test]
fn one_prompt_and_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = tmp.path().join("run.yaml");
    fs::write(
        &config,
        "backend: test\nprompt: Hello\nmax_new_tokens: 5\nseed: 3\nformat: parquet\n",
    )
    .unwrap();
    trace(
        &[
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let (_, b) = read(&out.join("steps.parquet"));
    assert_eq!(b.iter().map(RecordBatch::num_rows).sum::<usize>(), 5);
    assert!(!out.join("summary.csv").exists());
    assert!(!out.join("adaptive_token_trace.json").exists());
    let run = read_json(&out.join("run.json"));
    assert_eq!(run["prompts"][0]["prompt"], "Hello");
    assert_eq!(run["prompts"][0]["generated_tokens"], 5);
}

/// With a small bound (LOGITPROBE_PARQUET_ROWS), a many-prompt run writes many row groups;
/// every row arrives once, and no row group splits a prompt's steps.
#[test]
fn many_prompts_write_several_row_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), 60);
    let out = tmp.path().join("out");
    let args = [
        "--backend",
        "test",
        "--model",
        "500:2:-100",
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
        "--format",
        "parquet",
        "--out",
        out.to_str().unwrap(),
    ];
    trace(&args, &[("LOGITPROBE_PARQUET_ROWS", "20")]);
    let (groups, batches) = read(&out.join("steps.parquet"));
    // 60 prompts of 5 steps, a group at each 20 rows or more: 15.
    assert!(groups >= 10, "{groups} step row groups");
    let (cgroups, _) = read(&out.join("candidates.parquet"));
    assert_eq!(
        cgroups, groups,
        "steps and candidates end their groups together"
    );
    let (pgroups, pbatches) = read(&out.join("prompts.parquet"));
    assert_eq!(pgroups, 3, "60 prompts in groups of 20");
    assert_eq!(
        pbatches.iter().map(RecordBatch::num_rows).sum::<usize>(),
        60
    );

    // Row group by row group: a prompt's steps all in one.
    let file = fs::File::open(out.join("steps.parquet")).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let meta = builder.metadata().clone();
    let mut seen = BTreeMap::new();
    for g in 0..meta.num_row_groups() {
        let file = fs::File::open(out.join("steps.parquet")).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .with_row_groups(vec![g])
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            for p in u32s(&b, "prompt_index") {
                let at = seen.entry(p).or_insert(g);
                assert_eq!(*at, g, "prompt {p} in row groups {at} and {g}");
            }
        }
    }
    assert_eq!(seen.len(), 60);
    assert_eq!(
        batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
        300
    );

    // The default bound: one group each.
    trace(&args, &[]);
    assert_eq!(read(&out.join("steps.parquet")).0, 1);
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// SIGINT and SIGTERM in the middle of a run: the tables are closed with the prompts finished
/// so far and those cut short (stop reason interrupted), each prompt's steps whole; run.json
/// says interrupted; no temporary is left.
#[test]
fn an_interrupted_run_leaves_valid_tables() {
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let prompts = write_prompts(tmp.path(), 200);
        let out = tmp.path().join("out");
        let mut c = bin();
        c.args([
            "trace",
            "--backend",
            "test",
            "--model",
            "151936:1:-100",
            "--prompts-file",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "40",
            "--seed",
            "1",
            "--parallel",
            "4",
            "--stop",
            "e",
            "--format",
            "parquet",
            "--out",
            out.to_str().unwrap(),
        ]);
        common::default_signals(&mut c);
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The console prints a line per finished prompt: wait for some. The pipe is read to
        // its end (a closed pipe would end the run with SIGPIPE).
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut finished = 0;
            for line in std::io::BufReader::new(stdout).lines() {
                if line.unwrap().starts_with("prompt ") {
                    finished += 1;
                    if finished == 5 {
                        let _ = tx.send(());
                    }
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("5 prompts finished before the signal");
        // Into the next steps: the slots are busy (a stop string ends the prompts at
        // different steps, so they do not all finish at once).
        std::thread::sleep(Duration::from_millis(100));
        signal(&child, sig);
        let status = common::wait_or_kill(&mut child, Duration::from_secs(60)).expect("ended");
        reader.join().unwrap();
        assert_eq!(status.code(), Some(code), "exit code after signal {sig}");

        let run = read_json(&out.join("run.json"));
        assert_eq!(run["interrupted"], true);
        let (_, prompts) = read(&out.join("prompts.parquet"));
        let mut generated = BTreeMap::new();
        let mut interrupted = 0;
        for b in &prompts {
            let (index, gt, stop) = (
                u32s(b, "prompt_index"),
                u32s(b, "generated_tokens"),
                strs(b, "stop_reason"),
            );
            for i in 0..b.num_rows() {
                generated.insert(index[i], gt[i]);
                match stop[i].as_deref() {
                    Some("interrupted") => interrupted += 1,
                    Some("max_new_tokens") => assert_eq!(gt[i], 40),
                    Some("stop_string") => assert!(gt[i] <= 40),
                    s => panic!("stop reason {s:?}"),
                }
            }
        }
        assert!(
            generated.len() >= 5 && generated.len() < 200,
            "{generated:?}"
        );
        assert!(
            interrupted >= 1,
            "prompts cut short are in the tables: {generated:?}, run.json {}",
            run["stop_reasons"]
        );
        let stops = &run["stop_reasons"];
        assert_eq!(stops["interrupted"].as_u64(), Some(interrupted));
        // Each prompt's steps are whole: 0 .. generated_tokens, once each.
        let mut steps: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for b in &read(&out.join("steps.parquet")).1 {
            for (p, s) in u32s(b, "prompt_index").into_iter().zip(u32s(b, "step")) {
                steps.entry(p).or_default().push(s);
            }
        }
        for (p, n) in &generated {
            let want: Vec<u32> = (0..*n).collect();
            assert_eq!(
                steps.get(p).cloned().unwrap_or_default(),
                want,
                "prompt {p}"
            );
        }
        assert!(read(&out.join("candidates.parquet"))
            .1
            .iter()
            .any(|b| b.num_rows() > 0));
        let left: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporaries left: {left:?}");
    }
}

/// positions.parquet holds compare.json's positions, one row per position and B, with the
/// same values; compare.json and compare.csv are still written.
#[test]
fn compare_positions_equal_compare_json() {
    let tmp = tempfile::tempdir().unwrap();
    let f32 = tiny("tiny-f32.gguf");
    let q8 = tiny("tiny-q8_0.gguf");
    for lens in [false, true] {
        let out = tmp.path().join(format!("cmp-{lens}"));
        let a = format!("llama:{}", f32.display());
        let b1 = format!("llama:{}", q8.display());
        let mut args = vec![
            "compare",
            "--a",
            &a,
            "--b",
            &b1,
            "--b",
            &a,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "10",
            "--seed",
            "4",
            "--format",
            "parquet",
            "--out",
            out.to_str().unwrap(),
        ];
        if lens {
            args.push("--lens");
        }
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.join("compare.csv").exists());
        let report = read_json(&out.join("compare.json"));
        let positions = report["positions"].as_array().unwrap();
        let labels: Vec<&str> = report["b"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["label"].as_str().unwrap())
            .collect();
        let mut want = Vec::new();
        for p in positions {
            for (bi, b) in p["b"].as_array().unwrap().iter().enumerate() {
                want.push((p, bi, b));
            }
        }
        assert!(want.len() >= 18, "{} rows", want.len());
        let (_, batches) = read(&out.join("positions.parquet"));
        let mut row = 0;
        for batch in &batches {
            let col_u = |n: &str| u32s(batch, n);
            let col_f = |n: &str| f64s(batch, n);
            let (bcol, index, chunk, pos, token_id) = (
                col_u("b"),
                col_u("index"),
                col_u("chunk"),
                col_u("pos"),
                col_u("token_id"),
            );
            let label = dict_strs(batch, "b_label");
            let token = strs(batch, "token");
            let top1 = batch
                .column_by_name("top1_same")
                .unwrap()
                .as_boolean()
                .clone();
            let (rank, ka, kb) = (
                col_u("b_rank_of_a_top1"),
                col_u("k_used_a"),
                col_u("k_used_b"),
            );
            let lens_kld = batch
                .column_by_name("lens_kld")
                .unwrap()
                .as_list::<i32>()
                .clone();
            let lens_top1 = batch
                .column_by_name("lens_top1_same")
                .unwrap()
                .as_list::<i32>()
                .clone();
            let floats: Vec<(&str, Vec<f64>)> = [
                "kld",
                "p_a",
                "p_b",
                "delta_p",
                "logprob_a",
                "logprob_b",
                "entropy_a",
                "entropy_b",
                "delta_entropy",
                "jaccard",
            ]
            .into_iter()
            .map(|n| (n, col_f(n)))
            .collect();
            for i in 0..batch.num_rows() {
                let (p, bi, b) = want[row];
                let what = format!("row {row} (position {}, B{})", p["index"], bi + 1);
                assert_eq!(bcol[i] as usize, bi + 1, "{what}");
                assert_eq!(label[i], labels[bi], "{what}");
                assert_eq!(index[i], as_u32(&p["index"]), "{what}");
                assert_eq!(chunk[i], as_u32(&p["chunk"]), "{what}");
                assert_eq!(pos[i], as_u32(&p["pos"]), "{what}");
                assert_eq!(token_id[i], as_u32(&p["token_id"]), "{what}");
                assert_eq!(token[i].as_deref(), p["token"].as_str(), "{what}");
                assert_eq!(top1.value(i), b["top1_same"].as_bool().unwrap(), "{what}");
                assert_eq!(rank[i], as_u32(&b["b_rank_of_a_top1"]), "{what}");
                assert_eq!(ka[i], as_u32(&p["a"]["k_used"]), "{what}");
                assert_eq!(kb[i], as_u32(&b["k_used"]), "{what}");
                for (name, values) in &floats {
                    let json = match *name {
                        "p_a" => &p["a"]["prob"],
                        "p_b" => &b["prob"],
                        "logprob_a" => &p["a"]["logprob"],
                        "logprob_b" => &b["logprob"],
                        "entropy_a" => &p["a"]["entropy"],
                        "entropy_b" => &b["entropy"],
                        n => &b[n],
                    };
                    same(json, values[i], &format!("{what} {name}"));
                }
                if lens {
                    assert!(lens_kld.is_valid(i) && lens_top1.is_valid(i), "{what}");
                    let k = lens_kld.value(i);
                    let k = k.as_primitive::<Float64Type>();
                    let jk = b["lens_kld"].as_array().unwrap();
                    assert_eq!(k.len(), jk.len(), "{what}");
                    assert!(!jk.is_empty());
                    for (j, v) in jk.iter().enumerate() {
                        same(v, k.value(j), &format!("{what} lens_kld[{j}]"));
                    }
                    let t = lens_top1.value(i);
                    let t = t.as_boolean();
                    let jt: Vec<bool> = b["lens_top1_same"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_bool().unwrap())
                        .collect();
                    assert_eq!((0..t.len()).map(|j| t.value(j)).collect::<Vec<_>>(), jt);
                } else {
                    assert!(lens_kld.is_null(i) && lens_top1.is_null(i), "{what}");
                }
                row += 1;
            }
        }
        assert_eq!(row, want.len());

        // Without --format parquet, an earlier run's positions.parquet goes.
        let mut json_only: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| *a != "--format" && *a != "parquet")
            .collect();
        json_only.retain(|a| *a != "--lens" || lens);
        let o = run(&json_only);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!out.join("positions.parquet").exists());
        assert!(out.join("compare.json").exists());
    }
}

/// What needs a folder per prompt, or a shard's merge, is refused on one line naming the
/// conflict and the fix.
#[test]
fn conflicts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), 4);
    let out = tmp.path().join("out");
    let base = [
        "trace",
        "--backend",
        "test",
        "--format",
        "parquet",
        "--out",
        out.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        run(&v)
    };
    let o = with(&[
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--seed",
        "1",
        "--shard",
        "0/2",
    ]);
    common::assert_usage_error(&o, "--format parquet");
    assert!(stderr(&o).contains("--shard"), "{}", stderr(&o));
    let o = with(&["--prompt", "hi", "--capture-logit-lens"]);
    common::assert_usage_error(&o, "--capture-logit-lens");
    assert!(stderr(&o).contains("--format json"), "{}", stderr(&o));
    assert!(!out.join("steps.parquet").exists());

    let corpus = tmp.path().join("corpus.txt");
    fs::write(&corpus, "word ".repeat(400)).unwrap();
    let o = run(&[
        "compare",
        "--a",
        "test:300:0",
        "--b",
        "test:300:0",
        "--text-file",
        corpus.to_str().unwrap(),
        "--ctx-size",
        "64",
        "--shard",
        "0/2",
        "--format",
        "parquet",
        "--out",
        out.to_str().unwrap(),
    ]);
    common::assert_usage_error(&o, "--format parquet");
}
