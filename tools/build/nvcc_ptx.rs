// Shared by the build scripts of the crates with CUDA kernels (`include!`d by model/build.rs and
// pipeline/build.rs): compiles one .cu file to PTX with nvcc.

/// Compiles `src` (relative to the crate) to `$OUT_DIR/<ptx_name>` with nvcc, found through
/// `CUDA_ROOT`/`CUDA_HOME`/`CUDA_PATH` or `PATH`, for compute capability `CUDA_COMPUTE_CAP`
/// (default 90). Panics with the command's failure, which fails the build.
fn compile_ptx(src: &str, ptx_name: &str) {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(ptx_name);
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = std::process::Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} on {src}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {src}");
}
