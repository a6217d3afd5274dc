//! Runs a sharded `trace` or `compare` on Slurm: the sbatch script of a job array (task K is
//! shard K) and of a merge job that waits for all of them, submitted with `sbatch`, and the
//! state of such a run read back from its folder and `squeue`.
//!
//! Slurm does the scheduling; logitprobe only writes what a Slurm user would write by hand.

use crate::cluster::shard::{shard_dir, Plan};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SLURM_DIR: &str = "slurm";
pub const ARRAY_SCRIPT: &str = "array.sbatch";
pub const MERGE_SCRIPT: &str = "merge.sbatch";
pub const JOBS_JSON: &str = "jobs.json";

/// Resources of each task, as sbatch takes them; `None` leaves the cluster's default.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<usize>,
    pub mem: Option<String>,
}

/// One sharded job to submit.
#[derive(Debug, Clone)]
pub struct ArrayJob {
    /// `trace` or `compare`.
    pub kind: String,
    pub shards: usize,
    /// The logitprobe binary the tasks run (an absolute path: tasks start elsewhere).
    pub exe: PathBuf,
    /// The command's own flags, as the user gave them.
    pub args: Vec<String>,
    /// Where the tasks start, so relative paths in `args` mean what they meant here.
    pub workdir: PathBuf,
    /// The run's output folder, absolute.
    pub out: PathBuf,
    pub resources: Resources,
}

fn quote(s: &str) -> String {
    shlex::try_quote(s).map_or_else(|_| format!("'{s}'"), |q| q.into_owned())
}

impl ArrayJob {
    pub fn slurm_dir(&self) -> PathBuf {
        self.out.join(SLURM_DIR)
    }

    fn header(&self, s: &mut String, name: &str, log: &str) {
        let _ = writeln!(s, "#SBATCH --job-name={name}");
        let _ = writeln!(s, "#SBATCH --chdir={}", self.workdir.display());
        let _ = writeln!(
            s,
            "#SBATCH --output={}",
            self.slurm_dir().join("logs").join(log).display()
        );
        let r = &self.resources;
        if let Some(p) = &r.partition {
            let _ = writeln!(s, "#SBATCH --partition={p}");
        }
        if let Some(t) = &r.time {
            let _ = writeln!(s, "#SBATCH --time={t}");
        }
        if let Some(c) = r.cpus_per_task {
            let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
        }
        if let Some(m) = &r.mem {
            let _ = writeln!(s, "#SBATCH --mem={m}");
        }
    }

    /// The array job: task K runs shard K of N.
    pub fn array_script(&self) -> String {
        let mut s = String::from("#!/bin/bash\n");
        let _ = writeln!(
            s,
            "# logitprobe {} in {} shards, written by `logitprobe slurm {}`.",
            self.kind, self.shards, self.kind
        );
        let _ = writeln!(
            s,
            "# Task K is shard K of {n}: the units whose index i has i mod {n} = K. A task run",
            n = self.shards
        );
        let _ = writeln!(
            s,
            "# again skips what it finished; resubmit one with: sbatch --array=K {}",
            self.slurm_dir().join(ARRAY_SCRIPT).display()
        );
        self.header(
            &mut s,
            &format!("logitprobe-{}", self.kind),
            &format!("{}-%a.log", self.kind),
        );
        let _ = writeln!(s, "#SBATCH --array=0-{}", self.shards - 1);
        s.push_str("set -euo pipefail\n");
        // The count through the environment and the number from SLURM_ARRAY_TASK_ID keep
        // the command line the user's own: each prompt's run.json is what an unsharded run
        // of the same command writes.
        let _ = writeln!(s, "export LOGITPROBE_SHARDS={}", self.shards);
        let mut line = format!("exec {} {}", quote(&self.exe.to_string_lossy()), self.kind);
        for a in &self.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        s.push_str(&line);
        s.push('\n');
        s
    }

    /// The merge job, submitted to run once every task has succeeded.
    pub fn merge_script(&self) -> String {
        let mut s = String::from("#!/bin/bash\n");
        let _ = writeln!(
            s,
            "# Merges the {} shards of {} (submitted with --dependency=afterok on the array job).",
            self.shards,
            self.out.display()
        );
        self.header(
            &mut s,
            &format!("logitprobe-{}-merge", self.kind),
            "merge.log",
        );
        s.push_str("set -euo pipefail\n");
        let _ = writeln!(
            s,
            "exec {} merge {}",
            quote(&self.exe.to_string_lossy()),
            quote(&self.out.to_string_lossy())
        );
        s
    }

    /// Writes both scripts into `OUT/slurm/` and makes the log folder.
    pub fn write_scripts(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = self.slurm_dir();
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let array = dir.join(ARRAY_SCRIPT);
        let merge = dir.join(MERGE_SCRIPT);
        for (path, text) in [(&array, self.array_script()), (&merge, self.merge_script())] {
            crate::output::write_atomic(path, |w| Ok(w.write_all(text.as_bytes())?))?;
        }
        Ok((array, merge))
    }

    /// Submits the array, then the merge job after it; records both ids in `OUT/slurm/jobs.json`.
    pub fn submit(&self) -> anyhow::Result<Submitted> {
        let (array, merge) = self.write_scripts()?;
        let array_job = sbatch(&[], &array)?;
        // afterok: the merge runs only when every task succeeded; with kill-on-invalid-dep a
        // failed or cancelled task cancels the merge at once instead of leaving it pending
        // forever (DependencyNeverSatisfied) on clusters that do not set kill_invalid_depend.
        let merge_job = sbatch(
            &[
                &format!("--dependency=afterok:{array_job}"),
                "--kill-on-invalid-dep=yes",
            ],
            &merge,
        )?;
        let jobs = Submitted {
            kind: self.kind.clone(),
            shards: self.shards,
            array_job,
            merge_job,
            out: self.out.clone(),
            submitted_at: crate::schema::trace::now_rfc3339(),
        };
        crate::output::write_json(&self.slurm_dir().join(JOBS_JSON), &jobs)?;
        Ok(jobs)
    }
}

/// The jobs of a submitted run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    pub kind: String,
    pub shards: usize,
    pub array_job: String,
    pub merge_job: String,
    pub out: PathBuf,
    pub submitted_at: String,
}

/// Runs `sbatch --parsable`; the job id.
fn sbatch(extra: &[&str], script: &Path) -> anyhow::Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(extra)
        .arg(script)
        .output()
        .map_err(|e| {
            logitprobe_backends::usage!(
                "cannot run sbatch ({e}): run this on a Slurm login node, or write the scripts only and submit them yourself"
            )
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `ID` or `ID;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() {
        anyhow::bail!("sbatch {} printed no job id", script.display());
    }
    Ok(id)
}

/// One shard's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    pub shard: usize,
    /// `done`, a Slurm state (`PENDING`, `RUNNING`, ...), or `missing` (not finished and
    /// not in the queue).
    pub state: String,
    pub done: usize,
    pub units: usize,
}

/// Where a sharded run stands.
#[derive(Debug, Clone)]
pub struct Status {
    pub out: PathBuf,
    pub jobs: Option<Submitted>,
    pub kind: Option<String>,
    pub shards: Vec<ShardState>,
    /// The merge: `merged`, a Slurm state, or `not run`.
    pub merge: String,
}

/// `squeue`'s states of an array's tasks, by task id (empty without squeue).
fn queued_tasks(array_job: &str) -> std::collections::BTreeMap<usize, String> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-j", array_job, "-o", "%K %T"])
        .output();
    let mut map = std::collections::BTreeMap::new();
    if let Ok(o) = out {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((k, state)) = line.trim().split_once(' ') {
                if let Ok(k) = k.parse() {
                    map.insert(k, state.to_string());
                }
            }
        }
    }
    map
}

fn queued_job(job: &str) -> Option<String> {
    let o = Command::new("squeue")
        .args(["-h", "-j", job, "-o", "%T"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// A folder given as a sharded run's that holds none.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} holds no sharded run (no shards/plan.json or slurm/jobs.json): give the run's output folder", .dir.display())]
pub struct NoShardedRun {
    pub dir: PathBuf,
}

/// Reads where the run in `out` stands: each shard from its files, and what is still queued
/// from `squeue`.
pub fn status(out: &Path) -> anyhow::Result<Status> {
    let jobs: Option<Submitted> = match std::fs::read(out.join(SLURM_DIR).join(JOBS_JSON)) {
        Ok(b) => Some(serde_json::from_slice(&b).context("reading slurm/jobs.json")?),
        Err(_) => None,
    };
    let plan = Plan::read(out)?;
    if plan.is_none() && jobs.is_none() {
        return Err(NoShardedRun {
            dir: out.to_path_buf(),
        }
        .into());
    }
    let queued = jobs
        .as_ref()
        .map(|j| queued_tasks(&j.array_job))
        .unwrap_or_default();
    let n = plan
        .as_ref()
        .map(|p| p.shards)
        .or(jobs.as_ref().map(|j| j.shards))
        .unwrap_or(0);
    let kind = plan
        .as_ref()
        .map(|p| p.kind.clone())
        .or(jobs.as_ref().map(|j| j.kind.clone()));
    let mut shards = Vec::new();
    for k in 0..n {
        let (done, units, recorded) = match &plan {
            Some(p) => {
                let units: Vec<usize> = p.units_of(k).collect();
                let dir = shard_dir(out, k);
                let done = if p.kind == "compare" {
                    units
                        .iter()
                        .filter(|&&c| crate::compare::chunk_record_path(&dir, c).is_file())
                        .count()
                } else {
                    let dirs = crate::output::PromptDirs::new(out, p.units.len(), p.index_space);
                    units
                        .iter()
                        .filter(|&&i| crate::output::prompt_done(&dirs.dir(i)))
                        .count()
                };
                let record = if p.kind == "compare" {
                    crate::compare::SHARD_JSON
                } else {
                    crate::output::RUN_JSON
                };
                (done, units.len(), dir.join(record).is_file())
            }
            None => (0, 0, false),
        };
        let state = match queued.get(&k) {
            Some(s) => s.clone(),
            None if recorded && done == units => "done".into(),
            None => "missing".into(),
        };
        shards.push(ShardState {
            shard: k,
            state,
            done,
            units,
        });
    }
    let merged = match kind.as_deref() {
        Some("compare") => out.join(crate::compare::COMPARE_JSON).is_file(),
        _ => std::fs::read(out.join(crate::output::RUN_JSON))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("merged").is_some()),
    };
    let merge = if merged {
        "merged".to_string()
    } else {
        jobs.as_ref()
            .and_then(|j| queued_job(&j.merge_job))
            .unwrap_or_else(|| "not run".into())
    };
    Ok(Status {
        out: out.to_path_buf(),
        jobs,
        kind,
        shards,
        merge,
    })
}
