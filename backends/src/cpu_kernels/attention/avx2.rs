//! The tiled flash attention's float steps in AVX2's eight lanes, as ggml built for AVX2 and
//! FMA makes them (`ggml_v_expf` and `ggml_vec_soft_max_f32`'s sums differ by vector width;
//! the K·Q and V chains run along one lane each and do not).

use std::arch::x86_64::*;

use super::imp::{f16_to_f32, Cache, C1, C2, C3, C4, C5, LN2_HI, LN2_LO, LOG2E, ROUND, TILE_KV};

/// A row's mask over the tile's `cells` cells as f32 (−∞ past them); whether any is
/// not −∞.
///
/// # Safety
/// `mask` covers `cells` F16 values; `out` holds a tile.
#[inline(always)]
pub(super) unsafe fn mask_tile(mask: *const u16, cells: usize, out: &mut [f32]) -> bool {
    let mut seen = 0i32;
    // SAFETY: the caller's bounds; F16C conversions and AVX compares.
    unsafe {
        let hidden = _mm256_set1_ps(f32::NEG_INFINITY);
        for t in (0..TILE_KV).step_by(8) {
            let x = if t + 8 <= cells {
                _mm256_cvtph_ps(_mm_loadu_si128(mask.add(t) as *const __m128i))
            } else {
                let mut part = [f32::NEG_INFINITY; 8];
                for (i, p) in part.iter_mut().enumerate().take(cells.saturating_sub(t)) {
                    *p = f16_to_f32(*mask.add(t + i));
                }
                _mm256_loadu_ps(part.as_ptr())
            };
            _mm256_storeu_ps(out.as_mut_ptr().add(t), x);
            seen |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_OQ>(x, hidden));
        }
    }
    seen != 0
}

/// The tile's K, `cells` cells from `c0`, as f32 with the cells along rows:
/// `kt[d·64 + t]` (ggml's `K_f32`); the columns past `cells` are zero.
///
/// # Safety
/// `cells` cells from `c0` lie in the cache.
pub(super) unsafe fn pack_k(cache: &Cache, c0: usize, cells: usize, kt: &mut [f32]) {
    // SAFETY: the caller's bounds; F16C conversions and AVX shuffles.
    unsafe {
        for t0 in (0..TILE_KV).step_by(8) {
            for d0 in (0..cache.dk).step_by(8) {
                let mut block = [_mm256_setzero_ps(); 8];
                for (i, b) in block.iter_mut().enumerate() {
                    if t0 + i < cells {
                        let src = cache.k.add((c0 + t0 + i) * cache.k_row) as *const u16;
                        *b = _mm256_cvtph_ps(_mm_loadu_si128(src.add(d0) as *const __m128i));
                    }
                }
                transpose8(&mut block);
                for (i, b) in block.iter().enumerate() {
                    _mm256_storeu_ps(kt.as_mut_ptr().add((d0 + i) * TILE_KV + t0), *b);
                }
            }
        }
    }
}

/// The tile's V, `cells` cells from `c0`, as f32 rows (`v32[t·DV + d]`, ggml's `V32`);
/// the rows past `cells` are zero.
///
/// # Safety
/// As [`pack_k`].
pub(super) unsafe fn pack_v(cache: &Cache, c0: usize, cells: usize, v32: &mut [f32]) {
    let dv = cache.dv;
    // SAFETY: the caller's bounds; F16C conversions.
    unsafe {
        for t in 0..cells {
            let src = cache.v.add((c0 + t) * cache.v_row) as *const u16;
            for d in (0..dv).step_by(8) {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(src.add(d) as *const __m128i));
                _mm256_storeu_ps(v32.as_mut_ptr().add(t * dv + d), x);
            }
        }
    }
    v32[cells * dv..TILE_KV * dv].fill(0.0);
}

/// A row's 64 scores of the tile: K·q as ggml's `simd_gemm` sums it (a fused
/// multiply-add chain along the head's width, from zero), times `scale`.
///
/// # Safety
/// `q` covers DK floats; `kt` holds the transposed tile.
#[inline(always)]
pub(super) unsafe fn scores(q: *const f32, kt: &[f32], dk: usize, scale: f32, kq: &mut [f32]) {
    // SAFETY: the caller's bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); TILE_KV / 8];
        let kt = kt.as_ptr();
        for d in 0..dk {
            let qd = _mm256_set1_ps(*q.add(d));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(kt.add(d * TILE_KV + 8 * i)), qd, *a);
            }
        }
        let sv = _mm256_set1_ps(scale);
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(kq.as_mut_ptr().add(8 * i), _mm256_mul_ps(*a, sv));
        }
    }
}

/// `kq ← e^(kq − max)` and their sum, as `ggml_vec_soft_max_f32` makes them: eight at a
/// time with ggml's vector exponential, each eight's sum (halves, then pairs, then the
/// last two) added in f64.
///
/// # Safety
/// `kq` holds a whole tile.
pub(super) unsafe fn soft_max(kq: &mut [f32], max: f32) -> f64 {
    let mut sum = 0.0f64;
    // SAFETY: the caller's bounds.
    unsafe {
        let mv = _mm256_set1_ps(max);
        for c in kq.chunks_exact_mut(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum += reduce_add(e) as f64;
        }
    }
    sum
}

/// `vkq += Σ_t w[t]·V[t]` in ggml's `simd_gemm` order: for each eight of the width, a
/// fused multiply-add chain over the tile's cells in order.
///
/// # Safety
/// `w` holds a tile of weights, `v32` a tile of V rows of `vkq.len()` values.
#[inline(always)]
pub(super) unsafe fn weighted_v(w: &[f32], v32: &[f32], vkq: &mut [f32]) {
    let dv = vkq.len();
    // SAFETY: the caller's bounds.
    unsafe {
        let out = vkq.as_mut_ptr();
        let v = v32.as_ptr();
        for d in (0..dv).step_by(32.min(dv)) {
            // Four eights at a time where the width allows, for the four chains' latency.
            let lanes = ((dv - d) / 8).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_loadu_ps(out.add(d + 8 * i));
            }
            for (t, &wt) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(wt);
                for (i, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(v.add(t * dv + d + 8 * i)), wv, *a);
                }
            }
            for (i, a) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(out.add(d + 8 * i), *a);
            }
        }
    }
}

/// An 8×8 block transposed in registers.
#[inline(always)]
fn transpose8(r: &mut [__m256; 8]) {
    // SAFETY: register shuffles of AVX.
    unsafe {
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4h + j] holds, in each 128-bit lane L, rows 4h..4h+4 of column 4L + j.
        let mut u = [_mm256_setzero_ps(); 8];
        for h in 0..2 {
            u[4 * h] = _mm256_shuffle_ps::<0x44>(t[4 * h], t[4 * h + 2]);
            u[4 * h + 1] = _mm256_shuffle_ps::<0xEE>(t[4 * h], t[4 * h + 2]);
            u[4 * h + 2] = _mm256_shuffle_ps::<0x44>(t[4 * h + 1], t[4 * h + 3]);
            u[4 * h + 3] = _mm256_shuffle_ps::<0xEE>(t[4 * h + 1], t[4 * h + 3]);
        }
        for j in 0..4 {
            r[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
            r[4 + j] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
        }
    }
}

/// An eight's sum as `ggml_vec_soft_max_f32` makes it for AVX2: the upper 128 bits onto the
/// lower, lanes 2,3 onto 0,1, then 1 onto 0.
#[inline(always)]
fn reduce_add(v: __m256) -> f32 {
    // SAFETY: register operations of AVX and SSE3.
    unsafe {
        let q = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }
}

/// ggml's `ggml_v_expf` for AVX2 and FMA (vec.h), step for step: e^x as k·(1 + p(b)) with
/// k = 2^n, and the scaled forms where |n| > 126, 0 or +∞ where |n| > 192.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register operations of AVX2 and FMA.
    unsafe {
        let r = _mm256_set1_ps(ROUND);
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let c = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_set1_ps(C5), b, _mm256_set1_ps(C4)),
                u,
                _mm256_fmadd_ps(_mm256_set1_ps(C3), b, _mm256_set1_ps(C2)),
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(C1), b),
        );
        if _mm256_movemask_ps(c) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        _mm256_or_ps(
            _mm256_and_ps(d, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                d,
                _mm256_or_ps(
                    _mm256_and_ps(c, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                    _mm256_andnot_ps(c, _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_transposes() {
        let mut r = [unsafe { _mm256_setzero_ps() }; 8];
        for (i, v) in r.iter_mut().enumerate() {
            let row: Vec<f32> = (0..8).map(|j| (8 * i + j) as f32).collect();
            // SAFETY: 8 floats.
            *v = unsafe { _mm256_loadu_ps(row.as_ptr()) };
        }
        transpose8(&mut r);
        for (i, v) in r.iter().enumerate() {
            let mut out = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *v) };
            for (j, x) in out.iter().enumerate() {
                assert_eq!(*x, (8 * j + i) as f32, "row {i}, column {j}");
            }
        }
    }

    /// The exponential against the float maths it approximates, over the softmax's range
    /// and past the points where ggml's scaled and saturated forms take over.
    #[test]
    fn the_exponential_is_close_to_expf() {
        for i in -1100..=900 {
            let x = i as f32 * 0.1;
            let mut out = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_set1_ps(x))) };
            let want = x.exp();
            if x < -105.0 {
                assert_eq!(out[0], 0.0, "e^{x}");
            } else if x > 88.8 || want.is_infinite() {
                assert_eq!(out[0], f32::INFINITY, "e^{x}");
            } else if want > f32::MIN_POSITIVE {
                assert!(
                    (out[0] / want - 1.0).abs() < 1e-6,
                    "e^{x}: {} vs {want}",
                    out[0]
                );
            }
        }
    }
}
