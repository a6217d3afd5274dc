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
use ndarray::Array2;
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

/// Where a B's pass reads A's rows: a reference, or a llama-perplexity base file.
pub trait ARows {
    fn n_vocab(&self) -> usize;
    /// A's logits over chunk `c`'s scored positions (`[scored, n_vocab]`).
    fn logits(&mut self, c: usize) -> anyhow::Result<Array2<f32>>;
    /// A's numbers of the chunk read last where the source keeps its own, over the ones
    /// derived from [`ARows::logits`]; called once per chunk, when its positions are made.
    fn own_a_numbers(&self, _positions: &mut [Position]) {}
    /// The same for each B's statistics of the chunk read last, once B's view is added.
    fn own_b_numbers(&self, _logits_b: &Array2<f32>, _positions: &mut [Position]) {}
}

impl ARows for ReferenceReader {
    fn n_vocab(&self) -> usize {
        self.manifest.vocab.n_vocab
    }
    fn logits(&mut self, c: usize) -> anyhow::Result<Array2<f32>> {
        ReferenceReader::logits(self, c)
    }
}

/// A llama-perplexity `--kl-divergence-base` file as A. KL, Δp, same top and A's
/// log-probability of each next token are llama-perplexity's own ([`kld_base::compare_row`]:
/// its formulas and float precisions over the 16-bit rows), so its tables are reproduced;
/// the rest (entropies, candidates) reads the decoded rows.
pub struct BaseRows<'a> {
    pub base: &'a mut KldBase,
    /// The rows of the chunk read last.
    rows: Vec<kld_base::BaseRow>,
}

impl<'a> BaseRows<'a> {
    pub fn new(base: &'a mut KldBase) -> Self {
        BaseRows {
            base,
            rows: Vec::new(),
        }
    }
}

impl ARows for BaseRows<'_> {
    fn n_vocab(&self) -> usize {
        self.base.n_vocab()
    }
    fn logits(&mut self, c: usize) -> anyhow::Result<Array2<f32>> {
        self.rows = self.base.chunk_rows(c)?;
        let mut la = Array2::zeros((self.rows.len(), self.n_vocab()));
        for (mut dst, r) in la.outer_iter_mut().zip(&self.rows) {
            for (i, v) in dst.iter_mut().enumerate() {
                *v = r.logprob(i);
            }
        }
        Ok(la)
    }
    fn own_a_numbers(&self, positions: &mut [Position]) {
        for (p, r) in positions.iter_mut().zip(&self.rows) {
            let lp = r.logprob(p.token_id as usize);
            p.a.logprob = f64::from(lp);
            p.a.prob = f64::from(lp.exp());
        }
    }
    fn own_b_numbers(&self, logits_b: &Array2<f32>, positions: &mut [Position]) {
        let width = logits_b.ncols();
        let lb = logits_b.as_slice().expect("standard layout");
        for (r, p) in positions.iter_mut().enumerate() {
            let s =
                kld_base::compare_row(&self.rows[r], &lb[r * width..(r + 1) * width], p.token_id);
            let at = p.b.last_mut().expect("just added");
            at.kld = s.kld;
            at.top1_same = s.same_top;
            at.delta_p = f64::from(s.p_diff);
        }
    }
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
    /// A's rows from `a`. `per_chunk` holds one entry of positions per chunk: the first B
    /// makes them (A's view of each position, named with B's vocabulary, which is A's),
    /// every B adds its own view. `progress` gets the positions finished per chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        b: &mut dyn LogitSource,
        bi: usize,
        b_label: &str,
        a: &mut dyn ARows,
        per_chunk: &mut Vec<Vec<Position>>,
        timing: &mut Timing,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<()> {
        if timing.score_b_s.len() <= bi {
            timing.score_b_s.resize(bi + 1, 0.0);
        }
        let n_vocab = a.n_vocab();
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
            let la = a.logits(c)?;
            check_shape("A's rows", &la, chunk, n_vocab)?;
            if per_chunk.len() <= k {
                let mut made = a_positions(
                    &la,
                    c,
                    chunk,
                    self.firsts[c],
                    self.probe,
                    &*b,
                    &mut pieces_a,
                )?;
                a.own_a_numbers(&mut made);
                per_chunk.push(made);
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
            a.own_b_numbers(&lb, &mut per_chunk[k]);
            timing.metrics_s += t.elapsed().as_secs_f64();
            progress(chunk.scored() as u64);
        }
        Ok(())
    }
}
