//! The probe's descriptions of a distribution (raw or processed): the adaptive-k
//! candidates, the mass they cover, the entropy, and the selected token's probability,
//! log-probability and rank. They read what the row pass and the sampler computed; none of
//! them passes over the row again, except to rank a selected token outside the candidates.

use crate::dist::kernels;
use crate::dist::row::{Candidate, Distribution, ProbeConfig, RowSums};
use crate::dist::sampler::{Kept, Sampler};
use logitprobe_backends::TokenId;

/// The raw distribution, softmax(logits / T), from the row's sums and the candidates in
/// raw order (`valid` of them exactly ordered).
pub(crate) fn raw(
    cfg: &ProbeConfig,
    row: &RowSums,
    t: f32,
    order_raw: &[TokenId],
    valid: usize,
    selected: TokenId,
) -> Distribution {
    let l_sel = row.logits[selected as usize];
    let rank = if l_sel >= t {
        1 + order_raw[..valid]
            .iter()
            .filter(|&&i| row.logits[i as usize] > l_sel)
            .count()
    } else {
        1 + kernels::count_greater(row.logits, l_sel)
    };
    let order = &order_raw[..valid];
    from_order(
        cfg,
        order,
        |i| row.logits[i as usize],
        row,
        row.s,
        row.sz,
        selected,
        rank,
    )
}

/// The processed distribution: what the sampler drew from (penalized, filtered to `kept`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn processed(
    cfg: &ProbeConfig,
    sampler: &Sampler,
    order_proc: &[TokenId],
    row: &RowSums,
    t: f32,
    valid: usize,
    kept: &Kept,
    s_p: f64,
    sz_p: f64,
    selected: TokenId,
) -> Distribution {
    let lp = |i: TokenId| sampler.lp(row.logits, i);
    let l_sel = lp(selected);
    match *kept {
        Kept::Prefix(n) => {
            let order = &order_proc[..n];
            let (mut s, mut sz) = (0f64, 0f64);
            for &i in order {
                let z = row.z64(lp(i));
                s += z.exp();
                sz += z * z.exp();
            }
            let rank = 1 + order.iter().filter(|&&i| lp(i) > l_sel).count();
            from_order(cfg, order, lp, row, s, sz, selected, rank)
        }
        Kept::Wide(w) => {
            // Every token above the cut's logit is in the nucleus; a token below it has the
            // whole nucleus above it.
            let l_cut = row.logits[w.cut.id() as usize];
            let rank = if l_sel < l_cut {
                1 + w.cut.n
            } else {
                1 + kernels::count_greater(row.logits, l_sel)
            };
            from_order(
                cfg,
                &order_proc[..valid],
                lp,
                row,
                w.s,
                w.sz,
                selected,
                rank,
            )
        }
        Kept::All => {
            let rank = if l_sel >= t {
                1 + order_proc[..valid]
                    .iter()
                    .filter(|&&i| lp(i) > l_sel)
                    .count()
            } else {
                let mut above = kernels::count_greater(row.logits, l_sel);
                for &(id, l_pen) in &sampler.penalized {
                    above -= usize::from(row.logits[id as usize] > l_sel);
                    above += usize::from(l_pen > l_sel);
                }
                1 + above
            };
            from_order(
                cfg,
                &order_proc[..valid],
                lp,
                row,
                s_p,
                sz_p,
                selected,
                rank,
            )
        }
    }
}

/// The probe's rule over an exactly ordered prefix of a distribution with normalizer `s`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn from_order(
    cfg: &ProbeConfig,
    order: &[TokenId],
    logit: impl Fn(TokenId) -> f32,
    row: &RowSums,
    s: f64,
    sz: f64,
    selected: TokenId,
    rank: usize,
) -> Distribution {
    let mut candidates = Vec::with_capacity(cfg.max_k.min(order.len()));
    let mut cum = 0f64;
    let mut k_mass = None;
    for &id in order.iter().take(cfg.max_k) {
        // e^z / Σe^z of the top token can round a hair above 1 (1 + 1e-15) when it holds all
        // the mass: a probability is at most 1, as the schema says.
        let p = row.p(logit(id), s).min(1.0);
        // Sorted order: the first zero ends the tokens with non-zero probability.
        if p == 0.0 {
            break;
        }
        cum += p;
        candidates.push(Candidate {
            token_id: id,
            prob: p,
            logprob: logprob(p, cfg.eps),
        });
        if k_mass.is_none() && cum >= cfg.mass_threshold {
            k_mass = Some(candidates.len());
        }
    }
    let nonzero = candidates.len();
    let k = if cfg.mass_threshold >= 1.0 {
        cfg.max_k
    } else {
        k_mass.unwrap_or(cfg.max_k)
    };
    let k = k.clamp(cfg.min_k, cfg.max_k).min(nonzero).max(1);
    candidates.truncate(k);
    let top_mass_used = candidates.iter().map(|c| c.prob).sum::<f64>().min(1.0);
    let selected_prob = row.p(logit(selected), s).min(1.0);
    Distribution {
        k_used: candidates.len(),
        entropy: (s.ln() - sz / s).max(0.0),
        top_mass_used,
        selected_prob,
        selected_logprob: logprob(selected_prob, cfg.eps),
        selected_rank: rank,
        candidates,
    }
}

/// Token Heatmap's ln(p + eps), at most 0: a probability of 1 has a logprob of 0, not
/// +1e-12.
pub(crate) fn logprob(p: f64, eps: f64) -> f64 {
    (p + eps).ln().min(0.0)
}

/// All the mass on one token (greedy's processed distribution, a degenerate row).
pub(crate) fn point_mass(id: TokenId, eps: f64) -> Distribution {
    Distribution {
        k_used: 1,
        entropy: 0.0,
        top_mass_used: 1.0,
        selected_prob: 1.0,
        selected_logprob: logprob(1.0, eps),
        selected_rank: 1,
        candidates: vec![Candidate {
            token_id: id,
            prob: 1.0,
            logprob: logprob(1.0, eps),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certain_token_has_logprob_zero() {
        assert_eq!(logprob(1.0, 1e-12), 0.0);
        assert!((logprob(0.5, 1e-12) - 0.5f64.ln()).abs() < 1e-11);
        let d = point_mass(7, 1e-12);
        assert_eq!((d.selected_logprob, d.candidates[0].logprob), (0.0, 0.0));
    }
}
