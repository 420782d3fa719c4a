#!/usr/bin/env bash
# Turns a pip-installed torch wheel (and the NVIDIA wheels it pulls in) into a libtorch folder,
# the one the image's build links against and the image ships:
#
#   scripts/image-libtorch.sh SITE_PACKAGES DEST    # the Dockerfile's build stage runs it
#
#   DEST/include        torch's C++ headers (build only)
#   DEST/lib            every shared library sdbatch may load, flat: torch/lib and nvidia/*/lib
#   DEST/build-version  the torch version, which torch-sys checks (LIBTORCH=DEST)
#
# Files are moved, not copied (the wheel's folder is thrown away afterwards): the build stage never
# holds two copies of ~3.5 GB.
#
# What is left out of lib/, and why. The rule: drop only what no configuration of sdbatch loads,
# on any host. A CPU run cannot tell: libtorch_cuda's DT_NEEDED entries load most CUDA libraries
# everywhere, but on a GPU host more are dlopen'ed later (cuDNN's engine libraries, NVRTC and its
# builtins, libtorch_cuda_linalg for cuSOLVER, NVSHMEM's plugins, CUPTI's helpers), sometimes
# under names assembled at run time ("libnvrtc" + ".so." + major), which no scan of the binaries
# finds reliably. So a library is kept unless it is named below with the reason no sdbatch
# process loads it; a library a future wheel adds is kept.
#   * Python's: libtorch_python.so (the bindings, loaded by `import torch`), libtorch_global_deps.so
#     (preloaded by torch/__init__.py), libshm.so (torch.multiprocessing's shared memory).
#   * libcusolverMg (multi-GPU cuSOLVER): libtorch_cuda_linalg needs libcusolver, never this one.
#   * libnvrtc.alt / libnvrtc-builtins.alt (NVRTC's alternative build): libtorch opens
#     libnvrtc.so.<major>, which opens libnvrtc-builtins.so.<major>.<minor>.
#   * libcufftw (the FFTW-compatible API over cuFFT) and libnvblas (a BLAS to LD_PRELOAD into
#     CPU programs): front ends for other programs; libtorch calls cuFFT and cuBLAS directly.
#   * Anything that is not a shared object: static archives (*.a), NVSHMEM's device bitcode (*.bc,
#     for compiling kernels), headers in lib folders.
# A guard: the build fails if a kept library names a dropped one (its file name, or its name up to
# ".so", in the library's bytes), e.g. a libtorch that starts linking multi-GPU cuSOLVER.
# scripts/image-test.sh checks the result in the built image: every DT_NEEDED of sdbatch and of the
# kept libraries resolves there, except libcuda.so.1 (the driver, which the NVIDIA Container Toolkit
# mounts on a GPU host) and the RDMA/MPI/UCX libraries of NVSHMEM's and cuFile's optional
# multi-node plugins, which come from the host when they are used at all.
set -euo pipefail
sp=${1:?usage: image-libtorch.sh SITE_PACKAGES DEST}
dest=${2:?usage: image-libtorch.sh SITE_PACKAGES DEST}

dropped_by_rule() {
  case "$1" in
    libtorch_python.so | libtorch_global_deps.so | libshm.so) return 0 ;;
    libcusolverMg.so* | libnvrtc.alt.so* | libnvrtc-builtins.alt.so* | libcufftw.so* | libnvblas.so*) return 0 ;;
  esac
  return 1
}

# Every name of the form "xxx.so[.N...]" in a file, once each. tr first cuts the binary into short
# runs of file-name characters, one a line: grep -o on a binary's few, huge "lines" takes minutes.
names_in() {
  LC_ALL=C tr -c 'A-Za-z0-9_.+-' '\n' <"$1" | LC_ALL=C grep -oE '[A-Za-z0-9_+-][A-Za-z0-9_.+-]*\.so(\.[0-9]+)*' | LC_ALL=C sort -u
}

mkdir -p "$dest/lib"
kept=() dropped=()
kept_bytes=0 dropped_bytes=0
for f in "$sp"/torch/lib/* "$sp"/nvidia/*/lib/*; do
  [ -f "$f" ] || continue
  name=${f##*/}
  case "$name" in *.so | *.so.*) ;; *) continue ;; esac
  size=$(stat -c %s "$f")
  if dropped_by_rule "$name"; then
    dropped+=("$name")
    dropped_bytes=$((dropped_bytes + size))
    echo "image-libtorch: dropped $name ($((size / 1048576)) MiB)"
    continue
  fi
  # The copy is flat (one LD_LIBRARY_PATH entry), so two libraries with one name are an error.
  if [ -e "$dest/lib/$name" ]; then
    echo "image-libtorch: two libraries named $name (one is $f)" >&2
    exit 1
  fi
  mv "$f" "$dest/lib/$name"
  kept+=("$name")
  kept_bytes=$((kept_bytes + size))
done
[ -f "$dest/lib/libtorch_cpu.so" ] || { echo "image-libtorch: no libtorch_cpu.so under $sp/torch/lib" >&2; exit 1; }

# The guard: no kept library may name a dropped one.
declare -A is_dropped=()
for name in "${dropped[@]}"; do
  is_dropped[$name]=1
  is_dropped[${name%%.so*}.so]=1
done
for name in "${kept[@]}"; do
  while read -r ref; do
    if [ -n "${is_dropped[$ref]:-}" ]; then
      echo "image-libtorch: $name refers to $ref, which this script drops: keep it (see the rule above)" >&2
      exit 1
    fi
  done < <(names_in "$dest/lib/$name")
done

mv "$sp/torch/include" "$dest/include"
# torch/version.py alone: importing the torch package would load the libraries just moved.
python3 -c 'import sys; v = {}; exec(open(sys.argv[1]).read(), v); print(v["__version__"].split("+")[0])' \
  "$sp/torch/version.py" >"$dest/build-version"
echo "image-libtorch: kept ${#kept[@]} libraries ($((kept_bytes / 1048576)) MiB), dropped ${#dropped[@]} ($((dropped_bytes / 1048576)) MiB); torch $(cat "$dest/build-version")"
