//! Decode throughput of the real engines on SmolLM2-135M-Instruct, printed as ratios measured
//! side by side in one run (alternating runs, medians), never as timed tests:
//!
//! - llama.cpp, Q4_1 GGUF: probing on vs off (goal: on ≥ 0.97 × off at 1 thread);
//! - ONNX Runtime, the ONNX twin: probing on vs off, and decoding with the KV cache vs
//!   re-running the whole prefix every step (goal ≥ 3×), 128 new tokens.
//!
//! Run: `cargo bench --bench engines` (after models/fetch and models/export-onnx). Set
//! `BENCH_RUNS` (default 5) for more alternations, `BENCH_THREADS` (default "1,2").

mod common;

use common::{cache, decode_once, median, runs_and_threads, PROMPT};
use logitprobe::backends::{EngineOptions, LogitSource, ModelInfo, TokenId, Vocab};
use ndarray::Array2;

/// Decode tokens/s of one generation (the same loop as `trace`).
fn decode_tps(src: &mut dyn LogitSource, new_tokens: usize, probe: bool) -> f64 {
    decode_once(src, new_tokens, probe, None).decode_tokens_per_s
}

/// Alternates `a` and `b` `runs` times each; returns (median a, median b).
fn alternate(runs: usize, mut a: impl FnMut() -> f64, mut b: impl FnMut() -> f64) -> (f64, f64) {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        va.push(a());
        vb.push(b());
    }
    (median(va), median(vb))
}

/// A source that forgets its KV cache: every step re-runs the whole prefix through `score`.
struct RerunPrefix<S> {
    inner: S,
    history: Vec<Vec<TokenId>>,
}

impl<S: LogitSource> Vocab for RerunPrefix<S> {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn tokenize(&self, t: &str, b: bool, s: bool) -> anyhow::Result<Vec<TokenId>> {
        self.inner.tokenize(t, b, s)
    }
    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        self.inner.token_bytes(id)
    }
    fn is_special(&self, id: TokenId) -> bool {
        self.inner.is_special(id)
    }
    fn chat_template(&self) -> Option<String> {
        None
    }
}

impl<S: LogitSource> LogitSource for RerunPrefix<S> {
    fn begin(&mut self, n: usize) -> anyhow::Result<()> {
        self.history = vec![Vec::new(); n];
        Ok(())
    }
    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        self.history[slot].clear();
        Ok(())
    }
    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        anyhow::ensure!(
            !every_position.iter().any(|&e| e),
            "the rerun source returns last positions only"
        );
        let mut out = Array2::zeros((batch.len(), self.info().n_vocab));
        for (r, &(seq, toks)) in batch.iter().enumerate() {
            self.history[seq].extend_from_slice(toks);
            let all = self.inner.score(&self.history[seq])?;
            out.row_mut(r).assign(&all.row(all.nrows() - 1));
        }
        Ok(out)
    }
    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        self.inner.score_from(tokens, first)
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("engines bench: run with `cargo bench --bench engines`");
        return;
    }
    let (runs, threads) = runs_and_threads(5);
    #[cfg(feature = "llama")]
    let gguf = cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let onnx = cache().join("SmolLM2-135M-Instruct-onnx");
    println!(
        "SmolLM2-135M-Instruct, prompt of {} chars; medians of {runs} alternating runs each",
        PROMPT.len()
    );
    for &t in &threads {
        let opts = EngineOptions {
            threads: Some(t),
            ctx_size: Some(1024),
            ..Default::default()
        };
        #[cfg(feature = "llama")]
        {
            let mut src = logitprobe::backends::llama::LlamaSource::open(&gguf, &opts)
                .expect("run models/fetch first");
            decode_tps(&mut src, 16, true); // warm-up
            let cell = std::cell::RefCell::new(src);
            let (on, off) = alternate(
                runs,
                || decode_tps(&mut *cell.borrow_mut(), 128, true),
                || decode_tps(&mut *cell.borrow_mut(), 128, false),
            );
            println!("llama.cpp Q4_1, {t} thread(s), 128 tokens: probing on {on:.1} tok/s, off {off:.1} tok/s, on/off = {:.3}", on / off);
        }
        #[cfg(feature = "onnx")]
        {
            let src = logitprobe::backends::onnx::OnnxSource::open(&onnx, &opts)
                .expect("run models/export-onnx first");
            let cell = std::cell::RefCell::new(src);
            decode_tps(&mut *cell.borrow_mut(), 16, true);
            let (on, off) = alternate(
                runs,
                || decode_tps(&mut *cell.borrow_mut(), 128, true),
                || decode_tps(&mut *cell.borrow_mut(), 128, false),
            );
            println!("ONNX Runtime fp32, {t} thread(s), 128 tokens: probing on {on:.1} tok/s, off {off:.1} tok/s, on/off = {:.3}", on / off);
            let src = cell.into_inner();
            let rerun = std::cell::RefCell::new(RerunPrefix {
                inner: src,
                history: Vec::new(),
            });
            let kv_runs = runs.min(3);
            let (kv, re) = alternate(
                kv_runs,
                || decode_tps(&mut rerun.borrow_mut().inner, 128, false),
                || decode_tps(&mut *rerun.borrow_mut(), 128, false),
            );
            println!(
                "ONNX Runtime fp32, {t} thread(s), 128 tokens: KV cache {kv:.1} tok/s, re-running the prefix {re:.1} tok/s, ratio = {:.2}× (medians of {kv_runs})",
                kv / re
            );
        }
    }
}
