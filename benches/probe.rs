//! The probe's cost per `[batch, 151936]` logits (Qwen2.5's width), next to two floors
//! measured over the same rows in the same run: Σx (reading the row once) and Σe^(x−max)
//! (one vectorized exp pass). Goal: raw + processed ≤ 15× the Σx floor.
//!
//! Rows look like a language model's: standard Gumbel noise (the spread of real logits
//! around their mean) plus a few dominant tokens, 6–14 nats above the rest, so top-p at 0.95
//! keeps a handful of tokens and the long tail still holds real mass.
//!
//! Run: `cargo bench --bench probe` (prints the ratios at the end).

use criterion::{BenchmarkId, Criterion, Throughput};
use logitprobe::dist::kernels;
use logitprobe::dist::probe::{Probe, ProbeConfig};
use logitprobe::dist::sampler::{Rng, SamplingConfig};
use std::hint::black_box;

const VOCAB: usize = 151_936;

fn lm_rows(batch: usize) -> Vec<Vec<f32>> {
    (0..batch as u64)
        .map(|b| {
            let mut s = 0x1234_5678 ^ b;
            let mut row: Vec<f32> = (0..VOCAB)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    -(-u.ln()).ln() as f32
                })
                .collect();
            for (j, boost) in [14.0f32, 12.5, 11.0, 9.0, 6.0].iter().enumerate() {
                row[(b as usize * 7919 + j * 104_729) % VOCAB] += boost;
            }
            row
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let sampling = SamplingConfig::default();
    for batch in [1usize, 8] {
        let rows = lm_rows(batch);
        let mut g = c.benchmark_group(format!("probe_{batch}x{VOCAB}"));
        g.throughput(Throughput::Elements((batch * VOCAB) as u64));
        g.bench_function(BenchmarkId::from_parameter("sum_floor"), |b| {
            b.iter(|| rows.iter().map(|r| kernels::sum(black_box(r))).sum::<f32>())
        });
        g.bench_function(BenchmarkId::from_parameter("exp_floor"), |b| {
            let maxes: Vec<f32> = rows
                .iter()
                .map(|r| r.iter().cloned().fold(f32::MIN, f32::max))
                .collect();
            b.iter(|| {
                rows.iter()
                    .zip(&maxes)
                    .map(|(r, &m)| kernels::exp_sums(black_box(r), m, 1.0).0)
                    .sum::<f64>()
            })
        });
        let mut probe = Probe::new(ProbeConfig::default());
        g.bench_function(BenchmarkId::from_parameter("probe_raw_processed"), |b| {
            let mut rng = Rng::new(1, 0);
            b.iter(|| {
                for r in &rows {
                    black_box(
                        probe
                            .step(black_box(r), &[], &sampling, &mut rng, true)
                            .unwrap(),
                    );
                }
            })
        });
        g.finish();
    }
}

/// Criterion's point estimate (ns) of one benchmark, from its report on disk.
fn estimate(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    // In `cargo test` mode criterion runs each function once and writes no estimates.
    for batch in [1usize, 8] {
        let g = format!("probe_{batch}x{VOCAB}");
        if let (Some(sum), Some(exp), Some(probe)) = (
            estimate(&g, "sum_floor"),
            estimate(&g, "exp_floor"),
            estimate(&g, "probe_raw_processed"),
        ) {
            println!(
                "[{batch}, {VOCAB}]: probe {:.1} µs/row = {:.1}× the Σx floor ({:.1} µs), {:.2}× the Σexp floor ({:.1} µs)",
                probe / 1e3 / batch as f64,
                probe / sum,
                sum / 1e3 / batch as f64,
                probe / exp,
                exp / 1e3 / batch as f64
            );
        }
    }
}
