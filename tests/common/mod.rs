//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cdp;
pub mod gguf;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `logitprobe` binary built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_logitprobe"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run logitprobe")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A Token Heatmap file kept as a test fixture (`tests/data/tokenheat/`, with its MIT
/// licence and the upstream commit it comes from in SOURCE.md): the trace schema and the
/// sample trace.
pub fn tokenheat(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tokenheat")
        .join(name)
}

/// The models/fetch cache.
pub fn cache_dir() -> PathBuf {
    if let Ok(c) = std::env::var("LOGITPROBE_CACHE") {
        return c.into();
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache"));
    base.join("logitprobe")
}

/// SmolLM2-135M-Instruct Q4_1, fetched by `models/fetch` (the test command runs it first).
pub fn smollm2() -> PathBuf {
    let p = cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run models/fetch first (scripts/test does)",
        p.display()
    );
    p
}

/// SmolLM2's Q4_1 weights dequantized to an F16 GGUF (models/tools/gguf_f16.py), made once
/// in the cache as `scripts/bench-vs-peers` makes it.
pub fn smollm2_f16() -> PathBuf {
    let out = cache_dir().join("SmolLM2-135M-Instruct.F16.gguf");
    if !out.is_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let part = out.with_extension(format!("gguf.{}.part", std::process::id()));
        let o = Command::new(root.join("models/python"))
            .arg(root.join("models/tools/gguf_f16.py"))
            .arg(smollm2())
            .arg(&part)
            .output()
            .expect("run models/tools/gguf_f16.py");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&part, &out).unwrap();
    }
    out
}

/// Asserts a one-line error with exit code 2 that mentions `needle`.
pub fn assert_usage_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "exit code for {needle:?}; stderr: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// SmolLM2's ONNX twin, made by `models/export-onnx` (the test command runs it first).
pub fn smollm2_onnx() -> PathBuf {
    let p = cache_dir().join("SmolLM2-135M-Instruct-onnx");
    assert!(
        p.join("model.onnx").is_file(),
        "{} is missing: run models/export-onnx first (scripts/test does)",
        p.display()
    );
    p
}

/// Broken ONNX model folders made by models/tools/make_bad_onnx.py.
pub fn bad_onnx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/onnx-bad")
        .join(name)
}

/// The committed tiny twins (models/tiny).
pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny")
        .join(name)
}

/// A trace's JSON without its timestamp (`generated_at`), for comparing runs.
pub fn trace_json(dir: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(dir.join("adaptive_token_trace.json")).expect("trace written");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("trace is JSON");
    v["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("generated_at");
    v
}

/// Runs `trace` with a bad input and checks the failure: one line naming `needle`, exit 2,
/// and no trace file left looking complete.
pub fn assert_trace_fails(backend: &str, model: &str, prompt: &str, extra: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("out");
    let mut args = vec![
        "trace",
        "--backend",
        backend,
        "--model",
        model,
        "--prompt",
        prompt,
    ];
    args.extend(["--out", out.to_str().expect("utf-8 path")]);
    args.extend_from_slice(extra);
    assert_usage_error(&run(&args), needle);
    assert!(
        !out.join("adaptive_token_trace.json").exists(),
        "nothing that looks complete"
    );
}

/// Runs the binary and returns its peak RSS in KB (wait4's rusage of that child alone).
// wait4 reaps the child (Child::wait would not give its rusage).
#[allow(clippy::zombie_processes)]
pub fn peak_rss_kb(args: &[&str]) -> i64 {
    let child = bin()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet waited for; status and usage are valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "logitprobe {args:?} failed with status {status}"
    );
    usage.ru_maxrss
}

/// A tmpfs of `kib` KiB at a fresh folder (the test command runs as root), unmounted on drop:
/// a real full disk, and with [`SmallDisk::read_only`] a real read-only one.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn new(dir: &Path, kib: usize) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mounting a tmpfs for the full-disk test needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Remounts the disk read-only, keeping what it holds.
    pub fn read_only(&self) {
        let o = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "remounting {} read-only: {}",
            self.0.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Gives the child SIGINT's and SIGTERM's default actions. A shell starts a background job
/// with SIGINT ignored, and the ignored disposition passes through exec: a test run from one
/// (`.ci/run &`) would then see a signal sent before logitprobe installs its handler vanish,
/// and the run finish as if never signalled.
pub fn default_signals(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls signal(2), which is
    // async-signal-safe, on the child's own dispositions.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
}

/// Caps the address space of the process `c` starts at `bytes`: a hostile file that makes
/// it ask for more fails its allocation instead of taking the machine's memory.
pub fn cap_address_space(c: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        c.pre_exec(move || {
            let cap = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &cap) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for `child` at most `limit`: its exit status, or `None` after killing it.
pub fn wait_or_kill(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
