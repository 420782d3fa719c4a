//! Device and dtype selection, and the CUDA start-up trap.
//!
//! libtorch decides on its first CUDA query whether CUDA exists, and it only can if
//! `libtorch_cuda.so` is loaded by then. `build.rs` keeps it in the binary's needed libraries; as a
//! second line of defence [`init`] dlopens it before anything touches CUDA (harmless when absent).
use crate::error::{Error, Result};
use std::ffi::CStr;
use tch::{Device, Kind};

/// Loads the CUDA backend of libtorch if it is installed. Call first thing in `main`.
pub fn init() {
    const LIB: &CStr = c"libtorch_cuda.so";
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked so the
    // library stays loaded for the life of the process.
    let handle = unsafe { libc::dlopen(LIB.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        tracing::debug!("libtorch_cuda.so not loadable: CUDA unavailable");
    }
}

/// `auto` (CUDA if available, else CPU), `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let cuda = |i: usize| -> Result<Device> {
        let n = tch::Cuda::device_count() as usize;
        if i < n {
            Ok(Device::Cuda(i))
        } else if n == 0 {
            Err(Error::InvalidArgument(format!(
                "device `{spec}`: no CUDA device is available (is libtorch_cuda.so on LD_LIBRARY_PATH?)"
            )))
        } else {
            Err(Error::InvalidArgument(format!(
                "device `{spec}`: only {n} CUDA device(s)"
            )))
        }
    };
    match spec.as_str() {
        "auto" => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{spec}` (auto, cpu, cuda, cuda:N)"
            ))),
        },
    }
}

/// `auto` (fp16 on CUDA, fp32 on CPU), `fp32`, `fp16`, `bf16`. Half precisions need CUDA.
pub fn parse_dtype(spec: &str, device: Device) -> Result<Kind> {
    let kind = match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => {
            return Ok(if device.is_cuda() {
                Kind::Half
            } else {
                Kind::Float
            });
        }
        "fp32" | "float32" | "f32" => Kind::Float,
        "fp16" | "float16" | "f16" | "half" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown dtype `{other}` (auto, fp32, fp16, bf16)"
            )));
        }
    };
    if kind != Kind::Float && !device.is_cuda() {
        return Err(Error::InvalidArgument(format!(
            "dtype `{spec}` needs a CUDA device; the CPU runs in fp32"
        )));
    }
    Ok(kind)
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::Half => "fp16",
        Kind::BFloat16 => "bf16",
        _ => "other",
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Free and total bytes of the current CUDA device, from the CUDA runtime that libtorch loaded
/// (tch exposes no memory query). `None` without CUDA.
pub fn cuda_memory() -> Option<(u64, u64)> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    // SAFETY: looks a symbol up by a valid NUL-terminated name; the pointer is only called if
    // found, with the signature the CUDA runtime documents for cudaMemGetInfo.
    unsafe {
        let mut sym = libc::dlsym(libc::RTLD_DEFAULT, c"cudaMemGetInfo".as_ptr());
        if sym.is_null() {
            for lib in [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"] {
                let h = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
                if !h.is_null() {
                    sym = libc::dlsym(h, c"cudaMemGetInfo".as_ptr());
                    if !sym.is_null() {
                        break;
                    }
                }
            }
        }
        if sym.is_null() {
            return None;
        }
        let f: MemGetInfo = std::mem::transmute(sym);
        let (mut free, mut total) = (0usize, 0usize);
        (f(&mut free, &mut total) == 0).then_some((free as u64, total as u64))
    }
}

/// The CUDA device's product name ("NVIDIA H200"), from the driver libtorch loaded (tch exposes
/// none). `None` without CUDA. Keys calibrations: memory figures hold for one kind of GPU.
pub fn cuda_device_name(index: usize) -> Option<String> {
    type GetName = unsafe extern "C" fn(*mut libc::c_char, i32, i32) -> i32;
    let index = i32::try_from(index).ok()?;
    // SAFETY: looks a symbol up by a valid NUL-terminated name; calls cuDeviceGetName with a
    // buffer of the length it is told, as the driver API documents; the result is cut at the
    // first NUL inside the buffer.
    unsafe {
        let mut sym = libc::dlsym(libc::RTLD_DEFAULT, c"cuDeviceGetName".as_ptr());
        if sym.is_null() {
            let h = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if !h.is_null() {
                sym = libc::dlsym(h, c"cuDeviceGetName".as_ptr());
            }
        }
        if sym.is_null() {
            return None;
        }
        let f: GetName = std::mem::transmute(sym);
        let mut buf = [0 as libc::c_char; 256];
        if f(buf.as_mut_ptr(), buf.len() as i32, index) != 0 {
            return None;
        }
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Some(String::from_utf8_lossy(&bytes).trim().to_string())
    }
}

/// Peak resident memory of this process in bytes (the CPU's counterpart of device memory).
pub fn peak_rss() -> Option<u64> {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid initial value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
    // ru_maxrss is in KiB on Linux.
    ok.then(|| usage.ru_maxrss as u64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype("auto", Device::Cuda(0)).unwrap(), Kind::Half);
        assert_eq!(
            parse_dtype("bf16", Device::Cuda(0)).unwrap(),
            Kind::BFloat16
        );
        let err = parse_dtype("fp16", Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("needs a CUDA device"), "{err}");
        assert!(parse_dtype("int8", Device::Cpu).is_err());
    }
}
