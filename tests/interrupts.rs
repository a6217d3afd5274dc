//! Interrupts at random times (issue 15): 50 SIGINTs, each ending as exit 130 with
//! `interrupted: true` and a trace that equals steps.jsonl (or, before the handler exists or
//! after the run, as a clean kill or a normal finish); and 50 SIGKILLs into one reused --out,
//! each leaving a steps.jsonl whose every whole line parses (a kill can cut the last one, only
//! at a page boundary) and no final file that is half-written or left from an earlier run.

mod common;

use common::bin;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn seed() -> u64 {
    let s = std::env::var("INTERRUPT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("interrupt seed {s} (INTERRUPT_SEED={s} to repeat)");
    s
}

/// A trace that takes a while: a wide vocabulary, EOS suppressed, plots on.
fn spawn(out: &Path, prompt: &str, tokens: u32, plots: bool) -> std::process::Child {
    let mut c = bin();
    c.args([
        "trace",
        "--backend",
        "test",
        "--model",
        "151936:1:-100",
        "--prompt",
        prompt,
        "--seed",
        "1",
        "--max-new-tokens",
        &tokens.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    if !plots {
        c.arg("--no-plots");
    }
    common::default_signals(&mut c);
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Every whole line of steps.jsonl parses; returns their number. Each step is one write(2),
/// but a SIGKILL stops even one write between pages (the kernel checks for a fatal signal
/// before each page it copies), so a killed run may end in a cut line, and then only at a
/// page boundary. A run that was not killed never leaves one.
fn steps_lines(out: &Path, killed: bool) -> usize {
    let Ok(text) = fs::read(out.join("steps.jsonl")) else {
        return 0;
    };
    let whole = text.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        assert!(killed, "a cut last line in a run that was not killed");
        assert_eq!(
            text.len() % 4096,
            0,
            "a line cut at byte {}, not at a page boundary",
            text.len()
        );
    }
    let lines: Vec<&[u8]> = text[..whole]
        .split_inclusive(|&c| c == b'\n')
        .map(|l| &l[..l.len() - 1])
        .collect();
    for (i, l) in lines.iter().enumerate() {
        let v: Result<Value, _> = serde_json::from_slice(l);
        assert!(
            v.is_ok(),
            "steps.jsonl line {} does not parse: {:.200}",
            i + 1,
            String::from_utf8_lossy(l)
        );
    }
    lines.len()
}

/// Lines of steps.jsonl the running process has finished writing: a reader can see a line
/// while its write is still under way, so the last one counts only once it ends in a newline.
fn finished_lines(out: &Path) -> usize {
    fs::read(out.join("steps.jsonl")).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

/// How a run sent SIGINT or SIGTERM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Exit 128 + the signal (130, 143): run.json says interrupted, and the trace covers exactly the steps in
    /// steps.jsonl (a run interrupted before its first step, while the model loaded, has no
    /// step and so no trace).
    Interrupted,
    /// Exit 0: it finished before the signal came.
    Finished,
    /// Killed by the signal before the handler was installed: nothing may exist then.
    Early,
}

/// Waits for `child`, sent signal `sig`, checks what it left in `out` for the way it ended,
/// and says which.
fn signal_outcome(mut child: std::process::Child, sig: i32, out: &Path, case: &str) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let status = child.wait().unwrap();
    let run =
        || -> Value { serde_json::from_slice(&fs::read(out.join("run.json")).unwrap()).unwrap() };
    match (status.code(), status.signal()) {
        (Some(code), _) if code == 128 + sig => {
            assert_eq!(run()["interrupted"], true, "{case}");
            let steps = steps_lines(out, false);
            match fs::read(out.join("adaptive_token_trace.json")) {
                Ok(bytes) => {
                    let trace: Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(
                        trace["steps"].as_array().unwrap().len(),
                        steps,
                        "{case}: the trace covers exactly the steps in steps.jsonl"
                    );
                }
                Err(_) => assert_eq!(steps, 0, "{case}: steps in steps.jsonl, but no trace"),
            }
            Ended::Interrupted
        }
        (Some(0), _) => {
            assert_eq!(run()["interrupted"], false, "{case}");
            steps_lines(out, false);
            Ended::Finished
        }
        (None, Some(s)) if s == sig => {
            assert!(!out.exists(), "{case}: killed early, yet {out:?} exists");
            Ended::Early
        }
        other => panic!("{case}: ended as {other:?}"),
    }
}

#[test]
fn fifty_sigints_at_random_times() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    for i in 0..50 {
        let out = tmp.path().join(format!("int-{i}"));
        let tokens = rng.random_range(40..400);
        let child = spawn(&out, "interrupt me", tokens, rng.random_bool(0.5));
        // A step takes about 2.5 ms: most signals land mid-run, some at the start or end.
        std::thread::sleep(Duration::from_millis(
            rng.random_range(0..tokens as u64 * 5 / 2),
        ));
        signal(&child, libc::SIGINT);
        ends.push(signal_outcome(
            child,
            libc::SIGINT,
            &out,
            &format!("case {i}"),
        ));
    }
    let count = |e: Ended| ends.iter().filter(|&&x| x == e).count();
    println!(
        "SIGINT: {} interrupted (exit 130), {} finished first, {} before the handler",
        count(Ended::Interrupted),
        count(Ended::Finished),
        count(Ended::Early)
    );
    assert!(count(Ended::Interrupted) >= 25, "most signals land mid-run");
}

/// SIGINT in the first 50 ms, while the process starts and loads its model (issue 32, item
/// 5): the handler is installed before anything is created, so the run either ends as
/// interrupted (exit 130, run.json says so) or dies before it made its folder.
#[test]
fn thirty_sigints_while_starting() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    for i in 0..30 {
        let out = tmp.path().join(format!("start-{i}"));
        let child = spawn(&out, "interrupt me early", 400, false);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..50)));
        signal(&child, libc::SIGINT);
        let end = signal_outcome(child, libc::SIGINT, &out, &format!("case {i}"));
        assert_ne!(end, Ended::Finished, "case {i}: 400 steps in 50 ms");
        ends.push(end);
    }
    let interrupted = ends.iter().filter(|&&e| e == Ended::Interrupted).count();
    println!(
        "SIGINT while starting: {interrupted} interrupted (exit 130), {} before the handler",
        ends.len() - interrupted
    );
    assert!(interrupted > 0, "no signal reached the handler");
}

/// SIGTERM (Slurm's time limit, a Kubernetes eviction) ends a run as Ctrl-C does, with exit
/// 143 (issue 32, item 8): what was finished is written and run.json says interrupted.
#[test]
fn twenty_sigterms_end_runs_as_interrupted() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    for i in 0..20 {
        let out = tmp.path().join(format!("term-{i}"));
        let tokens = rng.random_range(200..400);
        let child = spawn(&out, "terminate me", tokens, rng.random_bool(0.5));
        std::thread::sleep(Duration::from_millis(
            rng.random_range(0..tokens as u64 * 2),
        ));
        signal(&child, libc::SIGTERM);
        ends.push(signal_outcome(
            child,
            libc::SIGTERM,
            &out,
            &format!("case {i}"),
        ));
    }
    let interrupted = ends.iter().filter(|&&e| e == Ended::Interrupted).count();
    println!("SIGTERM: {interrupted} of 20 interrupted (exit 143)");
    assert!(interrupted >= 10, "most signals land mid-run");
}

#[test]
fn fifty_sigkills_into_one_reused_folder() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (mut complete, mut cut) = (0, 0);
    for i in 0..50 {
        let prompt = format!("run number {i}");
        let tokens = rng.random_range(40..400);
        let mut child = spawn(&out, &prompt, tokens, rng.random_bool(0.7));
        let start = Instant::now();
        let wait = Duration::from_millis(rng.random_range(0..tokens as u64 * 5 / 2));
        while start.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let steps = steps_lines(&out, true);
        // Every final file is whole. run.json marks a run's output complete: beside it, every
        // final file is that run's, and it is this run's unless the kill came before this
        // run touched the folder (while it started: an earlier run's files are cleared once
        // the model is loaded and the prompts checked, run.json first), when the folder is
        // one earlier run's whole output, its steps included. Without run.json, files of an
        // earlier run may be left (a kill while the folder was being cleared), and nothing
        // looks complete.
        let trace = out.join("adaptive_token_trace.json");
        let trace_prompt = trace.exists().then(|| {
            let t: Value = serde_json::from_slice(&fs::read(&trace).unwrap())
                .unwrap_or_else(|e| panic!("case {i}: the trace is half-written: {e}"));
            (
                t["metadata"]["prompt"].clone(),
                t["steps"].as_array().unwrap().len(),
            )
        });
        let run = out.join("run.json");
        if run.exists() {
            let r: Value = serde_json::from_slice(&fs::read(&run).unwrap())
                .unwrap_or_else(|e| panic!("case {i}: run.json is half-written: {e}"));
            let run_prompt = r["prompts"][0]["prompt"].clone();
            if run_prompt != prompt.as_str() {
                assert!(
                    !status.success(),
                    "case {i}: a finished run left a stale run.json"
                );
                let (p, n) = trace_prompt.expect("a run.json without its trace");
                assert_eq!(
                    p, run_prompt,
                    "case {i}: a trace of another run than run.json's"
                );
                assert_eq!(
                    n, steps,
                    "case {i}: an earlier run's run.json beside this run's steps"
                );
            } else if let Some((p, _)) = &trace_prompt {
                assert_eq!(
                    p,
                    prompt.as_str(),
                    "case {i}: a stale trace beside run.json"
                );
            }
            for f in ["generated.txt", "adaptive_token_trace.csv", "report.html"] {
                if out.join(f).exists() {
                    assert!(
                        trace.exists(),
                        "case {i}: {f} without the trace it belongs to"
                    );
                }
            }
        } else {
            assert!(
                !status.success(),
                "case {i}: a finished run without run.json"
            );
        }
        // A kill before the first run made the folder leaves none.
        let entries = match fs::read_dir(&out) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(
                    !status.success(),
                    "case {i}: a finished run without its folder"
                );
                cut += 1;
                continue;
            }
            Err(e) => panic!("case {i}: {e}"),
        };
        for e in entries {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(
                !name.ends_with(".partial") && !name.ends_with(".partial.png") || !status.success(),
                "case {i}: a finished run left {name}"
            );
        }
        if status.success() {
            complete += 1;
        } else {
            cut += 1;
        }
    }
    println!("SIGKILL: {cut} killed mid-run, {complete} finished first");
    assert!(cut >= 25, "most kills land mid-run");
}

/// Issue 15 D16: Ctrl-C after the last step, while the plots were drawn, was ignored (exit 0,
/// `interrupted: false`, half a minute of plotting for a long trace). The plots not drawn yet
/// are skipped, the trace files are written, and the run ends as interrupted.
#[test]
fn sigint_while_plots_are_drawn_ends_the_run_as_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let n = 1500;
    let mut child = spawn(&out, "plot me", n, true);
    let start = Instant::now();
    while finished_lines(&out) < n as usize {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the steps never finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the plots could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let run: Value = serde_json::from_slice(&fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["interrupted"], true);
    let trace: Value =
        serde_json::from_slice(&fs::read(out.join("adaptive_token_trace.json")).unwrap()).unwrap();
    assert_eq!(
        trace["steps"].as_array().unwrap().len(),
        n as usize,
        "every step is kept"
    );
    assert!(!out.join("report.html").exists(), "the plots were skipped");
}
