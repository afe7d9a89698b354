"""The TensorFlow fixture's small Keras network rebuilt in PyTorch, shared by the training-loss tests.

``reference`` (a module-scoped pytest fixture; a test module imports it by name) holds the outputs
of the real TensorFlow code (``tests/fixtures/reference/harmonizer_loss.npz``) that these helpers read.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harmonizer_fast.training.pyramid import same_padding

#: Keras' trainable_variables order, matched by the PyTorch parameter order below.
KERAS_NAMES = ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "conv2/kernel", "conv2/bias",
               "dense/kernel", "dense/bias"]
TORCH_NAMES = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "conv2.weight", "conv2.bias",
               "dense.weight", "dense.bias"]


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    """The TensorFlow outputs of the harmonizer loss on the fixture's Keras network."""
    return dict(np.load(fixtures_dir / "harmonizer_loss.npz"))


class KerasReferenceNet(nn.Module):
    """The fixture's tf-keras network: conv -> BN -> ReLU -> conv stride 2 ('SAME') -> ReLU -> GAP -> dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        # Keras' BN epsilon is 1e-3; its momentum 0.99 on the old value is PyTorch's 0.01 on the new one.
        self.bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.01)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.dense = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        # TF 'SAME' for a 3x3 stride-2 kernel: (0, 1) on a side of 32, not PyTorch's (1, 1).
        (top, bottom), (left, right) = same_padding(x.shape[2], 3, 2), same_padding(x.shape[3], 3, 2)
        x = F.relu(self.conv2(F.pad(x, (left, right, top, bottom))))
        return self.dense(x.mean(dim=(2, 3)))


def keras_to_torch(name: str, value: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(value)
    if name.endswith("kernel") and tensor.ndim == 4:
        return tensor.permute(3, 2, 0, 1)  # HWIO -> OIHW
    if name.endswith("kernel"):
        return tensor.T  # dense (in, out) -> (out, in)
    return tensor


def build_net(reference) -> KerasReferenceNet:
    net = KerasReferenceNet()
    state = {torch_name: keras_to_torch(keras_name, reference[f"var/{keras_name}:0"])
             for keras_name, torch_name in zip(KERAS_NAMES, TORCH_NAMES)}
    state["bn.running_mean"] = torch.from_numpy(reference["var/bn/moving_mean:0"])
    state["bn.running_var"] = torch.from_numpy(reference["var/bn/moving_variance:0"])
    state["bn.num_batches_tracked"] = torch.tensor(0)
    net.load_state_dict(state)
    return net


def loss_inputs(reference):
    """images (NCHW), tokens, labels, true_heatmaps."""
    return (torch.from_numpy(reference["images"]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(reference["tokens"]), torch.from_numpy(reference["labels"]),
            torch.from_numpy(reference["true_heatmaps"]))
