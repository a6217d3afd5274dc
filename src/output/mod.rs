//! Output files of `trace`, as the Token Heatmap tool names them, plus ours.
//!
//! - `steps.jsonl`: appended and flushed after every step, so a crash keeps what finished;
//! - `generated.txt`, `adaptive_token_trace.csv`, `adaptive_token_trace.json`, `run.json`:
//!   written at the end under a temporary name and renamed, so a half-written file never
//!   looks complete.
//!
//! One prompt writes into `--out` itself; several write one sub-folder each, named by the
//! prompt's global index (`prompt-000`, `prompt-001`, ...), with `steps.jsonl`, the run's
//! `run.json` and `summary.csv` (a row per finished prompt) at the top.
//!
//! A prompt's folder is written as soon as it finishes, on a writer thread, so plots are
//! drawn while the engine decodes the next prompts and memory holds only the prompts in
//! the slots.

pub mod parquet;
pub mod tables;

use crate::generate::{Control, GenerateConfig, Generation, PromptInput, Sink};
use crate::schema::run::{PromptRecord, RunRecord};
use crate::schema::trace::{self, Step, Trace};
use crate::text::Pieces;
use anyhow::Context;
use logitprobe_backends::{ModelInfo, Vocab};
use serde::Serialize;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub use crate::schema::layout::{
    GENERATED_TXT, RUN_JSON, STEPS_JSONL, SUMMARY_CSV, TRACE_CSV, TRACE_JSON,
};
pub use crate::util::{prepare_dir, write_atomic, write_json};

/// The CSV header, exactly the seed tool's.
pub const CSV_HEADER: [&str; 14] = [
    "step",
    "source",
    "rank",
    "token_id",
    "token",
    "prob",
    "logprob",
    "selected_token_id",
    "selected_token",
    "selected_prob",
    "selected_logprob",
    "selected_rank",
    "entropy",
    "k_used",
];

/// Whether `name` is a file a trace writes into a run's or a prompt's folder.
fn is_trace_output(name: &str) -> bool {
    use crate::report::{
        ATTENTION_GRID_PNG, ENTROPY_PNG, LOGIT_LENS_PNG, RAW_VS_PROCESSED_PNG, REPORT_HTML,
        SELECTED_PROBABILITY_PNG, SELECTED_RANK_PNG,
    };
    [
        RUN_JSON,
        parquet::STEPS_PARQUET,
        parquet::CANDIDATES_PARQUET,
        parquet::PROMPTS_PARQUET,
        LOGIT_LENS_PNG,
        SELECTED_RANK_PNG,
        ATTENTION_GRID_PNG,
        SUMMARY_CSV,
        STEPS_JSONL,
        TRACE_JSON,
        TRACE_CSV,
        GENERATED_TXT,
        REPORT_HTML,
        ENTROPY_PNG,
        SELECTED_PROBABILITY_PNG,
        RAW_VS_PROCESSED_PNG,
    ]
    .contains(&name)
        // The heatmap and its pages (adaptive_heatmap_2.png, ...).
        || (name.starts_with("adaptive_heatmap") && name.ends_with(".png"))
        // What a killed run left under a temporary name.
        || crate::util::is_partial(name)
}

/// Removes the files an earlier trace left in `dir` and in its `prompt-NNN` folders (an
/// emptied prompt folder goes too), run.json first: a run killed before it finished must not
/// leave the earlier run's complete-looking trace and report beside its own steps. Files
/// that are not a trace's are left alone.
pub fn clear_previous_run(dir: &Path) -> anyhow::Result<()> {
    fn clear(dir: &Path) -> anyhow::Result<()> {
        let marker = dir.join(RUN_JSON);
        if marker.is_file() {
            fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
        }
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if e.file_type()?.is_file() && is_trace_output(&name) {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }
    clear(dir)?;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let is_prompt_dir = name
            .to_str()
            .and_then(|n| n.strip_prefix("prompt-"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
        if is_prompt_dir && e.file_type()?.is_dir() {
            clear(&e.path())?;
            // Left when it holds something of the user's.
            let _ = fs::remove_dir(e.path());
        }
    }
    Ok(())
}

/// Where each prompt's files go.
#[derive(Debug, Clone)]
pub struct PromptDirs {
    pub root: PathBuf,
    /// A run of one prompt writes into the root itself.
    pub single: bool,
    /// Digits of the index in folder names: those of the index space's size, at least 3.
    pub width: usize,
}

impl PromptDirs {
    /// Folders for `n_prompts` prompts whose indices lie in `0..index_space`.
    pub fn new(root: &Path, n_prompts: usize, index_space: usize) -> Self {
        PromptDirs {
            root: root.to_path_buf(),
            single: n_prompts == 1,
            width: index_space.max(1).to_string().len().max(3),
        }
    }

    /// The folder of the prompt with global index `index`.
    pub fn dir(&self, index: usize) -> PathBuf {
        if self.single {
            self.root.clone()
        } else {
            self.root
                .join(format!("prompt-{index:0width$}", width = self.width))
        }
    }
}

/// Streams each finished step to `steps.jsonl`.
pub struct StepsJsonl {
    file: File,
    /// Named in a failed write's error (a full disk).
    path: PathBuf,
    /// One line, written with a single `write` (a buffered writer splits a long line into
    /// several): a process stopped by a signal it handles never leaves half a step. SIGKILL
    /// can still stop that write between two pages, so a killed run may end in a cut line;
    /// readers skip a last line without its newline, as a resumed shard does.
    line: Vec<u8>,
}

impl StepsJsonl {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STEPS_JSONL);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StepsJsonl {
            file,
            path,
            line: Vec::new(),
        })
    }

    /// Appends to `path` (a resumed shard keeps the steps of the prompts it finished).
    pub fn append(path: &Path) -> anyhow::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(StepsJsonl {
            file,
            path: path.to_path_buf(),
            line: Vec::new(),
        })
    }
}

/// The prompt index of a `steps.jsonl` line, `None` for a line cut short by a crash.
pub fn step_line_prompt(line: &[u8]) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Head {
        prompt_index: usize,
    }
    serde_json::from_slice::<Head>(line)
        .ok()
        .map(|h| h.prompt_index)
}

#[derive(Serialize)]
struct JsonlStep<'a> {
    prompt_index: usize,
    #[serde(flatten)]
    step: &'a Step,
}

impl Sink for StepsJsonl {
    fn step(
        &mut self,
        _: &dyn Vocab,
        prompt: &PromptInput,
        _: &Generation,
        step: &Step,
    ) -> anyhow::Result<Control> {
        let line = JsonlStep {
            prompt_index: prompt.index,
            step,
        };
        self.line.clear();
        serde_json::to_writer(&mut self.line, &line)?;
        self.line.push(b'\n');
        self.file
            .write_all(&self.line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(Control::Continue)
    }
}

/// Writes the seed tool's CSV: one row per kept candidate, per step, per source.
pub fn write_csv(path: &Path, trace: &Trace) -> anyhow::Result<()> {
    write_atomic(path, |w| {
        let mut csv = csv::Writer::from_writer(w);
        csv.write_record(CSV_HEADER)?;
        for step in &trace.steps {
            for (source, d) in [("raw", &step.raw), ("processed", &step.processed)] {
                for c in &d.candidates {
                    csv.write_record([
                        step.step.to_string(),
                        source.to_string(),
                        c.rank.to_string(),
                        c.token_id.to_string(),
                        c.token.clone(),
                        c.prob.to_string(),
                        c.logprob.to_string(),
                        step.selected.token_id.to_string(),
                        step.selected.token.clone(),
                        d.selected_prob.to_string(),
                        d.selected_logprob.to_string(),
                        d.selected_rank.to_string(),
                        d.entropy.to_string(),
                        d.k_used.to_string(),
                    ])?;
                }
            }
        }
        csv.flush()?;
        Ok(())
    })
}

/// Writes one prompt's trace files: JSON trace, CSV and generated text, the trace first so
/// that a kill between two of them never leaves the others without the trace they come
/// from. Its `run.json` is written last of all its files (after the plots), so it marks a
/// finished prompt.
pub fn write_prompt_files(dir: &Path, trace: &Trace) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join(TRACE_JSON), trace)?;
    write_csv(&dir.join(TRACE_CSV), trace)?;
    write_atomic(&dir.join(GENERATED_TXT), |w| {
        w.write_all(trace.metadata.generated_text.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    })?;
    Ok(())
}

/// Whether the prompt whose folder is `dir` finished: its last file, run.json, is there and
/// does not say interrupted.
pub fn prompt_done(dir: &Path) -> bool {
    // A prompt cut short by SIGINT or SIGTERM wrote its folder too, marked interrupted: a
    // resumed shard runs it again.
    fs::read(dir.join(RUN_JSON))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|run| run["interrupted"] != serde_json::Value::Bool(true))
}

/// One finished prompt on its way to the writer thread.
struct WriteJob {
    dir: PathBuf,
    trace: Trace,
    record: RunRecord,
    row: SummaryRow,
}

/// A row of `summary.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub index: usize,
    pub folder: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop_reason: &'static str,
    pub mean_entropy_raw: f64,
    pub mean_entropy_processed: f64,
    /// The lowest probability of a selected token in the raw distribution, and its step.
    pub lowest_raw_selected_prob: Option<f64>,
    pub lowest_raw_selected_step: Option<usize>,
    pub prompt: String,
}

impl SummaryRow {
    pub fn new(dirs: &PromptDirs, input: &PromptInput, g: &Generation) -> Self {
        let dir = dirs.dir(input.index);
        SummaryRow {
            folder: dir
                .strip_prefix(&dirs.root)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ..Self::from_steps(input, g)
        }
    }

    /// The row without a folder (a run whose prompts have none: Parquet tables).
    pub fn from_steps(input: &PromptInput, g: &Generation) -> Self {
        let n = g.steps.len().max(1) as f64;
        let lowest = g.steps.iter().min_by(|a, b| {
            a.raw
                .selected_prob
                .total_cmp(&b.raw.selected_prob)
                .then(a.step.cmp(&b.step))
        });
        SummaryRow {
            index: input.index,
            folder: String::new(),
            prompt_tokens: input.ids.len(),
            generated_tokens: g.generated_ids.len(),
            stop_reason: g.stop.name(),
            mean_entropy_raw: g.steps.iter().map(|s| s.raw.entropy).sum::<f64>() / n,
            mean_entropy_processed: g.steps.iter().map(|s| s.processed.entropy).sum::<f64>() / n,
            lowest_raw_selected_prob: lowest.map(|s| s.raw.selected_prob),
            lowest_raw_selected_step: lowest.map(|s| s.step),
            prompt: input.prompt.clone(),
        }
    }
}

/// What the writer writes besides each prompt's trace files.
#[derive(Debug, Clone, Default)]
pub struct WriterFiles {
    /// Each prompt's PNGs and report.html.
    pub plots: bool,
    /// Where the rows go (none for a run of one prompt).
    pub summary: Option<SummaryFile>,
    /// Set by Ctrl-C: plots not drawn yet are skipped (drawing a 20,000-step trace takes
    /// half a minute), the trace files are still written.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The step logit_lens.png shows.
    pub lens_step: usize,
}

/// Where a run's `summary.csv` goes, and whether rows already there are kept.
#[derive(Debug, Clone)]
pub struct SummaryFile {
    pub path: PathBuf,
    pub append: bool,
}

/// Writes each finished prompt's folder (trace JSON and CSV, generated text, unless turned
/// off the plots and report.html, then run.json) and its row of `summary.csv`, on a writer
/// thread fed through a bounded channel.
pub struct TraceWriter {
    dirs: PromptDirs,
    model_label: String,
    gen: GenerateConfig,
    use_chat_template: bool,
    run: RunRecord,
    tx: Option<mpsc::SyncSender<WriteJob>>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// Finished prompts by stop reason.
    pub stop_reasons: std::collections::BTreeMap<&'static str, usize>,
    /// The record of the last prompt finished.
    pub last: Option<PromptRecord>,
}

impl TraceWriter {
    /// `run` is the run's record without prompts or timings; each prompt's run.json is it
    /// with that prompt.
    pub fn new(
        dirs: PromptDirs,
        model_label: &str,
        gen: &GenerateConfig,
        use_chat_template: bool,
        run: RunRecord,
        files: WriterFiles,
    ) -> anyhow::Result<Self> {
        let WriterFiles {
            plots,
            summary,
            interrupt,
            lens_step,
        } = files;
        let summary_path = summary.as_ref().map(|s| s.path.clone()).unwrap_or_default();
        let mut summary = match &summary {
            Some(s) => {
                let p = &s.path;
                let kept = s.append && fs::metadata(p).is_ok_and(|m| m.len() > 0);
                let file = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(s.append)
                    .truncate(!s.append)
                    .open(p)
                    .with_context(|| format!("creating {}", p.display()))?;
                Some(
                    csv::WriterBuilder::new()
                        .has_headers(!kept)
                        .from_writer(BufWriter::new(file)),
                )
            }
            None => None,
        };
        let (tx, rx) = mpsc::sync_channel::<WriteJob>(4);
        let handle = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || -> anyhow::Result<()> {
                for mut job in rx {
                    let what = || format!("writing the outputs of prompt {}", job.row.index);
                    write_prompt_files(&job.dir, &job.trace).with_context(what)?;
                    let interrupted = interrupt
                        .as_ref()
                        .is_some_and(|i| i.load(std::sync::atomic::Ordering::Relaxed));
                    if plots && !interrupted {
                        let marks = crate::report::TraceMarks {
                            degenerate_steps: job
                                .record
                                .prompts
                                .iter()
                                .flatten()
                                .flat_map(|p| p.degenerate_steps.iter().copied())
                                .collect(),
                            lens_step,
                        };
                        crate::report::write_trace_report(&job.dir, &job.trace, &marks)
                            .with_context(|| {
                                format!("drawing the plots of prompt {}", job.row.index)
                            })?;
                    }
                    if plots && interrupted {
                        // Its plots were skipped: the prompt's output is not whole, and a
                        // resumed shard draws it again.
                        job.record.interrupted = true;
                    }
                    if let Some(w) = &mut summary {
                        w.serialize(&job.row)
                            .and_then(|()| Ok(w.flush()?))
                            .with_context(|| format!("writing {}", summary_path.display()))?;
                    }
                    write_json(&job.dir.join(RUN_JSON), &job.record).with_context(what)?;
                }
                Ok(())
            })
            .context("starting the trace writer thread")?;
        Ok(TraceWriter {
            dirs,
            model_label: model_label.to_string(),
            gen: gen.clone(),
            use_chat_template,
            run,
            tx: Some(tx),
            handle: Some(handle),
            stop_reasons: Default::default(),
            last: None,
        })
    }

    /// Waits for every folder to be written; the writer's first error, if any.
    pub fn close(&mut self) -> anyhow::Result<()> {
        end_writer(&mut self.tx, &mut self.handle, "the trace writer")
    }

    /// The record of one prompt, as run.json lists it.
    pub fn prompt_record(&self, input: &PromptInput, g: &Generation) -> PromptRecord {
        prompt_record(input, g, &self.dirs.dir(input.index))
    }
}

/// Ends a writer thread: its channel closed, so it finishes the jobs queued and stops, then
/// joined; its first error, if any. Nothing to do once ended.
fn end_writer<J>(
    tx: &mut Option<mpsc::SyncSender<J>>,
    handle: &mut Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    name: &str,
) -> anyhow::Result<()> {
    drop(tx.take());
    match handle.take() {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("{name} thread panicked"))?,
        None => Ok(()),
    }
}

/// The record of one finished prompt whose files are in `out_dir`, as run.json lists it.
pub fn prompt_record(input: &PromptInput, g: &Generation, out_dir: &Path) -> PromptRecord {
    PromptRecord {
        index: input.index,
        prompt: input.prompt.clone(),
        system_prompt: input.system_prompt.clone(),
        rendered_prompt: input.rendered.clone(),
        prompt_tokens: input.ids.len(),
        generated_tokens: g.generated_ids.len(),
        stop_reason: g.stop,
        degenerate_steps: g.degenerate_steps.clone(),
        out_dir: out_dir.display().to_string(),
    }
}

impl Sink for TraceWriter {
    fn finish(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
    ) -> anyhow::Result<()> {
        let trace = build_trace(
            source,
            &self.model_label,
            input,
            g,
            &self.gen,
            self.use_chat_template,
        );
        let mut record = self.run.clone();
        let prompt = self.prompt_record(input, g);
        *self.stop_reasons.entry(g.stop.name()).or_default() += 1;
        self.last = Some(prompt.clone());
        record.prompts = Some(vec![prompt]);
        record.interrupted = g.stop == crate::generate::StopReason::Interrupted;
        record.finished_at = trace::now_rfc3339();
        let job = WriteJob {
            dir: self.dirs.dir(input.index),
            trace,
            record,
            row: SummaryRow::new(&self.dirs, input, g),
        };
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            // The writer stopped: its error says why.
            self.close()?;
            anyhow::bail!("the trace writer stopped early");
        }
        Ok(())
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The prompt and the output text (up to a stop string), special tokens skipped, as the
/// Token Heatmap tool writes `generated_text`.
pub fn generated_text(source: &dyn Vocab, input: &PromptInput, generation: &Generation) -> String {
    let mut text = Vec::new();
    for &id in &input.ids {
        if !source.is_special(id) {
            if let Some(b) = source.token_bytes(id) {
                text.extend_from_slice(&b);
            }
        }
    }
    text.extend_from_slice(&generation.text[..generation.text_len]);
    String::from_utf8_lossy(&text).into_owned()
}

/// Builds the schema trace of one prompt. `generated_text` is the prompt and the output
/// text (up to a stop string), special tokens skipped, as the Token Heatmap tool writes it.
pub fn build_trace(
    source: &dyn Vocab,
    model_label: &str,
    input: &PromptInput,
    generation: &Generation,
    gen: &GenerateConfig,
    use_chat_template: bool,
) -> Trace {
    let info: &ModelInfo = source.info();
    let mut pieces = Pieces::default();
    Trace {
        schema_version: trace::SCHEMA_VERSION.into(),
        attention_metadata: gen.inside.as_ref().and_then(|i| i.attention_metadata()),
        prompt_logit_lens: generation.prompt_lens.clone(),
        metadata: trace::Metadata {
            model: model_label.to_string(),
            prompt: input.prompt.clone(),
            system_prompt: input.system_prompt.clone(),
            use_chat_template,
            generated_text: generated_text(source, input, generation),
            generated_at: trace::now_rfc3339(),
            device: trace::schema_device(&info.device),
            dtype: Some(info.logits_dtype.clone()),
            vocab_size: Some(info.tokenizer_vocab.max(1)),
            generation_params: trace::GenerationParams::from_sampling(
                &gen.sampling,
                gen.max_new_tokens,
            ),
            probe_config: (&gen.probe).into(),
        },
        tokens: trace::PromptTokens {
            prompt_token_ids: input.ids.clone(),
            prompt_tokens: input.ids.iter().map(|&id| pieces.get(source, id)).collect(),
        },
        steps: generation.steps.clone(),
    }
}
