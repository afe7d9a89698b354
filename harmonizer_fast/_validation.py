"""Input checks shared by the public API: they live in :mod:`harmonizer_fast.spec` (the floor)."""
from harmonizer_fast.spec import (  # noqa: F401  (re-exported names)
    ArrayLike,
    check_finite,
    check_loss_weight,
    check_nonnegative,
    check_positive_int,
    check_rank,
    check_same_shape,
    check_tensor,
    check_tokens,
    compute_dtype,
    shape_of,
)
