//! Helpers shared by the engine benchmarks.
#![allow(dead_code)] // each bench uses a part of it

use std::path::PathBuf;

/// The models/fetch cache: $LOGITPROBE_CACHE, else $XDG_CACHE_HOME/logitprobe, else
/// ~/.cache/logitprobe.
pub fn cache() -> PathBuf {
    std::env::var_os("LOGITPROBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("logitprobe")
        })
}

/// `BENCH_RUNS` (else `default_runs`) and `BENCH_THREADS` (else "1,2"): how many alternating
/// runs, and at which thread counts.
pub fn runs_and_threads(default_runs: usize) -> (usize, Vec<usize>) {
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default_runs);
    let threads = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    (runs, threads)
}

/// The median (the middle pair's mean for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The prompt the engine benchmarks decode from.
pub const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

/// One generation of `new_tokens` from [`PROMPT`] through the loop `trace` runs, at T 0.8
/// with a fixed seed (probing on and off decode the same tokens); its timings.
pub fn decode_once(
    src: &mut dyn logitprobe::backends::LogitSource,
    new_tokens: usize,
    probe: bool,
    inside: Option<std::sync::Arc<logitprobe::inside::Inside>>,
) -> logitprobe::generate::Timings {
    use logitprobe::generate::{generate, GenerateConfig, PromptInput};
    let ids = src.tokenize(PROMPT, src.info().add_bos, false).unwrap();
    let prompts = [PromptInput {
        index: 0,
        prompt: PROMPT.into(),
        rendered: PROMPT.into(),
        ids,
        ..Default::default()
    }];
    let cfg = GenerateConfig {
        sampling: logitprobe::sampler::SamplingConfig {
            temperature: 0.8,
            ..Default::default()
        },
        probe: logitprobe::probe::ProbeConfig::default(),
        max_new_tokens: new_tokens,
        seed: 1,
        probe_enabled: probe,
        logprobs: None,
        prompt_logprobs: false,
        inside,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    generate(src, &prompts, &cfg, &mut [], &stop, &())
        .unwrap()
        .1
}

/// A source whose model has no end-of-generation token, so a generation runs its full length
/// as `llama-bench -n` does (it ignores end-of-sequence): the decode rows compare the same
/// number of steps whatever the sampled text.
pub struct NoEog {
    pub inner: Box<dyn logitprobe::backends::LogitSource>,
    info: logitprobe::backends::ModelInfo,
}

impl NoEog {
    pub fn new(inner: Box<dyn logitprobe::backends::LogitSource>) -> Self {
        let mut info = inner.info().clone();
        info.eog.clear();
        Self { inner, info }
    }
}

impl logitprobe::backends::LogitSource for NoEog {
    fn info(&self) -> &logitprobe::backends::ModelInfo {
        &self.info
    }
    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<logitprobe::backends::TokenId>> {
        self.inner.tokenize(text, add_bos, parse_special)
    }
    fn token_bytes(&self, id: logitprobe::backends::TokenId) -> Option<Vec<u8>> {
        self.inner.token_bytes(id)
    }
    fn is_special(&self, id: logitprobe::backends::TokenId) -> bool {
        self.inner.is_special(id)
    }
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template()
    }
    fn begin(&mut self, n_seqs: usize) -> anyhow::Result<()> {
        self.inner.begin(n_seqs)
    }
    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        self.inner.clear_slot(slot)
    }
    fn decode_rows(
        &mut self,
        batch: &[(usize, &[logitprobe::backends::TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<ndarray::Array2<f32>> {
        self.inner.decode_rows(batch, every_position)
    }
    fn score_from(
        &mut self,
        tokens: &[logitprobe::backends::TokenId],
        first: usize,
    ) -> anyhow::Result<ndarray::Array2<f32>> {
        self.inner.score_from(tokens, first)
    }
}
