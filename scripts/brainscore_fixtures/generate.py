"""Numbers from brainscore-vision 2.4.2's own code, for tests/neural/test_brainscore_parity.py.

Run in a scratch environment that has Brain-Score (never in CI; see README.md next to this file):

    BS_INSTALL_DEPENDENCIES=no python scripts/brainscore_fixtures/generate.py tests/fixtures/brainscore

For each case it writes, through brainio's own ``write_netcdf``, the repetition assembly
``<case>.nc`` (as Brain-Score packages MajajHong2015: presentation x neuroid x one 70-170 ms
time bin), for the 2.x case a stimulus set (``<case>_stimuli.csv`` + ``.zip``, object names only
there), and ``<case>.npz`` with the model features and Brain-Score's results: the assembly is
loaded back with brainio's loader, averaged with ``average_repetition`` and scored as
``MajajHong2015public.IT-pls`` does (``load_metric('pls', crossvalidation_kwargs=
dict(stratification_coord='object_name'))``, ``load_ceiling('internal_consistency')``,
``explained_variance``). ``screen.npz`` holds ``ImageConverter.apply_ratio`` outputs.
"""
from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from brainscore_core.supported_data_standards.brainio.assemblies import (
    AssemblyLoader,
    NeuroidAssembly,
    NeuronRecordingAssembly,
    StimulusMergeAssemblyLoader,
)
from brainscore_core.supported_data_standards.brainio.packaging import write_netcdf
from brainscore_core.supported_data_standards.brainio.stimuli import StimulusSet, StimulusSetLoader
from brainscore_vision import load_ceiling, load_metric
from brainscore_vision.benchmark_helpers.neural_common import average_repetition, explained_variance
from brainscore_vision.benchmark_helpers.screen import ImageConverter

#: name -> (images, neuroids, features, objects, repetitions per image (low, high), 2.x layout, seed)
CASES = {
    # Brain-Score 1.x layout (image_id and object_name on presentations), even repetitions.
    "even_reps": dict(n_images=160, n_neuroids=12, n_features=60, n_objects=8, reps=(6, 6), layout="1.x", seed=0),
    # 2.x layout (stimulus_id only; object_name from the stimulus set), odd and uneven repetitions.
    "uneven_odd_reps": dict(n_images=150, n_neuroids=10, n_features=40, n_objects=5, reps=(4, 7), layout="2.x", seed=1),
    # odd, even counts; odd image count; stimulus ids whose file order is not their sorted order.
    "odd_reps": dict(n_images=121, n_neuroids=9, n_features=35, n_objects=4, reps=(5, 5), layout="1.x", seed=2),
}


def _simulate(n_images, n_neuroids, n_features, n_objects, reps, seed):
    rng = np.random.RandomState(seed)
    objects = np.array([f"obj{k}" for k in rng.permutation(np.arange(n_images) % n_objects)])
    centres = rng.normal(size=(n_objects, n_features))
    features = centres[[int(o[3:]) for o in objects]] + rng.normal(size=(n_images, n_features))
    weights = rng.normal(size=(n_features, n_neuroids)) / np.sqrt(n_features)
    signal = np.log1p(np.exp(features @ weights))
    signal = (signal - signal.mean(0)) / signal.std(0)
    # Hash-like ids in shuffled file order: sorting them is a real permutation.
    ids = np.array([f"{rng.randint(16 ** 8):08x}{i:03d}" for i in range(n_images)])
    counts = rng.randint(reps[0], reps[1] + 1, size=n_images)
    rows = [(i, rep) for i in range(n_images) for rep in range(counts[i])]
    rows = [rows[k] for k in rng.permutation(len(rows))]
    noise = rng.uniform(0.8, 2.5, size=n_neuroids)
    values = np.stack([signal[i] + noise * rng.normal(size=n_neuroids) for i, _ in rows])
    return ids, objects, features, rows, values


def _write_case(out: Path, name: str, spec: dict) -> dict:
    ids, objects, features, rows, values = _simulate(
        spec["n_images"], spec["n_neuroids"], spec["n_features"], spec["n_objects"], spec["reps"], spec["seed"]
    )
    image_of = np.array([ids[i] for i, _ in rows])
    coords = {"repetition": ("presentation", np.array([rep for _, rep in rows]))}
    if spec["layout"] == "1.x":
        coords["image_id"] = ("presentation", image_of)
        coords["object_name"] = ("presentation", np.array([objects[i] for i, _ in rows]))
    else:
        coords["stimulus_id"] = ("presentation", image_of)
    coords.update({
        "neuroid_id": ("neuroid", np.array([f"Chabo_L_M_{j}_{j % 3}" for j in range(spec["n_neuroids"])])),
        "animal": ("neuroid", np.array(["Chabo", "Tito"])[np.arange(spec["n_neuroids"]) % 2]),
        "arr": ("neuroid", np.array(["M", "P"])[np.arange(spec["n_neuroids"]) // 2 % 2]),
        "region": ("neuroid", np.array(["IT"] * spec["n_neuroids"])),
        "time_bin_start": ("time_bin", np.array([70])),
        "time_bin_end": ("time_bin", np.array([170])),
    })
    packaged = NeuronRecordingAssembly(values[:, :, None], coords=coords, dims=["presentation", "neuroid", "time_bin"])
    nc_path = out / f"{name}.nc"
    write_netcdf(packaged, nc_path)

    if spec["layout"] == "2.x":
        csv_path, zip_path = out / f"{name}_stimuli.csv", out / f"{name}_stimuli.zip"
        rng = np.random.RandomState(spec["seed"] + 100)
        with zipfile.ZipFile(zip_path, "w") as zf:
            for sid in ids:
                buffer = io.BytesIO()
                Image.fromarray(rng.randint(0, 256, size=(6, 5, 3)).astype(np.uint8)).save(buffer, format="PNG")
                zf.writestr(f"{sid}.png", buffer.getvalue())
        pd.DataFrame({"stimulus_id": ids, "object_name": objects, "filename": [f"{s}.png" for s in ids]}).to_csv(
            csv_path, index=False)
        unzipped = out / f"_{name}_unzipped"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(unzipped)
        stimulus_set = StimulusSetLoader(cls=StimulusSet, csv_path=csv_path, stimuli_directory=unzipped).load()
        stimulus_set.identifier = name
        loader = StimulusMergeAssemblyLoader(cls=NeuronRecordingAssembly, file_path=nc_path,
                                             stimulus_set_identifier=name, stimulus_set=stimulus_set)
    else:
        loader = AssemblyLoader(cls=NeuronRecordingAssembly, file_path=nc_path)
    # As MajajHong2015's load_assembly: squeeze the time bin, select IT, transpose, average.
    assembly = loader.load().squeeze("time_bin")
    assembly = assembly.sel(region="IT")
    assembly["region"] = "neuroid", ["IT"] * len(assembly["neuroid"])
    assembly.load()
    assembly_repetition = assembly.transpose("presentation", "neuroid", ...)
    averaged = average_repetition(assembly_repetition)

    # Model activations as a BrainModel returns them: in stimulus-set (file) order.
    source = NeuroidAssembly(features, coords={
        "stimulus_id": ("presentation", ids), "object_name": ("presentation", objects),
        "neuroid_id": ("neuroid", [f"layer.{k}" for k in range(features.shape[1])]),
        "neuroid_num": ("neuroid", np.arange(features.shape[1])),
    }, dims=["presentation", "neuroid"])
    metric = load_metric("pls", crossvalidation_kwargs=dict(stratification_coord="object_name"))
    ceiler = load_ceiling("internal_consistency")
    raw = metric(source, averaged)
    ceiling = ceiler(assembly_repetition)
    ceiled = explained_variance(raw, ceiling)

    split_medians = raw.raw.median("neuroid")  # per split, as CrossRegressedCorrelation.aggregate
    ceiling_raw = ceiling.raw  # split x neuroid Spearman-Brown corrected consistencies
    results = {
        "raw": float(raw.values), "error": float(raw.attrs["error"]),
        "ceiling": float(ceiling.values), "ceiling_error": float(ceiling.attrs["error"]),
        "ceiled": float(ceiled.values), "ceiled_error": float(ceiled.attrs["error"]),
    }
    np.savez_compressed(
        out / f"{name}.npz",
        features=features,
        stimulus_ids=ids,
        object_names=objects,
        averaged_order=np.asarray(averaged["stimulus_id"].values).astype(str),
        averaged_mean=np.asarray(averaged.transpose("presentation", "neuroid").values, dtype=np.float64),
        split_medians=np.asarray(split_medians.transpose("split").values, dtype=np.float64),
        ceiling_splits=np.asarray(ceiling_raw.median("neuroid").transpose("split").values, dtype=np.float64),
        ceiling_per_split_neuroid=np.asarray(ceiling_raw.transpose("split", "neuroid").values, dtype=np.float64),
        ceiling_neuroid_ids=np.asarray(ceiling_raw["neuroid_id"].values).astype(str),
        **{k: np.float64(v) for k, v in results.items()},
    )
    return results


def _write_screen(out: Path) -> None:
    """Brain-Score's ImageConverter (pad onto grey / crop centrally) on small RGB and grey images."""
    rng = np.random.RandomState(7)
    images = {
        "rgb_31x20": Image.fromarray(rng.randint(0, 256, size=(20, 31, 3)).astype(np.uint8)),
        "grey_17x24": Image.fromarray(rng.randint(0, 256, size=(24, 17)).astype(np.uint8)),
    }
    converter = ImageConverter(target_dir=out)
    arrays = {}
    for name, image in images.items():
        arrays[f"{name}__input"] = np.asarray(image)
        for model_deg, stim_deg in [(10, 8), (6, 8), (12, 5), (8, 11)]:
            converted = converter.apply_ratio(image, model_deg / stim_deg)
            arrays[f"{name}__{model_deg}_{stim_deg}"] = np.asarray(converted)
    np.savez_compressed(out / "screen.npz", **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {name: _write_case(args.out, name, spec) for name, spec in CASES.items()}
    _write_screen(args.out)
    for path in args.out.glob("_*_unzipped"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
