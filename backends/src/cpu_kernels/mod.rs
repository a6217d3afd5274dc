//! Which of ggml's CPU kernels a llama.cpp context runs: the batch-invariant ones, or the
//! fastest ones for teacher-forced scoring when asked (`EngineOptions::fast_scoring`).
//!
//! ggml picks some CPU kernels by the shape of a batch: llamafile's tinyBLAS for matrix
//! products of two rows or more (F32, F16, BF16, Q8_0, Q4_0, Q5_0 and IQ4_NL weights), a
//! tiled K-quant product from 8 rows on, a tiled flash attention from 64 queries on, a
//! KV-split one for a lone query over 512 cells or more. Each sums in another order than the
//! kernel of a single row, so a token's logits would depend on what else shares its batch: on
//! `--parallel`, on which prompts arrive together. The CPU backend's `use_ref` switch turns
//! all of them off (ggml's own one-row SIMD dot products remain) and is read at every graph
//! compute. Generation sets it, and so does scoring by default, so that a token scored in a
//! chunk gets the numbers it gets as a generation step. Under it, the products of tinyBLAS's
//! weight types run tinyBLAS again, for every row count ([`tinyblas`]): tinyBLAS's sums do not
//! depend on the batch, only its being skipped for a single row did, and it is half of an F16
//! or Q8_0 model's prompt speed. Scoring with `fast_scoring` clears the switch: llama.cpp's own
//! choices, as `llama-perplexity` runs them. (The weights the CPU backend repacks, whose
//! products take 4 rows at a time, are another such choice, made when the model loads:
//! `LlamaSource::open` repacks only for `fast_scoring`.)
//!
//! llama.cpp keeps its CPU backend private: it makes it with `ggml_backend_init_by_type`
//! while it builds a context, a call from libllama into libggml. On Linux the final link
//! sends that call here (`-Wl,--wrap=ggml_backend_init_by_type`, from the build scripts of
//! every binary that links llama.cpp), and [`__wrap_ggml_backend_init_by_type`] notes the
//! backend it makes. Where the link did not (another OS, a doctest), nothing is noted and the
//! context runs llama.cpp's default, the fastest kernels, for everything. The matrix products
//! reach [`tinyblas`] through a second wrap of the same kind.

use std::cell::Cell;

use llama_cpp_sys_2::{ggml_backend, ggml_backend_dev_type, ggml_backend_t};

#[cfg(target_os = "linux")]
mod attention;
#[cfg(target_os = "linux")]
mod kquants;
#[cfg(target_os = "linux")]
mod tinyblas;

/// `out[j][r] = rows[r] · xs[j]` for a block of rows of an output head of type `weights` and
/// every input row, summed as a scoring chunk's matrix product sums them (so a replayed head
/// gives the engine's logits bit for bit); `false` where ggml's one-row `vec_dot` is that
/// product. See `tinyblas::head_block`.
pub fn head_block(
    weights: llama_cpp_sys_2::ggml_type,
    m: usize,
    rows: &[u8],
    row_bytes: usize,
    xs: &[&[u8]],
    k: usize,
    out: &mut [&mut [f32]],
) -> bool {
    #[cfg(target_os = "linux")]
    return tinyblas::head_block(weights, m, rows, row_bytes, xs, k, out);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (weights, m, rows, row_bytes, xs, k, out);
        false
    }
}

/// The kernels a `llama_decode` runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// Every row summed as if it were alone in its batch: generation, where batches mix
    /// sequences and their sizes depend on `--parallel` and timing, and scoring by default.
    BatchInvariant,
    /// What llama.cpp picks for the batch's shape: scoring fixed chunks, when asked.
    Fastest,
}

thread_local! {
    /// The CPU backend the last context made on this thread got (see the module doc).
    static MADE: Cell<ggml_backend_t> = const { Cell::new(std::ptr::null_mut()) };
}

/// ggml's `ggml_backend_init_by_type`, reached from llama.cpp's context constructor through
/// the linker's `--wrap`: the same two calls, and the CPU backend noted for [`CpuBackend`].
///
/// # Safety
/// Called by llama.cpp with a device type and a parameter string (or null), as
/// `ggml_backend_init_by_type` is.
#[no_mangle]
pub unsafe extern "C" fn __wrap_ggml_backend_init_by_type(
    ty: ggml_backend_dev_type,
    params: *const std::os::raw::c_char,
) -> ggml_backend_t {
    // SAFETY: ggml's registry lookup, valid at any time after ggml's static init.
    let dev = unsafe { llama_cpp_sys_2::ggml_backend_dev_by_type(ty) };
    if dev.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `dev` is a registered device; `params` is passed on as llama.cpp gave it.
    let backend = unsafe { llama_cpp_sys_2::ggml_backend_dev_init(dev, params) };
    if ty == llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_CPU && !backend.is_null() {
        MADE.with(|m| m.set(backend));
    }
    backend
}

/// The CPU backend of one llama.cpp context, to set its kernels before a decode.
pub struct CpuBackend {
    /// Owned by the context it was noted for: used only while that context lives.
    backend: *mut ggml_backend,
    current: Option<Kernels>,
}

// SAFETY: the pointer is only dereferenced by ggml's setter on the thread that owns the
// context (LlamaSource is used from one thread at a time, as its context is).
unsafe impl Send for CpuBackend {}

impl CpuBackend {
    /// Forgets what an earlier context noted: call before making a context.
    pub fn before_context() {
        MADE.with(|m| m.set(std::ptr::null_mut()));
    }

    /// The CPU backend of the context just made on this thread, if the link noted it.
    pub fn of_new_context() -> Option<Self> {
        let backend = MADE.with(|m| m.replace(std::ptr::null_mut()));
        (!backend.is_null()).then_some(CpuBackend {
            backend,
            current: None,
        })
    }

    /// Sets the kernels of the next graph computes.
    ///
    /// # Safety
    /// The context this backend was noted for must still be alive.
    pub unsafe fn set(&mut self, kernels: Kernels) {
        if self.current == Some(kernels) {
            return;
        }
        // SAFETY: the caller keeps the context, and so its CPU backend, alive; ggml's setter
        // writes one flag of the backend's context.
        unsafe {
            llama_cpp_sys_2::ggml_backend_cpu_set_use_ref(
                self.backend,
                kernels == Kernels::BatchInvariant,
            )
        };
        self.current = Some(kernels);
    }
}

// The kernel tests exist where the copies they check are built (AVX2, FMA and F16C).
#[cfg(all(
    test,
    target_os = "linux",
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod tests {
    /// Values uniform in [−0.5, 0.5) from an xorshift of `seed`: the kernel tests' data.
    pub(super) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }
}
