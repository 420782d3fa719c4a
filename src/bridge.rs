//! Safe wrappers over `csrc/bridge.cpp`, the small C++ bridge to what tch does not bind: the CUDA
//! caching allocator's statistics and cache, and AOTInductor model packages. All of sdbatch's
//! unsafe calls into it are in this module.
//!
//! The bridge is compiled by `build.rs` against the libtorch tch links; where libtorch's headers
//! were missing at build time it is absent ([`compiled_in`] is false) and every call answers
//! [`BridgeError::Absent`]. Without CUDA (CPU-only libtorch, no GPU) the allocator calls answer
//! [`BridgeError::NoCuda`]: the CUDA allocator is only asked for once libtorch says CUDA is usable.
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// sdbatch was built without the C++ bridge.
    #[error("sdbatch was built without its C++ bridge to libtorch (libtorch headers not found)")]
    Absent,
    /// libtorch has no usable CUDA device (or no CUDA backend).
    #[error("no CUDA device")]
    NoCuda,
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("{path}: {message}")]
    Package { path: PathBuf, message: String },
}

pub type Result<T, E = BridgeError> = std::result::Result<T, E>;

/// The CUDA caching allocator's view of one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorStats {
    /// Bytes held by live tensors now, and at most since the last [`reset_peak`].
    pub allocated: u64,
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver (live tensors and its cache), now and at most.
    pub reserved: u64,
    pub peak_reserved: u64,
    /// The device's free and total memory as the driver reports them (`cudaMemGetInfo`).
    pub device_free: u64,
    pub device_total: u64,
}

/// Whether this build has the bridge.
pub fn compiled_in() -> bool {
    cfg!(sdbatch_bridge)
}

/// The version of the libtorch the bridge was compiled against (`2.11.0`); `None` without it.
pub fn torch_version() -> Option<String> {
    ffi::torch_version()
}

/// Whether libtorch can use a CUDA device now.
pub fn cuda_usable() -> Result<bool> {
    match ffi::cuda_usable() {
        Status::Ok(v) => Ok(v != 0),
        Status::NoCuda => Ok(false),
        Status::Failed(e) => Err(e),
    }
}

/// The allocator statistics of CUDA device `device`.
pub fn memory_stats(device: usize) -> Result<AllocatorStats> {
    ffi::memory_stats(device_index(device)?).into_result()
}

/// Starts a new peak-measuring window on `device`: the peaks become the current values.
pub fn reset_peak(device: usize) -> Result<()> {
    ffi::reset_peak(device_index(device)?).into_result()
}

/// Returns the allocator's cached, unused blocks to the driver (other processes can use them; the
/// driver's free memory then reflects what tensors hold).
pub fn empty_cache() -> Result<()> {
    ffi::empty_cache().into_result()
}

fn device_index(device: usize) -> Result<i32> {
    i32::try_from(device).map_err(|_| BridgeError::Torch(format!("device index {device}")))
}

/// An AOTInductor package (`.pt2` from `torch._inductor.aoti_compile_and_package`), loaded.
pub struct AotiPackage {
    handle: ffi::Handle,
    path: PathBuf,
}

impl AotiPackage {
    /// Loads the package at `path` for `device` (the device it was compiled for: a CPU package on
    /// the CPU, a CUDA package on a CUDA device).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let index = match device {
            Device::Cuda(i) => device_index(i)?,
            _ => -1,
        };
        let package = |message: String| BridgeError::Package {
            path: path.to_path_buf(),
            message,
        };
        let text = path
            .to_str()
            .ok_or_else(|| package("the path is not UTF-8".into()))?;
        let handle = ffi::aoti_load(text, index).map_err(|e| match e {
            BridgeError::Torch(m) => package(m),
            other => other,
        })?;
        Ok(Self {
            handle,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the compiled model on `inputs`; returns its outputs.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        ffi::aoti_run(&self.handle, inputs)
    }
}

/// What a bridge call returned.
enum Status<T> {
    Ok(T),
    NoCuda,
    Failed(BridgeError),
}

impl<T> Status<T> {
    fn into_result(self) -> Result<T> {
        match self {
            Status::Ok(v) => Ok(v),
            Status::NoCuda => Err(BridgeError::NoCuda),
            Status::Failed(e) => Err(e),
        }
    }
}

#[cfg(sdbatch_bridge)]
mod ffi {
    use super::{AllocatorStats, BridgeError, Result, Status};
    use std::ffi::{CStr, CString, c_char, c_int, c_void};
    use std::ptr::NonNull;
    use tch::Tensor;

    #[repr(C)]
    #[derive(Default)]
    struct SdbMemoryStats {
        allocated_current: i64,
        allocated_peak: i64,
        reserved_current: i64,
        reserved_peak: i64,
        device_free: i64,
        device_total: i64,
    }

    // tch's tensor handle is a pointer to a heap `at::Tensor` (torch-sys' opaque `C_tensor`); the
    // bridge takes and returns the same kind of pointer, untyped here.
    type TensorPtr = *mut c_void;

    unsafe extern "C" {
        fn sdb_last_error() -> *const c_char;
        fn sdb_torch_version() -> *const c_char;
        fn sdb_cuda_usable() -> c_int;
        fn sdb_cuda_memory_stats(device: c_int, out: *mut SdbMemoryStats) -> c_int;
        fn sdb_cuda_reset_peak(device: c_int) -> c_int;
        fn sdb_cuda_empty_cache() -> c_int;
        fn sdb_aoti_load(path: *const c_char, device_index: c_int) -> *mut c_void;
        fn sdb_aoti_free(handle: *mut c_void);
        fn sdb_aoti_run(
            handle: *mut c_void,
            inputs: *const TensorPtr,
            num_inputs: c_int,
            outputs: *mut TensorPtr,
            max_outputs: c_int,
        ) -> c_int;
    }

    fn last_error() -> BridgeError {
        // SAFETY: sdb_last_error returns a NUL-terminated string owned by this thread's bridge
        // state, valid until the next bridge call on this thread; it is copied at once.
        let text = unsafe { CStr::from_ptr(sdb_last_error()) };
        BridgeError::Torch(text.to_string_lossy().into_owned())
    }

    /// 0 → Ok, 1 → no CUDA, anything else → the thread's last error.
    fn status(code: c_int) -> Status<()> {
        match code {
            0 => Status::Ok(()),
            1 => Status::NoCuda,
            _ => Status::Failed(last_error()),
        }
    }

    pub fn torch_version() -> Option<String> {
        // SAFETY: returns a pointer to a static NUL-terminated string literal.
        let text = unsafe { CStr::from_ptr(sdb_torch_version()) };
        Some(text.to_string_lossy().into_owned())
    }

    pub fn cuda_usable() -> Status<i32> {
        // SAFETY: no arguments; exceptions are caught on the C++ side.
        let code = unsafe { sdb_cuda_usable() };
        if code < 0 {
            Status::Failed(last_error())
        } else {
            Status::Ok(code)
        }
    }

    pub fn memory_stats(device: i32) -> Status<AllocatorStats> {
        let mut raw = SdbMemoryStats::default();
        // SAFETY: `raw` is a valid, writable struct of the layout the C side declares.
        match status(unsafe { sdb_cuda_memory_stats(device, &mut raw) }) {
            Status::Ok(()) => {
                let b = |v: i64| u64::try_from(v).unwrap_or(0);
                Status::Ok(AllocatorStats {
                    allocated: b(raw.allocated_current),
                    peak_allocated: b(raw.allocated_peak),
                    reserved: b(raw.reserved_current),
                    peak_reserved: b(raw.reserved_peak),
                    device_free: b(raw.device_free),
                    device_total: b(raw.device_total),
                })
            }
            Status::NoCuda => Status::NoCuda,
            Status::Failed(e) => Status::Failed(e),
        }
    }

    pub fn reset_peak(device: i32) -> Status<()> {
        // SAFETY: plain integer argument; exceptions are caught on the C++ side.
        status(unsafe { sdb_cuda_reset_peak(device) })
    }

    pub fn empty_cache() -> Status<()> {
        // SAFETY: no arguments; exceptions are caught on the C++ side.
        status(unsafe { sdb_cuda_empty_cache() })
    }

    /// An owned `AOTIModelPackageLoader*`.
    pub struct Handle(NonNull<c_void>);

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: the pointer came from sdb_aoti_load and is freed exactly once, here.
            unsafe { sdb_aoti_free(self.0.as_ptr()) }
        }
    }

    pub fn aoti_load(path: &str, device_index: i32) -> Result<Handle> {
        let c_path =
            CString::new(path).map_err(|_| BridgeError::Torch("NUL byte in the path".into()))?;
        // SAFETY: a valid NUL-terminated path; NULL means failure, with the message set.
        let raw = unsafe { sdb_aoti_load(c_path.as_ptr(), device_index) };
        NonNull::new(raw).map(Handle).ok_or_else(last_error)
    }

    /// At most this many outputs are expected of a compiled model (the UNet and the VAE decoder
    /// return one tensor).
    const MAX_OUTPUTS: usize = 8;

    pub fn aoti_run(handle: &Handle, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let ptrs: Vec<TensorPtr> = inputs
            .iter()
            .map(|t| t.as_ptr().cast_mut().cast())
            .collect();
        let mut outputs: [TensorPtr; MAX_OUTPUTS] = [std::ptr::null_mut(); MAX_OUTPUTS];
        let num_inputs = c_int::try_from(ptrs.len())
            .map_err(|_| BridgeError::Torch("too many inputs".into()))?;
        // SAFETY: the handle is live (owned by `handle`); `ptrs` are borrowed handles of live
        // tensors, read only during the call; `outputs` has room for MAX_OUTPUTS pointers.
        let n = unsafe {
            sdb_aoti_run(
                handle.0.as_ptr(),
                ptrs.as_ptr(),
                num_inputs,
                outputs.as_mut_ptr(),
                MAX_OUTPUTS as c_int,
            )
        };
        let n = usize::try_from(n).map_err(|_| last_error())?;
        Ok(outputs[..n]
            .iter()
            // SAFETY: each of the first `n` pointers is a new heap `at::Tensor` the bridge handed
            // over; `Tensor` takes ownership and frees it when dropped.
            .map(|&p| unsafe { Tensor::from_ptr(p.cast()) })
            .collect())
    }
}

/// The bridge was not compiled: every call says so.
#[cfg(not(sdbatch_bridge))]
mod ffi {
    use super::{AllocatorStats, BridgeError, Result, Status};
    use tch::Tensor;

    pub struct Handle;

    pub fn torch_version() -> Option<String> {
        None
    }

    pub fn cuda_usable() -> Status<i32> {
        Status::Failed(BridgeError::Absent)
    }
    pub fn memory_stats(_: i32) -> Status<AllocatorStats> {
        Status::Failed(BridgeError::Absent)
    }
    pub fn reset_peak(_: i32) -> Status<()> {
        Status::Failed(BridgeError::Absent)
    }
    pub fn empty_cache() -> Status<()> {
        Status::Failed(BridgeError::Absent)
    }
    pub fn aoti_load(_: &str, _: i32) -> Result<Handle> {
        Err(BridgeError::Absent)
    }
    pub fn aoti_run(_: &Handle, _: &[&Tensor]) -> Result<Vec<Tensor>> {
        Err(BridgeError::Absent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bridge_is_built_here() {
        // CI builds against the venv's torch, whose headers are there.
        assert!(compiled_in());
    }

    #[test]
    fn knows_the_torch_it_was_built_against() {
        let v = torch_version().expect("bridge built");
        assert_eq!(v.split('.').count(), 3, "{v}");
    }

    #[test]
    fn cpu_only_calls_answer_no_cuda_cleanly() {
        // This machine has no GPU: every allocator call must say so, not crash or throw.
        if tch::Cuda::is_available() {
            return;
        }
        assert!(!cuda_usable().unwrap());
        assert!(matches!(memory_stats(0), Err(BridgeError::NoCuda)));
        assert!(matches!(reset_peak(0), Err(BridgeError::NoCuda)));
        assert!(matches!(empty_cache(), Err(BridgeError::NoCuda)));
    }

    #[test]
    fn a_missing_package_is_a_clear_error() {
        let err = AotiPackage::load(Path::new("/nonexistent/unet.pt2"), Device::Cpu)
            .err()
            .expect("no package there");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/unet.pt2"), "{text}");
    }
}
