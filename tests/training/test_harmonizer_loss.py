"""harmonizer_loss and its pieces against the TensorFlow fixture (a small Keras network rebuilt here)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _loss_testing import assert_matches
from harmonizer_fast.training import (
    HarmonizerLoss,
    alignment_loss,
    decayed_parameters,
    harmonizer_loss,
    harmonizer_loss_components,
    input_saliency,
    is_weight_decayed,
    pyramidal_mse_with_tokens,
    saliency_standardize_cut,
    smoothed_cross_entropy,
    standardize_cut,
    weight_decay_loss,
)
from harmonizer_fast.training.pyramid import same_padding

#: Keras' trainable_variables order, matched by the PyTorch parameter order below.
KERAS_NAMES = ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "conv2/kernel", "conv2/bias",
               "dense/kernel", "dense/bias"]
TORCH_NAMES = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "conv2.weight", "conv2.bias",
               "dense.weight", "dense.bias"]


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


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return dict(np.load(fixtures_dir / "harmonizer_loss.npz"))


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


def test_parameter_order_matches_keras(reference):
    assert [name for name, _ in build_net(reference).named_parameters()] == TORCH_NAMES


#: A training-mode BN removes any per-channel constant, so the CE and harmonization
#: gradients of the conv bias are exactly 0 in exact arithmetic; what is left is
#: 1e-5 * bias (~2e-6) plus the rounding of a cancelling sum over 4096 positions (~1e-7
#: in TF and here alike). A relative tolerance is meaningless for that noise.
CONV_BIAS_ATOL = 5e-7


def assert_gradient_matches(grad, keras_name, reference, what=""):
    """A gradient against TF's: 1e-5 relative, plus 1e-5 of the tensor's peak absolutely.

    The second-order gradients are sums over thousands of positions through a batch-norm
    backward that cancels: the fixture's own float32 rounding, measured against a float64
    run of this port, is up to 4.6e-6 of each gradient's peak (2e-7 on conv/kernel,
    whose smallest entries are ~5e-5), so elements far below the peak get that absolute slack.
    """
    expected = keras_to_torch(keras_name, reference[f"grad/{keras_name}:0"])
    if keras_name == "conv/bias":
        decay_only = 1e-5 * torch.from_numpy(reference["var/conv/bias:0"])
        assert_matches(expected, decay_only, rtol=0, atol=CONV_BIAS_ATOL)
        assert_matches(grad, expected, rtol=0, atol=CONV_BIAS_ATOL, what=what)
    else:
        assert_matches(grad, expected, atol=1e-5 * float(expected.abs().max()), what=what)


def test_gradients_match_tensorflow(reference):
    net = build_net(reference)
    grads = harmonizer_loss(net, *loss_inputs(reference))
    assert len(grads) == len(KERAS_NAMES)
    for grad, keras_name in zip(grads, KERAS_NAMES):
        assert grad.dtype == torch.float32
        assert_gradient_matches(grad, keras_name, reference, what=keras_name)


def test_components_match_tensorflow(reference):
    net = build_net(reference)
    out = harmonizer_loss_components(net, *loss_inputs(reference))
    assert_matches(out.loss, reference["loss"], what="loss")
    assert_matches(out.cross_entropy, reference["cce_loss"], what="cce_loss")
    assert_matches(out.weight_decay, reference["weight_loss"], what="weight_loss")
    assert_matches(out.harmonization, reference["harmonization_loss"], what="harmonization_loss")
    # Exactly one training-mode forward: the BN statistics moved once (unbiased variance).
    assert_matches(net.bn.running_mean, reference["after_call_var/bn/moving_mean:0"])
    assert_matches(net.bn.running_var, reference["after_call_var/bn/moving_variance:0"])


def test_logits_and_saliency_match_tensorflow(reference):
    net = build_net(reference)
    images, tokens, labels, true_heatmaps = loss_inputs(reference)
    logits, gradient = input_saliency(net, images, labels)
    assert_matches(logits, reference["logits"], what="logits")
    assert_matches(gradient.mean(dim=1), reference["sa_maps"], what="sa_maps")
    saliency = saliency_standardize_cut(gradient)
    assert_matches(saliency, reference["sa_maps_preprocess"], what="sa_maps_preprocess")
    assert_matches(alignment_loss(saliency, true_heatmaps, tokens), reference["harmonization_loss"])
    assert_matches(smoothed_cross_entropy(labels, logits), reference["cce_per_sample"], what="cce_per_sample")


def test_alignment_loss_rescales_the_human_map_to_the_saliency(reference):
    saliency = torch.from_numpy(reference["sa_maps_preprocess"])
    true_heatmaps, tokens = torch.from_numpy(reference["true_heatmaps"]), torch.from_numpy(reference["tokens"])
    human = standardize_cut(true_heatmaps.double())
    peak = human.amax(dim=(1, 2), keepdim=True)
    rescaled = human / (peak + 1e-6) * (saliency.double().amax(dim=(1, 2), keepdim=True) + 1e-6)
    assert_matches(rescaled, reference["heatmaps_preprocess"], what="heatmaps_preprocess")
    assert_matches(alignment_loss(saliency, true_heatmaps, tokens),
                   pyramidal_mse_with_tokens(saliency.double(), rescaled, tokens))


def test_alignment_loss_stops_the_gradient_of_the_saliency_maximum():
    saliency = standardize_cut(torch.randn(2, 12, 11, dtype=torch.float64)).requires_grad_(True)
    true_heatmaps, tokens = torch.rand(2, 12, 11, dtype=torch.float64), torch.tensor([1.0, 0.7], dtype=torch.float64)
    alignment_loss(saliency, true_heatmaps, tokens).backward()
    # Same loss with the rescaled human map built from a detached copy: a plain MSE gradient.
    fixed = saliency.detach().clone().requires_grad_(True)
    human = standardize_cut(true_heatmaps)
    human = human / (human.amax(dim=(1, 2), keepdim=True) + 1e-6) * (fixed.detach().amax(dim=(1, 2), keepdim=True) + 1e-6)
    pyramidal_mse_with_tokens(fixed, human, tokens).backward()
    torch.testing.assert_close(saliency.grad, fixed.grad, rtol=1e-12, atol=1e-15)


def test_alignment_loss_gradcheck_in_the_human_maps():
    saliency = standardize_cut(torch.randn(2, 7, 6, dtype=torch.float64))
    true_heatmaps = torch.rand(2, 7, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, t: alignment_loss(saliency, h, t, nb_levels=3), (true_heatmaps, tokens))


def test_alignment_loss_constant_maps_are_finite():
    saliency = torch.zeros(2, 10, 10, requires_grad=True)  # standardize_cut of a constant map
    # 0.25 sums exactly, so its std is exactly 0 (as in the TF fixture's constant map).
    true_heatmaps = torch.full((2, 10, 10), 0.25, requires_grad=True)
    loss = alignment_loss(saliency, true_heatmaps, torch.ones(2))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(saliency.grad).all() and torch.isfinite(true_heatmaps.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_alignment_loss_half_precision_is_computed_in_float32(reference, dtype):
    gradient = torch.randn(4, 3, 32, 32).to(dtype)
    true_heatmaps, tokens = torch.from_numpy(reference["true_heatmaps"]).to(dtype), torch.from_numpy(reference["tokens"])
    loss = alignment_loss(saliency_standardize_cut(gradient), true_heatmaps, tokens)
    assert loss.dtype == torch.float32
    expected = alignment_loss(saliency_standardize_cut(gradient.float()), true_heatmaps.float(), tokens)
    assert_matches(loss, expected)


def test_module_and_backward_match_the_returned_gradients(reference):
    net = build_net(reference)
    criterion = HarmonizerLoss(lambda_weights=1e-5, lambda_harmonization=1.0)
    out = criterion(net, *loss_inputs(reference))
    out.loss.backward()
    assert_matches(out.loss, reference["loss"])
    for (name, param), keras_name in zip(net.named_parameters(), KERAS_NAMES):
        assert_gradient_matches(param.grad, keras_name, reference, what=name)


def test_lambdas_and_custom_cross_entropy(reference):
    images, tokens, labels, true_heatmaps = loss_inputs(reference)
    base = harmonizer_loss_components(build_net(reference), images, tokens, labels, true_heatmaps)
    out = harmonizer_loss_components(build_net(reference), images, tokens, labels, true_heatmaps,
                                     lambda_weights=0.5, lambda_harmonization=3.0)
    assert_matches(out.loss, base.cross_entropy + 0.5 * base.weight_decay + 3.0 * base.harmonization)

    def plain_cross_entropy(labels, logits):
        return F.cross_entropy(logits, labels, reduction="none")

    plain = harmonizer_loss_components(build_net(reference), images, tokens, labels, true_heatmaps,
                                       cross_entropy=plain_cross_entropy)
    logits = torch.from_numpy(reference["logits"])
    assert_matches(plain.cross_entropy, F.cross_entropy(logits, labels))
    # Keras' label smoothing: targets (1 - 0.1) * onehot + 0.1 / K.
    smoothed = -(((1 - 0.1) * labels + 0.1 / 10) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert_matches(base.cross_entropy, smoothed)


def test_zero_tokens_give_zero_harmonization_and_only_ce_and_decay_gradients(reference):
    images, _, labels, true_heatmaps = loss_inputs(reference)
    tokens = torch.zeros(4)
    out = harmonizer_loss_components(build_net(reference), images, tokens, labels, true_heatmaps)
    assert out.harmonization.item() == 0.0
    net = build_net(reference)
    grads = harmonizer_loss(net, images, tokens, labels, true_heatmaps)
    net_ce = build_net(reference)
    logits = net_ce(images)
    expected = torch.autograd.grad(smoothed_cross_entropy(labels, logits).mean() + 1e-5 * weight_decay_loss(net_ce),
                                   list(net_ce.parameters()))
    for grad, ref, name in zip(grads, expected, TORCH_NAMES):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7, msg=name)


def test_mode_is_restored_and_training_mode_is_used(reference):
    net = build_net(reference).eval()
    harmonizer_loss_components(net, *loss_inputs(reference))
    assert not net.training
    assert int(net.bn.num_batches_tracked) == 1


def test_float64_model_and_inputs(reference):
    net = build_net(reference).double()
    images, tokens, labels, true_heatmaps = (x.double() for x in loss_inputs(reference))
    out = harmonizer_loss_components(net, images, tokens, labels, true_heatmaps)
    assert_matches(out.loss, reference["loss"])
    grads = harmonizer_loss(build_net(reference).double(), images, tokens, labels, true_heatmaps)
    for grad, keras_name in zip(grads, KERAS_NAMES):
        assert grad.dtype == torch.float64
        assert_gradient_matches(grad, keras_name, reference, what=keras_name)


@pytest.mark.parametrize("size", [(7, 9), (33, 33), (1, 1)])
def test_odd_sizes_and_a_batch_of_one(size):
    torch.manual_seed(0)
    net = KerasReferenceNet()
    # Training-mode BN needs more than one value per channel: a 1x1 image needs a batch of 2.
    images = torch.randn(2 if size == (1, 1) else 1, 3, *size)
    n = images.shape[0]
    labels = F.one_hot(torch.arange(n) % 10, 10).float()
    out = harmonizer_loss_components(net, images, torch.ones(n), labels, torch.rand(n, *size))
    grads = harmonizer_loss(net, images, torch.ones(n), labels, torch.rand(n, *size))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


def test_constant_human_maps_give_finite_values_and_gradients(reference):
    images, tokens, labels, _ = loss_inputs(reference)
    net = build_net(reference)
    out = harmonizer_loss_components(net, images, tokens, labels, torch.full((4, 32, 32), 0.3))
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


def test_non_contiguous_inputs(reference):
    images, tokens, labels, true_heatmaps = loss_inputs(reference)
    expected = harmonizer_loss_components(build_net(reference), images, tokens, labels, true_heatmaps)
    images_nc = images.permute(0, 1, 3, 2).contiguous().transpose(2, 3)
    heatmaps_nc = true_heatmaps.transpose(1, 2).contiguous().transpose(1, 2)
    tokens_nc = torch.stack([tokens, tokens], dim=1)[:, 0]
    assert not (images_nc.is_contiguous() or heatmaps_nc.is_contiguous() or tokens_nc.is_contiguous())
    out = harmonizer_loss_components(build_net(reference), images_nc, tokens_nc, labels, heatmaps_nc)
    for got, want in zip(out, expected):
        assert_matches(got, want)


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_rule_on_the_reference_net(reference):
    net = build_net(reference)
    assert [name for name, _ in decayed_parameters(net)] == [
        "conv.weight", "conv.bias", "conv2.weight", "conv2.bias", "dense.weight", "dense.bias"]
    expected = sum(float((reference[f"var/{k}:0"].astype(np.float64) ** 2).sum()) / 2
                   for k in KERAS_NAMES if not k.startswith("bn/"))
    assert_matches(weight_decay_loss(net), expected)


class ScaleNorm(nn.Module):
    """A user-defined normalization layer: excluded by its class name."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def test_weight_decay_rule_uses_module_types_not_only_names():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), ScaleNorm(), nn.Flatten(),
        nn.Linear(4, 5), nn.LayerNorm(5),
    )
    model.add_module("lookup", nn.Embedding(3, 5))
    frozen = nn.Linear(5, 5)
    frozen.weight.requires_grad_(False)
    model.add_module("frozen", frozen)
    decayed = [name for name, _ in decayed_parameters(model)]
    # "1" (BatchNorm2d), "2" (GroupNorm), "3" (ScaleNorm), "6" (LayerNorm), "lookup" have no
    # norm/bn/embed in their names: only their module type excludes them.
    assert decayed == ["0.weight", "0.bias", "5.weight", "5.bias", "frozen.bias"]
    assert not is_weight_decayed("features.1.weight", nn.BatchNorm2d(4))
    assert is_weight_decayed("features.0.bias", nn.Conv2d(1, 1, 1))
    assert not is_weight_decayed("blocks.0.norm1.weight", None)
    # Batch-norm names count as whole components (Keras matched the scope "bn/"), not substrings.
    for name in ("bn.weight", "layer1.0.bn2.bias", "conv1_bn.weight", "bn_act.bias"):
        assert not is_weight_decayed(name, None), name
    for name in ("subnet.fc.weight", "fbnet.conv.bias"):
        assert is_weight_decayed(name, nn.Linear(1, 1)), name


def test_weight_decay_rule_on_a_timm_vit():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=16)
    decayed = {name for name, _ in decayed_parameters(vit)}
    all_names = {name for name, _ in vit.named_parameters()}
    excluded = all_names - decayed
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} <= excluded
    assert all("norm" in name or "embed" in name or name == "cls_token" for name in excluded)
    # Attention, MLP and head weights and biases are decayed.
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight",
            "head.weight", "head.bias"} <= decayed
    assert not any("norm" in name for name in decayed)


# --------------------------------------------------------------------------- timm models


def harmonization_gradients(model, size=32, batch=2):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = F.one_hot(torch.tensor([1, 3]), 10).float()
    out = harmonizer_loss_components(model, images, torch.ones(batch), labels, torch.rand(batch, size, size, generator=gen))
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(out.harmonization, [p for _, p in model.named_parameters()], allow_unused=True)
    return out, dict(zip(names, grads))


def test_timm_resnet18_gets_harmonization_gradients():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-initialises each block's last BN gain, which leaves the
    # residual branches without any gradient from the saliency term at initialisation.
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    out, grads = harmonization_gradients(model)
    assert all(torch.isfinite(v) for v in out)
    assert out.harmonization > 0
    for name, grad in grads.items():
        assert grad is None or torch.isfinite(grad).all(), name
    convs = [name for name in grads if "conv" in name and name.startswith(("conv1", "layer1", "layer2"))]
    assert convs and all(grads[name] is not None and grads[name].abs().sum() > 0 for name in convs)


def test_timm_vit_gets_harmonization_gradients():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # Default timm attention calls the fused SDPA kernel, which has no double backward:
    # harmonizer_loss must select the math kernel itself.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=16)
    out, grads = harmonization_gradients(model)
    assert all(torch.isfinite(v) for v in out)
    for name in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight",
                 "head.weight"):
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(reference):
    net = build_net(reference)
    images, tokens, labels, true_heatmaps = loss_inputs(reference)
    with pytest.raises(ValueError, match=r"true_heatmaps.*\(4, 32, 32\).*\(4, 32, 31\)"):
        harmonizer_loss(net, images, tokens, labels, true_heatmaps[:, :, :31])
    with pytest.raises(ValueError, match=r"images.*rank 4.*\(4, 32, 32\)"):
        harmonizer_loss(net, images[:, 0], tokens, labels, true_heatmaps)
    with pytest.raises(ValueError, match=r"true_heatmaps.*rank 3.*\(4, 1, 32, 32\)"):
        harmonizer_loss(net, images, tokens, labels, true_heatmaps[:, None])
    with pytest.raises(ValueError, match=r"tokens.*\(4,\).*\(3,\)"):
        harmonizer_loss(net, images, tokens[:3], labels, true_heatmaps)
    bad = true_heatmaps.clone()
    bad[1, 2, 3] = float("nan")
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"true_heatmaps.*\(4, 32, 32\).*2 non-finite"):
        harmonizer_loss(net, images, tokens, labels, bad)
    bad_images = images.clone()
    bad_images[2, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"images.*\(4, 3, 32, 32\).*1 non-finite"):
        harmonizer_loss(net, bad_images, tokens, labels, true_heatmaps)
    with pytest.raises(ValueError, match=r"tokens.*\(4,\).*1 non-finite"):
        harmonizer_loss(net, images, torch.tensor([1.0, float("nan"), 1.0, 1.0]), labels, true_heatmaps)
    bad_labels = labels.clone()
    bad_labels[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"labels.*\(4, 10\).*1 non-finite"):
        harmonizer_loss(net, images, tokens, bad_labels, true_heatmaps)
    with pytest.raises(TypeError, match="images.*ndarray"):
        harmonizer_loss(net, images.numpy(), tokens, labels, true_heatmaps)
    with pytest.raises(TypeError, match="tokens.*list"):
        harmonizer_loss(net, images, [1, 0, 1, 1], labels, true_heatmaps)
    with pytest.raises(TypeError, match="labels.*ndarray"):
        harmonizer_loss(net, images, tokens, labels.numpy(), true_heatmaps)
    with pytest.raises(ValueError, match=r"labels.*\(3, 10\)"):
        harmonizer_loss(net, images, tokens, labels[:3], true_heatmaps)
    with pytest.raises(ValueError, match=r"\(4, 10\).*labels.*\(4, 9\)"):
        harmonizer_loss(net, images, tokens, labels[:, :9], true_heatmaps)
    with pytest.raises(ValueError, match=r"true_heatmaps.*\(4, 32, 32\).*\(4, 16, 16\)"):
        alignment_loss(torch.rand(4, 16, 16), true_heatmaps, tokens)
