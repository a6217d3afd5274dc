//! The sampler draws from the processed distribution it reports, and never outside it.

use logitprobe::dist::probe::{Probe, ProbeConfig};
use logitprobe::dist::sampler::{Rng, SamplingConfig};
use statrs::distribution::{ChiSquared, ContinuousCDF};

#[test]
fn draws_follow_the_processed_distribution() {
    // A row with a clear head and a long tail, so top-k, top-p and min-p each cut something.
    let row: Vec<f32> = (0..2000)
        .map(|i| 6.0 - (i as f32).sqrt() * 0.9 + ((i * 7919) % 13) as f32 * 0.05)
        .collect();
    let configs = [
        SamplingConfig {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 0.7,
            top_k: 12,
            top_p: 1.0,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.3,
            min_p: 0.05,
            top_p: 1.0,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: 30,
            top_p: 0.8,
            min_p: 0.02,
            ..Default::default()
        },
        // No filter: the draw walks the whole row through its chunk sums.
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            ..Default::default()
        },
        // The same with penalties, which change some chunk sums.
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            repeat_penalty: 1.5,
            presence_penalty: 0.4,
            ..Default::default()
        },
    ];
    // Penalized tokens in the head, in the middle of the row and in its 16-entry tail.
    let history: Vec<u32> = vec![0, 1, 1, 2, 3, 700, 1999, 1990];
    for s in configs {
        let history: &[u32] = if s.has_penalties() { &history } else { &[] };
        let mut probe = Probe::new(ProbeConfig {
            min_k: 1,
            max_k: 4096,
            mass_threshold: 1.0,
            eps: 1e-12,
        });
        let mut rng = Rng::new(12345, 0);
        let first = probe.step(&row, history, &s, &mut rng, true).unwrap();
        let expected: Vec<(u32, f64)> = first
            .processed
            .unwrap()
            .candidates
            .iter()
            .map(|c| (c.token_id, c.prob))
            .collect();
        let n = 20_000usize;
        let mut counts = std::collections::HashMap::<u32, usize>::new();
        for _ in 0..n {
            let t = probe
                .step(&row, history, &s, &mut rng, false)
                .unwrap()
                .selected;
            *counts.entry(t).or_default() += 1;
        }
        for t in counts.keys() {
            assert!(
                expected.iter().any(|(id, _)| id == t),
                "{s:?}: drew token {t} outside the kept set"
            );
        }
        // Pool tokens whose expected count is under 5, as the test requires.
        let (mut chi2, mut df, mut pool_obs, mut pool_exp) = (0.0, 0usize, 0.0, 0.0);
        for (id, p) in &expected {
            let e = p * n as f64;
            let o = *counts.get(id).unwrap_or(&0) as f64;
            if e < 5.0 {
                pool_obs += o;
                pool_exp += e;
            } else {
                chi2 += (o - e).powi(2) / e;
                df += 1;
            }
        }
        if pool_exp > 0.0 {
            chi2 += (pool_obs - pool_exp).powi(2) / pool_exp.max(1e-9);
            df += 1;
        }
        let p_value = 1.0 - ChiSquared::new((df - 1) as f64).unwrap().cdf(chi2);
        assert!(
            p_value > 0.001,
            "{s:?}: chi2 {chi2:.1} on {} dof, p = {p_value}",
            df - 1
        );
        assert!(df > 3, "{s:?}: the test needs several categories");
    }
}
