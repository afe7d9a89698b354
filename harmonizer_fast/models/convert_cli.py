"""``harmonizer-fast convert-keras NAME IN.h5 OUT.safetensors``: a published Keras model, once, to timm.

The output holds the state dict of the timm twin of ``NAME`` (``harmonizer_fast.models.MODEL_REGISTRY``),
with metadata ``source_sha256`` (of IN.h5), ``converter_version``, ``reference`` and ``timm_name``. It
loads with ``--weights OUT.safetensors`` in ``train``, ``eval-clickme`` and ``sweep`` (``--model NAME``).
An existing OUT is never overwritten unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from safetensors.torch import save

from harmonizer_fast._argtypes import positive_int
from harmonizer_fast._io import atomic_write_bytes

from harmonizer_fast.models.keras_convert import (
    CONVERTER_VERSION,
    KERAS_ARCHITECTURES,
    keras_architecture,
    keras_to_timm,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(KERAS_ARCHITECTURES), help="reference model name")
    parser.add_argument("source", metavar="IN.h5", help="the Keras file (model.save or save_weights layout)")
    parser.add_argument("output", metavar="OUT.safetensors", help="converted weights")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="classifier size of the file (default 1000)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="timm arguments of a narrower variant of the architecture (default: the published one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    source, output = Path(args.source), Path(args.output)
    if output.suffix != ".safetensors":
        raise ValueError(f"OUT must end in .safetensors, got {str(output)!r}")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(output)!r} exists; pass --overwrite to replace it")
    architecture = keras_architecture(args.name)
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}: {err}") from err
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    model = keras_to_timm(args.name, source, num_classes=args.num_classes, **model_kwargs)
    metadata = {
        "source_sha256": file_sha256(source),
        "source_name": source.name,
        "converter_version": CONVERTER_VERSION,
        "reference": architecture.reference,
        "timm_name": architecture.timm_name,
        "num_classes": str(args.num_classes),
        "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
    }
    # serialised in memory, then written atomically: an interrupted conversion leaves no partial
    # OUT (which would then block the rerun), and the file gets the usual umask permissions
    atomic_write_bytes(output, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=metadata))
    print(f"{args.name}: {source} -> {output} ({architecture.timm_name}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, sha256 {metadata['source_sha256'][:12]})")
    return 0
