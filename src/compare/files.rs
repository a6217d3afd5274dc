//! The files of a comparison: `compare.json`, `compare.csv`, the plots and `report.html`, and
//! on request `positions.parquet`.

use super::CompareReport;
use crate::util as output;
use anyhow::Context;
use std::path::Path;

use super::{COMPARE_CSV, COMPARE_JSON};
use crate::output::parquet::POSITIONS_PARQUET;

/// What a comparison writes besides compare.json, compare.csv, the plots and the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// `positions.parquet`: a row per position and B.
    pub positions_parquet: bool,
}

/// Writes every file of `report` into `out`, each through a temporary name, `compare.json`
/// last: a folder with it is a finished comparison (an earlier run's is removed first, so a
/// failure on the way, a full disk, leaves none).
pub fn write_files(out: &Path, report: &CompareReport) -> anyhow::Result<()> {
    write_files_with(out, report, FileOptions::default())
}

/// [`write_files`], and what `options` adds. An earlier run's `positions.parquet` is removed
/// first too, so the folder never holds one that is not this run's.
pub fn write_files_with(
    out: &Path,
    report: &CompareReport,
    options: FileOptions,
) -> anyhow::Result<()> {
    let json = out.join(COMPARE_JSON);
    let parquet = out.join(POSITIONS_PARQUET);
    for stale in [&json, &parquet] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", stale.display()))
            }
            _ => {}
        }
    }
    write_csv(&out.join(COMPARE_CSV), report)?;
    if options.positions_parquet {
        let labels: Vec<String> = report.b.iter().map(|b| b.label.clone()).collect();
        crate::output::parquet::write_positions(&parquet, &report.positions, &labels)?;
    }
    crate::report::write_compare_report(out, report).context("drawing the compare plots")?;
    // Compact: a corpus run holds tens of thousands of candidates.
    output::write_atomic(&json, |w| {
        serde_json::to_writer(&mut *w, report)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Per-position CSV: one row per position and B.
pub fn write_csv(path: &Path, report: &CompareReport) -> anyhow::Result<()> {
    output::write_atomic(path, |w| {
        let mut csv = csv::Writer::from_writer(w);
        csv.write_record([
            "b",
            "index",
            "chunk",
            "pos",
            "token_id",
            "token",
            "kld",
            "top1_same",
            "p_a",
            "p_b",
            "delta_p",
            "logprob_a",
            "logprob_b",
            "b_rank_of_a_top1",
            "entropy_a",
            "entropy_b",
            "delta_entropy",
            "k_used_a",
            "k_used_b",
            "jaccard",
        ])?;
        for p in &report.positions {
            for (bi, b) in p.b.iter().enumerate() {
                csv.write_record([
                    (bi + 1).to_string(),
                    p.index.to_string(),
                    p.chunk.to_string(),
                    p.pos.to_string(),
                    p.token_id.to_string(),
                    p.token.clone(),
                    format!("{:e}", b.kld),
                    b.top1_same.to_string(),
                    p.a.prob.to_string(),
                    b.prob.to_string(),
                    b.delta_p.to_string(),
                    p.a.logprob.to_string(),
                    b.logprob.to_string(),
                    b.b_rank_of_a_top1.to_string(),
                    p.a.entropy.to_string(),
                    b.entropy.to_string(),
                    b.delta_entropy.to_string(),
                    p.a.k_used.to_string(),
                    b.k_used.to_string(),
                    b.jaccard.to_string(),
                ])?;
            }
        }
        csv.flush()?;
        Ok(())
    })
}
