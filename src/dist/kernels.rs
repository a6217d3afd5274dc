//! Vectorizable passes over one logits row.
//!
//! Every pass uses IEEE-754 adds, multiplies and fused multiply-adds in a fixed order (16
//! lanes), so the results are bit-identical whatever SIMD width the CPU offers: the same
//! logits give the same probabilities, and so the same sampled token, on every machine.
//! `multiversion` compiles each pass for wider vector units and picks one at run time; that
//! changes the speed, never the numbers.
//!
//! The exponential uses fused multiply-add (`f32::mul_add`) because the probe's exp pass is
//! bound by how many instructions it issues: FMA turns about 26 operations per element into 17.
//! A fused multiply-add is rounded once, exactly as IEEE-754 specifies, so it gives the same
//! bits everywhere: in hardware on every aarch64 CPU and on x86-64 since 2013 (Haswell,
//! Piledriver), and through the C library's exact `fmaf` elsewhere, where the exp pass runs
//! about 50× slower (~5 ms per 151,936-entry row) but still gives the same tokens.

use multiversion::multiversion;

const LANES: usize = 16;
/// Elements summed in f32 lanes before the partial sums move to f64: keeps the relative error
/// of a 151,936-entry sum near 1e-7.
const CHUNK: usize = LANES * 4;
/// Size of the blocks whose maxima steer the top-k gather.
pub const BLOCK: usize = 64;
/// Entries per [`chunk_sums`] entry.
pub const CHUNK_LEN: usize = CHUNK;

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 × 2^23 + 127: adding it rounds to an integer n and leaves n + 127 (the biased exponent
/// of 2^n) in the low mantissa bits, so shifting those bits left by 23 builds 2^n directly.
const ROUND_MAGIC: f32 = 12_583_039.0;
/// Below this, e^z is under f32's smallest normal number and is taken as 0.
const Z_MIN: f32 = -87.0;
const Z_MAX: f32 = 88.0;

/// e^r on |r| ≤ ln2/2: a degree-5 minimax polynomial (relative error 9.1e-8; 1.6e-7 with
/// f32 rounding) by Horner's rule in fused multiply-adds.
#[inline(always)]
fn poly(r: f32) -> f32 {
    const C1: f32 = 0.999_999_7;
    const C2: f32 = 0.499_991_5;
    const C3: f32 = 0.166_676_36;
    const C4: f32 = 0.041_897_93;
    const C5: f32 = 0.008_290_316;
    let mut p = C5;
    p = p.mul_add(r, C4);
    p = p.mul_add(r, C3);
    p = p.mul_add(r, C2);
    p = p.mul_add(r, C1);
    p.mul_add(r, 1.0)
}

/// e^z for z in [−87, 88]: Cody–Waite reduction z = n·ln2 + r, then 2^n · poly(r).
#[inline(always)]
fn exp_in_range(z: f32) -> f32 {
    let k = z.mul_add(LOG2E, ROUND_MAGIC);
    let n = k - ROUND_MAGIC;
    let r = n.mul_add(-LN2_HI, z);
    let r = n.mul_add(-LN2_LO, r);
    poly(r) * f32::from_bits(k.to_bits() << 23)
}

/// e^z, within ~3 ulp, deterministic on every platform. NaN stays NaN; z < −87 (and −∞) → 0.
///
/// Compiled for FMA and picked at run time like the passes, so that a lone call is a few
/// instructions rather than nine calls into the C library's `fmaf`.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx+fma", "aarch64+neon"))]
pub fn exp(z: f32) -> f32 {
    exp_any(z)
}

/// [`exp`] of (l − max)·inv_t for each logit, into `out`: the sampler's weights of a run of
/// candidates in one vectorized call, the same bits as calling [`exp`] on each.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx+fma", "aarch64+neon"))]
pub fn exp_weights(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(logits.iter().map(|&l| exp_any((l - max) * inv_t)));
}

#[inline(always)]
fn exp_any(z: f32) -> f32 {
    let zc = if z > Z_MAX { Z_MAX } else { z };
    let zc = if zc < Z_MIN { Z_MIN } else { zc };
    let e = exp_in_range(zc);
    if z < Z_MIN {
        0.0
    } else {
        e
    }
}

/// Fills `blocks` with the maximum of each [`BLOCK`]-sized block of `x` and returns the row
/// maximum; an all −∞ row gives −∞. NaN entries are skipped (`a > NaN` is false): the exp
/// pass that always follows turns a NaN into a NaN sum, which is where the probe reports it.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn block_max(x: &[f32], blocks: &mut Vec<f32>) -> f32 {
    #[inline(always)]
    fn max(a: f32, b: f32) -> f32 {
        if b > a {
            b
        } else {
            a
        }
    }
    blocks.clear();
    let mut total = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(BLOCK);
    for c in &mut chunks {
        let mut m = [f32::NEG_INFINITY; 8];
        for part in c.chunks_exact(8) {
            for j in 0..8 {
                m[j] = max(m[j], part[j]);
            }
        }
        for j in 0..8 {
            total[j] = max(total[j], m[j]);
        }
        let m4 = [
            max(m[0], m[4]),
            max(m[1], m[5]),
            max(m[2], m[6]),
            max(m[3], m[7]),
        ];
        blocks.push(max(max(m4[0], m4[2]), max(m4[1], m4[3])));
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let b = rem.iter().fold(f32::NEG_INFINITY, |a, &v| max(a, v));
        blocks.push(b);
        total[0] = max(total[0], b);
    }
    total.iter().fold(f32::NEG_INFINITY, |a, &v| max(a, v))
}

/// Σ e^z and Σ z·e^z over the row, z = (x − max)·inv_t ≤ 0.
///
/// The same arithmetic as [`exp`], lane-wise so it compiles to vector code, and leaner: z is
/// never positive here, and z < −87 (−∞ included) is clamped to −87, where e^z ≈ 1.6e-38
/// adds nothing measurable. A NaN entry makes both sums NaN.
pub fn exp_sums(x: &[f32], max: f32, inv_t: f32) -> (f64, f64) {
    let mut acc = ExpSums::default();
    let whole = x.len() - x.len() % CHUNK;
    exp_sums_chunks(&x[..whole], max, inv_t, &mut acc);
    acc.finish(&x[whole..], max, inv_t)
}

/// Where [`exp_sums_gather`] collects candidates: the ids of every entry ≥ `threshold` in the
/// blocks whose maximum (from [`block_max`]) is ≥ `threshold`, appended to `ids`.
pub struct Gather<'a> {
    pub blocks: &'a [f32],
    pub threshold: f32,
    pub ids: &'a mut Vec<u32>,
}

/// [`exp_sums`], with the same result, collecting candidates on the way: each selected block
/// is scanned right after the exp pass went over it, while it is still in L1, instead of
/// fetched again from L3 afterwards.
pub fn exp_sums_gather(x: &[f32], max: f32, inv_t: f32, gather: Gather<'_>) -> (f64, f64) {
    const { assert!(CHUNK == BLOCK) };
    let mut acc = ExpSums::default();
    let whole = x.len() - x.len() % CHUNK;
    let mut done = 0;
    for (b, &bm) in gather.blocks.iter().enumerate() {
        if bm >= gather.threshold {
            let start = b * BLOCK;
            let end = (start + BLOCK).min(whole);
            if start < end {
                exp_sums_chunks(&x[done..end], max, inv_t, &mut acc);
                done = end;
            }
            let block = &x[start..(start + BLOCK).min(x.len())];
            collect(block, start, gather.threshold, gather.ids);
        }
    }
    exp_sums_chunks(&x[done..whole], max, inv_t, &mut acc);
    acc.finish(&x[whole..], max, inv_t)
}

/// Running sums of [`exp_sums`]: f64 lanes, fed one [`CHUNK`] at a time, so that splitting
/// the row at chunk boundaries never changes the result.
#[derive(Default)]
struct ExpSums {
    s: [f64; 8],
    sz: [f64; 8],
}

impl ExpSums {
    /// Adds the tail (fewer than [`CHUNK`] entries) and sums the lanes.
    fn finish(self, tail: &[f32], max: f32, inv_t: f32) -> (f64, f64) {
        let mut s = self.s.iter().sum::<f64>();
        let mut sz = self.sz.iter().sum::<f64>();
        for &v in tail {
            let z = (v - max) * inv_t;
            let z = if z < Z_MIN { Z_MIN } else { z };
            let e = exp_in_range(z);
            s += f64::from(e);
            sz += f64::from(z) * f64::from(e);
        }
        (s, sz)
    }
}

/// The exp pass over whole chunks. Each f32 lane sums 4 values, and lanes j and j + 8 are
/// added once more before the move to f64: an error below 5 f32 roundings (3e-7) of the
/// chunk's sum, so of the row's sum too.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx+fma", "aarch64+neon"))]
fn exp_sums_chunks(x: &[f32], max: f32, inv_t: f32, acc: &mut ExpSums) {
    debug_assert_eq!(x.len() % CHUNK, 0);
    let mut s64 = acc.s;
    let mut sz64 = acc.sz;
    for c in x.chunks_exact(CHUNK) {
        let mut s = [0f32; LANES];
        let mut sz = [0f32; LANES];
        for part in c.chunks_exact(LANES) {
            for j in 0..LANES {
                let z = (part[j] - max) * inv_t;
                let z = if z < Z_MIN { Z_MIN } else { z };
                let e = exp_in_range(z);
                s[j] += e;
                sz[j] = z.mul_add(e, sz[j]);
            }
        }
        for j in 0..8 {
            s64[j] += f64::from(s[j] + s[j + 8]);
            sz64[j] += f64::from(sz[j] + sz[j + 8]);
        }
    }
    acc.s = s64;
    acc.sz = sz64;
}

/// Σ e^z of every [`CHUNK`] of the row (the last one may be shorter), z = (x − max)·inv_t,
/// with [`exp_sums`]' arithmetic: lets a draw from the whole row skip to the chunk it lands in.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx+fma", "aarch64+neon"))]
pub fn chunk_sums(x: &[f32], max: f32, inv_t: f32, out: &mut Vec<f64>) {
    out.clear();
    let mut chunks = x.chunks_exact(CHUNK);
    for c in &mut chunks {
        let mut s = [0f32; LANES];
        for part in c.chunks_exact(LANES) {
            for j in 0..LANES {
                let z = (part[j] - max) * inv_t;
                let z = if z < Z_MIN { Z_MIN } else { z };
                s[j] += exp_in_range(z);
            }
        }
        out.push((0..8).map(|j| f64::from(s[j] + s[j + 8])).sum());
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let s = tail.iter().map(|&v| {
            let z = (v - max) * inv_t;
            f64::from(exp_in_range(if z < Z_MIN { Z_MIN } else { z }))
        });
        out.push(s.sum());
    }
}

/// Appends `offset + i` for every `block[i] ≥ threshold`, in order.
///
/// A whole block is compared at once into a 64-bit mask (the compares vectorize; a branch
/// per entry would mispredict on every candidate), then only the set bits are visited.
#[inline]
pub fn collect(block: &[f32], offset: usize, threshold: f32, ids: &mut Vec<u32>) {
    let Ok(b) = <&[f32; BLOCK]>::try_from(block) else {
        for (i, &v) in block.iter().enumerate() {
            if v >= threshold {
                ids.push((offset + i) as u32);
            }
        }
        return;
    };
    let mut flags = [0u8; BLOCK];
    for i in 0..BLOCK {
        flags[i] = u8::from(b[i] >= threshold);
    }
    let mut mask = mask_of(&flags);
    while mask != 0 {
        ids.push(offset as u32 + mask.trailing_zeros());
        mask &= mask - 1;
    }
}

/// Bit j set where `flags[j]` is 1 (every flag 0 or 1; at most 64 of them).
#[inline(always)]
fn mask_of(flags: &[u8]) -> u64 {
    let mut mask = 0u64;
    for (q, eight) in flags.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(eight.try_into().expect("8 bytes"));
        // Every byte is 0 or 1: the multiply moves byte j's bit to bit 56 + j.
        mask |= (w.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (q * 8);
    }
    mask
}

/// Number of entries strictly greater than `v` (a rank over the full row).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn count_greater(x: &[f32], v: f32) -> usize {
    let mut acc = [0u32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    let mut total = 0usize;
    for (i, c) in (&mut chunks).enumerate() {
        for j in 0..LANES {
            acc[j] += u32::from(c[j] > v);
        }
        // Flush before a u32 lane could overflow on absurdly long rows.
        if i % (1 << 20) == (1 << 20) - 1 {
            total += acc.iter().map(|&a| a as usize).sum::<usize>();
            acc = [0; LANES];
        }
    }
    total += acc.iter().map(|&a| a as usize).sum::<usize>();
    total + chunks.remainder().iter().filter(|&&x| x > v).count()
}

/// Σx: the cost of reading the row once, the floor the probe's benchmark compares with.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "x86_64+sse4.1", "aarch64+neon"))]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut z = -87.0f32;
        while z <= 20.0 {
            let want = f64::from(z).exp();
            let got = f64::from(exp(z));
            worst = worst.max(((got - want) / want).abs());
            z += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn passes_match_scalar() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 5.0)
            .collect();
        let mut blocks = Vec::new();
        let m = block_max(&x, &mut blocks);
        assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(blocks.len(), 1000usize.div_ceil(BLOCK));
        let (s, sz) = exp_sums(&x, m, 1.25);
        let (rs, rsz) = x.iter().fold((0f64, 0f64), |(a, b), &v| {
            let z = f64::from((v - m) * 1.25);
            (a + z.exp(), b + z * z.exp())
        });
        assert!((s - rs).abs() / rs < 1e-6);
        assert!((sz - rsz).abs() / rsz.abs() < 1e-6);
        assert_eq!(
            count_greater(&x, 0.0),
            x.iter().filter(|&&v| v > 0.0).count()
        );
        let mut y = x.clone();
        y[500] = f32::NAN;
        assert_eq!(block_max(&y, &mut blocks), m);
        let (s, sz) = exp_sums(&y, m, 1.25);
        assert!(s.is_nan() && sz.is_nan());
        y[500] = f32::NEG_INFINITY;
        assert!(exp_sums(&y, m, 1.25).0.is_finite());
        assert_eq!(block_max(&y, &mut blocks), m);
    }

    #[test]
    fn gathering_changes_nothing_in_the_sums() {
        // 1000 entries: 15 whole blocks and a 40-entry tail, so both paths are covered.
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1009) as f32) * 0.02 - 10.0)
            .collect();
        let mut blocks = Vec::new();
        let m = block_max(&x, &mut blocks);
        for threshold in [f32::NEG_INFINITY, 9.0, 9.9, m, f32::INFINITY] {
            let mut ids = Vec::new();
            let gather = Gather {
                blocks: &blocks,
                threshold,
                ids: &mut ids,
            };
            let got = exp_sums_gather(&x, m, 1.25, gather);
            assert_eq!(got, exp_sums(&x, m, 1.25), "threshold {threshold}");
            let want: Vec<u32> = (0..x.len() as u32)
                .filter(|&i| x[i as usize] >= threshold)
                .collect();
            assert_eq!(ids, want, "threshold {threshold}");
        }
    }
}

/// The upper half of a position's key: the logit's bits as an integer that ascends as the
/// logit descends (−0 after +0, as the bits order them).
#[inline(always)]
pub fn order_key(logit: f32) -> u32 {
    let b = logit.to_bits();
    let ascending = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    !ascending
}

/// The logit whose [`order_key`] is `key`.
#[inline]
pub fn logit_of_key(key: u32) -> f32 {
    let ascending = !key;
    f32::from_bits(if ascending & 0x8000_0000 != 0 {
        ascending & 0x7fff_ffff
    } else {
        !ascending
    })
}

/// A position of the (logit descending, id ascending) order: its key, `order_key` above the
/// id. 0 comes before every entry, `u64::MAX` after every entry.
pub type Position = u64;

/// The position of `id` with `logit`.
#[inline(always)]
pub fn position(logit: f32, id: u32) -> Position {
    (u64::from(order_key(logit)) << 32) | u64::from(id)
}

/// A stretch of a row by logit: the entries above `hi` are summed, those from `hi` down to
/// `lo` (both included) listed one by one. Bounds are logits rather than positions of the
/// (logit desc, id asc) order so that the pass compares floats; ties at a bound, ±0
/// included, are listed, and their order is settled on the list.
#[derive(Debug, Clone, Copy)]
pub struct Bracket {
    pub hi: f32,
    pub lo: f32,
}

impl Bracket {
    /// Holds nothing: every comparison with NaN is false.
    pub const EMPTY: Bracket = Bracket {
        hi: f32::NAN,
        lo: f32::NAN,
    };
}

/// An entry of a row: its position and its sampling weight.
pub type Weighted = (Position, f32);

/// What [`bracket_pass`] found for one [`Bracket`]: Σ weight over the entries above `hi`,
/// and how many they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefixMass {
    pub above: f64,
    pub count_above: usize,
}

/// What [`bracket_pass`] found.
#[derive(Debug, Clone, Copy, Default)]
pub struct BracketPass {
    pub brackets: [PrefixMass; 2],
    /// [`ExpSums64`] over the entries above the first bracket.
    pub sums: ExpSums64,
    /// The row's smallest non-zero weight (∞ when there is none): with the weight at a
    /// bracket's `lo`, tells whether f64 sums of the weights there are exact (see `nucleus`).
    pub min_weight: f32,
}

/// Σe^z and Σz·e^z in f64, z = (l − max)·inv_t in f64 (entries of −∞ add nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExpSums64 {
    pub s: f64,
    pub sz: f64,
}

/// The lists and scratch of [`bracket_pass`]; reused from row to row.
#[derive(Default)]
pub struct BracketLists {
    /// The entries inside each bracket, in id order.
    pub between: [Vec<Weighted>; 2],
    /// The row's sampling weights.
    pub weights: Vec<f32>,
}

/// For a top-p sampler, which needs two places in the (logit desc, id asc) order (the
/// nucleus's end and the draw): the sampling weights of the row (`exp` of (l − max)·inv_t,
/// the sampler's bits); for each of two brackets, [`PrefixMass`] and the entries inside it,
/// in id order; and [`ExpSums64`] over the entries above the first bracket, for the
/// nucleus's description. The f64 lanes add in another order than a walk of the sorted
/// order: the caller checks that every such sum is exact before it relies on it.
///
/// Separate passes, each a loop LLVM vectorizes: fused into one loop, the mix of f32, f64
/// and integer lanes came out scalar and several times slower than all of them together.
pub fn bracket_pass(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    inv_t64: f64,
    brackets: [Bracket; 2],
    lists: &mut BracketLists,
) -> BracketPass {
    let BracketLists {
        between: [list0, list1],
        weights,
    } = lists;
    list0.clear();
    list1.clear();
    exp_weights(logits, max, inv_t, weights);
    let brackets_mass = prefix_masses(logits, weights, brackets);
    list_brackets(logits, weights, brackets, [list0, list1]);
    BracketPass {
        brackets: brackets_mass,
        // An empty first bracket (a search that has its nucleus and looks for the draw)
        // needs no sums.
        sums: if brackets[0].hi.is_nan() {
            ExpSums64::default()
        } else {
            exp_sums64_above(logits, max, inv_t64, brackets[0].hi)
        },
        // Only a bracket open to the end of the row needs the row's smallest weight.
        min_weight: if brackets.iter().any(|b| b.lo == f32::NEG_INFINITY) {
            min_positive(weights)
        } else {
            f32::INFINITY
        },
    }
}

/// The smallest non-zero weight (∞ when there is none).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
fn min_positive(weights: &[f32]) -> f32 {
    let mut m = [f32::INFINITY; 16];
    let mut chunks = weights.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            let v = if c[j] > 0.0 { c[j] } else { f32::INFINITY };
            m[j] = if v < m[j] { v } else { m[j] };
        }
    }
    let rest = chunks.remainder().iter().filter(|&&w| w > 0.0);
    m.iter().chain(rest).copied().fold(f32::INFINITY, f32::min)
}

/// [`PrefixMass`] above each of two brackets' `hi`: reductions only, so that the loop stays
/// in vector lanes (storing a per-entry flag from the same loop made LLVM move each
/// comparison out of its mask register one lane at a time, and cost six exp passes).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
fn prefix_masses(logits: &[f32], weights: &[f32], brackets: [Bracket; 2]) -> [PrefixMass; 2] {
    const L: usize = 8;
    let [b0, b1] = brackets;
    let (mut a0, mut a1) = ([0f64; L], [0f64; L]);
    let (mut n0, mut n1) = ([0u32; L], [0u32; L]);
    let n = logits.len().min(weights.len());
    let whole = n - n % L;
    for (lc, wc) in logits[..whole]
        .chunks_exact(L)
        .zip(weights[..whole].chunks_exact(L))
    {
        for j in 0..L {
            let (up0, up1) = (u32::from(lc[j] > b0.hi), u32::from(lc[j] > b1.hi));
            // The weight's bits under an all-ones or all-zeros mask: no select, which LLVM
            // may compile to a branch that mispredicts on every other entry of a flat row.
            let w = wc[j].to_bits();
            a0[j] += f64::from(f32::from_bits(w & up0.wrapping_neg()));
            a1[j] += f64::from(f32::from_bits(w & up1.wrapping_neg()));
            n0[j] += up0;
            n1[j] += up1;
        }
    }
    let fold = |a: [f64; L], c: [u32; L]| PrefixMass {
        above: a.iter().sum(),
        count_above: c.iter().map(|&c| c as usize).sum(),
    };
    let mut out = [fold(a0, n0), fold(a1, n1)];
    for i in whole..n {
        for (q, b) in brackets.iter().enumerate() {
            if logits[i] > b.hi {
                out[q].above += f64::from(weights[i]);
                out[q].count_above += 1;
            }
        }
    }
    out
}

/// Appends the entries inside each bracket (from `hi` down to `lo`, both included), with
/// their weights, to the bracket's list in id order. A [`BLOCK`] of comparisons at a time
/// into a bit mask, then only its set bits are visited: a branch per entry would mispredict
/// on every listed one.
fn list_brackets(
    logits: &[f32],
    weights: &[f32],
    brackets: [Bracket; 2],
    lists: [&mut Vec<Weighted>; 2],
) {
    let n = logits.len().min(weights.len());
    let (logits, weights) = (&logits[..n], &weights[..n]);
    // `&`, not `&&`: both comparisons in vector lanes, no branch.
    let inside = |b: &Bracket, l: f32| (l >= b.lo) & (l <= b.hi);
    for (q, out) in lists.into_iter().enumerate() {
        let b = brackets[q];
        // An empty bracket's NaN `lo`: l ≥ NaN is false for every entry.
        if b.lo.is_nan() {
            continue;
        }
        // Pushed to a local: through the `&mut`, every push reloaded the length and the
        // capacity from memory (the stores of the entries might have changed them).
        let mut list = std::mem::take(out);
        let mut blocks = logits.chunks_exact(BLOCK);
        for (g, block) in (&mut blocks).enumerate() {
            let block: &[f32; BLOCK] = block.try_into().expect("a whole block");
            let mut mask = 0u64;
            for (j, &l) in block.iter().enumerate() {
                mask |= u64::from(inside(&b, l)) << j;
            }
            while mask != 0 {
                let i = g * BLOCK + mask.trailing_zeros() as usize;
                list.push((position(logits[i], i as u32), weights[i]));
                mask &= mask - 1;
            }
        }
        let start = n - blocks.remainder().len();
        for i in start..n {
            if inside(&b, logits[i]) {
                list.push((position(logits[i], i as u32), weights[i]));
            }
        }
        *out = list;
    }
}

/// [`ExpSums64`] of the entries above `hi` (with `hi` = −∞, of every entry but −∞).
#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx+fma", "aarch64+neon"))]
pub fn exp_sums64_above(logits: &[f32], max: f32, inv_t64: f64, hi: f32) -> ExpSums64 {
    const L: usize = 8;
    let max64 = f64::from(max);
    let (mut s, mut sz) = ([0f64; L], [0f64; L]);
    for c in logits.chunks_exact(L) {
        for j in 0..L {
            // e^z under an all-ones or all-zeros mask rather than a select, and z·e^z as one
            // fused multiply-add: the forms LLVM vectorizes. A select of f64 lanes by an f32
            // compare, or a separate multiply and add, left this loop scalar, 8× slower, and
            // a branch on the compare mispredicts on every other entry of a flat row.
            let (z, e) = exp64_term(c[j], max64, inv_t64);
            let keep = u64::from(c[j] > hi).wrapping_neg();
            let e = f64::from_bits(e.to_bits() & keep);
            s[j] += e;
            sz[j] = z.mul_add(e, sz[j]);
        }
    }
    let mut out = ExpSums64 {
        s: s.iter().sum(),
        sz: sz.iter().sum(),
    };
    for &l in logits.chunks_exact(L).remainder() {
        if l > hi {
            let (z, e) = exp64_term(l, max64, inv_t64);
            out.s += e;
            out.sz = z.mul_add(e, out.sz);
        }
    }
    out
}

/// z = (l − max)·inv_t in f64, clamped at −708 so that z·e^z stays finite for −∞ (the
/// caller masks such entries out), and e^z.
#[inline(always)]
fn exp64_term(l: f32, max64: f64, inv_t64: f64) -> (f64, f64) {
    // `max`, not an `if`: written as a comparison, the clamp kept the loops scalar.
    let z = ((f64::from(l) - max64) * inv_t64).max(-708.0);
    (z, exp64(z))
}

/// e^x for −708 ≤ x ≤ 0 in f64 ([`exp64_term`] clamps): Cody–Waite reduction to |r| ≤ ln2/2 and a
/// degree-11 Taylor polynomial in fused multiply-adds (truncation 6e-15 relative; within
/// 1e-14 of `f64::exp`). Half the instructions of `compare`'s exponential, whose bits that
/// command keeps.
#[inline(always)]
fn exp64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: the high part has trailing zero bits, so n·LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52: adding it rounds to an integer
    let k = x.mul_add(LOG2E, MAGIC);
    let n = k - MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    // Horner form of Σ r^i / i!, i = 0..11, written out: as a loop over the coefficients
    // it was left rolled, and the row passes around it stayed scalar.
    let p = (1.0f64 / 39_916_800.0).mul_add(r, 1.0 / 3_628_800.0);
    let p = p.mul_add(r, 1.0 / 362_880.0);
    let p = p.mul_add(r, 1.0 / 40_320.0);
    let p = p.mul_add(r, 1.0 / 5_040.0);
    let p = p.mul_add(r, 1.0 / 720.0);
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let bits = (k.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    p * f64::from_bits(((bits + 1023) as u64) << 52)
}
