//! A's side of a comparison, kept on disk: the *reference*.
//!
//! A quantization ladder holds one model in memory at a time. A scores the input once and
//! its rows go to a reference folder; then each B is loaded alone, scored, compared with the
//! reference row by row, and dropped before the next one loads. llama-perplexity does the
//! same with its `--kl-divergence-base` file, which keeps 2 bytes per vocabulary entry per
//! position in 16 bits. Here a row is kept exactly and smaller: the output head's input
//! (`n_embd` f32 values, captured from llama.cpp's graph as `result_norm`), which A's own
//! output head turns back into the same logits, bit for bit, with the one-row kernels A's
//! engine ran. Where that replay would not give A's numbers exactly (another engine, or
//! llama.cpp's batched kernels), the reference keeps the logits rows themselves: exact,
//! and larger. The choice is checked on the first chunk A scores, never assumed.
//!
//! A folder holds `reference.json` (what A, input and settings the rows are for, and the
//! chunks' token ids) and one `chunk-NNNNNN.f32` per chunk. Each chunk file carries its
//! shape and the sha256 of its rows, and is written under a temporary name then renamed:
//! a file that is there is whole, and a damaged one is refused when read.

use super::logits_spill::LogitsSpill;
use super::{Chunk, Timing};
use crate::schema::compare::{
    HeadSource, ReferenceChunk, ReferenceManifest, ReferenceRows, VocabDigest,
    REFERENCE_FORMAT_VERSION, REFERENCE_JSON, REFERENCE_KIND,
};
use anyhow::Context;
use logitprobe_backends::{CaptureSpec, LensHead, LogitSource, TokenId, Vocab};
use ndarray::Array2;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The first bytes of a chunk file: the format and its version.
const MAGIC: &[u8; 8] = b"LPREF01\n";
/// Magic, rows (u64), width (u64), sha256 of the rows.
const HEADER_BYTES: usize = 8 + 8 + 8 + 32;

/// What can be wrong with a reference folder.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{dir} holds a reference made with another {field}: {theirs} there, {ours} in this run; use another reference folder, or delete this one to make it anew")]
    Mismatch {
        dir: PathBuf,
        field: String,
        theirs: String,
        ours: String,
    },
    #[error("reference chunk {path} is damaged ({why}); delete it and run again with A to score that chunk anew")]
    Damaged { path: PathBuf, why: String },
    #[error("{path} is not a logitprobe reference ({why}); give a folder a comparison wrote its reference to")]
    NotAReference { path: PathBuf, why: String },
    #[error("{dir} holds no reference, and no A was given to make one: give A, or the folder of an earlier comparison's reference")]
    Missing { dir: PathBuf },
    #[error("reference {dir} lacks {missing} of its {total} chunks and no A was given to score them: give A as well")]
    Incomplete {
        dir: PathBuf,
        missing: usize,
        total: usize,
    },
    #[error("the reference turns its rows back into A's logits with A's output head, read from {path}, which {why}: put A's model file back there, or give A again")]
    HeadGone { path: String, why: String },
}

/// The chunk file of chunk `c`.
pub fn chunk_path(dir: &Path, c: usize) -> PathBuf {
    dir.join(format!("chunk-{c:06}.f32"))
}

/// The manifest of `dir`, `None` when the folder holds none.
pub fn read_manifest(dir: &Path) -> Result<Option<ReferenceManifest>, ReferenceError> {
    let path = dir.join(REFERENCE_JSON);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ReferenceError::NotAReference {
                path,
                why: e.to_string(),
            })
        }
    };
    let bad = |why: String| ReferenceError::NotAReference {
        path: path.clone(),
        why,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if value.get("kind").and_then(|k| k.as_str()) != Some(REFERENCE_KIND) {
        return Err(bad(format!("its kind is not {REFERENCE_KIND:?}")));
    }
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(REFERENCE_FORMAT_VERSION)) {
        return Err(bad(format!(
            "format version {version:?}, this logitprobe reads {REFERENCE_FORMAT_VERSION}"
        )));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// Refuses a manifest made for another job: each field of `ours` must be the manifest's.
pub fn check_job(
    dir: &Path,
    manifest: &ReferenceManifest,
    ours: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ReferenceError> {
    let show = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => "none".to_string(),
        Some(serde_json::Value::String(s)) if s.len() == 64 => format!("sha256 {}…", &s[..12]),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    for (field, value) in ours {
        let theirs = manifest.job.get(field);
        if theirs != Some(value) {
            return Err(ReferenceError::Mismatch {
                dir: dir.to_path_buf(),
                field: field.replace('_', " "),
                theirs: show(theirs),
                ours: show(Some(value)),
            });
        }
    }
    Ok(())
}

/// The digest of a vocabulary: every token's bytes in id order.
pub fn vocab_digest(v: &dyn Vocab) -> VocabDigest {
    let info = v.info();
    let mut h = sha2::Sha256::new();
    for id in 0..info.tokenizer_vocab as TokenId {
        match v.token_bytes(id) {
            Some(b) => {
                h.update((b.len() as u32).to_le_bytes());
                h.update(&b);
            }
            None => h.update(u32::MAX.to_le_bytes()),
        }
    }
    VocabDigest {
        n_vocab: info.n_vocab,
        tokenizer_vocab: info.tokenizer_vocab,
        sha256: format!("{:x}", h.finalize()),
    }
}

/// The file that keeps A's tokens, so that a B of another vocabulary is refused naming the
/// first token that differs, with A not loaded.
pub const VOCAB_JSON: &str = "vocab.json";

/// Every token's bytes, in id order.
pub fn vocab_pieces(v: &dyn Vocab) -> Vec<Option<Vec<u8>>> {
    (0..v.info().tokenizer_vocab as TokenId)
        .map(|id| v.token_bytes(id))
        .collect()
}

/// Writes A's tokens as hex strings (a token's bytes may not be UTF-8), `null` for an id
/// without a piece.
pub fn write_vocab(dir: &Path, pieces: &[Option<Vec<u8>>]) -> anyhow::Result<()> {
    let hex: Vec<Option<String>> = pieces
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
        })
        .collect();
    crate::util::write_atomic(&dir.join(VOCAB_JSON), |w| {
        serde_json::to_writer(&mut *w, &hex)?;
        Ok(())
    })
}

/// A's tokens as [`write_vocab`] wrote them.
pub fn read_vocab(dir: &Path) -> Result<Vec<Option<Vec<u8>>>, ReferenceError> {
    let path = dir.join(VOCAB_JSON);
    let bad = |why: String| ReferenceError::NotAReference {
        path: path.clone(),
        why,
    };
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let hex: Vec<Option<String>> =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not a token list: {e}")))?;
    hex.into_iter()
        .map(|h| {
            h.map(|h| {
                (0..h.len() / 2)
                    .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| bad("a token is not hex".into()))
            })
            .transpose()
        })
        .collect()
}

/// Writes chunk `c`'s rows (`[rows, width]`) under a temporary name, then renames it.
pub fn write_chunk(dir: &Path, c: usize, rows: &Array2<f32>) -> anyhow::Result<u64> {
    let mut payload = Vec::with_capacity(rows.len() * 4);
    for v in rows.iter() {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    let sha = sha2::Sha256::digest(&payload);
    crate::util::write_atomic(&chunk_path(dir, c), |w| {
        w.write_all(MAGIC)?;
        w.write_all(&(rows.nrows() as u64).to_le_bytes())?;
        w.write_all(&(rows.ncols() as u64).to_le_bytes())?;
        w.write_all(&sha)?;
        w.write_all(&payload)?;
        Ok(())
    })?;
    Ok((HEADER_BYTES + payload.len()) as u64)
}

/// The size of a chunk file of `rows` rows of `width` values.
pub fn chunk_file_bytes(rows: usize, width: usize) -> u64 {
    (HEADER_BYTES + rows * width * 4) as u64
}

/// Whether chunk `c`'s file is there with the size `rows` × `width` gives (its rows are
/// checked against their sha256 when read).
pub fn chunk_present(dir: &Path, c: usize, rows: usize, width: usize) -> bool {
    std::fs::metadata(chunk_path(dir, c)).is_ok_and(|m| m.len() == chunk_file_bytes(rows, width))
}

/// Chunk `c`'s rows, refused unless they are `[rows, width]` and match their sha256.
pub fn read_chunk(
    dir: &Path,
    c: usize,
    rows: usize,
    width: usize,
) -> Result<Array2<f32>, ReferenceError> {
    let path = chunk_path(dir, c);
    let damaged = |why: String| ReferenceError::Damaged {
        path: path.clone(),
        why,
    };
    let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
    let expected = HEADER_BYTES + rows * width * 4;
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(damaged("no reference chunk header".into()));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let (r, w) = (word(8) as usize, word(16) as usize);
    if (r, w) != (rows, width) {
        return Err(damaged(format!(
            "it holds {r} rows of {w} values where the manifest says {rows} of {width}"
        )));
    }
    if bytes.len() != expected {
        return Err(damaged(format!(
            "{} bytes where {expected} were written",
            bytes.len()
        )));
    }
    let payload = &bytes[HEADER_BYTES..];
    if sha2::Sha256::digest(payload).as_slice() != &bytes[24..56] {
        return Err(damaged("its rows do not match their sha256".into()));
    }
    let values: Vec<f32> = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Array2::from_shape_vec((rows, width), values).expect("rows × width values"))
}

/// The chunks of a manifest as the comparison scores them.
pub fn chunks_of(manifest: &ReferenceManifest) -> Vec<Chunk> {
    manifest
        .chunks
        .iter()
        .map(|c| Chunk {
            ids: c.ids.clone(),
            first: c.first,
        })
        .collect()
}

/// The manifest's record of `chunks`.
pub fn chunk_records(chunks: &[Chunk]) -> Vec<ReferenceChunk> {
    chunks
        .iter()
        .map(|c| ReferenceChunk {
            ids: c.ids.clone(),
            first: c.first,
        })
        .collect()
}

/// Where A's head is read back from, with what identifies the file.
pub fn head_source(path: &Path, sha256: Option<String>) -> Option<HeadSource> {
    let meta = std::fs::metadata(path).ok()?;
    Some(HeadSource {
        path: path.display().to_string(),
        bytes: meta.len(),
        modified_unix_s: modified_s(&meta),
        sha256,
    })
}

fn modified_s(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// A's output head read back from its model file, once the file is shown to be the one
/// the reference was made with (same size and time, or else the same sha256).
pub fn read_head(source: &HeadSource) -> anyhow::Result<Arc<LensHead>> {
    let gone = |why: String| ReferenceError::HeadGone {
        path: source.path.clone(),
        why,
    };
    let path = Path::new(&source.path);
    let meta = std::fs::metadata(path).map_err(|e| gone(format!("cannot be read ({e})")))?;
    if meta.len() != source.bytes || modified_s(&meta) != source.modified_unix_s {
        let sha = crate::hub::sha256_file(path);
        if sha.is_none() || sha != source.sha256 {
            return Err(gone("is no longer the file the reference was made with".into()).into());
        }
    }
    head_of_gguf(path)
}

#[cfg(feature = "llama")]
fn head_of_gguf(path: &Path) -> anyhow::Result<Arc<LensHead>> {
    Ok(Arc::new(logitprobe_backends::llama::output_head(path)?))
}

#[cfg(not(feature = "llama"))]
fn head_of_gguf(path: &Path) -> anyhow::Result<Arc<LensHead>> {
    Err(ReferenceError::HeadGone {
        path: path.display().to_string(),
        why: "needs the llama engine, which this logitprobe is built without".into(),
    }
    .into())
}

/// A's rows for each chunk, as logits.
pub struct ReferenceReader {
    pub dir: PathBuf,
    pub manifest: ReferenceManifest,
    head: Option<Arc<LensHead>>,
    /// A's logits already computed in this run, where they are kept (head-input rows only).
    spill: Option<LogitsSpill>,
}

impl ReferenceReader {
    /// A reader of `dir`'s rows; `head` is A's output head when A was loaded in this run
    /// (else it is read back from A's model file for head-input rows).
    pub fn new(
        dir: &Path,
        manifest: ReferenceManifest,
        head: Option<Arc<LensHead>>,
    ) -> anyhow::Result<ReferenceReader> {
        let head = match (manifest.rows, head) {
            (ReferenceRows::Logits, _) => None,
            (ReferenceRows::HeadInput, Some(h)) => Some(h),
            (ReferenceRows::HeadInput, None) => {
                let source =
                    manifest
                        .head
                        .as_ref()
                        .ok_or_else(|| ReferenceError::NotAReference {
                            path: dir.join(REFERENCE_JSON),
                            why: "head-input rows without the head's source".into(),
                        })?;
                Some(read_head(source)?)
            }
        };
        Ok(ReferenceReader {
            dir: dir.to_path_buf(),
            manifest,
            head,
            spill: None,
        })
    }

    /// Keeps A's logits in `spill` once computed, and reads them from it from then on:
    /// each chunk's head is replayed once in the run, not once per B.
    pub fn keep_logits(&mut self, spill: LogitsSpill) {
        if self.head.is_some() {
            self.spill = Some(spill);
        }
    }

    /// Bytes of A's logits kept for the B's.
    pub fn logits_kept(&self) -> u64 {
        self.spill.as_ref().map_or(0, LogitsSpill::bytes)
    }

    /// A's logits of chunk `c`'s scored rows (`[scored, n_vocab]`).
    pub fn logits(&mut self, c: usize) -> anyhow::Result<Array2<f32>> {
        let chunk = &self.manifest.chunks[c];
        let scored = chunk
            .ids
            .len()
            .saturating_sub(1)
            .saturating_sub(chunk.first);
        if let Some(kept) = self.spill.as_mut().and_then(|s| s.get(c)) {
            return Ok(kept);
        }
        let rows = read_chunk(&self.dir, c, scored, self.manifest.width)?;
        let Some(head) = &self.head else {
            return Ok(rows);
        };
        let logits = head.head_logits(rows.view());
        if let Some(spill) = &mut self.spill {
            spill.put(c, &logits);
        }
        Ok(logits)
    }
}

/// How A's rows will be kept, decided before A scores anything: head inputs where A's
/// engine can capture them and its head can be read, else logits (with the reason).
pub fn prepare_capture(
    a: &mut dyn LogitSource,
) -> (ReferenceRows, Option<Arc<LensHead>>, Option<String>) {
    let spec = CaptureSpec {
        head_input: true,
        ..CaptureSpec::default()
    };
    let tried = a.lens_head().and_then(|h| a.set_capture(&spec).map(|()| h));
    match tried {
        Ok(head) => (ReferenceRows::HeadInput, Some(head), None),
        Err(e) => {
            let _ = a.set_capture(&CaptureSpec::default());
            (
                ReferenceRows::Logits,
                None,
                Some(format!("A's output head cannot be replayed: {e:#}")),
            )
        }
    }
}

/// One chunk of A scored: its logits (`[scored, n_vocab]`), and the rows to keep.
pub struct Scored {
    pub logits: Array2<f32>,
    pub rows: Array2<f32>,
}

/// Scores chunk `chunk` with A and picks out the rows the reference keeps.
pub fn score_chunk(
    a: &mut dyn LogitSource,
    chunk: &Chunk,
    rows: ReferenceRows,
    timing: &mut Timing,
) -> anyhow::Result<Scored> {
    let t = Instant::now();
    let mut logits = a.score_from(&chunk.ids, chunk.first)?;
    let captured = a.take_captured();
    timing.score_a_s += t.elapsed().as_secs_f64();
    timing.tokens_evaluated += chunk.ids.len();
    super::check_shape("A", &logits, chunk, a.info().n_vocab)?;
    let scored = chunk.scored();
    logits = logits.slice_move(ndarray::s![..scored, ..]);
    let kept = match rows {
        ReferenceRows::Logits => logits.clone(),
        ReferenceRows::HeadInput => {
            anyhow::ensure!(
                captured.len() >= scored,
                "A's engine captured {} head inputs for {scored} scored rows",
                captured.len()
            );
            let width = captured[0].head_input.as_ref().map_or(0, Vec::len);
            let mut out = Array2::zeros((scored, width));
            for (mut dst, c) in out.outer_iter_mut().zip(&captured) {
                let src = c
                    .head_input
                    .as_ref()
                    .filter(|v| v.len() == width)
                    .ok_or_else(|| anyhow::anyhow!("A's engine captured no head input"))?;
                dst.assign(&ndarray::ArrayView1::from(src.as_slice()));
            }
            out
        }
    };
    Ok(Scored { logits, rows: kept })
}

/// Rows of a chunk whose replay [`replay_differs`] checks, at each end: one kernel sums every
/// row of a product alike (tinyBLAS's edge tiles included, which the last rows fall in), and
/// a kernel that sums otherwise shows at any row, so a few rows decide it at a fraction of the
/// cost of the chunk's whole head (a 128k vocabulary makes it a second of a 1B model's time).
const CHECKED_ROWS: usize = 8;

/// Whether `head`'s replay of `scored.rows` gives `scored.logits` bit for bit, on the first
/// and last [`CHECKED_ROWS`]; else the largest difference, which says why the reference keeps
/// logits.
pub fn replay_differs(head: &LensHead, scored: &Scored) -> Option<f32> {
    let n = scored.rows.nrows();
    let picked: Vec<usize> = if n <= 2 * CHECKED_ROWS {
        (0..n).collect()
    } else {
        (0..CHECKED_ROWS).chain(n - CHECKED_ROWS..n).collect()
    };
    let replay = head.head_logits(scored.rows.select(ndarray::Axis(0), &picked).view());
    picked
        .iter()
        .zip(replay.outer_iter())
        .flat_map(|(&r, got)| {
            got.into_iter()
                .zip(scored.logits.row(r))
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<f32>>()
        })
        .fold(None, |m: Option<f32>, d| Some(m.map_or(d, |m| m.max(d))))
}

/// Writes the manifest under a name of this process's own, then renames it: shards of one
/// job start together and write the same manifest.
pub fn write_manifest(dir: &Path, manifest: &ReferenceManifest) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{REFERENCE_JSON}.{}.partial", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut text = serde_json::to_vec_pretty(manifest)?;
        text.push(b'\n');
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(REFERENCE_JSON))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", dir.join(REFERENCE_JSON).display()))
}
