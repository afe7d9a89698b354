"""harmonizer_loss with backend="triton" against the TensorFlow fixture and the torch backend.

The fixture's small Keras network is rebuilt by the torch-path tests
(tests/training/test_harmonizer_loss.py); it is imported from there, not copied.
"""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _ops_helpers import DEVICE, assert_matches
from harmonizer_fast.training import HarmonizerLoss, harmonizer_loss, harmonizer_loss_components

TRAINING_TESTS = Path(__file__).resolve().parents[1] / "training"


@pytest.fixture(scope="module")
def keras_net():
    """The torch-path test module (network builder, inputs, TF gradient comparison)."""
    sys.path.insert(0, str(TRAINING_TESTS))
    try:
        return importlib.import_module("test_harmonizer_loss")
    finally:
        sys.path.remove(str(TRAINING_TESTS))


@pytest.fixture(scope="module")
def reference(keras_net, fixtures_dir):
    return dict(np.load(fixtures_dir / "harmonizer_loss.npz"))


def _net(keras_net, reference):
    return keras_net.build_net(reference).to(DEVICE)


def _inputs(keras_net, reference):
    return [t.to(DEVICE) for t in keras_net.loss_inputs(reference)]


def test_triton_gradients_match_tensorflow(keras_net, reference):
    grads = harmonizer_loss(_net(keras_net, reference), *_inputs(keras_net, reference), backend="triton")
    assert len(grads) == len(keras_net.KERAS_NAMES)
    for grad, keras_name in zip(grads, keras_net.KERAS_NAMES):
        keras_net.assert_gradient_matches(grad.cpu(), keras_name, reference, what=f"triton {keras_name}")


def test_triton_components_match_torch_backend_and_tensorflow(keras_net, reference):
    inputs = _inputs(keras_net, reference)
    fused = harmonizer_loss_components(_net(keras_net, reference), *inputs, backend="triton")
    eager = harmonizer_loss_components(_net(keras_net, reference), *inputs, backend="torch")
    for name in ("loss", "cross_entropy", "weight_decay", "harmonization"):
        assert_matches(getattr(fused, name), getattr(eager, name), what=name)
    assert_matches(fused.harmonization.cpu(), torch.tensor(float(reference["harmonization_loss"])), what="TF harmonization")
    assert_matches(fused.loss.cpu(), torch.tensor(float(reference["loss"])), what="TF loss")


def test_module_backward_with_triton_equals_torch(keras_net, reference):
    inputs = _inputs(keras_net, reference)
    grads = {}
    for backend in ("triton", "torch"):
        net = _net(keras_net, reference)
        HarmonizerLoss(backend=backend)(net, *inputs).loss.backward()
        grads[backend] = [p.grad for p in net.parameters()]
    for name, a, b in zip(keras_net.TORCH_NAMES, grads["triton"], grads["torch"]):
        if name == "conv.bias":  # exactly 1e-5 * bias plus cancellation noise (see the torch-path tests)
            torch.testing.assert_close(a, b, rtol=0, atol=keras_net.CONV_BIAS_ATOL)
        else:
            assert_matches(a, b, what=name)
