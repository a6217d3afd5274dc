//! `logitprobe serve` throughput, side by side in one run: 8 concurrent streams of 64 tokens
//! on SmolLM2 Q4_1 with `logprobs: 20` + `"probe": true` against plain streams, and against
//! `trace --parallel 8` on the same prompts. Medians of alternating runs; prints the ratios.
//!
//! Both sides ignore end-of-generation (`ignore_eos`, `--ignore-eos`) and check that they
//! generated 8 × 64 tokens: the server's streams draw from other seeds than trace's prompts,
//! and a stream that ends early leaves a slot idle for the rest of the run (one of eight
//! ending at its third token cost the server 12 % of its tokens per step).
//!
//! `cargo bench --bench serve` (BENCH_RUNS, BENCH_THREADS as the other benches).

mod common;

use common::{cache, runs_and_threads};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_logitprobe");
const STREAMS: usize = 8;
const TOKENS: usize = 64;

fn prompt(i: usize) -> String {
    format!("Write a long story about a lighthouse keeper, chapter {i}:")
}

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(model: &str, threads: usize) -> Server {
    let mut child = Command::new(BIN)
        .args(["serve", "--model", model, "--port", "0", "--parallel", "8"])
        .args(["--threads", &threads.to_string(), "--ctx-size", "256"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("listening line")
        .to_string();
    Server(child, addr)
}

/// One streamed completion; returns the tokens it received.
fn stream(addr: &str, i: usize, probe: bool) -> usize {
    let extra = if probe {
        r#", "logprobs": 20, "probe": true"#
    } else {
        ""
    };
    let body = format!(
        r#"{{"prompt": {}, "max_tokens": {TOKENS}, "ignore_eos": true, "temperature": 0.8, "seed": {i}, "stream": true{extra}}}"#,
        serde_json::to_string(&prompt(i)).unwrap()
    );
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    // Every chunk but the last (finish_reason set) carries one token.
    text.matches("\"finish_reason\":null").count()
}

/// Generated tokens per second of 8 concurrent streams.
fn serve_tps(addr: &str, probe: bool) -> f64 {
    let t = Instant::now();
    let handles: Vec<_> = (0..STREAMS)
        .map(|i| {
            let a = addr.to_string();
            std::thread::spawn(move || stream(&a, i, probe))
        })
        .collect();
    let tokens: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = t.elapsed().as_secs_f64();
    assert_eq!(
        tokens,
        STREAMS * TOKENS,
        "every stream runs its {TOKENS} tokens"
    );
    tokens as f64 / elapsed
}

/// `trace --parallel 8` on the same prompts: generated tokens per second of its whole run
/// after loading (run.json's loop timings).
fn trace_tps(model: &str, threads: usize, dir: &std::path::Path) -> f64 {
    let file = dir.join("prompts.txt");
    let lines: Vec<String> = (0..STREAMS).map(prompt).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = dir.join("out");
    let o = Command::new(BIN)
        .args([
            "trace",
            "--model",
            model,
            "--prompts-file",
            file.to_str().unwrap(),
        ])
        .args([
            "--parallel",
            "8",
            "--max-new-tokens",
            &TOKENS.to_string(),
            "--no-plots",
        ])
        .args([
            "--temperature",
            "0.8",
            "--seed",
            "1",
            "--ctx-size",
            "256",
            "--ignore-eos",
        ])
        .args([
            "--threads",
            &threads.to_string(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["timings"]["generated_tokens"].as_u64(),
        Some((STREAMS * TOKENS) as u64),
        "every prompt runs its {TOKENS} tokens"
    );
    run["timings"]["tokens_per_s"]
        .as_f64()
        .expect("tokens_per_s")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("serve bench: run with `cargo bench --bench serve`");
        return;
    }
    let (runs, threads) = runs_and_threads(3);
    let model = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = model.to_str().unwrap();
    println!("SmolLM2-135M-Instruct Q4_1, {STREAMS} concurrent streams × {TOKENS} tokens; medians of {runs}");
    for &t in &threads {
        let server = start(model, t);
        let dir = tempfile::tempdir().unwrap();
        serve_tps(&server.1, false); // warm-up
        let (mut plain, mut probed, mut traced) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            plain.push(serve_tps(&server.1, false));
            probed.push(serve_tps(&server.1, true));
            traced.push(trace_tps(model, t, dir.path()));
        }
        println!(
            "{t} thread(s), each round: serve plain {plain:.1?}, probed {probed:.1?}; trace {traced:.1?}"
        );
        let (p, q, r) = (median(plain), median(probed), median(traced));
        println!(
            "{t} thread(s): serve {p:.1} tok/s plain, {q:.1} with logprobs 20 + probe (ratio {:.2}, goal ≥ 0.95); trace --parallel 8 {r:.1} tok/s (serve plain / trace {:.2}, probed / trace {:.2}, goal ≥ 0.9)",
            q / p,
            p / r,
            q / r
        );
    }
}
