//! Q2_K, Q3_K, Q4_K and Q6_K products of fewer than 8 rows, summed as ggml's tiled K-quant kernel sums
//! them, so that those weights can run the tiled kernel (from 8 rows, where llama.cpp takes
//! it) under the batch-invariant kernels.
//!
//! The tiled kernel (ggml-cpu/tiled, its AVX-512 VNNI microkernel) makes, per weight row,
//! activation row and 256-value super-block, two exact integer sums: `s1`, the sub-blocks'
//! dot products times their scales (the codes' bias taken out through the activation's
//! per-16 sums), and `s2`, the mins times those sums (Q2_K and Q4_K have mins). It then rounds
//! `r = fnmadd(dmin, s2, s1·d)` in f32 and accumulates `acc + r·d_act` over the super-blocks
//! in order. Integer sums are exact in any order, so this module computes them as ggml's
//! one-row dot products do (AVX2 multiply-adds) and repeats the float steps exactly: a single
//! token gets the numbers it gets inside any batch, at the one-row kernel's speed, where the
//! tiled kernel itself, run for one row, decodes at a third of it.
//!
//! Built where the tiled kernel is the VNNI one (AVX-512 VNNI, VL and DQ); elsewhere, and for
//! the other K-quants (Q5_K and the i-quants), the batch-invariant kernels keep ggml's one-row products for every
//! row count.

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
))]
pub(super) use imp::{product, takes};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
)))]
pub(super) use other::{product, takes};

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
))]
mod imp {
    use std::arch::x86_64::*;

    use llama_cpp_sys_2::{
        ggml_tensor, ggml_type, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K,
    };

    use super::super::tinyblas::{Activations, ComputeParams};

    /// Values per super-block.
    const QK: usize = 256;

    #[repr(C)]
    struct BlockQ4K {
        d: u16,
        dmin: u16,
        scales: [u8; 12],
        qs: [u8; QK / 2],
    }

    #[repr(C)]
    struct BlockQ2K {
        scales: [u8; QK / 16],
        qs: [u8; QK / 4],
        d: u16,
        dmin: u16,
    }

    #[repr(C)]
    struct BlockQ3K {
        hmask: [u8; QK / 8],
        qs: [u8; QK / 4],
        scales: [u8; 12],
        d: u16,
    }

    #[repr(C)]
    struct BlockQ6K {
        ql: [u8; QK / 2],
        qh: [u8; QK / 4],
        scales: [i8; QK / 16],
        d: u16,
    }

    /// ggml's `block_q8_K`: the activations as the K-quant products take them.
    #[repr(C)]
    struct BlockQ8K {
        d: f32,
        qs: [i8; QK],
        bsums: [i16; QK / 16],
    }

    const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
    const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
    const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
    const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
    const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

    /// Whether this module multiplies weights of this type.
    pub(in super::super) fn takes(weights: ggml_type) -> bool {
        matches!(
            weights,
            GGML_TYPE_Q2_K | GGML_TYPE_Q3_K | GGML_TYPE_Q4_K | GGML_TYPE_Q6_K
        )
    }

    /// `dst = src0 · x` for each of the (fewer than 8) activation rows, this thread's share of
    /// src0's rows.
    ///
    /// # Safety
    /// As `tinyblas::invariant_product`, with `x` converted to Q8_K at `activations` and src0 of
    /// a type [`takes`] accepts.
    pub(in super::super) unsafe fn product(
        p: &ComputeParams,
        d: &ggml_tensor,
        w: &ggml_tensor,
        activations: &Activations,
        r2: i64,
        r3: i64,
    ) {
        let (m, blocks) = (w.ne[1], w.ne[0] as usize / QK);
        let (ith, nth) = (p.ith as i64, p.nth as i64);
        let (first, end) = (ith * m / nth, (ith + 1) * m / nth);
        for i3 in 0..d.ne[3] {
            for i2 in 0..d.ne[2] {
                for i1 in 0..d.ne[1] {
                    // SAFETY: offsets inside src0 (broadcast as ggml does), the converted rows
                    // and dst, by their own strides.
                    unsafe {
                        let rows = (w.data as *const u8)
                            .add((i2 / r2) as usize * w.nb[2] + (i3 / r3) as usize * w.nb[3]);
                        let y = activations.data.add(
                            i1 as usize * activations.row
                                + i2 as usize * activations.plane
                                + i3 as usize * activations.volume,
                        ) as *const BlockQ8K;
                        let out = (d.data as *mut u8).add(
                            i1 as usize * d.nb[1] + i2 as usize * d.nb[2] + i3 as usize * d.nb[3],
                        ) as *mut f32;
                        for i in first..end {
                            let x = rows.add(i as usize * w.nb[1]);
                            *out.add(i as usize) = match w.type_ {
                                GGML_TYPE_Q2_K => dot_q2_k(x as *const BlockQ2K, y, blocks),
                                GGML_TYPE_Q3_K => dot_q3_k(x as *const BlockQ3K, y, blocks),
                                GGML_TYPE_Q4_K => dot_q4_k(x as *const BlockQ4K, y, blocks),
                                _ => dot_q6_k(x as *const BlockQ6K, y, blocks),
                            };
                        }
                    }
                }
            }
        }
    }

    /// The tiled kernel's float steps for one super-block, added to `acc`.
    #[inline(always)]
    fn accumulate(acc: f32, s1: i32, s2: i32, d: f32, dmin: f32, d_act: f32) -> f32 {
        let r = (-dmin).mul_add(s2 as f32, s1 as f32 * d);
        r.mul_add(d_act, acc)
    }

    /// `pshufb` masks that spread the i16 scales of sub-blocks 2g (low lane) and 2g + 1 (high
    /// lane) over a 32-value group's 16-bit products, for groups g = 0..4 of a half block whose
    /// eight scales sit in both lanes: bytes 4g, 4g + 1 repeated in the low lane, 4g + 2,
    /// 4g + 3 in the high one.
    const GROUP_SCALES: [[u8; 32]; 4] = {
        let mut masks = [[0u8; 32]; 4];
        let mut g = 0;
        while g < 4 {
            let mut i = 0;
            while i < 32 {
                let first = if i < 16 { 4 * g } else { 4 * g + 2 };
                masks[g][i] = (first + (i & 1)) as u8;
                i += 1;
            }
            g += 1;
        }
        masks
    };

    /// The four groups' scale vectors of a half block (see [`GROUP_SCALES`]).
    #[inline(always)]
    fn group_scales(half: __m256i) -> [__m256i; 4] {
        // SAFETY: AVX2 register operations; each mask is 32 bytes.
        unsafe {
            GROUP_SCALES.map(|m| {
                _mm256_shuffle_epi8(half, _mm256_loadu_si256(m.as_ptr() as *const __m256i))
            })
        }
    }

    /// Sixteen i8 sub-block scales as i16, each half block's eight in both lanes.
    #[inline(always)]
    fn halves(scales: __m128i) -> [__m256i; 2] {
        // SAFETY: AVX2 register operations.
        unsafe {
            let all = _mm256_cvtepi8_epi16(scales);
            let (lo, hi) = (
                _mm256_castsi256_si128(all),
                _mm256_extracti128_si256::<1>(all),
            );
            [_mm256_set_m128i(lo, lo), _mm256_set_m128i(hi, hi)]
        }
    }

    /// One Q2_K row times one Q8_K row.
    ///
    /// # Safety
    /// `x` and `y` hold `blocks` super-blocks each.
    unsafe fn dot_q2_k(x: *const BlockQ2K, y: *const BlockQ8K, blocks: usize) -> f32 {
        let mut acc = 0.0f32;
        // SAFETY: the caller's bounds; AVX2 is on wherever this module is built.
        unsafe {
            let (m3, m4) = (_mm256_set1_epi8(3), _mm_set1_epi8(0x0F));
            for b in 0..blocks {
                let (xb, yb) = (&*x.add(b), &*y.add(b));
                // One byte per 16-value sub-block: its scale in the low nibble, its min in the
                // high one.
                let packed = _mm_loadu_si128(xb.scales.as_ptr() as *const __m128i);
                let mins = _mm256_cvtepi8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4));
                let bsums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let min_sums = _mm256_madd_epi16(mins, bsums);
                let scales = halves(_mm_and_si128(packed, m4));
                let mut sums = _mm256_setzero_si256();
                for (h, half) in scales.into_iter().enumerate() {
                    let q = _mm256_loadu_si256(xb.qs.as_ptr().add(32 * h) as *const __m256i);
                    let codes = [
                        _mm256_and_si256(q, m3),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(q), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(q), m3),
                    ];
                    for (g, (u, scale)) in codes.into_iter().zip(group_scales(half)).enumerate() {
                        let yv = _mm256_loadu_si256(
                            yb.qs.as_ptr().add(128 * h + 32 * g) as *const __m256i
                        );
                        sums = _mm256_add_epi32(
                            sums,
                            _mm256_madd_epi16(scale, _mm256_maddubs_epi16(u, yv)),
                        );
                    }
                }
                let (s1, s2) = hsum2_i32(sums, min_sums);
                acc = accumulate(acc, s1, s2, f16(xb.d), f16(xb.dmin), yb.d);
            }
        }
        acc
    }

    /// One Q3_K row times one Q8_K row.
    ///
    /// # Safety
    /// `x` and `y` hold `blocks` super-blocks each.
    unsafe fn dot_q3_k(x: *const BlockQ3K, y: *const BlockQ8K, blocks: usize) -> f32 {
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        let mut acc = 0.0f32;
        // SAFETY: the caller's bounds; AVX2 is on wherever this module is built.
        unsafe {
            let (m3, four, zero) = (
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(4),
                _mm256_setzero_si256(),
            );
            for b in 0..blocks {
                let (xb, yb) = (&*x.add(b), &*y.add(b));
                // Sixteen 6-bit scales, stored with a bias of 32 (ggml's packing).
                let word =
                    |i: usize| u32::from_le_bytes(xb.scales[4 * i..4 * i + 4].try_into().unwrap());
                let (a0, a1, a2) = (word(0), word(1), word(2));
                let packed = _mm_sub_epi8(
                    _mm_set_epi32(
                        (((a1 >> 4) & LOW4) | (((a2 >> 6) & LOW2) << 4)) as i32,
                        (((a0 >> 4) & LOW4) | (((a2 >> 4) & LOW2) << 4)) as i32,
                        ((a1 & LOW4) | ((a2 >> 2) & LOW2) << 4) as i32,
                        ((a0 & LOW4) | (a2 & LOW2) << 4) as i32,
                    ),
                    _mm_set1_epi8(32),
                );
                let hbits = _mm256_loadu_si256(xb.hmask.as_ptr() as *const __m256i);
                let scales = halves(packed);
                let mut sums = _mm256_setzero_si256();
                for (h, half) in scales.into_iter().enumerate() {
                    let q = _mm256_loadu_si256(xb.qs.as_ptr().add(32 * h) as *const __m256i);
                    // The codes as the tiled kernel holds them, 0..8: two low bits, and 4 where
                    // the high bit is set (the value is that code minus 4).
                    let high = |bit: i32| {
                        let mask = _mm256_set1_epi8(1 << bit);
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, mask), zero);
                        _mm256_andnot_si256(set, four)
                    };
                    let codes = [
                        _mm256_or_si256(_mm256_and_si256(q, m3), high(4 * h as i32)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<2>(q), m3),
                            high(4 * h as i32 + 1),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m3),
                            high(4 * h as i32 + 2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<6>(q), m3),
                            high(4 * h as i32 + 3),
                        ),
                    ];
                    for (g, (u, scale)) in codes.into_iter().zip(group_scales(half)).enumerate() {
                        let yv = _mm256_loadu_si256(
                            yb.qs.as_ptr().add(128 * h + 32 * g) as *const __m256i
                        );
                        sums = _mm256_add_epi32(
                            sums,
                            _mm256_madd_epi16(scale, _mm256_maddubs_epi16(u, yv)),
                        );
                    }
                }
                // Take the codes' bias out: 4 × each sub-block's scaled sum of activations.
                let bsums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let bias =
                    _mm256_slli_epi32::<2>(_mm256_madd_epi16(_mm256_cvtepi8_epi16(packed), bsums));
                let s1 = hsum_i32(_mm256_sub_epi32(sums, bias));
                acc = accumulate(acc, s1, 0, f16(xb.d), 0.0, yb.d);
            }
        }
        acc
    }

    /// One Q4_K row times one Q8_K row.
    ///
    /// # Safety
    /// `x` and `y` hold `blocks` super-blocks each.
    unsafe fn dot_q4_k(x: *const BlockQ4K, y: *const BlockQ8K, blocks: usize) -> f32 {
        let mut acc = 0.0f32;
        // SAFETY: the caller's bounds; AVX2 is on wherever this module is built.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            for b in 0..blocks {
                let (xb, yb) = (&*x.add(b), &*y.add(b));
                let (scales, mins) = q4_k_scales(&xb.scales);
                let mut sums = _mm256_setzero_si256();
                for j in 0..4 {
                    let q = _mm256_loadu_si256(xb.qs.as_ptr().add(32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(q, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
                    let ylo = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * j) as *const __m256i);
                    let yhi = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * j + 32) as *const __m256i);
                    let plo = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(lo, ylo),
                        _mm256_set1_epi16(scales[2 * j] as i16),
                    );
                    let phi = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, yhi),
                        _mm256_set1_epi16(scales[2 * j + 1] as i16),
                    );
                    sums = _mm256_add_epi32(sums, _mm256_add_epi32(plo, phi));
                }
                let s1 = hsum_i32(sums);
                // Σ mins × (the activation's sums over each 32 values), in 16-bit pairs.
                let bsums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let pairs = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                );
                let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(mins.as_ptr() as *const __m128i));
                let s2 = hsum_i32_128(_mm_madd_epi16(mins, pairs));
                acc = accumulate(acc, s1, s2, f16(xb.d), f16(xb.dmin), yb.d);
            }
        }
        acc
    }

    /// One Q6_K row times one Q8_K row.
    ///
    /// # Safety
    /// `x` and `y` hold `blocks` super-blocks each.
    unsafe fn dot_q6_k(x: *const BlockQ6K, y: *const BlockQ8K, blocks: usize) -> f32 {
        let mut acc = 0.0f32;
        // SAFETY: the caller's bounds; AVX2 is on wherever this module is built.
        unsafe {
            let (low, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
            for b in 0..blocks {
                let (xb, yb) = (&*x.add(b), &*y.add(b));
                let mut sums = _mm256_setzero_si256();
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(xb.ql.as_ptr().add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(xb.ql.as_ptr().add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(xb.qh.as_ptr().add(32 * h) as *const __m256i);
                    let high = |shift: __m128i| {
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, shift), two))
                    };
                    let codes = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low), high(_mm_cvtsi32_si128(0))),
                        _mm256_or_si256(_mm256_and_si256(ql1, low), high(_mm_cvtsi32_si128(2))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                            high(_mm_cvtsi32_si128(4)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                            high(_mm_cvtsi32_si128(6)),
                        ),
                    ];
                    for (g, u) in codes.into_iter().enumerate() {
                        // Values 128h + 32g .. + 32: sub-blocks s and s + 1 of 16 values each.
                        let s = 8 * h + 2 * g;
                        let yv = _mm256_loadu_si256(
                            yb.qs.as_ptr().add(128 * h + 32 * g) as *const __m256i
                        );
                        let scale = _mm256_set_m128i(
                            _mm_set1_epi16(xb.scales[s + 1] as i16),
                            _mm_set1_epi16(xb.scales[s] as i16),
                        );
                        sums = _mm256_add_epi32(
                            sums,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u, yv), scale),
                        );
                    }
                }
                // The codes are stored with a bias of 32: take 32 × each sub-block's
                // scaled sum of activations out.
                let scales =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.scales.as_ptr() as *const __m128i));
                let bsums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let bias = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bsums));
                let s1 = hsum_i32(_mm256_sub_epi32(sums, bias));
                acc = accumulate(acc, s1, 0, f16(xb.d), 0.0, yb.d);
            }
        }
        acc
    }

    /// Q4_K's eight 6-bit scales and eight 6-bit mins (ggml's packing), unpacked four bytes
    /// at a time.
    #[inline(always)]
    fn q4_k_scales(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().unwrap());
        let (w0, w1, w2) = (word(0), word(1), word(2));
        let scales_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
        let mins_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
        let mut scales = [0u8; 8];
        let mut mins = [0u8; 8];
        scales[..4].copy_from_slice(&(w0 & LOW6).to_le_bytes());
        scales[4..].copy_from_slice(&scales_hi.to_le_bytes());
        mins[..4].copy_from_slice(&(w1 & LOW6).to_le_bytes());
        mins[4..].copy_from_slice(&mins_hi.to_le_bytes());
        (scales, mins)
    }

    #[inline(always)]
    fn hsum_i32_128(q: __m128i) -> i32 {
        // SAFETY: SSE2 register operations.
        unsafe {
            let q = _mm_add_epi32(q, _mm_unpackhi_epi64(q, q));
            let q = _mm_add_epi32(q, _mm_shuffle_epi32::<1>(q));
            _mm_cvtsi128_si32(q)
        }
    }

    /// The lane sums of two vectors.
    #[inline(always)]
    fn hsum2_i32(a: __m256i, b: __m256i) -> (i32, i32) {
        // SAFETY: AVX2 register operations.
        unsafe {
            let pairs = _mm256_hadd_epi32(a, b);
            let q = _mm_add_epi32(
                _mm256_castsi256_si128(pairs),
                _mm256_extracti128_si256::<1>(pairs),
            );
            let q = _mm_hadd_epi32(q, q);
            (_mm_cvtsi128_si32(q), _mm_extract_epi32::<1>(q))
        }
    }

    #[inline(always)]
    fn hsum_i32(v: __m256i) -> i32 {
        // SAFETY: AVX2 register operations.
        unsafe {
            let q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let q = _mm_add_epi32(q, _mm_unpackhi_epi64(q, q));
            let q = _mm_add_epi32(q, _mm_shuffle_epi32::<1>(q));
            _mm_cvtsi128_si32(q)
        }
    }

    /// [`dot_q4_k`] on bytes, for the tests.
    #[cfg(all(
        test,
        target_feature = "avx512vnni",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    ))]
    pub(super) unsafe fn dot_q4_k_for_test(x: *const u8, y: *const u8, blocks: usize) -> f32 {
        // SAFETY: the caller's.
        unsafe { dot_q4_k(x.cast(), y.cast(), blocks) }
    }

    /// [`dot_q2_k`] on bytes, for the tests.
    #[cfg(all(
        test,
        target_feature = "avx512vnni",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    ))]
    pub(super) unsafe fn dot_q2_k_for_test(x: *const u8, y: *const u8, blocks: usize) -> f32 {
        // SAFETY: the caller's.
        unsafe { dot_q2_k(x.cast(), y.cast(), blocks) }
    }

    /// [`dot_q3_k`] on bytes, for the tests.
    #[cfg(all(
        test,
        target_feature = "avx512vnni",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    ))]
    pub(super) unsafe fn dot_q3_k_for_test(x: *const u8, y: *const u8, blocks: usize) -> f32 {
        // SAFETY: the caller's.
        unsafe { dot_q3_k(x.cast(), y.cast(), blocks) }
    }

    /// [`dot_q6_k`] on bytes, for the tests.
    #[cfg(all(
        test,
        target_feature = "avx512vnni",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    ))]
    pub(super) unsafe fn dot_q6_k_for_test(x: *const u8, y: *const u8, blocks: usize) -> f32 {
        // SAFETY: the caller's.
        unsafe { dot_q6_k(x.cast(), y.cast(), blocks) }
    }

    /// An F16 value as f32.
    #[inline(always)]
    fn f16(h: u16) -> f32 {
        // SAFETY: F16C is on wherever this module is built.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) }
    }
}

/// Elsewhere no K-quant is routed here.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
)))]
mod other {
    use llama_cpp_sys_2::{ggml_tensor, ggml_type};

    use super::super::tinyblas::{Activations, ComputeParams};

    pub(in super::super) fn takes(_: ggml_type) -> bool {
        false
    }

    pub(in super::super) unsafe fn product(
        _: &ComputeParams,
        _: &ggml_tensor,
        _: &ggml_tensor,
        _: &Activations,
        _: i64,
        _: i64,
    ) {
        unreachable!("no K-quant is routed to kquants on this target")
    }
}

#[cfg(all(
    test,
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c",
    target_feature = "avx512vnni",
    target_feature = "avx512vl",
    target_feature = "avx512dq"
))]
mod tests {
    use llama_cpp_sys_2 as sys;

    use super::imp::{dot_q2_k_for_test, dot_q3_k_for_test, dot_q4_k_for_test, dot_q6_k_for_test};

    /// ggml's own product of 8 rows (its tiled kernel, the fastest kernels being on) against
    /// this module's sums of each row alone: bit for bit.
    fn tiled_equals_one_row(
        ty: sys::ggml_type,
        dot: unsafe fn(*const u8, *const u8, usize) -> f32,
    ) {
        const K: usize = 512;
        const M: usize = 32;
        const N: usize = 8;
        let mut rand = super::super::tests::uniform(0x2545_f491_4f6c_dd1d);
        let weights: Vec<f32> = (0..K * M).map(|_| rand()).collect();
        let acts: Vec<f32> = (0..K * N).map(|_| 3.0 * rand()).collect();
        // SAFETY: a ggml context of its own, tensors made in it, freed at the end.
        unsafe {
            sys::ggml_cpu_init();
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: 64 << 20,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            let w = sys::ggml_new_tensor_2d(ctx, ty, K as i64, M as i64);
            sys::ggml_quantize_chunk(
                ty,
                weights.as_ptr(),
                (*w).data,
                0,
                M as i64,
                K as i64,
                std::ptr::null(),
            );
            let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, K as i64, N as i64);
            std::ptr::copy_nonoverlapping(acts.as_ptr(), (*x).data as *mut f32, K * N);
            let y = sys::ggml_mul_mat(ctx, w, x);
            let graph = sys::ggml_new_graph(ctx);
            sys::ggml_build_forward_expand(graph, y);
            sys::ggml_graph_compute_with_ctx(ctx, graph, 1);
            let from_float = (*sys::ggml_get_type_traits_cpu(sys::GGML_TYPE_Q8_K))
                .from_float
                .unwrap();
            let row = sys::ggml_row_size(ty, K as i64);
            let mut q8 = vec![0u8; sys::ggml_row_size(sys::GGML_TYPE_Q8_K, K as i64)];
            for j in 0..N {
                from_float(acts[j * K..].as_ptr(), q8.as_mut_ptr().cast(), K as i64);
                for i in 0..M {
                    let ours = dot((*w).data.cast::<u8>().add(i * row), q8.as_ptr(), K / 256);
                    let ggml = *((*y).data as *const f32).add(j * M + i);
                    assert_eq!(
                        ours.to_bits(),
                        ggml.to_bits(),
                        "row {i}, column {j}: {ours} vs {ggml}"
                    );
                }
            }
            sys::ggml_free(ctx);
        }
    }

    #[test]
    fn q2_k_rows_are_summed_as_the_tiled_kernel_sums_them() {
        tiled_equals_one_row(sys::GGML_TYPE_Q2_K, dot_q2_k_for_test);
    }

    #[test]
    fn q3_k_rows_are_summed_as_the_tiled_kernel_sums_them() {
        tiled_equals_one_row(sys::GGML_TYPE_Q3_K, dot_q3_k_for_test);
    }

    #[test]
    fn q4_k_rows_are_summed_as_the_tiled_kernel_sums_them() {
        tiled_equals_one_row(sys::GGML_TYPE_Q4_K, dot_q4_k_for_test);
    }

    #[test]
    fn q6_k_rows_are_summed_as_the_tiled_kernel_sums_them() {
        tiled_equals_one_row(sys::GGML_TYPE_Q6_K, dot_q6_k_for_test);
    }
}
