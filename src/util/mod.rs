//! Files written so that a reader never sees half of one: a temporary sibling, synced, then
//! renamed over the final name.

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
