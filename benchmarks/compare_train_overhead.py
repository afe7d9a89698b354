"""Cost of one harmonized training step over one plain cross-entropy step, per timm model.

Variants, on the same model, batch and optimizer (SGD), each a full step (forward, backward,
``optimizer.step()``):

* ``plain CE`` (baseline): ``cross_entropy(model(x), y).backward()``.
* ``reference port``: a straightforward PyTorch transcription of the TensorFlow
  ``harmonizer_loss`` written below (both pyramids built level by level, all six levels,
  gradients taken with ``torch.autograd.grad`` over the parameter list, name-filtered
  weight decay, native depthwise convolutions, attention in the math SDPA kernel).
* ``Trainer``: :meth:`harmonizer_fast.training.Trainer.train_step` with its defaults (the
  package's loss, fast double backward; timm's ``fused_attn`` kept, so attention goes through
  ``scaled_dot_product_attention`` and its closed form,
  :class:`~harmonizer_fast.training.attention_double_backward.AttentionFunction`).
* ``Trainer, attention unfused`` (models with timm attention only): the same with timm's
  attention switched to its explicit matmul/softmax path (the closed-form softmax of
  :mod:`harmonizer_fast.training.activation_double_backward`).

The variants of a model are timed interleaved: after one warm-up step each, every round runs
each variant once (the order rotated each round), so a change of the machine's speed during the
run falls on all of them alike; each figure is the median of ``--repeats`` rounds. Peak memory
is the growth of the process's peak RSS over the runs of each variant (a lower bound when an
earlier variant already raised the peak); on CUDA, each variant's largest
``torch.cuda.max_memory_allocated``. ``--memory`` measures the CPU peak properly instead: each
variant's first step in a fresh process (peak RSS growth over the step, no timing).
``--profile MODEL [--variant LABEL]`` prints a torch.profiler table of one step and the
self time per autograd node (which backward formula spends it). On a GPU (the GPU script's
``overhead`` step): ``--device cuda --amp --batch 32 --models resnet50 vit_base_patch16_224``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks._timing import Comparison, measure_interleaved, peak_rss_gib

MODELS = ("resnet18", "convnext_atto", "efficientnet_lite0", "vit_tiny_patch16_224", "vit_base_patch16_224")
PLAIN, PORT, TRAINER, TRAINER_UNFUSED = "plain CE", "reference port", "Trainer", "Trainer, attention unfused"
BATCH = 8
SIZE = 224


# --------------------------------------------------------------------------- straightforward port of the reference

def _port_standardize_cut(maps, eps=1e-5):
    mean = maps.mean(dim=(1, 2), keepdim=True)
    std = ((maps - mean) ** 2).mean(dim=(1, 2), keepdim=True).sqrt()
    return F.relu((maps - mean) / (std + eps))


def _port_pyramid(maps, levels):
    b = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(b, b) / 256).view(1, 1, 5, 5)
    out = [maps[:, None]]
    for _ in range(levels):
        x = out[-1]
        pad_h = max((-(-x.shape[-2] // 2) - 1) * 2 + 5 - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // 2) - 1) * 2 + 5 - x.shape[-1], 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        out.append(F.conv2d(x, kernel, stride=2))
    return out


def _port_pyramidal_mse(true, pred, tokens, levels=5):
    a, b = _port_pyramid(true, levels), _port_pyramid(pred, levels)
    losses = [((x - y) ** 2 * tokens.view(-1, 1, 1, 1)).mean() for x, y in zip(a[:levels], b[:levels])]
    return torch.stack(losses).mean()


def port_harmonizer_loss(model, images, tokens, labels, heatmaps, lambda_weights=1e-5, lambda_harmonization=1.0):
    """Gradients of the reference loss, transcribed op for op (tape -> autograd.grad)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    images = images.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        logits = model(images)
    (grad,) = torch.autograd.grad((logits * labels).sum(), images, create_graph=True)
    sa = _port_standardize_cut(grad.mean(dim=1))
    hm = _port_standardize_cut(heatmaps)
    hm = hm / (hm.amax(dim=(1, 2), keepdim=True) + 1e-6) * (sa.detach().amax(dim=(1, 2), keepdim=True) + 1e-6)
    harmonization = _port_pyramidal_mse(sa, hm, tokens)
    ce = F.cross_entropy(logits, labels, label_smoothing=0.1)
    names = ("norm", "bn", "embed", "cls_token")
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for n, p in model.named_parameters() if p.requires_grad and not any(s in n for s in names)]
    weight_loss = sum((p ** 2).sum() / 2 for p in decayed)
    loss = ce + lambda_weights * weight_loss + lambda_harmonization * harmonization
    return torch.autograd.grad(loss, params)


# --------------------------------------------------------------------------- timed steps

def _batch(batch=BATCH, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 255
    heatmaps = torch.rand(batch, SIZE, SIZE, generator=g)
    labels = F.one_hot(torch.randint(0, 1000, (batch,), generator=g), 1000).float()
    return tuple(t.to(device) for t in (images, heatmaps, labels, torch.ones(batch)))


class _Repeat:
    """An endless stream returning the same batch (state-less: benchmarks never resume)."""

    def __init__(self, batch):
        from harmonizer_fast.training.data_mix import Batch

        self.batch = Batch(*batch)

    def __iter__(self):
        while True:
            yield self.batch


def _model(name, device="cpu"):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).to(device)


def _synchronized(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def _has_timm_attention(model) -> bool:
    return any(isinstance(getattr(m, "fused_attn", None), bool) for m in model.modules())


def _variants(name, batch=BATCH, device="cpu", amp=False, only: Optional[Sequence[str]] = None) -> List[Tuple[str, callable]]:
    """The steps of ``name`` on ``device`` (those in ``only``, default all); ``amp``: bf16
    autocast in all of them."""
    from harmonizer_fast.models import preprocess_input
    from harmonizer_fast.training import Trainer, TrainerConfig
    from harmonizer_fast.training.double_backward_checks import unfused_attention

    images, heatmaps, labels, tokens = _batch(batch, device)
    x = preprocess_input(images)
    device_type = torch.device(device).type
    autocast = lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp)
    wanted = lambda label: only is None or label in only
    steps = []

    if wanted(PLAIN):
        plain_model = _model(name, device).train()
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-4, momentum=0.9)

        def plain():
            plain_opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(plain_model(x), labels, label_smoothing=0.1)
            loss.backward()
            plain_opt.step()

        steps.append((PLAIN, plain))

    if wanted(PORT):
        port_model = _model(name, device).train()
        port_opt = torch.optim.SGD(port_model.parameters(), lr=1e-4, momentum=0.9)

        def port():
            with autocast():
                grads = port_harmonizer_loss(port_model, x, tokens, labels, heatmaps)
            for p, g in zip(port_model.parameters(), grads):
                p.grad = g
            port_opt.step()

        steps.append((PORT, port))

    def trainer_step(unfuse):
        config = TrainerConfig(batch_size=batch, steps=10**6, lr=1e-4, progress=False, device=str(device), amp=amp)
        trainer = Trainer(_model(name, device), config, train_data=_Repeat((images, heatmaps, labels, tokens)))

        def harmonized():
            with trainer.harmonizing(), unfused_attention(trainer.model) if unfuse else contextlib.nullcontext():
                trainer.train_step()

        return harmonized, trainer.model

    if wanted(TRAINER):
        steps.append((TRAINER, trainer_step(False)[0]))
    if wanted(TRAINER_UNFUSED):
        step, model = trainer_step(True)
        if _has_timm_attention(model):
            steps.append((TRAINER_UNFUSED, step))
    return [(label, _synchronized(fn, device)) for label, fn in steps]


def _peak_memory_gib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def compare(quick: bool = False, repeats: int = 0, models=None, batch: int = BATCH, device: str = "cpu",
            amp: bool = False):
    repeats = repeats or (2 if quick else 5)
    models = models or (MODELS[:2] if quick else MODELS)
    on_cuda = torch.device(device).type == "cuda"
    comparisons = []
    key = "peak_cuda_memory_gib" if on_cuda else "peak_rss_growth_gib"
    for name in models:
        variants = _variants(name, batch, device, amp)
        memory = [0.0] * len(variants)  # CUDA: the variant's largest peak; CPU: the peak's growth over its runs
        start = [0.0]

        def before_run(i):
            if on_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            else:
                start[0] = peak_rss_gib()

        def after_run(i):
            if on_cuda:
                memory[i] = max(memory[i], _peak_memory_gib(device))
            else:
                memory[i] += peak_rss_gib() - start[0]

        timings = measure_interleaved(variants, repeats=repeats, warmup=1, before_run=before_run, after_run=after_run)
        for t, m in zip(timings, memory):
            t.extra[key] = f"{m:.2f}"
        base = timings[0]
        for t in timings[1:]:
            t.extra["x_plain_step"] = f"{t.median_s / base.median_s:.2f}"
        comparisons.append(Comparison(f"{name} b{batch} {SIZE}px{' bf16' if amp else ''}", base, timings[1:],
                                      note="speed-up column < 1: cost of harmonizing"))
    where = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    return f"Harmonized training step vs plain cross-entropy step ({where})", comparisons


_NODE_EVENT = "autograd::engine::evaluate_function: "


def profile(name: str, variant: str = TRAINER, rows: int = 15, batch: int = BATCH) -> str:
    """torch.profiler table (self CPU time) of one ``variant`` step of ``name``, then the self
    time of the aten ops under each autograd node (which backward formula spends it;
    ``forward`` = outside any node) plus the time outside aten ops ("(not aten)": Python, the
    profiler's own ranges, and C++ kernels such as the fused layer-norm double backward)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    variants = dict(_variants(name, batch=batch, only=[variant]))
    if variant not in variants:
        raise ValueError(f"`variant` must be one of {sorted(variants)} for {name}, got {variant!r}")
    variants[variant]()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        variants[variant]()
    by_node: collections.Counter = collections.Counter()
    by_node_op: collections.Counter = collections.Counter()
    for event in prof.profiler.function_events:
        op = event.name
        if not op.startswith("aten::"):  # an autograd node's own time: Python, C++ kernels outside aten
            op = "(not aten)"
        node, parent = "forward", event.cpu_parent
        if event.name.startswith(_NODE_EVENT):
            node = event.name.split(": ", 1)[1]
        while parent is not None:  # the outermost autograd node evaluating this op
            if parent.name.startswith(_NODE_EVENT):
                node = parent.name.split(": ", 1)[1]
            parent = parent.cpu_parent
        by_node[node] += event.self_cpu_time_total
        by_node_op[node, op] += event.self_cpu_time_total
    total = sum(by_node.values()) or 1.0
    lines = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), "",
             f"self time by autograd node (aten ops, and '(not aten)': each node's own Python and C++ kernel "
             f"time; {name}, {variant}, total {total / 1e6:.3f} s):"]
    lines += [f"  {100 * t / total:5.1f} %  {node}" for node, t in by_node.most_common(rows)]
    lines += ["", "by (autograd node, op):"]
    lines += [f"  {100 * t / total:5.1f} %  {node}  {op}" for (node, op), t in by_node_op.most_common(2 * rows)]
    return "\n".join(lines)


def step_peak_rss_gib(name: str, variant: str, batch: int = BATCH) -> Optional[float]:
    """Peak RSS growth (GiB) over the first ``variant`` step of ``name``, in this process: call
    it in a fresh one (:func:`memory`). None: no such variant for this model."""
    steps = [fn for label, fn in _variants(name, batch=batch, only=[variant])]
    if not steps:
        return None
    (step,) = steps
    before = peak_rss_gib()
    step()
    return peak_rss_gib() - before


def memory(models: Sequence[str], batch: int = BATCH) -> str:
    """Markdown table of :func:`step_peak_rss_gib` per model and variant, each in a fresh process."""
    lines = [f"### Peak RSS growth over one step (GiB, CPU, batch {batch}, {SIZE} px, fresh process per variant)", "",
             "| model | " + " | ".join((PLAIN, PORT, TRAINER, TRAINER_UNFUSED)) + " |", "|---|---|---|---|---|"]
    for name in models:
        cells = []
        for variant in (PLAIN, PORT, TRAINER, TRAINER_UNFUSED):
            code = ("from benchmarks.compare_train_overhead import step_peak_rss_gib as f; "
                    f"r = f({name!r}, {variant!r}, {batch}); print('' if r is None else r)")
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"memory run of {name} / {variant} failed:\n{run.stderr[-2000:]}")
            value = (run.stdout.strip().splitlines() or [""])[-1]
            cells.append("n/a" if value == "" else f"{float(value):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {MODELS}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", default=None, help="print a profiler table of one step of this model")
    parser.add_argument("--variant", default=TRAINER, help=f"the step --profile runs: {PLAIN!r}, {PORT!r}, "
                        f"{TRAINER!r} (default) or {TRAINER_UNFUSED!r}")
    parser.add_argument("--memory", action="store_true", help="CPU peak RSS growth of one step per variant, "
                        "each in a fresh process (no timing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (the GPU script uses cuda)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast in all three steps")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.profile, args.variant, batch=args.batch))
        return 0
    if args.memory:
        print(memory(args.models or MODELS, args.batch))
        return 0
    from benchmarks._timing import format_table

    title, comparisons = compare(args.quick, args.repeats or 0, args.models, args.batch, args.device, args.amp)
    print(format_table(comparisons, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
