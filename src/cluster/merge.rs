//! `merge`: joins the shards of a sharded run (see [`crate::cluster::shard`]) into what one process
//! would have written, after checking that every shard and every unit is there.
//!
//! For `trace`: the top-level `run.json` (the shards' stop reasons and timings added up),
//! `summary.csv` (rows in global index order) and `steps.jsonl` (the shards' streams one after
//! another). For `compare`: `compare.json`, `compare.csv`, the plots and `report.html`, with
//! the statistics computed from every position in global order, as an unsharded run does.

use crate::cluster::shard::{shard_dir, Plan};
use crate::compare::{self, CompareReport, Position, ShardRecord};
use crate::output::{self, PromptDirs};
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A shard that has not finished: its number and the units it still owes.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingShard {
    pub shard: usize,
    /// Global indices of its units without their final files.
    pub missing: Vec<usize>,
    /// Units of the shard.
    pub units: usize,
    /// Whether the shard's own record is there (it ended, but was interrupted).
    pub recorded: bool,
}

/// What stops a merge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// The folder holds no shard plan.
    #[error("{}", self.message(same_shard_command))]
    NotSharded { dir: PathBuf },
    /// Some shards have not finished.
    #[error("{}", self.message(same_shard_command))]
    Missing {
        dir: PathBuf,
        kind: String,
        shards: usize,
        missing: Vec<MissingShard>,
    },
}

impl MergeError {
    /// The message, with `same_command(shards)` saying how to run the missing shards again
    /// where no sbatch script was written (a front end names its own settings).
    pub fn message(&self, same_command: impl Fn(usize) -> String) -> String {
        match self {
            MergeError::NotSharded { dir } => format!(
                "{} is not a sharded run (no {}/{}): give the shards' output folder",
                dir.display(),
                crate::cluster::shard::SHARDS_DIR,
                crate::cluster::shard::PLAN_JSON
            ),
            MergeError::Missing {
                dir,
                kind,
                shards,
                missing,
            } => {
                let unit = if kind == "compare" {
                    "chunks"
                } else {
                    "prompts"
                };
                let parts: Vec<String> = missing
                    .iter()
                    .map(|m| {
                        let shown: Vec<String> =
                            m.missing.iter().take(5).map(|i| i.to_string()).collect();
                        let more = if m.missing.len() > 5 { ", ..." } else { "" };
                        if m.missing.is_empty() {
                            format!(
                                "shard {} of {shards} did not finish (its {} {unit} are there but its record is not)",
                                m.shard, m.units
                            )
                        } else {
                            format!(
                                "shard {} of {shards} is missing {} of its {} {unit} ({}{more})",
                                m.shard,
                                m.missing.len(),
                                m.units,
                                shown.join(", ")
                            )
                        }
                    })
                    .collect();
                let ids: Vec<String> = missing.iter().map(|m| m.shard.to_string()).collect();
                let script = dir
                    .join(crate::cluster::slurm::SLURM_DIR)
                    .join(crate::cluster::slurm::ARRAY_SCRIPT);
                let rerun = if script.is_file() {
                    format!("sbatch --array={} {}", ids.join(","), script.display())
                } else {
                    same_command(*shards)
                };
                format!(
                    "{}; run {} again ({rerun}: finished {unit} are kept), then merge again",
                    parts.join("; "),
                    if missing.len() == 1 { "it" } else { "them" }
                )
            }
        }
    }
}

/// How the library says to rerun a shard where no sbatch script was written.
fn same_shard_command(shards: usize) -> String {
    format!("the same command for each shard K of {shards}")
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct Merged {
    pub kind: String,
    pub shards: usize,
    pub units: usize,
    pub files: Vec<PathBuf>,
    /// llama-perplexity's table of a merged compare.
    pub summary_table: Option<String>,
}

/// Merges the sharded run in `dir` into `dir`.
pub fn merge(dir: &Path) -> anyhow::Result<Merged> {
    // Absolute, so the commands an error suggests work from anywhere.
    let dir = &std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let plan = Plan::read(dir)?.ok_or_else(|| MergeError::NotSharded {
        dir: dir.to_path_buf(),
    })?;
    match plan.kind.as_str() {
        "trace" => merge_trace(dir, &plan),
        "compare" => merge_compare(dir, &plan),
        k => anyhow::bail!(
            "{}: unknown kind of sharded run {k:?}",
            Plan::path(dir).display()
        ),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
}

/// Each shard's record, or what it still owes.
fn check_shards<T>(
    dir: &Path,
    plan: &Plan,
    record_name: &str,
    done: impl Fn(usize) -> bool,
    read: impl Fn(&Path) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Vec<T>> {
    let mut records = Vec::new();
    let mut missing = Vec::new();
    for k in 0..plan.shards {
        let units: Vec<usize> = plan.units_of(k).collect();
        let owed: Vec<usize> = units.iter().copied().filter(|&i| !done(i)).collect();
        let path = shard_dir(dir, k).join(record_name);
        let record = if path.is_file() { read(&path)? } else { None };
        match record {
            Some(r) if owed.is_empty() => records.push(r),
            r => missing.push(MissingShard {
                shard: k,
                missing: owed,
                units: units.len(),
                recorded: r.is_some(),
            }),
        }
    }
    if !missing.is_empty() {
        return Err(MergeError::Missing {
            dir: dir.to_path_buf(),
            kind: plan.kind.clone(),
            shards: plan.shards,
            missing,
        }
        .into());
    }
    Ok(records)
}

fn merge_trace(dir: &Path, plan: &Plan) -> anyhow::Result<Merged> {
    let dirs = PromptDirs::new(dir, plan.units.len(), plan.index_space);
    let records: Vec<Value> = check_shards(
        dir,
        plan,
        output::RUN_JSON,
        |i| output::prompt_done(&dirs.dir(i)),
        |p| {
            let v: Value = read_json(p)?;
            // An interrupted shard wrote its record, but owes the prompts it did not take.
            Ok((v["interrupted"] != Value::Bool(true)).then_some(v))
        },
    )?;
    let mut files = Vec::new();

    // steps.jsonl: each shard's stream, in shard order.
    let steps = dir.join(output::STEPS_JSONL);
    output::write_atomic(&steps, |w| {
        for k in 0..plan.shards {
            let p = shard_dir(dir, k).join(output::STEPS_JSONL);
            if let Ok(mut f) = std::fs::File::open(&p) {
                std::io::copy(&mut f, w).with_context(|| format!("copying {}", p.display()))?;
            }
        }
        Ok(())
    })?;
    files.push(steps);

    // summary.csv: every row once, in global index order.
    if !dirs.single {
        let mut rows: Vec<(usize, csv::StringRecord)> = Vec::new();
        let mut header = None;
        for k in 0..plan.shards {
            let p = shard_dir(dir, k).join(output::SUMMARY_CSV);
            let Ok(mut r) = csv::Reader::from_path(&p) else {
                continue;
            };
            header.get_or_insert(r.headers()?.clone());
            for rec in r.records() {
                let rec = rec.with_context(|| format!("reading {}", p.display()))?;
                let index: usize = rec
                    .get(0)
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("{}: a row without its index", p.display()))?;
                rows.push((index, rec));
            }
        }
        rows.sort_by_key(|(i, _)| *i);
        rows.dedup_by_key(|(i, _)| *i);
        let summary = dir.join(output::SUMMARY_CSV);
        output::write_atomic(&summary, |w| {
            let mut csv = csv::Writer::from_writer(w);
            if let Some(h) = &header {
                csv.write_record(h)?;
            }
            for (_, r) in &rows {
                csv.write_record(r)?;
            }
            csv.flush()?;
            Ok(())
        })?;
        files.push(summary);
    }

    // Counts from every prompt's own record: a resumed shard's record counts only the
    // prompts that run did.
    let mut stops = serde_json::Map::new();
    let (mut prompt_tokens, mut generated) = (0u64, 0u64);
    let mut only = Value::Null;
    for &i in &plan.units {
        let v: Value = read_json(&dirs.dir(i).join(output::RUN_JSON))?;
        let p = &v["prompts"][0];
        if let Some(reason) = p["stop_reason"].as_str() {
            let n = stops.get(reason).and_then(Value::as_u64).unwrap_or(0) + 1;
            stops.insert(reason.to_string(), n.into());
        }
        prompt_tokens += p["prompt_tokens"].as_u64().unwrap_or(0);
        generated += p["generated_tokens"].as_u64().unwrap_or(0);
        if dirs.single {
            only = v["prompts"].clone();
        }
    }
    let mut run = merged_run_record(&records, plan)?;
    run["stop_reasons"] = Value::Object(stops);
    run["timings"]["prompts"] = plan.units.len().into();
    run["timings"]["prompt_tokens"] = prompt_tokens.into();
    run["timings"]["generated_tokens"] = generated.into();
    if dirs.single {
        // A run of one prompt lists it, as an unsharded one does.
        run["prompts"] = only;
    }
    let path = dir.join(output::RUN_JSON);
    output::write_json(&path, &run)?;
    files.push(path);
    Ok(Merged {
        summary_table: None,
        kind: plan.kind.clone(),
        shards: plan.shards,
        units: plan.units.len(),
        files,
    })
}

/// The top-level run record of a merged trace: the first shard's, with the stop reasons and
/// timings of all, and which shards made it.
fn merged_run_record(records: &[Value], plan: &Plan) -> anyhow::Result<Value> {
    let mut run = records
        .first()
        .cloned()
        .context("a sharded run with no shard")?;
    let sum = |f: &dyn Fn(&Value) -> Option<f64>| records.iter().filter_map(f).sum::<f64>();
    let max = |f: &dyn Fn(&Value) -> Option<f64>| {
        records.iter().filter_map(f).fold(0.0f64, |m, v| m.max(v))
    };
    let t = |k: &'static str| move |r: &Value| r["timings"][k].as_f64();
    let (prefill, decode, probe) = (
        sum(&t("prefill_s")),
        sum(&t("decode_s")),
        sum(&t("probe_s")),
    );
    let generated = sum(&t("generated_tokens"));
    // Tokens that decode steps generated, shard by shard: their rate times their time.
    let decode_tokens = sum(&|r| {
        Some(r["timings"]["decode_tokens_per_s"].as_f64()? * r["timings"]["decode_s"].as_f64()?)
    });
    let wall_sum = sum(&t("wall_s"));
    run["timings"] = serde_json::json!({
        "prefill_s": prefill,
        "decode_s": decode,
        "probe_s": probe,
        "prompts": sum(&t("prompts")) as u64,
        "prompt_tokens": sum(&t("prompt_tokens")) as u64,
        "generated_tokens": generated as u64,
        "decode_tokens_per_s": decode_tokens / decode.max(1e-9),
        "tokens_per_s": generated / wall_sum.max(1e-9),
        "wall_s": max(&t("wall_s")),
    });
    run["load_s"] = max(&|r| r["load_s"].as_f64()).into();
    let first = |k: &str, pick_max: bool| {
        records
            .iter()
            .filter_map(|r| r[k].as_str())
            .reduce(|a, b| if (b > a) == pick_max { b } else { a })
            .map(String::from)
    };
    run["started_at"] = first("started_at", false).into();
    run["finished_at"] = first("finished_at", true).into();
    run["interrupted"] = false.into();
    let from = run["shard"]["from"].clone();
    if let Some(m) = run.as_object_mut() {
        m.remove("shard");
    }
    run["merged"] = serde_json::json!({
        "shards": plan.shards,
        "from": from,
        "merged_at": crate::schema::trace::now_rfc3339(),
        "timings": "counts are of every prompt; durations add up each shard's last run; wall_s is the longest shard's; rates are per process",
    });
    Ok(run)
}

fn merge_compare(dir: &Path, plan: &Plan) -> anyhow::Result<Merged> {
    // A chunk is done when its record is in its shard's folder.
    let chunk_path = |c: usize| compare::chunk_record_path(&shard_dir(dir, c % plan.shards), c);
    let records: Vec<ShardRecord> = check_shards(
        dir,
        plan,
        compare::SHARD_JSON,
        |c| chunk_path(c).is_file(),
        |p| Ok(Some(read_json(p)?)),
    )?;
    let first = records.first().context("a sharded compare with no shard")?;
    let mut positions: Vec<Position> = Vec::new();
    for &c in &plan.units {
        let mut p: Vec<Position> = read_json(&chunk_path(c))?;
        positions.append(&mut p);
    }
    let mut summaries = Vec::new();
    for (bi, b) in first.b.iter().enumerate() {
        let mut s = compare::summarize(&positions, bi, &b.label);
        if let Some(layers) = &first.lens_layers {
            s.lens = compare::summarize_lens(&positions, bi, layers);
        }
        if let Some(t) = first.b_text.get(bi) {
            s.b_tokens = Some(t.b_tokens);
            s.tokenizer_positions_differ = Some(t.tokenizer_positions_differ);
        }
        summaries.push(s);
    }
    let mut timing = compare::Timing {
        load_b_s: vec![0.0; first.b.len()],
        score_b_s: vec![0.0; first.b.len()],
        ..Default::default()
    };
    for r in &records {
        let t = &r.timing;
        timing.load_a_s += t.load_a_s;
        timing.score_a_s += t.score_a_s;
        timing.metrics_s += t.metrics_s;
        timing.generate_s += t.generate_s;
        timing.wall_s = timing.wall_s.max(t.wall_s);
        timing.tokens_evaluated += t.tokens_evaluated;
        timing.a_tokens += t.a_tokens;
        timing.positions_scored += t.positions_scored;
        for (sum, v) in timing.load_b_s.iter_mut().zip(&t.load_b_s) {
            *sum += v;
        }
        for (sum, v) in timing.score_b_s.iter_mut().zip(&t.score_b_s) {
            *sum += v;
        }
    }
    // Positions per second of engine and metric time, over all shards.
    let busy = timing.score_a_s + timing.score_b_s.iter().sum::<f64>() + timing.metrics_s;
    timing.positions_per_s = positions.len() as f64 / busy.max(1e-9);
    let report = CompareReport {
        kind: compare::KIND.into(),
        format_version: compare::FORMAT_VERSION,
        logitprobe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: crate::schema::trace::now_rfc3339(),
        command: first.command.clone(),
        a: first.a.clone(),
        b: first.b.clone(),
        input: first.input.clone(),
        probe: first.probe.clone(),
        summaries,
        timing,
        lens_layers: first.lens_layers.clone(),
        reference: None,
        noise_floor: None,
        positions,
    };
    compare::write_files(dir, &report)?;
    Ok(Merged {
        summary_table: Some(compare::summary_table(&report)),
        kind: plan.kind.clone(),
        shards: plan.shards,
        units: plan.units.len(),
        files: vec![
            dir.join(compare::COMPARE_JSON),
            dir.join(compare::COMPARE_CSV),
        ],
    })
}
