"""all_finite: one summing pass proves finiteness; an overflowing sum of finite values is not a divergence."""
import torch

from harmonizer_fast.training.divergence import all_finite


def test_all_finite_detects_inf_and_nan_and_tolerates_overflowing_sums():
    big = torch.full((4,), 3e38)  # finite float32 values whose sum overflows to inf
    assert all_finite([torch.ones(3), big, None, torch.arange(3)])
    assert all_finite([torch.full((3,), 6e4, dtype=torch.float16)])  # its float16 sum would overflow
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(5, dtype=torch.float64)
        t[2] = bad
        assert not all_finite([torch.ones(2), t])
        assert not all_finite([big, t.float()])
    mixed = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite([mixed])
    assert all_finite([])
