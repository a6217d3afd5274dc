//! `logitprobe.Model`: a model loaded on its engine thread, and what runs on it.

use crate::convert;
use crate::engine::Engine;
use crate::errors;
use crate::run::{self, Run, Stream};
use crate::settings::{self, EngineArgs, GenArgs};
use logitprobe::backends::{usage, Backend};
use logitprobe::compare::{self, Chunk};
use logitprobe::dist::probe::ProbeConfig;
use logitprobe::text::Pieces;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The engine a `backend` keyword names; `None`: from the path, as the command line does.
pub fn backend_named(name: Option<&str>) -> anyhow::Result<Option<Backend>> {
    Ok(match name {
        None => None,
        Some("llama") => Some(Backend::Llama),
        Some("onnx") => Some(Backend::Onnx),
        Some("test") => Some(Backend::Test),
        Some(other) => {
            return Err(usage!(
                "backend {other:?} is unknown: use \"llama\" (GGUF), \"onnx\" (ONNX exports), \"test\", or None to choose from the path"
            ))
        }
    })
}

/// Where a model that cannot be resolved does not exist (a path, or an alias not fetched):
/// a `FileNotFoundError`, with the library's message.
fn not_found(model: &str, e: &anyhow::Error) -> bool {
    let msg = e.to_string();
    msg.starts_with(&format!("model {model} not found"))
        || msg.contains("not in logitprobe's cache")
}

/// What `score` scores: a text, or token ids.
enum ScoreInput {
    Text(String),
    Ids(Vec<u32>),
}

/// `score`'s argument: a str, a list of ints, or a list of those; and whether it was one.
fn score_inputs(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<ScoreInput>, bool)> {
    let bad = |what: String| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "texts must be a str, a list of token ids, or a list of those, not {what}"
        ))
    };
    let one = |item: &Bound<'_, PyAny>| -> PyResult<Option<ScoreInput>> {
        if let Ok(s) = item.cast::<PyString>() {
            return Ok(Some(ScoreInput::Text(s.to_cow()?.into_owned())));
        }
        Ok(item.extract::<Vec<u32>>().ok().map(ScoreInput::Ids))
    };
    if obj.len().is_ok_and(|n| n == 0) {
        return Ok((Vec::new(), false));
    }
    if let Some(input) = one(obj)? {
        return Ok((vec![input], true));
    }
    let iter = obj.try_iter().map_err(|_| bad(settings::type_name(obj)))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        match one(&item)? {
            Some(input) => out.push(input),
            None => {
                return Err(bad(format!(
                    "a list holding {} at index {i}",
                    settings::type_name(&item)
                )))
            }
        }
    }
    Ok((out, false))
}

/// A model loaded by llama.cpp (a GGUF file) or ONNX Runtime (an ONNX export), held by an
/// engine thread of its own until it is closed or dropped.
///
/// `model` is what the command line's `--model` takes: a GGUF file, an ONNX folder (or a file
/// in it), a Hugging Face repo id or a catalogue alias (`~` is expanded). `backend` is
/// `"llama"`, `"onnx"` or `"test"`; None picks it from the path (`.gguf`: llama, a folder or
/// `.onnx`: onnx). The other keywords are `trace`'s engine flags: `threads` (llama.cpp's
/// default is the physical cores), `threads_batch`, `ctx_size` (default: what each job
/// needs, up to the model's trained context), `batch_size`, `n_gpu_layers`, `flash_attn`
/// (`"on"`, `"off"`, `"auto"`), `cache_type_k`, `cache_type_v`, `device` (ONNX Runtime:
/// `"cpu"`, `"cuda"`, `"auto"`), `ort_lib` (the ONNX Runtime library; default: found as the
/// command line finds it), `verbose` (the engine's own log lines).
///
/// Every method releases the GIL while the engine works; Ctrl-C interrupts a call after the
/// step in progress, and the model stays usable. Calls from several threads run one after
/// another.
#[pyclass(module = "logitprobe", frozen)]
pub struct Model {
    engine: Engine,
    /// As given (`~` expanded): what a trace's metadata names.
    model: String,
    path: String,
    backend: Backend,
    /// A context size was given: jobs do not resize it.
    ctx_fixed: bool,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (model, *, backend = None, model_file = None, threads = None, threads_batch = None, ctx_size = None, batch_size = None, n_gpu_layers = 0, flash_attn = None, cache_type_k = None, cache_type_v = None, device = None, ort_lib = None, verbose = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        backend: Option<&str>,
        model_file: Option<String>,
        threads: Option<i64>,
        threads_batch: Option<i64>,
        ctx_size: Option<i64>,
        batch_size: Option<i64>,
        n_gpu_layers: i64,
        flash_attn: Option<String>,
        cache_type_k: Option<String>,
        cache_type_v: Option<String>,
        device: Option<String>,
        ort_lib: Option<&Bound<'_, PyAny>>,
        verbose: bool,
    ) -> PyResult<Model> {
        let model = settings::path("model", model)?;
        let ort_lib = ort_lib
            .map(|p| settings::path("ort_lib", p).map(PathBuf::from))
            .transpose()?;
        let fail = |e: anyhow::Error| errors::to_py(py, &e);
        let explicit = backend_named(backend).map_err(fail)?;
        let engine_args = EngineArgs {
            threads,
            threads_batch,
            ctx_size,
            batch_size,
            n_gpu_layers,
            flash_attn,
            cache_type_k,
            cache_type_v,
            device,
            ort_lib,
            verbose,
        };
        let opts = engine_args.options().map_err(fail)?;
        let backend = logitprobe::hub::infer_backend(&model, explicit);
        logitprobe::hub::check_backend_fits(backend, &model).map_err(fail)?;
        // A Hugging Face download can take a while: not with the GIL held.
        let resolved = {
            let (m, f) = (model.clone(), model_file.clone());
            py.detach(move || logitprobe::hub::resolve(backend, &m, f.as_deref()))
        }
        .map_err(|e| {
            if not_found(&model, &e) {
                errors::raise(py, errors::Kind::ModelNotFound, errors::message(&e))
            } else {
                errors::to_py(py, &e)
            }
        })?;
        let ctx_fixed = opts.ctx_size.is_some();
        let engine = Engine::open(py, backend, resolved.path.clone(), opts)?;
        Ok(Model {
            engine,
            model,
            path: resolved.path,
            backend,
            ctx_fixed,
        })
    }

    /// What the engine says about the model: name, engine and version, device, vocabulary
    /// sizes, context, BOS/EOS and end-of-generation ids, and the engine's details (a dict).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialized(py, &self.engine.info)
    }

    /// The engine: `"llama"`, `"onnx"` or `"test"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// The file or folder the engine opened.
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Token ids of `text`: BOS in front by the model's own rule unless `add_bos` says,
    /// special-token text (`<|im_start|>`) as its id only with `special`.
    #[pyo3(signature = (text, *, add_bos = None, special = false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: String,
        add_bos: Option<bool>,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        self.engine
            .call(py, Arc::new(AtomicBool::new(false)), move |source| {
                let add_bos = add_bos.unwrap_or(source.info().add_bos);
                source.tokenize(&text, add_bos, special)
            })
    }

    /// The text of token ids (bytes that are not UTF-8 replaced); special tokens left out
    /// with `skip_special`.
    #[pyo3(signature = (ids, *, skip_special = false))]
    fn detokenize(&self, py: Python<'_>, ids: Vec<u32>, skip_special: bool) -> PyResult<String> {
        self.engine
            .call(py, Arc::new(AtomicBool::new(false)), move |source| {
                let n = source.info().n_vocab;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
                    return Err(usage!(
                        "token id {bad} is beyond the model's vocabulary of {n}"
                    ));
                }
                Ok(source.detokenize(&ids, skip_special))
            })
    }

    /// Generates from each prompt and traces every step, as `logitprobe trace` does with the
    /// same settings (the same seed gives the same tokens and the same values).
    ///
    /// `prompts` is a str or a list of str. The keywords are `trace`'s flags with their
    /// defaults: `max_new_tokens=64`, `temperature=0.8` (0: greedy), `top_k=0` (off),
    /// `top_p=0.95`, `min_p=0.0`, `repeat_penalty=1.0`, `presence_penalty=0.0`,
    /// `frequency_penalty=0.0`, `seed` (None: a fresh one, see `Run.seed`), `ignore_eos`,
    /// `stop` (a str or a list: end a sequence where its text contains one),
    /// `use_chat_template`, `chat_template` (a name: chatml, gemma, llama3, phi3, or Jinja
    /// source; implies `use_chat_template`), `system_prompt` (with a chat template),
    /// `parse_special`, the probe's `min_k=8`, `max_k=64`, `mass_threshold=0.95`, and
    /// `parallel` (sequences decoded together; default: the prompts, at most 8).
    #[pyo3(signature = (prompts, *, max_new_tokens = 64, temperature = 0.8, top_k = 0, top_p = 0.95, min_p = 0.0, repeat_penalty = 1.0, presence_penalty = 0.0, frequency_penalty = 0.0, seed = None, ignore_eos = false, stop = None, use_chat_template = false, chat_template = None, system_prompt = None, parse_special = true, min_k = 8, max_k = 64, mass_threshold = 0.95, parallel = None))]
    #[allow(clippy::too_many_arguments)]
    fn trace(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repeat_penalty: f64,
        presence_penalty: f64,
        frequency_penalty: f64,
        seed: Option<i128>,
        ignore_eos: bool,
        stop: Option<&Bound<'_, PyAny>>,
        use_chat_template: bool,
        chat_template: Option<String>,
        system_prompt: Option<String>,
        parse_special: bool,
        min_k: i64,
        max_k: i64,
        mass_threshold: f64,
        parallel: Option<i64>,
    ) -> PyResult<Run> {
        let prompts = settings::prompts(py, prompts)?;
        let args = GenArgs {
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            ignore_eos,
            stop: stop
                .map(|s| settings::strings("stop", s))
                .transpose()?
                .unwrap_or_default(),
            system_prompt,
            use_chat_template,
            chat_template,
            parse_special,
            min_k,
            max_k,
            mass_threshold,
        };
        let fail = |e: anyhow::Error| errors::to_py(py, &e);
        let plan = args.plan().map_err(fail)?;
        let parallel = settings::positive("parallel", parallel, "decodes nothing: use 1 or more")
            .map_err(fail)?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let (flag, model, ctx_fixed) = (stop_flag.clone(), self.model.clone(), self.ctx_fixed);
        let data = self.engine.call(py, stop_flag, move |source| {
            run::trace_job(source, &model, &prompts, &plan, ctx_fixed, parallel, &flag)
        })?;
        Ok(Run::new(data))
    }

    /// Generates from one prompt and yields each step as it is produced (a dict shaped as a
    /// step of the trace file); the keywords are `trace`'s. The same seed gives the steps
    /// `trace` gives for the prompt alone.
    #[pyo3(signature = (prompt, *, max_new_tokens = 64, temperature = 0.8, top_k = 0, top_p = 0.95, min_p = 0.0, repeat_penalty = 1.0, presence_penalty = 0.0, frequency_penalty = 0.0, seed = None, ignore_eos = false, stop = None, use_chat_template = false, chat_template = None, system_prompt = None, parse_special = true, min_k = 8, max_k = 64, mass_threshold = 0.95))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repeat_penalty: f64,
        presence_penalty: f64,
        frequency_penalty: f64,
        seed: Option<i128>,
        ignore_eos: bool,
        stop: Option<&Bound<'_, PyAny>>,
        use_chat_template: bool,
        chat_template: Option<String>,
        system_prompt: Option<String>,
        parse_special: bool,
        min_k: i64,
        max_k: i64,
        mass_threshold: f64,
    ) -> PyResult<Stream> {
        let prompt = match prompt.cast::<PyString>() {
            Ok(s) => s.to_cow()?.into_owned(),
            Err(_) => {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "prompt must be a str, not {}",
                    settings::type_name(prompt)
                )))
            }
        };
        if prompt.is_empty() {
            return Err(errors::raise(
                py,
                errors::Kind::Usage,
                "prompt is empty: give some text to continue".into(),
            ));
        }
        let args = GenArgs {
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            ignore_eos,
            stop: stop
                .map(|s| settings::strings("stop", s))
                .transpose()?
                .unwrap_or_default(),
            system_prompt,
            use_chat_template,
            chat_template,
            parse_special,
            min_k,
            max_k,
            mass_threshold,
        };
        let plan = args.plan().map_err(|e| errors::to_py(py, &e))?;
        run::start_stream(py, &self.engine, prompt, plan, self.ctx_fixed)
    }

    /// Teacher-forced log-probabilities: for each text, a numpy float64 array of the
    /// log-probability of each token after the first, given the tokens before it (at
    /// temperature 1, before any sampling setting): the numbers `compare` gives side A and
    /// `trace` gives a token. A text is tokenized as `compare` tokenizes a corpus (BOS in
    /// front by the model's rule, special-token text as text), so entry `i` is token `i + 1`
    /// of `tokenize(text)`; a list of ints is scored as those token ids. One text (or one list
    /// of ids) gives one array, a list of them a list of arrays.
    #[pyo3(signature = (texts))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (inputs, one) = score_inputs(texts)?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let (flag, ctx_fixed) = (stop_flag.clone(), self.ctx_fixed);
        let scored = self.engine.call(py, stop_flag, move |source| {
            let n_vocab = source.info().n_vocab;
            let tokenized = inputs
                .into_iter()
                .map(|input| match input {
                    ScoreInput::Text(t) => compare::corpus_tokens(&*source, &t).map(|(ids, _)| ids),
                    ScoreInput::Ids(ids) => match ids.iter().find(|&&id| id as usize >= n_vocab) {
                        Some(bad) => Err(usage!(
                            "token id {bad} is beyond the model's vocabulary of {n_vocab}"
                        )),
                        None => Ok(ids),
                    },
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let longest = tokenized.iter().map(Vec::len).max().unwrap_or(0);
            if !ctx_fixed {
                source.fit_context(longest)?;
            }
            let probe = ProbeConfig::default();
            let mut pieces = Pieces::default();
            let mut out = Vec::with_capacity(tokenized.len());
            for ids in tokenized {
                if flag.load(Ordering::Relaxed) {
                    anyhow::bail!("interrupted");
                }
                if ids.len() < 2 {
                    out.push(Vec::new());
                    continue;
                }
                let logits = source.score(&ids)?;
                // compare's own view of side A: the probe's logprob of each next token.
                let chunk = Chunk { ids, first: 0 };
                let positions =
                    compare::a_positions(&logits, 0, &chunk, 0, &probe, &*source, &mut pieces)?;
                out.push(positions.iter().map(|p| p.a.logprob).collect());
            }
            Ok(out)
        })?;
        if one {
            return convert::float_array(py, &scored[0]);
        }
        let list = PyList::empty(py);
        for s in &scored {
            list.append(convert::float_array(py, s)?)?;
        }
        Ok(list.into_any())
    }

    /// Frees the model once the calls queued are done, and returns when it is freed; the
    /// model cannot be used after.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.engine.close(py)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.engine.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<logitprobe.Model {:?} on {} {}{}>",
            self.model,
            self.engine.info.engine,
            self.engine.info.engine_version,
            if self.engine.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }
}
