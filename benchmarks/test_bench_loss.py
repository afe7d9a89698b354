"""pytest-benchmark timings of the harmonization term (see compare_loss.py for what is timed)."""
import pytest

from benchmarks.compare_loss import check_equal, forward_backward, make_inputs, naive_alignment, package_alignment

BATCH = 8


@pytest.fixture(scope="module")
def inputs():
    inputs = make_inputs(BATCH)
    check_equal(inputs)
    return inputs


@pytest.mark.parametrize("loss_fn", [naive_alignment, package_alignment], ids=["naive", "package_torch"])
def test_alignment_forward_backward(benchmark, inputs, loss_fn):
    loss, grad = benchmark(forward_backward, loss_fn, inputs)
    assert loss.isfinite() and grad.isfinite().all()
