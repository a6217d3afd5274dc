//! llama-perplexity's `--kl-divergence-base` files, read back so a base file someone already has
//! can stand in for model A, and llama-perplexity's own per-token KLD against such a file.
//!
//! `llama-perplexity -m A.gguf -f TEXT -c N --kl-divergence-base FILE` scores A over the text
//! and stores, for the second half of every chunk, A's next-token log-probabilities in 16 bits;
//! `llama-perplexity -m B.gguf --kl-divergence-base FILE --kl-divergence` then scores B over the
//! tokens stored in the file and compares row by row, so A never has to be loaded again. The
//! layout and the math below follow llama.cpp's `tools/perplexity/perplexity.cpp`
//! (`perplexity`, `log_softmax`, `process_logits` and `kl_divergence`, as vendored by
//! llama-cpp-python 0.3.36).
//!
//! # Layout
//!
//! All integers and floats little-endian (llama-perplexity writes its native order, and every
//! platform it runs on is little-endian):
//!
//! | offset          | size                 | what                                              |
//! |-----------------|----------------------|---------------------------------------------------|
//! | 0               | 8                    | magic `_logits_`                                  |
//! | 8               | 4, u32               | `n_ctx`: tokens per chunk (`-c` of the base run)  |
//! | 12              | 4, i32               | `n_vocab`                                         |
//! | 16              | 4, i32               | `n_chunk`                                         |
//! | 20              | 4 · n_chunk · n_ctx  | the tokens (i32), chunk after chunk               |
//! | 20 + 4·n_chunk·n_ctx | n_chunk · S · 2·nv | the rows, chunk after chunk                     |
//!
//! with S = n_ctx − 1 − n_ctx/2 scored rows per chunk and nv = 2·⌈n_vocab/2⌉ + 4 u16 per row.
//! Row r of a chunk is the distribution at position n_ctx/2 + r, which predicts the chunk's
//! token n_ctx/2 + r + 1: only the second half is scored so every scored position has at
//! least n_ctx/2 tokens of context, and the chunk's last position is not, as its next token
//! belongs to the next chunk. A row is
//!
//! | u16 words    | what                                                              |
//! |--------------|-------------------------------------------------------------------|
//! | 0–1          | `scale`, f32                                                      |
//! | 2–3          | `min_log_prob`, f32                                               |
//! | 4 ..         | n_vocab u16 `q`, then one zero u16 when n_vocab is odd (padding)  |
//!
//! and token i's log-probability is `scale·q[i] + min_log_prob`, in f32. The writer takes the
//! row's largest and smallest logit, raises the smallest to `max − 16`, and quantizes
//! `logit − min` in 65535 steps (`scale = (max − min)/65535`, rounded to nearest, ties to
//! even); logits at or below the raised minimum store 0. So the step is at most
//! 16/65535 ≈ 2.4·10⁻⁴ nats, and everything more than 16 nats below the top token reads back
//! as `min_log_prob` (≤ −16): the KLD loop skips base log-probs ≤ −16, so those tokens do not
//! count at all. Half the bytes of f32 for an error well under what quantization does to a
//! model, which is what the file is for.
//!
//! The tokens are the text's tokens as tokenized, with no BOS put in: when the model adds BOS,
//! llama-perplexity feeds BOS in place of each chunk's first token at evaluation time, in both
//! runs ([`KldBase::eval_tokens`]). The file says nothing about the model beyond `n_vocab`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The first 8 bytes of every base file.
pub const MAGIC: &[u8; 8] = b"_logits_";

/// Magic, `n_ctx`, `n_vocab`, `n_chunk`.
const HEADER_BYTES: u64 = 20;

/// Base log-probs at or below this are left out of llama-perplexity's KLD sum; the writer's
/// clamp puts every token more than 16 nats below the top there.
const KLD_FLOOR: f32 = -16.0;

#[derive(Debug, thiserror::Error)]
pub enum KldBaseError {
    #[error("{}: {source}: check the path given as the KL-divergence base", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} is not a llama-perplexity KL-divergence base file (it does not start with \
         \"_logits_\"): pass the file written by `llama-perplexity --kl-divergence-base FILE` \
         (the run without --kl-divergence)",
        path.display()
    )]
    BadMagic { path: PathBuf },
    #[error(
        "{} holds only the start of a header ({actual} bytes): llama-perplexity wrote no \
         chunks, as the text had fewer than 2·n_ctx tokens; write it again with more text or a \
         smaller -c",
        path.display()
    )]
    NoChunks { path: PathBuf, actual: u64 },
    #[error(
        "{} is {actual} bytes but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} \
         chunks) implies {expected}: {}",
        path.display(),
        size_hint(*.expected, *.actual)
    )]
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
        n_ctx: u64,
        n_vocab: i64,
        n_chunk: i64,
    },
    #[error(
        "{} has an impossible header ({what}): it is damaged or not a base file; write it again \
         with `llama-perplexity --kl-divergence-base FILE`",
        path.display()
    )]
    BadHeader { path: PathBuf, what: String },
    #[error(
        "{} stores token {token} at index {index}, outside its vocabulary of {n_vocab}: the file \
         is damaged; write it again",
        path.display()
    )]
    BadToken {
        path: PathBuf,
        index: usize,
        token: i32,
        n_vocab: usize,
    },
    #[error(
        "the base file was written for a vocabulary of {base}, B has {b}: use a base file of \
         the same model family"
    )]
    VocabMismatch { base: usize, b: usize },
    #[error("chunk {chunk} asked of a base file with {n_chunk} chunks: ask for 0..{n_chunk}")]
    NoSuchChunk { chunk: usize, n_chunk: usize },
    #[error("row {row} asked of a chunk with {n_scored} scored rows: ask for 0..{n_scored}")]
    NoSuchRow { row: usize, n_scored: usize },
}

fn size_hint(expected: u64, actual: u64) -> &'static str {
    if actual < expected {
        "the file is truncated (llama-perplexity stopped early, or the copy is incomplete); \
         write it again"
    } else {
        "the file has bytes past its end (appended to, or two files joined); write it again"
    }
}

/// One stored row: A's log-probabilities at one scored position, kept as stored so the math
/// decodes exactly as llama-perplexity does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BaseRow {
    /// The quantization step, in nats; 0 when every logit of the row was equal.
    pub scale: f32,
    /// The log-probability that `q = 0` stands for: the row's minimum after the clamp.
    pub min_log_prob: f32,
    /// One value per token, the padding left out.
    pub q: Vec<u16>,
}

impl BaseRow {
    /// Token `i`'s log-probability, as llama-perplexity computes it (f32 multiply, then add).
    #[inline]
    pub fn logprob(&self, i: usize) -> f32 {
        self.scale * f32::from(self.q[i]) + self.min_log_prob
    }

    /// Every token's log-probability.
    pub fn logprobs(&self) -> Vec<f32> {
        (0..self.q.len()).map(|i| self.logprob(i)).collect()
    }

    /// The top token, the first of equals as in llama-perplexity (`Same top p` compares it
    /// with B's).
    pub fn argmax(&self) -> usize {
        let mut best = 0;
        let mut best_lp = 0f32;
        for i in 0..self.q.len() {
            let lp = self.logprob(i);
            if i == 0 || lp > best_lp {
                best_lp = lp;
                best = i;
            }
        }
        best
    }

    /// The largest error a decoded log-probability can have from quantization, apart from the
    /// clamped tokens: half a step.
    pub fn max_error(&self) -> f32 {
        0.5 * self.scale
    }
}

/// llama-perplexity's numbers for one scored position, B against the base row.
///
/// The precisions are llama-perplexity's: `kld` is summed in f64 from f32 terms; the others are
/// f32. To reproduce its sums, accumulate `f64::from(-logprob_b)` and
/// `f64::from(logprob_b * logprob_b)` (its `nll*nll` is an f32 product), likewise for the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStats {
    /// Σ p_base·(log p_base − log p_b) over the tokens whose base log-prob is above −16.
    pub kld: f64,
    /// log p_base of the correct token, decoded from the file (`-nll_base`; PPL(base)).
    pub logprob_base: f32,
    /// log p_b of the correct token (`-nll`; PPL(Q)).
    pub logprob_b: f32,
    /// p_base of the correct token, `expf(logprob_base)`.
    pub p_base: f32,
    /// p_b of the correct token, `expf(logprob_b)`.
    pub p_b: f32,
    /// Δp = p_b − p_base, in f32 as llama-perplexity's percentiles of Δp take it.
    pub p_diff: f32,
    /// The base's top token (first of equals).
    pub top_base: u32,
    /// B's top token over its raw logits (first of equals).
    pub top_b: u32,
    /// `top_base == top_b`: one count toward `Same top p`.
    pub same_top: bool,
}

/// llama-perplexity's `log_softmax(n_vocab, logits, base_log_prob, tok, kld)` for one position:
/// B's raw logits against the stored base row, for the correct next token.
///
/// Same formulas and precisions: B's max in f32, Σ expf(l − max) in f64, its log cast to f32,
/// the NLLs in f32, the KLD terms in f32 added into an f64, and glibc's `expf`/`log`, which
/// Rust's `f32::exp`/`f64::ln` call too. A C++ build that contracts (`-ffp-contract=fast`)
/// could fuse `scale·q + min_log_prob` into one FMA, ≤ 1 ulp apart; the llama-perplexity
/// built by `scripts/llama-tools` has no FMA in this loop.
///
/// # Panics
///
/// When `logits_b` is not one logit per token of the base row ([`KldBase::check_vocab`] first)
/// or `next_token` is not a token of it.
pub fn compare_row(base: &BaseRow, logits_b: &[f32], next_token: u32) -> RowStats {
    let n = base.q.len();
    assert_eq!(
        logits_b.len(),
        n,
        "B's row has {} logits, the base row {n}",
        logits_b.len()
    );
    let tok = next_token as usize;
    assert!(tok < n, "token {tok} outside a vocabulary of {n}");

    let mut max_logit = logits_b[0];
    let mut imax = 0;
    for (i, &l) in logits_b.iter().enumerate().skip(1) {
        if l > max_logit {
            max_logit = l;
            imax = i;
        }
    }
    let mut sum_exp = 0f64;
    for &l in logits_b {
        sum_exp += f64::from((l - max_logit).exp());
    }
    let log_sum_exp = sum_exp.ln() as f32;
    let nll = max_logit + log_sum_exp - logits_b[tok];
    let nll_base = -(base.scale * f32::from(base.q[tok]) + base.min_log_prob);

    // From here log p_b(i) = logits_b[i] − max_lse.
    let max_lse = max_logit + log_sum_exp;
    let mut sum = 0f64;
    let mut imax_base = 0;
    let mut p_log_base_max = 0f32;
    for (i, (&q, &l)) in base.q.iter().zip(logits_b).enumerate() {
        let p_log_base = base.scale * f32::from(q) + base.min_log_prob;
        if i == 0 || p_log_base > p_log_base_max {
            p_log_base_max = p_log_base;
            imax_base = i;
        }
        if p_log_base > KLD_FLOOR {
            let p_base = p_log_base.exp();
            sum += f64::from(p_base * (p_log_base - l + max_lse));
        }
    }

    let p_base = (-nll_base).exp();
    let p_b = (-nll).exp();
    RowStats {
        kld: sum,
        logprob_base: -nll_base,
        logprob_b: -nll,
        p_base,
        p_b,
        p_diff: p_b - p_base,
        top_base: imax_base as u32,
        top_b: imax as u32,
        same_top: imax == imax_base,
    }
}

/// An open base file: the header and the tokens in memory, the rows read from disk on demand,
/// so memory stays the same whatever the file's size.
#[derive(Debug)]
pub struct KldBase {
    path: PathBuf,
    file: File,
    n_ctx: usize,
    n_vocab: usize,
    n_chunk: usize,
    tokens: Vec<u32>,
    /// One row's bytes, reused across reads.
    buf: Vec<u8>,
}

impl KldBase {
    /// Opens a base file and checks it: the magic, a header that makes sense, a length that is
    /// exactly what the header implies, and tokens inside the vocabulary. Reads the header and
    /// the tokens (4 bytes per token of text), none of the rows.
    pub fn open(path: &Path) -> Result<KldBase, KldBaseError> {
        let io_err = |source| KldBaseError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |what: String| KldBaseError::BadHeader {
            path: path.to_path_buf(),
            what,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let actual = file.metadata().map_err(io_err)?.len();

        let mut magic = [0u8; 8];
        if actual >= 8 {
            file.read_exact(&mut magic).map_err(io_err)?;
        }
        if &magic != MAGIC {
            return Err(KldBaseError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        // The writer puts n_ctx before tokenizing and stops there when the text is too short.
        if actual == 12 {
            return Err(KldBaseError::NoChunks {
                path: path.to_path_buf(),
                actual,
            });
        }
        if actual < HEADER_BYTES {
            return Err(bad(format!("cut off after {actual} bytes")));
        }
        let mut head = [0u8; 12];
        file.read_exact(&mut head).map_err(io_err)?;
        let n_ctx = u64::from(u32::from_le_bytes(head[0..4].try_into().unwrap()));
        let n_vocab = i64::from(i32::from_le_bytes(head[4..8].try_into().unwrap()));
        let n_chunk = i64::from(i32::from_le_bytes(head[8..12].try_into().unwrap()));
        if n_vocab <= 0 {
            return Err(bad(format!("n_vocab {n_vocab}")));
        }
        if n_chunk <= 0 {
            return Err(bad(format!("{n_chunk} chunks")));
        }
        if n_ctx.saturating_sub(1 + n_ctx / 2) == 0 {
            return Err(bad(format!("n_ctx {n_ctx}, which scores no position")));
        }

        // Checked before anything is allocated from the header, so a damaged header cannot ask
        // for gigabytes of tokens.
        let expected = expected_len(n_ctx, n_vocab as u64, n_chunk as u64).ok_or_else(|| {
            bad(format!(
                "n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} chunks overflow a file size"
            ))
        })?;
        if actual != expected {
            return Err(KldBaseError::Size {
                path: path.to_path_buf(),
                expected,
                actual,
                n_ctx,
                n_vocab,
                n_chunk,
            });
        }

        let (n_ctx, n_vocab, n_chunk) = (n_ctx as usize, n_vocab as usize, n_chunk as usize);
        let mut raw = vec![0u8; 4 * n_chunk * n_ctx];
        file.read_exact(&mut raw).map_err(io_err)?;
        let mut tokens = Vec::with_capacity(n_chunk * n_ctx);
        for (index, b) in raw.chunks_exact(4).enumerate() {
            let token = i32::from_le_bytes(b.try_into().unwrap());
            if token < 0 || token as usize >= n_vocab {
                return Err(KldBaseError::BadToken {
                    path: path.to_path_buf(),
                    index,
                    token,
                    n_vocab,
                });
            }
            tokens.push(token as u32);
        }

        Ok(KldBase {
            path: path.to_path_buf(),
            file,
            n_ctx,
            n_vocab,
            n_chunk,
            tokens,
            buf: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens per chunk: B must be scored with this context, one chunk at a time from an empty
    /// cache.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn n_chunk(&self) -> usize {
        self.n_chunk
    }

    /// Every chunk's tokens, chunk after chunk, as stored (no BOS put in).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Chunk `c`'s `n_ctx` tokens, as stored.
    pub fn chunk_tokens(&self, c: usize) -> &[u32] {
        &self.tokens[c * self.n_ctx..(c + 1) * self.n_ctx]
    }

    /// Chunk `c`'s tokens as llama-perplexity feeds them: with `bos` in place of the first
    /// token when the model adds BOS (`llama_vocab_get_add_bos`), as stored otherwise.
    pub fn eval_tokens(&self, c: usize, bos: Option<u32>) -> Vec<u32> {
        let mut t = self.chunk_tokens(c).to_vec();
        if let Some(bos) = bos {
            t[0] = bos;
        }
        t
    }

    /// The positions of each chunk that have a row: `n_ctx/2 .. n_ctx − 1`. Row r is position
    /// `scored_positions().start + r`, whose correct next token is the chunk's token at that
    /// position + 1.
    pub fn scored_positions(&self) -> Range<usize> {
        self.n_ctx / 2..self.n_ctx - 1
    }

    /// Rows per chunk.
    pub fn n_scored(&self) -> usize {
        self.n_ctx - 1 - self.n_ctx / 2
    }

    /// The correct next token of chunk `c`'s row `r`.
    pub fn next_token(&self, c: usize, r: usize) -> u32 {
        self.chunk_tokens(c)[self.n_ctx / 2 + r + 1]
    }

    /// Refuses a B whose vocabulary differs from the base's (llama-perplexity only warns, then
    /// compares token ids that mean different things).
    pub fn check_vocab(&self, n_vocab_b: usize) -> Result<(), KldBaseError> {
        if n_vocab_b != self.n_vocab {
            return Err(KldBaseError::VocabMismatch {
                base: self.n_vocab,
                b: n_vocab_b,
            });
        }
        Ok(())
    }

    /// u16 words per stored row: the two f32s, the tokens, the padding to an even count.
    fn row_words(&self) -> usize {
        row_words(self.n_vocab as u64) as usize
    }

    fn row_offset(&self, c: usize, r: usize) -> u64 {
        HEADER_BYTES
            + 4 * (self.n_chunk * self.n_ctx) as u64
            + ((c * self.n_scored() + r) as u64) * 2 * self.row_words() as u64
    }

    /// Chunk `c`'s rows, all of them (n_scored · n_vocab · 2 bytes in memory; use
    /// [`KldBase::read_row_into`] to hold one at a time).
    pub fn chunk_rows(&mut self, c: usize) -> Result<Vec<BaseRow>, KldBaseError> {
        let mut rows = Vec::with_capacity(self.n_scored());
        for r in 0..self.n_scored() {
            let mut row = BaseRow::default();
            self.read_row_into(c, r, &mut row)?;
            rows.push(row);
        }
        Ok(rows)
    }

    /// Chunk `c`'s row `r`.
    pub fn read_row(&mut self, c: usize, r: usize) -> Result<BaseRow, KldBaseError> {
        let mut row = BaseRow::default();
        self.read_row_into(c, r, &mut row)?;
        Ok(row)
    }

    /// Chunk `c`'s row `r` into `row`, reusing its allocation.
    pub fn read_row_into(
        &mut self,
        c: usize,
        r: usize,
        row: &mut BaseRow,
    ) -> Result<(), KldBaseError> {
        if c >= self.n_chunk {
            return Err(KldBaseError::NoSuchChunk {
                chunk: c,
                n_chunk: self.n_chunk,
            });
        }
        if r >= self.n_scored() {
            return Err(KldBaseError::NoSuchRow {
                row: r,
                n_scored: self.n_scored(),
            });
        }
        let offset = self.row_offset(c, r);
        let words = self.row_words();
        self.buf.resize(2 * words, 0);
        let io_err = |source| KldBaseError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        self.file.read_exact(&mut self.buf).map_err(io_err)?;

        row.scale = f32::from_le_bytes(self.buf[0..4].try_into().unwrap());
        row.min_log_prob = f32::from_le_bytes(self.buf[4..8].try_into().unwrap());
        row.q.clear();
        row.q.extend(
            self.buf[8..8 + 2 * self.n_vocab]
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]])),
        );
        Ok(())
    }
}

/// nv in perplexity.cpp: `2*((n_vocab + 1)/2) + 4`.
fn row_words(n_vocab: u64) -> u64 {
    2 * n_vocab.div_ceil(2) + 4
}

/// The length a header implies, or None when it does not fit in a u64.
fn expected_len(n_ctx: u64, n_vocab: u64, n_chunk: u64) -> Option<u64> {
    let n_scored = n_ctx.checked_sub(1 + n_ctx / 2)?;
    let tokens = n_chunk.checked_mul(n_ctx)?.checked_mul(4)?;
    let rows = n_chunk
        .checked_mul(n_scored)?
        .checked_mul(row_words(n_vocab))?
        .checked_mul(2)?;
    HEADER_BYTES.checked_add(tokens)?.checked_add(rows)
}

/// perplexity.cpp's `nearest_int`: adding 1.5·2²³ leaves round(x) in the low mantissa bits.
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// perplexity.cpp's writer-side `log_softmax(n_vocab, logits, log_prob, tok)`: one row's
/// words (padding included) and the unquantized NLL of `tok` it returns for the base PPL.
fn encode_row(logits: &[f32], tok: usize) -> (Vec<u16>, f64) {
    let n = logits.len();
    let mut max_logit = logits[0];
    let mut min_logit = logits[0];
    for &l in &logits[1..] {
        max_logit = max_logit.max(l);
        min_logit = min_logit.min(l);
    }
    min_logit = min_logit.max(max_logit - 16.0);
    let mut sum_exp = 0f64;
    for &l in logits {
        sum_exp += f64::from((l - max_logit).exp());
    }
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min_logit - max_logit - log_sum_exp;
    let scale = (max_logit - min_logit) / 65535.0;
    let mut out = vec![0u16; row_words(n as u64) as usize];
    let s = scale.to_le_bytes();
    let m = min_log_prob.to_le_bytes();
    out[0] = u16::from_le_bytes([s[0], s[1]]);
    out[1] = u16::from_le_bytes([s[2], s[3]]);
    out[2] = u16::from_le_bytes([m[0], m[1]]);
    out[3] = u16::from_le_bytes([m[2], m[3]]);
    if scale != 0.0 {
        let inv_scale = 1.0 / scale;
        for (o, &l) in out[4..4 + n].iter_mut().zip(logits) {
            *o = if l > min_logit {
                nearest_int(inv_scale * (l - min_logit)) as u16
            } else {
                0
            };
        }
    }
    (out, f64::from(max_logit + log_sum_exp - logits[tok]))
}

/// Writes a whole base file as llama-perplexity's `perplexity()` does, with `logits(c, p)` the
/// logits row at position `p` of chunk `c` (asked for the scored positions only), so a model
/// llama-perplexity cannot run (an ONNX export, the test engine) gives a file it reads.
/// Returns the mean NLL over the scored positions (the base run's PPL is its exp).
pub fn write_file(
    path: &Path,
    n_ctx: usize,
    n_vocab: usize,
    tokens: &[i32],
    logits: &dyn Fn(usize, usize) -> Vec<f32>,
) -> io::Result<f64> {
    let n_chunk = tokens.len() / n_ctx;
    let mut f = io::BufWriter::new(File::create(path)?);
    f.write_all(MAGIC)?;
    f.write_all(&(n_ctx as i32).to_le_bytes())?;
    f.write_all(&(n_vocab as i32).to_le_bytes())?;
    f.write_all(&(n_chunk as i32).to_le_bytes())?;
    for t in &tokens[..n_chunk * n_ctx] {
        f.write_all(&t.to_le_bytes())?;
    }
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    for c in 0..n_chunk {
        for p in first..n_ctx - 1 {
            let tok = tokens[c * n_ctx + p + 1] as usize;
            let (words, v) = encode_row(&logits(c, p), tok);
            nll += v;
            count += 1;
            for w in words {
                f.write_all(&w.to_le_bytes())?;
            }
        }
    }
    f.flush()?;
    Ok(nll / count.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    /// xorshift64*: reproducible test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
        }
        /// Roughly normal: the sum of four uniforms, centred.
        fn normal(&mut self) -> f32 {
            (0..4).map(|_| self.next_f32()).sum::<f32>() - 2.0
        }
    }

    /// A logits row with a few strong tokens, a spread of `spread` nats and the rest noise.
    fn logits_row(seed: u64, n_vocab: usize, spread: f32) -> Vec<f32> {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut row: Vec<f32> = (0..n_vocab).map(|_| spread * 0.25 * rng.normal()).collect();
        for k in 0..3 {
            let i = (seed as usize * 7 + k * 13) % n_vocab;
            row[i] += spread * 0.5 / (k + 1) as f32;
        }
        row
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kld_base-{}-{name}.kld", std::process::id()))
    }

    fn tokens(n: usize, n_vocab: usize) -> Vec<i32> {
        (0..n).map(|i| ((i * 31 + 7) % n_vocab) as i32).collect()
    }

    fn f64_logprobs(logits: &[f32]) -> Vec<f64> {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let lse = max
            + logits
                .iter()
                .map(|&v| (f64::from(v) - max).exp())
                .sum::<f64>()
                .ln();
        logits.iter().map(|&v| f64::from(v) - lse).collect()
    }

    #[test]
    fn reads_back_what_the_writer_wrote() {
        // Odd n_ctx and odd n_vocab exercise n_ctx/2 and the row padding.
        let (n_ctx, n_vocab, n_chunk) = (13, 101, 3);
        let path = tmp("roundtrip");
        let toks = tokens(n_chunk * n_ctx + 5, n_vocab); // a tail that fills no chunk
        let spread = |c: usize, p: usize| if (c + p).is_multiple_of(2) { 8.0 } else { 40.0 };
        let row = |c: usize, p: usize| logits_row((c * 1000 + p) as u64, n_vocab, spread(c, p));
        write_file(&path, n_ctx, n_vocab, &toks, &row).unwrap();

        let mut base = KldBase::open(&path).unwrap();
        assert_eq!(
            (base.n_ctx(), base.n_vocab(), base.n_chunk()),
            (n_ctx, n_vocab, n_chunk)
        );
        assert_eq!(base.scored_positions(), 6..12);
        assert_eq!(base.n_scored(), 6);
        let stored: Vec<u32> = toks[..n_chunk * n_ctx].iter().map(|&t| t as u32).collect();
        assert_eq!(base.tokens(), &stored[..]);
        assert_eq!(base.eval_tokens(1, Some(1))[0], 1);
        assert_eq!(base.eval_tokens(1, None), base.chunk_tokens(1));

        for c in 0..n_chunk {
            let rows = base.chunk_rows(c).unwrap();
            assert_eq!(rows.len(), base.n_scored());
            for (r, got) in rows.iter().enumerate() {
                let p = base.scored_positions().start + r;
                assert_eq!(base.next_token(c, r), stored[c * n_ctx + p + 1]);
                let logits = row(c, p);
                let want = f64_logprobs(&logits);
                let top = want.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                // Half a step, plus f32 rounding of the decode and of min_log_prob.
                let tol = f64::from(got.max_error()) + 1e-5;
                assert!(got.scale <= 16.0 / 65535.0 * 1.0001);
                let mut clamped = 0;
                for (i, &w) in want.iter().enumerate() {
                    let d = f64::from(got.logprob(i));
                    if w < top - 16.0 {
                        // Clamped: reads as the row's floor, at most 16 nats below the top.
                        assert_eq!(got.q[i], 0);
                        assert!(d >= w && d <= top - 16.0 + tol, "{d} vs {w}");
                        clamped += 1;
                    } else {
                        assert!(
                            (d - w).abs() <= tol,
                            "c{c} r{r} i{i}: {d} vs {w}, tol {tol}"
                        );
                    }
                }
                if spread(c, p) < 16.0 {
                    assert_eq!(clamped, 0);
                } else {
                    assert!(clamped > 0);
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn compare_row_matches_f64_kl() {
        let n_vocab = 257;
        for (seed, spread) in [(1u64, 6.0f32), (2, 12.0), (3, 30.0), (4, 60.0)] {
            let a = logits_row(seed, n_vocab, spread);
            // B: A with noise, so the KLD is small but not zero.
            let mut rng = Rng(seed + 99);
            let b: Vec<f32> = a.iter().map(|&v| v + 0.3 * rng.normal()).collect();
            let tok = (seed as usize * 17) % n_vocab;

            let (words, _) = encode_row(&a, tok);
            let path = tmp(&format!("row{seed}"));
            let toks: Vec<i32> = vec![tok as i32; 3];
            // n_ctx 3: one scored row (position 1) per chunk, predicting token 2.
            write_file(&path, 3, n_vocab, &toks, &|_, _| a.clone()).unwrap();
            let mut base = KldBase::open(&path).unwrap();
            let row = base.read_row(0, 0).unwrap();
            let _ = std::fs::remove_file(&path);
            assert_eq!(row.q[..], words[4..4 + n_vocab]);

            let s = compare_row(&row, &b, tok as u32);
            let lb = f64_logprobs(&b);
            let la = f64_logprobs(&a);

            // The same rows decoded in f64, with llama-perplexity's −16 floor: only f32 rounding
            // apart.
            let direct: f64 = (0..n_vocab)
                .filter(|&i| row.logprob(i) > -16.0)
                .map(|i| {
                    let lp =
                        f64::from(row.scale) * f64::from(row.q[i]) + f64::from(row.min_log_prob);
                    lp.exp() * (lp - lb[i])
                })
                .sum();
            assert!(
                (s.kld - direct).abs() <= 1e-6 * (1.0 + direct),
                "{} vs {direct}",
                s.kld
            );

            // The exact KL of the unquantized rows: within the quantization step, plus the
            // mass the floor leaves out.
            let exact: f64 = la.iter().zip(&lb).map(|(&x, &y)| x.exp() * (x - y)).sum();
            let mean_abs: f64 = la
                .iter()
                .zip(&lb)
                .map(|(&x, &y)| x.exp() * (1.0 + (x - y).abs()))
                .sum();
            let tail: f64 = la
                .iter()
                .zip(&lb)
                .enumerate()
                .filter(|&(i, _)| row.logprob(i) <= -16.0)
                .map(|(_, (&x, &y))| x.exp() * (1.0 + (x - y).abs()))
                .sum();
            let tol = f64::from(row.scale) * mean_abs + tail + 1e-6;
            assert!(
                (s.kld - exact).abs() <= tol,
                "spread {spread}: {} vs {exact}, tol {tol}",
                s.kld
            );

            let step = f64::from(row.max_error()) + 1e-5;
            let top = la.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if la[tok] > top - 16.0 {
                let d = f64::from(s.logprob_base) - la[tok];
                assert!(
                    d.abs() <= step,
                    "{} vs {}, step {step}",
                    s.logprob_base,
                    la[tok]
                );
                assert!((f64::from(s.p_base) - la[tok].exp()).abs() <= la[tok].exp() * step * 1.01);
            } else {
                // Clamped: the row's floor.
                assert_eq!(s.logprob_base, row.min_log_prob);
            }
            assert!((f64::from(s.logprob_b) - lb[tok]).abs() <= 1e-5 * (1.0 + lb[tok].abs()));
            assert!((f64::from(s.p_b) - lb[tok].exp()).abs() <= 1e-5);
            assert_eq!(s.p_diff, s.p_b - s.p_base);

            let argmax = |x: &[f64]| (0..x.len()).fold(0, |m, i| if x[i] > x[m] { i } else { m });
            assert_eq!(s.top_base as usize, argmax(&la));
            assert_eq!(s.top_b as usize, argmax(&lb));
            assert_eq!(s.same_top, s.top_base == s.top_b);
        }
    }

    #[test]
    fn identical_rows_give_zero_kld_and_ties_go_to_the_first() {
        // A row of equal logits: scale 0, every q 0, a uniform distribution.
        let flat = vec![1.5f32; 10];
        let (words, _) = encode_row(&flat, 3);
        let row = BaseRow {
            scale: f32::from_bits(u32::from(words[0]) | u32::from(words[1]) << 16),
            min_log_prob: f32::from_bits(u32::from(words[2]) | u32::from(words[3]) << 16),
            q: words[4..14].to_vec(),
        };
        assert_eq!(row.scale, 0.0);
        assert!(row.q.iter().all(|&q| q == 0));
        assert!((row.logprob(0) + (10f32).ln()).abs() < 1e-6);
        let s = compare_row(&row, &flat, 3);
        assert!(s.kld.abs() < 1e-6, "{}", s.kld);
        assert_eq!((s.top_base, s.top_b, s.same_top), (0, 0, true));

        // B ties at the top between 2 and 5: llama-perplexity's strict `>` keeps 2.
        let mut b = vec![0f32; 10];
        b[2] = 3.0;
        b[5] = 3.0;
        let s = compare_row(&row, &b, 5);
        assert_eq!(s.top_b, 2);
        assert!(!s.same_top);
    }

    #[test]
    fn refuses_damaged_files() {
        let (n_ctx, n_vocab) = (8, 33);
        let path = tmp("damaged");
        let toks = tokens(2 * n_ctx, n_vocab);
        write_file(&path, n_ctx, n_vocab, &toks, &|c, p| {
            logits_row((c + p) as u64, n_vocab, 10.0)
        })
        .unwrap();
        let good = std::fs::read(&path).unwrap();
        let expected = good.len() as u64;
        assert_eq!(expected, expected_len(8, 33, 2).unwrap());
        assert_eq!(expected, 20 + 4 * 16 + 2 * 3 * 38 * 2);

        let write = |bytes: &[u8]| std::fs::write(&path, bytes).unwrap();
        let msg = |e: KldBaseError| e.to_string();

        write(&good[..good.len() - 1]);
        match KldBase::open(&path) {
            Err(e @ KldBaseError::Size { .. }) => {
                let m = msg(e);
                assert!(m.contains(&format!("is {} bytes", expected - 1)), "{m}");
                assert!(m.contains(&format!("implies {expected}")), "{m}");
                assert!(m.contains("truncated"), "{m}");
            }
            r => panic!("{r:?}"),
        }
        let mut padded = good.clone();
        padded.extend_from_slice(&[0, 0]);
        write(&padded);
        match KldBase::open(&path) {
            Err(
                e @ KldBaseError::Size {
                    expected: x,
                    actual: y,
                    ..
                },
            ) => {
                assert_eq!((x, y), (expected, expected + 2));
                assert!(msg(e).contains("past its end"));
            }
            r => panic!("{r:?}"),
        }

        let mut bad = good.clone();
        bad[0] = b'X';
        write(&bad);
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::BadMagic { .. })
        ));
        write(b"_log");
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::BadMagic { .. })
        ));
        // What the writer leaves when the text is shorter than two chunks.
        write(&good[..12]);
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::NoChunks { actual: 12, .. })
        ));
        write(&good[..17]);
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::BadHeader { .. })
        ));

        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&(-5i32).to_le_bytes());
        write(&bad);
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::BadHeader { .. })
        ));
        // A header that does not fit the file is a size error, one that fits no file at all a
        // header error; neither allocates.
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&1000i32.to_le_bytes());
        write(&bad);
        assert!(matches!(
            KldBase::open(&path),
            Err(KldBaseError::Size { n_chunk: 1000, .. })
        ));
        bad[16..20].copy_from_slice(&i32::MAX.to_le_bytes());
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        write(&bad);
        match KldBase::open(&path) {
            Err(e @ KldBaseError::BadHeader { .. }) => assert!(msg(e).contains("overflow")),
            r => panic!("{r:?}"),
        }

        let mut bad = good.clone();
        bad[20 + 4 * 3..20 + 4 * 4].copy_from_slice(&(n_vocab as i32).to_le_bytes());
        write(&bad);
        match KldBase::open(&path) {
            Err(KldBaseError::BadToken {
                index: 3,
                token: 33,
                ..
            }) => {}
            r => panic!("{r:?}"),
        }

        write(&good);
        let mut base = KldBase::open(&path).unwrap();
        assert!(base.check_vocab(n_vocab).is_ok());
        assert_eq!(
            base.check_vocab(49152).unwrap_err().to_string(),
            "the base file was written for a vocabulary of 33, B has 49152: use a base file of \
             the same model family"
        );
        assert!(matches!(
            base.read_row(2, 0),
            Err(KldBaseError::NoSuchChunk { chunk: 2, .. })
        ));
        assert!(matches!(
            base.read_row(0, 3),
            Err(KldBaseError::NoSuchRow { row: 3, .. })
        ));
        let _ = std::fs::remove_file(&path);

        match KldBase::open(&tmp("missing")) {
            Err(e @ KldBaseError::Io { .. }) => assert!(msg(e).contains("missing")),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn opens_a_10_gb_file_without_reading_its_rows() {
        // A sparse file the size of a real 10 GB base file (SmolLM2's vocabulary, -c 512, 400
        // chunks): opening reads the header and 800 KB of tokens, and the last row is one seek.
        let (n_ctx, n_vocab, n_chunk) = (512u64, 49152u64, 400u64);
        let len = expected_len(n_ctx, n_vocab, n_chunk).unwrap();
        assert!(len > 10_000_000_000);
        let path = tmp("sparse");
        {
            let mut f = File::create(&path).unwrap();
            f.write_all(MAGIC).unwrap();
            f.write_all(&(n_ctx as u32).to_le_bytes()).unwrap();
            f.write_all(&(n_vocab as i32).to_le_bytes()).unwrap();
            f.write_all(&(n_chunk as i32).to_le_bytes()).unwrap();
            if f.set_len(len).is_err() {
                let _ = std::fs::remove_file(&path);
                return; // a filesystem without sparse files: nothing to measure
            }
        }
        let t = Instant::now();
        let mut base = KldBase::open(&path).unwrap();
        let row = base.read_row(399, 254).unwrap();
        let dt = t.elapsed();
        let _ = std::fs::remove_file(&path);
        assert_eq!(base.tokens().len(), 400 * 512);
        assert_eq!(row.q.len(), 49152);
        assert!(dt.as_millis() < 500, "{dt:?}");
    }
}
