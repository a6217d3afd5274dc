//! `logitprobe.compare`: a text scored by side A and each B, compared position by position
//! with the library's comparison (`logitprobe compare --text-file ... --sides-together`: the
//! same numbers as one side at a time), on a thread of its own.

use crate::convert;
use crate::engine;
use crate::errors;
use crate::model::backend_named;
use crate::settings::{self, EngineArgs};
use logitprobe::backends::{usage, LogitSource};
use logitprobe::compare::side::SideSpec;
use logitprobe::compare::{self as lib, BText, Chunk, CompareReport, InputInfo, Timing};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// A side: `BACKEND:MODEL` as the command line takes it, or a model whose engine follows its
/// path.
fn side(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<SideSpec> {
    let given = settings::path(name, obj)?;
    let py = obj.py();
    if let Some((b, m)) = given.split_once(':') {
        if let Ok(Some(backend)) = backend_named(Some(b)) {
            if m.is_empty() {
                return Err(errors::raise(
                    py,
                    errors::Kind::Usage,
                    format!("{name} {given:?} names no model: use e.g. \"llama:model.gguf\""),
                ));
            }
            let model = settings::path(name, &pyo3::types::PyString::new(py, m))?;
            return Ok(SideSpec {
                label: format!("{b}:{model}"),
                backend,
                model,
            });
        }
    }
    let backend = logitprobe::hub::infer_backend(&given, None);
    Ok(SideSpec {
        label: format!("{}:{given}", backend.name()),
        backend,
        model: given,
    })
}

/// Scores `text` with A and every B and compares them: what the Python function returns.
#[allow(clippy::too_many_arguments)]
fn run_compare(
    a: SideSpec,
    bs: Vec<SideSpec>,
    text: String,
    chunk_len: usize,
    score_all: bool,
    max_chunks: Option<usize>,
    probe: logitprobe::dist::probe::ProbeConfig,
    mut opts: logitprobe::backends::EngineOptions,
    stop: &AtomicBool,
) -> anyhow::Result<CompareReport> {
    let t_wall = Instant::now();
    for (i, b) in bs.iter().enumerate() {
        b.check(&lib::b_name(i, bs.len()))?;
    }
    // Each side's context holds a chunk.
    opts.ctx_size = Some(opts.ctx_size.unwrap_or(chunk_len).max(chunk_len));
    let mut timing = Timing::default();
    let mut a = a.open("A", &opts, None)?;
    timing.load_a_s = a.load_s;
    let mut b_sources: Vec<Box<dyn LogitSource>> = Vec::new();
    let mut b_infos = Vec::new();
    for (i, spec) in bs.iter().enumerate() {
        let name = lib::b_name(i, bs.len());
        let b = spec.open(&name, &opts, None)?;
        lib::check_vocab(
            &*a.source,
            &*b.source,
            &format!("side {name} ({})", spec.label),
        )?;
        timing.load_b_s.push(b.load_s);
        b_sources.push(b.source);
        b_infos.push(b.info);
    }
    let (ids, bos) = lib::corpus_tokens(&*a.source, &text)?;
    if ids.is_empty() {
        return Err(usage!("text holds no tokens"));
    }
    let chunks = lib::corpus_chunks(&ids, chunk_len, bos, score_all, max_chunks);
    if chunks.is_empty() {
        return Err(usage!(
            "text has {} tokens, fewer than one ctx_size {chunk_len} chunk: use ctx_size={} or a longer text",
            ids.len(),
            (ids.len() / 2).max(4)
        ));
    }
    let scored: usize = chunks.iter().map(Chunk::scored).sum();
    let input = InputInfo {
        kind: "text".into(),
        source: "text".into(),
        ctx_size: Some(chunk_len),
        chunks: chunks.len(),
        score_all,
        tokens: ids.len(),
        description: format!(
            "text · {} tokens · {} chunk{} of {chunk_len} · {scored} positions scored ({})",
            ids.len(),
            chunks.len(),
            if chunks.len() == 1 { "" } else { "s" },
            if score_all {
                "every position"
            } else {
                "second half of each chunk"
            }
        ),
    };
    let firsts = lib::first_indices(&chunks);
    let t_score = Instant::now();
    let mut positions = Vec::with_capacity(scored);
    // A chunk at a time, so that Ctrl-C stops between two.
    for (c, chunk) in chunks.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        positions.extend(lib::compare_some_chunks(
            &mut *a.source,
            &mut b_sources,
            &[(c, chunk)],
            firsts[c],
            &probe,
            None,
            &mut timing,
            &|_| {},
        )?);
    }
    let score_s = t_score.elapsed().as_secs_f64();
    timing.a_tokens = timing.tokens_evaluated;
    timing.positions_scored = positions.len();
    timing.positions_per_s = positions.len() as f64 / score_s.max(1e-9);
    let mut summaries = Vec::new();
    for (bi, (b, source)) in b_infos.iter().zip(&b_sources).enumerate() {
        let mut s = lib::summarize(&positions, bi, &b.label);
        // How B's own tokenizer splits the text.
        let ids_b = lib::corpus_tokens(&**source, &text)?.0;
        let t = BText {
            b_tokens: ids_b.len(),
            tokenizer_positions_differ: lib::tokenization_difference(&ids, &ids_b),
        };
        s.b_tokens = Some(t.b_tokens);
        s.tokenizer_positions_differ = Some(t.tokenizer_positions_differ);
        summaries.push(s);
    }
    timing.wall_s = t_wall.elapsed().as_secs_f64();
    Ok(CompareReport {
        kind: lib::KIND.into(),
        format_version: lib::FORMAT_VERSION,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: logitprobe::schema::trace::now_rfc3339(),
        command: vec!["logitprobe.compare".into()],
        a: a.info,
        b: b_infos,
        input,
        probe,
        summaries,
        timing,
        lens_layers: None,
        reference: None,
        noise_floor: None,
        positions,
    })
}

/// Scores `text` with model A and each model B, teacher-forced, and compares their
/// distributions position by position: what `logitprobe compare --text-file` computes (KL
/// divergence, Δp, top-1 agreement, PPL and llama-perplexity's statistics), every side loaded
/// at once.
///
/// `a` and each of `b` are a model path (the engine follows it, as `Model` chooses) or
/// `"BACKEND:MODEL"` as the command line takes it. The text is tokenized by A and cut into
/// chunks of `ctx_size` tokens (default 512) as llama-perplexity cuts a corpus; the second
/// half of each is scored (`score_all`: every position); `chunks` scores at most that many.
/// The engine keywords are `Model`'s and apply to every side; `min_k`, `max_k` and
/// `mass_threshold` set the probe's candidates. Ctrl-C stops between two chunks.
#[pyfunction]
#[pyo3(signature = (a, b, *, text, ctx_size = 512, score_all = false, chunks = None, threads = None, threads_batch = None, batch_size = None, n_gpu_layers = 0, flash_attn = None, cache_type_k = None, cache_type_v = None, device = None, ort_lib = None, min_k = 8, max_k = 64, mass_threshold = 0.95, verbose = false))]
#[allow(clippy::too_many_arguments)]
pub fn compare(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    text: String,
    ctx_size: i64,
    score_all: bool,
    chunks: Option<i64>,
    threads: Option<i64>,
    threads_batch: Option<i64>,
    batch_size: Option<i64>,
    n_gpu_layers: i64,
    flash_attn: Option<String>,
    cache_type_k: Option<String>,
    cache_type_v: Option<String>,
    device: Option<String>,
    ort_lib: Option<&Bound<'_, PyAny>>,
    min_k: i64,
    max_k: i64,
    mass_threshold: f64,
    verbose: bool,
) -> PyResult<Comparison> {
    let a = side("a", a)?;
    let bs = if b.is_instance_of::<pyo3::types::PyString>() || b.hasattr("__fspath__")? {
        vec![side("b", b)?]
    } else {
        let mut v = Vec::new();
        for item in b.try_iter().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "b must be a model (str or os.PathLike) or a list of them, not {}",
                settings::type_name(b)
            ))
        })? {
            v.push(side("b", &item?)?);
        }
        v
    };
    let fail = |e: anyhow::Error| errors::to_py(py, &e);
    if bs.is_empty() {
        return Err(fail(usage!(
            "no B to compare with A: pass b=MODEL or a list of models"
        )));
    }
    if text.trim().is_empty() {
        return Err(fail(usage!(
            "text is empty: give a corpus of at least one ctx_size chunk of text"
        )));
    }
    let chunk_len = settings::count(
        "ctx_size",
        ctx_size,
        4,
        "is too short to score anything: use 64 or more",
    )
    .map_err(fail)?;
    let max_chunks = settings::positive(
        "chunks",
        chunks,
        "scores nothing: use 1 or more, or None for all",
    )
    .map_err(fail)?;
    let probe = settings::probe(min_k, max_k, mass_threshold).map_err(fail)?;
    let ort_lib = ort_lib
        .map(|p| settings::path("ort_lib", p).map(PathBuf::from))
        .transpose()?;
    let opts = EngineArgs {
        threads,
        threads_batch,
        ctx_size: None,
        batch_size,
        n_gpu_layers,
        flash_attn,
        cache_type_k,
        cache_type_v,
        device,
        ort_lib,
        verbose,
    }
    .options()
    .map_err(fail)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("logitprobe-compare".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_compare(
                    a, bs, text, chunk_len, score_all, max_chunks, probe, opts, &flag,
                )
            }))
            .unwrap_or_else(|p| {
                Err(anyhow::anyhow!(
                    "the comparison panicked: {}",
                    engine::panic_text(&p)
                ))
            });
            let _ = tx.send(out);
        })
        .map_err(|e| {
            errors::raise(
                py,
                errors::Kind::Engine,
                format!("cannot start the comparison thread: {e}"),
            )
        })?;
    let report = engine::wait(py, rx, Some(&stop))?.map_err(fail)?;
    Ok(Comparison { report })
}

/// What `compare` found: `positions` (one row per scored position and B), `summary` (one row
/// per B: PPL, KLD, Δp and same-top statistics), the whole report as `compare.json` holds it
/// (`to_dict()`), and the command line's tables (`str(comparison)`).
#[pyclass(module = "logitprobe", frozen)]
pub struct Comparison {
    report: CompareReport,
}

#[pymethods]
impl Comparison {
    /// One row per scored position and B, `compare.csv`'s columns: `b` (1 for the first B),
    /// `index`, `chunk`, `pos`, `token_id`, `token`, `kld`, `top1_same`, `p_a`, `p_b`,
    /// `delta_p`, `logprob_a`, `logprob_b`, `b_rank_of_a_top1`, `entropy_a`, `entropy_b`,
    /// `delta_entropy`, `k_used_a`, `k_used_b`, `jaccard` (a `pyarrow.Table`).
    #[getter]
    fn positions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let rows = PyList::empty(py);
        for p in &self.report.positions {
            for (bi, b) in p.b.iter().enumerate() {
                let d = PyDict::new(py);
                d.set_item("b", bi + 1)?;
                d.set_item("index", p.index)?;
                d.set_item("chunk", p.chunk)?;
                d.set_item("pos", p.pos)?;
                d.set_item("token_id", p.token_id)?;
                d.set_item("token", &p.token)?;
                d.set_item("kld", b.kld)?;
                d.set_item("top1_same", b.top1_same)?;
                d.set_item("p_a", p.a.prob)?;
                d.set_item("p_b", b.prob)?;
                d.set_item("delta_p", b.delta_p)?;
                d.set_item("logprob_a", p.a.logprob)?;
                d.set_item("logprob_b", b.logprob)?;
                d.set_item("b_rank_of_a_top1", b.b_rank_of_a_top1)?;
                d.set_item("entropy_a", p.a.entropy)?;
                d.set_item("entropy_b", b.entropy)?;
                d.set_item("delta_entropy", b.delta_entropy)?;
                d.set_item("k_used_a", p.a.k_used)?;
                d.set_item("k_used_b", b.k_used)?;
                d.set_item("jaccard", b.jaccard)?;
                rows.append(d)?;
            }
        }
        convert::table_from_rows(py, &rows)
    }

    /// One row per B: its label, positions, PPL(A) and PPL(B) with errors, Cor(ln PPL),
    /// ln(PPL(B)/PPL(A)) and the ratio, the KLD and Δp spreads (`kld_mean`, `kld_stderr`,
    /// `kld_max`, `kld_p99_9` ... `kld_min`, the same for `delta_p`), RMS Δp, same-top (a
    /// `pyarrow.Table`; nested fields joined with `_`).
    #[getter]
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let rows = PyList::empty(py);
        for s in &self.report.summaries {
            let v = serde_json::to_value(s)
                .map_err(|e| errors::raise(py, errors::Kind::Engine, format!("summary: {e}")))?;
            let d = PyDict::new(py);
            flatten(py, &d, "", &v)?;
            rows.append(d)?;
        }
        convert::table_from_rows(py, &rows)
    }

    /// Per B, its summary as `compare.json` holds it (a list of dicts).
    #[getter]
    fn summaries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialized(py, &self.report.summaries)
    }

    /// The whole report, as `compare.json` holds it (a dict).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialized(py, &self.report)
    }

    /// Writes `compare.json`, `compare.csv`, the plots and `report.html` into `out`, as
    /// `logitprobe compare --out` does.
    fn save(&self, py: Python<'_>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let out = PathBuf::from(settings::path("out", out)?);
        let report = self.report.clone();
        py.detach(move || {
            logitprobe::util::prepare_dir(&out)?;
            lib::write_files(&out, &report)
        })
        .map_err(|e| errors::to_py(py, &e))
    }

    /// The command line's summary table (and, with several B's, the ladder table).
    fn __str__(&self) -> String {
        let mut s = lib::summary_table(&self.report);
        if self.report.b.len() > 1 {
            s.push('\n');
            s.push_str(&lib::ladder_table(&self.report));
        }
        s
    }

    fn __repr__(&self) -> String {
        format!(
            "<logitprobe.Comparison: A {} against {} B{}, {} positions>",
            self.report.a.label,
            self.report.b.len(),
            if self.report.b.len() == 1 { "" } else { "'s" },
            self.report.positions.len()
        )
    }
}

/// Sets `value`'s fields in `d`, nested objects' fields as `outer_inner`.
fn flatten(
    py: Python<'_>,
    d: &Bound<'_, PyDict>,
    prefix: &str,
    value: &serde_json::Value,
) -> PyResult<()> {
    match value {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                flatten(py, d, &key, v)?;
            }
            Ok(())
        }
        v => d.set_item(prefix, convert::value(py, v)?),
    }
}
