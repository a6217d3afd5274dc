//! Every writer on a real full disk and a real read-only one (a small tmpfs; the test
//! command runs as root): one line naming the file and the cause, a non-zero exit, and
//! nothing left that looks complete. The disk fills at many points of a run: the sizes are
//! fractions of what the run writes on a disk with room.

mod common;

use common::{run, stderr, tiny, SmallDisk};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Every file under `dir`, relative to it, with its size.
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                let len = e.metadata().unwrap().len();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), len));
            }
        }
    }
    out.sort();
    out
}

/// What `files` take on a tmpfs, in KiB: whole pages.
fn footprint_kib(files: &[(PathBuf, u64)]) -> usize {
    files
        .iter()
        .map(|(_, n)| n.div_ceil(4096) as usize * 4)
        .sum()
}

/// The disk sizes a run is tried at: from almost nothing to almost enough.
fn sizes(full_kib: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
        .iter()
        .map(|f| ((full_kib as f64 * f) as usize).max(4) / 4 * 4)
        .collect();
    v.dedup();
    v
}

/// The checks every failed write shares: exit 2, one error line, the cause, a path on the disk,
/// and no temporary file left behind.
fn assert_disk_error(o: &Output, disk: &Path, cause: &str, hint: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit 2 expected: {err}");
    // A shard says which part it runs before it starts; the error is one line, the last.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert_eq!(err.trim().lines().last(), errors.first().copied(), "{err}");
    assert!(err.contains(cause), "names the cause {cause:?}: {err}");
    assert!(err.contains(hint), "says what to do: {err}");
    assert!(
        err.contains(&disk.display().to_string()),
        "names the file on {}: {err}",
        disk.display()
    );
    let left: Vec<_> = files(disk)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

fn assert_full_disk(o: &Output, disk: &Path) {
    assert_disk_error(
        o,
        disk,
        "No space left on device",
        "free some space on that disk",
    );
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.txt");
    fs::write(&p, "the river\nthe stone and the light\nquick model\n").unwrap();
    p
}

fn trace_args<'a>(model: &'a str, prompts: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "trace",
        "--model",
        model,
        "--prompts-file",
        prompts,
        "--max-new-tokens",
        "24",
        "--seed",
        "7",
        "--threads",
        "1",
        "--out",
        out,
    ]
}

/// A prompt's folder that has its run.json has every file a finished prompt has.
fn assert_finished_prompts_are_whole(out: &Path, whole: &[(PathBuf, u64)]) {
    let names_in = |dir: &Path, list: &[(PathBuf, u64)]| -> Vec<PathBuf> {
        list.iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, _)| p.clone())
            .collect()
    };
    let now = files(out);
    for (p, _) in &now {
        if p.file_name().unwrap() == "run.json" && p.parent() != Some(Path::new("")) {
            let dir = p.parent().unwrap();
            assert_eq!(
                names_in(dir, &now),
                names_in(dir, whole),
                "{} has run.json, so all of its files",
                dir.display()
            );
        }
    }
}

#[test]
fn trace_on_a_full_disk_fails_at_every_point_and_leaves_nothing_looking_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("tiny-f32.gguf");
    let p = prompts(tmp.path());
    let roomy = tmp.path().join("roomy");
    let (m, p) = (model.to_str().unwrap(), p.to_str().unwrap());
    let o = run(&trace_args(m, p, roomy.to_str().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    let whole = files(&roomy);
    assert!(whole.iter().any(|(f, _)| f.ends_with("report.html")));
    assert!(whole.iter().any(|(f, _)| f.ends_with("steps.jsonl")));
    let full = footprint_kib(&whole);
    for kib in sizes(full) {
        let disk = SmallDisk::new(&tmp.path().join(format!("disk-{kib}")), kib);
        let out = disk.0.join("out");
        let o = run(&trace_args(m, p, out.to_str().unwrap()));
        assert_full_disk(&o, &disk.0);
        assert!(
            !out.join("run.json").exists(),
            "{kib} KiB of {full}: the run's run.json says finished"
        );
        assert_finished_prompts_are_whole(&out, &whole);
        // A shard of the same run: its record is what says the shard finished.
        let out = disk.0.join("shard");
        let mut args = trace_args(m, p, out.to_str().unwrap());
        args.extend(["--shard", "0/2"]);
        let o = run(&args);
        if o.status.success() {
            // Half the prompts can fit where all of them did not.
            assert!(out.join("shards/shard-0/run.json").exists());
            continue;
        }
        assert_full_disk(&o, &disk.0);
        assert!(
            !out.join("shards/shard-0/run.json").exists(),
            "{kib} KiB of {full}: the shard's run.json says finished"
        );
    }
    // With room on the same kind of disk, the run writes what it wrote before.
    let disk = SmallDisk::new(&tmp.path().join("disk-room"), full * 2 + 64);
    let out = disk.0.join("out");
    let o = run(&trace_args(m, p, out.to_str().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    let names = |v: Vec<(PathBuf, u64)>| v.into_iter().map(|(p, _)| p).collect::<Vec<_>>();
    assert_eq!(names(files(&out)), names(whole));
}

fn compare_args<'a>(corpus: &'a str, a: &'a str, b: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "compare",
        "--a",
        a,
        "--b",
        b,
        "--text-file",
        corpus,
        "--ctx-size",
        "128",
        "--chunks",
        "6",
        "--threads",
        "1",
        "--out",
        out,
    ]
}

#[test]
fn compare_on_a_full_disk_fails_at_every_point_and_leaves_nothing_looking_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt");
    let a = format!("llama:{}", tiny("tiny-f32.gguf").display());
    let b = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let c = corpus.to_str().unwrap();
    let roomy = tmp.path().join("roomy");
    let o = run(&compare_args(c, &a, &b, roomy.to_str().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    let whole = files(&roomy);
    let full = footprint_kib(&whole);
    for kib in sizes(full) {
        let disk = SmallDisk::new(&tmp.path().join(format!("disk-{kib}")), kib);
        let out = disk.0.join("out");
        let o = run(&compare_args(c, &a, &b, out.to_str().unwrap()));
        assert_full_disk(&o, &disk.0);
        // compare.json is the last file written: without it the folder is not a result.
        assert!(
            !out.join("compare.json").exists(),
            "{kib} KiB of {full}: compare.json left"
        );
        // The reference this run made goes with it.
        assert!(!out.join("reference").exists(), "{kib} KiB: reference left");
    }
}

#[test]
fn report_on_a_full_disk_leaves_no_report_html() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("tiny-f32.gguf");
    let roomy = tmp.path().join("roomy");
    let o = run(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the river and the stone",
        "--max-new-tokens",
        "24",
        "--threads",
        "1",
        "--out",
        roomy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = roomy.join("adaptive_token_trace.json");
    let plots: Vec<(PathBuf, u64)> = files(&roomy)
        .into_iter()
        .filter(|(p, _)| {
            let e = p.extension().unwrap_or_default();
            e == "png" || e == "html"
        })
        .collect();
    let full = footprint_kib(&plots);
    for kib in sizes(full) {
        let disk = SmallDisk::new(&tmp.path().join(format!("disk-{kib}")), kib);
        let out = disk.0.join("report");
        let o = run(&[
            "report",
            trace.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_full_disk(&o, &disk.0);
        // report.html, written last, is what a reader opens: it is not there.
        assert!(!out.join("report.html").exists(), "{kib} KiB of {full}");
    }
}

/// Shards of a prompts file written on a disk with room, merged on a full one.
#[test]
fn merge_on_a_full_disk_leaves_no_run_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("tiny-f32.gguf");
    let p = prompts(tmp.path());
    let (m, p) = (model.to_str().unwrap(), p.to_str().unwrap());
    let roomy = tmp.path().join("roomy");
    for k in 0..2 {
        let shard = format!("{k}/2");
        let mut args = trace_args(m, p, roomy.to_str().unwrap());
        args.extend(["--shard", &shard]);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let sharded = files(&roomy);
    let o = run(&["merge", roomy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = files(&roomy);
    // What the merge adds on top of the shards.
    let added: Vec<(PathBuf, u64)> = merged
        .iter()
        .filter(|(p, _)| !sharded.iter().any(|(q, _)| q == p))
        .cloned()
        .collect();
    let shards_kib = footprint_kib(&sharded);
    let added_kib = footprint_kib(&added).max(8);
    for extra in [0, added_kib / 3, added_kib * 2 / 3] {
        let disk = SmallDisk::new(
            &tmp.path().join(format!("disk-{extra}")),
            shards_kib + 16 + extra,
        );
        let out = disk.0.join("out");
        copy_tree(&roomy, &out, &sharded);
        let o = run(&["merge", out.to_str().unwrap()]);
        if o.status.success() {
            // The tmpfs had room after all (directories take no pages): the merge is whole.
            assert_eq!(files(&out).len(), merged.len());
            continue;
        }
        assert_full_disk(&o, &disk.0);
        assert!(
            !out.join("run.json").exists(),
            "+{extra} KiB: run.json left"
        );
    }
}

fn copy_tree(from: &Path, to: &Path, list: &[(PathBuf, u64)]) {
    for (p, _) in list {
        let dst = to.join(p);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(from.join(p), dst).unwrap();
    }
}

#[test]
fn every_writer_on_a_read_only_disk_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("tiny-f32.gguf");
    let m = model.to_str().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/corpus/genesis-kjv.txt");
    let c = corpus.to_str().unwrap();
    let a = format!("llama:{m}");
    let b = format!("llama:{}", tiny("tiny-q8_0.gguf").display());
    let disk = SmallDisk::new(&tmp.path().join("ro"), 16 * 1024);
    // A trace and a reference made while the disk was writable, then the disk goes
    // read-only under them.
    let traced = disk.0.join("traced");
    let o = run(&[
        "trace",
        "--model",
        m,
        "--prompt",
        "the river",
        "--max-new-tokens",
        "8",
        "--threads",
        "1",
        "--out",
        traced.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sharded = disk.0.join("sharded");
    let p = prompts(tmp.path());
    for k in ["0/2", "1/2"] {
        let mut args = trace_args(m, p.to_str().unwrap(), sharded.to_str().unwrap());
        args.extend(["--shard", k]);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let reference = disk.0.join("reference");
    let mut args = compare_args(c, &a, &b, "unused");
    args.truncate(args.len() - 2);
    args.retain(|x| *x != "--b" && *x != b.as_str());
    args.extend(["--reference", reference.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    disk.read_only();

    let ro = |o: &Output| {
        assert_disk_error(
            o,
            &disk.0,
            "Read-only file system",
            "write to a writable place",
        )
    };
    let into = disk.0.join("new");
    let n = into.to_str().unwrap();
    ro(&run(&[
        "trace",
        "--model",
        m,
        "--prompt",
        "the river",
        "--out",
        n,
    ]));
    ro(&run(&compare_args(c, &a, &b, n)));
    let trace = traced.join("adaptive_token_trace.json");
    ro(&run(&["report", trace.to_str().unwrap(), "--out", n]));
    ro(&run(&["merge", sharded.to_str().unwrap()]));
    // Reading a whole reference needs no write: B is compared with it from the read-only
    // disk, into a writable --out.
    let out = tmp.path().join("cmp");
    let o = run(&[
        "compare",
        "--reference",
        reference.to_str().unwrap(),
        "--b",
        &b,
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("compare.json").exists());
}
