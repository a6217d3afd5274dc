//! Sharded runs on a real Slurm: a single-node cluster (munged, slurmctld, slurmd from
//! Debian's packages, started as root by `scripts/slurm-cluster` in a temporary folder), the
//! `slurm` subcommand's array and merge jobs through it, a task cancelled mid-run and
//! resubmitted, and the bad inputs of sharding.

mod common;

use common::{assert_usage_error, bin, run, smollm2, stderr, tiny};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A running test cluster, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-cluster")
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/slurm-cluster");
        assert!(
            o.status.success(),
            "the test cluster did not start (scripts/setup installs munge and slurm-wlm; the daemons run as root): {}",
            stderr(&o)
        );
        let conf = dir.path().join("slurm.conf");
        Cluster { dir, conf }
    }

    /// A Slurm client command (or logitprobe) talking to this cluster.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn logitprobe(&self, args: &[&str], cwd: &Path) -> Output {
        let mut c = bin();
        c.env("SLURM_CONF", &self.conf)
            .current_dir(cwd)
            .args(args)
            .output()
            .unwrap()
    }

    /// `scontrol show job ID`'s JobState (jobs stay known for MinJobAge after they end).
    fn job_state(&self, id: &str) -> String {
        let o = self
            .cmd("scontrol")
            .args(["show", "job", id])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("JobState="))
            .unwrap_or("UNKNOWN")
            .to_string()
    }

    /// Waits until job `id` (every task of an array) has ended; its final states.
    fn wait_ended(&self, id: &str, limit: Duration) -> Vec<String> {
        let t = Instant::now();
        loop {
            let o = self
                .cmd("scontrol")
                .args(["show", "job", id])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let states: Vec<String> = text
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("JobState="))
                .map(String::from)
                .collect();
            let ended = !states.is_empty()
                && states.iter().all(|s| {
                    [
                        "COMPLETED",
                        "FAILED",
                        "CANCELLED",
                        "TIMEOUT",
                        "OUT_OF_MEMORY",
                    ]
                    .contains(&s.as_str())
                });
            if ended {
                return states;
            }
            assert!(
                t.elapsed() < limit,
                "job {id} still not ended after {limit:?}: {states:?}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// `submitted array job A (...) and merge job M (...)` → (A, M).
fn job_ids(o: &Output) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |w: &str| {
        let i = words
            .windows(2)
            .position(|p| p[0] == w && p[1] == "job")
            .unwrap_or_else(|| panic!("no {w} job in: {out}"));
        words[i + 2].to_string()
    };
    (after("array"), after("merge"))
}

/// 200 prompts of varied length, as lines.
fn prompts_file(dir: &Path) -> PathBuf {
    prompts_file_of(dir, 200)
}

/// `n` prompts of varied length, as lines.
fn prompts_file_of(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "the", "river", "stone", "light", "quick", "model", "token", "and", "then", "over",
    ];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            (0..3 + i % 7)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let p = dir.join("prompts.txt");
    fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// A file with what changes from run to run (timestamps, load time) taken out.
fn normalized(path: &Path) -> Vec<u8> {
    let name = path.file_name().unwrap().to_str().unwrap();
    let bytes = fs::read(path).unwrap();
    match name {
        "run.json" | "adaptive_token_trace.json" => {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            for k in ["started_at", "finished_at", "load_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("generated_at");
            }
            serde_json::to_vec(&v).unwrap()
        }
        "report.html" => {
            let text = String::from_utf8(bytes).unwrap();
            let mut out = String::new();
            let mut rest = text.as_str();
            // "generated_at":"2026-...Z" → "generated_at":""
            while let Some(i) = rest.find("\"generated_at\":\"") {
                let start = i + "\"generated_at\":\"".len();
                out.push_str(&rest[..start]);
                let end = rest[start..].find('"').unwrap();
                rest = &rest[start + end..];
            }
            out.push_str(rest);
            out.into_bytes()
        }
        _ => bytes,
    }
}

/// Every prompt folder of `a` is in `b` with the same files, equal but for timestamps.
fn assert_same_prompt_folders(a: &Path, b: &Path, n: usize) {
    for i in 0..n {
        let name = format!("prompt-{i:03}");
        let (da, db) = (a.join(&name), b.join(&name));
        let mut files: Vec<String> = fs::read_dir(&da)
            .unwrap_or_else(|e| panic!("{}: {e}", da.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        let mut other: Vec<String> = fs::read_dir(&db)
            .unwrap_or_else(|e| panic!("{}: {e}", db.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        other.sort();
        assert_eq!(files, other, "{name}: the same files");
        for f in &files {
            assert!(
                normalized(&da.join(f)) == normalized(&db.join(f)),
                "{name}/{f} differs between the unsharded and the merged run"
            );
        }
    }
}

fn trace_flags<'a>(model: &'a str, prompts: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--model",
        model,
        "--prompts-file",
        prompts,
        "--seed",
        "7",
        "--max-new-tokens",
        "48",
        "--threads",
        "1",
        "--parallel",
        "2",
        "--out",
        "out",
    ];
    v.extend_from_slice(extra);
    v
}

/// The cluster tests share one cluster: two CPUs run two tasks at a time.
#[test]
fn sharded_trace_and_compare_on_slurm() {
    let cluster = Cluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path());
    let model = tiny("tiny-f32.gguf");
    let (model, prompts) = (model.to_str().unwrap(), prompts.to_str().unwrap());
    // Same relative --out in two folders: the command lines, and so each prompt's run.json,
    // are the same.
    let (whole, sharded) = (tmp.path().join("whole"), tmp.path().join("sharded"));
    fs::create_dir_all(&whole).unwrap();
    fs::create_dir_all(&sharded).unwrap();
    let mut args = vec!["trace"];
    args.extend(trace_flags(model, prompts, &[]));
    let o = cluster.logitprobe(&args, &whole);
    assert!(o.status.success(), "unsharded trace: {}", stderr(&o));

    // The array and its merge job; one task at a time (--cpus-per-task 2 of 2), so task 3
    // can be caught running and cancelled.
    let mut args = vec![
        "slurm",
        "trace",
        "--shards",
        "4",
        "--cpus-per-task",
        "2",
        "--",
    ];
    args.extend(trace_flags(model, prompts, &[]));
    let o = cluster.logitprobe(&args, &sharded);
    assert!(o.status.success(), "slurm trace: {}", stderr(&o));
    let (array, merge_job) = job_ids(&o);
    let out = sharded.join("out");
    // Prompts of shard 3 that finished: run.json there and not interrupted (scancel sends
    // SIGTERM, which ends the task after its step; the prompts it cut short are written
    // marked interrupted, and run again when the shard is).
    let shard3_done = || {
        (0..200)
            .filter(|i| i % 4 == 3)
            .filter(|i| {
                fs::read(out.join(format!("prompt-{i:03}/run.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|r| r["interrupted"] == false)
            })
            .count()
    };
    let t = Instant::now();
    while shard3_done() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "shard 3 never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = cluster
        .cmd("scancel")
        .arg(format!("{array}_3"))
        .output()
        .unwrap();
    assert!(c.status.success(), "scancel: {}", stderr(&c));
    let states = cluster.wait_ended(&array, Duration::from_secs(120));
    assert!(states.contains(&"CANCELLED".to_string()), "{states:?}");
    let done_at_cancel = shard3_done();
    assert!(
        done_at_cancel < 50,
        "shard 3 finished before it was cancelled: the test needs a slower task"
    );
    // The merge job does not run over a missing shard: afterok with kill-on-invalid-dep.
    cluster.wait_ended(&merge_job, Duration::from_secs(60));
    assert_eq!(cluster.job_state(&merge_job), "CANCELLED");
    assert!(!out.join("run.json").exists(), "nothing merged");

    let status = cluster.logitprobe(&["slurm", "status", "out"], &sharded);
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        text.lines()
            .any(|l| l.starts_with("3 ") && l.contains("missing")),
        "{text}"
    );
    assert!(text.contains("sbatch --array=3"), "{text}");

    let o = cluster.logitprobe(&["merge", "out"], &sharded);
    assert_usage_error(&o, "shard 3 of 4 is missing");
    assert!(
        stderr(&o).contains(&format!(
            "sbatch --array=3 {}",
            out.join("slurm/array.sbatch").display()
        )),
        "{}",
        stderr(&o)
    );

    // Resubmitted, the task does only what it had not finished.
    let o = cluster
        .cmd("sbatch")
        .args(["--parsable", "--array=3"])
        .arg(out.join("slurm/array.sbatch"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let again = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let states = cluster.wait_ended(&again, Duration::from_secs(120));
    assert_eq!(states, ["COMPLETED"]);
    let record: Value =
        serde_json::from_slice(&fs::read(out.join("shards/shard-3/run.json")).unwrap()).unwrap();
    assert_eq!(record["shard"]["index"], 3);
    assert_eq!(record["shard"]["from"], "SLURM_ARRAY_TASK_ID");
    assert_eq!(record["shard"]["done_before"], done_at_cancel);
    let o = cluster.logitprobe(&["merge", "out"], &sharded);
    assert!(o.status.success(), "merge: {}", stderr(&o));
    assert_same_prompt_folders(&whole.join("out"), &out, 200);
    // The top level: every prompt once, stop reasons added up.
    let top = |d: &Path| -> Value {
        serde_json::from_slice(&fs::read(d.join("run.json")).unwrap()).unwrap()
    };
    let (a, b) = (top(&whole.join("out")), top(&out));
    assert_eq!(a["stop_reasons"], b["stop_reasons"]);
    assert_eq!(
        a["timings"]["generated_tokens"],
        b["timings"]["generated_tokens"]
    );
    assert_eq!(b["merged"]["shards"], 4);
    let rows = |d: &Path| {
        let mut v: Vec<String> = fs::read_to_string(d.join("summary.csv"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    assert_eq!(rows(&whole.join("out")), rows(&out));
    let steps = |d: &Path| {
        fs::read_to_string(d.join("steps.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(steps(&whole.join("out")), steps(&out), "each step once");

    // compare: 16 corpus chunks, f32 against Q8_0, merged by the merge job itself.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt");
    let a_side = format!("llama:{model}");
    let b_side = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let cflags = [
        "--a",
        &a_side,
        "--b",
        &b_side,
        "--text-file",
        corpus.to_str().unwrap(),
        "--ctx-size",
        "128",
        "--chunks",
        "16",
        "--threads",
        "1",
        "--out",
        "cmp",
    ];
    let mut args = vec!["compare"];
    args.extend(cflags);
    let o = cluster.logitprobe(&args, &whole);
    assert!(o.status.success(), "unsharded compare: {}", stderr(&o));
    let mut args = vec!["slurm", "compare", "--shards", "4", "--"];
    args.extend(cflags);
    let o = cluster.logitprobe(&args, &sharded);
    assert!(o.status.success(), "slurm compare: {}", stderr(&o));
    let (array, merge_job) = job_ids(&o);
    let states = cluster.wait_ended(&array, Duration::from_secs(120));
    let logs = || {
        (0..4)
            .map(|i| {
                let log = sharded.join(format!("cmp/slurm/logs/compare-{i}.log"));
                format!(
                    "{}:\n{}",
                    log.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Shards share the reference folder and write its manifest and vocab.json at once.
    assert!(
        states.iter().all(|s| s == "COMPLETED"),
        "{states:?}\n{}",
        logs()
    );
    cluster.wait_ended(&merge_job, Duration::from_secs(60));
    assert_eq!(
        cluster.job_state(&merge_job),
        "COMPLETED",
        "merge log: {}",
        fs::read_to_string(sharded.join("cmp/slurm/logs/merge.log")).unwrap_or_default()
    );
    let report = |d: &Path| -> Value {
        serde_json::from_slice(&fs::read(d.join("cmp/compare.json")).unwrap()).unwrap()
    };
    let (a, b) = (report(&whole), report(&sharded));
    assert_eq!(a["summaries"], b["summaries"], "statistics identical");
    assert_eq!(a["positions"], b["positions"]);
    assert_eq!(a["input"], b["input"]);
    for f in ["compare.csv", "kld_histogram.png", "report.html"] {
        assert!(sharded.join("cmp").join(f).is_file(), "{f}");
    }
    assert_eq!(
        fs::read(whole.join("cmp/compare.csv")).unwrap(),
        fs::read(sharded.join("cmp/compare.csv")).unwrap()
    );
}

fn tiny_trace(prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    tiny_trace_seed(prompts, out, "7", extra)
}

fn tiny_trace_seed(prompts: &Path, out: &Path, seed: &str, extra: &[&str]) -> Output {
    let model = tiny("tiny-f32.gguf");
    let mut args = vec![
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--seed",
        seed,
        "--max-new-tokens",
        "4",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Every file under `dir` with its contents, to prove a refused run wrote nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = fs::read(&p).unwrap();
                v.push((p, bytes));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn bad_sharding_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path());
    let out = tmp.path().join("out");
    let model = tiny("tiny-f32.gguf");

    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
        "--seed",
        "1",
        "--shard",
        "0/2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "--shard 0/2 needs --prompts-file");
    let o = run(&[
        "compare",
        "--a",
        &format!("llama:{}", model.display()),
        "--b",
        &format!("llama:{}", model.display()),
        "--prompt",
        "hello",
        "--shard",
        "0/2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "--shard 0/2 needs --text-file");
    assert_usage_error(
        &tiny_trace(&prompts, &out, &["--shard", "4/4"]),
        "shard 4/4 does not exist",
    );
    assert_usage_error(
        &tiny_trace(&prompts, &out, &["--shard", "1of4"]),
        "is not K/N",
    );
    assert_usage_error(
        &tiny_trace(&prompts, &out, &["--shards", "4"]),
        "needs this task's number",
    );
    assert!(!out.exists(), "nothing written for a refused shard");

    // Shard 1 of 4, then the same folder with 3 shards or another seed.
    let o = tiny_trace(&prompts, &out, &["--shard", "1/4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out);
    assert_usage_error(
        &tiny_trace(&prompts, &out, &["--shard", "1/3"]),
        "holds a run in 4 shards, not 3",
    );
    assert_usage_error(
        &tiny_trace_seed(&prompts, &out, "8", &["--shard", "2/4"]),
        "seed was 7, now 8",
    );
    assert_eq!(snapshot(&out), before, "a refused shard overwrote nothing");
    // Through slurm too, before anything is submitted.
    let o = run(&[
        "slurm",
        "trace",
        "--shards",
        "3",
        "--dry-run",
        "--",
        "--model",
        model.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "holds a run in 4 shards, not 3");
    assert_eq!(snapshot(&out), before);

    // Merge names what is missing.
    let o = run(&["merge", out.to_str().unwrap()]);
    assert_usage_error(
        &o,
        "shard 0 of 4 is missing 50 of its 50 prompts (0, 4, 8, 12, 16, ...)",
    );
    let o = run(&["merge", tmp.path().to_str().unwrap()]);
    assert_usage_error(&o, "is not a sharded run");
    // A sharded trace needs one seed for all.
    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--shard",
        "0/2",
        "--out",
        tmp.path().join("o2").to_str().unwrap(),
    ]);
    assert_usage_error(&o, "needs --seed");
    let o = run(&[
        "slurm",
        "trace",
        "--dry-run",
        "--",
        "--prompt",
        "x",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_usage_error(&o, "splits a --prompts-file");
}

/// A task whose `--time` runs out: Slurm sends SIGTERM (then SIGKILL after KillWait), the
/// task writes what it finished and ends as interrupted (TIMEOUT), the merge job does not
/// run, and the task resubmitted with more time finishes to the bytes of a run that was
/// never stopped.
#[test]
fn a_task_whose_time_limit_runs_out_resumes_to_the_same_bytes() {
    // Slurm's smallest limit is a minute, checked about every 30 s: the task is SmolLM2 at
    // one thread, some 25,000 tokens (over 100 s on any machine this runs on), with two
    // candidates a step to keep the folders small.
    const PROMPTS: usize = 400;
    let cluster = Cluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file_of(tmp.path(), PROMPTS);
    let model = smollm2();
    let (model, prompts) = (model.to_str().unwrap(), prompts.to_str().unwrap());
    let flags = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--model",
            model,
            "--prompts-file",
            prompts,
            "--seed",
            "7",
            "--max-new-tokens",
            "64",
            "--ignore-eos",
            "--threads",
            "1",
            "--parallel",
            "1",
            "--min-k",
            "1",
            "--max-k",
            "2",
            "--no-plots",
            "--out",
            "out",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (whole, timed) = (tmp.path().join("whole"), tmp.path().join("timed"));
    fs::create_dir_all(&whole).unwrap();
    fs::create_dir_all(&timed).unwrap();
    // The run that is never stopped, on the other CPU while the task runs.
    let mut never_stopped = bin()
        .arg("trace")
        .args(flags(&[]))
        .current_dir(&whole)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(tmp.path().join("whole.log")).unwrap())
        .spawn()
        .unwrap();

    let mut args = vec![
        "slurm".to_string(),
        "trace".into(),
        "--shards".into(),
        "1".into(),
        "--time".into(),
        "1".into(),
        "--cpus-per-task".into(),
        "1".into(),
        "--".into(),
    ];
    args.extend(flags(&[]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cluster.logitprobe(&args, &timed);
    assert!(o.status.success(), "slurm trace: {}", stderr(&o));
    let (array, merge_job) = job_ids(&o);
    let states = cluster.wait_ended(&array, Duration::from_secs(300));
    let out = timed.join("out");
    let finished = || {
        (0..PROMPTS)
            .filter(|i| {
                fs::read(out.join(format!("prompt-{i:03}/run.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|r| r["interrupted"] == false)
            })
            .count()
    };
    let done_at_timeout = finished();
    assert_eq!(
        states,
        ["TIMEOUT"],
        "the task was to outlast its minute ({done_at_timeout} of {PROMPTS} prompts done): the test needs a slower task"
    );
    assert!(
        done_at_timeout > 0 && done_at_timeout < PROMPTS,
        "{done_at_timeout}"
    );
    // SIGTERM ended it as Ctrl-C does: the shard's record says interrupted, exit 143.
    let log = fs::read_to_string(out.join("slurm/logs/trace-0.log")).unwrap_or_default();
    let record: Value =
        serde_json::from_slice(&fs::read(out.join("shards/shard-0/run.json")).unwrap())
            .unwrap_or_else(|e| panic!("shard-0/run.json: {e}; task log:\n{log}"));
    assert_eq!(record["interrupted"], true, "task log:\n{log}");
    cluster.wait_ended(&merge_job, Duration::from_secs(60));
    assert_eq!(cluster.job_state(&merge_job), "CANCELLED");
    assert!(!out.join("run.json").exists(), "nothing merged");

    // Resubmitted with time enough, the task does only what it had not finished.
    let o = cluster
        .cmd("sbatch")
        .args(["--parsable", "--array=0", "--time=30"])
        .arg(out.join("slurm/array.sbatch"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let again = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(
        cluster.wait_ended(&again, Duration::from_secs(600)),
        ["COMPLETED"]
    );
    let record: Value =
        serde_json::from_slice(&fs::read(out.join("shards/shard-0/run.json")).unwrap()).unwrap();
    assert_eq!(record["shard"]["done_before"], done_at_timeout);
    let o = cluster.logitprobe(&["merge", "out"], &timed);
    assert!(o.status.success(), "merge: {}", stderr(&o));

    let ended = never_stopped.wait().unwrap();
    assert!(
        ended.success(),
        "{}",
        fs::read_to_string(tmp.path().join("whole.log")).unwrap_or_default()
    );
    assert_same_prompt_folders(&whole.join("out"), &out, PROMPTS);
}

/// Shards run by hand, one after another, and resumed: the merge equals one process's run.
#[test]
fn shards_by_hand_resume_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path());
    let whole = tmp.path().join("whole");
    let o = tiny_trace(&prompts, &whole, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("sharded");
    for k in 0..3 {
        let o = tiny_trace(&prompts, &out, &["--shard", &format!("{k}/3")]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Shard 1 again: nothing to do, and its record says so.
    let o = tiny_trace(&prompts, &out, &["--shard", "1/3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("67 of 200 prompts, 67 done before"),
        "{}",
        stderr(&o)
    );
    // A prompt whose folder lost its run.json is done again, and only its steps are kept once.
    fs::remove_file(out.join("prompt-004/run.json")).unwrap();
    let o = tiny_trace(&prompts, &out, &["--shard", "1/3"]);
    assert!(stderr(&o).contains("66 done before"), "{}", stderr(&o));
    let o = run(&["merge", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..200 {
        let name = format!("prompt-{i:03}");
        for f in [
            "adaptive_token_trace.json",
            "adaptive_token_trace.csv",
            "generated.txt",
        ] {
            assert_eq!(
                normalized(&whole.join(&name).join(f)),
                normalized(&out.join(&name).join(f)),
                "{name}/{f}"
            );
        }
    }
    let lines = |p: &Path| fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(
        lines(&whole.join("steps.jsonl")),
        lines(&out.join("steps.jsonl"))
    );
    assert_eq!(
        lines(&whole.join("summary.csv")),
        lines(&out.join("summary.csv"))
    );
}
