//! sha256 of model files, remembered across runs.
//!
//! A comparison names each side's model by its sha256 (the reference is refused for another
//! A; `compare.json` says which files were compared), and hashing is not free: a Llama-3-8B
//! ladder's three files are 30 GB, twenty seconds of hashing before anything is scored, on
//! every run. So the digest of a large file is kept in logitprobe's cache, keyed by the
//! file's path, size and modification time (what `make` and rsync trust, and what the
//! reference already trusts for A's head), and is computed again only when one of them
//! changes. Small files (prompts, traces) are hashed every time.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// From this size a file's digest is remembered.
const REMEMBERED_FROM: u64 = 64 << 20;
/// The cache file, in logitprobe's cache.
const FILE: &str = "file-sha256.json";

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
struct Entry {
    bytes: u64,
    modified_ns: u128,
    sha256: String,
}

/// sha256 of `path` (a file, or `model.onnx` in a model folder), remembered in `cache` for
/// large files; `None` when it cannot be read.
pub fn sha256_file_in(path: &Path, cache: &Path) -> Option<String> {
    let file = if path.is_dir() {
        path.join("model.onnx")
    } else {
        path.to_path_buf()
    };
    let meta = std::fs::metadata(&file).ok()?;
    let key = std::fs::canonicalize(&file).ok()?;
    let stamp = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    let remembered = meta.len() >= REMEMBERED_FROM && stamp.is_some();
    let store = cache.join(FILE);
    if remembered {
        if let Some(e) = read(&store).remove(&key) {
            if e.bytes == meta.len() && Some(e.modified_ns) == stamp {
                return Some(e.sha256);
            }
        }
    }
    let sha = hash(&file)?;
    if let (true, Some(modified_ns)) = (remembered, stamp) {
        let mut all = read(&store);
        all.insert(
            key,
            Entry {
                bytes: meta.len(),
                modified_ns,
                sha256: sha.clone(),
            },
        );
        // A cache that cannot be written is only slower.
        let _ = std::fs::create_dir_all(cache)
            .map_err(anyhow::Error::from)
            .and_then(|()| crate::util::write_json(&store, &all));
    }
    Some(sha)
}

fn read(store: &Path) -> BTreeMap<PathBuf, Entry> {
    std::fs::read(store)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn hash(file: &Path) -> Option<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(file).ok()?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_files_digest_is_remembered_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, model) = (dir.path().join("cache"), dir.path().join("m.gguf"));
        std::fs::write(&model, vec![7u8; REMEMBERED_FROM as usize]).unwrap();
        let first = sha256_file_in(&model, &cache).unwrap();
        assert_eq!(first, hash(&model).unwrap());
        assert!(cache.join(FILE).is_file());
        // The remembered digest is what a second call returns, without reading the file:
        // a forged entry shows it.
        let mut all = read(&cache.join(FILE));
        all.values_mut().next().unwrap().sha256 = "remembered".into();
        crate::util::write_json(&cache.join(FILE), &all).unwrap();
        assert_eq!(sha256_file_in(&model, &cache).unwrap(), "remembered");
        // Rewritten (another size): hashed again.
        std::fs::write(&model, vec![8u8; REMEMBERED_FROM as usize + 1]).unwrap();
        let again = sha256_file_in(&model, &cache).unwrap();
        assert_eq!(again, hash(&model).unwrap());
        assert_ne!(again, first);
    }

    #[test]
    fn small_files_are_hashed_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, f) = (dir.path().join("cache"), dir.path().join("prompts.txt"));
        std::fs::write(&f, "a prompt\n").unwrap();
        assert_eq!(sha256_file_in(&f, &cache), hash(&f));
        assert!(!cache.join(FILE).exists());
        assert!(sha256_file_in(&dir.path().join("none"), &cache).is_none());
    }
}
