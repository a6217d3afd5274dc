//! A batch-invariant flash attention with vector exponentials.
//!
//! Under the batch-invariant kernels ggml runs its one-row flash attention for every query: an
//! online softmax over the KV cells, one libm `expf` per query and cell, V accumulated in F16.
//! It gives a query the same numbers whatever else is in its batch, but it is a fifth of an F16
//! model's scoring time at 512 tokens and most of a long prompt's. This kernel gives each query
//! the same guarantee and does less work: its scores, softmax and weighted sum of V depend only
//! on that query's row of Q, the cache and the mask, each summed in one fixed order (K·Q along
//! the head's width in vector lanes, then one reduction; the softmax's sum and V's weighted sum
//! over the cells in ascending order), with the exponentials sixteen at a time and V summed in
//! f32. Threads split the queries, never a query's cells.
//!
//! ggml's CPU backend calls `ggml_compute_forward_flash_attn_ext` from another object file; the
//! final link sends the call here (`-Wl,--wrap=ggml_compute_forward_flash_attn_ext`, as for
//! [`super::tinyblas`]). With `use_ref` clear (the fastest kernels) it goes on to ggml. With it
//! set, F16 caches with F32 queries and no ALiBi run here; anything else (a quantized cache,
//! ALiBi's slopes) goes back to ggml's one-row kernel.

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
use std::arch::x86_64::*;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
use std::cell::RefCell;

use llama_cpp_sys_2::{ggml_tensor, GGML_TYPE_F16, GGML_TYPE_F32};

use super::tinyblas::ComputeParams;

extern "C" {
    /// ggml's flash attention (the symbol the wrap replaces).
    fn __real_ggml_compute_forward_flash_attn_ext(
        params: *const ComputeParams,
        dst: *mut ggml_tensor,
    );
}

/// ggml's CPU backend runs one flash attention; see the module doc.
///
/// # Safety
/// Called by ggml's CPU backend on each worker thread of one `FLASH_ATTN_EXT`, with its
/// compute parameters and destination tensor, as `ggml_compute_forward_flash_attn_ext` is.
#[no_mangle]
pub unsafe extern "C" fn __wrap_ggml_compute_forward_flash_attn_ext(
    params: *const ComputeParams,
    dst: *mut ggml_tensor,
) {
    // SAFETY: ggml passes its live parameters and tensors.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx512f",
        target_feature = "f16c"
    ))]
    if unsafe { (*params).use_ref && takes(&*dst) } {
        // SAFETY: as for this function; `takes` checked the types and shapes.
        unsafe { attend(&*params, &*dst) };
        return;
    }
    // SAFETY: the same call, passed on.
    unsafe { __real_ggml_compute_forward_flash_attn_ext(params, dst) }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// Whether this kernel computes `dst`: F32 queries, an F16 cache, an F16 mask (or none), no
/// ALiBi, rows of Q, K and V contiguous, a width of whole vectors.
///
/// # Safety
/// `dst` is a live `FLASH_ATTN_EXT` node.
unsafe fn takes(dst: &ggml_tensor) -> bool {
    // SAFETY: the node's sources, alive while it runs.
    let (q, k, v) = unsafe { (&*dst.src[0], &*dst.src[1], &*dst.src[2]) };
    let mask = dst.src[3];
    let sinks = dst.src[4];
    let max_bias = f32::from_bits(dst.op_params[1] as u32);
    q.type_ == GGML_TYPE_F32
        && k.type_ == GGML_TYPE_F16
        && v.type_ == GGML_TYPE_F16
        && q.nb[0] == 4
        && k.nb[0] == 2
        && v.nb[0] == 2
        && k.ne[0] % 16 == 0
        && v.ne[0] % 16 == 0
        && k.ne[0] <= MAX_WIDTH as i64
        && v.ne[0] <= MAX_WIDTH as i64
        && dst.type_ == GGML_TYPE_F32
        && dst.nb[0] == 4
        && max_bias == 0.0
        // SAFETY: the mask and sinks, when present, are live sources of the node.
        && (mask.is_null() || unsafe { (*mask).type_ } == GGML_TYPE_F16)
        && (sinks.is_null() || unsafe { (*sinks).type_ } == GGML_TYPE_F32)
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// The widest head this kernel holds in registers' worth of stack (DK and DV).
const MAX_WIDTH: usize = 512;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
thread_local! {
    /// Each worker thread's scratch for one query: its visible cells and their scores.
    static SCRATCH: RefCell<Visible> = const {
        RefCell::new(Visible {
            cells: Vec::new(),
            scores: Vec::new(),
        })
    };
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// The cells a query sees (the mask does not hide), in ascending order, and their scores
/// (then their softmax weights), padded with −∞ to whole vectors.
struct Visible {
    cells: Vec<u32>,
    scores: Vec<f32>,
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// This thread's share of the queries (rows of Q, one per query and head), in order.
///
/// # Safety
/// As [`__wrap_ggml_compute_forward_flash_attn_ext`], for a node [`takes`] accepted.
unsafe fn attend(p: &ComputeParams, dst: &ggml_tensor) {
    // SAFETY: the node's sources, alive while it runs.
    let (q, k, v) = unsafe { (&*dst.src[0], &*dst.src[1], &*dst.src[2]) };
    let (mask, sinks) = (
        dst.src[3] as *const ggml_tensor,
        dst.src[4] as *const ggml_tensor,
    );
    let softcap = f32::from_bits(dst.op_params[2] as u32);
    // As ggml: with a soft cap the scale folds in 1/cap, and the cap multiplies tanh.
    let scale =
        f32::from_bits(dst.op_params[0] as u32) / if softcap != 0.0 { softcap } else { 1.0 };
    let (dk, dv, n_kv) = (k.ne[0] as usize, v.ne[0] as usize, k.ne[1] as usize);
    let (nq1, nq2, nq3) = (q.ne[1], q.ne[2], q.ne[3]);
    let rows = nq1 * nq2 * nq3;
    let (ith, nth) = (p.ith as i64, p.nth as i64);
    let (first, end) = (ith * rows / nth, (ith + 1) * rows / nth);
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        for ir in first..end {
            let iq3 = ir / (nq2 * nq1);
            let iq2 = (ir - iq3 * nq2 * nq1) / nq1;
            let iq1 = ir - iq3 * nq2 * nq1 - iq2 * nq1;
            let (ik2, ik3) = (iq2 / (nq2 / k.ne[2]), iq3 / (nq3 / k.ne[3]));
            let (iv2, iv3) = (iq2 / (nq2 / v.ne[2]), iq3 / (nq3 / v.ne[3]));
            // SAFETY: offsets inside the node's tensors by their own strides, as ggml's
            // one-row kernel takes them (ops.cpp).
            unsafe {
                let qrow = (q.data as *const u8)
                    .add(iq1 as usize * q.nb[1] + iq2 as usize * q.nb[2] + iq3 as usize * q.nb[3])
                    as *const f32;
                let kbase =
                    (k.data as *const u8).add(ik2 as usize * k.nb[2] + ik3 as usize * k.nb[3]);
                let vbase =
                    (v.data as *const u8).add(iv2 as usize * v.nb[2] + iv3 as usize * v.nb[3]);
                let mrow = if mask.is_null() {
                    std::ptr::null()
                } else {
                    let m = &*mask;
                    (m.data as *const u8).add(
                        iq1 as usize * m.nb[1]
                            + (iq2 % m.ne[2]) as usize * m.nb[2]
                            + (iq3 % m.ne[3]) as usize * m.nb[3],
                    ) as *const u16
                };
                let sink = if sinks.is_null() {
                    None
                } else {
                    Some(*((*sinks).data as *const f32).add(iq2 as usize))
                };
                let out = (dst.data as *mut u8).add(
                    ((iq3 * dst.ne[2] * dst.ne[1] + iq2 + iq1 * dst.ne[1]) as usize) * dst.nb[1],
                ) as *mut f32;
                one_query(
                    Query {
                        q: qrow,
                        k: kbase,
                        k_row: k.nb[1],
                        v: vbase,
                        v_row: v.nb[1],
                        mask: mrow,
                        n_kv,
                        dk,
                        dv,
                        scale,
                        softcap,
                        sink,
                    },
                    &mut scratch,
                    out,
                );
            }
        }
    });
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// One query's row and where its cache and mask are.
struct Query {
    q: *const f32,
    k: *const u8,
    k_row: usize,
    v: *const u8,
    v_row: usize,
    /// The mask's row for this query (F16; −∞ hides a cell), or null.
    mask: *const u16,
    n_kv: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    softcap: f32,
    sink: Option<f32>,
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// softmax(scale·K·q + mask)·V for one query, written to `out` (DV values).
///
/// # Safety
/// The pointers of `query` cover its widths and `n_kv` cells; `out` holds DV floats.
unsafe fn one_query(query: Query, scratch: &mut Visible, out: *mut f32) {
    // The usual head widths get accumulators that stay in registers.
    // SAFETY: the caller's.
    unsafe {
        match (query.dk, query.dv) {
            (64, 64) => attend_one::<4, 4>(query, scratch, out),
            (128, 128) => attend_one::<8, 8>(query, scratch, out),
            (256, 256) => attend_one::<16, 16>(query, scratch, out),
            _ => attend_one::<{ MAX_WIDTH / 16 }, { MAX_WIDTH / 16 }>(query, scratch, out),
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// [`one_query`] for heads of at most `KV`·16 (K) and `VV`·16 (V) values.
///
/// # Safety
/// As [`one_query`].
#[inline(always)]
unsafe fn attend_one<const KV: usize, const VV: usize>(
    query: Query,
    scratch: &mut Visible,
    out: *mut f32,
) {
    let Query {
        q,
        k,
        k_row,
        v,
        v_row,
        mask,
        n_kv,
        dk,
        dv,
        scale,
        softcap,
        sink,
    } = query;
    let (kn, vn) = (dk / 16, dv / 16);
    let Visible { cells, scores } = scratch;
    cells.clear();
    scores.clear();
    // SAFETY: the caller's bounds.
    unsafe {
        let mut qv = [_mm512_setzero_ps(); KV];
        for (i, lane) in qv.iter_mut().enumerate().take(kn) {
            *lane = _mm512_loadu_ps(q.add(16 * i));
        }
        // The visible cells' scores, in ascending cell order.
        let mut max = f32::NEG_INFINITY;
        for c in 0..n_kv {
            let m = if mask.is_null() {
                0.0
            } else {
                f16_to_f32(*mask.add(c))
            };
            if m == f32::NEG_INFINITY {
                continue;
            }
            let kc = k.add(c * k_row) as *const u16;
            let mut acc = _mm512_setzero_ps();
            for (i, lane) in qv.iter().enumerate().take(kn) {
                let kv = _mm512_cvtph_ps(_mm256_loadu_si256(kc.add(16 * i) as *const __m256i));
                acc = _mm512_fmadd_ps(kv, *lane, acc);
            }
            let mut s = hsum(acc) * scale;
            if softcap != 0.0 {
                s = softcap * s.tanh();
            }
            s += m;
            cells.push(c as u32);
            scores.push(s);
            max = max.max(s);
        }
        let n = cells.len();
        scores.resize(n.next_multiple_of(16), f32::NEG_INFINITY);
        if let Some(sink) = sink {
            max = max.max(sink);
        }
        // Weights e^(s − max), sixteen at a time, and their sum in lanes.
        let mut sum = _mm512_setzero_ps();
        if max != f32::NEG_INFINITY {
            let mv = _mm512_set1_ps(max);
            for chunk in scores.chunks_exact_mut(16) {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), mv));
                _mm512_storeu_ps(chunk.as_mut_ptr(), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        let mut total = hsum(sum);
        if let Some(sink) = sink {
            total += (sink - max).exp();
        }
        // V's weighted sum over the visible cells, in f32, in ascending cell order.
        let mut o = [_mm512_setzero_ps(); VV];
        for (&c, &w) in cells.iter().zip(scores.iter()) {
            let wv = _mm512_set1_ps(w);
            let vc = v.add(c as usize * v_row) as *const u16;
            for (i, lane) in o.iter_mut().enumerate().take(vn) {
                let vv = _mm512_cvtph_ps(_mm256_loadu_si256(vc.add(16 * i) as *const __m256i));
                *lane = _mm512_fmadd_ps(vv, wv, *lane);
            }
        }
        let inv = _mm512_set1_ps(if total == 0.0 { 0.0 } else { 1.0 / total });
        for (i, lane) in o.iter().enumerate().take(vn) {
            _mm512_storeu_ps(out.add(16 * i), _mm512_mul_ps(*lane, inv));
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// The sixteen lanes' sum: upper 256 bits onto the lower, 128 onto 128, then pairs.
#[inline(always)]
fn hsum(v: __m512) -> f32 {
    // SAFETY: register operations of the features this module is built with.
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

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// An F16 value as f32.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    // SAFETY: F16C is on wherever this module is built.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "f16c"
))]
/// e^x for sixteen lanes of x ≤ 0 (−∞ gives 0): 2^n · p(r) with x = n·ln 2 + r, |r| ≤ ln 2 / 2,
/// p the degree-7 Taylor polynomial (its error below one f32 rounding).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // SAFETY: register operations of AVX-512F.
    unsafe {
        let x_in = x;
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        // Taylor coefficients 1/k!, evaluated by Horner's rule.
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // 2^n by scaling (exact); a hidden cell's −∞ gives exactly 0.
        let hidden = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x_in, _mm512_set1_ps(f32::NEG_INFINITY));
        _mm512_maskz_mov_ps(!hidden, _mm512_scalef_ps(p, n))
    }
}
