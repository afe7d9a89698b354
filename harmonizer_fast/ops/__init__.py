"""Fused Triton kernels for the harmonization loss path, and the backend resolver.

One module per fused op, each holding its Triton kernels and the
:class:`torch.autograd.Function` that launches them:

- :mod:`harmonizer_fast.ops.saliency_cut`: input gradient (N, C, H, W) -> standardized,
  rectified saliency (N, H, W) and its per-map maximum;
- :mod:`harmonizer_fast.ops.pyramid`: the 5x5 binomial stride-2 TF-'SAME' pyramid and
  its adjoint;
- :mod:`harmonizer_fast.ops.alignment_loss`: the token-weighted pyramidal MSE between the
  saliency and the rescaled, standardized human map, reduced to the scalar;
- :mod:`harmonizer_fast.ops.harmonization_term_cpu`: the saliency cut and the alignment loss
  together on the CPU, in C++ (``csrc/harmonization_term.cpp``), with their gradient.

The pure-torch functions of :mod:`harmonizer_fast.training.loss` and
:mod:`harmonizer_fast.training.pyramid` are the specification; the fused ops are tested
against them. Each public function there validates its inputs once, then
:func:`route` calls either its pure-torch reference or the op's ``fused_*`` function (a
direct reference, never a name looked up at run time), as ``backend`` says:

- ``"auto"``: Triton for CUDA tensors (float16/bfloat16/float32), pure torch otherwise,
  but for the harmonization term on CPU float32/float64 tensors, which runs the C++ op of
  :mod:`harmonizer_fast.ops.harmonization_term_cpu` (no Triton needed; routed by
  ``training.harmonization.route_harmonization_term``).
  A missing or failing Triton falls back to torch with one warning.
- ``"triton"``: always the fused kernels; on CPU this needs ``TRITON_INTERPRET=1`` (the
  Triton interpreter, slow, meant for tests). Raises :class:`RuntimeError` if Triton
  cannot run and :class:`TypeError` for float64 (the kernels compute in float32).
- ``"torch"``: always the pure-torch reference.

Constants and validators come from the floor, :mod:`harmonizer_fast.spec`; nothing here
imports :mod:`harmonizer_fast.training`. The fused ops are differentiable once; asking for a second derivative through them
raises :class:`RuntimeError` instead of returning a wrong gradient.
"""
from __future__ import annotations

from harmonizer_fast.ops import _dispatch
from harmonizer_fast.ops._dispatch import (
    BACKENDS,
    FUSED_DTYPES,
    FusedUnsupported,
    guard_second_order,
    interpreter_enabled,
    resolve_backend,
    route,
    triton_error,
)

# Triton is a pinned dependency but can be missing or broken on a platform: then the op
# modules do not import, every "auto" call runs the reference and "triton" says why.
try:
    from harmonizer_fast.ops import alignment_loss, pyramid, saliency_cut
except ImportError as exc:  # pragma: no cover - depends on the installation
    alignment_loss = pyramid = saliency_cut = None
    _dispatch._op_import_error = f"{type(exc).__name__}: {exc}"

__all__ = [
    "BACKENDS", "FUSED_DTYPES", "FusedUnsupported", "alignment_loss", "guard_second_order", "interpreter_enabled",
    "pyramid", "resolve_backend", "route", "saliency_cut", "triton_error",
]
