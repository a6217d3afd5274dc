//! The probe against a plain f64 implementation of the same definitions (full sorts, no
//! tricks), on random and adversarial rows.

use logitprobe::dist::probe::{Distribution, InvalidLogits, Probe, ProbeConfig};
use logitprobe::dist::sampler::{Rng, SamplingConfig};
use proptest::prelude::*;

/// The reference: softmax in f64, full sort by (p desc, id asc).
fn reference(probs: &[f64], selected: u32, cfg: &ProbeConfig) -> (Distribution, Vec<f64>) {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let nonzero = probs.iter().filter(|&&p| p > 0.0).count();
    let mut cum = 0.0;
    let mut k_mass = None;
    let mut cums = Vec::new();
    for (i, &id) in order.iter().take(cfg.max_k).enumerate() {
        cum += probs[id];
        cums.push(cum);
        if k_mass.is_none() && cum >= cfg.mass_threshold {
            k_mass = Some(i + 1);
        }
    }
    let k = if cfg.mass_threshold >= 1.0 {
        cfg.max_k
    } else {
        k_mass.unwrap_or(cfg.max_k)
    };
    let k = k.clamp(cfg.min_k, cfg.max_k).min(nonzero).max(1);
    let candidates: Vec<_> = order[..k]
        .iter()
        .map(|&id| logitprobe::dist::probe::Candidate {
            token_id: id as u32,
            prob: probs[id],
            logprob: (probs[id] + cfg.eps).ln(),
        })
        .collect();
    let ps = probs[selected as usize];
    let d = Distribution {
        k_used: k,
        entropy: -probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * p.ln())
            .sum::<f64>(),
        top_mass_used: candidates.iter().map(|c| c.prob).sum(),
        selected_prob: ps,
        selected_logprob: (ps + cfg.eps).ln(),
        selected_rank: 1 + probs.iter().filter(|&&p| p > ps).count(),
        candidates,
    };
    (d, cums)
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z
        .iter()
        .map(|&v| {
            if v == f64::NEG_INFINITY {
                0.0
            } else {
                (v - m).exp()
            }
        })
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Reference processed distribution of the sampler chain (penalties off).
fn reference_processed(logits: &[f32], s: &SamplingConfig) -> (Vec<f64>, f64) {
    let t = if s.is_greedy() { 1.0 } else { s.temperature };
    let z: Vec<f64> = logits.iter().map(|&l| f64::from(l) / t).collect();
    let p = softmax(&z);
    let mut order: Vec<usize> = (0..p.len())
        .filter(|&i| p[i] > 0.0 || logits[i] > f32::NEG_INFINITY)
        .collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.is_greedy() {
        let mut out = vec![0.0; p.len()];
        out[order[0]] = 1.0;
        return (out, f64::INFINITY);
    }
    let mut closest = f64::INFINITY;
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    if s.top_p < 1.0 {
        let total: f64 = order.iter().map(|&i| p[i]).sum();
        let mut cum = 0.0;
        let mut n = order.len();
        for (j, &i) in order.iter().enumerate() {
            cum += p[i] / total;
            closest = closest.min((cum - s.top_p).abs());
            if cum >= s.top_p {
                n = j + 1;
                break;
            }
        }
        order.truncate(n);
    }
    if s.min_p > 0.0 {
        let top = p[order[0]];
        order.retain(|&i| p[i] >= s.min_p * top);
    }
    let mut kept = vec![f64::NEG_INFINITY; p.len()];
    for &i in &order {
        kept[i] = z[i];
    }
    (softmax(&kept), closest)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 || (a - b).abs() <= 1e-6 * b.abs().max(a.abs())
}

/// Log-probabilities: an absolute error of 1e-6 in ln p is a relative error of 1e-6 in p.
fn close_log(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6
}

/// Compares everything; exact fields only where no cumulative sum sits near the threshold.
fn check(got: &Distribution, want: &Distribution, cums: &[f64], cfg: &ProbeConfig, what: &str) {
    assert!(
        close(got.entropy, want.entropy),
        "{what}: entropy {} vs {}",
        got.entropy,
        want.entropy
    );
    assert!(
        close(got.selected_prob, want.selected_prob),
        "{what}: selected_prob {} vs {}",
        got.selected_prob,
        want.selected_prob
    );
    assert!(
        close_log(got.selected_logprob, want.selected_logprob),
        "{what}: selected_logprob {} vs {}",
        got.selected_logprob,
        want.selected_logprob
    );
    assert_eq!(
        got.selected_rank, want.selected_rank,
        "{what}: selected_rank"
    );
    let ambiguous = cums.iter().any(|c| (c - cfg.mass_threshold).abs() < 1e-6);
    if !ambiguous {
        assert_eq!(got.k_used, want.k_used, "{what}: k_used");
        assert!(
            close(got.top_mass_used, want.top_mass_used),
            "{what}: top_mass_used"
        );
    }
    for (g, w) in got.candidates.iter().zip(&want.candidates) {
        assert_eq!(g.token_id, w.token_id, "{what}: candidate ids");
        assert!(
            close(g.prob, w.prob),
            "{what}: prob {} vs {}",
            g.prob,
            w.prob
        );
        assert!(
            close_log(g.logprob, w.logprob),
            "{what}: logprob {} vs {}",
            g.logprob,
            w.logprob
        );
    }
}

fn run_case(logits: &[f32], sampling: &SamplingConfig, cfg: &ProbeConfig, seed: u64) {
    let mut probe = Probe::new(cfg.clone());
    let step = probe
        .step(logits, &[], sampling, &mut Rng::new(seed, 0), true)
        .expect("finite row");
    let t = if sampling.is_greedy() {
        1.0
    } else {
        sampling.temperature
    };
    let raw_p = softmax(&logits.iter().map(|&l| f64::from(l) / t).collect::<Vec<_>>());
    let (raw_want, cums) = reference(&raw_p, step.selected, cfg);
    check(step.raw.as_ref().unwrap(), &raw_want, &cums, cfg, "raw");
    let (proc_p, closest) = reference_processed(logits, sampling);
    assert!(
        proc_p[step.selected as usize] > 0.0,
        "sampled token {} was filtered out",
        step.selected
    );
    if closest > 1e-6 {
        let (proc_want, cums) = reference(&proc_p, step.selected, cfg);
        check(
            step.processed.as_ref().unwrap(),
            &proc_want,
            &cums,
            cfg,
            "processed",
        );
    }
    // describe() is the raw probe alone.
    let d = probe.describe(logits, t, step.selected).unwrap();
    check(&d, &raw_want, &cums, cfg, "describe");
}

fn sampling_strategy() -> impl Strategy<Value = SamplingConfig> {
    (
        prop_oneof![Just(0.0), 0.05f64..3.0],
        prop_oneof![Just(0usize), 1usize..50],
        prop_oneof![Just(1.0), 0.05f64..1.0],
        prop_oneof![Just(0.0), 0.0f64..0.5],
    )
        .prop_map(|(temperature, top_k, top_p, min_p)| SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            ..Default::default()
        })
}

fn config_strategy() -> impl Strategy<Value = ProbeConfig> {
    (1usize..20, 0usize..80, prop_oneof![Just(1.0), 0.05f64..1.0]).prop_map(|(min_k, extra, m)| {
        ProbeConfig {
            min_k,
            max_k: min_k + extra,
            mass_threshold: m,
            eps: 1e-12,
        }
    })
}

/// Rows of up to 46 blocks.
fn row_strategy() -> impl Strategy<Value = Vec<f32>> {
    rows_of(1..3000)
}

/// Rows of `lengths` entries, with ties (values on a coarse grid), −∞ entries and a few
/// dominant tokens.
fn rows_of(lengths: std::ops::Range<usize>) -> impl Strategy<Value = Vec<f32>> {
    (lengths, any::<u64>(), 0u8..4).prop_map(|(n, seed, kind)| {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f32 / (1u64 << 31) as f32
        };
        let mut row: Vec<f32> = (0..n)
            .map(|_| match kind {
                0 => next() * 20.0 - 10.0,
                1 => (next() * 8.0).floor() * 0.5, // many ties
                2 => {
                    if next() < 0.3 {
                        f32::NEG_INFINITY
                    } else {
                        next() * 6.0
                    }
                }
                _ => -(next().max(1e-6).ln()) * -2.0, // heavy tail
            })
            .collect();
        if row.iter().all(|v| *v == f32::NEG_INFINITY) {
            row[0] = 0.0;
        }
        row
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn probe_matches_reference(row in row_strategy(), s in sampling_strategy(), cfg in config_strategy(), seed in any::<u64>()) {
        run_case(&row, &s, &cfg, seed);
    }
}

proptest! {
    // Rows of hundreds of blocks: the candidates come from the exp pass's gather at a finite
    // threshold, and wide nuclei make the probe gather again.
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]
    #[test]
    fn probe_matches_reference_on_long_rows(row in rows_of(8_000..40_000), s in sampling_strategy(), cfg in config_strategy(), seed in any::<u64>()) {
        run_case(&row, &s, &cfg, seed);
    }
}

fn lm_row(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let g = -(-u.ln()).ln() as f32;
            g + if i % 9973 == 17 { 12.0 } else { 0.0 }
        })
        .collect()
}

#[test]
fn adversarial_rows() {
    let d = ProbeConfig::default();
    let t = SamplingConfig::default();
    let cases: Vec<(&str, Vec<f32>, ProbeConfig, SamplingConfig)> = vec![
        (
            "one-hot",
            {
                let mut r = vec![-1e4f32; 500];
                r[42] = 0.0;
                r
            },
            d.clone(),
            t.clone(),
        ),
        ("all equal", vec![1.5; 1000], d.clone(), t.clone()),
        ("vocab 1", vec![0.3], d.clone(), t.clone()),
        (
            "-inf entries",
            {
                let mut r = vec![f32::NEG_INFINITY; 100];
                r[3] = 1.0;
                r[7] = 1.0;
                r[9] = 0.5;
                r
            },
            d.clone(),
            t.clone(),
        ),
        (
            "min_k above non-zero count",
            {
                let mut r = vec![f32::NEG_INFINITY; 50];
                r[1] = 2.0;
                r[2] = 1.0;
                r
            },
            ProbeConfig {
                min_k: 10,
                max_k: 20,
                ..d.clone()
            },
            t.clone(),
        ),
        (
            "mass_threshold 1.0",
            lm_row(5000, 3),
            ProbeConfig {
                mass_threshold: 1.0,
                ..d.clone()
            },
            t.clone(),
        ),
        (
            "ties at the k boundary",
            {
                let mut r = vec![0.0f32; 300];
                for v in r.iter_mut().take(20) {
                    *v = 5.0;
                }
                r
            },
            ProbeConfig {
                min_k: 3,
                max_k: 10,
                ..d.clone()
            },
            t.clone(),
        ),
        ("vocab 151936", lm_row(151_936, 1), d.clone(), t.clone()),
        (
            "vocab 151936 greedy",
            lm_row(151_936, 2),
            d.clone(),
            SamplingConfig::greedy(),
        ),
        (
            "vocab 151936 top-k 40",
            lm_row(151_936, 4),
            d.clone(),
            SamplingConfig {
                top_k: 40,
                ..t.clone()
            },
        ),
        (
            "vocab 151936 flat top-p",
            {
                let mut r = lm_row(151_936, 5);
                for v in &mut r {
                    *v *= 0.01;
                }
                r
            },
            d.clone(),
            t.clone(),
        ),
        (
            "vocab 151936 no filter",
            lm_row(151_936, 6),
            d.clone(),
            SamplingConfig {
                top_p: 1.0,
                ..t.clone()
            },
        ),
        (
            "min-p",
            lm_row(20_000, 7),
            d.clone(),
            SamplingConfig {
                min_p: 0.1,
                top_p: 1.0,
                ..t.clone()
            },
        ),
    ];
    for (name, row, cfg, s) in cases {
        for seed in 0..3 {
            std::panic::catch_unwind(|| run_case(&row, &s, &cfg, seed))
                .unwrap_or_else(|_| panic!("case {name} failed"));
        }
    }
}

/// NaN is an error; so is a row with no finite logit (every entry −∞: no distribution, issue
/// 32 item 1, where it used to fall back to token 0 with probability 1); a +∞ entry is a
/// point mass there, marked degenerate.
#[test]
fn nan_and_all_minus_infinity_are_errors_and_plus_infinity_degrades_to_greedy() {
    let mut probe = Probe::new(ProbeConfig::default());
    let mut step = |row: &[f32]| {
        probe.step(
            row,
            &[],
            &SamplingConfig::default(),
            &mut Rng::new(1, 0),
            true,
        )
    };
    let mut row = vec![0.0f32; 100];
    row[50] = f32::NAN;
    assert_eq!(step(&row).unwrap_err(), InvalidLogits::Nan { token_id: 50 });
    let row = vec![f32::NEG_INFINITY; 100];
    assert_eq!(step(&row).unwrap_err(), InvalidLogits::NoFinite);
    let mut row = vec![f32::NEG_INFINITY; 100];
    row[7] = f32::INFINITY;
    let s = step(&row).unwrap();
    assert!(s.degenerate);
    assert_eq!(s.selected, 7);
    assert_eq!(s.raw.unwrap().k_used, 1);
}

#[test]
fn penalties_change_processed_but_not_raw() {
    let row = lm_row(1000, 9);
    let top = (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap() as u32;
    let s = SamplingConfig {
        repeat_penalty: 1e3,
        presence_penalty: 5.0,
        temperature: 1.0,
        top_p: 1.0,
        ..Default::default()
    };
    let mut probe = Probe::new(ProbeConfig::default());
    let plain = probe
        .step(&row, &[], &s, &mut Rng::new(1, 0), true)
        .unwrap();
    let pen = probe
        .step(&row, &[top, top], &s, &mut Rng::new(1, 0), true)
        .unwrap();
    assert_eq!(plain.raw.as_ref().unwrap().candidates[0].token_id, top);
    assert_eq!(
        pen.raw.as_ref().unwrap().candidates[0].token_id,
        top,
        "raw ignores penalties"
    );
    let proc = pen.processed.unwrap();
    assert_ne!(
        proc.candidates[0].token_id, top,
        "processed demotes the repeated token"
    );
    // Against a direct computation on the penalized row.
    let mut penalized = row.clone();
    penalized[top as usize] = s.penalize(row[top as usize], 2);
    let p = softmax(&penalized.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
    let (want, cums) = reference(&p, pen.selected, &ProbeConfig::default());
    check(&proc, &want, &cums, &ProbeConfig::default(), "penalized");
}
