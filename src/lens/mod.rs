//! Inside the model: the logit lens (each decoder layer's output read through the final norm
//! and the output head) and attention summaries, in Token Heatmap's trace shape.
//!
//! The engines capture the layer outputs and attention weights ([`CaptureSpec`]); this module
//! turns them into what the trace records, the same way for every engine:
//! - a lens layer's distribution is the softmax of its logits at temperature 1; its entropy
//!   is over the whole vocabulary, in nats (sums of the probe's vectorized f32 exponential,
//!   accumulated in f64); the selected token's rank is 1 + the number of tokens with a
//!   strictly larger logit; top-k ties go to the lower token id;
//! - an attention layer's numbers are means over the query heads of each head's entropy
//!   (nats), weight on the current position, weight on position 0, largest weight and
//!   induction weight (on the token after the last earlier occurrence of the current one);
//!   `top_positions` are the largest head-averaged weights. They are computed from the full
//!   weights (Token Heatmap's `--capture-full-attention`), not from each head's top-k.

use crate::text::Pieces;
use logitprobe_backends::{Architecture, CaptureSpec, LensHead, LogitSource, TokenId, Vocab};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Which decoder layers: every one, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Layers {
    #[default]
    All,
    List(Vec<usize>),
}

impl Layers {
    /// Token Heatmap's layer spec: `all`, or non-negative integers separated by commas.
    pub fn parse(s: &str) -> Result<Layers, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Layers::All);
        }
        let mut v = Vec::new();
        for piece in s.split(',') {
            let piece = piece.trim();
            if piece.is_empty() {
                return Err(format!("'{s}' has an empty layer; use all or e.g. 0,3,7"));
            }
            v.push(
                piece.parse::<usize>().map_err(|_| {
                    format!("'{piece}' is not a layer number; use all or e.g. 0,3,7")
                })?,
            );
        }
        v.sort_unstable();
        v.dedup();
        Ok(Layers::List(v))
    }

    /// The layers of a model of `n_layer` layers (a list is returned as given; the engine
    /// checks it).
    pub fn resolve(&self, n_layer: usize) -> Vec<usize> {
        match self {
            Layers::All => (0..n_layer).collect(),
            Layers::List(v) => v.clone(),
        }
    }
}

impl std::fmt::Display for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layers::All => f.write_str("all"),
            Layers::List(v) => {
                let s: Vec<String> = v.iter().map(ToString::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

/// What to look at inside the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InsideConfig {
    /// The logit lens at each step, on these layers with this many candidates.
    pub lens: Option<(Layers, usize)>,
    /// The lens over every prompt position too (`prompt_logit_lens`).
    pub lens_prompt: bool,
    /// Attention summaries at each step, on these layers with this many top positions.
    pub attention: Option<(Layers, usize)>,
}

impl InsideConfig {
    pub fn is_off(&self) -> bool {
        self.lens.is_none() && self.attention.is_none()
    }
}

/// An [`InsideConfig`] made ready on one engine: its layers resolved, capture turned on, the
/// lens head read.
#[derive(Debug, Clone)]
pub struct Inside {
    pub config: InsideConfig,
    pub arch: Architecture,
    pub lens_layers: Vec<usize>,
    pub attention_layers: Vec<usize>,
    pub head: Option<Arc<LensHead>>,
}

impl Inside {
    /// Turns capture on in `source` for `config` (before [`LogitSource::begin`]).
    pub fn prepare(source: &mut dyn LogitSource, config: &InsideConfig) -> anyhow::Result<Inside> {
        let arch = source
            .architecture()
            .ok_or(logitprobe_backends::Error::CaptureUnsupported {
                engine: source.info().engine.clone(),
            })?;
        let lens_layers = config
            .lens
            .as_ref()
            .map_or_else(Vec::new, |(l, _)| l.resolve(arch.n_layer));
        let attention_layers = config
            .attention
            .as_ref()
            .map_or_else(Vec::new, |(l, _)| l.resolve(arch.n_layer));
        let spec = CaptureSpec {
            hidden_layers: lens_layers.clone(),
            attention_layers: attention_layers.clone(),
            head_input: false,
            named: Vec::new(),
        };
        spec.check(arch.n_layer)?;
        // The head first: an architecture the lens does not know fails before the engine
        // rebuilds anything.
        let head = if config.lens.is_some() {
            Some(source.lens_head()?)
        } else {
            None
        };
        source.set_capture(&spec)?;
        Ok(Inside {
            config: config.clone(),
            arch,
            lens_layers,
            attention_layers,
            head,
        })
    }

    pub fn lens_top_k(&self) -> usize {
        self.config.lens.as_ref().map_or(0, |(_, k)| *k)
    }

    pub fn attention_top_k(&self) -> usize {
        self.config.attention.as_ref().map_or(0, |(_, k)| *k)
    }

    /// The trace's `attention_metadata`, when attention is captured.
    pub fn attention_metadata(&self) -> Option<AttentionMetadata> {
        (!self.attention_layers.is_empty()).then(|| AttentionMetadata {
            num_layers: self.arch.n_layer,
            num_attention_heads: self.arch.n_head,
            num_key_value_heads: self.arch.n_head_kv,
            head_dim: self.arch.head_dim,
            captured_layers: self.attention_layers.clone(),
        })
    }
}

/// One lens candidate (Token Heatmap's `LogitLensCandidate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LensCandidate {
    pub rank: usize,
    pub token_id: TokenId,
    pub token: String,
    pub prob: f64,
    pub logprob: f64,
}

/// One layer of a step's lens (Token Heatmap's `LogitLensLayer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitLensLayer {
    pub layer_idx: usize,
    pub top_k: Vec<LensCandidate>,
    pub entropy: f64,
    pub selected_token_rank: usize,
    pub selected_token_prob: f64,
}

/// A candidate of a prompt position's lens (Token Heatmap writes no logprob there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptCandidate {
    pub rank: usize,
    pub token_id: TokenId,
    pub token: String,
    pub prob: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f64>,
}

/// One layer of a prompt position's lens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLensLayer {
    pub layer_idx: usize,
    pub top_k: Vec<PromptCandidate>,
    /// Ours only: Token Heatmap's prompt lens has no entropy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
}

/// The lens at one prompt position (its prediction of the next token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLensPosition {
    pub position: usize,
    pub token_id: TokenId,
    pub token: String,
    pub layers: Vec<PromptLensLayer>,
}

/// The trace's `prompt_logit_lens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogitLens {
    pub schema_version: String,
    pub top_k: usize,
    pub num_layers: usize,
    pub positions: Vec<PromptLensPosition>,
}

/// The trace's `attention_metadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionMetadata {
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub captured_layers: Vec<usize>,
}

/// A source position and its head-averaged weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionTopPosition {
    pub position: usize,
    pub weight: f64,
}

/// Each head's numbers, one array entry per query head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerHead {
    pub entropy: Vec<f64>,
    pub self_weight: Vec<f64>,
    pub bos_weight: Vec<f64>,
    pub top1_weight: Vec<f64>,
    pub induction: Vec<f64>,
}

/// One layer's attention at a step (Token Heatmap's `AttentionLayerEntry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionLayerEntry {
    pub layer: usize,
    pub entropy: f64,
    pub self_weight: f64,
    pub bos_weight: f64,
    pub top_positions: Vec<AttentionTopPosition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_head: Option<PerHead>,
}

/// What one row of lens logits says: log-sum-exp, entropy, and the top `k` ids.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    pub lse: f64,
    pub entropy: f64,
    pub top: Vec<TokenId>,
}

/// Log-sum-exp, entropy (nats) and the `k` largest entries of a logits row (ties: the lower
/// id first), through the probe's vectorized exp pass.
pub fn row_stats(row: &[f32], k: usize) -> RowStats {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return RowStats {
            lse: f64::from(max),
            entropy: 0.0,
            top: Vec::new(),
        };
    }
    // S = Σ e^z and Σ z·e^z with z = x − max: ln S − Σ z·e^z / S is the entropy.
    let (s, sz) = crate::dist::kernels::exp_sums(row, max, 1.0);
    let lse = f64::from(max) + s.ln();
    let entropy = (s.ln() - sz / s).max(0.0);
    // The k largest in one pass: most entries fail the compare with the k-th best so far.
    let k = k.min(row.len());
    let mut top: Vec<u32> = Vec::with_capacity(k + 1);
    let better = |a: u32, b: u32| {
        let (x, y) = (row[a as usize], row[b as usize]);
        x > y || (x == y && a < b)
    };
    for i in 0..row.len() as u32 {
        if top.len() == k {
            if k == 0 || !better(i, top[k - 1]) {
                continue;
            }
            top.pop();
        }
        let at = top.partition_point(|&t| better(t, i));
        top.insert(at, i);
    }
    RowStats { lse, entropy, top }
}

fn candidates(
    row: &[f32],
    st: &RowStats,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> Vec<LensCandidate> {
    st.top
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let logprob = f64::from(row[id as usize]) - st.lse;
            LensCandidate {
                rank: i + 1,
                token_id: id,
                token: pieces.get(source, id),
                prob: logprob.exp().clamp(0.0, 1.0),
                logprob,
            }
        })
        .collect()
}

/// The step's lens: `logits` is `[layers.len(), vocab]`, one row per lens layer.
pub fn lens_step(
    logits: ArrayView2<'_, f32>,
    layers: &[usize],
    selected: TokenId,
    top_k: usize,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> Vec<LogitLensLayer> {
    logits
        .outer_iter()
        .zip(layers)
        .map(|(row, &layer_idx)| {
            let row = row.as_slice().expect("standard layout");
            let st = row_stats(row, top_k);
            let z = row
                .get(selected as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            let rank = 1 + row.iter().filter(|&&v| v > z).count();
            LogitLensLayer {
                layer_idx,
                top_k: candidates(row, &st, source, pieces),
                entropy: st.entropy,
                selected_token_rank: rank,
                selected_token_prob: (f64::from(z) - st.lse).exp().clamp(0.0, 1.0),
            }
        })
        .collect()
}

/// The lens of one prompt position from its `[layers.len(), vocab]` logits.
pub fn lens_prompt_position(
    logits: ArrayView2<'_, f32>,
    layers: &[usize],
    position: usize,
    token_id: TokenId,
    top_k: usize,
    source: &dyn Vocab,
    pieces: &mut Pieces,
) -> PromptLensPosition {
    PromptLensPosition {
        position,
        token_id,
        token: pieces.get(source, token_id),
        layers: logits
            .outer_iter()
            .zip(layers)
            .map(|(row, &layer_idx)| {
                let row = row.as_slice().expect("standard layout");
                let st = row_stats(row, top_k);
                PromptLensLayer {
                    layer_idx,
                    top_k: candidates(row, &st, source, pieces)
                        .into_iter()
                        .map(|c| PromptCandidate {
                            rank: c.rank,
                            token_id: c.token_id,
                            token: c.token,
                            prob: c.prob,
                            logprob: Some(c.logprob),
                        })
                        .collect(),
                    entropy: Some(st.entropy),
                }
            })
            .collect(),
    }
}

/// One layer's attention summary from its weights `[n_head, n_pos]` (the current query over
/// positions `0..n_pos`); `ids` are the tokens at those positions (the last is the query's).
pub fn attention_entry(
    layer: usize,
    weights: ArrayView2<'_, f32>,
    ids: &[TokenId],
    top_k: usize,
) -> AttentionLayerEntry {
    let (n_head, n_pos) = weights.dim();
    let q = n_pos.saturating_sub(1);
    // Induction: the token after the last earlier occurrence of the current token (none when
    // that is the token just before it, or when the token is new).
    let target = ids.get(q).and_then(|cur| {
        let j = ids[..q].iter().rposition(|t| t == cur)?;
        (j + 1 != q).then_some(j + 1)
    });
    let mut per = PerHead {
        entropy: Vec::with_capacity(n_head),
        self_weight: Vec::with_capacity(n_head),
        bos_weight: Vec::with_capacity(n_head),
        top1_weight: Vec::with_capacity(n_head),
        induction: Vec::with_capacity(n_head),
    };
    let mut mean = vec![0f64; n_pos];
    for row in weights.outer_iter() {
        let mut h = 0.0f64;
        let mut top1 = 0.0f64;
        for (j, &w) in row.iter().enumerate() {
            let w = f64::from(w).max(0.0);
            if w > 0.0 {
                h -= w * (w + 1e-12).ln();
            }
            top1 = top1.max(w);
            mean[j] += w / n_head as f64;
        }
        per.entropy.push(h.max(0.0));
        per.self_weight
            .push(f64::from(row.get(q).copied().unwrap_or(0.0)).max(0.0));
        per.bos_weight
            .push(f64::from(row.first().copied().unwrap_or(0.0)).max(0.0));
        per.top1_weight.push(top1);
        per.induction.push(
            target
                .and_then(|t| row.get(t))
                .map_or(0.0, |&w| f64::from(w).max(0.0)),
        );
    }
    let avg = |v: &[f64]| v.iter().sum::<f64>() / n_head.max(1) as f64;
    let mut order: Vec<usize> = (0..n_pos).collect();
    order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]).then(a.cmp(&b)));
    let top_positions = order
        .into_iter()
        .take(top_k)
        .filter(|&j| mean[j] > 0.0)
        .map(|j| AttentionTopPosition {
            position: j,
            weight: mean[j].min(1.0),
        })
        .collect();
    AttentionLayerEntry {
        layer,
        entropy: avg(&per.entropy),
        self_weight: avg(&per.self_weight).min(1.0),
        bos_weight: avg(&per.bos_weight).min(1.0),
        top_positions,
        per_head: Some(per),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logitprobe_backends::test_source::TestSource;
    use ndarray::array;

    #[test]
    fn layer_specs() {
        assert_eq!(Layers::parse("all").unwrap(), Layers::All);
        assert_eq!(
            Layers::parse(" 7, 0,3,3 ").unwrap(),
            Layers::List(vec![0, 3, 7])
        );
        assert!(Layers::parse("0,,3").is_err());
        assert!(Layers::parse("-1").is_err());
        assert!(Layers::parse("all,3").is_err());
        assert_eq!(Layers::parse("0,3").unwrap().to_string(), "0,3");
        assert_eq!(Layers::All.resolve(3), vec![0, 1, 2]);
    }

    #[test]
    fn lens_rows_rank_and_entropy() {
        let src = TestSource::new(300, 0);
        let mut pieces = Pieces::default();
        let mut row = vec![0f32; 300];
        row[65] = 2.0;
        row[66] = 2.0;
        row[67] = 1.0;
        let logits = ndarray::Array2::from_shape_vec((1, 300), row.clone()).unwrap();
        let l = lens_step(logits.view(), &[4], 67, 3, &src, &mut pieces);
        let l = &l[0];
        assert_eq!(l.layer_idx, 4);
        // Ties go to the lower id; the selected token's rank counts strictly larger logits.
        let ids: Vec<u32> = l.top_k.iter().map(|c| c.token_id).collect();
        assert_eq!(ids, vec![65, 66, 67]);
        assert_eq!(l.selected_token_rank, 3);
        let z: f64 = row.iter().map(|&v| f64::from(v).exp()).sum();
        let p: Vec<f64> = row.iter().map(|&v| f64::from(v).exp() / z).collect();
        let h: f64 = -p.iter().map(|&q| q * q.ln()).sum::<f64>();
        // The probe's f32 exponential: 1.6e-7 relative error per term.
        assert!((l.entropy - h).abs() < 1e-6);
        assert!((l.selected_token_prob - p[67]).abs() < 1e-7);
        assert!((l.top_k[0].logprob - p[65].ln()).abs() < 1e-6);
    }

    #[test]
    fn attention_summary_of_two_heads() {
        // Query at position 3 (token 5), which occurred at position 1: induction target 2.
        let w = array![[0.1f32, 0.2, 0.3, 0.4], [0.7, 0.0, 0.2, 0.1]];
        let e = attention_entry(2, w.view(), &[9, 5, 8, 5], 2);
        let ph = e.per_head.as_ref().unwrap();
        assert_eq!(ph.self_weight, vec![0.4f32 as f64, 0.1f32 as f64]);
        assert_eq!(ph.bos_weight, vec![0.1f32 as f64, 0.7f32 as f64]);
        assert_eq!(ph.induction, vec![0.3f32 as f64, 0.2f32 as f64]);
        assert_eq!(ph.top1_weight, vec![0.4f32 as f64, 0.7f32 as f64]);
        let h0: f64 = [0.1f32, 0.2, 0.3, 0.4]
            .iter()
            .map(|&w| -f64::from(w) * (f64::from(w) + 1e-12).ln())
            .sum();
        assert!((ph.entropy[0] - h0).abs() < 1e-12);
        assert!((e.self_weight - (0.4f32 as f64 + 0.1f32 as f64) / 2.0).abs() < 1e-12);
        let pos: Vec<usize> = e.top_positions.iter().map(|p| p.position).collect();
        assert_eq!(pos, vec![0, 2], "mean weights 0.4, 0.1, 0.25, 0.25");
        // The token just before is no induction target.
        let e = attention_entry(0, w.view(), &[9, 8, 5, 5], 2);
        assert_eq!(e.per_head.unwrap().induction, vec![0.0, 0.0]);
    }
}
