//! Opening a model with the engine named for it.

use crate::error::Error;
#[cfg(feature = "llama")]
use crate::llama;
#[cfg(feature = "onnx")]
use crate::onnx;
use crate::source::{Backend, EngineOptions, LogitSource};
use crate::test_source;

/// Spec of the test backend's "model": `VOCAB[:SEED[:EOS_BIAS]]`, e.g. `300:0` (the default);
/// an EOS bias of -100 makes runs go on until `--max-new-tokens`.
pub fn open_test_source(spec: &str) -> anyhow::Result<test_source::TestSource> {
    let spec = spec.trim();
    let spec = if spec.is_empty() || spec == "test" {
        "300"
    } else {
        spec
    };
    let mut parts = spec.split(':');
    let vocab = parts.next().and_then(|v| v.parse::<usize>().ok());
    let seed = parts.next().map_or(Some(0), |s| s.parse::<u64>().ok());
    let bias = parts.next().map_or(Some(-1.0), |b| b.parse::<f32>().ok());
    match (vocab, seed, bias, parts.next()) {
        (Some(v), Some(s), Some(b), None) if v >= test_source::TOKENIZER_VOCAB && b.is_finite() => {
            Ok(test_source::TestSource::new(v, s).with_eos_bias(b))
        }
        _ => Err(Error::BadTestModel {
            spec: spec.to_string(),
            min_vocab: test_source::TOKENIZER_VOCAB,
        }
        .into()),
    }
}

/// Opens `model` with `backend`.
pub fn open(
    backend: Backend,
    model: &str,
    opts: &EngineOptions,
) -> anyhow::Result<Box<dyn LogitSource>> {
    match backend {
        Backend::Test => {
            let mut src = open_test_source(model)?;
            if let Some(n) = opts.ctx_size {
                src = src.with_n_ctx(n);
            }
            Ok(Box::new(src))
        }
        #[cfg(feature = "llama")]
        Backend::Llama => Ok(Box::new(llama::LlamaSource::open(
            std::path::Path::new(model),
            opts,
        )?)),
        #[cfg(feature = "onnx")]
        Backend::Onnx => Ok(Box::new(onnx::OnnxSource::open(
            std::path::Path::new(model),
            opts,
        )?)),
        #[allow(unreachable_patterns)]
        other => Err(Error::EngineNotBuilt {
            engine: other.name(),
        }
        .into()),
    }
}
