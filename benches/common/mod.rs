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
/// with a fixed seed (probing on and off decode the same tokens); its timings. End-of-
/// generation tokens are ignored, as `llama-bench -n` ignores them: every run decodes
/// `new_tokens` steps whatever the sampled text.
pub fn decode_once(
    src: &mut dyn logitprobe::backends::LogitSource,
    new_tokens: usize,
    probe: bool,
    inside: Option<std::sync::Arc<logitprobe::lens::Inside>>,
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
        sampling: logitprobe::dist::sampler::SamplingConfig {
            temperature: 0.8,
            ..Default::default()
        },
        probe: logitprobe::dist::probe::ProbeConfig::default(),
        max_new_tokens: new_tokens,
        ignore_eos: true,
        seed: 1,
        probe_enabled: probe,
        logprobs: None,
        prompt_logprobs: false,
        inside,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    generate(src, &prompts, &cfg, &mut [], &stop).unwrap().1
}
