"""harmonizer_loss and its pieces against the TensorFlow fixture (its small Keras network is rebuilt in _reference_net.py)."""
import pytest
import torch
import torch.nn.functional as F

from _loss_testing import assert_matches
from harmonizer_fast.training import (
    HarmonizerLoss,
    alignment_loss,
    harmonizer_loss,
    harmonizer_loss_components,
    input_saliency,
    saliency_standardize_cut,
    smoothed_cross_entropy,
    weight_decay_loss,
)
from _reference_net import (  # noqa: F401  (reference: a pytest fixture, used by name)
    KERAS_NAMES,
    TORCH_NAMES,
    KerasReferenceNet,
    build_net,
    keras_to_torch,
    loss_inputs,
    reference,
)


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
