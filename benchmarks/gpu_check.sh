#!/usr/bin/env bash
# GPU check of the fused Triton loss kernels (harmonizer_fast/ops), in one prepared run.
#
# On a CUDA machine, from the repository root:
#     bash benchmarks/gpu_check.sh            # tests + all timings (~6-8 min on one H100/H200)
#     QUICK=1 bash benchmarks/gpu_check.sh    # smaller benchmark sizes
#     STEPS="tests ops" bash benchmarks/gpu_check.sh
# With a 10-minute limit per command, run it in two calls: STEPS="tests ops" (Triton JIT of
# ~20 kernel variants, then inductor compiles for batch 32 and 128), then STEPS=train.
#
# 1. environment: $PYTHON, else the repo's .venv (or .venv-gpu) if its torch sees CUDA, else
#    python3; it must have torch and triton (INSTALL=1 creates .venv-gpu and pip-installs them
#    there, from $WHEELHOUSE when offline; the system python is never modified). The package
#    is used from this checkout via PYTHONPATH (the fused ops are pure Python + Triton; the
#    C++ extension is not needed);
# 2. tests: tests/ops with TRITON_INTERPRET=0, i.e. the compiled kernels on the GPU against
#    the pure-torch reference on the GPU (TF32 off) and the TensorFlow fixtures;
# 3. ops: benchmarks/compare_ops.py, eager vs torch.compile vs Triton at batch 32 and 128,
#    224x224: median, ratios, peak memory, bandwidth floor and fraction of copy bandwidth;
# 4. train: benchmarks/compare_train_step.py, resnet50 and ViT-B/16 steps, torch vs fused loss;
# 5. overhead: benchmarks/compare_train_overhead.py on CUDA with bf16 autocast, batch 32:
#    harmonized Trainer step (fast double backward) and the straightforward port over a plain
#    step, resnet50 and ViT-B/16, peak CUDA memory; plus tests/training/test_double_backward.py
#    on the GPU (fast double backward == native autograd, cuDNN kernels).
# Results (markdown tables, logs) go to $OUT (default benchmarks/gpu_results/).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/gpu_results}"
STEPS="${STEPS:-tests ops train overhead}"
mkdir -p "$OUT"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    for candidate in "$REPO/.venv/bin/python" "$REPO/.venv-gpu/bin/python"; do
        if [[ -x "$candidate" ]] && "$candidate" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
            PYTHON="$candidate"
        fi
    done
fi
if ! "$PYTHON" -c "import torch, triton" 2>/dev/null; then
    if [[ "${INSTALL:-0}" != "1" ]]; then
        echo "error: $PYTHON has no torch/triton. Set PYTHON to one that has them, or INSTALL=1 to create"
        echo "       $REPO/.venv-gpu and install torch/triton/timm there (WHEELHOUSE=dir for offline wheels)."
        exit 2
    fi
    echo "== creating $REPO/.venv-gpu with torch/triton/timm (never touches the system python)"
    PIP_ARGS=()
    [[ -n "${WHEELHOUSE:-}" ]] && PIP_ARGS=(--no-index --find-links "$WHEELHOUSE")
    python3 -m venv "$REPO/.venv-gpu" && PYTHON="$REPO/.venv-gpu/bin/python" \
        && "$PYTHON" -m pip install -q "${PIP_ARGS[@]}" torch==2.14.1 triton==3.8.0 timm==1.0.31 numpy scipy pytest \
        || { echo "error: could not install torch/triton into $REPO/.venv-gpu"; exit 2; }
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} | tee "$OUT/environment.txt"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: torch sees no CUDA device"; exit 2; }

status=0
QUICK_FLAG=()
[[ "${QUICK:-0}" == "1" ]] && QUICK_FLAG=(--quick)

if [[ " $STEPS " == *" tests "* ]]; then
    echo "== tests/ops on the GPU (compiled kernels, no interpreter)"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/ops 2>&1 | tee "$OUT/tests_ops.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
if [[ " $STEPS " == *" ops "* ]]; then
    echo "== benchmarks: ops"
    "$PYTHON" -m benchmarks.run_all "${QUICK_FLAG[@]}" --only ops 2>&1 | tee "$OUT/bench_ops.md"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
if [[ " $STEPS " == *" train "* ]]; then
    echo "== benchmarks: train_step"
    "$PYTHON" -m benchmarks.run_all "${QUICK_FLAG[@]}" --only train_step 2>&1 | tee "$OUT/bench_train_step.md"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
if [[ " $STEPS " == *" overhead "* ]]; then
    echo "== tests/training/test_double_backward.py on the GPU, then benchmarks: train_overhead"
    HF_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/training/test_double_backward.py tests/training/test_double_backward_attention.py 2>&1 \
        | tee "$OUT/tests_double_backward.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
    "$PYTHON" -m benchmarks.compare_train_overhead --device cuda --amp --batch 32 --repeats 5 \
        --models resnet50 vit_base_patch16_224 2>&1 | tee "$OUT/bench_train_overhead.md"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
echo "== done (status $status); results in $OUT"
exit $status
