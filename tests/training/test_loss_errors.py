"""Bad input to the harmonizer loss raises a named TypeError/ValueError, never a NaN or a deep error."""
import pytest
import torch
import torch.nn as nn

from harmonizer_fast.training import alignment_loss, harmonizer_loss, harmonizer_loss_components, pyramidal_mse_with_tokens


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 5))


def _batch(n=2):
    return torch.rand(n, 3, 8, 8), torch.ones(n), torch.eye(5)[:n], torch.rand(n, 8, 8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    empty = torch.zeros(0, 8, 8)
    with pytest.raises(ValueError, match="empty batch"):
        pyramidal_mse_with_tokens(empty, empty, torch.zeros(0), backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        alignment_loss(empty, empty, torch.zeros(0), backend=backend)
    images, tokens, labels, maps = _batch(0)
    with pytest.raises(ValueError, match="empty batch"):
        harmonizer_loss_components(_net(), images, tokens, torch.zeros(0, 5), maps, backend=backend)


def test_output_not_depending_on_input():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(5))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 5)

    with pytest.raises(ValueError, match="does not depend on `images`"):
        harmonizer_loss_components(Constant(), *_batch())

    class Detached(Constant):
        def forward(self, x):
            return (x.detach().mean() + self.bias).expand(x.shape[0], 5)

    with pytest.raises(ValueError, match="does not depend on `images`"):
        harmonizer_loss(Detached(), *_batch())


def test_model_returning_a_tuple_or_not_a_module():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(TypeError, match="logits tensor, got tuple"):
        harmonizer_loss_components(Pair(), *_batch())
    net = _net()
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        harmonizer_loss_components(lambda x: net(x), *_batch())


def test_no_trainable_parameters():
    net = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        harmonizer_loss(net, *_batch())


def test_negative_tokens_and_labels():
    images, tokens, labels, maps = _batch()
    with pytest.raises(ValueError, match="`tokens`.*negative"):
        harmonizer_loss_components(_net(), images, torch.tensor([1.0, -1.0]), labels, maps)
    bad_labels = labels.clone()
    bad_labels[0, 1] = -0.5
    with pytest.raises(ValueError, match="`labels`.*negative"):
        harmonizer_loss_components(_net(), images, tokens, bad_labels, maps)
    with pytest.raises(ValueError, match="`tokens`.*negative"):
        pyramidal_mse_with_tokens(maps, maps, torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("name", ["lambda_weights", "lambda_harmonization"])
@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                          ("1e-5", TypeError), (True, TypeError)])
def test_bad_lambdas(name, value, error):
    with pytest.raises(error, match=name):
        harmonizer_loss_components(_net(), *_batch(), **{name: value})


def test_float64_images_with_a_float32_model():
    images, tokens, labels, maps = _batch()
    with pytest.raises(TypeError, match="float64.*float32"):
        harmonizer_loss_components(_net(), images.double(), tokens, labels, maps)
    # converted as the message says, it runs
    out = harmonizer_loss_components(_net().double(), images.double(), tokens, labels, maps.double())
    assert torch.isfinite(out.loss)
