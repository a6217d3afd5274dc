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
