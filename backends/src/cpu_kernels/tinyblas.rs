//! Batch-invariant matrix products at tinyBLAS's speed.
//!
//! llamafile's tinyBLAS sums every output element the same way whatever the tile it falls in:
//! one SIMD accumulator per element, fed along K in vector-width steps, reduced once at the
//! end; threads split the tiles, never K. What makes llama.cpp's products depend on the batch
//! is only that it runs tinyBLAS from two rows on and ggml's one-row dot products (which sum
//! in another order) below. Running tinyBLAS for every row count, one included, keeps each
//! row's logits independent of its batch and gives scoring tinyBLAS's speed.
//!
//! ggml's matrix product first offers itself to the tiled K-quant kernel
//! (`ggml_compute_forward_mul_mat_tiled`, in another object file than its caller). The final
//! link sends that call here (`-Wl,--wrap=ggml_compute_forward_mul_mat_tiled`, next to the
//! CPU backend's wrap in [`super`]). With the backend's `use_ref` flag clear (the fastest
//! kernels) the call goes on to ggml unchanged. With it set (the batch-invariant kernels) the
//! products of F32, F16 and Q8_0 weights are done here, through ggml's own `llamafile_sgemm`
//! ([`route`] says which), and every other type goes back to ggml's one-row dot products as
//! before. K-quants stay there: the tiled K-quant kernel is batch-invariant too, but run for a
//! single token it decodes at a third of the one-row kernel's speed (llama-bench,
//! Llama-3.2-1B-shaped Q4_K_M, 1 thread, `GGML_CPU_TILED_MM_FORCE=1`).
//!
//! `llamafile_sgemm` declines a single row. A lone F32 or F16 row is summed here by
//! [`one_row`], element for element as tinyBLAS's tiles sum it: the same lanes, the same FMAs
//! along K, the same final reduction, so it gets the numbers it gets inside any batch
//! (`tests/one_number.rs`, `tests/many_prompts.rs`), at the one-row kernel's speed.

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2::{ggml_tensor, ggml_type};

/// ggml's `struct ggml_compute_params` (ggml-cpu-impl.h of the llama.cpp that llama-cpp-sys-2
/// builds): what each worker thread gets for one operation.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ComputeParams {
    pub(super) ith: c_int,
    pub(super) nth: c_int,
    wsize: usize,
    wdata: *mut c_void,
    threadpool: *mut c_void,
    pub(super) use_ref: bool,
}

impl ComputeParams {
    /// The same call with ggml's fastest kernels (`use_ref` clear).
    pub(super) fn fastest(&self) -> ComputeParams {
        ComputeParams {
            use_ref: false,
            ..*self
        }
    }
}

extern "C" {
    /// ggml's tiled K-quant product (the symbol the wrap replaces).
    fn __real_ggml_compute_forward_mul_mat_tiled(
        params: *const ComputeParams,
        dst: *mut ggml_tensor,
    ) -> bool;
    /// llamafile's entry: `C = A·Bᵀ` for `m` rows of A, `n` of B, `k` elements (blocks for
    /// quantized types) each; false when it does not take these types or shapes.
    fn llamafile_sgemm(
        params: *const ComputeParams,
        m: i64,
        n: i64,
        k: i64,
        a: *const c_void,
        lda: i64,
        b: *const c_void,
        ldb: i64,
        c: *mut c_void,
        ldc: i64,
        a_type: c_int,
        b_type: c_int,
        c_type: c_int,
    ) -> bool;
    fn ggml_barrier(threadpool: *mut c_void);
}

/// ggml's matrix product asks the tiled K-quant kernel first; see the module doc.
///
/// # Safety
/// Called by ggml's CPU backend on each worker thread of one `MUL_MAT`, with its compute
/// parameters and destination tensor, as `ggml_compute_forward_mul_mat_tiled` is.
#[no_mangle]
pub unsafe extern "C" fn __wrap_ggml_compute_forward_mul_mat_tiled(
    params: *const ComputeParams,
    dst: *mut ggml_tensor,
) -> bool {
    // SAFETY: ggml passes its live parameters.
    if !unsafe { (*params).use_ref } {
        // SAFETY: the same call, passed on.
        return unsafe { __real_ggml_compute_forward_mul_mat_tiled(params, dst) };
    }
    // SAFETY: as for this function.
    unsafe { invariant_product(params, dst) }
}

/// Who multiplies weights of this type by `rows` activation rows under the batch-invariant
/// kernels, on x86 (see llamafile/sgemm.cpp).
#[derive(PartialEq)]
enum Route {
    TinyBlas,
    /// ggml's tiled K-quant kernel from 8 rows (where llama.cpp runs it), and below that
    /// [`super::kquants`]' copy of its sums.
    Tiled,
    /// ggml's one-row dot products: every other type, and Q8_0's and Q5_0's lone rows, whose
    /// AVX2 dot products (`ggml_vec_dot_q8_0_q8_0`, `ggml_vec_dot_q5_0_q8_0`) make the same
    /// sums as tinyBLAS's kernel for those types: the same exact integer block sums, scaled
    /// and accumulated by one FMA per block in eight lanes, reduced alike. They are also
    /// several times faster for one row than tinyBLAS's 4-row tiles.
    Ggml,
}

fn route(weights: ggml_type, rows: i64) -> Route {
    use llama_cpp_sys_2::{GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0};
    if !cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        return Route::Ggml;
    }
    match weights {
        GGML_TYPE_F32 | GGML_TYPE_F16 => Route::TinyBlas,
        GGML_TYPE_Q8_0 | GGML_TYPE_Q5_0 if rows > 1 => Route::TinyBlas,
        _ if super::kquants::takes(weights) && tiled_on() => Route::Tiled,
        _ => Route::Ggml,
    }
}

/// Whether ggml runs its tiled K-quant kernel: built with AVX-512 VNNI (whose microkernel
/// [`super::kquants`] follows) and not turned off by `GGML_CPU_TILED_MM=0`, which ggml reads.
fn tiled_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(all(
        target_feature = "avx512vnni",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    )) && *ON.get_or_init(|| {
        std::env::var("GGML_CPU_TILED_MM")
            .map(|v| v.trim().parse::<i64>().unwrap_or(0) != 0)
            .unwrap_or(true)
    })
}

/// `dst = src0 · src1ᵀ` through tinyBLAS for any row count, as ggml's own product calls it
/// (ggml-cpu.c, `ggml_compute_forward_mul_mat`); false leaves the product to ggml.
///
/// # Safety
/// As [`__wrap_ggml_compute_forward_mul_mat_tiled`].
unsafe fn invariant_product(params: *const ComputeParams, dst: *mut ggml_tensor) -> bool {
    // SAFETY: ggml's tensors for this operation, alive while it runs.
    let (p, d, w, x) = unsafe { (&*params, &*dst, &*(*dst).src[0], &*(*dst).src[1]) };
    if x.type_ != llama_cpp_sys_2::GGML_TYPE_F32 {
        return false;
    }
    let tiled = match route(w.type_, x.ne[1]) {
        Route::Ggml => return false,
        Route::Tiled if x.ne[1] >= 8 => {
            // SAFETY: ggml's own call, with the backend's flag for its fastest kernels.
            return unsafe { __real_ggml_compute_forward_mul_mat_tiled(&p.fastest(), dst) };
        }
        Route::Tiled => true,
        Route::TinyBlas => false,
    };
    // SAFETY: ggml's type tables, valid for any type.
    let dot_type = unsafe { (*llama_cpp_sys_2::ggml_get_type_traits_cpu(w.type_)).vec_dot_type };
    let activations = if dot_type == x.type_ {
        // SAFETY: a query of a live tensor.
        if !unsafe { llama_cpp_sys_2::ggml_is_contiguous(x) } {
            return false;
        }
        Activations {
            data: x.data as *const u8,
            row: x.nb[1],
            plane: x.nb[2],
            volume: x.nb[3],
        }
    } else {
        // SAFETY: as for this function.
        match unsafe { convert(p, x, dot_type) } {
            Some(converted) => converted,
            None => return false,
        }
    };
    // SAFETY: plain queries of ggml's type tables.
    let (w_size, w_block, dot_size) = unsafe {
        (
            llama_cpp_sys_2::ggml_type_size(w.type_),
            llama_cpp_sys_2::ggml_blck_size(w.type_),
            llama_cpp_sys_2::ggml_type_size(dot_type),
        )
    };
    let (n, r2, r3) = (x.ne[1], x.ne[2] / w.ne[2], x.ne[3] / w.ne[3]);
    if tiled {
        // SAFETY: as for this function; the activations are in Q8_K.
        unsafe { super::kquants::product(p, d, w, &activations, r2, r3) };
        return true;
    }
    if n == 1 {
        // SAFETY: as for this function; the activations are converted.
        return unsafe { one_row::product(p, d, w, &activations, dot_type, r2, r3) };
    }
    for i3 in 0..x.ne[3] {
        for i2 in 0..x.ne[2] {
            // SAFETY: offsets inside src0 (broadcast as ggml does), the activations and dst.
            let done = unsafe {
                llamafile_sgemm(
                    params,
                    w.ne[1],
                    n,
                    w.ne[0] / w_block,
                    (w.data as *const u8)
                        .add((i2 / r2) as usize * w.nb[2] + (i3 / r3) as usize * w.nb[3])
                        as *const c_void,
                    (w.nb[1] / w_size) as i64,
                    activations
                        .data
                        .add(i2 as usize * activations.plane + i3 as usize * activations.volume)
                        as *const c_void,
                    (activations.row / dot_size) as i64,
                    (d.data as *mut u8).add(i2 as usize * d.nb[2] + i3 as usize * d.nb[3])
                        as *mut c_void,
                    (d.nb[1] / 4) as i64,
                    w.type_ as c_int,
                    dot_type as c_int,
                    d.type_ as c_int,
                )
            };
            if !done {
                // The same answer on every thread (it depends on the shapes only), before
                // any work: ggml then runs its one-row products.
                return false;
            }
        }
    }
    true
}

/// Where the activations are, in the weights' dot-product type, with their strides in bytes.
pub(super) struct Activations {
    pub(super) data: *const u8,
    pub(super) row: usize,
    pub(super) plane: usize,
    pub(super) volume: usize,
}

/// The activations converted to `dot_type` in ggml's work buffer, each thread a slice of
/// every row (as ggml does, so the same blocks are quantized alike), then a barrier.
///
/// # Safety
/// As [`__wrap_ggml_compute_forward_mul_mat_tiled`], for a product whose src1 is `x`.
unsafe fn convert(p: &ComputeParams, x: &ggml_tensor, dot_type: ggml_type) -> Option<Activations> {
    // SAFETY: ggml's type tables and plain queries of them.
    let (from_float, block, size, row) = unsafe {
        (
            (*llama_cpp_sys_2::ggml_get_type_traits_cpu(dot_type)).from_float?,
            llama_cpp_sys_2::ggml_blck_size(dot_type),
            llama_cpp_sys_2::ggml_type_size(dot_type),
            llama_cpp_sys_2::ggml_row_size(dot_type, x.ne[0]),
        )
    };
    let wdata = p.wdata as *mut u8;
    if (x.ne[1] * x.ne[2] * x.ne[3]) as usize * row > p.wsize {
        return None;
    }
    let (ith, nth) = (p.ith as i64, p.nth as i64);
    let blocks = x.ne[0] / block;
    let (start, end) = (ith * blocks / nth, (ith + 1) * blocks / nth);
    for i3 in 0..x.ne[3] {
        for i2 in 0..x.ne[2] {
            for i1 in 0..x.ne[1] {
                let at = ((i3 * x.ne[2] + i2) * x.ne[1] + i1) as usize * row;
                // SAFETY: ggml planned `wsize` for src1 in `dot_type` (checked above); the
                // source offsets are src1's own strides.
                unsafe {
                    let src = (x.data as *const u8).add(
                        i3 as usize * x.nb[3]
                            + i2 as usize * x.nb[2]
                            + i1 as usize * x.nb[1]
                            + (start * block) as usize * x.nb[0],
                    );
                    from_float(
                        src as *const f32,
                        wdata.add(at + start as usize * size) as *mut c_void,
                        (end - start) * block,
                    );
                }
            }
        }
    }
    // SAFETY: every worker thread of this operation reaches this barrier.
    unsafe { ggml_barrier(p.threadpool) };
    Some(Activations {
        data: wdata,
        row,
        plane: row * x.ne[1] as usize,
        volume: row * (x.ne[1] * x.ne[2]) as usize,
    })
}

/// tinyBLAS's float product for a single activation row (`llamafile_sgemm` declines one),
/// each output element summed exactly as tinyBLAS's `gemm_bloc` sums it in a tile: one
/// accumulator of its vector width, an FMA per step along K, a zero-padded last step (its
/// masked load), then its reduction (`hsum`). The replayed output head ([`head_block`]) is
/// summed here too, in tinyBLAS's own tiles.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod one_row {
    use std::os::raw::c_void;

    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    use llama_cpp_sys_2::{ggml_tensor, ggml_type, GGML_TYPE_F16, GGML_TYPE_F32};

    use super::{Activations, ComputeParams};

    /// `dst = src0 · x` for one row of `x` per plane, this thread's share of src0's rows;
    /// false (on every thread alike) where tinyBLAS would decline the shape.
    ///
    /// # Safety
    /// As `invariant_product`, with `x` in `dot_type` at `activations`.
    pub(super) unsafe fn product(
        p: &ComputeParams,
        d: &ggml_tensor,
        w: &ggml_tensor,
        activations: &Activations,
        dot_type: ggml_type,
        r2: i64,
        r3: i64,
    ) -> bool {
        let (m, k) = (w.ne[1], w.ne[0] as usize);
        // tinyBLAS's float kernel takes m in tiles of 4 rows or declines (sgemm.cpp's
        // `tinyBLAS::matmul`), and ggml then runs its own products for every row count.
        if m % 4 != 0
            || !matches!(
                (w.type_, dot_type),
                (GGML_TYPE_F16, GGML_TYPE_F16) | (GGML_TYPE_F32, GGML_TYPE_F32)
            )
        {
            return false;
        }
        let (ith, nth) = (p.ith as i64, p.nth as i64);
        let (first, end) = (ith * m / nth, (ith + 1) * m / nth);
        for i3 in 0..d.ne[3] {
            for i2 in 0..d.ne[2] {
                // SAFETY: offsets inside src0 (broadcast as ggml does), the activations and
                // dst, as for tinyBLAS in `invariant_product`.
                unsafe {
                    let rows = (w.data as *const u8)
                        .add((i2 / r2) as usize * w.nb[2] + (i3 / r3) as usize * w.nb[3]);
                    let x = activations
                        .data
                        .add(i2 as usize * activations.plane + i3 as usize * activations.volume);
                    let out = (d.data as *mut u8).add(i2 as usize * d.nb[2] + i3 as usize * d.nb[3])
                        as *mut f32;
                    // Four rows at a time, as tinyBLAS's tiles: four independent FMA chains.
                    let mut i = first;
                    while i < end {
                        let group = (end - i).min(4) as usize;
                        let row = |r: usize| rows.add((i as usize + r) * w.nb[1]) as *const c_void;
                        let sums = if w.type_ == GGML_TYPE_F16 {
                            dot4::<u16>(
                                std::array::from_fn(|r| row(r.min(group - 1)) as *const u16),
                                x as *const u16,
                                k,
                                4 * w.nb[1],
                            )
                        } else {
                            dot4::<f32>(
                                std::array::from_fn(|r| row(r.min(group - 1)) as *const f32),
                                x as *const f32,
                                k,
                                4 * w.nb[1],
                            )
                        };
                        for (r, sum) in sums.iter().take(group).enumerate() {
                            *out.add(i as usize + r) = *sum;
                        }
                        i += group as i64;
                    }
                }
            }
        }
        true
    }

    /// `out[j][r] = rows[r] · xs[j]` for a block of whole rows of F32 or F16 weights and every
    /// input row `xs[j]`; false for other types or short slices.
    ///
    /// In tiles of 4 rows × 3 inputs, as tinyBLAS's float kernel takes a product: each element
    /// is still its own chain (the sums of [`dot4`], and of the engine's product), but a
    /// weight vector, loaded once, feeds three inputs' FMAs. One input at a time, the loads
    /// bound the replayed head at half of tinyBLAS's speed.
    pub(super) fn block(
        weights: ggml_type,
        rows: &[u8],
        row_bytes: usize,
        xs: &[&[u8]],
        k: usize,
        out: &mut [&mut [f32]],
    ) -> bool {
        let width = match weights {
            GGML_TYPE_F16 => 2,
            GGML_TYPE_F32 => 4,
            _ => return false,
        };
        let n_rows = out.first().map_or(0, |o| o.len());
        if row_bytes < k * width
            || rows.len() < n_rows * row_bytes
            || xs.len() != out.len()
            || xs.iter().any(|x| x.len() < k * width)
            || out.iter().any(|o| o.len() != n_rows)
        {
            return false;
        }
        // SAFETY: every row and input holds `k` values of the type `width` says (checked).
        unsafe {
            if width == 2 {
                tiles::<u16>(rows, row_bytes, xs, k, out);
            } else {
                tiles::<f32>(rows, row_bytes, xs, k, out);
            }
        }
        true
    }

    /// [`block`]'s loop over 4-row groups and 3-input tiles (a short last group repeats its
    /// last row, as [`dot4`] does; the last inputs go in a tile of two or one).
    ///
    /// # Safety
    /// `rows` holds `out[0].len()` rows of `k` values of `T`, `row_bytes` apart, and each
    /// `xs[j]` `k` values of `T`.
    #[inline(always)]
    unsafe fn tiles<T: Element>(
        rows: &[u8],
        row_bytes: usize,
        xs: &[&[u8]],
        k: usize,
        out: &mut [&mut [f32]],
    ) {
        let n_rows = out.first().map_or(0, |o| o.len());
        let x = |j: usize| xs[j].as_ptr() as *const T;
        for first in (0..n_rows).step_by(4) {
            let group = (n_rows - first).min(4);
            let a: [*const T; 4] = std::array::from_fn(|r| {
                rows[(first + r.min(group - 1)) * row_bytes..].as_ptr() as *const T
            });
            let mut j = 0;
            let mut put = |j: usize, sums: &[[f32; 4]]| {
                for (o, s) in out[j..].iter_mut().zip(sums) {
                    o[first..first + group].copy_from_slice(&s[..group]);
                }
            };
            // SAFETY: the caller's, for every row and input named.
            unsafe {
                while j + 3 <= xs.len() {
                    put(j, &tile::<T, 3>(a, [x(j), x(j + 1), x(j + 2)], k));
                    j += 3;
                }
                match xs.len() - j {
                    2 => put(j, &tile::<T, 2>(a, [x(j), x(j + 1)], k)),
                    1 => put(j, &tile::<T, 1>(a, [x(j)], k)),
                    _ => {}
                }
            }
        }
    }

    /// One tile of tinyBLAS's `gemm_bloc`: `a[i] · b[j]` for 4 rows and `RN` inputs, each
    /// element one accumulator fed along K, the zero-padded last step, then `hsum`.
    ///
    /// # Safety
    /// Each `a[i]` and `b[j]` points at `k` readable elements.
    #[inline(always)]
    unsafe fn tile<T: Element, const RN: usize>(
        a: [*const T; 4],
        b: [*const T; RN],
        k: usize,
    ) -> [[f32; 4]; RN] {
        // SAFETY: every load is inside the `k` elements, or from the zero-padded copy of
        // the last ones (what tinyBLAS's masked load gives).
        unsafe {
            let mut c = [[zero(); 4]; RN];
            let mut l = 0;
            // tinyBLAS's order for RM > RN: the inputs' vectors first, then a row at a time
            // (4 × 3 accumulators, 3 inputs and a row fill the 16 registers of AVX2).
            while l + LANES <= k {
                let bv: [Vector; RN] = std::array::from_fn(|j| T::load(b[j].add(l)));
                for (i, row) in a.iter().enumerate() {
                    let av = T::load(row.add(l));
                    for j in 0..RN {
                        c[j][i] = fma(av, bv[j], c[j][i]);
                    }
                }
                l += LANES;
            }
            if l < k {
                let tail = |p: *const T| load_tail(p, l, k);
                let bv: [Vector; RN] = std::array::from_fn(|j| tail(b[j]));
                for (i, row) in a.iter().enumerate() {
                    let av = tail(*row);
                    for j in 0..RN {
                        c[j][i] = fma(av, bv[j], c[j][i]);
                    }
                }
            }
            c.map(|cj| cj.map(hsum))
        }
    }

    /// An element type tinyBLAS loads into its f32 vectors.
    pub trait Element: Copy + Default {
        /// # Safety
        /// `p` points at a vector's width of readable elements.
        unsafe fn load(p: *const Self) -> Vector;
    }

    #[cfg(target_feature = "avx512f")]
    type Vector = __m512;
    #[cfg(not(target_feature = "avx512f"))]
    type Vector = __m256;

    /// tinyBLAS's KN for float products: the f32 lanes of one vector.
    const LANES: usize = std::mem::size_of::<Vector>() / 4;

    impl Element for u16 {
        #[inline(always)]
        unsafe fn load(p: *const u16) -> Vector {
            // SAFETY: the caller's; F16C (or AVX-512F) is on wherever this module is built.
            unsafe {
                #[cfg(target_feature = "avx512f")]
                return _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
                #[cfg(not(target_feature = "avx512f"))]
                return _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            }
        }
    }

    impl Element for f32 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Vector {
            // SAFETY: the caller's.
            unsafe {
                #[cfg(target_feature = "avx512f")]
                return _mm512_loadu_ps(p);
                #[cfg(not(target_feature = "avx512f"))]
                return _mm256_loadu_ps(p);
            }
        }
    }

    /// Four output elements: `a[r] · x` over `k` elements each (a row may repeat).
    ///
    /// # Safety
    /// Each `a[r]` and `x` point at `k` readable elements.
    #[inline(always)]
    unsafe fn dot4<T: Element>(a: [*const T; 4], x: *const T, k: usize, next: usize) -> [f32; 4] {
        // SAFETY: every load is inside the `k` elements, or from the zero-padded copy of
        // the last ones (what tinyBLAS's masked load gives).
        unsafe {
            let [a0, a1, a2, a3] = a;
            let (mut c0, mut c1, mut c2, mut c3) = (zero(), zero(), zero(), zero());
            let mut l = 0;
            // Each row's chain in its own order (K ascending); the rows take turns four
            // vectors at a time, so each reads whole cache lines in a burst.
            while l + 4 * LANES <= k {
                let xv = [
                    T::load(x.add(l)),
                    T::load(x.add(l + LANES)),
                    T::load(x.add(l + 2 * LANES)),
                    T::load(x.add(l + 3 * LANES)),
                ];
                // The next four rows, a group ahead: with four rows read side by side the
                // hardware prefetcher falls behind (a third of the one-row kernel's speed).
                for r in [a0, a1, a2, a3] {
                    let ahead = r.add(l).byte_add(next) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                }
                for (j, xv) in xv.into_iter().enumerate() {
                    c0 = fma(T::load(a0.add(l + j * LANES)), xv, c0);
                }
                for (j, xv) in xv.into_iter().enumerate() {
                    c1 = fma(T::load(a1.add(l + j * LANES)), xv, c1);
                }
                for (j, xv) in xv.into_iter().enumerate() {
                    c2 = fma(T::load(a2.add(l + j * LANES)), xv, c2);
                }
                for (j, xv) in xv.into_iter().enumerate() {
                    c3 = fma(T::load(a3.add(l + j * LANES)), xv, c3);
                }
                l += 4 * LANES;
            }
            while l + LANES <= k {
                let xv = T::load(x.add(l));
                c0 = fma(T::load(a0.add(l)), xv, c0);
                c1 = fma(T::load(a1.add(l)), xv, c1);
                c2 = fma(T::load(a2.add(l)), xv, c2);
                c3 = fma(T::load(a3.add(l)), xv, c3);
                l += LANES;
            }
            if l < k {
                let tail = |p: *const T| load_tail(p, l, k);
                let xv = tail(x);
                c0 = fma(tail(a0), xv, c0);
                c1 = fma(tail(a1), xv, c1);
                c2 = fma(tail(a2), xv, c2);
                c3 = fma(tail(a3), xv, c3);
            }
            let acc = [c0, c1, c2, c3];
            acc.map(hsum)
        }
    }

    /// Elements `l..k` of a row (fewer than a vector's width), zero-padded to a vector: what
    /// tinyBLAS's masked load of the last step gives.
    ///
    /// # Safety
    /// `p` points at `k` readable elements and `k - l < LANES`.
    #[inline(always)]
    unsafe fn load_tail<T: Element>(p: *const T, l: usize, k: usize) -> Vector {
        let mut t = [T::default(); LANES];
        // SAFETY: the caller's: `k - l` elements from `l` on are readable, and fit `t`.
        unsafe {
            std::ptr::copy_nonoverlapping(p.add(l), t.as_mut_ptr(), k - l);
            T::load(t.as_ptr())
        }
    }

    #[inline(always)]
    fn zero() -> Vector {
        // SAFETY: plain register operations of features this module is built with.
        unsafe {
            #[cfg(target_feature = "avx512f")]
            return _mm512_setzero_ps();
            #[cfg(not(target_feature = "avx512f"))]
            return _mm256_setzero_ps();
        }
    }

    #[inline(always)]
    fn fma(a: Vector, b: Vector, c: Vector) -> Vector {
        // SAFETY: as `zero`.
        unsafe {
            #[cfg(target_feature = "avx512f")]
            return _mm512_fmadd_ps(a, b, c);
            #[cfg(not(target_feature = "avx512f"))]
            return _mm256_fmadd_ps(a, b, c);
        }
    }

    /// tinyBLAS's `hsum`: for 16 lanes `_mm512_reduce_add_ps` (the upper 256 bits added to
    /// the lower, then 128 to 128, then lanes 2,3 to 0,1, then 1 to 0, as GCC and Clang
    /// both reduce); for 8 lanes the same from the 128-bit step on.
    #[inline(always)]
    fn hsum(v: Vector) -> f32 {
        // SAFETY: as `zero`.
        unsafe {
            #[cfg(target_feature = "avx512f")]
            let v = _mm256_add_ps(
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                _mm512_castps512_ps256(v),
            );
            let q = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_movehdup_ps(q));
            _mm_cvtss_f32(q)
        }
    }
}

/// Without AVX2, FMA and F16C nothing is routed to tinyBLAS ([`route`]).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
mod one_row {
    use llama_cpp_sys_2::{ggml_tensor, ggml_type};

    use super::{Activations, ComputeParams};

    pub(super) unsafe fn product(
        _: &ComputeParams,
        _: &ggml_tensor,
        _: &ggml_tensor,
        _: &Activations,
        _: ggml_type,
        _: i64,
        _: i64,
    ) -> bool {
        false
    }

    pub(super) fn block(
        _: ggml_type,
        _: &[u8],
        _: usize,
        _: &[&[u8]],
        _: usize,
        _: &mut [&mut [f32]],
    ) -> bool {
        false
    }
}

/// `out[j][r] = rows[r] · xs[j]` for a block of rows of a head of `weights`' type
/// (`row_bytes` each, `out[j].len()` of them) and input rows `xs` (already in the type's
/// dot-product type, `k` values wide), each summed as ggml's matrix product sums it for a
/// scoring chunk: in tinyBLAS's order for F32 and F16 rows; `false` where ggml's own one-row
/// dot product is the one to use (Q8_0 and Q5_0 rows' makes tinyBLAS's sums). `m` is the
/// number of rows of the whole head (tinyBLAS takes heads of a multiple of 4 rows only).
pub fn head_block(
    weights: ggml_type,
    m: usize,
    rows: &[u8],
    row_bytes: usize,
    xs: &[&[u8]],
    k: usize,
    out: &mut [&mut [f32]],
) -> bool {
    if !m.is_multiple_of(4) || route(weights, 1) != Route::TinyBlas {
        return false;
    }
    one_row::block(weights, rows, row_bytes, xs, k, out)
}

#[cfg(all(
    test,
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod tests {
    use llama_cpp_sys_2 as sys;

    /// ggml's own product of an F16 head and 7 input rows (tinyBLAS: what a scoring chunk
    /// runs) against `head_block` over blocks of the head's rows, a short group of rows and
    /// a last tile of one input included: bit for bit.
    #[test]
    fn a_replayed_head_block_gets_tinyblas_numbers() {
        // K with a part-vector tail at 8 and at 16 lanes; M a multiple of 4 (tinyBLAS's).
        const K: usize = 76;
        const M: usize = 12;
        const N: usize = 7;
        let mut rand = super::super::tests::uniform(0x2545_f491_4f6c_dd1d);
        // SAFETY: a ggml context of its own, tensors made in it, freed at the end.
        unsafe {
            sys::ggml_cpu_init();
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: 16 << 20,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            let w = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F16, K as i64, M as i64);
            let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, K as i64, N as i64);
            // Magnitudes over a few octaves, so that the order of the sums shows in their
            // rounding (products of f16 values alike in size add up exactly).
            let mut spread = move || rand() * (16.0 * rand()).exp2();
            for i in 0..K * M {
                *((*w).data as *mut u16).add(i) = sys::ggml_fp32_to_fp16(spread());
            }
            for i in 0..K * N {
                *((*x).data as *mut f32).add(i) = spread();
            }
            let out = sys::ggml_mul_mat(ctx, w, x);
            let graph = sys::ggml_new_graph(ctx);
            sys::ggml_build_forward_expand(graph, out);
            sys::ggml_graph_compute_with_ctx(ctx, graph, 1);
            let engine = std::slice::from_raw_parts((*out).data as *const f32, M * N);

            let rows = std::slice::from_raw_parts((*w).data as *const u8, K * M * 2);
            let inputs: Vec<Vec<u8>> = (0..N)
                .map(|j| {
                    (0..K)
                        .flat_map(|i| {
                            let v = *((*x).data as *const f32).add(j * K + i);
                            sys::ggml_fp32_to_fp16(v).to_le_bytes()
                        })
                        .collect()
                })
                .collect();
            let xs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            for split in [M, 5] {
                let mut ours = vec![f32::NAN; M * N];
                for (b0, b1) in [(0, split), (split, M)] {
                    let mut sums: Vec<&mut [f32]> =
                        ours.chunks_mut(M).map(|row| &mut row[b0..b1]).collect();
                    assert!(super::head_block(
                        sys::GGML_TYPE_F16,
                        M,
                        &rows[b0 * K * 2..],
                        K * 2,
                        &xs,
                        K,
                        &mut sums
                    ));
                }
                for (i, (a, b)) in ours.iter().zip(engine).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "split {split}, value {i}: {a} vs {b}"
                    );
                }
            }
            sys::ggml_free(ctx);
        }
    }
}
