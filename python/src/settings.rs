//! Keyword arguments to the library's settings, checked as the command line checks its flags
//! (`trace`'s defaults, the library's own checks and messages), each named by its keyword.

use crate::errors;
use logitprobe::backends::{usage, EngineOptions, FlashAttn};
use logitprobe::dist::probe::ProbeConfig;
use logitprobe::dist::sampler::{self, SamplingConfig};
use logitprobe::generate::prompts::PromptFormat;
use logitprobe::generate::GenerateConfig;
use pyo3::prelude::*;
use pyo3::types::PyString;
use std::path::PathBuf;

/// A count that must be at least `min`.
pub fn count(name: &str, v: i64, min: i64, fix: &str) -> anyhow::Result<usize> {
    if v < min {
        return Err(usage!("{name} {v} {fix}"));
    }
    Ok(v as usize)
}

/// An optional count of at least 1.
pub fn positive(name: &str, v: Option<i64>, fix: &str) -> anyhow::Result<Option<usize>> {
    v.map(|v| count(name, v, 1, fix)).transpose()
}

/// A `str` or a sequence of `str` (a lone `str` is one item, not its characters).
pub fn strings(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![s.to_cow()?.into_owned()]);
    }
    let type_error = |what: String| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be a str or a list of str, not {what}"
        ))
    };
    let iter = obj.try_iter().map_err(|_| type_error(type_name(obj)))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        match item.cast::<PyString>() {
            Ok(s) => out.push(s.to_cow()?.into_owned()),
            Err(_) => {
                return Err(type_error(format!(
                    "a list holding {} at index {i}",
                    type_name(&item)
                )))
            }
        }
    }
    Ok(out)
}

/// The name of an object's type, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A path argument (`str` or `os.PathLike`), `~` expanded as Python expands it.
pub fn path(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    let os = py.import("os")?;
    let fspath = os.call_method1("fspath", (obj,)).map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be a str or os.PathLike, not {}",
            type_name(obj)
        ))
    })?;
    let expanded = os.getattr("path")?.call_method1("expanduser", (fspath,))?;
    expanded.extract::<String>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be a str or os.PathLike of str, not {}",
            type_name(obj)
        ))
    })
}

/// The engine keyword arguments of `Model` and `compare` (`trace`'s engine flags).
#[derive(Debug, Clone, Default)]
pub struct EngineArgs {
    pub threads: Option<i64>,
    pub threads_batch: Option<i64>,
    pub ctx_size: Option<i64>,
    pub batch_size: Option<i64>,
    pub n_gpu_layers: i64,
    pub flash_attn: Option<String>,
    pub cache_type_k: Option<String>,
    pub cache_type_v: Option<String>,
    pub device: Option<String>,
    pub ort_lib: Option<PathBuf>,
    pub verbose: bool,
}

impl EngineArgs {
    /// The engine options; thread counts out of range are refused with the machine's count,
    /// as the command line refuses them.
    pub fn options(&self) -> anyhow::Result<EngineOptions> {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = [None, None];
        for (slot, (name, t)) in threads.iter_mut().zip([
            ("threads", self.threads),
            ("threads_batch", self.threads_batch),
        ]) {
            match t {
                Some(n) if n < 1 => {
                    return Err(usage!(
                        "{name} {n} runs nothing: use 1 to {} (this machine has {logical} logical CPUs)",
                        4 * logical
                    ))
                }
                Some(n) if n as u64 > 4 * logical as u64 => {
                    return Err(usage!(
                        "{name} {n} is far more than this machine's {logical} logical CPUs: use at most {} (the default is {}, its physical cores)",
                        4 * logical,
                        logitprobe::backends::physical_cores()
                    ))
                }
                Some(n) => *slot = Some(n as usize),
                None => {}
            }
        }
        let ctx_size = positive(
            "ctx_size",
            self.ctx_size,
            "holds nothing: use 1 or more, or None for what the job needs",
        )?;
        let batch_size = positive(
            "batch_size",
            self.batch_size,
            "is invalid: use 1 or more, or None for 512",
        )?;
        let n_gpu_layers = count(
            "n_gpu_layers",
            self.n_gpu_layers,
            0,
            "is invalid: use 0 (the CPU) or more",
        )?;
        let flash_attn = match self.flash_attn.as_deref() {
            None | Some("auto") => FlashAttn::Auto,
            Some("on") => FlashAttn::On,
            Some("off") => FlashAttn::Off,
            Some(other) => {
                return Err(usage!(
                    "flash_attn {other:?} is unknown: use \"on\", \"off\" or \"auto\""
                ))
            }
        };
        Ok(EngineOptions {
            threads: threads[0],
            threads_batch: threads[1],
            ctx_size,
            batch_size,
            n_gpu_layers: u32::try_from(n_gpu_layers).unwrap_or(u32::MAX),
            flash_attn,
            cache_type_k: self.cache_type_k.clone(),
            cache_type_v: self.cache_type_v.clone(),
            device: self.device.clone(),
            ort_lib: self.ort_lib.clone(),
            verbose: self.verbose,
            fast_scoring: false,
        })
    }
}

/// The probe's keyword arguments.
pub fn probe(min_k: i64, max_k: i64, mass_threshold: f64) -> anyhow::Result<ProbeConfig> {
    let fix = "is invalid: keep at least one candidate (1 or more)";
    let probe = ProbeConfig {
        min_k: count("min_k", min_k, 0, fix)?,
        max_k: count("max_k", max_k, 0, fix)?,
        mass_threshold,
        eps: 1e-12,
    };
    probe.validate()?;
    Ok(probe)
}

/// The generation keyword arguments of `trace` and `stream` (`trace`'s flags, with its
/// defaults).
#[derive(Debug, Clone)]
pub struct GenArgs {
    pub max_new_tokens: i64,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub min_p: f64,
    pub repeat_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: Option<i128>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub system_prompt: Option<String>,
    pub use_chat_template: bool,
    pub chat_template: Option<String>,
    pub parse_special: bool,
    pub min_k: i64,
    pub max_k: i64,
    pub mass_threshold: f64,
}

/// What a trace or a stream runs with.
#[derive(Debug, Clone)]
pub struct Plan {
    pub gen: GenerateConfig,
    pub format: PromptFormat,
    pub stop: Vec<String>,
    pub system_prompt: Option<String>,
}

impl GenArgs {
    /// The settings, checked in the order `trace` checks its flags.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_k: count(
                "top_k",
                self.top_k,
                0,
                "is invalid: use 0 (off) or a positive number such as 40",
            )?,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty as f32,
            presence_penalty: self.presence_penalty as f32,
            frequency_penalty: self.frequency_penalty as f32,
        };
        sampling.validate()?;
        let probe = probe(self.min_k, self.max_k, self.mass_threshold)?;
        if self.max_new_tokens < 1 {
            return Err(usage!(
                "max_new_tokens {} generates nothing: use 1 or more",
                self.max_new_tokens
            ));
        }
        let seed = match self.seed {
            None => sampler::fresh_seed(),
            Some(s) => u64::try_from(s).map_err(|_| {
                usage!("seed {s} is invalid: use a whole number from 0 to 2**64 - 1, or None for a fresh one")
            })?,
        };
        let chat_template = match &self.chat_template {
            Some(t) => {
                let named = logitprobe::text::chat::NAMED_TEMPLATES
                    .iter()
                    .any(|(n, _)| n == t);
                if !named && !t.contains("{%") && !t.contains("{{") {
                    return Err(usage!(
                        "chat_template {t:?} is neither a known name ({}) nor Jinja source: use one of the names, or the template's Jinja source",
                        logitprobe::text::chat::NAMED_TEMPLATES
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                Some(logitprobe::text::chat::template_source(t))
            }
            None => None,
        };
        let use_chat_template = self.use_chat_template || chat_template.is_some();
        if !use_chat_template && self.system_prompt.is_some() {
            return Err(usage!("system_prompt needs use_chat_template=True: a system message only exists inside a chat template"));
        }
        Ok(Plan {
            gen: GenerateConfig {
                sampling,
                probe,
                max_new_tokens: self.max_new_tokens as usize,
                ignore_eos: self.ignore_eos,
                seed,
                probe_enabled: true,
                logprobs: None,
                prompt_logprobs: false,
                inside: None,
            },
            format: PromptFormat {
                use_chat_template,
                chat_template,
                parse_special: self.parse_special,
            },
            stop: self.stop.clone(),
            system_prompt: self.system_prompt.clone(),
        })
    }
}

/// The prompts of a trace: at least one, none empty.
pub fn prompts(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let prompts = strings("prompts", obj)?;
    if prompts.is_empty() {
        return Err(errors::raise(
            py,
            errors::Kind::Usage,
            "no prompt given: pass a str or a non-empty list of str".into(),
        ));
    }
    if let Some(i) = prompts.iter().position(String::is_empty) {
        return Err(errors::raise(
            py,
            errors::Kind::Usage,
            format!("prompts[{i}] is empty: give some text to continue"),
        ));
    }
    Ok(prompts)
}
