"""Read the weights of a Keras 2 ``.h5`` file with h5py and numpy only (no TensorFlow).

Two layouts hold the same weight groups:

- ``model.save(path)`` (what ``tf.keras.models.load_model`` reads): root attribute
  ``model_config`` (JSON), the weights under the group ``model_weights``, and, when the model
  was compiled and saved with its optimizer, a group ``optimizer_weights`` (ignored here).
- ``model.save_weights(path)`` (what ``model.load_weights`` reads): the weights at the root.

In both, the attribute ``layer_names`` lists every layer in the model's order, and each layer's
group lists its variables in the attribute ``weight_names`` (paths inside the group, such as
``conv1_conv/kernel:0``). Keras 2's ``load_weights`` pairs the file's layers that hold weights
with the model's layers that hold weights **by position**, not by name, and inside a layer the
variables by position too: :class:`KerasWeights` keeps exactly that order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import h5py
import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: Keras 2.13+ stores the variables that belong to no layer under this group.
TOP_LEVEL_GROUP = "top_level_model_weights"


@dataclass(frozen=True)
class KerasLayer:
    """One layer that holds weights: its name and its variables in stored order."""

    name: str
    weights: Tuple[Tuple[str, np.ndarray], ...]

    def shapes(self) -> List[Tuple[int, ...]]:
        return [tuple(value.shape) for _, value in self.weights]


@dataclass
class KerasWeights:
    """The weight-holding layers of a Keras 2 ``.h5`` file, in the order ``load_weights`` uses.

    Attributes:
        path: the file read.
        layout: ``"model"`` (written by ``model.save``) or ``"weights"`` (``save_weights``).
        layers: layers with at least one variable, in file order.
        has_optimizer_state: the file also holds optimizer slots (skipped).
        keras_version: the ``keras_version`` attribute ("" when absent).
        model_config: the parsed ``model_config`` of a ``model.save`` file, else None.
    """

    path: str
    layout: str
    layers: List[KerasLayer]
    has_optimizer_state: bool = False
    keras_version: str = ""
    model_config: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def num_tensors(self) -> int:
        return sum(len(layer.weights) for layer in self.layers)


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _names(group: h5py.Group, attribute: str) -> List[str]:
    values = group.attrs.get(attribute)
    if values is None:
        return []
    return [_text(v) for v in np.atleast_1d(values)] if np.size(values) else []


def read_keras_h5(path: PathLike) -> KerasWeights:
    """Read every weight of a Keras 2 ``.h5`` file (either layout) as float32 arrays.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an HDF5 file (or a truncated one), a Keras 3 ``.weights.h5`` file, an
            unknown layout, or a layer whose listed variable is missing (the message names the
            file and the layer).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras file {str(path)!r} does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{str(path)!r} is not a readable HDF5 file (truncated or another format): {err}") from err
    with handle:
        if "model_weights" in handle:
            layout, group = "model", handle["model_weights"]
        elif "layer_names" in handle.attrs:
            layout, group = "weights", handle
        elif "layers" in handle or "vars" in handle:
            raise ValueError(f"{str(path)!r} is a Keras 3 '.weights.h5' file; only the Keras 2 h5 layouts are read")
        else:
            raise ValueError(
                f"{str(path)!r}: unknown layout (no 'model_weights' group and no 'layer_names' attribute); "
                "expected a file written by Keras 2 model.save or save_weights"
            )
        layer_names = _names(group, "layer_names")
        if TOP_LEVEL_GROUP in group and TOP_LEVEL_GROUP not in layer_names:
            layer_names.append(TOP_LEVEL_GROUP)  # loaded after the layers, as Keras does
        layers: List[KerasLayer] = []
        for name in layer_names:
            if name not in group:
                raise ValueError(f"{str(path)!r}: layer {name!r} is listed in 'layer_names' but has no group")
            layer_group = group[name]
            weights = []
            for weight_name in _names(layer_group, "weight_names"):
                if weight_name not in layer_group:
                    raise ValueError(f"{str(path)!r}: layer {name!r} lists variable {weight_name!r}, which is missing")
                try:
                    value = np.asarray(layer_group[weight_name], dtype=np.float32)
                except (OSError, KeyError) as err:  # a truncated file fails on reading the data
                    raise ValueError(f"{str(path)!r}: cannot read {weight_name!r} of layer {name!r}: {err}") from err
                weights.append((weight_name, value))
            if weights:
                layers.append(KerasLayer(name, tuple(weights)))
        config = handle.attrs.get("model_config")
        model_config = json.loads(_text(config)) if config is not None else None
        return KerasWeights(
            path=str(path),
            layout=layout,
            layers=layers,
            has_optimizer_state="optimizer_weights" in handle,
            keras_version=_text(group.attrs.get("keras_version", handle.attrs.get("keras_version", ""))),
            model_config=model_config,
        )
