//! Helpers shared by the engine benchmarks.

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
