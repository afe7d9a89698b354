"""Peak memory of a sweep unit under the Brain-Score protocol: every block of a ViT, full features.

Two measurements, each in this process (``ru_maxrss`` plus an RSS sampler every 0.5 s, with the
stage it was in):

* ``--mode unit`` (the target): :func:`harmonizer_fast.zoo.sweep.run_unit` of ``--model``
  (default ViT-B/16, random weights: memory does not depend on them) on the simulated
  image-level benchmark with ``--images`` stimuli (default 3,200), every block, the default layer
  choice (PCA-1000 fitted on 1,000 of the stimuli) and full-feature scores. Features beyond the
  memory budget (2 GiB) are spooled to ``--spool-dir`` (ViT-B/16 x 3,200: 12 x 1.9 GB on disk).
  On a 2-core CPU this takes hours (about 1.9 s per image forward, plus every layer's readouts).
* ``--mode layer``: the scoring of ONE layer of that shape (``--images`` x ``--features``,
  ViT-B/16's block: 197 x 768 = 151,296) from spooled random features: the per-layer peak of the
  scoring stage (the stage frees each layer before the next, so it is the stage's peak).

Usage::

    nice -n 19 python -m benchmarks.memory_sweep --mode unit --images 3200 --out mem_unit.json
    python -m benchmarks.memory_sweep --mode layer --images 3200 --features 151296 --out mem_layer.json
"""
from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from typing import Dict, List

import numpy as np
import torch

STAGE = {"name": "start"}


def _rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def _sampler(samples: List[Dict[str, object]], stop: threading.Event, live: str = "") -> None:
    begin = time.perf_counter()
    while not stop.is_set():
        samples.append({"t": round(time.perf_counter() - begin, 1), "rss_gib": round(_rss_gib(), 3),
                        "stage": STAGE["name"]})
        if live and len(samples) % 60 == 0:  # a long run's peak so far, readable before it ends
            with open(live, "w") as handle:
                json.dump({"t": samples[-1]["t"], "stage": STAGE["name"], "rss_gib": samples[-1]["rss_gib"],
                           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, handle)
        stop.wait(0.5)


def _unit(args) -> Dict[str, object]:
    from harmonizer_fast.zoo.sweep import ModelSpec, SweepUnit, run_unit

    options = {"n_images": args.images, "image_size": 64, "seed": 0}
    if args.spool_dir:
        options["spool_dir"] = args.spool_dir
    unit = SweepUnit(model=ModelSpec(args.model, args.model), benchmark="image-level-sim",
                     benchmark_options=tuple(sorted(options.items())), batch_size=32, progress=True)
    STAGE["name"] = "unit"
    rows = run_unit(unit)
    return {"rows": [{"layer": r.layer, "score": r.score, "selection_score": r.selection_score,
                      "selected": r.selected, "n_features": r.n_features} for r in rows]}


def _layer(args) -> Dict[str, object]:
    from harmonizer_fast.neural.simulate import simulate_image_level
    from harmonizer_fast.zoo.benchmarks import ImageLevelBenchmark

    sim = simulate_image_level(n_images=args.images, n_neuroids=168, n_repetitions=8, n_objects=8, seed=0)
    images = torch.zeros(args.images, 3, 2, 2, dtype=torch.uint8)
    bench = ImageLevelBenchmark("mem", images, sim.assembly, spool_dir=args.spool_dir)
    sink = bench.make_sink(["block"])
    rng = np.random.default_rng(0)
    STAGE["name"] = "store"
    for start in range(0, args.images, 32):
        batch = min(32, args.images - start)
        sink.update({"block": torch.from_numpy(rng.standard_normal((batch, args.features), dtype=np.float32))})
    stored = sink.finish()
    STAGE["name"] = "score"
    result = bench.score_layer(stored["block"])
    sink.close()
    return {"score": result.score, "selection_score": result.selection_score, "n_features": result.n_features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("unit", "layer"), default="unit")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--features", type=int, default=197 * 768)
    parser.add_argument("--spool-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the result and the RSS timeline")
    args = parser.parse_args()
    samples: List[Dict[str, object]] = []
    stop = threading.Event()
    live = f"{args.out}.live" if args.out else ""
    thread = threading.Thread(target=_sampler, args=(samples, stop, live), daemon=True)
    thread.start()
    begin = time.perf_counter()
    result = _unit(args) if args.mode == "unit" else _layer(args)
    stop.set()
    thread.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report = {"mode": args.mode, "model": args.model, "images": args.images, "features": args.features,
              "peak_rss_gib": round(peak, 3), "seconds": round(time.perf_counter() - begin, 1),
              "result": result, "samples": samples[::max(1, len(samples) // 400)]}
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
