//! Under the `nvjpeg` feature, compiles `src/nvjpeg/render.cu` (the GPU decode stage's render
//! kernel) to PTX (see `tools/build/nvcc_ptx.rs`). Without the feature it does nothing, so CPU
//! builds need no CUDA toolkit.

include!("../tools/build/nvcc_ptx.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../tools/build/nvcc_ptx.rs");
    if std::env::var_os("CARGO_FEATURE_NVJPEG").is_some() {
        compile_ptx("src/nvjpeg/render.cu", "effdet_render.ptx");
    }
}
