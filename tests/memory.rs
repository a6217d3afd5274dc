//! A long run keeps O(steps × max_k) memory: the trace holds candidates, never a
//! vocabulary-sized row per step.

use logitprobe::backends::test_source::TestSource;
use logitprobe::dist::probe::ProbeConfig;
use logitprobe::dist::sampler::SamplingConfig;
use logitprobe::generate::{generate, GenerateConfig, PromptInput};
use logitprobe::Vocab;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn two_thousand_steps_stay_small() {
    const VOCAB: usize = 32_768;
    const STEPS: usize = 2000;
    let mut src = TestSource::new(VOCAB, 1).with_eos_bias(-100.0);
    let ids = src.tokenize("memory", false, false).unwrap();
    let prompts = [PromptInput {
        index: 0,
        prompt: "memory".into(),
        system_prompt: None,
        rendered: "memory".into(),
        ids,
        ..Default::default()
    }];
    let cfg = GenerateConfig {
        sampling: SamplingConfig::default(),
        probe: ProbeConfig::default(),
        max_new_tokens: STEPS,
        ignore_eos: false,
        seed: 1,
        probe_enabled: true,
        logprobs: None,
        prompt_logprobs: false,
        inside: None,
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let (gens, _) = generate(&mut src, &prompts, &cfg, &mut [], &AtomicBool::new(false)).unwrap();
    assert_eq!(gens[0].steps.len(), STEPS);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept: usize = gens[0]
        .steps
        .iter()
        .map(|s| s.raw.candidates.len() + s.processed.candidates.len())
        .sum();
    // A row per step would be 2000 × 128 KB ≈ 262 MB; candidates are ~100 bytes each.
    let bound = 4 * VOCAB * 4 + kept * 160 + (1 << 20);
    assert!(
        peak < bound,
        "peak {peak} bytes for {kept} candidates (bound {bound})"
    );
    println!(
        "peak {:.1} MB for {STEPS} steps, {kept} candidates",
        peak as f64 / 1e6
    );
}
