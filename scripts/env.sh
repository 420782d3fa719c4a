# Source me: exports what building and running sdbatch against the venv's libtorch needs.
# Keep these stable between build and test: torch-sys rebuilds its C++ part when they change.
_sdbatch_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VIRTUAL_ENV="$_sdbatch_root/.venv"
# Resolve the link so the path torch-sys sees is the cached venv's, identical in every clone.
if [ -e "$VIRTUAL_ENV" ]; then VIRTUAL_ENV=$(readlink -f "$VIRTUAL_ENV"); fi
case ":$PATH:" in *":$VIRTUAL_ENV/bin:"*) ;; *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;; esac
export LIBTORCH_USE_PYTORCH=1
_torch_lib=$(ls -d "$VIRTUAL_ENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)
if [ -n "$_torch_lib" ]; then
  case ":${LD_LIBRARY_PATH:-}:" in *":$_torch_lib:"*) ;; *) export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
fi
# Builds outside the clone so a fresh clone (CI) reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sdbatch/target}"
unset _sdbatch_root _torch_lib
