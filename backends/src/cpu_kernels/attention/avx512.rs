//! The tiled flash attention's float steps in AVX-512's sixteen lanes, as ggml built for
//! AVX-512 makes them (`ggml_v_expf` and `ggml_vec_soft_max_f32`'s sums differ by vector
//! width; the K·Q and V chains run along one lane each and do not).

use std::arch::x86_64::*;

use super::imp::{f16_to_f32, Cache, C1, C2, C3, C4, C5, LN2_HI, LN2_LO, LOG2E, ROUND, TILE_KV};

/// A row's mask over the tile's `cells` cells as f32 (−∞ past them); whether any is
/// not −∞.
///
/// # Safety
/// `mask` covers `cells` F16 values; `out` holds a tile.
#[inline(always)]
pub(super) unsafe fn mask_tile(mask: *const u16, cells: usize, out: &mut [f32]) -> bool {
    let mut seen = 0u16;
    // SAFETY: the caller's bounds; F16C conversions and AVX-512F compares.
    unsafe {
        let hidden = _mm512_set1_ps(f32::NEG_INFINITY);
        for t in (0..TILE_KV).step_by(16) {
            let x = if t + 16 <= cells {
                _mm512_cvtph_ps(_mm256_loadu_si256(mask.add(t) as *const __m256i))
            } else {
                let mut part = [f32::NEG_INFINITY; 16];
                for (i, p) in part.iter_mut().enumerate().take(cells.saturating_sub(t)) {
                    *p = f16_to_f32(*mask.add(t + i));
                }
                _mm512_loadu_ps(part.as_ptr())
            };
            _mm512_storeu_ps(out.as_mut_ptr().add(t), x);
            seen |= _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(x, hidden);
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
    // SAFETY: the caller's bounds; conversions and shuffles of AVX-512F.
    unsafe {
        for t0 in (0..TILE_KV).step_by(16) {
            for d0 in (0..cache.dk).step_by(16) {
                let mut block = [_mm512_setzero_ps(); 16];
                for (i, b) in block.iter_mut().enumerate() {
                    if t0 + i < cells {
                        let src = cache.k.add((c0 + t0 + i) * cache.k_row) as *const u16;
                        *b = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(d0) as *const __m256i));
                    }
                }
                transpose16(&mut block);
                for (i, b) in block.iter().enumerate() {
                    _mm512_storeu_ps(kt.as_mut_ptr().add((d0 + i) * TILE_KV + t0), *b);
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
            for d in (0..dv).step_by(16) {
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(d) as *const __m256i));
                _mm512_storeu_ps(v32.as_mut_ptr().add(t * dv + d), x);
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
        let mut acc = [_mm512_setzero_ps(); TILE_KV / 16];
        let kt = kt.as_ptr();
        for d in 0..dk {
            let qd = _mm512_set1_ps(*q.add(d));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(kt.add(d * TILE_KV + 16 * i)), qd, *a);
            }
        }
        let sv = _mm512_set1_ps(scale);
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(kq.as_mut_ptr().add(16 * i), _mm512_mul_ps(*a, sv));
        }
    }
}

/// `kq ← e^(kq − max)` and their sum, as `ggml_vec_soft_max_f32` makes them: sixteen at a
/// time with ggml's vector exponential, each sixteen's tree sum added in f64.
///
/// # Safety
/// `kq` holds a whole tile.
pub(super) unsafe fn soft_max(kq: &mut [f32], max: f32) -> f64 {
    let mut sum = 0.0f64;
    // SAFETY: the caller's bounds.
    unsafe {
        let mv = _mm512_set1_ps(max);
        for c in kq.chunks_exact_mut(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), mv));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum += reduce_add(e) as f64;
        }
    }
    sum
}

/// `vkq += Σ_t w[t]·V[t]` in ggml's `simd_gemm` order: for each sixteen of the width, a
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
        for d in (0..dv).step_by(64.min(dv)) {
            // Four sixteens at a time where the width allows, for the four chains' latency.
            let lanes = ((dv - d) / 16).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            for (i, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm512_loadu_ps(out.add(d + 16 * i));
            }
            for (t, &wt) in w.iter().enumerate() {
                let wv = _mm512_set1_ps(wt);
                for (i, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(v.add(t * dv + d + 16 * i)), wv, *a);
                }
            }
            for (i, a) in acc.iter().enumerate().take(lanes) {
                _mm512_storeu_ps(out.add(d + 16 * i), *a);
            }
        }
    }
}

/// A 16×16 block transposed in registers.
#[inline(always)]
fn transpose16(r: &mut [__m512; 16]) {
    // SAFETY: register shuffles of AVX-512F.
    unsafe {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        // u[4i + j] holds, in each 128-bit lane L, rows 4i..4i+4 of column 4L + j.
        let mut w = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for j in 0..4 {
                w[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(u[8 * h + j], u[8 * h + 4 + j]);
                w[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xDD>(u[8 * h + j], u[8 * h + 4 + j]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_f32x4::<0x88>(w[j], w[8 + j]);
            r[8 + j] = _mm512_shuffle_f32x4::<0xDD>(w[j], w[8 + j]);
        }
    }
}

/// `_mm512_reduce_add_ps` as GCC expands it: the upper 256 bits onto the lower, 128 onto
/// 128, lanes 2,3 onto 0,1, then 1 onto 0.
#[inline(always)]
fn reduce_add(v: __m512) -> f32 {
    // SAFETY: register operations of AVX-512F.
    unsafe {
        let h = _mm256_add_ps(
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            _mm512_castps512_ps256(v),
        );
        let q = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }
}

/// ggml's `ggml_v_expf` for AVX-512 (vec.h), step for step: e^x as 2^n·p(b) with its
/// coefficients, and 0 or +∞ where |n| > 192.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: register operations of AVX-512F.
    unsafe {
        let r = _mm512_set1_ps(ROUND);
        let z = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(LN2_LO),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x),
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(_mm512_set1_ps(C5), b, _mm512_set1_ps(C4)),
                u,
                _mm512_fmadd_ps(_mm512_set1_ps(C3), b, _mm512_set1_ps(C2)),
            ),
            u,
            _mm512_fmadd_ps(_mm512_set1_ps(C1), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if _mm512_kortestz(d, d) != 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_transposes() {
        let mut r = [unsafe { _mm512_setzero_ps() }; 16];
        for (i, v) in r.iter_mut().enumerate() {
            let row: Vec<f32> = (0..16).map(|j| (16 * i + j) as f32).collect();
            // SAFETY: 16 floats.
            *v = unsafe { _mm512_loadu_ps(row.as_ptr()) };
        }
        transpose16(&mut r);
        for (i, v) in r.iter().enumerate() {
            let mut out = [0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *v) };
            for (j, x) in out.iter().enumerate() {
                assert_eq!(*x, (16 * j + i) as f32, "row {i}, column {j}");
            }
        }
    }
}
