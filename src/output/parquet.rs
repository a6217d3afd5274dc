//! Parquet files: a trace's `steps.parquet`, `candidates.parquet` and `prompts.parquet` (the
//! tables of [`super::tables`]), and a comparison's `positions.parquet`.
//!
//! # The files
//!
//! - Apache Parquet, written by the `parquet` crate's Arrow writer: each column zstd-compressed
//!   (level [`ZSTD_LEVEL`]), dictionary-encoded where that is smaller (token text, small
//!   integers), with min/max statistics; the Arrow schema is kept in the footer, so Arrow
//!   readers (pyarrow, polars, DuckDB) get the same types back (`UInt32`, a dictionary column).
//! - The footer's key-value metadata holds `logitprobe.table` (`steps`, `candidates`,
//!   `prompts`, `positions`) and `logitprobe.format_version` ([`FORMAT_VERSION`]).
//! - Streamed: rows are gathered in memory and written as one row group when a table reaches
//!   its bound ([`RowGroupBounds`]: 65,536 step rows or 262,144 candidate rows, which also
//!   ends the steps' and the candidates' groups together, so a prompt is never split across two
//!   groups; 65,536 prompt rows) and at the end. Memory holds at most a bound's rows, whatever
//!   the number of prompts.
//! - Written under a temporary name (`.steps.parquet.PID-N.partial`) and renamed only at
//!   [`ParquetTrace::close`], after every footer is written and synced: a file with the final
//!   name is always whole. On an error (or when the writer is dropped without `close`) the
//!   temporaries are removed.
//! - An interrupted run (SIGINT, SIGTERM) closes the files as a finished one does: they hold the
//!   prompts finished so far and those cut short (stop reason `interrupted`).
//!
//! Row groups are encoded on a writer thread, fed through a bounded channel, so the engine
//! decodes the next steps meanwhile.

use super::tables::{PromptRow, TraceTables};
use super::{SummaryFile, SummaryRow};
use crate::generate::{Generation, PromptInput, Sink};
use crate::schema::compare::Position;
use crate::schema::run::PromptRecord;
use anyhow::Context;
use arrow_array::builder::{
    BooleanBuilder, Float64Builder, ListBuilder, StringBuilder, StringDictionaryBuilder,
    UInt32Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use logitprobe_backends::Vocab;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

/// One row per prompt and step.
pub const STEPS_PARQUET: &str = "steps.parquet";
/// One row per prompt, step, distribution and kept candidate.
pub const CANDIDATES_PARQUET: &str = "candidates.parquet";
/// One row per prompt.
pub const PROMPTS_PARQUET: &str = "prompts.parquet";
/// A comparison's rows: one per scored position and B.
pub const POSITIONS_PARQUET: &str = "positions.parquet";

/// The zstd level of every column: 3 is zstd's own default, fast to write, and the token
/// columns are dictionary-encoded before it anyway.
pub const ZSTD_LEVEL: i32 = 3;

/// Version of the tables' layout, in each file's footer (`logitprobe.format_version`).
pub const FORMAT_VERSION: u32 = 1;

/// When the rows gathered so far are written as a row group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroupBounds {
    /// Step rows (the candidates' group ends with the steps' one).
    pub steps: usize,
    /// Candidate rows (the steps' group ends with the candidates' one).
    pub candidates: usize,
    /// Prompt rows.
    pub prompts: usize,
}

impl Default for RowGroupBounds {
    fn default() -> Self {
        RowGroupBounds {
            steps: 65_536,
            candidates: 262_144,
            prompts: 65_536,
        }
    }
}

impl RowGroupBounds {
    /// Bounds scaled from one number of step rows: `n` steps, `4 n` candidates, `n` prompts
    /// (at least one row each).
    pub fn from_steps(n: usize) -> Self {
        let n = n.max(1);
        RowGroupBounds {
            steps: n,
            candidates: n.saturating_mul(4),
            prompts: n,
        }
    }
}

/// The writer settings of every file: zstd, the table's name and our layout version in the
/// footer, row groups ended by us (no row limit of the writer's own).
fn properties(table: &str) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(ZSTD_LEVEL).expect("a valid zstd level"),
        ))
        .set_max_row_group_row_count(None)
        .set_created_by(format!("logitprobe {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("logitprobe.table".into(), table.to_string()),
            KeyValue::new(
                "logitprobe.format_version".into(),
                FORMAT_VERSION.to_string(),
            ),
        ]))
        .build()
}

/// One Parquet file being written under a temporary name; removed on drop unless
/// [`TableFile::finish`] and [`TableFile::publish`] made it the final file.
struct TableFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<BufWriter<File>>>,
    published: bool,
}

impl TableFile {
    fn create(path: PathBuf, schema: SchemaRef, table: &str) -> anyhow::Result<Self> {
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = path
            .file_name()
            .context("output path has no file name")?
            .to_string_lossy()
            .into_owned();
        let tmp = path.with_file_name(format!(".{name}.{}-{n}.partial", std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut t = TableFile {
            path,
            tmp,
            writer: None,
            published: false,
        };
        t.writer = Some(
            ArrowWriter::try_new(BufWriter::new(file), schema, Some(properties(table)))
                .with_context(|| format!("writing {}", t.path.display()))?,
        );
        Ok(t)
    }

    /// Writes `batch` as one row group (nothing for an empty batch).
    fn write_group(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let w = self
            .writer
            .as_mut()
            .context("the file was already finished")?;
        w.write(batch)
            .and_then(|()| w.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Writes the footer and syncs the temporary file.
    fn finish(&mut self) -> anyhow::Result<()> {
        let what = || format!("writing {}", self.path.display());
        let w = self
            .writer
            .take()
            .context("the file was already finished")?;
        let buf = w.into_inner().with_context(what)?;
        let file = buf
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(what)?;
        file.sync_all().with_context(what)
    }

    /// Renames the finished temporary file to its final name.
    fn publish(&mut self) -> anyhow::Result<()> {
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for TableFile {
    fn drop(&mut self) {
        if !self.published {
            drop(self.writer.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The three tables of a trace, in the order of [`TraceTables`]' batches.
const STEPS: usize = 0;
const CANDIDATES: usize = 1;
const PROMPTS: usize = 2;

/// What the writer thread is asked to do.
enum Job {
    /// One row group of table `0` (STEPS, CANDIDATES or PROMPTS).
    Group(usize, RecordBatch),
    /// Write the footers and give the files their names.
    Close,
}

/// A trace's rows gathered and cut into row groups at the bounds: what both writers (files,
/// memory) share.
#[derive(Debug)]
struct RowGroups {
    tables: TraceTables,
    bounds: RowGroupBounds,
}

impl RowGroups {
    fn new(bounds: RowGroupBounds) -> Self {
        RowGroups {
            tables: TraceTables::new(),
            bounds,
        }
    }

    /// Adds one finished prompt; the row groups (table, batch) due at the bounds. The steps'
    /// and the candidates' groups end together, so a prompt is never split across groups.
    fn push(
        &mut self,
        steps: &[crate::schema::trace::Step],
        row: &PromptRow,
    ) -> Vec<(usize, RecordBatch)> {
        self.tables.push_steps(row.prompt_index, steps);
        self.tables.push_prompt(row);
        let mut due = Vec::new();
        if self.tables.step_rows() >= self.bounds.steps
            || self.tables.candidate_rows() >= self.bounds.candidates
        {
            self.steps_due(&mut due);
        }
        if self.tables.prompt_rows() >= self.bounds.prompts {
            self.prompts_due(&mut due);
        }
        due
    }

    /// The rows left, as row groups.
    fn rest(&mut self) -> Vec<(usize, RecordBatch)> {
        let mut due = Vec::new();
        self.steps_due(&mut due);
        self.prompts_due(&mut due);
        due
    }

    fn steps_due(&mut self, due: &mut Vec<(usize, RecordBatch)>) {
        if self.tables.step_rows() > 0 || self.tables.candidate_rows() > 0 {
            due.push((STEPS, self.tables.finish_steps()));
            due.push((CANDIDATES, self.tables.finish_candidates()));
        }
    }

    fn prompts_due(&mut self, due: &mut Vec<(usize, RecordBatch)>) {
        if self.tables.prompt_rows() > 0 {
            due.push((PROMPTS, self.tables.finish_prompts()));
        }
    }
}

/// Writes a trace's three Parquet files into a folder, streamed in row groups (see the
/// module's documentation), and, for a run of several prompts, a row of `summary.csv` per
/// finished prompt.
pub struct ParquetTrace {
    dir: PathBuf,
    groups_due: RowGroups,
    summary: Option<(PathBuf, csv::Writer<BufWriter<File>>)>,
    tx: Option<mpsc::SyncSender<Job>>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// Row groups written so far, per table (steps, candidates, prompts).
    groups: [usize; 3],
    /// Finished prompts by stop reason.
    pub stop_reasons: BTreeMap<&'static str, usize>,
    /// The record of the last prompt finished.
    pub last: Option<PromptRecord>,
}

impl std::fmt::Debug for ParquetTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetTrace")
            .field("dir", &self.dir)
            .field("bounds", &self.groups_due.bounds)
            .field("groups", &self.groups)
            .finish()
    }
}

impl ParquetTrace {
    /// Starts the three files in `dir` (under temporary names) and, when given, `summary.csv`.
    pub fn new(
        dir: &Path,
        bounds: RowGroupBounds,
        summary: Option<SummaryFile>,
    ) -> anyhow::Result<Self> {
        use super::tables::{candidates_schema, prompts_schema, steps_schema};
        let mut files = vec![
            TableFile::create(dir.join(STEPS_PARQUET), steps_schema(), "steps")?,
            TableFile::create(
                dir.join(CANDIDATES_PARQUET),
                candidates_schema(),
                "candidates",
            )?,
            TableFile::create(dir.join(PROMPTS_PARQUET), prompts_schema(), "prompts")?,
        ];
        let summary = match summary {
            Some(s) => {
                let kept = s.append && fs::metadata(&s.path).is_ok_and(|m| m.len() > 0);
                let file = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(s.append)
                    .truncate(!s.append)
                    .open(&s.path)
                    .with_context(|| format!("creating {}", s.path.display()))?;
                let w = csv::WriterBuilder::new()
                    .has_headers(!kept)
                    .from_writer(BufWriter::new(file));
                Some((s.path, w))
            }
            None => None,
        };
        // A few row groups in flight: the bounded channel holds the rest of the run back
        // while the thread encodes.
        let (tx, rx) = mpsc::sync_channel::<Job>(3);
        let handle = std::thread::Builder::new()
            .name("parquet-writer".into())
            .spawn(move || -> anyhow::Result<()> {
                for job in rx {
                    match job {
                        Job::Group(table, batch) => files[table].write_group(&batch)?,
                        Job::Close => {
                            for f in &mut files {
                                f.finish()?;
                            }
                            for f in &mut files {
                                f.publish()?;
                            }
                            return Ok(());
                        }
                    }
                }
                // Dropped without Close: the temporaries go with `files`.
                Ok(())
            })
            .context("starting the Parquet writer thread")?;
        Ok(ParquetTrace {
            dir: dir.to_path_buf(),
            groups_due: RowGroups::new(bounds),
            summary,
            tx: Some(tx),
            handle: Some(handle),
            groups: [0; 3],
            stop_reasons: BTreeMap::new(),
            last: None,
        })
    }

    /// Row groups handed to the writer so far: steps, candidates, prompts.
    pub fn row_groups(&self) -> [usize; 3] {
        self.groups
    }

    fn send(&mut self, table: usize, batch: RecordBatch) -> anyhow::Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.groups[table] += 1;
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Job::Group(table, batch)).is_ok());
        if !sent {
            // The writer stopped: its error says why.
            self.join()?;
            anyhow::bail!("the Parquet writer stopped early");
        }
        Ok(())
    }

    /// Adds one finished prompt: its steps, candidates and prompt row; writes row groups
    /// where a bound is reached.
    pub fn push(
        &mut self,
        steps: &[crate::schema::trace::Step],
        row: &PromptRow,
    ) -> anyhow::Result<()> {
        for (table, batch) in self.groups_due.push(steps, row) {
            self.send(table, batch)?;
        }
        Ok(())
    }

    fn join(&mut self) -> anyhow::Result<()> {
        super::end_writer(&mut self.tx, &mut self.handle, "the Parquet writer")
    }

    /// Writes the rows left, the footers, and gives the files their final names. After an
    /// error nothing is left under a final name that this run made.
    pub fn close(&mut self) -> anyhow::Result<()> {
        if self.handle.is_none() {
            return Ok(());
        }
        let flushed = self
            .groups_due
            .rest()
            .into_iter()
            .try_for_each(|(table, batch)| self.send(table, batch));
        let closing = flushed.and_then(|()| {
            let sent = self
                .tx
                .as_ref()
                .is_some_and(|tx| tx.send(Job::Close).is_ok());
            if sent {
                Ok(())
            } else {
                Err(anyhow::anyhow!("the Parquet writer stopped early"))
            }
        });
        let joined = self.join();
        // The thread's own error says more than a failed send.
        joined.and(closing)
    }

    /// Stops without writing the files: their temporaries are removed.
    pub fn abort(&mut self) {
        let _ = self.join();
    }
}

impl Drop for ParquetTrace {
    fn drop(&mut self) {
        self.abort();
    }
}

/// A trace's three tables as Parquet files in memory (steps, candidates, prompts), encoded in
/// row groups as prompts finish: what the Python package keeps of a run. zstd Parquet holds
/// a run in a tenth of the memory its Arrow columns take; a table is decoded when it is read.
pub struct ParquetInMemory {
    groups_due: RowGroups,
    writers: [ArrowWriter<Vec<u8>>; 3],
}

impl std::fmt::Debug for ParquetInMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetInMemory")
            .field("rows", &self.groups_due)
            .finish()
    }
}

impl ParquetInMemory {
    pub fn new(bounds: RowGroupBounds) -> Result<Self, ParquetError> {
        use super::tables::{candidates_schema, prompts_schema, steps_schema};
        let writer =
            |schema, table| ArrowWriter::try_new(Vec::new(), schema, Some(properties(table)));
        Ok(ParquetInMemory {
            groups_due: RowGroups::new(bounds),
            writers: [
                writer(steps_schema(), "steps")?,
                writer(candidates_schema(), "candidates")?,
                writer(prompts_schema(), "prompts")?,
            ],
        })
    }

    /// Adds one finished prompt; encodes the row groups due.
    pub fn push(
        &mut self,
        steps: &[crate::schema::trace::Step],
        row: &PromptRow,
    ) -> Result<(), ParquetError> {
        let due = self.groups_due.push(steps, row);
        self.write(due)
    }

    fn write(&mut self, due: Vec<(usize, RecordBatch)>) -> Result<(), ParquetError> {
        for (table, batch) in due {
            if batch.num_rows() > 0 {
                self.writers[table].write(&batch)?;
                self.writers[table].flush()?;
            }
        }
        Ok(())
    }

    /// The three files' bytes: steps, candidates, prompts.
    pub fn finish(mut self) -> Result<[Vec<u8>; 3], ParquetError> {
        let rest = self.groups_due.rest();
        self.write(rest)?;
        let [s, c, p] = self.writers;
        Ok([s.into_inner()?, c.into_inner()?, p.into_inner()?])
    }
}

/// The record batches of a Parquet file held in memory (read from a copy of its bytes).
pub fn read_batches(file: &[u8]) -> Result<Vec<RecordBatch>, ParquetError> {
    let file = bytes::Bytes::copy_from_slice(file);
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    reader
        .map(|batch| batch.map_err(|e| ParquetError::ArrowError(e.to_string())))
        .collect()
}

/// The prompts-table row of a finished prompt (`generated_text` as the JSON trace's
/// `metadata.generated_text`).
pub fn prompt_row(source: &dyn Vocab, input: &PromptInput, g: &Generation) -> PromptRow {
    PromptRow {
        prompt_index: input.index,
        prompt: input.prompt.clone(),
        system_prompt: input.system_prompt.clone(),
        prompt_tokens: input.ids.len(),
        generated_tokens: g.generated_ids.len(),
        stop_reason: g.stop.name().to_string(),
        generated_text: super::generated_text(source, input, g),
        ..Default::default()
    }
    .with_steps(&g.steps)
}

impl Sink for ParquetTrace {
    fn finish(
        &mut self,
        source: &dyn Vocab,
        input: &PromptInput,
        g: &Generation,
    ) -> anyhow::Result<()> {
        let row = prompt_row(source, input, g);
        self.push(&g.steps, &row)?;
        *self.stop_reasons.entry(g.stop.name()).or_default() += 1;
        self.last = Some(super::prompt_record(input, g, &self.dir));
        if let Some((path, w)) = &mut self.summary {
            let mut summary = SummaryRow::from_steps(input, g);
            // No folder per prompt: its rows are in the tables.
            summary.folder = String::new();
            w.serialize(&summary)
                .and_then(|()| Ok(w.flush()?))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// The columns of `positions.parquet`: one row per scored position and B, in the order of
/// compare.json's positions, then of the Bs. The names are compare.csv's.
pub fn positions_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let f = |name: &str, ty: DataType| Field::new(name, ty, false);
            let list = |item: DataType| DataType::List(Arc::new(Field::new_list_field(item, true)));
            Arc::new(Schema::new(vec![
                f("b", DataType::UInt32),
                f(
                    "b_label",
                    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                ),
                f("index", DataType::UInt32),
                f("chunk", DataType::UInt32),
                f("pos", DataType::UInt32),
                f("token_id", DataType::UInt32),
                f("token", DataType::Utf8),
                f("kld", DataType::Float64),
                f("top1_same", DataType::Boolean),
                f("p_a", DataType::Float64),
                f("p_b", DataType::Float64),
                f("delta_p", DataType::Float64),
                f("logprob_a", DataType::Float64),
                f("logprob_b", DataType::Float64),
                f("b_rank_of_a_top1", DataType::UInt32),
                f("entropy_a", DataType::Float64),
                f("entropy_b", DataType::Float64),
                f("delta_entropy", DataType::Float64),
                f("k_used_a", DataType::UInt32),
                f("k_used_b", DataType::UInt32),
                f("jaccard", DataType::Float64),
                Field::new("lens_kld", list(DataType::Float64), true),
                Field::new("lens_top1_same", list(DataType::Boolean), true),
            ]))
        })
        .clone()
}

fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Rows per row group of `positions.parquet`.
pub const POSITION_ROWS_PER_GROUP: usize = 65_536;

/// The position rows of `positions` (every B of each), as one batch of [`positions_schema`].
/// `b_labels` names each B (compare.json's `b[i].label`).
pub fn positions_batch(positions: &[Position], b_labels: &[String]) -> RecordBatch {
    let mut b = UInt32Builder::new();
    let mut label = StringDictionaryBuilder::<Int32Type>::new();
    let (mut index, mut chunk, mut pos, mut token_id) = (
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
    );
    let mut token = StringBuilder::new();
    let mut f64s: [Float64Builder; 10] = Default::default();
    let mut top1 = BooleanBuilder::new();
    let (mut rank, mut k_a, mut k_b) = (
        UInt32Builder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
    );
    let mut lens_kld = ListBuilder::new(Float64Builder::new());
    let mut lens_top1 = ListBuilder::new(BooleanBuilder::new());
    for p in positions {
        for (bi, at) in p.b.iter().enumerate() {
            b.append_value(u32_of(bi + 1));
            label.append_value(b_labels.get(bi).map_or("", String::as_str));
            index.append_value(u32_of(p.index));
            chunk.append_value(u32_of(p.chunk));
            pos.append_value(u32_of(p.pos));
            token_id.append_value(p.token_id);
            token.append_value(&p.token);
            let values = [
                at.kld,
                p.a.prob,
                at.prob,
                at.delta_p,
                p.a.logprob,
                at.logprob,
                p.a.entropy,
                at.entropy,
                at.delta_entropy,
                at.jaccard,
            ];
            for (builder, v) in f64s.iter_mut().zip(values) {
                builder.append_value(v);
            }
            top1.append_value(at.top1_same);
            rank.append_value(u32_of(at.b_rank_of_a_top1));
            k_a.append_value(u32_of(p.a.k_used));
            k_b.append_value(u32_of(at.k_used));
            match &at.lens_kld {
                Some(v) => {
                    lens_kld.values().append_slice(v);
                    lens_kld.append(true);
                }
                None => lens_kld.append(false),
            }
            match &at.lens_top1_same {
                Some(v) => {
                    lens_top1.values().append_slice(v);
                    lens_top1.append(true);
                }
                None => lens_top1.append(false),
            }
        }
    }
    let [kld, p_a, p_b, delta_p, logprob_a, logprob_b, entropy_a, entropy_b, delta_entropy, jaccard] =
        f64s.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(b.finish()),
        Arc::new(label.finish()),
        Arc::new(index.finish()),
        Arc::new(chunk.finish()),
        Arc::new(pos.finish()),
        Arc::new(token_id.finish()),
        Arc::new(token.finish()),
        kld,
        Arc::new(top1.finish()),
        p_a,
        p_b,
        delta_p,
        logprob_a,
        logprob_b,
        Arc::new(rank.finish()),
        entropy_a,
        entropy_b,
        delta_entropy,
        Arc::new(k_a.finish()),
        Arc::new(k_b.finish()),
        jaccard,
        Arc::new(lens_kld.finish()),
        Arc::new(lens_top1.finish()),
    ];
    RecordBatch::try_new(positions_schema(), columns)
        .expect("the position columns fit their schema")
}

/// Writes `positions.parquet` at `path`: the rows of [`positions_batch`], in row groups of
/// [`POSITION_ROWS_PER_GROUP`] rows, under a temporary name and renamed when whole.
pub fn write_positions(
    path: &Path,
    positions: &[Position],
    b_labels: &[String],
) -> anyhow::Result<()> {
    let n_b = positions.first().map_or(1, |p| p.b.len().max(1));
    let per_group = (POSITION_ROWS_PER_GROUP / n_b).max(1);
    let mut file = TableFile::create(path.to_path_buf(), positions_schema(), "positions")?;
    for part in positions.chunks(per_group) {
        file.write_group(&positions_batch(part, b_labels))?;
    }
    file.finish()?;
    file.publish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::trace::{CandidateOut, DistributionOut, SelectedToken, Step};

    fn dist(n: usize, x: f64) -> DistributionOut {
        DistributionOut {
            k_used: n,
            entropy: x,
            top_mass_used: 0.9,
            selected_prob: 0.5 + x / 100.0,
            selected_logprob: (0.5 + x / 100.0).ln(),
            selected_rank: 1,
            candidates: (0..n)
                .map(|i| CandidateOut {
                    rank: i + 1,
                    token_id: i as u32,
                    token: format!("t{i}"),
                    prob: 1.0 / (i + 2) as f64,
                    logprob: (1.0 / (i + 2) as f64).ln(),
                })
                .collect(),
        }
    }

    fn steps(n: usize, seed: usize) -> Vec<Step> {
        (0..n)
            .map(|i| Step {
                step: i,
                selected: SelectedToken {
                    token_id: (seed * 31 + i) as u32,
                    token: format!("w{seed}.{i}"),
                },
                raw: dist(3, (seed + i) as f64),
                processed: dist(2, (seed * i) as f64),
                logit_lens: None,
                attention: None,
            })
            .collect()
    }

    fn row(index: usize, s: &[Step]) -> PromptRow {
        PromptRow {
            prompt_index: index,
            prompt: format!("prompt {index}"),
            prompt_tokens: 4,
            generated_tokens: s.len(),
            stop_reason: "max_new_tokens".into(),
            generated_text: format!("prompt {index} ..."),
            ..Default::default()
        }
        .with_steps(s)
    }

    /// Row groups and rows of a Parquet file.
    fn read(path: &Path) -> (usize, Vec<RecordBatch>) {
        let b = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
        let groups = b.metadata().num_row_groups();
        (groups, b.build().unwrap().map(Result::unwrap).collect())
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// A group is written each time a bound is reached, and once more at close for what is
    /// left; every row arrives, in order, and no temporary is left.
    #[test]
    fn row_groups_flush_at_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        // 10 steps per prompt: 10 step rows and 50 candidate rows each.
        let bounds = RowGroupBounds {
            steps: 25,
            candidates: 1_000,
            prompts: 4,
        };
        let mut w = ParquetTrace::new(dir.path(), bounds, None).unwrap();
        for i in 0..7 {
            let s = steps(10, i);
            w.push(&s, &row(i, &s)).unwrap();
        }
        // Steps: a group after prompts 0-2 (30 rows) and 3-5; prompts: after 0-3.
        assert_eq!(w.row_groups(), [2, 2, 1]);
        // Nothing has a final name before close.
        assert!(!dir.path().join(STEPS_PARQUET).exists());
        w.close().unwrap();
        let (groups, b) = read(&dir.path().join(STEPS_PARQUET));
        assert_eq!((groups, rows(&b)), (3, 70));
        let (groups, b) = read(&dir.path().join(CANDIDATES_PARQUET));
        assert_eq!((groups, rows(&b)), (3, 350));
        let (groups, b) = read(&dir.path().join(PROMPTS_PARQUET));
        assert_eq!((groups, rows(&b)), (2, 7));
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "only the three files: {names:?}");

        // The candidate bound ends a group too (and the steps' with it).
        let dir = tempfile::tempdir().unwrap();
        let bounds = RowGroupBounds {
            steps: 1_000,
            candidates: 100,
            prompts: 1_000,
        };
        let mut w = ParquetTrace::new(dir.path(), bounds, None).unwrap();
        for i in 0..5 {
            let s = steps(10, i);
            w.push(&s, &row(i, &s)).unwrap();
        }
        assert_eq!(w.row_groups(), [2, 2, 0]);
        w.close().unwrap();
        assert_eq!(read(&dir.path().join(STEPS_PARQUET)).0, 3);
        assert_eq!(read(&dir.path().join(PROMPTS_PARQUET)).0, 1);
    }

    /// In memory: the same files as on disk, byte for byte, and the steps read back whole.
    #[test]
    fn in_memory_tables_equal_the_files_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = RowGroupBounds::from_steps(25);
        let mut files = ParquetTrace::new(dir.path(), bounds, None).unwrap();
        let mut memory = ParquetInMemory::new(bounds).unwrap();
        let all: Vec<Vec<Step>> = (0..7).map(|i| steps(10, i)).collect();
        for (i, s) in all.iter().enumerate() {
            files.push(s, &row(i, s)).unwrap();
            memory.push(s, &row(i, s)).unwrap();
        }
        files.close().unwrap();
        let [s, c, p] = memory.finish().unwrap();
        for (bytes, name) in [
            (&s, STEPS_PARQUET),
            (&c, CANDIDATES_PARQUET),
            (&p, PROMPTS_PARQUET),
        ] {
            assert_eq!(bytes, &fs::read(dir.path().join(name)).unwrap(), "{name}");
        }
        let back = super::super::tables::steps_from_batches(
            &read_batches(&s).unwrap(),
            &read_batches(&c).unwrap(),
        )
        .unwrap();
        assert_eq!(back.into_values().collect::<Vec<_>>(), all);
        assert!(
            read_batches(&s[..s.len() - 1]).is_err(),
            "a cut file is refused"
        );
    }

    /// Dropped without close (an error on the way): no file is left, final or temporary.
    #[test]
    fn abort_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ParquetTrace::new(dir.path(), RowGroupBounds::from_steps(5), None).unwrap();
        let s = steps(12, 1);
        w.push(&s, &row(0, &s)).unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A run with no prompt finished still writes three valid, empty tables.
    #[test]
    fn no_rows_still_makes_valid_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ParquetTrace::new(dir.path(), RowGroupBounds::default(), None).unwrap();
        w.close().unwrap();
        for name in [STEPS_PARQUET, CANDIDATES_PARQUET, PROMPTS_PARQUET] {
            let (groups, b) = read(&dir.path().join(name));
            assert_eq!((groups, rows(&b)), (0, 0), "{name}");
        }
    }

    #[test]
    fn footer_names_the_table_and_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ParquetTrace::new(dir.path(), RowGroupBounds::default(), None).unwrap();
        let s = steps(3, 2);
        w.push(&s, &row(0, &s)).unwrap();
        w.close().unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(
            File::open(dir.path().join(CANDIDATES_PARQUET)).unwrap(),
        )
        .unwrap();
        let kv = b.metadata().file_metadata().key_value_metadata().unwrap();
        let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
        assert_eq!(get("logitprobe.table").as_deref(), Some("candidates"));
        assert_eq!(get("logitprobe.format_version").as_deref(), Some("1"));
        let col = b.metadata().row_group(0).column(0);
        assert!(matches!(col.compression(), Compression::ZSTD(_)));
        // The Arrow types come back (UInt32, the dictionary column).
        assert_eq!(
            b.schema().fields(),
            super::super::tables::candidates_schema().fields()
        );
    }
}
