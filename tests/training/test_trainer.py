import json
import math

import pytest
import torch
import torch.nn as nn

from harmonizer_fast.training import checkpoint as ckpt
from harmonizer_fast.training.loss import harmonizer_loss_components
from harmonizer_fast.training.trainer import (
    DoubleBackwardError,
    Trainer,
    TrainerConfig,
    lr_multiplier,
    unfused_attention,
)
from tests.training._tiny import NUM_CLASSES, TinyNet, make_stream


def _config(tmp_path, **overrides):
    base = dict(model="tiny", num_classes=NUM_CLASSES, batch_size=4, steps=6, lr=0.05, schedule="cosine",
                warmup_steps=2, output_dir=str(tmp_path), progress=False, seed=3)
    base.update(overrides)
    return TrainerConfig(**base)


def _net(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_reaches_the_same_weights(tmp_path, optimizer):
    straight = Trainer(_net(), _config(tmp_path / "a", optimizer=optimizer), train_data=make_stream())
    straight.fit()
    first = Trainer(_net(), _config(tmp_path / "b", optimizer=optimizer), train_data=make_stream())
    first.fit(steps=3)
    assert (tmp_path / "b" / "last.pt").is_file()
    torch.manual_seed(123)  # a resumed process starts from unrelated RNG states and weights
    resumed = Trainer(TinyNet(), _config(tmp_path / "b", optimizer=optimizer), train_data=make_stream())
    resumed.fit(resume=True)
    assert resumed.step == 6
    want, got = _params(straight.model), _params(resumed.model)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(_params(first.model)[k], want[k]) for k in want)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    straight_rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(straight_rows, rows):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
        assert a["lr"] == b["lr"]


def test_step_matches_manual_loss_and_sgd_update(tmp_path):
    """One trainer step = the reference loss's gradient applied by plain SGD."""
    model = TinyNet()
    reference = TinyNet()
    reference.load_state_dict(model.state_dict())
    stream = make_stream(seed=5)
    batch = next(iter(make_stream(seed=5)))
    cfg = _config(tmp_path, steps=1, lr=0.1, momentum=0.0, schedule="constant", warmup_steps=0)
    trainer = Trainer(model, cfg, train_data=stream)
    row = trainer.fit()[0]
    from harmonizer_fast.models import preprocess_input

    out = harmonizer_loss_components(reference, preprocess_input(batch.images), batch.tokens, batch.labels, batch.heatmaps)
    out.loss.backward()
    assert math.isclose(row["loss"], out.loss.item(), rel_tol=1e-6)
    assert math.isclose(row["harmonization"], out.harmonization.item(), rel_tol=1e-6)
    assert math.isclose(row["cross_entropy"], out.cross_entropy.item(), rel_tol=1e-6)
    assert math.isclose(row["weight_decay"], out.weight_decay.item(), rel_tol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p.detach() - 0.1 * p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_accumulation_equals_large_batch(tmp_path):
    """Two micro-batches of 4 = one batch of 8 (every loss term is a per-sample mean)."""
    big = Trainer(_net(), _config(tmp_path / "big", steps=1, batch_size=8, schedule="constant", warmup_steps=0),
                  train_data=make_stream(batch_size=8))
    small = Trainer(_net(), _config(tmp_path / "small", steps=1, batch_size=4, grad_accum_steps=2,
                                       schedule="constant", warmup_steps=0), train_data=make_stream(batch_size=4))
    # batches of 4 taken twice visit the same 8 records as one batch of 8 (same permutation).
    big.fit()
    small.fit()
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_schedules():
    cfg = TrainerConfig(steps=10, warmup_steps=2, schedule="cosine", lr=1.0)
    values = [lr_multiplier(s, cfg) for s in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == 1.0 and math.isclose(values[6], 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    step_cfg = TrainerConfig(steps=10, schedule="step", step_size=3, gamma=0.5)
    assert [lr_multiplier(s, step_cfg) for s in (0, 2, 3, 6, 9)] == [1.0, 1.0, 0.5, 0.25, 0.125]
    assert lr_multiplier(7, TrainerConfig(schedule="constant")) == 1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        TrainerConfig(optimizer="lion")
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(schedule="poly")


def test_logs_have_components_lr_and_throughput(tmp_path):
    trainer = Trainer(TinyNet(), _config(tmp_path, steps=2), train_data=make_stream())
    trainer.fit()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("step", "lr", "loss", "cross_entropy", "weight_decay", "harmonization", "images_per_s"):
        assert column in header
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["images_per_s"] > 0
    assert math.isclose(row["loss"], row["cross_entropy"] + 1e-5 * row["weight_decay"] + row["harmonization"], rel_tol=1e-6)


class _FlashAttention(nn.Module):
    """Attention through the CPU flash kernel, which has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(3, 12)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, 3)
        q, k, v = self.qkv(tokens).view(x.shape[0], -1, 3, 1, 4).permute(2, 0, 3, 1, 4)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


class _NoDoubleBackwardNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.mixer = _FlashAttention()
        self.head = nn.Linear(4, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.mixer(self.stem(x)).mean(dim=(1, 2)))


def test_missing_double_backward_names_op_and_module(tmp_path):
    trainer = Trainer(_NoDoubleBackwardNet(), _config(tmp_path, steps=1), train_data=make_stream())
    with pytest.raises(DoubleBackwardError) as info:
        trainer.fit()
    message = str(info.value)
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in message
    assert "mixer" in message and "_FlashAttention" in message and "_NoDoubleBackwardNet" in message
    assert info.value.module == "mixer"


class _GatedNet(TinyNet):
    """TinyNet with a squeeze-excitation gate through nn.Hardsigmoid (MobileNetV3's)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(8, 8), nn.Hardsigmoid())

    def forward(self, x):
        x = nn.functional.gelu(self.norm(self.conv1(x)))
        x = x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]
        x = nn.functional.gelu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_hardsigmoid_gates_train_with_the_fast_mode_and_say_so_without_it(tmp_path):
    # PyTorch has no double backward of hardsigmoid: natively the step stops, with a message
    # that names the module and the mode that covers it; the default mode trains
    torch.manual_seed(0)
    native = Trainer(_GatedNet(), _config(tmp_path / "native", steps=1, fast_double_backward=False), train_data=make_stream())
    with pytest.raises(DoubleBackwardError) as info:
        native.fit()
    assert info.value.module == "gate.1" and "fast_double_backward=True" in str(info.value)
    torch.manual_seed(0)
    fast = Trainer(_GatedNet(), _config(tmp_path / "fast", steps=2), train_data=make_stream())
    history = fast.fit()
    assert len(history) == 2 and all(math.isfinite(row["loss"]) for row in history)
    assert fast.model.gate[0].weight.grad is not None


class _With5dParameter(TinyNet):
    """TinyNet with a 5-D parameter (as timm's lambda layers hold a Conv3d weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, 8, 1, 1, 1))

    def forward(self, x):
        x = nn.functional.gelu(self.norm(self.conv1(x)) + self.shift[..., 0])
        x = nn.functional.gelu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_channels_last_converts_4d_tensors_and_leaves_the_others(tmp_path):
    # model.to(memory_format=torch.channels_last) raises "required rank 4 tensor" on a 5-D one
    torch.manual_seed(0)
    reference = Trainer(_With5dParameter(), _config(tmp_path / "a", steps=2), train_data=make_stream())
    torch.manual_seed(0)
    trainer = Trainer(_With5dParameter(), _config(tmp_path / "b", steps=2, channels_last=True), train_data=make_stream())
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.model.shift.dim() == 5 and trainer.model.shift.is_contiguous()
    expected, got = reference.fit(), trainer.fit()
    for want, row in zip(expected, got):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_vit_trains_with_fused_attention_switched_off_and_restored(tmp_path, fast):
    """Native autograd needs timm's math attention; the fast mode keeps fused attention on."""
    timm = pytest.importorskip("timm")
    import timm.layers.config as timm_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32,
                              patch_size=8, depth=2, embed_dim=32, num_heads=2)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)
    global_before = timm_config._USE_FUSED_ATTN
    seen = []
    original = type(attention[0]).forward

    def spy(self, *args, **kwargs):
        seen.append(self.fused_attn)
        return original(self, *args, **kwargs)

    type(attention[0]).forward = spy
    try:
        trainer = Trainer(model, _config(tmp_path, steps=1, fast_double_backward=fast), train_data=make_stream())
        row = trainer.fit()[0]
    finally:
        type(attention[0]).forward = original
    assert seen and (all(seen) if fast else not any(seen))
    assert all(m.fused_attn for m in attention)
    assert timm_config._USE_FUSED_ATTN == global_before
    assert math.isfinite(row["harmonization"]) and row["harmonization"] > 0


def test_unfused_attention_restores_on_error():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32, patch_size=8, depth=1)
    with pytest.raises(KeyError):
        with unfused_attention(model) as count:
            assert count == 1 and not model.blocks[0].attn.fused_attn
            raise KeyError("boom")
    assert model.blocks[0].attn.fused_attn


def test_checkpoint_loads_weights_only_and_rejects_foreign_files(tmp_path):
    trainer = Trainer(TinyNet(), _config(tmp_path, steps=1), train_data=make_stream())
    trainer.fit()
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 1 and state["data"] == {"epoch": 0, "position": 1, "seed": 0}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a harmonizer_fast checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_freeze_bn_keeps_running_statistics(tmp_path):
    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, NUM_CLASSES)

        def forward(self, x):
            return self.head(torch.tanh(self.bn(self.conv(x))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = BNNet()
    model.bn.running_mean.uniform_(-1, 1)
    mean_before = model.bn.running_mean.clone()
    conv_before = model.conv.weight.detach().clone()
    trainer = Trainer(model, _config(tmp_path, steps=1, freeze_bn=True), train_data=make_stream())
    trainer.fit()
    frozen = trainer.model.bn
    assert type(frozen).__name__ == "FrozenBatchNorm2d"
    assert torch.equal(frozen.running_mean, mean_before)
    assert not torch.equal(trainer.model.conv.weight, conv_before)


class _NormNet(nn.Module):
    """Conv + BatchNorm + depthwise conv + LayerNorm: every layer the fast double backward routes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = nn.functional.gelu(self.bn(self.conv(x)))
        x = self.depthwise(x).mean(dim=(2, 3))
        return self.head(nn.functional.gelu(self.ln(x)))


@pytest.mark.parametrize("amp", [False, True])
def test_fast_double_backward_trains_like_native_autograd(tmp_path, amp):
    # Under bf16 autocast the reference is native autograd in float32: the exact arithmetic that
    # both bf16 runs round. Native autograd's own bf16 double backward of a convolution (the
    # output gradient as a bf16 kernel) is the less accurate of the two on CPUs with AMX-BF16
    # (conv.weight 3.8e-3 from float32 there, the fast path 1.4e-4), so it is no yardstick.
    runs = {}
    for fast in (True, False):
        torch.manual_seed(0)
        trainer = Trainer(_NormNet(), _config(tmp_path / str(fast), steps=2, amp=amp and fast, fast_double_backward=fast),
                          train_data=make_stream())
        rows = trainer.fit()
        assert all(math.isfinite(r["loss"]) for r in rows)
        runs[fast] = (rows, _params(trainer.model))
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-5, atol=1e-6)  # bf16 autocast rounds differently
    for key, want in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], want, **tol, msg=key)
    assert math.isclose(runs[True][0][-1]["harmonization"], runs[False][0][-1]["harmonization"],
                        rel_tol=tol["rtol"], abs_tol=tol["atol"])


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_trainer_keeps_freed_memory_unless_told_not_to(tmp_path, monkeypatch, keep):
    from harmonizer_fast.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(True) or True)
    Trainer(TinyNet(), _config(tmp_path, steps=1, device="cpu", keep_freed_memory=keep), train_data=make_stream())
    assert calls == ([True] if keep else [])


def test_training_backward_skips_the_images_gradient(tmp_path, monkeypatch):
    # the images require a gradient for the saliency only: the step's second backward must not
    # compute it again through the first convolution, and the update must stay the same
    from harmonizer_fast.training import conv_double_backward as conv

    input_grads = []
    real = conv._conv_grads

    def recording(grad_out, x, weight, p, need_x, need_w, need_b=False):
        if need_x and x.shape[1] == 3:  # the images' gradient through conv1
            input_grads.append(1)
        return real(grad_out, x, weight, p, need_x, need_w, need_b)

    monkeypatch.setattr(conv, "_conv_grads", recording)
    trainer = Trainer(_net(), _config(tmp_path, steps=1), train_data=make_stream())
    trainer.train_step()
    assert len(input_grads) == 1  # the saliency's

    # a step whose backward computes every leaf's gradient (no inputs=): the images' again
    input_grads.clear()
    reference = Trainer(_net(), _config(tmp_path / "ref", steps=1), train_data=make_stream())
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, inputs=None, **k: real_backward(self, *a, **k))
    reference.train_step()
    assert len(input_grads) == 2
    for (name, a), b in zip(trainer.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
