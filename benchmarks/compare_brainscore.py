"""Brain-Score 2.4.2's neural metric + ceiling vs ``score_image_level``: same numbers, timed side by side.

One synthetic assembly (images x neuroids, uneven repetition counts, object labels) and one
feature matrix go through

* Brain-Score: ``load_metric('pls', crossvalidation_kwargs=dict(stratification_coord='object_name'))``
  on the repetition-averaged in-memory assembly, ``load_ceiling('internal_consistency')`` on the
  repetitions, ``explained_variance`` (what ``MajajHong2015public.IT-pls`` runs), in a
  subprocess with Brain-Score's own Python (``--brainscore-python``, a scratch venv where
  ``brainscore_vision`` is importable; see scripts/brainscore_fixtures/README.md);
* the package: :func:`harmonizer_fast.neural.image_level.score_image_level` with its defaults.

Raw score, error, ceiling and ceiled score must agree (``--rtol``, default 1e-9); the exit status
is 1 if they do not. Times: Brain-Score's metric and ceiling (one run each: minutes at full size)
against the package's median of ``--repeats`` runs. Target: the package >= 20x faster at
3,200 images x 168 neuroids x 2,048 features (the default size)::

    python -m benchmarks.compare_brainscore --brainscore-python "$HOME/brainscore-venv/bin/python"

A quick check: ``--images 320 --neuroids 16 --features 128 --repetitions 4-7``. Both sides use
the machine's default BLAS threads; set ``OMP_NUM_THREADS`` to compare at a fixed count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_RESULT_KEYS = ("raw", "error", "ceiling", "ceiling_error", "ceiled")


def _synthetic(n_images: int, n_neuroids: int, n_features: int, n_objects: int, reps: tuple, seed: int) -> dict:
    """Features and uneven repeated responses from a planted linear-nonlinear model."""
    rng = np.random.default_rng(seed)
    objects = np.array([f"obj{k:02d}" for k in rng.permutation(np.arange(n_images) % n_objects)])
    centres = rng.normal(size=(n_objects, n_features))
    features = centres[[int(o[3:]) for o in objects]] + rng.normal(size=(n_images, n_features))
    drive = features @ (rng.normal(size=(n_features, n_neuroids)) / np.sqrt(n_features))
    signal = np.logaddexp(0.0, drive)
    signal = (signal - signal.mean(0)) / signal.std(0)
    counts = rng.integers(reps[0], reps[1] + 1, size=n_images)
    image_of = np.repeat(np.arange(n_images), counts)
    repetition = np.concatenate([np.arange(c) for c in counts])
    noise = rng.uniform(1.0, 3.0, size=n_neuroids)
    values = signal[image_of] + noise * rng.normal(size=(len(image_of), n_neuroids))
    return dict(features=features, objects=objects, stimulus_ids=np.array([f"img{i:05d}" for i in range(n_images)]),
                image_of=image_of, repetition=repetition, values=values)


# --------------------------------------------------------------------------- Brain-Score side


def _brainscore_worker(folder: Path) -> None:
    """Runs in Brain-Score's environment: imports nothing of harmonizer_fast."""
    os.environ.setdefault("BS_INSTALL_DEPENDENCIES", "no")
    import warnings

    warnings.simplefilter("ignore")
    from brainscore_core.supported_data_standards.brainio.assemblies import NeuroidAssembly, NeuronRecordingAssembly
    from brainscore_vision import load_ceiling, load_metric
    from brainscore_vision.benchmark_helpers.neural_common import average_repetition, explained_variance

    data = dict(np.load(folder / "data.npz"))
    ids, objects = data["stimulus_ids"], data["objects"]
    n_neuroids = data["values"].shape[1]
    repetitions = NeuronRecordingAssembly(data["values"], coords={
        "stimulus_id": ("presentation", ids[data["image_of"]]),
        "object_name": ("presentation", objects[data["image_of"]]),
        "repetition": ("presentation", data["repetition"]),
        "neuroid_id": ("neuroid", [f"site{j:03d}" for j in range(n_neuroids)]),
        "region": ("neuroid", ["IT"] * n_neuroids),
        "animal": ("neuroid", ["Chabo", "Tito"] * (n_neuroids // 2) + ["Chabo"] * (n_neuroids % 2)),
    }, dims=["presentation", "neuroid"])
    averaged = average_repetition(repetitions)
    features = data["features"]
    source = NeuroidAssembly(features, coords={
        "stimulus_id": ("presentation", ids), "object_name": ("presentation", objects),
        "neuroid_id": ("neuroid", [f"layer.{k}" for k in range(features.shape[1])]),
        "neuroid_num": ("neuroid", np.arange(features.shape[1])),
    }, dims=["presentation", "neuroid"])
    metric = load_metric("pls", crossvalidation_kwargs=dict(stratification_coord="object_name"))
    ceiler = load_ceiling("internal_consistency")
    start = time.perf_counter()
    raw = metric(source, averaged)
    metric_s = time.perf_counter() - start
    start = time.perf_counter()
    ceiling = ceiler(repetitions)
    ceiling_s = time.perf_counter() - start
    ceiled = explained_variance(raw, ceiling)
    result = {"raw": float(raw.values), "error": float(raw.attrs["error"]), "ceiling": float(ceiling.values),
              "ceiling_error": float(ceiling.attrs["error"]), "ceiled": float(ceiled.values),
              "metric_s": metric_s, "ceiling_s": ceiling_s}
    (folder / "brainscore.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- package side


def _package(data: dict, repeats: int) -> dict:
    from benchmarks._timing import measure
    from harmonizer_fast.neural.assemblies import NeuralAssembly
    from harmonizer_fast.neural.image_level import score_image_level, split_half_ceiling

    n_images, n_neuroids = len(data["stimulus_ids"]), data["values"].shape[1]
    slots = int(data["repetition"].max()) + 1
    responses = np.full((n_images, n_neuroids, slots), np.nan)
    responses[data["image_of"], :, data["repetition"]] = data["values"]
    assembly = NeuralAssembly(responses, data["stimulus_ids"], data["objects"],
                              np.array([f"site{j:03d}" for j in range(n_neuroids)]))
    result = score_image_level(data["features"], assembly)
    total = measure(lambda: score_image_level(data["features"], assembly), repeats=repeats, warmup=0)
    ceiling = measure(lambda: split_half_ceiling(assembly.responses), repeats=repeats, warmup=0)
    return {"raw": result.score, "error": result.score_sem, "ceiling": result.ceiling,
            "ceiling_error": result.ceiling_sem, "ceiled": result.ceiled_score,
            "total_s": total.median_s, "ceiling_s": ceiling.median_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--neuroids", type=int, default=168)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--repetitions", default="28-51", help="low-high repetitions per image (uneven), e.g. 6-6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the package (median)")
    parser.add_argument("--rtol", type=float, default=1e-9)
    parser.add_argument("--brainscore-python", default=os.environ.get("BRAINSCORE_PYTHON", sys.executable),
                        help="Python of an environment with brainscore_vision 2.4.2 ($BRAINSCORE_PYTHON)")
    parser.add_argument("--brainscore-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.brainscore_worker is not None:
        _brainscore_worker(args.brainscore_worker)
        return 0
    low, high = (int(v) for v in args.repetitions.split("-"))
    if not 2 <= low <= high:
        parser.error(f"--repetitions must be low-high with 2 <= low <= high, got {args.repetitions!r}")
    for name in ("images", "neuroids", "features", "objects", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    data = _synthetic(args.images, args.neuroids, args.features, args.objects, (low, high), args.seed)
    with tempfile.TemporaryDirectory(prefix="compare_brainscore_") as tmp:
        np.savez(Path(tmp) / "data.npz", **data)
        done = subprocess.run([args.brainscore_python, str(Path(__file__).resolve()), "--brainscore-worker", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            print(f"Brain-Score side failed with {args.brainscore_python} (is brainscore_vision 2.4.2 installed there?)")
            return 2
        theirs = json.loads((Path(tmp) / "brainscore.json").read_text())
    ours = _package(data, args.repeats)

    print(f"{args.images} images x {args.neuroids} neuroids x {args.features} features, "
          f"{low}-{high} repetitions, {args.objects} objects")
    print(f"{'':14s}{'Brain-Score':>22s}{'harmonizer_fast':>22s}{'rel. diff':>12s}")
    equal = True
    for key in _RESULT_KEYS:
        diff = abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-300)
        equal &= diff <= args.rtol
        print(f"{key:14s}{theirs[key]:22.15f}{ours[key]:22.15f}{diff:12.1e}")
    bs_total = theirs["metric_s"] + theirs["ceiling_s"]
    print(f"{'time (s)':14s}{'metric + ceiling':>22s}{'score_image_level':>22s}{'speed-up':>12s}")
    print(f"{'total':14s}{bs_total:22.3f}{ours['total_s']:22.3f}{bs_total / ours['total_s']:11.1f}x")
    print(f"{'ceiling':14s}{theirs['ceiling_s']:22.3f}{ours['ceiling_s']:22.3f}"
          f"{theirs['ceiling_s'] / ours['ceiling_s']:11.1f}x")
    print("numbers equal" if equal else f"NUMBERS DIFFER (rtol {args.rtol:g})")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
