//! Each B against A's reference, one model in memory at a time: the way a quantization
//! ladder of an 8B model fits a laptop. The numbers are those of scoring A and B side by
//! side ([`super::compare_chunks`]): A's logits come back from the reference exactly.

use super::kld_base::{self, KldBase};
use super::reference::ReferenceReader;
use super::{a_positions, add_b, check_shape, Chunk, Position, Timing};
use crate::dist::probe::ProbeConfig;
use crate::schema::compare::VocabDigest;
use crate::text::Pieces;
use logitprobe_backends::{LogitSource, Vocab};
use std::time::Instant;

/// Refuses a B whose vocabulary is not the one A's reference rows are over.
pub fn check_vocab_pieces(
    a: &VocabDigest,
    pieces: &[Option<Vec<u8>>],
    b: &dyn Vocab,
    b_label: &str,
) -> anyhow::Result<()> {
    super::check_vocab_of(
        a.n_vocab,
        pieces.len(),
        &|id| pieces.get(id as usize).cloned().flatten(),
        b,
        b_label,
    )
}

/// One B's pass over the chunks.
pub struct BPass<'a> {
    /// The chunks compared, with their numbers in the input.
    pub chunks: &'a [(usize, &'a Chunk)],
    /// The global index of each chunk's first scored position, by chunk number.
    pub firsts: &'a [usize],
    pub probe: &'a ProbeConfig,
}

impl BPass<'_> {
    /// Scores every chunk with `b` (B number `bi`, labelled `b_label`) and compares it with
    /// A's rows from `reference`. `per_chunk` holds one entry of positions per chunk: the
    /// first B makes them (A's view of each position, named with B's vocabulary, which is
    /// A's), every B adds its own view. `progress` gets the positions finished per chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        b: &mut dyn LogitSource,
        bi: usize,
        b_label: &str,
        reference: &mut ReferenceReader,
        per_chunk: &mut Vec<Vec<Position>>,
        timing: &mut Timing,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<()> {
        if timing.score_b_s.len() <= bi {
            timing.score_b_s.resize(bi + 1, 0.0);
        }
        let n_vocab = reference.manifest.vocab.n_vocab;
        let (mut pieces_a, mut pieces_b) = (Pieces::default(), Pieces::default());
        for (k, &(c, chunk)) in self.chunks.iter().enumerate() {
            if chunk.scored() == 0 {
                if per_chunk.len() <= k {
                    per_chunk.push(Vec::new());
                }
                continue;
            }
            let t = Instant::now();
            let lb = b.score_from(&chunk.ids, chunk.first)?;
            timing.score_b_s[bi] += t.elapsed().as_secs_f64();
            check_shape(b_label, &lb, chunk, n_vocab)?;
            let t = Instant::now();
            let la = reference.logits(c)?;
            check_shape("A's reference", &la, chunk, n_vocab)?;
            if per_chunk.len() <= k {
                per_chunk.push(a_positions(
                    &la,
                    c,
                    chunk,
                    self.firsts[c],
                    self.probe,
                    &*b,
                    &mut pieces_a,
                )?);
            }
            add_b(
                &la,
                &lb,
                chunk,
                &mut per_chunk[k],
                b_label,
                self.probe,
                &*b,
                &mut pieces_b,
                None,
            )?;
            timing.metrics_s += t.elapsed().as_secs_f64();
            progress(chunk.scored() as u64);
        }
        Ok(())
    }
}

impl BPass<'_> {
    /// [`BPass::run`] with A's rows from a llama-perplexity `--kl-divergence-base` file: KL,
    /// Δp, same top and A's log-probability of each next token are llama-perplexity's own
    /// ([`kld_base::compare_row`]: its formulas and float precisions over the 16-bit rows),
    /// so its tables are reproduced; the rest (entropies, candidates) reads the decoded rows.
    #[allow(clippy::too_many_arguments)]
    pub fn run_against_base(
        &self,
        b: &mut dyn LogitSource,
        bi: usize,
        b_label: &str,
        base: &mut KldBase,
        per_chunk: &mut Vec<Vec<Position>>,
        timing: &mut Timing,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<()> {
        if timing.score_b_s.len() <= bi {
            timing.score_b_s.resize(bi + 1, 0.0);
        }
        let n_vocab = base.n_vocab();
        let (mut pieces_a, mut pieces_b) = (Pieces::default(), Pieces::default());
        for (k, &(c, chunk)) in self.chunks.iter().enumerate() {
            let t = Instant::now();
            let lb = b.score_from(&chunk.ids, chunk.first)?;
            timing.score_b_s[bi] += t.elapsed().as_secs_f64();
            check_shape(b_label, &lb, chunk, n_vocab)?;
            let t = Instant::now();
            let rows = base.chunk_rows(c)?;
            let mut la = ndarray::Array2::zeros((rows.len(), n_vocab));
            for (mut dst, r) in la.outer_iter_mut().zip(&rows) {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = r.logprob(i);
                }
            }
            if per_chunk.len() <= k {
                let mut here = a_positions(
                    &la,
                    c,
                    chunk,
                    self.firsts[c],
                    self.probe,
                    &*b,
                    &mut pieces_a,
                )?;
                for (p, r) in here.iter_mut().zip(&rows) {
                    let lp = r.logprob(p.token_id as usize);
                    p.a.logprob = f64::from(lp);
                    p.a.prob = f64::from(lp.exp());
                }
                per_chunk.push(here);
            }
            let positions = &mut per_chunk[k];
            add_b(
                &la,
                &lb,
                chunk,
                positions,
                b_label,
                self.probe,
                &*b,
                &mut pieces_b,
                None,
            )?;
            let width = lb.ncols();
            let lb = lb.as_slice().expect("standard layout");
            for (r, p) in positions.iter_mut().enumerate() {
                let s =
                    kld_base::compare_row(&rows[r], &lb[r * width..(r + 1) * width], p.token_id);
                let at = p.b.last_mut().expect("just added");
                at.kld = s.kld;
                at.top1_same = s.same_top;
                at.delta_p = f64::from(s.p_diff);
            }
            timing.metrics_s += t.elapsed().as_secs_f64();
            progress(chunk.scored() as u64);
        }
        Ok(())
    }
}
