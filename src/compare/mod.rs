//! `compare`: how quantization, or the engine, changes the next-token distributions.
//!
//! Both sides score the same token ids, teacher-forced, through [`LogitSource::score`]; for
//! every scored position we compute KL(A‖B) over the full vocabulary in f64 and a few
//! per-token views, then llama-perplexity's summary (`llama-perplexity --kl-divergence`) with
//! its names, so the two tools read side by side. Unlike llama-perplexity nothing is stored in
//! 16 bits: A and every B are loaded at once and each chunk is scored by A once, then by each
//! B, and compared row by row.

mod files;
pub mod kld_base;
pub mod ladder;
pub mod logits_spill;
pub mod reference;
pub mod side;
pub mod stats;

pub use crate::schema::compare::*;
pub use files::{write_csv, write_files, write_files_with, FileOptions};

use crate::dist::probe::{Distribution, Probe, ProbeConfig};
use crate::text::Pieces;
use anyhow::Context as _;
use logitprobe_backends::{usage, LogitSource, TokenId, Vocab};
use ndarray::Array2;
use std::time::Instant;

impl SideInfo {
    pub fn new(
        label: &str,
        backend: &str,
        model: &str,
        model_path: &str,
        model_sha256: Option<String>,
        source: &dyn Vocab,
    ) -> SideInfo {
        let info = source.info();
        let d = &info.details;
        let get = |k: &str| {
            d.get(k).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            })
        };
        let mut parts = vec![format!("{} {}", info.engine, info.engine_version)];
        parts.push(model_path.to_string());
        if let Some(sha) = &model_sha256 {
            parts.push(format!("sha256 {}", &sha[..sha.len().min(12)]));
        }
        if let Some(types) = d.get("tensor_types").and_then(|v| v.as_object()) {
            // Most parameters first: "Q4_1+Q6_K+F32".
            let mut t: Vec<(&String, u64)> = types
                .iter()
                .map(|(k, v)| (k, v.get("params").and_then(|p| p.as_u64()).unwrap_or(0)))
                .collect();
            t.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
            parts.push(t.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join("+"));
        } else if let Some(t) = get("weights_dtype") {
            parts.push(format!("weights {t}"));
        }
        if let Some(bpw) = d.get("bits_per_weight").and_then(|v| v.as_f64()) {
            parts.push(format!("{bpw:.2} bpw"));
        }
        match (get("cache_type_k"), get("cache_type_v")) {
            (Some(k), Some(v)) => parts.push(format!("KV {k}/{v}")),
            _ => {
                if let Some(kv) = get("kv_dtype") {
                    parts.push(format!("KV {kv}"));
                }
            }
        }
        if let Some(fa) = get("flash_attn") {
            parts.push(format!("flash-attn {fa}"));
        }
        if let Some(ep) = get("execution_provider") {
            parts.push(format!("EP {ep}"));
        }
        parts.push(format!("device {}", info.device));
        SideInfo {
            label: label.to_string(),
            backend: backend.to_string(),
            model: model.to_string(),
            model_path: model_path.to_string(),
            model_sha256,
            model_bytes: model_bytes(std::path::Path::new(model_path)),
            engine: info.engine.clone(),
            engine_version: info.engine_version.clone(),
            device: info.device.clone(),
            n_vocab: info.n_vocab,
            tokenizer_vocab: info.tokenizer_vocab,
            n_ctx: info.n_ctx,
            logits_dtype: info.logits_dtype.clone(),
            details: d.clone(),
            description: format!("{label} · {}", parts.join(" · ")),
        }
    }
}

/// Bytes of a model file, or of the files of an ONNX folder.
fn model_bytes(path: &std::path::Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some(meta.len());
    }
    let files = std::fs::read_dir(path).ok()?;
    Some(
        files
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
    )
}

/// What `compare --lens` reads on both sides: the layers, and each side's lens head.
#[derive(Debug)]
pub struct LensCompare {
    pub layers: Vec<usize>,
    pub head_a: std::sync::Arc<logitprobe_backends::LensHead>,
    pub heads_b: Vec<std::sync::Arc<logitprobe_backends::LensHead>>,
}

impl LensCompare {
    /// Turns the lens on for `layers` (every layer when `None`) on A and every B; the sides
    /// must have the same depth, since layer l of A is compared with layer l of B.
    pub fn prepare(
        a: &mut dyn LogitSource,
        bs: &mut [Box<dyn LogitSource>],
        layers: &crate::lens::Layers,
    ) -> anyhow::Result<LensCompare> {
        let depth = |s: &dyn LogitSource| -> anyhow::Result<usize> {
            Ok(s.architecture()
                .ok_or(logitprobe_backends::Error::CaptureUnsupported {
                    engine: s.info().engine.clone(),
                })?
                .n_layer)
        };
        let n_layer = depth(&*a)?;
        for (i, b) in bs.iter().enumerate() {
            let nb = depth(&**b)?;
            if nb != n_layer {
                return Err(logitprobe_backends::usage!(
                    "the lens compares layer by layer, but A has {n_layer} layers and {} has {nb}",
                    b_name(i, bs.len())
                ));
            }
        }
        let layers = layers.resolve(n_layer);
        let spec = logitprobe_backends::CaptureSpec {
            hidden_layers: layers.clone(),
            attention_layers: Vec::new(),
            head_input: false,
            named: Vec::new(),
        };
        spec.check(n_layer)?;
        let head_a = a.lens_head()?;
        a.set_capture(&spec)?;
        let mut heads_b = Vec::new();
        for b in bs.iter_mut() {
            heads_b.push(b.lens_head()?);
            b.set_capture(&spec)?;
        }
        Ok(LensCompare {
            layers,
            head_a,
            heads_b,
        })
    }
}

/// Per lens layer, how far B number `bi` is from A over `positions` (`None` without `--lens`).
pub fn summarize_lens(
    positions: &[Position],
    bi: usize,
    layers: &[usize],
) -> Option<Vec<LensLayerSummary>> {
    if positions
        .iter()
        .any(|p| p.b.get(bi).is_none_or(|b| b.lens_kld.is_none()))
        || positions.is_empty()
    {
        return None;
    }
    Some(
        layers
            .iter()
            .enumerate()
            .map(|(l, &layer)| {
                let kld: Vec<f64> = positions
                    .iter()
                    .map(|p| p.b[bi].lens_kld.as_ref().map_or(f64::NAN, |v| v[l]))
                    .collect();
                let same = positions
                    .iter()
                    .filter(|p| {
                        p.b[bi]
                            .lens_top1_same
                            .as_ref()
                            .is_some_and(|v| v.get(l).copied().unwrap_or(false))
                    })
                    .count();
                LensLayerSummary {
                    layer,
                    kld: Spread::of(&kld),
                    same_top1: same as f64 / positions.len() as f64,
                }
            })
            .collect(),
    )
}

/// Writes chunk `c`'s positions, through a temporary name: the file's presence marks the
/// chunk done.
pub fn write_chunk_record(
    shard_dir: &std::path::Path,
    c: usize,
    positions: &[Position],
) -> anyhow::Result<()> {
    crate::output::write_atomic(&chunk_record_path(shard_dir, c), |w| {
        serde_json::to_writer(&mut *w, positions)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// A token sequence to score: rows `first..ids.len() - 1` are scored, row `j` predicting
/// `ids[j + 1]`.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub ids: Vec<TokenId>,
    pub first: usize,
}

impl Chunk {
    pub fn scored(&self) -> usize {
        self.ids.len().saturating_sub(1).saturating_sub(self.first)
    }
}

/// A corpus's token ids as llama-perplexity tokenizes its file (`common_tokenize(ctx, text,
/// true)`): with BOS in front when the model adds one, so the chunks cover the same tokens (a
/// text without it starts every chunk one token earlier on BOS models: Gemma 3's PPL differed
/// in the third decimal, SmolLM2's, which adds none, did not); special-token text is plain
/// text. Also the BOS each chunk starts with ([`corpus_chunks`]), on models that add one.
pub fn corpus_tokens(a: &dyn Vocab, text: &str) -> anyhow::Result<(Vec<TokenId>, Option<TokenId>)> {
    let info = a.info();
    let ids = a.tokenize(text, info.add_bos, false)?;
    Ok((ids, if info.add_bos { info.bos } else { None }))
}

/// Cuts `ids` into `floor(len / ctx)` chunks of `ctx` tokens as llama-perplexity does: with
/// BOS, each chunk starts with it (in place of the chunk's first text token); the first half
/// of each chunk is context and only the second half is scored, unless `score_all`.
pub fn corpus_chunks(
    ids: &[TokenId],
    ctx: usize,
    bos: Option<TokenId>,
    score_all: bool,
    max_chunks: Option<usize>,
) -> Vec<Chunk> {
    let n = ids.len() / ctx;
    let n = max_chunks.map_or(n, |m| n.min(m));
    (0..n)
        .map(|c| {
            let mut chunk = ids[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            Chunk {
                ids: chunk,
                first: if score_all { 0 } else { ctx / 2 },
            }
        })
        .collect()
}

/// Refuses a B whose vocabulary is not A's: another logits width, or another byte string for
/// an id both tokenizers define. The error names the first differing id.
pub fn check_vocab(a: &dyn Vocab, b: &dyn Vocab, b_label: &str) -> anyhow::Result<()> {
    let ia = a.info();
    check_vocab_of(
        ia.n_vocab,
        ia.tokenizer_vocab,
        &|id| a.token_bytes(id),
        b,
        b_label,
    )
}

/// [`check_vocab`] of a B against A's vocabulary given as its logits width, its number of
/// tokens and each token's bytes (A itself, or the pieces its reference keeps).
pub fn check_vocab_of(
    a_n_vocab: usize,
    a_tokens: usize,
    a_bytes: &dyn Fn(TokenId) -> Option<Vec<u8>>,
    b: &dyn Vocab,
    b_label: &str,
) -> anyhow::Result<()> {
    let ib = b.info();
    if a_n_vocab != ib.n_vocab {
        return Err(usage!(
            "vocabulary mismatch: {b_label} produces logits {} wide but A's are {a_n_vocab} wide; compare two builds of one model family",
            ib.n_vocab,
        ));
    }
    let shared = a_tokens.min(ib.tokenizer_vocab);
    for id in 0..shared as TokenId {
        let (x, y) = (a_bytes(id), b.token_bytes(id));
        if x != y {
            let show = |v: Option<Vec<u8>>| match v {
                Some(v) => format!("{:?}", String::from_utf8_lossy(&v)),
                None => "no piece".to_string(),
            };
            return Err(usage!(
                "vocabulary mismatch at token id {id}: A has {}, {b_label} has {}; both sides must use the same tokenizer",
                show(x),
                show(y)
            ));
        }
    }
    Ok(())
}

/// Positions where two tokenizations of one text differ (over the longer of the two).
pub fn tokenization_difference(a: &[TokenId], b: &[TokenId]) -> usize {
    let n = a.len().max(b.len());
    (0..n).filter(|&i| a.get(i) != b.get(i)).count()
}

/// Row `j` of a standard-layout `[rows, n_vocab]` array.
fn row(l: &Array2<f32>, j: usize, n_vocab: usize) -> &[f32] {
    &l.as_slice().expect("standard layout")[j * n_vocab..(j + 1) * n_vocab]
}

/// Runs `f` on rows `0..n` split across the CPU's threads (the engines are idle while the
/// comparison math runs), each thread with its own probe scratch; results in row order.
fn par_rows<T: Send>(
    n: usize,
    probe: &ProbeConfig,
    f: impl Fn(&mut Probe, usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.div_ceil(16))
        .max(1);
    let per = n.div_ceil(threads);
    let parts: Vec<anyhow::Result<Vec<T>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    let mut prober = Probe::new(probe.clone());
                    (t * per..((t + 1) * per).min(n))
                        .map(|r| f(&mut prober, r))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("comparison thread panicked"))
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

fn candidates_out(d: &Distribution, source: &dyn Vocab, pieces: &mut Pieces) -> Vec<Cand> {
    d.candidates
        .iter()
        .enumerate()
        .map(|(i, c)| Cand {
            rank: i + 1,
            token_id: c.token_id,
            token: pieces.get(source, c.token_id),
            prob: c.prob,
            logprob: c.logprob,
        })
        .collect()
}

/// Refuses logits that are not one row per scored position of `chunk` (and the last).
pub fn check_shape(
    side: &str,
    logits: &Array2<f32>,
    chunk: &Chunk,
    n_vocab: usize,
) -> anyhow::Result<()> {
    let rows = chunk.ids.len() - chunk.first;
    if logits.nrows() < chunk.scored() || logits.nrows() > rows || logits.ncols() != n_vocab {
        anyhow::bail!(
            "{side} returned logits of shape {:?} for {} tokens scored from {} (expected [{rows}, {n_vocab}])",
            logits.shape(),
            chunk.ids.len(),
            chunk.first
        );
    }
    Ok(())
}

/// A's view of each scored position of chunk `c`, from A's logits rows (row `r` is position
/// `chunk.first + r`); positions are numbered from `first_index` on. `vocab` names the tokens
/// (A's, or a B's: the sides share one vocabulary).
pub fn a_positions(
    la: &Array2<f32>,
    c: usize,
    chunk: &Chunk,
    first_index: usize,
    probe: &ProbeConfig,
    vocab: &dyn Vocab,
    pieces: &mut Pieces,
) -> anyhow::Result<Vec<Position>> {
    let n_vocab = la.ncols();
    let first = chunk.first;
    let dists = par_rows(chunk.scored(), probe, |prober, r| {
        let j = first + r;
        let x = row(la, r, n_vocab);
        let next = chunk.ids[j + 1];
        let dist = prober
            .describe(x, 1.0, next)
            .map_err(|e| anyhow::anyhow!("A at chunk {c} position {j}: {e}"))?;
        // The probe's own logprob: the number trace and serve give the same token.
        let logprob = dist.selected_logprob;
        Ok((dist, logprob))
    })?;
    Ok(dists
        .into_iter()
        .enumerate()
        .map(|(r, (dist, logprob))| {
            let j = first + r;
            let next = chunk.ids[j + 1];
            Position {
                index: first_index + r,
                chunk: c,
                pos: j,
                token_id: next,
                token: pieces.get(vocab, next),
                a: SideAt {
                    prob: logprob.exp(),
                    logprob,
                    entropy: dist.entropy,
                    k_used: dist.k_used,
                    candidates: candidates_out(&dist, vocab, pieces),
                },
                b: Vec::new(),
            }
        })
        .collect())
}

/// Per-row numbers of one B against A.
struct RowB {
    logprob: f64,
    kld: f64,
    rank_of_a_top1: usize,
    dist: Distribution,
}

/// Adds B's view of one chunk to its `positions` (made by [`a_positions`] from `la`): B's
/// distribution and KL(A‖B) and the rest, from both sides' logits rows; `lens` holds each
/// row's lens numbers with `--lens`.
#[allow(clippy::too_many_arguments)]
pub fn add_b(
    la: &Array2<f32>,
    lb: &Array2<f32>,
    chunk: &Chunk,
    positions: &mut [Position],
    b_label: &str,
    probe: &ProbeConfig,
    vocab: &dyn Vocab,
    pieces: &mut Pieces,
    lens: Option<Vec<LensRow>>,
) -> anyhow::Result<()> {
    let n_vocab = la.ncols();
    let first = chunk.first;
    let c = positions.first().map_or(0, |p| p.chunk);
    let rows_b = par_rows(positions.len(), probe, |prober, r| {
        let j = first + r;
        let (xa, xb) = (row(la, r, n_vocab), row(lb, r, n_vocab));
        let next = chunk.ids[j + 1];
        let dist = prober
            .describe(xb, 1.0, next)
            .map_err(|e| anyhow::anyhow!("{b_label} at chunk {c} position {j}: {e}"))?;
        let top1_a = positions[r].a.candidates.first().map_or(0, |c| c.token_id);
        Ok(RowB {
            logprob: dist.selected_logprob,
            kld: stats::kl_divergence(xa, xb),
            rank_of_a_top1: 1 + crate::dist::kernels::count_greater(xb, xb[top1_a as usize]),
            dist,
        })
    })?;
    let mut lens = lens.map(Vec::into_iter);
    for (pos, rb) in positions.iter_mut().zip(rows_b) {
        let (lens_kld, lens_top1_same) = match lens.as_mut().and_then(Iterator::next) {
            Some((k, s)) => (Some(k), Some(s)),
            None => (None, None),
        };
        let top1_a = pos.a.candidates.first().map_or(0, |c| c.token_id);
        let top1_b = rb.dist.candidates.first().map_or(0, |c| c.token_id);
        let inter = pos
            .a
            .candidates
            .iter()
            .filter(|x| rb.dist.candidates.iter().any(|y| y.token_id == x.token_id))
            .count();
        let union = pos.a.candidates.len() + rb.dist.candidates.len() - inter;
        let prob = rb.logprob.exp();
        pos.b.push(BAt {
            prob,
            logprob: rb.logprob,
            entropy: rb.dist.entropy,
            k_used: rb.dist.k_used,
            candidates: candidates_out(&rb.dist, vocab, pieces),
            kld: rb.kld,
            delta_p: prob - pos.a.prob,
            top1_same: top1_b == top1_a,
            b_rank_of_a_top1: rb.rank_of_a_top1,
            delta_entropy: rb.dist.entropy - pos.a.entropy,
            jaccard: if union == 0 {
                1.0
            } else {
                inter as f64 / union as f64
            },
            lens_kld,
            lens_top1_same,
        });
    }
    Ok(())
}

/// Scores every chunk with A once and with each B, and compares them position by position.
///
/// `progress` is called with the number of positions finished after each chunk.
pub fn compare_chunks(
    a: &mut dyn LogitSource,
    bs: &mut [Box<dyn LogitSource>],
    chunks: &[Chunk],
    probe: &ProbeConfig,
    lens: Option<&LensCompare>,
    timing: &mut Timing,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<Position>> {
    let numbered: Vec<(usize, &Chunk)> = chunks.iter().enumerate().collect();
    compare_some_chunks(a, bs, &numbered, 0, probe, lens, timing, progress)
}

/// The global index of the first scored position of each chunk: positions are numbered
/// over all chunks in order, so a shard that scores some of them numbers its positions as
/// a run over all would.
pub fn first_indices(chunks: &[Chunk]) -> Vec<usize> {
    chunks
        .iter()
        .scan(0, |next, c| {
            let first = *next;
            *next += c.scored();
            Some(first)
        })
        .collect()
}

/// [`compare_chunks`] of chunks given with their numbers; positions are numbered from
/// `first_index` on.
#[allow(clippy::too_many_arguments)]
pub fn compare_some_chunks(
    a: &mut dyn LogitSource,
    bs: &mut [Box<dyn LogitSource>],
    chunks: &[(usize, &Chunk)],
    first_index: usize,
    probe: &ProbeConfig,
    lens: Option<&LensCompare>,
    timing: &mut Timing,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Vec<Position>> {
    let n_vocab = a.info().n_vocab;
    let mut pieces_a = Pieces::default();
    let mut pieces_b: Vec<Pieces> = bs.iter().map(|_| Pieces::default()).collect();
    if timing.score_b_s.len() != bs.len() {
        timing.score_b_s = vec![0.0; bs.len()];
    }
    let mut positions = Vec::with_capacity(chunks.iter().map(|(_, c)| c.scored()).sum());
    for &(c, chunk) in chunks {
        if chunk.scored() == 0 {
            continue;
        }
        let t = Instant::now();
        // Rows of the scored half only; row r is position first + r.
        let la = a.score_from(&chunk.ids, chunk.first)?;
        let captured_a = a.take_captured();
        timing.score_a_s += t.elapsed().as_secs_f64();
        timing.tokens_evaluated += chunk.ids.len();
        check_shape("A", &la, chunk, n_vocab)?;

        let t = Instant::now();
        let n_rows = chunk.scored();
        let mut here = a_positions(
            &la,
            c,
            chunk,
            first_index + positions.len(),
            probe,
            &*a,
            &mut pieces_a,
        )?;
        timing.metrics_s += t.elapsed().as_secs_f64();

        let n_b = bs.len();
        for (bi, b) in bs.iter_mut().enumerate() {
            let t = Instant::now();
            let lb = b.score_from(&chunk.ids, chunk.first)?;
            let captured_b = b.take_captured();
            timing.score_b_s[bi] += t.elapsed().as_secs_f64();
            check_shape("B", &lb, chunk, n_vocab)?;
            let t = Instant::now();
            let lens_rows = match lens {
                Some(lc) => Some(lens_rows(
                    lc,
                    bi,
                    &captured_a,
                    &captured_b,
                    n_rows,
                    chunk.ids.len() - chunk.first,
                )?),
                None => None,
            };
            add_b(
                &la,
                &lb,
                chunk,
                &mut here,
                &b_name(bi, n_b),
                probe,
                &**b,
                &mut pieces_b[bi],
                lens_rows,
            )?;
            timing.metrics_s += t.elapsed().as_secs_f64();
        }
        positions.extend(here);
        progress(n_rows as u64);
    }
    timing.positions_scored += positions.len();
    Ok(positions)
}

/// One scored row's lens KL(A‖B) and top-1 agreement, per lens layer.
pub type LensRow = (Vec<f64>, Vec<bool>);

/// Each scored row's lens KL(A‖B) and top-1 agreement per lens layer, from both sides'
/// captured layer outputs, the rows split across the CPU's threads.
fn lens_rows(
    lc: &LensCompare,
    bi: usize,
    captured_a: &[logitprobe_backends::Captured],
    captured_b: &[logitprobe_backends::Captured],
    n_rows: usize,
    n_logits_rows: usize,
) -> anyhow::Result<Vec<LensRow>> {
    anyhow::ensure!(
        captured_a.len() == n_logits_rows && captured_b.len() == n_logits_rows,
        "the lens captured {} and {} rows for {n_logits_rows} logits rows",
        captured_a.len(),
        captured_b.len()
    );
    let hidden = |c: &logitprobe_backends::Captured| -> anyhow::Result<ndarray::Array2<f32>> {
        c.hidden
            .clone()
            .context("the engine captured no layer outputs for the lens")
    };
    let head_b = &lc.heads_b[bi];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n_rows)
        .max(1);
    let per = n_rows.div_ceil(threads);
    let parts: Vec<anyhow::Result<Vec<LensRow>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(n_rows))
                        .map(|r| {
                            let xa = lc.head_a.logits(hidden(&captured_a[r])?.view());
                            let xb = head_b.logits(hidden(&captured_b[r])?.view());
                            let mut kld = Vec::with_capacity(lc.layers.len());
                            let mut same = Vec::with_capacity(lc.layers.len());
                            for (ra, rb) in xa.outer_iter().zip(xb.outer_iter()) {
                                let (ra, rb) = (
                                    ra.to_slice().expect("standard layout"),
                                    rb.to_slice().expect("standard layout"),
                                );
                                kld.push(stats::kl_divergence(ra, rb));
                                same.push(argmax(ra) == argmax(rb));
                            }
                            Ok((kld, same))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("lens thread panicked"))
            .collect()
    });
    let mut out = Vec::with_capacity(n_rows);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// The first index of the largest entry.
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// llama-perplexity's statistics of B number `bi` against A.
pub fn summarize(positions: &[Position], bi: usize, label: &str) -> Summary {
    let n = positions.len();
    let lp_a: Vec<f64> = positions.iter().map(|p| p.a.logprob).collect();
    let lp_b: Vec<f64> = positions.iter().map(|p| p.b[bi].logprob).collect();
    let nll_a: Vec<f64> = lp_a.iter().map(|v| -v).collect();
    let nll_b: Vec<f64> = lp_b.iter().map(|v| -v).collect();
    let (mean_a, err_a) = stats::mean_stderr(&nll_a);
    let (mean_b, err_b) = stats::mean_stderr(&nll_b);
    let diff: Vec<f64> = lp_a.iter().zip(&lp_b).map(|(a, b)| a - b).collect();
    let (ln_ratio, ln_ratio_err) = stats::mean_stderr(&diff);
    let kld: Vec<f64> = positions.iter().map(|p| p.b[bi].kld).collect();
    let dp: Vec<f64> = positions.iter().map(|p| p.b[bi].delta_p).collect();
    let dp2: Vec<f64> = dp.iter().map(|v| v * v).collect();
    let (ms, ms_err) = stats::mean_stderr(&dp2);
    let rms = ms.sqrt();
    let same = positions.iter().filter(|p| p.b[bi].top1_same).count() as f64 / n.max(1) as f64;
    let ppl_a = mean_a.exp();
    let ppl_b = mean_b.exp();
    let ratio = ln_ratio.exp();
    Summary {
        label: label.to_string(),
        positions: n,
        ppl_a,
        ppl_a_err: ppl_a * err_a,
        ppl_b,
        ppl_b_err: ppl_b * err_b,
        cor_ln_ppl: stats::correlation(&lp_a, &lp_b),
        ln_ppl_ratio: ln_ratio,
        ln_ppl_ratio_err: ln_ratio_err,
        ppl_ratio: ratio,
        ppl_ratio_err: ratio * ln_ratio_err,
        kld: Spread::of(&kld),
        delta_p: Spread::of(&dp),
        rms_delta_p: rms,
        // d√x = dx / (2√x)
        rms_delta_p_err: if rms > 0.0 { ms_err / (2.0 * rms) } else { 0.0 },
        same_top_p: same,
        same_top_p_err: if n > 1 {
            (same * (1.0 - same) / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        },
        b_tokens: None,
        tokenizer_positions_differ: None,
        lens: None,
    }
}

/// Six decimals as llama-perplexity prints them, or three significant digits for values that
/// would print as 0.000000 (the tiny differences between two engines on one model).
fn num(v: f64) -> String {
    if v != 0.0 && v.abs() < 5e-6 {
        format!("{v:.3e}")
    } else {
        format!("{v:.6}")
    }
}

/// The summary as llama-perplexity prints it, one column per B.
pub fn summary_table(report: &CompareReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "A:  {}", report.a.description);
    for (i, b) in report.b.iter().enumerate() {
        let _ = writeln!(out, "{}: {}", b_name(i, report.b.len()), b.description);
    }
    let _ = writeln!(out, "input: {}", report.input.description);
    let _ = writeln!(out);
    let s = &report.summaries;
    let w = 28;
    let _ = write!(out, "{:<26}", "");
    for i in 0..s.len() {
        let _ = write!(out, "{:>w$}", b_name(i, s.len()));
    }
    let _ = writeln!(out);
    // One space before every cell, however wide: two wide cells never run together.
    let mut row = |name: &str, f: &dyn Fn(&Summary) -> String| {
        let _ = write!(out, "{name:<26}");
        for x in s {
            let _ = write!(out, " {:>1$}", f(x), w - 1);
        }
        let _ = writeln!(out);
    };
    row("positions", &|x| x.positions.to_string());
    row("PPL(A)", &|x| {
        format!("{:.4} ± {:.4}", x.ppl_a, x.ppl_a_err)
    });
    row("PPL(B)", &|x| {
        format!("{:.4} ± {:.4}", x.ppl_b, x.ppl_b_err)
    });
    row("Cor(ln PPL(B), ln PPL(A))", &|x| {
        format!("{:.2}%", 100.0 * x.cor_ln_ppl)
    });
    row("ln(PPL(B)/PPL(A))", &|x| {
        format!("{:.6} ± {:.6}", x.ln_ppl_ratio, x.ln_ppl_ratio_err)
    });
    row("PPL(B)/PPL(A)", &|x| {
        format!("{:.6} ± {:.6}", x.ppl_ratio, x.ppl_ratio_err)
    });
    row("PPL(B)-PPL(A)", &|x| {
        let (d, e) = x.ppl_difference();
        format!("{d:.6} ± {e:.6}")
    });
    row("Mean KLD", &|x| {
        format!("{} ± {}", num(x.kld.mean), num(x.kld.stderr))
    });
    if let Some(f) = &report.noise_floor {
        // The same for every B: A against itself along the other kernels.
        let floor = &f.summary;
        row("  noise floor (A vs A)", &|_| {
            format!("{} ± {}", num(floor.kld.mean), num(floor.kld.stderr))
        });
    }
    for i in 0..11 {
        let name = format!("{} KLD", s[0].kld.rows()[i].0);
        row(&name, &|x| num(x.kld.rows()[i].1));
    }
    row("Mean Δp", &|x| {
        format!(
            "{:.3} ± {:.3} %",
            100.0 * x.delta_p.mean,
            100.0 * x.delta_p.stderr
        )
    });
    // Δp is printed in percent as llama-perplexity does, with its quartiles.
    for i in 0..13 {
        let name = format!("{} Δp", s[0].delta_p.rows_with_quartiles()[i].0);
        row(&name, &|x| {
            format!("{:.3}%", 100.0 * x.delta_p.rows_with_quartiles()[i].1)
        });
    }
    row("RMS Δp", &|x| {
        format!(
            "{:.3} ± {:.3} %",
            100.0 * x.rms_delta_p,
            100.0 * x.rms_delta_p_err
        )
    });
    row("Same top p", &|x| {
        format!(
            "{:.3} ± {:.3} %",
            100.0 * x.same_top_p,
            100.0 * x.same_top_p_err
        )
    });
    if s.iter().any(|x| x.tokenizer_positions_differ.is_some()) {
        row(
            "B's own tokens differ at",
            &|x| match (x.tokenizer_positions_differ, x.b_tokens) {
                (Some(d), Some(n)) => format!("{d} of {n}"),
                _ => "–".into(),
            },
        );
    }
    if let Some(layers) = &report.lens_layers {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "logit lens, per layer: mean KLD(A‖B) of the lens distributions ± error, and same lens top-1"
        );
        for (l, layer) in layers.iter().enumerate() {
            let name = format!("layer {layer}");
            let _ = write!(out, "{name:<26}");
            for x in s {
                let cell = match x.lens.as_ref().and_then(|v| v.get(l)) {
                    Some(ls) => format!(
                        "{} ± {} {:>5.1}%",
                        num(ls.kld.mean),
                        num(ls.kld.stderr),
                        100.0 * ls.same_top1
                    ),
                    None => "–".into(),
                };
                let _ = write!(out, "{cell:>w$}");
            }
            let _ = writeln!(out);
        }
    }
    out
}

/// The ladder as a table: one row per B, smallest first.
pub fn ladder_table(report: &CompareReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<4} {:<34} {:>9} {:>6} {:>20} {:>11} {:>11} {:>9} {:>8} {:>7}",
        "",
        "model",
        "size",
        "bpw",
        "PPL(B)/PPL(A)",
        "mean KLD",
        "99% KLD",
        "same top",
        "RMS Δp",
        "flips"
    );
    for r in crate::report::ladder_rows(report) {
        let _ = writeln!(
            out,
            "{:<4} {:<34} {:>9} {:>6} {:>20} {:>11} {:>11} {:>8.2}% {:>7.3}% {:>6.2}%",
            r.name,
            r.model,
            r.bytes.map_or("–".into(), logitprobe_backends::human_bytes),
            r.bits_per_weight.map_or("–".into(), |b| format!("{b:.2}")),
            format!("{:.5} ± {:.5}", r.ppl_ratio, r.ppl_ratio_err),
            num(r.kld_mean),
            num(r.kld_p99),
            100.0 * r.same_top_p,
            100.0 * r.rms_delta_p,
            100.0 * r.flips
        );
    }
    if let Some(f) = &report.noise_floor {
        let x = &f.summary;
        let _ = writeln!(
            out,
            "noise floor: {}: mean KLD {}, 99% KLD {}, same top {:.2}%, RMS Δp {:.3}%",
            f.path,
            num(x.kld.mean),
            num(x.kld.p99),
            100.0 * x.same_top_p,
            100.0 * x.rms_delta_p
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppl_difference_uses_the_covariance() {
        let mut s = summarize(&[], 0, "B");
        (s.ppl_a, s.ppl_b, s.ppl_a_err, s.ppl_b_err) = (10.0, 11.0, 0.3, 0.4);
        s.cor_ln_ppl = 0.0;
        let (d, e) = s.ppl_difference();
        assert!((d - 1.0).abs() < 1e-12 && (e - 0.5).abs() < 1e-12);
        s.cor_ln_ppl = 1.0;
        assert!(
            (s.ppl_difference().1 - 0.1).abs() < 1e-12,
            "fully correlated: |0.4 - 0.3|"
        );
    }

    #[test]
    fn one_position_summaries_survive_a_json_round_trip() {
        // One position: every standard error is NaN, which JSON writes as null.
        let p = Position {
            index: 0,
            chunk: 0,
            pos: 0,
            token_id: 1,
            token: "a".into(),
            a: SideAt {
                prob: 0.5,
                logprob: 0.5f64.ln(),
                entropy: 1.0,
                k_used: 1,
                candidates: vec![],
            },
            b: vec![BAt {
                prob: 0.0,
                logprob: f64::NEG_INFINITY,
                entropy: 1.0,
                k_used: 1,
                candidates: vec![],
                kld: f64::INFINITY,
                delta_p: -0.5,
                top1_same: false,
                b_rank_of_a_top1: 2,
                delta_entropy: 0.0,
                jaccard: 0.0,
                lens_kld: Some(vec![0.25, f64::INFINITY]),
                lens_top1_same: Some(vec![true, false]),
            }],
        };
        let s = summarize(std::slice::from_ref(&p), 0, "B");
        let lens = summarize_lens(std::slice::from_ref(&p), 0, &[3, 7]).unwrap();
        assert_eq!((lens[0].layer, lens[1].layer), (3, 7));
        assert_eq!(lens[0].kld.mean, 0.25);
        assert_eq!((lens[0].same_top1, lens[1].same_top1), (1.0, 0.0));
        assert!(s.kld.stderr.is_nan());
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(back.kld.stderr.is_nan() && back.same_top_p_err.is_nan());
        let back: Position = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert!(back.b[0].kld.is_nan() && back.b[0].logprob.is_nan());
        let lens_back = back.b[0].lens_kld.as_ref().unwrap();
        assert!(lens_back[0] == 0.25 && lens_back[1].is_nan());
    }
}
