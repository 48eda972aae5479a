//! Under the `nvjpeg` feature, compiles `src/nvjpeg/render.cu` (the GPU decode stage's render
//! kernel) to PTX with nvcc (found through `CUDA_ROOT`/`CUDA_HOME`/`CUDA_PATH` or `PATH`) for
//! compute capability `CUDA_COMPUTE_CAP` (default 90). Without the feature it does nothing, so
//! CPU builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/nvjpeg/render.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_NVJPEG").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("effdet_render.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/nvjpeg/render.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} for the render kernel: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/nvjpeg/render.cu");
}
