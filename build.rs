//! Link options of logitprobe's binaries, tests and benches.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // backends/src/cpu_kernels: llama.cpp's call that makes its CPU backend goes through
    // logitprobe, which notes the backend to pick its kernels per decode.
    if std::env::var_os("CARGO_FEATURE_LLAMA").is_some()
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo::rustc-link-arg=-Wl,--wrap=ggml_backend_init_by_type");
        // ...and its matrix products and attention go through logitprobe's batch-invariant kernels.
        println!("cargo::rustc-link-arg=-Wl,--wrap=ggml_compute_forward_mul_mat_tiled");
        println!("cargo::rustc-link-arg=-Wl,--wrap=ggml_compute_forward_flash_attn_ext");
    }
}
