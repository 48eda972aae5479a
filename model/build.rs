//! Under the `cuda` feature, compiles `src/ops/kernels.cu` to PTX (see
//! `tools/build/nvcc_ptx.rs`). Without the feature it does nothing, so CPU builds need no CUDA
//! toolkit.

include!("../tools/build/nvcc_ptx.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../tools/build/nvcc_ptx.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_ptx("src/ops/kernels.cu", "effdet_kernels.ptx");
    }
}
