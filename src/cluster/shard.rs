//! Sharded runs: one job split over the tasks of a scheduler's array, written into one output
//! folder on a shared filesystem, and merged back into what one process would have written.
//!
//! Shard `K` of `N` takes the units (a prompts file's prompts, a corpus's chunks) whose global
//! index `i` has `i mod N == K`: round robin, so a file sorted by length spreads its long
//! prompts over every shard. A prompt's tokens depend only on the seed, its text and its
//! global index (see [`crate::generate`]), so a shard writes exactly the files an unsharded run
//! writes for the same prompts.
//!
//! Layout of a sharded `--out`:
//!
//! ```text
//! shards/plan.json            the job: kind, shard count, every unit's index, its settings
//! shards/shard-K/             one folder per shard: its steps.jsonl, summary.csv and run.json
//!                             (trace), its chunk-NNNNNN.json records and shard.json (compare)
//! prompt-NNN/                 a prompt's files, by global index (trace)
//! ```
//!
//! A unit is done when its last file exists (a prompt folder's `run.json`, a chunk's record),
//! each written through a temporary name and a rename; a shard run again skips what is done.

use crate::output::{self, PromptDirs};
use crate::schema::run::ShardRecord;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const SHARDS_DIR: &str = "shards";
pub const PLAN_JSON: &str = "plan.json";

pub use crate::schema::shard::{Shard, ShardFrom};

/// Why a shard could not be worked out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// `K/N` that is not two numbers.
    #[error("shard {0:?} is not K/N (e.g. 0/4)")]
    Malformed(String),
    /// `N` of 0.
    #[error("a shard count of 0 runs nothing: use 1 or more")]
    NoShards,
    /// `K` not below `N`.
    #[error("{}", ShardError::out_of_range(*.index, *.count, *.from))]
    OutOfRange {
        index: usize,
        count: usize,
        from: ShardFrom,
    },
    /// A shard count given twice, differently.
    #[error("the shard count is given twice, as {count} and as {given}: give it once")]
    CountsDiffer { given: usize, count: usize },
    /// A count without a number: not a Slurm array task or Kubernetes Indexed Job.
    #[error("{count} shards, but which one is this? Not a Slurm array task (SLURM_ARRAY_TASK_ID) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")]
    NoIndex { count: usize },
    /// A scheduler variable that is not a number.
    #[error("{name}={value:?} is not a number")]
    BadVariable { name: &'static str, value: String },
}

impl ShardError {
    fn out_of_range(index: usize, count: usize, from: ShardFrom) -> String {
        match from {
            ShardFrom::Flag => format!(
                "shard {index}/{count} does not exist: shards are numbered 0 to {}",
                count - 1
            ),
            ShardFrom::Slurm => format!(
                "SLURM_ARRAY_TASK_ID {index} is not a shard of {count}: submit the array as --array=0-{}",
                count - 1
            ),
            ShardFrom::Kubernetes => format!(
                "JOB_COMPLETION_INDEX {index} is not a shard of {count}: set the Job's completions to {count}"
            ),
        }
    }
}

/// Parses `K/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize), ShardError> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| ShardError::Malformed(s.into()))?;
    let k = k
        .trim()
        .parse()
        .map_err(|_| ShardError::Malformed(s.into()))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| ShardError::Malformed(s.into()))?;
    Ok((k, n))
}

impl Shard {
    /// The shard of this process: `given` (`K/N` from the command line) wins; else a Slurm
    /// array task's or a Kubernetes Indexed Job's index, read through `env`.
    ///
    /// With `count` (the shard count given on its own), a task's index is the shard's number
    /// itself, so resubmitting task 2 alone (`sbatch --array=2`) redoes shard 2. Without it,
    /// a Slurm array is the shard set: shard `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`. A Kubernetes Job does not tell its completions to its pods,
    /// so `JOB_COMPLETION_INDEX` needs `count`.
    ///
    /// ```
    /// use logitprobe::cluster::shard::{Shard, ShardFrom};
    /// let env = |k: &str| match k {
    ///     "SLURM_ARRAY_TASK_ID" => Some("5".to_string()),
    ///     "SLURM_ARRAY_TASK_MIN" => Some("4".to_string()),
    ///     "SLURM_ARRAY_TASK_COUNT" => Some("4".to_string()),
    ///     _ => None,
    /// };
    /// let s = Shard::resolve(None, None, env).unwrap().unwrap();
    /// assert_eq!((s.index, s.count, s.from), (1, 4, ShardFrom::Slurm));
    /// assert!(s.takes(5) && !s.takes(6));
    /// ```
    pub fn resolve(
        given: Option<(usize, usize)>,
        count: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Shard>, ShardError> {
        let number = |name: &'static str| -> Result<Option<usize>, ShardError> {
            match env(name).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ShardError::BadVariable { name, value: v }),
            }
        };
        let shard = if let Some((index, n)) = given {
            if let Some(c) = count.filter(|&c| c != n) {
                return Err(ShardError::CountsDiffer { given: c, count: n });
            }
            Shard {
                index,
                count: n,
                from: ShardFrom::Flag,
            }
        } else if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            match count {
                Some(n) => Shard {
                    index: id,
                    count: n,
                    from: ShardFrom::Slurm,
                },
                None => {
                    let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                    let n = number("SLURM_ARRAY_TASK_COUNT")?.unwrap_or(1);
                    Shard {
                        index: id.saturating_sub(min),
                        count: n,
                        from: ShardFrom::Slurm,
                    }
                }
            }
        } else if let (Some(n), Some(id)) = (count, number("JOB_COMPLETION_INDEX")?) {
            Shard {
                index: id,
                count: n,
                from: ShardFrom::Kubernetes,
            }
        } else if let Some(n) = count {
            return Err(ShardError::NoIndex { count: n });
        } else {
            return Ok(None);
        };
        if shard.count == 0 {
            return Err(ShardError::NoShards);
        }
        if shard.index >= shard.count {
            return Err(ShardError::OutOfRange {
                index: shard.index,
                count: shard.count,
                from: shard.from,
            });
        }
        Ok(Some(shard))
    }

    /// Whether the unit with global index `i` is this shard's.
    pub fn takes(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// This shard's folder under `out`.
    pub fn dir(&self, out: &Path) -> PathBuf {
        shard_dir(out, self.index)
    }

    /// How the run says which shard it is: `shard 1/4 (from SLURM_ARRAY_TASK_ID)`.
    pub fn describe(&self) -> String {
        let from = match self.from {
            ShardFrom::Flag => "given".to_string(),
            ShardFrom::Slurm => "from SLURM_ARRAY_TASK_ID".to_string(),
            ShardFrom::Kubernetes => "from JOB_COMPLETION_INDEX".to_string(),
        };
        format!("shard {}/{} ({from})", self.index, self.count)
    }
}

/// The folder of shard `k` under `out`.
pub fn shard_dir(out: &Path, k: usize) -> PathBuf {
    out.join(SHARDS_DIR).join(format!("shard-{k}"))
}

/// What a sharded run is, written by the first shard to start and checked by every other, so
/// shards of two different jobs never mix in one folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// `trace` or `compare`.
    pub kind: String,
    pub shards: usize,
    /// The global index of every unit (prompt or chunk), in order.
    pub units: Vec<usize>,
    /// The size of the index space (a prompts file's lines; blank ones hold no prompt).
    pub index_space: usize,
    /// Everything that decides the outputs: model, input and its digest, settings.
    pub job: serde_json::Value,
}

/// Why a plan does not fit the folder.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{} holds a run in {found} shards, not {given}: run with {found} shards to resume it, or write to another folder", .dir.display())]
    ShardsChanged {
        dir: PathBuf,
        found: usize,
        given: usize,
    },
    #[error("{} holds a sharded {found}, not a {given}: write to another folder", .dir.display())]
    KindChanged {
        dir: PathBuf,
        found: String,
        given: String,
    },
    #[error("{} holds shards of another job ({field} was {found}, now {given}): write to another folder", .dir.display())]
    JobChanged {
        dir: PathBuf,
        field: String,
        found: String,
        given: String,
    },
}

/// The first field where two JSON values differ, as `a.b.c`, with both values.
fn first_difference(
    path: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                first_difference(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                )
            })
        }
        _ if a == b => None,
        _ => Some((path.to_string(), a.to_string(), b.to_string())),
    }
}

impl Plan {
    pub fn path(out: &Path) -> PathBuf {
        out.join(SHARDS_DIR).join(PLAN_JSON)
    }

    /// Reads the plan of a sharded folder, if it has one.
    pub fn read(out: &Path) -> anyhow::Result<Option<Plan>> {
        let path = Plan::path(out);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not a shard plan", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes this plan into `out`, or checks it against the one there. Creation is atomic
    /// (a hard link of a finished file, which fails when the name exists, also over NFS), so
    /// shards starting together agree on one plan.
    pub fn claim(&self, out: &Path) -> anyhow::Result<()> {
        let path = Plan::path(out);
        std::fs::create_dir_all(path.parent().expect("plan has a folder"))
            .with_context(|| format!("creating {}", out.join(SHARDS_DIR).display()))?;
        if let Some(found) = Plan::read(out)? {
            return self.check(out, &found);
        }
        let tmp = path.with_file_name(format!(".plan.{}.partial", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, serde_json::to_vec(self)?) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let found = Plan::read(out)?.context("the shard plan vanished")?;
                self.check(out, &found)
            }
            Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
        }
    }

    fn check(&self, out: &Path, found: &Plan) -> anyhow::Result<()> {
        let dir = out.to_path_buf();
        if found.kind != self.kind {
            return Err(PlanError::KindChanged {
                dir,
                found: found.kind.clone(),
                given: self.kind.clone(),
            }
            .into());
        }
        if found.shards != self.shards {
            return Err(PlanError::ShardsChanged {
                dir,
                found: found.shards,
                given: self.shards,
            }
            .into());
        }
        if let Some((field, f, g)) = first_difference("", &found.job, &self.job) {
            return Err(PlanError::JobChanged {
                dir,
                field,
                found: f,
                given: g,
            }
            .into());
        }
        if found.units != self.units {
            return Err(PlanError::JobChanged {
                dir,
                field: "units".into(),
                found: format!("{} units", found.units.len()),
                given: format!("{} units", self.units.len()),
            }
            .into());
        }
        Ok(())
    }

    /// The units of shard `k`.
    pub fn units_of(&self, k: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.shards;
        self.units.iter().copied().filter(move |i| i % n == k)
    }
}

/// Keeps the lines of `path` that `keep` accepts (a shard's stream of steps or rows, cut
/// back to the units that finished before it runs again); a missing file is left missing.
pub fn filter_lines(path: &Path, mut keep: impl FnMut(&[u8]) -> bool) -> anyhow::Result<()> {
    use std::io::BufRead;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    crate::output::write_atomic(path, |w| {
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line?;
            if keep(&line) {
                w.write_all(&line)?;
                w.write_all(b"\n")?;
            }
        }
        Ok(())
    })
}

/// Where a shard of a sharded `trace` starts: the prompts it still has to run, and its record.
pub struct TraceShardStart {
    /// Global indices of this shard's prompts that no earlier run of it finished.
    pub todo: BTreeSet<usize>,
    pub record: ShardRecord,
}

/// Claims the shared folder `dirs.root` for a sharded `trace` of the prompts `indices`
/// (sorted) with settings `job`, and resumes this shard: the steps and summary rows of the
/// prompts an earlier run of it finished stay, those of the prompts it had begun go.
pub fn resume_trace(
    shard: Shard,
    indices: &[usize],
    index_space: usize,
    job: serde_json::Value,
    dirs: &PromptDirs,
) -> anyhow::Result<TraceShardStart> {
    let todo: BTreeSet<usize> = indices
        .iter()
        .copied()
        .filter(|&i| shard.takes(i) && !output::prompt_done(&dirs.dir(i)))
        .collect();
    let mine = indices.iter().filter(|&&i| shard.takes(i)).count();
    Plan {
        kind: "trace".into(),
        shards: shard.count,
        units: indices.to_vec(),
        index_space,
        job,
    }
    .claim(&dirs.root)?;
    let dir = shard.dir(&dirs.root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let done = |i: usize| shard.takes(i) && !todo.contains(&i) && indices.binary_search(&i).is_ok();
    filter_lines(&dir.join(output::STEPS_JSONL), |l| {
        output::step_line_prompt(l).is_some_and(done)
    })?;
    let mut header = true;
    filter_lines(&dir.join(output::SUMMARY_CSV), |l| {
        std::mem::take(&mut header) && l.starts_with(b"index,")
            || std::str::from_utf8(l)
                .ok()
                .and_then(|l| l.split(',').next()?.parse().ok())
                .is_some_and(done)
    })?;
    let record = ShardRecord {
        shard,
        prompts: mine,
        done_before: mine - todo.len(),
    };
    Ok(TraceShardStart { todo, record })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_given_shard_wins_and_is_checked() {
        let s = Shard::resolve(Some((3, 4)), None, env(&[("SLURM_ARRAY_TASK_ID", "1")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.index, s.count, s.from), (3, 4, ShardFrom::Flag));
        assert!(matches!(
            Shard::resolve(Some((4, 4)), None, env(&[])),
            Err(ShardError::OutOfRange { .. })
        ));
        assert_eq!(
            Shard::resolve(Some((0, 0)), None, env(&[])),
            Err(ShardError::NoShards)
        );
        assert!(matches!(
            Shard::resolve(Some((0, 4)), Some(3), env(&[])),
            Err(ShardError::CountsDiffer { .. })
        ));
        assert!(parse_shard("1of4").is_err() && parse_shard("a/4").is_err());
    }

    #[test]
    fn slurm_and_kubernetes_indices() {
        // With a count, the task id is the shard: a resubmitted `--array=2` is shard 2.
        let vars = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        let s = Shard::resolve(None, Some(4), env(&vars)).unwrap().unwrap();
        assert_eq!((s.index, s.count), (2, 4));
        // Without one, the array is the shard set.
        assert_eq!(
            Shard::resolve(None, None, env(&vars))
                .unwrap()
                .unwrap()
                .count,
            1
        );
        let k = Shard::resolve(None, Some(3), env(&[("JOB_COMPLETION_INDEX", "2")]))
            .unwrap()
            .unwrap();
        assert_eq!((k.index, k.from), (2, ShardFrom::Kubernetes));
        assert_eq!(
            Shard::resolve(None, None, env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap(),
            None,
            "a Kubernetes index alone says nothing about sharding"
        );
        assert_eq!(
            Shard::resolve(None, Some(3), env(&[])),
            Err(ShardError::NoIndex { count: 3 })
        );
        assert!(matches!(
            Shard::resolve(None, Some(4), env(&[("SLURM_ARRAY_TASK_ID", "x")])),
            Err(ShardError::BadVariable { .. })
        ));
        assert_eq!(Shard::resolve(None, None, env(&[])).unwrap(), None);
    }

    #[test]
    fn round_robin_covers_every_index_once() {
        let n = 4;
        for i in 0..50 {
            let owners = (0..n)
                .filter(|&k| {
                    Shard {
                        index: k,
                        count: n,
                        from: ShardFrom::Flag,
                    }
                    .takes(i)
                })
                .count();
            assert_eq!(owners, 1);
        }
    }

    #[test]
    fn a_plan_is_claimed_once_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let plan = Plan {
            kind: "trace".into(),
            shards: 4,
            units: vec![0, 1, 2],
            index_space: 3,
            job: serde_json::json!({"seed": 3, "model": "m"}),
        };
        plan.claim(d.path()).unwrap();
        plan.claim(d.path()).unwrap();
        let e = Plan {
            shards: 2,
            ..plan.clone()
        }
        .claim(d.path())
        .unwrap_err()
        .to_string();
        assert!(e.contains("in 4 shards, not 2"), "{e}");
        let e = Plan {
            job: serde_json::json!({"seed": 4, "model": "m"}),
            ..plan.clone()
        }
        .claim(d.path())
        .unwrap_err()
        .to_string();
        assert!(e.contains("seed was 3, now 4"), "{e}");
    }
}
