//! Finding and loading the ONNX Runtime shared library, and building a session on the asked
//! execution provider.

use crate::{usage, EngineOptions};
use ort::session::Session;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One ONNX Runtime environment per process, ever.
static ENV: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Where ONNX Runtime is looked for, in order.
pub fn find_ort_lib(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    // An empty ORT_DYLIB_PATH (`export ORT_DYLIB_PATH=`) means unset, not the current folder.
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // An onnxruntime (or onnxruntime-gpu) installed with pip, in the active Python or the
    // user's site-packages: both install the package `onnxruntime`.
    let py = std::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .args([
            "-c",
            "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s and s.origin else '')",
        ])
        .output();
    if let Ok(out) = py {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            if let Some(lib) = newest_lib(&Path::new(&dir).join("capi")) {
                return Ok(lib);
            }
        }
    }
    let cache = std::env::var_os("LOGITPROBE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("logitprobe")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/logitprobe")));
    if let Some(lib) = cache.and_then(|c| newest_lib(&c.join("onnxruntime"))) {
        return Ok(lib);
    }
    Err(crate::Error::OrtLibNotFound.into())
}

fn newest_lib(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (n.starts_with("libonnxruntime.so")
                || n == "libonnxruntime.dylib"
                || n == "onnxruntime.dll")
                && !n.contains("providers")
        })
        .collect();
    libs.sort();
    libs.pop()
}

fn ort_log(
    level: ort::logging::LogLevel,
    category: &str,
    _id: &str,
    location: &str,
    message: &str,
) {
    use ort::logging::LogLevel;
    match level {
        LogLevel::Verbose => {
            tracing::trace!(target: "onnxruntime", %category, %location, "{message}")
        }
        LogLevel::Info => tracing::debug!(target: "onnxruntime", %category, "{message}"),
        LogLevel::Warning | LogLevel::Error | LogLevel::Fatal => {
            tracing::info!(target: "onnxruntime", %category, ?level, "{message}")
        }
    }
}

pub(super) fn environment(
    opts: &EngineOptions,
) -> anyhow::Result<(&'static ort::environment::Environment, &'static Path)> {
    let lib = find_ort_lib(opts.ort_lib.as_deref())?;
    if ENV.get().is_none() && !lib.is_file() {
        return Err(crate::Error::OrtLibMissing { path: lib }.into());
    }
    let got = ENV.get_or_init(|| {
        let builder = ort::init_from(&lib).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {}: {e}; logitprobe needs ONNX Runtime 1.{}.x or newer (pip install onnxruntime)",
                lib.display(),
                ort::MINOR_VERSION
            )
        })?;
        // ONNX Runtime's own logger writes ANSI-coloured lines to stderr; its messages go to
        // `tracing` instead (shown with -v). Its errors also come back as the call's error,
        // so none of its lines is needed for the one-line message.
        let env = builder
            .with_name("logitprobe")
            .with_logger(std::sync::Arc::new(ort_log))
            .build()
            .map_err(|e| e.to_string())?;
        Ok((env, lib.clone()))
    });
    match got {
        Ok((env, lib)) => Ok((env, lib.as_path())),
        Err(e) => Err(usage!("{e}")),
    }
}

/// Where a session's model comes from.
#[derive(Clone, Copy)]
pub(super) enum ModelBytes<'a> {
    File(&'a Path),
    /// A model changed in memory (the logit lens adds outputs); external weights are read
    /// from `dir`, where the export keeps them.
    Memory {
        bytes: &'a [u8],
        dir: &'a Path,
        external_data: bool,
    },
}

/// Builds the session on the asked device. `ort::Error<SessionBuilder>` is not Send, so the
/// builder chain stays inside an `ort::Result` function.
pub(super) fn build_session(
    env: &ort::environment::Environment,
    model: ModelBytes<'_>,
    device: &str,
    threads: usize,
) -> anyhow::Result<(Session, String)> {
    fn build(
        env: &ort::environment::Environment,
        model: ModelBytes<'_>,
        cuda: bool,
        threads: usize,
    ) -> ort::Result<Session> {
        let mut b = Session::builder(env)?;
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(ort::Error::<()>::from)?;
        }
        if cuda {
            b = b
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(ort::Error::<()>::from)?;
        }
        match model {
            ModelBytes::File(path) => b.commit_from_file(path),
            ModelBytes::Memory {
                bytes,
                dir,
                external_data,
            } => {
                if external_data {
                    b = b
                        .with_config_entry(
                            "session.model_external_initializers_file_folder_path",
                            dir.to_string_lossy(),
                        )
                        .map_err(ort::Error::<()>::from)?;
                }
                b.commit_from_memory(bytes)
            }
        }
    }
    let model_path = match model {
        ModelBytes::File(p) => p,
        ModelBytes::Memory { dir, .. } => dir,
    };
    let fail = |e: ort::Error| {
        let msg = e.to_string();
        if msg.contains("Protobuf parsing failed")
            || msg.contains("ModelProto")
            || msg.contains("INVALID_PROTOBUF")
        {
            usage!(
                "{} is not a valid ONNX model: {}",
                model_path.display(),
                msg.lines().next().unwrap_or("")
            )
        } else {
            usage!(
                "ONNX Runtime could not load {}: {}",
                model_path.display(),
                msg.lines().next().unwrap_or("")
            )
        }
    };
    match device {
        "cpu" => Ok((
            build(env, model, false, threads).map_err(fail)?,
            "CPUExecutionProvider".into(),
        )),
        "cuda" => match build(env, model, true, threads) {
            Ok(s) => Ok((s, "CUDAExecutionProvider".into())),
            Err(e) => Err(crate::Error::CudaUnavailable {
                reason: e.to_string().lines().next().unwrap_or("").to_string(),
            }
            .into()),
        },
        "auto" => match build(env, model, true, threads) {
            Ok(s) => {
                tracing::info!("device auto picked CUDA");
                eprintln!("device auto: using CUDA");
                Ok((s, "CUDAExecutionProvider".into()))
            }
            Err(e) => {
                eprintln!(
                    "device auto: CUDA unavailable ({}), using CPU",
                    e.to_string().lines().next().unwrap_or("")
                );
                Ok((
                    build(env, model, false, threads).map_err(fail)?,
                    "CPUExecutionProvider".into(),
                ))
            }
        },
        other => Err(crate::Error::UnknownDevice {
            device: other.to_string(),
        }
        .into()),
    }
}
