//! Build script: with the `cuda` feature, compiles cuda/nf4.cu, nf4_sweep.cu, lora.cu, decode.cu and train.cu
//! with nvcc into fat binaries holding machine code for `CUDA_COMPUTE_CAP` (default 90) and its PTX (for newer GPUs),
//! embedded and loaded at run time by src/module_cuda.rs. Without the feature nothing happens, so CPU-only builds
//! (CI) need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    println!("cargo:rerun-if-changed=cuda/bf16.cuh");
    println!("cargo:rerun-if-changed=cuda/nf4_common.cuh");
    println!("cargo:rerun-if-changed=cuda/nf4_pipe.cuh");
    println!("cargo:rerun-if-changed=cuda/lora_table.cuh");
    println!("cargo:rerun-if-changed=cuda/nf4_tc.cuh");
    println!("cargo:rerun-if-changed=cuda/nf4_t4.cuh");
    for name in ["nf4", "nf4_sweep", "lora", "decode", "train"] {
        let src = format!("cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17"])
            .arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
            .arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.fatbin")))
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e} (set CUDA_HOME)", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
