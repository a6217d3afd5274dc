//! Files written so that a reader never sees half of one: a temporary sibling, synced, then
//! renamed over the final name.

pub mod budget;
pub mod file_sha256;

use anyhow::Context;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An output folder that cannot be created or written to.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to output folder {}: {source}", path.display())]
pub struct OutputDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Creates `dir` and proves it is writable before any work starts.
pub fn prepare_dir(dir: &Path) -> Result<(), OutputDirError> {
    let fail = |source| OutputDirError {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".logitprobe-write-test");
    File::create(&probe).map_err(fail)?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// Writes `path` through a temporary sibling and a rename. The sibling's name is this
/// writer's own (process and call), because shards of one job write the same file at once
/// (a reference's vocab.json): with one shared name, one writer's rename took the file from
/// under the other's.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}-{n}.partial", std::process::id()));
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

/// Whether `name` is the temporary name of a file being written (`.NAME.partial`, or a
/// plot's `.NAME.partial.png`).
pub fn is_partial(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".partial.png"))
}

/// Removes what a killed writer left in `dir` under a temporary name; how many.
pub fn remove_partials(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() && is_partial(&e.file_name().to_string_lossy()) {
            fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// An error message on one line, every control character escaped: text from a model file (an
/// architecture name, a token) can hold a NUL or an escape sequence that a terminal would act
/// on. Both front ends (the binary, the Python package) print through it.
pub fn one_line(msg: &str) -> String {
    msg.chars()
        .map(|c| match c {
            '\n' => " ".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers of one file at once (shards writing a reference's vocab.json) all succeed,
    /// and the file is always one writer's whole text.
    #[test]
    fn writers_of_one_file_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.json");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(path, |w| Ok(w.write_all(&[b'a' + t; 4096])?)).unwrap();
                    }
                });
            }
        });
        let text = fs::read(&path).unwrap();
        assert_eq!(text.len(), 4096);
        assert!(text.iter().all(|&b| b == text[0]));
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }
}
