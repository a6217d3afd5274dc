//! A deterministic in-memory [`LogitSource`] for tests, demos and benchmarks.
//!
//! Its logits are pseudo-random but a pure function of the sequence's token history (and the
//! seed), so batching, KV caching and teacher-forced scoring can be checked exactly against
//! each other, the way a real engine should behave. Rows look like a language model's: Gumbel
//! noise with a few dominant tokens that favour printable text.
//!
//! Its tokenizer is byte-level: ids 0–255 are bytes, then `<s>` (BOS), `</s>` (EOS),
//! `<|im_start|>` and `<|im_end|>`. Logit columns past those (when `n_vocab > 260`) have no
//! piece, like the padded columns of Qwen2.5.

use crate::{LogitSource, ModelInfo, TokenId, Vocab};
use ndarray::Array2;

pub const BOS: TokenId = 256;
pub const EOS: TokenId = 257;
pub const IM_START: TokenId = 258;
pub const IM_END: TokenId = 259;
const SPECIALS: [&str; 4] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"];
/// Ids the tokenizer defines.
pub const TOKENIZER_VOCAB: usize = 260;

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// See the module docs.
pub struct TestSource {
    info: ModelInfo,
    seed: u64,
    seqs: Vec<Vec<TokenId>>,
    /// Probability-ish weight of EOS among the dominant tokens; 0 never ends early.
    eos_bias: f32,
}

impl TestSource {
    /// A source with `n_vocab` logit columns (at least 260) and logits keyed by `seed`.
    pub fn new(n_vocab: usize, seed: u64) -> Self {
        assert!(
            n_vocab >= TOKENIZER_VOCAB,
            "the test source needs n_vocab >= {TOKENIZER_VOCAB}"
        );
        let mut details = serde_json::Map::new();
        details.insert("seed".into(), seed.into());
        TestSource {
            info: ModelInfo {
                name: format!("test-source-v{n_vocab}-s{seed}"),
                engine: "test".into(),
                engine_version: env!("CARGO_PKG_VERSION").into(),
                device: "cpu".into(),
                n_vocab,
                tokenizer_vocab: TOKENIZER_VOCAB,
                n_ctx: 4096,
                bos: Some(BOS),
                eos: Some(EOS),
                eog: vec![EOS, IM_END],
                add_bos: false,
                logits_dtype: "float32".into(),
                details,
            },
            seed,
            seqs: Vec::new(),
            eos_bias: -1.0,
        }
    }

    /// Makes EOS more (or less) likely; the default ends most runs within a few hundred steps.
    pub fn with_eos_bias(mut self, bias: f32) -> Self {
        self.eos_bias = bias;
        self
    }

    /// Sets the context length the source reports and enforces.
    pub fn with_n_ctx(mut self, n_ctx: usize) -> Self {
        self.info.n_ctx = n_ctx;
        self
    }

    /// The logits row that follows `history`.
    pub fn logits_after(&self, history: &[TokenId], out: &mut [f32]) {
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for &t in history {
            h = splitmix(h ^ u64::from(t));
        }
        let mut state = h;
        for (i, o) in out.iter_mut().enumerate() {
            if i >= TOKENIZER_VOCAB {
                *o = -30.0;
                continue;
            }
            state = splitmix(state);
            // Gumbel noise: -ln(-ln u), u in (0, 1).
            let u = ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let gumbel = (-(-u.ln()).ln()) as f32;
            // Control bytes and lone UTF-8 bytes are rare in text.
            let printable = (32..127).contains(&i) || i == 10;
            *o = if printable { gumbel } else { gumbel - 4.0 };
        }
        // A few dominant candidates among printable ASCII, as real LM rows have.
        let mut s = h;
        for boost in [6.0f32, 4.5, 3.5, 3.0] {
            s = splitmix(s);
            // Lowercase letters and space, the bulk of English text.
            let id = match s % 27 {
                26 => 32,
                c => 97 + c as usize,
            };
            out[id] += boost;
        }
        out[EOS as usize] += 4.0 + self.eos_bias;
        out[IM_END as usize] -= 2.0;
        out[BOS as usize] -= 6.0;
        out[IM_START as usize] -= 6.0;
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Vocab for TestSource {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> anyhow::Result<Vec<TokenId>> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if add_bos {
            ids.push(BOS);
        }
        let mut rest = text;
        'outer: while !rest.is_empty() {
            if parse_special {
                for (k, sp) in SPECIALS.iter().enumerate() {
                    if let Some(r) = rest.strip_prefix(sp) {
                        ids.push(BOS + k as TokenId);
                        rest = r;
                        continue 'outer;
                    }
                }
            }
            let c = rest.chars().next().expect("non-empty");
            let mut buf = [0u8; 4];
            ids.extend(c.encode_utf8(&mut buf).bytes().map(TokenId::from));
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        match id {
            0..=255 => Some(vec![id as u8]),
            256..=259 => Some(SPECIALS[(id - BOS) as usize].as_bytes().to_vec()),
            _ => None,
        }
    }

    fn is_special(&self, id: TokenId) -> bool {
        (BOS..=IM_END).contains(&id)
    }

    fn chat_template(&self) -> Option<String> {
        Some(CHATML.to_string())
    }
}

impl LogitSource for TestSource {
    fn begin(&mut self, n_slots: usize) -> anyhow::Result<()> {
        crate::check_slots(n_slots)?;
        self.seqs = vec![Vec::new(); n_slots];
        Ok(())
    }

    fn clear_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        self.seqs
            .get_mut(slot)
            .ok_or_else(|| anyhow::anyhow!("clear_slot: slot {slot} was not made by begin()"))?
            .clear();
        Ok(())
    }

    fn decode_rows(
        &mut self,
        batch: &[(usize, &[TokenId])],
        every_position: &[bool],
    ) -> anyhow::Result<Array2<f32>> {
        let n_vocab = self.info.n_vocab;
        let mut out = Array2::zeros((crate::rows_of(batch, every_position), n_vocab));
        let mut row = 0;
        for (entry, &(seq, tokens)) in batch.iter().enumerate() {
            let every = every_position.get(entry).copied().unwrap_or(false);
            anyhow::ensure!(!tokens.is_empty(), "decode: sequence {seq} got no tokens");
            let n_ctx = self.info.n_ctx;
            let hist = self.seqs.get_mut(seq).ok_or_else(|| {
                anyhow::anyhow!("decode: sequence {seq} was not started with begin()")
            })?;
            if hist.len() + tokens.len() > n_ctx {
                return Err(crate::Error::ContextFull {
                    what: format!("sequence {seq}"),
                    needed: hist.len() + tokens.len(),
                    n_ctx,
                }
                .into());
            }
            let before = hist.len();
            hist.extend_from_slice(tokens);
            let hist = hist.clone();
            let first = if every { before + 1 } else { hist.len() };
            for end in first..=hist.len() {
                self.logits_after(
                    &hist[..end],
                    out.row_mut(row).as_slice_mut().expect("standard layout"),
                );
                row += 1;
            }
        }
        Ok(out)
    }

    fn score_from(&mut self, tokens: &[TokenId], first: usize) -> anyhow::Result<Array2<f32>> {
        let first = first.min(tokens.len());
        let mut out = Array2::zeros((tokens.len() - first, self.info.n_vocab));
        for i in first..tokens.len() {
            self.logits_after(
                &tokens[..=i],
                out.row_mut(i - first)
                    .as_slice_mut()
                    .expect("standard layout"),
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_matches_score_and_batching() {
        let mut s = TestSource::new(300, 1);
        let a = s.tokenize("abc", false, false).unwrap();
        let b = s.tokenize("<|im_start|>x", false, true).unwrap();
        assert_eq!(b, vec![IM_START, b'x' as TokenId]);
        s.begin(2).unwrap();
        let both = s.decode(&[(0, &a), (1, &b)]).unwrap();
        let scored = s.score(&a).unwrap();
        assert_eq!(both.row(0), scored.row(2));
        s.begin(1).unwrap();
        let one = s.decode(&[(0, &b)]).unwrap();
        assert_eq!(both.row(1), one.row(0));
        // KV cache: one more token equals scoring the longer history.
        let step = s.decode(&[(0, &[b'y' as TokenId])]).unwrap();
        let scored = s
            .score(&[IM_START, b'x' as TokenId, b'y' as TokenId])
            .unwrap();
        assert_eq!(step.row(0), scored.row(2));
    }

    #[test]
    fn padding_ids_have_no_piece() {
        let s = TestSource::new(300, 1);
        assert_eq!(s.token_bytes(299), None);
        assert_eq!(s.token_bytes(65), Some(b"A".to_vec()));
    }
}
