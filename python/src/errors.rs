//! Library errors as Python exceptions: the command line's one-line message (src/cli/errors.rs),
//! each setting named by its keyword argument where the command line names its flag, and the
//! exception class by what the user can do about it:
//!
//! - `logitprobe.UsageError` (a `ValueError`): a bad setting or input, what the command line
//!   exits with code 2 for;
//! - `logitprobe.ModelNotFoundError` (a `FileNotFoundError`): a model path that does not exist;
//! - `logitprobe.EngineError` (a `RuntimeError`): anything else.
//!
//! All three derive from `logitprobe.Error`.

use logitprobe::backends::{Error as EngineError, UsageError};
use logitprobe::dist::row::ProbeConfigError;
use logitprobe::dist::sampler::BadSetting;
use logitprobe::generate::prompts::PromptsFileError;
use logitprobe::hub::{other_engine, HubError};
use logitprobe::text::chat::NoChatTemplate;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use std::error::Error as StdError;

/// Which exception class an error becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Usage,
    ModelNotFound,
    Engine,
}

/// A library error, said as the Python package says it.
pub fn to_py(py: Python<'_>, e: &anyhow::Error) -> PyErr {
    let kind = if e.chain().any(is_usage) {
        Kind::Usage
    } else {
        Kind::Engine
    };
    raise(py, kind, message(e))
}

/// An exception of `kind` with `message`.
pub fn raise(py: Python<'_>, kind: Kind, message: String) -> PyErr {
    let name = match kind {
        Kind::Usage => "UsageError",
        Kind::ModelNotFound => "ModelNotFoundError",
        Kind::Engine => "EngineError",
    };
    match class(py, name) {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(e) => e,
    }
}

/// `logitprobe._errors.NAME`, the exception classes (multiple inheritance, which Python
/// classes do simply).
fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let module = MODULE.get_or_try_init(py, || {
        PyModule::import(py, "logitprobe._errors").map(Bound::unbind)
    })?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

/// The whole message on one line: the chain of causes, outermost first, each in keyword
/// terms where it names a setting, then what to change.
pub fn message(e: &anyhow::Error) -> String {
    let engine = e.chain().find_map(|c| c.downcast_ref::<EngineError>());
    let mut msg = String::new();
    for c in e.chain() {
        let part = in_keywords(c).unwrap_or_else(|| c.to_string());
        // An error that shows its cause in its own text is followed in the chain by that
        // cause again.
        if msg.contains(&part) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&part);
    }
    if let Some(fix) = engine.and_then(fix_for) {
        msg.push_str("; ");
        msg.push_str(&fix);
    }
    logitprobe::util::one_line(&msg)
}

/// What the user can fix: the command line's exit code 2.
fn is_usage(c: &(dyn StdError + 'static)) -> bool {
    c.is::<UsageError>()
        || c.is::<EngineError>()
        || c.is::<HubError>()
        || c.is::<PromptsFileError>()
        || c.is::<NoChatTemplate>()
        || c.is::<ProbeConfigError>()
        || c.is::<BadSetting>()
        || c.is::<logitprobe::util::OutputDirError>()
        || c.is::<logitprobe::compare::reference::ReferenceError>()
}

/// The message of a library error that names a setting, in keyword terms; `None` for errors
/// whose own message says it all (a `BadSetting` or `ProbeConfigError` already names the
/// setting as the keyword does).
fn in_keywords(c: &(dyn StdError + 'static)) -> Option<String> {
    if let Some(e) = c.downcast_ref::<HubError>() {
        return Some(hub(e));
    }
    if let Some(e) = c.downcast_ref::<NoChatTemplate>() {
        return Some(format!(
            "model {} has no chat template; give one with chat_template=NAME|JINJA, drop use_chat_template (and system_prompt), or use an instruct model",
            e.model
        ));
    }
    None
}

fn hub(e: &HubError) -> String {
    match e {
        HubError::FileNotInRepo { file, repo } => format!(
            "{file} not found in {repo}: check model_file (the repo's file list is on huggingface.co/{repo})"
        ),
        HubError::RepoNeedsFile { repo } => format!(
            "model {repo} is a repo: name the GGUF file with model_file, e.g. model_file=\"model-q4_k_m.gguf\""
        ),
        HubError::CannotListRepo { repo, reason } => format!(
            "cannot list the files of {repo} on the Hugging Face Hub ({reason}); name the file with model_file=\"FILE.gguf\""
        ),
        HubError::NoCatalogueBuild { alias, backend } => format!(
            "{alias} has no {} build in the catalogue; use backend=\"{}\" or export one (models/README.md)",
            backend.name(),
            other_engine(*backend)
        ),
        HubError::QuantNeedsLlama { model } => format!(
            "{model} names a GGUF quantization: use backend=\"llama\" (or leave backend out)"
        ),
        HubError::QuantAndFile { model } => format!(
            "{model} names its file by quantization and model_file names one too: give one of them"
        ),
        HubError::GgufNeedsLlama { model } => {
            format!("{model} is a GGUF file: use backend=\"llama\" (or leave backend out)")
        }
        HubError::OnnxNeedsOnnx { model, folder } => format!(
            "{model} is {}: use backend=\"onnx\" (or leave backend out)",
            if *folder {
                "a folder (an ONNX export?)"
            } else {
                "an ONNX file"
            }
        ),
    }
}

/// The keyword arguments that fix what an engine refused (the command line's flags).
fn fix_for(e: &EngineError) -> Option<String> {
    Some(match e {
        EngineError::KvCacheTooLarge { .. } | EngineError::KvCacheAlloc { .. } => {
            "lower parallel or ctx_size, or quantize the KV cache (cache_type_k=\"q8_0\", cache_type_v=\"q8_0\")".into()
        }
        EngineError::TooManySlots { max, .. } => format!("use parallel={max} or less"),
        EngineError::ContextFull { .. } => "raise ctx_size or shorten the prompt".into(),
        EngineError::BeyondTrainedContext { .. } => "shorten the prompt".into(),
        EngineError::ContextBeyondModel { .. } => "lower ctx_size".into(),
        EngineError::ModelUnreadable { .. } => "check the model path".into(),
        EngineError::NotGguf { .. } => {
            "pass a .gguf model, or use backend=\"onnx\" for an ONNX folder".into()
        }
        EngineError::NeedsGpuBuild { .. } => {
            "build the package with the llama-cuda, llama-metal or llama-vulkan feature, or drop n_gpu_layers".into()
        }
        EngineError::QuantizedVNeedsFlashAttn { .. } => {
            "drop flash_attn=\"off\", or use cache_type_v=\"f16\"".into()
        }
        EngineError::UnknownDevice { .. } => "pass device=\"cpu\", \"cuda\" or \"auto\"".into(),
        EngineError::CudaUnavailable { .. } => "or use device=\"cpu\"".into(),
        EngineError::OrtLibNotFound => {
            "run models/fetch onnxruntime, `pip install onnxruntime`, or pass ort_lib=\"/path/to/libonnxruntime.so\"".into()
        }
        EngineError::OrtLibMissing { .. } => {
            "fix ort_lib / ORT_DYLIB_PATH or run models/fetch onnxruntime".into()
        }
        EngineError::EngineNotBuilt { engine } => {
            format!("build the package with the `{engine}` feature")
        }
        EngineError::BadTestModel { .. } => "e.g. Model(\"300:0\", backend=\"test\")".into(),
        _ => return None,
    })
}
