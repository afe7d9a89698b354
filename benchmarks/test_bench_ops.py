"""pytest-benchmark timings of the fused loss path (see compare_ops.py for what is timed).

``pytest benchmarks/test_bench_ops.py``: eager and torch.compile everywhere; the Triton
variant only on CUDA (on CPU Triton would run in its interpreter).
"""
import pytest
import torch

from benchmarks.compare_loss import forward_backward, make_inputs
from benchmarks.compare_ops import check_equal, compiled_alignment, cpu_alignment, eager_alignment, triton_alignment
from harmonizer_fast._ext import HAS_EXTENSION

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = (32, 128) if DEVICE == "cuda" else (32,)


@pytest.fixture(scope="module", params=BATCHES, ids=lambda b: f"batch{b}")
def case(request):
    inputs = make_inputs(request.param, DEVICE)
    return inputs, forward_backward(eager_alignment, inputs)


@pytest.fixture(scope="module")
def compiled():
    return compiled_alignment()


def test_eager(benchmark, case):
    inputs, _ = case
    loss, grad = benchmark(forward_backward, eager_alignment, inputs)
    assert loss.isfinite() and grad.isfinite().all()


def test_torch_compile(benchmark, case, compiled):
    inputs, reference = case
    check_equal(compiled, reference, inputs)
    benchmark(forward_backward, compiled, inputs)


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton kernels are timed on CUDA only (the CPU interpreter is not a speed)")
def test_triton(benchmark, case):
    inputs, reference = case
    check_equal(triton_alignment, reference, inputs)
    benchmark(forward_backward, triton_alignment, inputs)


@pytest.mark.skipif(DEVICE != "cpu" or not HAS_EXTENSION, reason="the C++ op serves CPU tensors (extension built)")
def test_cpp_cpu(benchmark, case):
    inputs, reference = case
    check_equal(cpu_alignment, reference, inputs)
    benchmark(forward_backward, cpu_alignment, inputs)
