//! Output files of `trace`, as the Token Heatmap tool names them, plus ours.
//!
//! - `steps.jsonl`: appended and flushed after every step, so a crash keeps what finished;
//! - `generated.txt`, `adaptive_token_trace.csv`, `adaptive_token_trace.json`, `run.json`:
//!   written at the end under a temporary name and renamed, so a half-written file never
//!   looks complete.
//!
//! One prompt writes into `--out` itself; several write one sub-folder each
//! (`prompt-000`, `prompt-001`, ...), with `steps.jsonl` and a summary `run.json` at the top.

use crate::generate::Sink;
use crate::trace::{Step, Trace};
use anyhow::Context;
use logitprobe_backends::usage;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const STEPS_JSONL: &str = "steps.jsonl";
pub const TRACE_JSON: &str = "adaptive_token_trace.json";
pub const TRACE_CSV: &str = "adaptive_token_trace.csv";
pub const GENERATED_TXT: &str = "generated.txt";
pub const RUN_JSON: &str = "run.json";

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

/// Creates `dir` and proves it is writable before any work starts.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    let fail = |e: &dyn std::fmt::Display| {
        usage!(
            "cannot write to output folder {}: {e}; choose another --out",
            dir.display()
        )
    };
    fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let probe = dir.join(".logitprobe-write-test");
    File::create(&probe).map_err(|e| fail(&e))?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// The folder of prompt `i` of `n`.
pub fn prompt_dir(root: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        root.to_path_buf()
    } else {
        root.join(format!("prompt-{i:03}"))
    }
}

/// Writes `path` through a temporary sibling and a rename.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let result = (|| -> anyhow::Result<()> {
        let mut w = BufWriter::new(File::create(&tmp)?);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Streams each finished step to `steps.jsonl`.
pub struct StepsJsonl {
    file: BufWriter<File>,
}

impl StepsJsonl {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STEPS_JSONL);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StepsJsonl {
            file: BufWriter::new(file),
        })
    }
}

#[derive(Serialize)]
struct JsonlStep<'a> {
    prompt_index: usize,
    #[serde(flatten)]
    step: &'a Step,
}

impl Sink for StepsJsonl {
    fn step(&mut self, prompt_index: usize, step: &Step) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.file, &JsonlStep { prompt_index, step })?;
        self.file.write_all(b"\n")?;
        self.file.flush()?;
        Ok(())
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

/// Writes one prompt's final files: generated text, CSV, JSON trace and its run record.
pub fn write_prompt_files(dir: &Path, trace: &Trace, run: &impl Serialize) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join(GENERATED_TXT), |w| {
        w.write_all(trace.metadata.generated_text.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    })?;
    write_csv(&dir.join(TRACE_CSV), trace)?;
    write_json(&dir.join(TRACE_JSON), trace)?;
    write_json(&dir.join(RUN_JSON), run)?;
    Ok(())
}
