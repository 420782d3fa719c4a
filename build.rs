//! Link `libtorch_cuda.so` unconditionally when the libtorch we build against has it.
//!
//! rustc links with `--as-needed`, and nothing in sdbatch references a symbol of `libtorch_cuda.so`
//! directly, so the linker drops it. libtorch then answers its first "is CUDA available?" query
//! without the CUDA backend registered and CUDA silently stays off. Wrapping the library in
//! `--no-as-needed` keeps it in the binary's DT_NEEDED list. (`main` also dlopens it as a second
//! line of defence, for binaries built against a CPU-only libtorch and run next to a CUDA one.)
use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    if std::env::var("LIBTORCH_USE_PYTORCH").is_ok() {
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .ok()?;
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            return Some(PathBuf::from(dir).join("lib"));
        }
    }
    None
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    if let Some(dir) = torch_lib_dir()
        && dir.join("libtorch_cuda.so").exists()
    {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
