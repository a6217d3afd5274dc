//! Turning `--model` into something an engine can open.

use logitprobe_backends::{usage, Backend};
use std::path::Path;

/// A model ready to open.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// A GGUF file, an ONNX folder or file, or the test backend's spec.
    pub path: String,
}

/// Resolves `model` (a path; for the test backend its `VOCAB[:SEED]` spec).
pub fn resolve(
    backend: Backend,
    model: &str,
    model_file: Option<&str>,
) -> anyhow::Result<Resolved> {
    if backend == Backend::Test {
        return Ok(Resolved {
            path: model.to_string(),
        });
    }
    let p = Path::new(model);
    let p = match model_file {
        Some(f) if p.is_dir() => p.join(f),
        _ => p.to_path_buf(),
    };
    if p.exists() {
        return Ok(Resolved {
            path: p.display().to_string(),
        });
    }
    Err(usage!(
        "model {} not found: give the path of a GGUF file or an ONNX folder (models/fetch downloads the default SmolLM2 GGUF)",
        p.display()
    ))
}
