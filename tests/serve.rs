//! `logitprobe serve` against real clients: OpenAI's Python package (pinned in
//! models/requirements.txt), raw HTTP for bad requests, and headless Chromium for the viewer.
//! Every logprob is checked against what `trace` writes and what `compare`'s scoring path
//! (`LogitSource::score`, then `x[next] − ln Σ e^x`) computes for the same ids.

mod common;

use common::server::{http, http_raw, post, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs tests/serve/client.py (OpenAI's client) in the models venv.
fn client(mode: &str, server: &Server, model: &str, input: &Value) -> Value {
    client_with_key(mode, server, model, input, None)
}

fn client_with_key(
    mode: &str,
    server: &Server,
    model: &str,
    input: &Value,
    key: Option<&str>,
) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(root.join("models/python"));
    cmd.arg(root.join("tests/serve/client.py"))
        .args([mode, &server.url(), model])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(k) = key {
        cmd.env("SERVE_KEY", k);
    }
    let mut child = cmd.spawn().expect("run the openai client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("client output");
    assert!(
        out.status.success(),
        "client {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

fn trace(dir: &Path, backend: &str, model: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "trace",
        "--backend",
        backend,
        "--model",
        model,
        "--no-plots",
    ];
    args.extend(["--out", dir.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let o = common::run(&args);
    assert!(o.status.success(), "trace failed: {}", common::stderr(&o));
    common::trace_json(dir)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5, "{what}[{i}]: {x} vs {y}");
    }
}

const PROMPT: &str = "The capital of France is";
const TEMPS: [f64; 4] = [0.0, 0.7, 1.0, 1.3];

/// Completions and chat through the openai client, streamed and not, against `trace`.
fn against_trace(backend: &str, model: &Path) {
    let model_s = model.to_str().unwrap();
    let server = Server::start(&["--backend", backend, "--model", model_s]);
    let id = model.file_name().unwrap().to_str().unwrap();
    let got = client(
        "calls",
        &server,
        id,
        &json!({"prompt": PROMPT, "max_tokens": 8, "top": 3,
                "probe": {"temperature": 0.8, "top_p": 0.95, "seed": 11}}),
    );
    let tmp = tempfile::tempdir().unwrap();

    // Greedy `trace` probes raw at T = 1: its selected_logprob is the raw logprob.
    let t = trace(
        &tmp.path().join("greedy"),
        backend,
        model_s,
        &[
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
    );
    let steps = t["steps"].as_array().unwrap();
    let want: Vec<f64> = steps
        .iter()
        .map(|s| s["raw"]["selected_logprob"].as_f64().unwrap())
        .collect();
    let c = &got["completion"];
    assert_close(
        &floats(&c["token_logprobs"]),
        &want,
        "completion logprobs vs trace",
    );
    // The trace's generated_text is Token Heatmap's: the prompt, then the generation.
    let text = c["text"].as_str().unwrap();
    assert_eq!(
        format!("{PROMPT}{text}"),
        t["metadata"]["generated_text"].as_str().unwrap(),
        "text"
    );
    // Each top map comes most likely first, as OpenAI and vLLM send it (client code reads the
    // first key as the top candidate), and starts with the greedy token, whose logprob it
    // repeats: whole and streamed.
    let s = &got["completion_stream"];
    for (what, tops) in [
        ("whole", &c["top_logprobs"]),
        ("streamed", &s["top_logprobs"]),
    ] {
        let tops = tops.as_array().unwrap();
        assert_eq!(tops.len(), want.len(), "{what}: a top map per token");
        for (i, top) in tops.iter().enumerate() {
            let lps: Vec<f64> = top
                .as_array()
                .unwrap()
                .iter()
                .map(|pair| pair[1].as_f64().unwrap())
                .collect();
            assert!(
                lps.len() >= 2,
                "{what}: step {i} has {} top logprobs",
                lps.len()
            );
            assert!(
                lps.windows(2).all(|w| w[0] >= w[1]),
                "{what}: top_logprobs of step {i} out of order: {top}"
            );
            assert!((lps[0] - want[i]).abs() <= 1e-5, "{what}: top of step {i}");
        }
    }
    assert_eq!(s["text"], c["text"], "stream text equals the whole");
    assert_eq!(s["tokens"], c["tokens"]);
    assert_close(&floats(&s["token_logprobs"]), &want, "streamed logprobs");
    assert_eq!(s["finish_reason"], c["finish_reason"]);
    assert_eq!(
        got["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        want.len()
    );

    // Chat: the same messages through the model's template.
    let t = trace(
        &tmp.path().join("chat"),
        backend,
        model_s,
        &[
            "--prompt",
            PROMPT,
            "--use-chat-template",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
    );
    let steps = t["steps"].as_array().unwrap();
    let ch = &got["chat"];
    let lps = floats(&ch["token_logprobs"]);
    // The end-of-turn token is not content, so it is not in chat's logprobs.
    assert!(
        lps.len() == steps.len() || lps.len() + 1 == steps.len(),
        "{lps:?}"
    );
    let want: Vec<f64> = steps[..lps.len()]
        .iter()
        .map(|s| s["raw"]["selected_logprob"].as_f64().unwrap())
        .collect();
    assert_close(&lps, &want, "chat logprobs vs trace");
    let text = ch["text"].as_str().unwrap();
    assert!(
        t["metadata"]["generated_text"]
            .as_str()
            .unwrap()
            .ends_with(text),
        "chat text {text:?}"
    );
    let cs = &got["chat_stream"];
    assert_eq!(cs["text"], ch["text"]);
    assert_close(
        &floats(&cs["token_logprobs"]),
        &want,
        "streamed chat logprobs",
    );
    assert_eq!(
        got["chat_stream_usage"]["completion_tokens"],
        json!(steps.len())
    );

    // "probe": true gives trace's own raw and processed blocks for the same seed.
    let t = trace(
        &tmp.path().join("sampled"),
        backend,
        model_s,
        &[
            "--prompt",
            PROMPT,
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            "11",
            "--max-new-tokens",
            "8",
        ],
    );
    let probe = got["probe"]["probe"].as_array().expect("probe list");
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(probe.len(), steps.len());
    for (p, s) in probe.iter().zip(steps) {
        assert_eq!(p["selected"], s["selected"]);
        assert_eq!(p["raw"], s["raw"], "raw block of step {}", s["step"]);
        assert_eq!(
            p["processed"], s["processed"],
            "processed block of step {}",
            s["step"]
        );
    }
    assert_eq!(server.stop(), Some(0), "SIGINT ends the server cleanly");
}

#[test]
fn openai_client_on_the_tiny_gguf_matches_trace() {
    against_trace("llama", &common::tiny("tiny-f32.gguf"));
}

#[test]
fn openai_client_on_the_tiny_onnx_matches_trace() {
    against_trace("onnx", &common::tiny("optimum"));
}

#[test]
fn openai_client_on_smollm2_matches_trace() {
    against_trace("llama", &common::smollm2());
}

/// `compare`'s scoring path for the same ids: logprob of `ids[i]` given `ids[..i]`.
fn reference_logprobs(model: &Path, prompts: &[Vec<u32>]) -> Vec<Vec<f64>> {
    use logitprobe::backends::{self, Backend, EngineOptions};
    let mut src = backends::open(
        Backend::Llama,
        model.to_str().unwrap(),
        &EngineOptions::default(),
    )
    .unwrap();
    prompts
        .iter()
        .map(|ids| {
            let logits = src.score(ids).unwrap();
            (1..ids.len())
                .map(|i| {
                    let row = logits.row(i - 1);
                    let row = row.as_slice().unwrap();
                    f64::from(row[ids[i] as usize]) - logitprobe::compare::stats::log_sum_exp(row)
                })
                .collect()
        })
        .collect()
}

fn tokenize(model: &Path, text: &str) -> Vec<u32> {
    use logitprobe::backends::{self, Backend, EngineOptions};
    let src = backends::open(
        Backend::Llama,
        model.to_str().unwrap(),
        &EngineOptions::default(),
    )
    .unwrap();
    src.tokenize(text, false, false).unwrap()
}

#[test]
fn echo_scoring_equals_compares_scoring_and_picks_the_same_answers() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap(), "--parallel", "4"]);
    let id = "tiny-f32.gguf";

    // As lm-evaluation-harness sends them: token ids, echo, max_tokens 0 and 1, logprobs 1.
    let texts = [
        "The cat sat on the mat.",
        "Rivers run to the sea",
        "1 2 3 4 5 6 7",
        "Hello",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tokenize(&model, t)).collect();
    let want = reference_logprobs(&model, &prompts);
    let got = client("score", &server, id, &json!({"prompts": prompts}));
    for max_tokens in ["0", "1"] {
        let choices = got[max_tokens].as_array().unwrap();
        assert_eq!(choices.len(), prompts.len());
        for (p, c) in choices.iter().enumerate() {
            let lps = c["token_logprobs"].as_array().unwrap();
            assert_eq!(
                lps.len(),
                prompts[p].len() + max_tokens.parse::<usize>().unwrap()
            );
            assert!(lps[0].is_null(), "the first prompt token has no logprob");
            let echoed: Vec<f64> = lps[1..prompts[p].len()]
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_close(
                &echoed,
                &want[p],
                &format!("prompt {p}, max_tokens {max_tokens}"),
            );
        }
    }

    // A 50-item multiple-choice set, scored as a harness does: sum of the continuation's
    // logprobs, highest wins.
    let words = [
        "apple", "river", "stone", "cloud", "green", "seven", "music", "paper",
    ];
    let mut items = Vec::new();
    for i in 0..50 {
        let ctx = format!(
            "Question {i}: which word comes after {}? Answer:",
            words[i % 8]
        );
        let options: Vec<String> = (0..4)
            .map(|j| format!(" {}", words[(i * 3 + j * 5 + 1) % 8]))
            .collect();
        items.push((ctx, options));
    }
    let mut all = Vec::new();
    let mut ctx_lens = Vec::new();
    for (ctx, options) in &items {
        let c = tokenize(&model, ctx);
        for o in options {
            let mut ids = c.clone();
            ids.extend(tokenize(&model, o));
            ctx_lens.push(c.len());
            all.push(ids);
        }
    }
    let want = reference_logprobs(&model, &all);
    let (status, resp) = post(
        &server.addr,
        "/v1/completions",
        &json!({"model": id, "prompt": all, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
    );
    assert_eq!(status, 200, "{resp}");
    let mut choices: Vec<&Value> = resp["choices"].as_array().unwrap().iter().collect();
    choices.sort_by_key(|c| c["index"].as_u64());
    let pick = |scores: &[f64]| {
        scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|x| x.0)
            .unwrap()
    };
    for i in 0..50 {
        let mut server_scores = Vec::new();
        let mut ref_scores = Vec::new();
        for j in 0..4 {
            let k = i * 4 + j;
            let lps = choices[k]["logprobs"]["token_logprobs"].as_array().unwrap();
            server_scores.push(
                lps[ctx_lens[k]..]
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .sum::<f64>(),
            );
            ref_scores.push(want[k][ctx_lens[k] - 1..].iter().sum::<f64>());
        }
        assert_close(&server_scores, &ref_scores, &format!("item {i}"));
        assert_eq!(
            pick(&server_scores),
            pick(&ref_scores),
            "item {i} picks the same answer"
        );
    }
}

fn rss_peak_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn metric(addr: &str, name: &str) -> i64 {
    let (_, text) = http(addr, "GET", "/metrics", &[], "");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("logitprobe_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

#[test]
fn load_drops_and_determinism_under_load() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--parallel",
        "8",
        "--max-queue",
        "256",
    ]);
    let id = "tiny-f32.gguf";
    let mut specs = Vec::new();
    for i in 0..16 {
        specs.push(json!({
            "prompt": format!("Story number {i} begins"),
            "chat": i % 3 == 0,
            "stream": i % 2 == 0,
            "temperature": TEMPS[i % 4],
            "top_p": if i % 5 == 0 { Value::from(0.9) } else { Value::Null },
            "seed": 100 + i,
            "max_tokens": 8 + (i % 4) * 4,
        }));
    }
    let rss_before = rss_peak_kb(server.pid());
    let got = client(
        "load",
        &server,
        id,
        &json!({"specs": specs, "clients": 64, "per_client": 8}),
    );
    assert_eq!(got["requests"], json!(512), "{got}");
    assert_eq!(got["n_errors"], json!(0), "{got}");
    assert_eq!(
        got["mismatches"],
        json!(0),
        "a seeded request gives its tokens under load: {got}"
    );
    let rss_after = rss_peak_kb(server.pid());
    assert!(
        rss_after < rss_before + 200_000,
        "peak RSS {rss_before} kB -> {rss_after} kB"
    );

    // Clients that leave mid-stream free their slots.
    let got = client(
        "drop",
        &server,
        id,
        &json!({"clients": 16, "max_tokens": 400}),
    );
    assert_eq!(got["chunks"].as_array().unwrap().len(), 16);
    let t = Instant::now();
    while metric(&server.addr, "slots_busy") > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slots stay busy after clients left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": "still there?", "max_tokens": 2}),
    );
    assert_eq!(status, 200);
    assert_eq!(server.stop(), Some(0));
}

fn assert_api_error(status: u16, body: &str, want_status: u16, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let e = &v["error"];
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"));
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_goes_on() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--ctx-size",
        "64",
        "--max-body-bytes",
        "2000",
        "--api-key",
        "sekrit",
    ]);
    let a = server.addr.clone();
    let key = "Authorization: Bearer sekrit";
    let alive = || {
        let (s, b) = http(
            &a,
            "POST",
            "/v1/completions",
            &[key],
            r#"{"prompt": "ok", "max_tokens": 2}"#,
        );
        assert_eq!(s, 200, "the server goes on serving: {b}");
        let (s, _) = http(&a, "GET", "/health", &[], "");
        assert_eq!(s, 200);
    };
    let cases: Vec<(&str, String, Vec<&str>, u16, &str)> = vec![
        ("/v1/completions", "{\"prompt\": \"x\", ".into(), vec![key], 400, "not valid JSON"),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": "ten"}"#.into(), vec![key], 400, "max_tokens"),
        ("/v1/completions", r#"{"prompt": 7}"#.into(), vec![key], 400, "prompt"),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}"#.into(), vec![key], 400, "above this server's limit of 20"),
        ("/v1/completions", json!({"prompt": "word ".repeat(100), "max_tokens": 4}).to_string(), vec![key], 400, "context holds 64 tokens"),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 64}"#.into(), vec![key], 400, "lower max_tokens"),
        ("/v1/completions", r#"{"model": "gpt-4", "prompt": "x"}"#.into(), vec![key], 404, "does not exist"),
        ("/v1/completions", r#"{"prompt": "x"}"#.into(), vec![], 401, "API key"),
        ("/v1/completions", r#"{"prompt": "x"}"#.into(), vec!["Authorization: Bearer wrong"], 401, "API key"),
        ("/v1/models", String::new(), vec![], 401, "API key"),
        ("/v1/completions", json!({"prompt": "x".repeat(3000)}).to_string(), vec![key], 413, "limit of 2000 bytes"),
        ("/v1/completions", r#"{"prompt": "x", "temperature": -1}"#.into(), vec![key], 400, "temperature"),
        ("/v1/completions", r#"{"prompt": [99999999]}"#.into(), vec![key], 400, "outside the vocabulary"),
        ("/v1/completions", r#"{"prompt": [], "max_tokens": 1}"#.into(), vec![key], 400, "empty"),
    ];
    for (path, body, headers, status, needle) in cases {
        let (s, b) = http(&a, "POST", path, &headers, &body);
        let (s, b) = if path == "/v1/models" {
            http(&a, "GET", path, &headers, "")
        } else {
            (s, b)
        };
        assert_api_error(s, &b, status, needle);
        alive();
    }
    let (s, b) = http(&a, "GET", "/nowhere", &[key], "");
    assert_api_error(s, &b, 404, "no such endpoint");
    // A body that never finishes arriving does not hold the server.
    let mut slow = TcpStream::connect(&a).unwrap();
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro",
    )
    .unwrap();
    alive();
    drop(slow);
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn a_full_queue_answers_503() {
    // The test source never ends a sequence early (EOS bias -100): every request runs its
    // whole max_tokens, so one slot and a queue of one fill up.
    let server = Server::start(&[
        "--backend",
        "test",
        "--model",
        "300:0:-100",
        "--ctx-size",
        "2000000",
        "--parallel",
        "1",
        "--max-queue",
        "1",
    ]);
    let a = server.addr.clone();
    // Long enough that the first request cannot end before the second is queued on a loaded
    // machine (150,000 tokens once did, in a CI run).
    let body = r#"{"prompt": "x", "max_tokens": 1500000}"#;
    let mut waiting = Vec::new();
    for (metric_name, want) in [("slots_busy", 1), ("queue_length", 1)] {
        let a2 = a.clone();
        waiting.push(std::thread::spawn(move || {
            http(&a2, "POST", "/v1/completions", &[], body)
        }));
        let t = Instant::now();
        while metric(&a, metric_name) < want {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{metric_name} never reached {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (s, b) = http(&a, "POST", "/v1/completions", &[], body);
    assert_api_error(s, &b, 503, "busy");
    // SIGINT ends the running and the queued requests; the server exits 0.
    assert_eq!(server.stop(), Some(0));
    for w in waiting {
        let (s, _) = w.join().unwrap();
        assert!(s == 200 || s == 503, "status {s}");
    }
}

#[test]
fn llama_server_completion_endpoint() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let (s, v) = post(
        &server.addr,
        "/completion",
        &json!({"prompt": PROMPT, "n_predict": 6, "n_probs": 3, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    let probs = v["completion_probabilities"].as_array().unwrap();
    assert_eq!(
        probs.len(),
        v["tokens_predicted"].as_u64().unwrap() as usize
    );
    let tmp = tempfile::tempdir().unwrap();
    let t = trace(
        tmp.path(),
        "llama",
        model.to_str().unwrap(),
        &[
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ],
    );
    for (p, st) in probs.iter().zip(t["steps"].as_array().unwrap()) {
        assert_eq!(p["id"], st["selected"]["token_id"]);
        let lp = p["logprob"].as_f64().unwrap();
        assert!((lp - st["raw"]["selected_logprob"].as_f64().unwrap()).abs() < 1e-5);
        assert_eq!(p["top_logprobs"].as_array().unwrap().len(), 3);
    }
    // post_sampling_probs: the processed distribution, as probabilities.
    let (s, v) = post(
        &server.addr,
        "/completion",
        &json!({"prompt": PROMPT, "n_predict": 4, "n_probs": 2, "post_sampling_probs": true, "seed": 5, "top_k": 2}),
    );
    assert_eq!(s, 200, "{v}");
    for p in v["completion_probabilities"].as_array().unwrap() {
        let tops = p["top_probs"].as_array().unwrap();
        let mass: f64 = tops.iter().map(|t| t["prob"].as_f64().unwrap()).sum();
        assert!(
            (mass - 1.0).abs() < 1e-9,
            "top-k 2 keeps all the mass in two tokens: {mass}"
        );
    }
}

#[test]
fn the_viewer_streams_and_shows_candidates_in_chromium() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let mut b = common::cdp::Browser::launch();
    b.navigate(&server.url());
    b.eval("document.querySelector('#prompt').value = 'Once upon a time'");
    b.eval("document.querySelector('#max_tokens').value = '12'");
    b.click("#run");
    let t = Instant::now();
    loop {
        let done = b.eval("document.querySelector('#status').textContent");
        if done.as_str().is_some_and(|s| s.starts_with("done")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the stream did not finish: {done}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = b.eval("document.querySelectorAll('#out .tok.gen').length");
    assert_eq!(n.as_u64(), Some(12), "twelve generated tokens shown");
    b.click("#out .tok.gen");
    let rows = b.eval("document.querySelectorAll('#cands tr.cand').length");
    assert!(
        rows.as_u64().unwrap() >= 8,
        "the candidates of the clicked token: {rows}"
    );
    // The session saved as a Token Heatmap trace validates against its schema.
    let saved = b.eval("JSON.stringify(buildTrace())");
    let trace: Value = serde_json::from_str(saved.as_str().unwrap()).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::tokenheat("tokenheat-trace.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&trace)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "saved trace fails the schema: {errors:?}"
    );
    assert_eq!(trace["steps"].as_array().unwrap().len(), 12);
    assert!(!trace["tokens"]["prompt_token_ids"]
        .as_array()
        .unwrap()
        .is_empty());
    let shot: PathBuf = std::env::temp_dir().join("logitprobe-viewer.png");
    b.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

/// Issue 31, item 2: with `--api-key` the viewer page still loads (a browser cannot send the
/// header for it), asks for the key, and streams with it; the API without the key is 401.
#[test]
fn the_viewer_asks_for_the_api_key_and_streams_with_it() {
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap(), "--api-key", "sekrit"]);
    let a = server.addr.clone();
    let (s, body) = http(&a, "POST", "/v1/completions", &[], r#"{"prompt": "x"}"#);
    assert_api_error(s, &body, 401, "API key");
    let (s, body) = http(&a, "GET", "/metrics", &[], "");
    assert_api_error(s, &body, 401, "API key");
    assert_eq!(http(&a, "GET", "/health", &[], "").0, 200);
    assert_eq!(
        http(&a, "GET", "/", &[], "").0,
        200,
        "the page itself is open"
    );

    let mut b = common::cdp::Browser::launch();
    b.navigate(&server.url());
    let wait_for = |b: &mut common::cdp::Browser, js: &str| {
        let t = Instant::now();
        while b.eval(js).as_bool() != Some(true) {
            assert!(t.elapsed() < Duration::from_secs(30), "never true: {js}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&mut b, "!document.querySelector('#keyform').hidden");
    b.screenshot(&std::env::temp_dir().join("logitprobe-viewer-key.png"));
    b.eval("document.querySelector('#apikey').value = 'wrong'");
    b.click("#keysend");
    wait_for(
        &mut b,
        "document.querySelector('#keyhint').textContent.includes('refused')",
    );
    b.eval("document.querySelector('#apikey').value = 'sekrit'");
    b.click("#keysend");
    wait_for(
        &mut b,
        "document.querySelector('#keyform').hidden && document.querySelector('#meta').textContent.startsWith('model ')",
    );
    b.eval("document.querySelector('#prompt').value = 'Once upon a time'");
    b.eval("document.querySelector('#max_tokens').value = '6'");
    b.click("#run");
    wait_for(
        &mut b,
        "document.querySelector('#status').textContent.startsWith('done')",
    );
    let n = b.eval("document.querySelectorAll('#out .tok.gen').length");
    assert_eq!(n.as_u64(), Some(6), "six generated tokens shown");
}

/// A valid request with one value removed, retyped or made extreme.
fn mutated_request(rng: &mut rand_chacha::ChaCha8Rng) -> (String, String) {
    use rand::Rng;
    let chat = rng.random_bool(0.5);
    let mut v = if chat {
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
               "max_tokens": 3, "logprobs": true, "top_logprobs": 3, "temperature": 0.7, "seed": 1,
               "stream": false, "stop": ["\n"], "n": 1, "probe": true})
    } else {
        json!({"prompt": "The capital of France is", "max_tokens": 3, "logprobs": 3, "echo": false,
               "temperature": 0.0, "top_p": 0.9, "seed": 2, "stream": false, "n": 1})
    };
    let extremes = [
        Value::Null,
        json!(-1),
        json!(0),
        json!(u64::MAX),
        json!(1e308),
        json!("x"),
        json!([]),
        json!({}),
        json!(true),
        json!("\u{0}\u{1F600}"),
        json!([1, 2, 99999999]),
        json!("word ".repeat(400)),
    ];
    let obj = v.as_object_mut().unwrap();
    let keys: Vec<String> = obj.keys().cloned().collect();
    for _ in 0..rng.random_range(1..4) {
        let k = &keys[rng.random_range(0..keys.len())];
        match rng.random_range(0..5) {
            0 => {
                obj.remove(k);
            }
            1 => {
                obj.insert(format!("unknown_{k}"), json!(1));
            }
            _ => {
                obj.insert(
                    k.clone(),
                    extremes[rng.random_range(0..extremes.len())].clone(),
                );
            }
        }
    }
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    (path.to_string(), v.to_string())
}

/// The server under malformed, truncated, oversized and slow requests and clients that leave
/// mid-stream (issue 15): every answer is an HTTP response with an OpenAI-shaped error or a
/// result, never a 500, and the server goes on serving.
#[test]
fn the_server_survives_fuzzed_requests() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("server fuzz seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let model = common::tiny("tiny-f32.gguf");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--ctx-size",
        "128",
        "--max-body-bytes",
        "4000",
    ]);
    let a = server.addr.clone();
    // Slow-loris connections held open through the whole run.
    let mut held = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(&a).unwrap();
        let partial: &[u8] = if i % 2 == 0 {
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"
        } else {
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\": \"a"
        };
        s.write_all(partial).unwrap();
        held.push(s);
    }
    let mut by_status = std::collections::BTreeMap::new();
    for i in 0..300 {
        let (path, body) = mutated_request(&mut rng);
        let kind = rng.random_range(0..10);
        let (status, text) = match kind {
            // Truncated: the declared length is longer than what is sent, then the client
            // closes its side.
            0 => {
                let cut = rng.random_range(0..body.len());
                let mut s = TcpStream::connect(&a).unwrap();
                // Cut in bytes: the cut may fall inside a character, as a dropped
                // connection's would.
                let mut req = format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len(),
                )
                .into_bytes();
                req.extend_from_slice(&body.as_bytes()[..cut]);
                s.write_all(&req).unwrap();
                let _ = s.shutdown(std::net::Shutdown::Write);
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                let t = String::from_utf8_lossy(&buf).into_owned();
                let st = t
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                (st, t)
            }
            // Garbage bytes as the body.
            1 => {
                let junk: Vec<u8> = (0..rng.random_range(1..300))
                    .map(|_| rng.random())
                    .collect();
                let mut req = format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    junk.len()
                )
                .into_bytes();
                req.extend(junk);
                http_raw(&a, &req)
            }
            // A stream left after its first bytes.
            2 => {
                let mut v: Value = serde_json::from_str(&body).unwrap();
                v["stream"] = json!(true);
                v["max_tokens"] = json!(8);
                let b = v.to_string();
                let mut s = TcpStream::connect(&a).unwrap();
                let req = format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                );
                s.write_all(req.as_bytes()).unwrap();
                let mut first = [0u8; 64];
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let n = s.read(&mut first).unwrap_or(0);
                drop(s);
                let t = String::from_utf8_lossy(&first[..n]).into_owned();
                let st = t
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                (st, String::new())
            }
            // Oversized.
            3 => http(
                &a,
                "POST",
                &path,
                &[],
                &json!({"prompt": "y".repeat(5000)}).to_string(),
            ),
            // A wrong method or content type.
            4 => http(&a, "GET", &path, &[], &body),
            _ => http(&a, "POST", &path, &[], &body),
        };
        *by_status.entry(status).or_insert(0) += 1;
        assert!(
            matches!(status, 200 | 400 | 404 | 405 | 413 | 415 | 422 | 503)
                || (kind == 2 && status == 0),
            "case {i} (seed {seed}): status {status} for {path} {body:.300}: {text:.300}"
        );
        if status >= 400 && kind != 2 {
            let b = text.split_once("\r\n\r\n").map_or(text.as_str(), |x| x.1);
            let v: Value = serde_json::from_str(b).unwrap_or_else(|_| {
                panic!("case {i} kind {kind} status {status} {path}: not JSON: {text:.300}")
            });
            assert!(v["error"]["message"].is_string(), "case {i}: {b:.300}");
        }
    }
    println!("server fuzz: {by_status:?}");
    // Still serving, with the slow clients still connected.
    let (s, b) = http(
        &a,
        "POST",
        "/v1/completions",
        &[],
        r#"{"prompt": "ok", "max_tokens": 2}"#,
    );
    assert_eq!(s, 200, "{b}");
    let (s, _) = http(&a, "GET", "/health", &[], "");
    assert_eq!(s, 200);
    drop(held);
    assert_eq!(server.stop(), Some(0), "a clean exit: no panic inside");
}

/// `ignore_eos` (vLLM's and llama-server's field): a choice runs to `max_tokens` /
/// `n_predict` past end-of-generation, and the tokens before it are the same.
#[test]
fn ignore_eos_runs_to_max_tokens() {
    // A test source with a large end-of-sequence bias: every choice ends within a few tokens.
    let server = Server::start(&["--backend", "test", "--model", "400:1:6"]);
    let ask = |ignore: bool| {
        let (s, v) = post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": "a b c", "max_tokens": 12, "seed": 3, "logprobs": 0, "ignore_eos": ignore}),
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let (stopped, went_on) = (ask(false), ask(true));
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert_eq!(
        went_on["choices"][0]["finish_reason"], "length",
        "{went_on}"
    );
    assert_eq!(went_on["usage"]["completion_tokens"], 12);
    let tokens = |v: &Value| {
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (a, b) = (tokens(&stopped), tokens(&went_on));
    assert!(a.len() < 12 && b.len() == 12, "{} and {}", a.len(), b.len());
    assert_eq!(a[..], b[..a.len()]);
    let (s, v) = post(
        &server.addr,
        "/completion",
        &json!({"prompt": "a b c", "n_predict": 9, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tokens_predicted"], 9, "{v}");
}
