//! Two jobs, both against the libtorch that tch links (`LIBTORCH`, or the Python torch with
//! `LIBTORCH_USE_PYTORCH`):
//!
//! 1. Link `libtorch_cuda.so` unconditionally when that libtorch has it. rustc links with
//!    `--as-needed`, and nothing in sdbatch references a symbol of `libtorch_cuda.so` directly, so
//!    the linker drops it. libtorch then answers its first "is CUDA available?" query without the
//!    CUDA backend registered and CUDA silently stays off. Wrapping the library in `--no-as-needed`
//!    keeps it in the binary's DT_NEEDED list. (`main` also dlopens it as a second line of defence,
//!    for binaries built against a CPU-only libtorch and run next to a CUDA one.)
//! 2. Compile `csrc/bridge.cpp` (allocator statistics, AOTInductor packages; see `src/bridge.rs`)
//!    with the same headers and C++ ABI as that libtorch, and set `cfg(sdbatch_bridge)`. Without
//!    libtorch's headers the bridge is left out and its Rust side reports itself absent.
use std::path::PathBuf;
use std::process::Command;

/// Where libtorch lives: `root/lib` (libraries) and `root/include` (headers), and whether it was
/// built with the C++11 ABI.
struct Torch {
    root: PathBuf,
    cxx11_abi: bool,
}

fn find_torch() -> Option<Torch> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let abi = std::env::var("LIBTORCH_CXX11_ABI").map_or(true, |v| v != "0");
        return Some(Torch {
            root: PathBuf::from(dir),
            cxx11_abi: abi,
        });
    }
    if std::env::var("LIBTORCH_USE_PYTORCH").is_ok() {
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output()
            .ok()?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let root = PathBuf::from(lines.next()?.trim());
            let cxx11_abi = lines.next().map(str::trim) != Some("0");
            return Some(Torch { root, cxx11_abi });
        }
    }
    None
}

fn build_bridge(torch: &Torch) {
    let include = torch.root.join("include");
    let header = include.join("torch/csrc/inductor/aoti_package/model_package_loader.h");
    if !header.is_file() {
        println!(
            "cargo:warning=libtorch headers not found under {}: building without the C++ bridge",
            include.display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .std("c++17")
        .define(
            "_GLIBCXX_USE_CXX11_ABI",
            if torch.cxx11_abi { "1" } else { "0" },
        )
        // libtorch's headers are not warning-clean under -Wextra; our file is small enough to
        // read.
        .warnings(false)
        .compile("sdbatch_bridge");
    println!("cargo:rustc-cfg=sdbatch_bridge");
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-changed=csrc/bridge.cpp");
    println!("cargo::rustc-check-cfg=cfg(sdbatch_bridge)");
    let Some(torch) = find_torch() else {
        return;
    };
    let lib = torch.root.join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    build_bridge(&torch);
}
