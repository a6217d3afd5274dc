//! One side of a comparison: which engine and model, and loading it.

use super::SideInfo;
use logitprobe_backends::{usage, Backend, EngineOptions, LogitSource};
use std::path::Path;
use std::time::Instant;

/// `BACKEND:MODEL` of one side.
#[derive(Debug, Clone)]
pub struct SideSpec {
    /// As given, e.g. `llama:model-q4_k_m.gguf`.
    pub label: String,
    pub backend: Backend,
    pub model: String,
}

/// A side with its model loaded.
pub struct LoadedSide {
    pub info: SideInfo,
    pub source: Box<dyn LogitSource>,
    pub load_s: f64,
}

impl SideSpec {
    /// The model's local path (a file, or an ONNX folder) and its sha256 (none for the
    /// test engine, which has no file).
    pub fn locate(&self, name: &str) -> anyhow::Result<(String, Option<String>)> {
        let resolved = crate::hub::resolve(self.backend, &self.model, None)
            .map_err(|e| self.failed(name, e))?;
        let sha = if self.backend == Backend::Test {
            None
        } else {
            crate::hub::sha256_file(Path::new(&resolved.path))
        };
        Ok((resolved.path, sha))
    }

    /// Fails now, naming the side, where its model cannot be found: before a long run of
    /// other sides.
    pub fn check(&self, name: &str) -> anyhow::Result<()> {
        crate::hub::resolve(self.backend, &self.model, None)
            .map(|_| ())
            .map_err(|e| self.failed(name, e))
    }

    /// The side's error, on one line, naming it.
    fn failed(&self, name: &str, e: anyhow::Error) -> anyhow::Error {
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        usage!("side {name} ({}) failed to load: {msg}", self.label)
    }

    /// Loads the side named `name` (`A`, `B2`, ...) with `options`; `located` is what
    /// [`SideSpec::locate`] found, when the caller has it already (hashing a 16 GB model
    /// twice costs half a minute).
    pub fn open(
        &self,
        name: &str,
        options: &EngineOptions,
        located: Option<(String, Option<String>)>,
    ) -> anyhow::Result<LoadedSide> {
        let t = Instant::now();
        let fail = |e: anyhow::Error| self.failed(name, e);
        let (path, sha) = match located {
            Some(l) => l,
            None => self.locate(name)?,
        };
        let source = logitprobe_backends::open(self.backend, &path, options).map_err(fail)?;
        let info = SideInfo::new(
            &self.label,
            self.backend.name(),
            &self.model,
            &path,
            sha,
            &*source,
        );
        Ok(LoadedSide {
            info,
            source,
            load_s: t.elapsed().as_secs_f64(),
        })
    }
}
