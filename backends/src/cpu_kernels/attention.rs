//! Flash attention under the batch-invariant kernels: ggml's tiled kernel, and a copy of its
//! sums for fewer queries than its tile.
//!
//! ggml runs a tiled flash attention from 64 queries on (ops.cpp,
//! `ggml_compute_forward_flash_attn_ext_tiled`), a KV-split one for a lone query over 512 cells
//! or more, and its one-row kernel otherwise: three orders of summation, so a token's attention
//! would depend on how many queries share its batch. The tiled kernel itself gives each query
//! numbers that depend on that query alone: its K·Q sums run along the head's width for each
//! cell (a fused multiply-add chain from zero), the softmax goes over fixed 64-cell tiles of
//! the cache from cell 0 (a tile's maximum, `expf` of the old maximum's distance, ggml's vector
//! exponential, each vector's tree sum added in f64), and V's weighted sum runs over each
//! tile's cells in order. No other query's row enters any of these. So under the
//! batch-invariant kernels, batches of 64 queries or more run ggml's tiled kernel (the fastest
//! kernels' flag set for that call), and smaller ones, down to a lone query, run this module's
//! copy of the same float steps, which takes the queries that share a KV head a few at a time
//! (a decode step's grouped-query heads) so that each tile of K is converted and transposed
//! once for all of them.
//!
//! The copy's steps whose numbers depend on the vector width (ggml's vector exponential and
//! the softmax's lane sums) follow ggml as built for this CPU: sixteen lanes with AVX-512
//! ([`avx512`]), eight with AVX2 and FMA ([`avx2`]); elsewhere the batch-invariant kernels keep
//! ggml's one-row flash attention for every query count.
//!
//! ggml's CPU backend calls `ggml_compute_forward_flash_attn_ext` from another object file; the
//! final link sends the call here (`-Wl,--wrap=ggml_compute_forward_flash_attn_ext`, as for
//! [`super::tinyblas`]). With `use_ref` clear (the fastest kernels) it goes on to ggml. With it
//! set, F16 caches with F32 queries and no ALiBi, soft cap or sinks run as above; anything else
//! (a quantized cache, ALiBi's slopes, Gemma 2's soft cap, attention sinks) goes to ggml's
//! one-row kernel for every query count.

use llama_cpp_sys_2::ggml_tensor;

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
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        // SAFETY: ggml passes its live parameters and tensors.
        let (p, node) = unsafe { (&*params, &*dst) };
        // SAFETY: `node` is a live FLASH_ATTN_EXT node.
        if p.use_ref && unsafe { imp::takes(node) } {
            // SAFETY: the node's queries, alive while it runs.
            if unsafe { (*node.src[0]).ne[1] } >= imp::TILE_Q {
                // SAFETY: ggml's own call, with the flag of its fastest kernels, which for
                // this many queries is its tiled kernel.
                unsafe { __real_ggml_compute_forward_flash_attn_ext(&p.fastest(), dst) };
            } else {
                // SAFETY: as for this function; `takes` checked the types and shapes.
                unsafe { imp::attend(p, node) };
            }
            return;
        }
    }
    // SAFETY: the same call, passed on.
    unsafe { __real_ggml_compute_forward_flash_attn_ext(params, dst) }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c",
    not(all(target_feature = "avx512f", target_feature = "avx512dq"))
))]
mod avx2;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c",
    target_feature = "avx512f",
    target_feature = "avx512dq"
))]
mod avx512;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod imp {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use llama_cpp_sys_2::{ggml_tensor, GGML_TYPE_F16, GGML_TYPE_F32};

    use super::super::tinyblas::ComputeParams;
    #[cfg(not(all(target_feature = "avx512f", target_feature = "avx512dq")))]
    use super::avx2 as lanes;
    #[cfg(all(target_feature = "avx512f", target_feature = "avx512dq"))]
    use super::avx512 as lanes;
    use lanes::{mask_tile, pack_k, pack_v, scores, soft_max, weighted_v};

    /// ggml's `GGML_FA_TILE_Q`: from this many queries its tiled kernel runs.
    pub(super) const TILE_Q: i64 = 64;
    /// `ggml_v_expf`'s constants (vec.h, the same for each vector width): the rounding
    /// shift 0x1.8p23, log2(e), ln 2 in a high and a low part, and the polynomial's
    /// coefficients from the highest power down.
    pub(super) const ROUND: f32 = f32::from_bits(0x4b40_0000);
    pub(super) const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
    pub(super) const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
    pub(super) const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
    pub(super) const C5: f32 = f32::from_bits(0x3c07_2010);
    pub(super) const C4: f32 = f32::from_bits(0x3d2b_9f17);
    pub(super) const C3: f32 = f32::from_bits(0x3e2a_af33);
    pub(super) const C2: f32 = f32::from_bits(0x3eff_fedb);
    pub(super) const C1: f32 = f32::from_bits(0x3f7f_fff6);

    /// ggml's `GGML_FA_TILE_KV`: the cells of one softmax tile.
    pub(super) const TILE_KV: usize = 64;
    /// Queries (sharing a KV head) this copy takes together.
    const ROWS: usize = 16;

    /// Whether this module computes `dst` (with ggml's tiled kernel, or its copy): F32
    /// queries, an F16 cache, an F16 mask (or none), no ALiBi, soft cap or sinks, rows
    /// contiguous, widths of whole vectors.
    ///
    /// # Safety
    /// `dst` is a live `FLASH_ATTN_EXT` node.
    pub(super) unsafe fn takes(dst: &ggml_tensor) -> bool {
        // SAFETY: the node's sources, alive while it runs.
        let (q, k, v) = unsafe { (&*dst.src[0], &*dst.src[1], &*dst.src[2]) };
        let mask = dst.src[3];
        let max_bias = f32::from_bits(dst.op_params[1] as u32);
        let softcap = f32::from_bits(dst.op_params[2] as u32);
        q.type_ == GGML_TYPE_F32
            && k.type_ == GGML_TYPE_F16
            && v.type_ == GGML_TYPE_F16
            && q.nb[0] == 4
            && k.nb[0] == 2
            && v.nb[0] == 2
            && k.ne[0] % 16 == 0
            && v.ne[0] % 16 == 0
            && dst.type_ == GGML_TYPE_F32
            && dst.nb[0] == 4
            && max_bias == 0.0
            && softcap == 0.0
            && dst.src[4].is_null()
            // SAFETY: the mask, when present, is a live source of the node.
            && (mask.is_null() || unsafe { (*mask).type_ } == GGML_TYPE_F16)
    }

    /// Each worker thread's scratch: one tile of K (transposed) and V in f32, and the rows'
    /// scores, mask and running sums of V.
    #[derive(Default)]
    struct Scratch {
        kt: Vec<f32>,
        v32: Vec<f32>,
        kq: Vec<f32>,
        mask: Vec<f32>,
        vkq: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// One KV head's cache, as the queries of a tile read it.
    pub(super) struct Cache {
        pub(super) k: *const u8,
        pub(super) k_row: usize,
        pub(super) v: *const u8,
        pub(super) v_row: usize,
        pub(super) n_kv: usize,
        pub(super) dk: usize,
        pub(super) dv: usize,
        pub(super) scale: f32,
    }

    /// One query: its row of Q, its row of the mask (F16, or null) and where its output goes.
    #[derive(Clone, Copy)]
    struct Row {
        q: *const f32,
        mask: *const u16,
        out: *mut f32,
    }

    /// This thread's share of the queries (rows of Q, one per query and head), in order,
    /// taken [`ROWS`] at a time where consecutive rows share a KV head.
    ///
    /// # Safety
    /// As `__wrap_ggml_compute_forward_flash_attn_ext`, for a node [`takes`] accepted.
    pub(super) unsafe fn attend(p: &ComputeParams, dst: &ggml_tensor) {
        let (ith, nth) = (p.ith as i64, p.nth as i64);
        // SAFETY: the node's queries, alive while it runs.
        let q = unsafe { &*dst.src[0] };
        let rows = q.ne[1] * q.ne[2] * q.ne[3];
        // SAFETY: the caller's.
        unsafe { attend_rows(dst, ith * rows / nth, (ith + 1) * rows / nth, ROWS) };
    }

    /// Rows `first..end` of `dst`, at most `together` at a time.
    ///
    /// # Safety
    /// As [`attend`]; `first..end` are rows of the node.
    pub(super) unsafe fn attend_rows(dst: &ggml_tensor, first: i64, end: i64, together: usize) {
        // SAFETY: the node's sources, alive while it runs.
        let (q, k, v) = unsafe { (&*dst.src[0], &*dst.src[1], &*dst.src[2]) };
        let mask = dst.src[3] as *const ggml_tensor;
        let (nq1, nq2, nq3) = (q.ne[1], q.ne[2], q.ne[3]);
        // Row `ir`'s query, head and batch, and its KV head.
        let locate = |ir: i64| {
            let iq3 = ir / (nq2 * nq1);
            let iq2 = (ir - iq3 * nq2 * nq1) / nq1;
            let iq1 = ir - iq3 * nq2 * nq1 - iq2 * nq1;
            let kv = (
                iq2 / (nq2 / k.ne[2]),
                iq3 / (nq3 / k.ne[3]),
                iq2 / (nq2 / v.ne[2]),
                iq3 / (nq3 / v.ne[3]),
            );
            (iq1, iq2, iq3, kv)
        };
        // SAFETY (for the closure's body): offsets inside the node's tensors by their own
        // strides, as ggml's tiled kernel takes them (ops.cpp).
        let row = |ir: i64| unsafe {
            let (iq1, iq2, iq3, _) = locate(ir);
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
            Row {
                q: (q.data as *const u8)
                    .add(iq1 as usize * q.nb[1] + iq2 as usize * q.nb[2] + iq3 as usize * q.nb[3])
                    as *const f32,
                mask: mrow,
                out: (dst.data as *mut u8).add(
                    ((iq3 * dst.ne[2] * dst.ne[1] + iq2 + iq1 * dst.ne[1]) as usize) * dst.nb[1],
                ) as *mut f32,
            }
        };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut ir = first;
            while ir < end {
                let (_, _, _, kv) = locate(ir);
                let mut tile = [row(ir); ROWS];
                let mut n = 1;
                while n < together.min(ROWS)
                    && ir + (n as i64) < end
                    && locate(ir + n as i64).3 == kv
                {
                    tile[n] = row(ir + n as i64);
                    n += 1;
                }
                let (ik2, ik3, iv2, iv3) = kv;
                let cache = Cache {
                    // SAFETY: the KV head's planes, inside K and V by their strides.
                    k: unsafe {
                        (k.data as *const u8).add(ik2 as usize * k.nb[2] + ik3 as usize * k.nb[3])
                    },
                    k_row: k.nb[1],
                    // SAFETY: as for `k`.
                    v: unsafe {
                        (v.data as *const u8).add(iv2 as usize * v.nb[2] + iv3 as usize * v.nb[3])
                    },
                    v_row: v.nb[1],
                    n_kv: k.ne[1] as usize,
                    dk: k.ne[0] as usize,
                    dv: v.ne[0] as usize,
                    scale: f32::from_bits(dst.op_params[0] as u32),
                };
                // SAFETY: the rows and cache point into the node's tensors.
                unsafe { attend_tile(&cache, &tile[..n], !mask.is_null(), &mut scratch) };
                ir += n as i64;
            }
        });
    }

    /// softmax(scale·K·q + mask)·V for each of `rows`, summed as ggml's tiled kernel sums one
    /// row of its tile.
    ///
    /// # Safety
    /// The cache covers `n_kv` cells of widths DK and DV; each row's Q covers DK floats, its
    /// mask `n_kv` values (when `masked`), its output DV floats.
    unsafe fn attend_tile(cache: &Cache, rows: &[Row], masked: bool, s: &mut Scratch) {
        let (dk, dv, n) = (cache.dk, cache.dv, rows.len());
        s.kt.resize(dk * TILE_KV, 0.0);
        s.v32.resize(TILE_KV * dv, 0.0);
        s.kq.resize(ROWS * TILE_KV, 0.0);
        s.mask.resize(ROWS * TILE_KV, 0.0);
        s.vkq.clear();
        s.vkq.resize(ROWS * dv, 0.0);
        let mut max = [f32::NEG_INFINITY; ROWS];
        let mut sum = [0.0f32; ROWS];
        let mut live = [false; ROWS];
        // SAFETY: prefetches of rows inside the cache.
        unsafe { prefetch_tile(cache, 0) };
        for c0 in (0..cache.n_kv).step_by(TILE_KV) {
            let cells = TILE_KV.min(cache.n_kv - c0);
            // The mask's tile (−∞ past the cache's end); a tile no row sees is skipped, as
            // ggml skips it.
            let mut seen = !masked;
            if masked {
                for (j, r) in rows.iter().enumerate() {
                    let m = &mut s.mask[j * TILE_KV..(j + 1) * TILE_KV];
                    // SAFETY: the row's mask covers the cache's cells.
                    seen |= unsafe { mask_tile(r.mask.add(c0), cells, m) };
                }
            }
            if !seen {
                continue;
            }
            // A decode step reads each layer's cache from memory (the weights read since its
            // last step have evicted it): ask for the next tile's rows while this one runs.
            if c0 + TILE_KV < cache.n_kv {
                // SAFETY: prefetches of rows inside the cache.
                unsafe { prefetch_tile(cache, c0 + TILE_KV) };
            }
            // SAFETY: `cells` cells from `c0` lie in the cache.
            unsafe { pack_k(cache, c0, cells, &mut s.kt) };
            for (j, r) in rows.iter().enumerate() {
                let kq = &mut s.kq[j * TILE_KV..(j + 1) * TILE_KV];
                // SAFETY: the row's Q covers DK floats.
                unsafe { scores(r.q, &s.kt, dk, cache.scale, kq) };
                kq[cells..].fill(f32::NEG_INFINITY);
                if masked {
                    for (x, m) in kq.iter_mut().zip(&s.mask[j * TILE_KV..(j + 1) * TILE_KV]) {
                        *x += *m;
                    }
                }
                let tile_max = kq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                live[j] = tile_max != f32::NEG_INFINITY;
                if !live[j] {
                    continue;
                }
                let new = max[j].max(tile_max);
                if new > max[j] {
                    let ms = (max[j] - new).exp();
                    for x in &mut s.vkq[j * dv..(j + 1) * dv] {
                        *x *= ms;
                    }
                    sum[j] *= ms;
                }
                max[j] = new;
                // SAFETY: `kq` holds a whole tile.
                sum[j] = (sum[j] as f64 + unsafe { soft_max(kq, new) }) as f32;
            }
            if !live[..n].iter().any(|&l| l) {
                continue;
            }
            // SAFETY: as for `pack_k`.
            unsafe { pack_v(cache, c0, cells, &mut s.v32) };
            for j in (0..n).filter(|&j| live[j]) {
                // SAFETY: the scratch holds a tile of weights and of V, and a row of sums.
                unsafe {
                    weighted_v(
                        &s.kq[j * TILE_KV..(j + 1) * TILE_KV],
                        &s.v32,
                        &mut s.vkq[j * dv..(j + 1) * dv],
                    )
                };
            }
        }
        for (j, r) in rows.iter().enumerate() {
            let inv = if sum[j] == 0.0 { 0.0 } else { 1.0 / sum[j] };
            for (d, x) in s.vkq[j * dv..(j + 1) * dv].iter().enumerate() {
                // SAFETY: the row's output holds DV floats.
                unsafe { *r.out.add(d) = *x * inv };
            }
        }
    }

    /// Asks for the K and V rows of the tile from cell `c0` (what of it lies in the cache).
    ///
    /// # Safety
    /// `c0` is a cell of the cache.
    #[inline(always)]
    unsafe fn prefetch_tile(cache: &Cache, c0: usize) {
        let end = (c0 + TILE_KV).min(cache.n_kv);
        // SAFETY: addresses of cells inside the cache; prefetches do not fault.
        unsafe {
            for c in c0..end {
                let (k, v) = (
                    cache.k.add(c * cache.k_row) as *const i8,
                    cache.v.add(c * cache.v_row) as *const i8,
                );
                for line in (0..cache.dk * 2).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(k.add(line));
                }
                for line in (0..cache.dv * 2).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(v.add(line));
                }
            }
        }
    }

    /// An F16 value as f32.
    #[inline(always)]
    pub(super) fn f16_to_f32(h: u16) -> f32 {
        // SAFETY: F16C is on wherever this module is built.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_exponential_is_ggmls_constants() {
            // The hex constants of ggml_v_expf, as f32 bit patterns above.
            let cases = [
                (LOG2E, "1.715476p+0"),
                (LN2_HI, "1.62e4p-1"),
                (LN2_LO, "1.7f7d1cp-20"),
                (C5, "1.0e4020p-7"),
                (C4, "1.573e2ep-5"),
                (C3, "1.555e66p-3"),
                (C2, "1.fffdb6p-2"),
                (C1, "1.ffffecp-1"),
                (ROUND, "1.8p23"),
            ];
            for (c, hex) in cases {
                assert_eq!(c, hexf(hex), "{hex}");
            }
        }

        /// ggml's tiled kernel over 64 queries (its fastest kernels: what a scoring chunk
        /// runs) against this copy run for each query alone and in groups: bit for bit.
        #[test]
        fn lone_queries_get_the_tiled_kernels_numbers() {
            use llama_cpp_sys_2 as sys;
            const DK: usize = 64;
            const N: usize = 64;
            const H: usize = 6;
            const HKV: usize = 2;
            const NKV: usize = 200;
            let mut rand = super::super::super::tests::uniform(0x9e37_79b9_7f4a_7c15);
            // SAFETY: a ggml context of its own, tensors made in it, freed at the end.
            unsafe {
                sys::ggml_cpu_init();
                let ctx = sys::ggml_init(sys::ggml_init_params {
                    mem_size: 64 << 20,
                    mem_buffer: std::ptr::null_mut(),
                    no_alloc: false,
                });
                let q =
                    sys::ggml_new_tensor_3d(ctx, sys::GGML_TYPE_F32, DK as i64, N as i64, H as i64);
                let k = sys::ggml_new_tensor_3d(
                    ctx,
                    sys::GGML_TYPE_F16,
                    DK as i64,
                    NKV as i64,
                    HKV as i64,
                );
                let v = sys::ggml_new_tensor_3d(
                    ctx,
                    sys::GGML_TYPE_F16,
                    DK as i64,
                    NKV as i64,
                    HKV as i64,
                );
                let mask = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F16, NKV as i64, N as i64);
                for i in 0..DK * N * H {
                    *((*q).data as *mut f32).add(i) = 4.0 * rand();
                }
                for t in [k, v] {
                    for i in 0..DK * NKV * HKV {
                        *((*t).data as *mut u16).add(i) = sys::ggml_fp32_to_fp16(2.0 * rand());
                    }
                }
                // Causal over the last N cells, with a hole of hidden cells in the first
                // tile (one query then sees only its second tile on).
                for i in 0..N {
                    for c in 0..NKV {
                        let hidden = c > NKV - N + i || (20..30).contains(&c) || (i == 5 && c < 64);
                        *((*mask).data as *mut u16).add(i * NKV + c) =
                            sys::ggml_fp32_to_fp16(if hidden { f32::NEG_INFINITY } else { 0.0 });
                    }
                }
                for mask in [mask, std::ptr::null_mut()] {
                    let out = sys::ggml_flash_attn_ext(ctx, q, k, v, mask, 0.125, 0.0, 0.0);
                    let graph = sys::ggml_new_graph(ctx);
                    sys::ggml_build_forward_expand(graph, out);
                    sys::ggml_graph_compute_with_ctx(ctx, graph, 1);
                    let tiled = std::slice::from_raw_parts((*out).data as *const f32, DK * N * H);
                    for together in [1, 3, ROWS] {
                        let mut ours = vec![f32::NAN; DK * N * H];
                        let mut node = std::ptr::read(out);
                        node.data = ours.as_mut_ptr().cast();
                        attend_rows(&node, 0, (N * H) as i64, together);
                        for (i, (a, b)) in ours.iter().zip(tiled).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "mask {}, {together} together, value {i}: {a} vs {b}",
                                !mask.is_null()
                            );
                        }
                    }
                }
                sys::ggml_free(ctx);
            }
        }

        /// A C99 hex float such as `1.62e4p-1`.
        fn hexf(s: &str) -> f32 {
            let (mant, exp) = s.split_once('p').unwrap();
            let (int, frac) = mant.split_once('.').unwrap();
            let mut v = u64::from_str_radix(int, 16).unwrap() as f64;
            for (i, c) in frac.chars().enumerate() {
                v += c.to_digit(16).unwrap() as f64 / 16f64.powi(i as i32 + 1);
            }
            (v * 2f64.powi(exp.parse().unwrap())) as f32
        }
    }
}
