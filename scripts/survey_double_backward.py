"""Survey: the fast double backward against native autograd on many timm architectures.

For each model (random weights, float64, 2 images at the smallest of 64/32/96/112/224 px the model
accepts, one thread): the harmonizer loss and every parameter gradient, once with
``fast_double_backward`` and once natively (models with ``nn.Hardsigmoid`` gates natively through
the relu6 form of the tests, since PyTorch cannot differentiate ``hardsigmoid_backward``). Prints
one line per model: the loss difference, the largest gradient difference over the model's largest
gradient, and the largest over each parameter's largest gradient (floored at 1e-6 of the model's
largest: biases whose true gradient is zero carry rounding only). No download; several minutes for the default list.

    .venv/bin/python scripts/survey_double_backward.py [--float32] [MODEL ...]

``--float32`` runs the float32 paths instead (the C++ GELU and layer-norm passes); their
rounding differs from native's, so expect ~1e-6 relative rather than ~1e-15.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers, from a checkout
import timm  # noqa: E402

from harmonizer_fast._memory import keep_freed_memory  # noqa: E402
from tests.training._routes import harmonizer_gradients, with_relu6_gates  # noqa: E402

DEFAULT_MODELS = """
resnet18 resnet50d resnext26ts seresnext26d_32x4d efficientnet_b0 mobilenetv3_small_100 mobilenetv2_050
convnext_atto convnextv2_atto regnetx_002 regnety_002 densenet121 dla34 ghostnet_100 rexnet_100 repvgg_a0
nf_resnet26 selecsls42b gernet_s xception41 inception_v3 hrnet_w18_small mixnet_s tinynet_e lcnet_050
efficientvit_b0 fastvit_t8 mobilevit_xxs edgenext_xx_small poolformer_s12 convmixer_768_32 resmlp_12_224
mixer_s16_224 gmlp_ti16_224 vit_tiny_patch16_224 deit_tiny_patch16_224 deit_tiny_distilled_patch16_224
eva02_tiny_patch14_224 swin_tiny_patch4_window7_224 swinv2_cr_tiny_224 cait_xxs24_224 xcit_nano_12_p16_224
coat_tiny crossvit_tiny_240 levit_128s maxvit_tiny_tf_224 pvt_v2_b0 twins_svt_small coatnet_0_rw_224
efficientformer_l1 tiny_vit_5m_224 mobileone_s0 ghostnetv2_100 hgnetv2_b0 fasternet_t0 inception_next_atto
mambaout_femto vit_small_patch16_rope_224 davit_tiny focalnet_tiny_srf nextvit_small volo_d1_224 sequencer2d_s
mobilenetv4_conv_small mobilenetv4_hybrid_medium hardcorenas_a fbnetv3_b mobilenetv3_large_100 repghostnet_050
rexnetr_100 efficientvit_m0 starnet_s1 rdnet_tiny hiera_tiny_224 pit_ti_224 tnt_s_patch16_224 convit_tiny
visformer_tiny vit_relpos_small_patch16_224 deit3_small_patch16_224 regnetz_005 resnest14d skresnet18 dpn68
res2net50_14w_8s cspresnet50 ese_vovnet19b_dw lambda_resnet26t botnet26t_256 gcresnet33ts eca_resnet33ts
cs3darknet_s tresnet_m mobilevitv2_050 levit_conv_128s convformer_s18 caformer_s18 efficientformerv2_s0
repvit_m0_9 gcvit_xxtiny mvitv2_tiny vit_small_patch14_dinov2 coat_lite_tiny resnetv2_50 nf_regnet_b0
""".split()
MAX_PARAMS = 40e6  # float64 double backward of bigger models takes minutes each here


def small_model(name: str):
    """The model at the smallest input size it runs at, and that size."""
    for size in (64, 32, 96, 112, 224):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=5, **({} if size == 224 else {"img_size": size}))
        except TypeError:  # no img_size argument: fully convolutional
            model = timm.create_model(name, pretrained=False, num_classes=5)
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size))
            return model, size
        except Exception:
            continue
    raise RuntimeError(f"{name}: no input size of 32-224 px worked")


def compare(name: str, dtype: torch.dtype = torch.float64) -> str:
    torch.manual_seed(0)
    model, size = small_model(name)
    if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
        return f"{name}: skipped (more than {MAX_PARAMS:.0e} parameters)"
    model = model.to(dtype).train()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 3, size, size, generator=gen).to(dtype), torch.tensor([1.0, 0.5], dtype=dtype),
             F.one_hot(torch.tensor([1, 3]), 5).to(dtype), torch.rand(2, size, size, generator=gen).to(dtype))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast_loss, fast = harmonizer_gradients(model, state, batch, fast=True)
    gated = any(isinstance(m, torch.nn.Hardsigmoid) for m in model.modules())
    native_loss, native = harmonizer_gradients(with_relu6_gates(model), state, batch, fast=False)
    top = max(g.abs().max().item() for g in native.values())
    overall = max((fast[k] - g).abs().max().item() for k, g in native.items()) / top
    per_param = max(((fast[k] - g).abs().max() / g.abs().max().clamp_min(1e-6 * top)).item() for k, g in native.items())
    keys = "same parameters" if fast.keys() == native.keys() else "DIFFERENT parameters"
    return (f"{name} ({size} px{', hard-sigmoid gates vs relu6 form' if gated else ''}): loss diff "
            f"{abs(fast_loss - native_loss).item():.1e}, largest gradient diff / largest gradient {overall:.1e}, "
            f"per parameter {per_param:.1e}, {keys}")


def main(names, dtype: torch.dtype = torch.float64) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()  # as the Trainer on a CPU (attention then hands P' over instead of folding it)
    for name in names:
        start = time.perf_counter()
        try:
            line = compare(name, dtype)
        except Exception as error:  # a survey: report and go on
            line = f"{name}: ERROR {type(error).__name__}: {str(error)[:200]}"
        print(f"{line} [{time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    dtype = torch.float32 if "--float32" in args else torch.float64
    names = [a for a in args if a != "--float32"]
    main(names or DEFAULT_MODELS, dtype)
