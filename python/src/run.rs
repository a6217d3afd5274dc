//! A trace's result ([`Run`]) and a trace as it goes ([`Stream`]), and the jobs that make
//! them on the engine thread: the prompts rendered and tokenized by the library's prompt feed,
//! the context fitted and the slots made as `trace` makes them, then the library's generation
//! loop with its sinks.

use crate::convert;
use crate::engine::{self, Engine};
use crate::errors;
use crate::settings::Plan;
use logitprobe::backends::LogitSource;
use logitprobe::generate::prompts::prepare_prompts;
use logitprobe::generate::{
    self, Control, GenerateConfig, Generation, PromptInput, Sink, StopStrings, Timings,
};
use logitprobe::output::parquet::{self, ParquetInMemory, RowGroupBounds};
use logitprobe::output::tables::{self, PromptRow};
use logitprobe::schema::trace::{Step, Trace};
use logitprobe::Vocab;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// The prompts rendered and tokenized (`trace`'s check of every prompt first), the context
/// fitted to the longest and the slots made: what `trace` does before its loop.
fn prepare(
    source: &mut dyn LogitSource,
    prompts: &[String],
    plan: &Plan,
    ctx_fixed: bool,
    parallel: Option<usize>,
) -> anyhow::Result<(Vec<PromptInput>, usize)> {
    let given: Vec<(String, Option<String>)> = prompts
        .iter()
        .map(|p| (p.clone(), plan.system_prompt.clone()))
        .collect();
    let inputs = prepare_prompts(&*source, &given, &plan.format)?;
    let mut longest = (0, 0);
    for input in &inputs {
        generate::check_prompt(input, usize::MAX)?;
        if input.ids.len() > longest.0 {
            longest = (input.ids.len(), input.index);
        }
    }
    generate::fit_context(source, longest, plan.gen.max_new_tokens, ctx_fixed)?;
    let parallel = generate::open_slots(source, parallel, inputs.len())?;
    Ok((inputs, parallel))
}

/// Each finished prompt into the run's Parquet tables, in prompt order (a prompt that ends
/// early waits for those before it: at most the prompts in the slots), and its trace's
/// metadata and generation kept without their steps, which the tables hold.
struct Collect<'a> {
    model: &'a str,
    gen: &'a GenerateConfig,
    use_chat_template: bool,
    tables: ParquetInMemory,
    /// Finished, waiting for an earlier prompt: index -> steps and prompt row.
    waiting: BTreeMap<usize, (Vec<Step>, PromptRow)>,
    /// The next prompt index the tables take.
    next: usize,
    done: Vec<Option<Kept>>,
}

/// A finished prompt's trace and generation, both without their steps.
type Kept = (Trace, Generation);

impl Collect<'_> {
    fn push_ready(&mut self) -> anyhow::Result<()> {
        while let Some((steps, row)) = self.waiting.remove(&self.next) {
            self.tables.push(&steps, &row)?;
            self.next += 1;
        }
        Ok(())
    }

    /// The tables of every prompt finished; those after a prompt never started (Ctrl-C) go in
    /// their order too.
    fn finish_tables(mut self) -> anyhow::Result<(ParquetTables, Vec<Option<Kept>>)> {
        for (steps, row) in std::mem::take(&mut self.waiting).into_values() {
            self.tables.push(&steps, &row)?;
        }
        Ok((self.tables.finish()?, self.done))
    }
}

impl Sink for Collect<'_> {
    fn finish(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
    ) -> anyhow::Result<()> {
        let mut trace = logitprobe::output::build_trace(
            source,
            self.model,
            input,
            g,
            self.gen,
            self.use_chat_template,
        );
        let row = parquet::prompt_row(source, input, g);
        self.waiting
            .insert(input.index, (std::mem::take(&mut trace.steps), row));
        let mut kept = g.clone();
        kept.steps = Vec::new();
        self.done[input.index] = Some((trace, kept));
        self.push_ready()
    }
}

/// The three tables of a run as Parquet files in memory: steps, candidates, prompts.
type ParquetTables = [Vec<u8>; 3];

/// What a trace produced, made on the engine thread.
pub struct RunData {
    /// Each prompt's index and trace without its steps (they are in `tables`).
    traces: Vec<(usize, Trace)>,
    steps: usize,
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    stop_reasons: Vec<&'static str>,
    seed: u64,
    parallel: usize,
    timings: Timings,
    tables: ParquetTables,
}

/// The trace job: every prompt through the library's loop, collected.
pub fn trace_job(
    source: &mut dyn LogitSource,
    model: &str,
    prompts: &[String],
    plan: &Plan,
    ctx_fixed: bool,
    parallel: Option<usize>,
    stop: &AtomicBool,
) -> anyhow::Result<RunData> {
    let (inputs, parallel) = prepare(source, prompts, plan, ctx_fixed, parallel)?;
    let n = inputs.len();
    let mut collect = Collect {
        model,
        gen: &plan.gen,
        use_chat_template: plan.format.use_chat_template,
        // Row groups of 16,384 steps (65,536 candidates): the rows gathered before encoding stay
        // a few MiB, next to the model.
        tables: ParquetInMemory::new(RowGroupBounds::from_steps(16_384))?,
        waiting: BTreeMap::new(),
        next: 0,
        done: (0..n).map(|_| None).collect(),
    };
    let mut stops = StopStrings::new(&plan.stop);
    let timings = {
        let mut sinks: Vec<&mut dyn Sink> = Vec::new();
        if !plan.stop.is_empty() {
            sinks.push(&mut stops);
        }
        sinks.push(&mut collect);
        let mut feed = inputs.into_iter().map(Ok);
        generate::Generator::new(&plan.gen, parallel)?.run(source, &mut feed, &mut sinks, stop)?
    };
    let (tables, done) = collect.finish_tables()?;
    let mut data = RunData {
        traces: Vec::with_capacity(n),
        steps: 0,
        texts: Vec::with_capacity(n),
        token_ids: Vec::with_capacity(n),
        stop_reasons: Vec::with_capacity(n),
        seed: plan.gen.seed,
        parallel,
        timings,
        tables,
    };
    for (i, done) in done.into_iter().enumerate() {
        // Ctrl-C ends every sequence, finished: a prompt left out is one never started.
        let Some((trace, g)) = done else {
            anyhow::ensure!(stop.load(Ordering::Relaxed), "prompt {i} was not finished");
            continue;
        };
        data.steps += g.generated_ids.len();
        data.texts.push(g.output_text());
        data.token_ids.push(g.generated_ids);
        data.stop_reasons.push(g.stop.name());
        data.traces.push((i, trace));
    }
    Ok(data)
}

/// The result of `Model.trace`: one row per prompt and step in `steps`, per candidate in
/// `candidates`, per prompt in `prompts` (pyarrow Tables, decoded when first read from the
/// zstd Parquet the run is kept as), and each prompt's whole trace as the command line writes
/// it (`traces()`).
#[pyclass(module = "logitprobe", frozen)]
pub struct Run {
    data: RunData,
    tables: [PyOnceLock<Py<PyAny>>; 3],
}

impl Run {
    pub fn new(data: RunData) -> Run {
        Run {
            data,
            tables: [PyOnceLock::new(), PyOnceLock::new(), PyOnceLock::new()],
        }
    }

    fn table<'py>(&self, py: Python<'py>, which: usize) -> PyResult<Bound<'py, PyAny>> {
        let t = self.tables[which].get_or_try_init(py, || {
            convert::parquet_table(py, &self.data.tables[which]).map(Bound::unbind)
        })?;
        Ok(t.bind(py).clone())
    }

    fn table_named<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match name {
            "steps" => self.table(py, 0),
            "candidates" => self.table(py, 1),
            "prompts" => self.table(py, 2),
            _ => Err(errors::raise(
                py,
                errors::Kind::Usage,
                format!("table {name:?} is unknown: use \"steps\", \"candidates\" or \"prompts\""),
            )),
        }
    }
}

#[pymethods]
impl Run {
    /// One row per prompt and step: `prompt_index`, `step`, `token_id`, `token`, then for the
    /// raw and the processed distribution (`raw_`, `processed_`) `entropy`, `k_used`,
    /// `top_mass_used`, `selected_prob`, `selected_logprob`, `selected_rank` (a
    /// `pyarrow.Table`).
    #[getter]
    fn steps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py, 0)
    }

    /// One row per prompt, step, distribution (`raw`, `processed`) and kept candidate:
    /// `prompt_index`, `step`, `distribution`, `rank`, `token_id`, `token`, `prob`, `logprob`
    /// (a `pyarrow.Table`).
    #[getter]
    fn candidates<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py, 1)
    }

    /// One row per prompt: `prompt_index`, `prompt`, `system_prompt`, `prompt_tokens`,
    /// `generated_tokens`, `stop_reason`, `generated_text` (prompt and output, as the trace
    /// file's metadata), `mean_entropy_raw`, `mean_entropy_processed`,
    /// `lowest_raw_selected_prob`, `lowest_raw_selected_step` (a `pyarrow.Table`).
    #[getter]
    fn prompts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py, 2)
    }

    /// Each prompt's generated text (up to a stop string, special tokens skipped).
    #[getter]
    fn texts(&self) -> Vec<String> {
        self.data.texts.clone()
    }

    /// Each prompt's generated token ids.
    #[getter]
    fn token_ids(&self) -> Vec<Vec<u32>> {
        self.data.token_ids.clone()
    }

    /// Why each prompt stopped: `end_of_generation`, `max_new_tokens`, `stop_string`,
    /// `context_full` ...
    #[getter]
    fn stop_reasons(&self) -> Vec<&'static str> {
        self.data.stop_reasons.clone()
    }

    /// The seed the run sampled with (the one given, or a fresh one).
    #[getter]
    fn seed(&self) -> u64 {
        self.data.seed
    }

    /// Sequences decoded together.
    #[getter]
    fn parallel(&self) -> usize {
        self.data.parallel
    }

    /// Where the time went, as run.json's `timings`.
    #[getter]
    fn timings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialized(py, &self.data.timings)
    }

    /// Each prompt's trace as a dict: exactly the `adaptive_token_trace.json` the command
    /// line writes for it (Token Heatmap's schema 2.0.0).
    fn traces<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let [steps, candidates, _] = &self.data.tables;
        let read = || -> anyhow::Result<_> {
            Ok(tables::steps_from_batches(
                &parquet::read_batches(steps)?,
                &parquet::read_batches(candidates)?,
            )?)
        };
        let mut steps = py.detach(read).map_err(|e| errors::to_py(py, &e))?;
        let list = PyList::empty(py);
        for (i, t) in &self.data.traces {
            let mut t = t.clone();
            t.steps = steps.remove(i).unwrap_or_default();
            list.append(convert::serialized(py, &t)?)?;
        }
        Ok(list)
    }

    /// A table as a pandas DataFrame (through pyarrow; needs pandas).
    #[pyo3(signature = (table = "steps"))]
    fn to_pandas<'py>(&self, py: Python<'py>, table: &str) -> PyResult<Bound<'py, PyAny>> {
        self.table_named(py, table)?.call_method0("to_pandas")
    }

    /// A table as a polars DataFrame (through pyarrow; needs polars).
    #[pyo3(signature = (table = "steps"))]
    fn to_polars<'py>(&self, py: Python<'py>, table: &str) -> PyResult<Bound<'py, PyAny>> {
        let t = self.table_named(py, table)?;
        py.import("polars")?.call_method1("from_arrow", (t,))
    }

    fn __len__(&self) -> usize {
        self.data.traces.len()
    }

    fn __repr__(&self) -> String {
        let steps = self.data.steps;
        format!(
            "<logitprobe.Run: {} prompt{}, {steps} steps, seed {}>",
            self.data.traces.len(),
            if self.data.traces.len() == 1 { "" } else { "s" },
            self.data.seed
        )
    }
}

/// What a stream's job sends.
enum Event {
    Step(serde_json::Value),
    Finished {
        text: String,
        stop: &'static str,
        ids: Vec<u32>,
    },
    Failed(anyhow::Error),
}

/// Hands each step to the stream as it is produced; a stream no longer read ends the run.
struct Forward {
    tx: Sender<Event>,
}

impl Sink for Forward {
    fn step(
        &mut self,
        _: &dyn Vocab,
        _: &PromptInput,
        _: &Generation,
        step: &Step,
    ) -> anyhow::Result<Control> {
        let v = serde_json::to_value(step)?;
        Ok(match self.tx.send(Event::Step(v)) {
            Ok(()) => Control::Continue,
            Err(_) => Control::StopAll,
        })
    }

    fn finish(&mut self, _: &dyn Vocab, _: &PromptInput, g: &Generation) -> anyhow::Result<()> {
        let _ = self.tx.send(Event::Finished {
            text: g.output_text(),
            stop: g.stop.name(),
            ids: g.generated_ids.clone(),
        });
        Ok(())
    }
}

/// Starts a stream of `prompt` on `engine`.
pub fn start_stream(
    py: Python<'_>,
    engine: &Engine,
    prompt: String,
    plan: Plan,
    ctx_fixed: bool,
) -> PyResult<Stream> {
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    engine.submit(py, move |source| {
        let failed = tx.clone();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (inputs, _) = prepare(source, &[prompt], &plan, ctx_fixed, Some(1))?;
            let mut stops = StopStrings::new(&plan.stop);
            let mut forward = Forward { tx };
            let mut sinks: Vec<&mut dyn Sink> = Vec::new();
            if !plan.stop.is_empty() {
                sinks.push(&mut stops);
            }
            sinks.push(&mut forward);
            let mut feed = inputs.into_iter().map(Ok);
            generate::Generator::new(&plan.gen, 1)?.run(source, &mut feed, &mut sinks, &flag)?;
            anyhow::Ok(())
        }))
        .unwrap_or_else(|p| {
            Err(anyhow::anyhow!(
                "the engine panicked: {}",
                engine::panic_text(&p)
            ))
        });
        if let Err(e) = run {
            let _ = failed.send(Event::Failed(e));
        }
    })?;
    Ok(Stream {
        rx: Mutex::new(Some(rx)),
        stop,
        finished: Mutex::new(None),
    })
}

/// How a stream ended.
#[derive(Clone)]
struct Finished {
    text: String,
    stop: &'static str,
    ids: Vec<u32>,
}

/// The steps of `Model.stream`, as they are produced: each a dict shaped as a step of the
/// trace file (`step`, `selected` {`token_id`, `token`}, `raw` and `processed` with
/// `k_used`, `entropy`, `top_mass_used`, `selected_prob`, `selected_logprob`,
/// `selected_rank` and `candidates`). Once it is exhausted, `text`, `stop_reason` and
/// `token_ids` say what was generated. Dropping it (or Ctrl-C while it waits) stops the
/// generation after the step in progress.
#[pyclass(module = "logitprobe", frozen)]
pub struct Stream {
    rx: Mutex<Option<Receiver<Event>>>,
    stop: Arc<AtomicBool>,
    finished: Mutex<Option<Finished>>,
}

impl Stream {
    fn done(&self) -> Option<Finished> {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        // Taken out while it is waited on: the lock is not held with the GIL released.
        let Some(rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(None);
        };
        let (got, rx) = engine::wait_keep(py, rx, Some(&self.stop));
        match got? {
            Event::Step(v) => {
                *self.rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
                Ok(Some(convert::value(py, &v)?))
            }
            Event::Finished { text, stop, ids } => {
                *self.finished.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Finished { text, stop, ids });
                Ok(None)
            }
            Event::Failed(e) => Err(errors::to_py(py, &e)),
        }
    }

    /// The generated text, once the stream is exhausted (else None).
    #[getter]
    fn text(&self) -> Option<String> {
        self.done().map(|f| f.text)
    }

    /// Why the generation stopped, once the stream is exhausted (else None).
    #[getter]
    fn stop_reason(&self) -> Option<&'static str> {
        self.done().map(|f| f.stop)
    }

    /// The generated token ids, once the stream is exhausted (else None).
    #[getter]
    fn token_ids(&self) -> Option<Vec<u32>> {
        self.done().map(|f| f.ids)
    }

    /// Stops the generation after the step in progress; the stream then ends.
    fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
