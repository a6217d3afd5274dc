//! A's logits of one run, kept on disk while the B's are compared with them.
//!
//! A head-input reference is small because it keeps A's output head's inputs, and replaying
//! the head turns them back into A's logits. The replay is a matrix product of
//! `n_vocab × n_embd` per position: for a 128k vocabulary, a fifth of a 1B model's forward
//! pass, done again for every B of a ladder. Where the disk has room, the run keeps A's logits
//! of the chunks it has (scored by A in this run, or replayed for its first B) in a temporary
//! file, and every later B reads them back: f32 rows as A's engine gave them, so the numbers
//! are the replay's bit for bit. The file has no name (it is unlinked as it is made) and goes
//! with the run, however the run ends; it is never the reference, which stays compact.
//!
//! A write that fails (a disk filled meanwhile) drops the spill and frees its space: the run
//! goes on replaying, as it would have without one.

use ndarray::Array2;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// How much of the disk a run's spill may take: at most this share of the space free when the
/// run starts, so that what the run writes afterwards (the reference, the outputs) still fits.
const SHARE_OF_FREE: f64 = 0.5;

/// A's logits of some chunks, in an unnamed temporary file.
pub struct LogitsSpill {
    file: File,
    /// Chunk → (offset, rows, columns).
    chunks: HashMap<usize, (u64, usize, usize)>,
    end: u64,
}

impl LogitsSpill {
    /// A spill beside `dir` for `bytes` of logits, when the filesystem holds that much within
    /// [`SHARE_OF_FREE`] of its free space and within `cap` bytes; `None` otherwise (or when no
    /// temporary file can be made there).
    pub fn new(dir: &Path, bytes: u64, cap: u64) -> Option<LogitsSpill> {
        if bytes == 0 || bytes > cap {
            return None;
        }
        let free = free_bytes(dir)?;
        if bytes as f64 > free as f64 * SHARE_OF_FREE {
            tracing::info!(
                "A's logits ({bytes} bytes) not kept for the B's: {free} bytes free at {}",
                dir.display()
            );
            return None;
        }
        let file = tempfile::tempfile_in(dir).ok()?;
        Some(LogitsSpill {
            file,
            chunks: HashMap::new(),
            end: 0,
        })
    }

    /// Keeps chunk `c`'s logits (once); a failed write drops everything kept.
    pub fn put(&mut self, c: usize, logits: &Array2<f32>) -> bool {
        if self.chunks.contains_key(&c) {
            return true;
        }
        let values = logits.as_standard_layout();
        let bytes: &[u8] = bytemuck::cast_slice(values.as_slice().expect("standard layout"));
        let written = self
            .file
            .seek(SeekFrom::Start(self.end))
            .and_then(|_| self.file.write_all(bytes));
        match written {
            Ok(()) => {
                self.chunks
                    .insert(c, (self.end, logits.nrows(), logits.ncols()));
                self.end += (logits.len() * 4) as u64;
                true
            }
            Err(e) => {
                tracing::warn!("A's logits no longer kept for the B's (they are replayed): {e}");
                self.chunks.clear();
                self.end = 0;
                let _ = self.file.set_len(0);
                false
            }
        }
    }

    /// Chunk `c`'s logits, if kept (a failed read drops them and says so once).
    pub fn get(&mut self, c: usize) -> Option<Array2<f32>> {
        let &(offset, rows, cols) = self.chunks.get(&c)?;
        let mut values = vec![0f32; rows * cols];
        let read = self
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(bytemuck::cast_slice_mut(&mut values)));
        match read {
            Ok(()) => Some(Array2::from_shape_vec((rows, cols), values).expect("rows × columns")),
            Err(e) => {
                tracing::warn!("A's logits of chunk {c} could not be read back (replayed): {e}");
                self.chunks.remove(&c);
                None
            }
        }
    }

    /// Bytes kept.
    pub fn bytes(&self) -> u64 {
        self.end
    }
}

/// Free bytes of the filesystem that holds `dir`, for an unprivileged writer.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rows_come_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = LogitsSpill::new(dir.path(), 1 << 20, u64::MAX).expect("room");
        let a = Array2::from_shape_fn((3, 5), |(r, c)| (r as f32 - 1.5) * 1e-3 + c as f32);
        let b = Array2::from_shape_fn((2, 5), |(r, c)| {
            f32::from_bits(0x3f80_0001 + (r * 5 + c) as u32)
        });
        assert!(spill.put(4, &a));
        assert!(spill.put(1, &b));
        assert_eq!(spill.bytes(), ((15 + 10) * 4) as u64);
        let (ga, gb) = (spill.get(4).unwrap(), spill.get(1).unwrap());
        assert!(ga.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(gb.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(spill.get(0).is_none());
    }

    #[test]
    fn no_spill_beyond_the_cap_or_the_free_space() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LogitsSpill::new(dir.path(), 1 << 20, 1 << 10).is_none());
        assert!(LogitsSpill::new(dir.path(), u64::MAX / 2, u64::MAX).is_none());
        assert!(LogitsSpill::new(dir.path(), 0, u64::MAX).is_none());
    }
}
