// The few libtorch calls sdbatch needs that tch does not bind: the CUDA caching allocator's
// statistics and cache, and AOTInductor model packages. A plain C ABI, used only by
// src/bridge.rs; every call catches C++ exceptions and reports them through a thread-local message
// (an exception must never unwind into Rust).
//
// Nothing here links to libtorch_cuda or libc10_cuda: CUDA is reached through c10's device-generic
// allocator interface, which libtorch_cuda registers when it is loaded. Without it (a CPU-only
// libtorch, or no GPU) the calls answer "no CUDA" instead of failing to link or load.
#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

// Runs `body`, turning any exception into status -1 and the thread's last error.
template <typename F>
int guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

// CUDA is usable: libtorch_cuda registered its hooks and a device exists. Asked before anything
// touches the CUDA allocator, which does not exist otherwise.
bool cuda_usable() {
  return at::hasCUDA() && at::getNumGPUs() > 0;
}

c10::DeviceAllocator* cuda_allocator() {
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

// Allocator statistics of one device, in bytes.
struct SdbMemoryStats {
  int64_t allocated_current;
  int64_t allocated_peak;
  int64_t reserved_current;
  int64_t reserved_peak;
  // The device's free and total memory as the CUDA driver reports them.
  int64_t device_free;
  int64_t device_total;
};

// The message of the last failed call on this thread (valid until the next call on it).
const char* sdb_last_error() { return last_error.c_str(); }

// The libtorch version this bridge was compiled against ("2.11.0").
const char* sdb_torch_version() { return TORCH_VERSION; }

// 1 if CUDA is usable, 0 if not, -1 on error.
int sdb_cuda_usable() {
  return guarded([] { return cuda_usable() ? 1 : 0; });
}

// 0: `out` filled; 1: no CUDA (nothing written); -1: error.
int sdb_cuda_memory_stats(int device, SdbMemoryStats* out) {
  return guarded([&] {
    if (!cuda_usable()) return 1;
    auto* alloc = cuda_allocator();
    auto index = static_cast<c10::DeviceIndex>(device);
    // Aggregate (index 0) of the small and large pools.
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    auto stats = alloc->getDeviceStats(index);
    auto mem = alloc->getMemoryInfo(index);
    out->allocated_current = stats.allocated_bytes[agg].current;
    out->allocated_peak = stats.allocated_bytes[agg].peak;
    out->reserved_current = stats.reserved_bytes[agg].current;
    out->reserved_peak = stats.reserved_bytes[agg].peak;
    out->device_free = static_cast<int64_t>(mem.first);
    out->device_total = static_cast<int64_t>(mem.second);
    return 0;
  });
}

// Starts a new peak-measuring window. 0: done; 1: no CUDA; -1: error.
int sdb_cuda_reset_peak(int device) {
  return guarded([&] {
    if (!cuda_usable()) return 1;
    cuda_allocator()->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  });
}

// Returns the allocator's unused cached blocks to the driver. 0: done; 1: no CUDA; -1: error.
int sdb_cuda_empty_cache() {
  return guarded([] {
    if (!cuda_usable()) return 1;
    cuda_allocator()->emptyCache();
    return 0;
  });
}

// Loads an AOTInductor package (a .pt2 file from aoti_compile_and_package). `device_index` is
// the CUDA device for a CUDA package, -1 otherwise. NULL on error.
void* sdb_aoti_load(const char* path, int device_index) {
  torch::inductor::AOTIModelPackageLoader* loader = nullptr;
  int status = guarded([&] {
    loader = new torch::inductor::AOTIModelPackageLoader(
        path, "model", /*run_single_threaded=*/false, /*num_runners=*/1,
        static_cast<c10::DeviceIndex>(device_index));
    return 0;
  });
  return status == 0 ? loader : nullptr;
}

void sdb_aoti_free(void* handle) {
  delete static_cast<torch::inductor::AOTIModelPackageLoader*>(handle);
}

// Runs the package on `inputs` (tch's tensor handles, borrowed). On success writes up to
// `max_outputs` new tensor handles (owned by the caller) to `outputs` and returns their count;
// more outputs than that is an error. -1 on error.
int sdb_aoti_run(void* handle, at::Tensor* const* inputs, int num_inputs, at::Tensor** outputs,
                 int max_outputs) {
  return guarded([&] {
    auto* loader = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle);
    std::vector<at::Tensor> args;
    args.reserve(static_cast<size_t>(num_inputs));
    for (int i = 0; i < num_inputs; ++i) args.push_back(*inputs[i]);
    std::vector<at::Tensor> results = loader->run(args);
    if (results.size() > static_cast<size_t>(max_outputs)) {
      last_error = "the compiled model returned " + std::to_string(results.size()) +
                   " outputs, expected at most " + std::to_string(max_outputs);
      return -1;
    }
    for (size_t i = 0; i < results.size(); ++i) outputs[i] = new at::Tensor(std::move(results[i]));
    return static_cast<int>(results.size());
  });
}

}  // extern "C"
