"""Build the reference Keras architectures with the real libraries, fill them with random
weights, save them as the published files are saved and record their logits.

Run in a scratch environment (``requirements.txt`` beside this file; never in CI)::

    TF_USE_LEGACY_KERAS=1 python scripts/keras_fixtures/make_fixtures.py --size shrunk --out tests/fixtures/keras
    TF_USE_LEGACY_KERAS=1 python scripts/keras_fixtures/make_fixtures.py --size full --out /tmp/keras_full

Each model NAME gives ``NAME.h5`` (``model.save`` for VGG16, ResNet50 and EfficientNetB0, as
the reference's ``tf.keras.models.load_model`` reads them; ``save_weights`` for the others, as
their ``load_weights`` reads them) and ``NAME.npz`` with ``images`` (N, H, W, 3, 0..255),
``logits`` (pre-softmax Keras outputs of ``preprocess_input(images)``) and ``config`` (the
shrunk architecture, JSON). With ``--size shrunk`` the ResNet50 file is ``ResNet50_optimizer.h5``
(``model.save`` with Adam state, after one training step) and ``ViT_B16_model.h5`` (``model.save``
of a ``load_weights`` model) is added, so that every layout is covered.

Every tensor is random: BatchNorm moving statistics and layer-scale gains too, since their
default values (0, 1, 1e-6) would hide a mapping error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2 (tf-keras): the published files' format
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# tensorflow-addons 0.23 (imported by vit-keras 0.1.2) looks for Keras 2 internals under
# `keras.src.engine`, which tf-keras now holds: point it there.
import tf_keras.src.engine as _engine  # noqa: E402
import tf_keras.src.engine.keras_tensor as _keras_tensor  # noqa: E402

sys.modules.setdefault("keras.src.engine", _engine)
sys.modules.setdefault("keras.src.engine.keras_tensor", _keras_tensor)

import efficientnet.tfkeras as efficientnet_tfkeras  # noqa: E402
from keras_cv_attention_models import convnext, levit, maxvit  # noqa: E402
from tf_keras.src.applications import resnet as keras_resnet  # noqa: E402
from vit_keras import vit  # noqa: E402

keras = tf.keras
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Shrunk architectures (full size: the published ones). Each one keeps every kind of block of
# its family (strides, shortcuts, kernel sizes) so that each mapping rule is exercised.
SHRUNK = {
    "ViT_B16": dict(image_size=32, patch_size=16, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, classes=10),
    "VGG16": dict(widths=[4, 8, 8, 16, 16], fc1=16, fc2=4096, classes=10, image_size=224),
    "ResNet50": dict(blocks=[2, 2, 3, 2], widths=[8, 16, 16, 32], classes=10, image_size=64),
    "EfficientNetB0": dict(width=0.25, repeats=[1, 2, 1, 1, 1, 2, 1], classes=10, image_size=64),
    "tiny_ConvNeXT": dict(num_blocks=[1, 1, 2, 1], out_channels=[16, 32, 48, 64], classes=10, image_size=64),
    "tiny_MaxViT": dict(num_blocks=[1, 2, 1, 1], out_channels=[32, 32, 32, 64], stem_width=16, head_dimension=8,
                        classes=10, image_size=96),
    "LeViT_small": dict(patch_channel=32, out_channels=[48, 64, 64], num_heads=[2, 3, 4], depthes=[1, 2, 1],
                        key_dims=[8, 8, 8], classes=10, image_size=64),
}
FULL = {name: dict(classes=1000, image_size=224) for name in SHRUNK}
SAVED_WHOLE = {"VGG16", "ResNet50", "EfficientNetB0"}  # the reference reads these with load_model


def build(name: str, cfg: dict, full: bool) -> keras.Model:
    if name == "ViT_B16":
        if full:
            return vit.vit_b16(image_size=224, activation="linear", pretrained=False, include_top=True,
                               pretrained_top=False)
        return vit.build_model(image_size=cfg["image_size"], patch_size=cfg["patch_size"], num_layers=cfg["num_layers"],
                               hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"], name="vit-shrunk",
                               mlp_dim=cfg["mlp_dim"], classes=cfg["classes"], activation="linear")
    if name == "VGG16":
        if full:
            return keras.applications.VGG16(weights=None)
        return _narrow_vgg16(cfg)
    if name == "ResNet50":
        if full:
            return keras.applications.ResNet50V2(weights=None)

        def stack_fn(x):
            for i, (blocks, width) in enumerate(zip(cfg["blocks"], cfg["widths"])):
                last = i == len(cfg["blocks"]) - 1
                x = keras_resnet.stack2(x, width, blocks, stride1=1 if last else 2, name=f"conv{i + 2}")
            return x

        return keras_resnet.ResNet(stack_fn, True, True, "resnet50v2", True, None, None,
                                   (cfg["image_size"], cfg["image_size"], 3), None, cfg["classes"])
    if name == "EfficientNetB0":
        if full:
            return efficientnet_tfkeras.EfficientNetB0(weights=None)
        from efficientnet.model import DEFAULT_BLOCKS_ARGS, EfficientNet

        blocks = [b._replace(num_repeat=r) for b, r in zip(DEFAULT_BLOCKS_ARGS, cfg["repeats"])]
        return EfficientNet(cfg["width"], 1.0, cfg["image_size"], 0.2, blocks_args=blocks, model_name="efficientnet-shrunk",
                            weights=None, input_shape=(cfg["image_size"], cfg["image_size"], 3), classes=cfg["classes"],
                            backend=keras.backend, layers=keras.layers, models=keras.models, utils=keras.utils)
    if name == "tiny_ConvNeXT":
        if full:
            return convnext.ConvNeXtTiny(classifier_activation=None, pretrained=None)
        return convnext.ConvNeXt(num_blocks=cfg["num_blocks"], out_channels=cfg["out_channels"],
                                 input_shape=(cfg["image_size"], cfg["image_size"], 3), num_classes=cfg["classes"],
                                 classifier_activation=None, pretrained=None, model_name="convnext_shrunk")
    if name == "tiny_MaxViT":
        if full:
            return maxvit.MaxViT_Tiny(classifier_activation=None, pretrained=None)
        return maxvit.MaxViT(num_blocks=cfg["num_blocks"], out_channels=cfg["out_channels"], stem_width=cfg["stem_width"],
                             head_dimension=cfg["head_dimension"], input_shape=(cfg["image_size"], cfg["image_size"], 3),
                             num_classes=cfg["classes"], classifier_activation=None, pretrained=None,
                             model_name="maxvit_shrunk")
    if name == "LeViT_small":
        if full:
            return levit.LeViT128(classifier_activation=None, use_distillation=False, pretrained=None)
        return levit.LeViT(patch_channel=cfg["patch_channel"], out_channels=cfg["out_channels"], num_heads=cfg["num_heads"],
                           depthes=cfg["depthes"], key_dims=cfg["key_dims"],
                           input_shape=(cfg["image_size"], cfg["image_size"], 3), num_classes=cfg["classes"],
                           classifier_activation=None, use_distillation=False, pretrained=None,
                           model_name="levit_shrunk")
    raise ValueError(name)


def _narrow_vgg16(cfg: dict) -> keras.Model:
    """keras.applications.VGG16 has no width arguments: the same layers (names, padding,
    pooling, flatten order), narrower. 224 inputs keep the 7x7 map that fc1 flattens."""
    layers = keras.layers
    inputs = layers.Input((cfg["image_size"], cfg["image_size"], 3))
    x = inputs
    for block, (width, convs) in enumerate(zip(cfg["widths"], [2, 2, 3, 3, 3]), start=1):
        for conv in range(1, convs + 1):
            x = layers.Conv2D(width, 3, activation="relu", padding="same", name=f"block{block}_conv{conv}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg["fc1"], activation="relu", name="fc1")(x)
    x = layers.Dense(cfg["fc2"], activation="relu", name="fc2")(x)
    x = layers.Dense(cfg["classes"], activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name="vgg16")


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Random values for every variable, scaled so that activations stay of order one.

    Norm scales that the library initialises to zero (kecam's ``zero_gamma`` at the end of a
    residual branch) get small values, as a trained network has: order-one gains there would
    compound over the blocks (LeViT128's logits reach ~1e3).
    """
    zero_init = {id(layer.gamma) for layer in model.layers
                 if isinstance(getattr(layer, "gamma_initializer", None), keras.initializers.Zeros)}
    for weight in model.weights:
        name, shape = weight.name, tuple(weight.shape)
        if id(weight) in zero_init:
            value = rng.uniform(0.05, 0.25, shape)
        elif "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "moving_mean" in name:
            value = rng.normal(0.0, 0.2, shape)
        elif name.endswith("gamma:0") or name.endswith("/weight:0"):  # norm scales, layer-scale gains
            value = rng.uniform(0.5, 1.5, shape)
        elif "depthwise_kernel" in name:
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0] * shape[1]), shape)
        elif "kernel" in name and len(shape) >= 2:
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        else:  # biases, betas, class token, position embeddings, relative-position tables
            value = rng.normal(0.0, 0.2, shape)
        weight.assign(value.astype(np.float32))


def logits_of(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Pre-softmax outputs: a softmax head (keras.applications, efficientnet) is made linear."""
    head = model.layers[-1]
    activation = getattr(head, "activation", None)
    if activation is not None and activation is not keras.activations.linear:
        head.activation = keras.activations.linear
    x = (images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    out = model(x.astype(np.float32), training=False).numpy()
    if activation is not None:
        head.activation = activation
    return out


def add_optimizer_state(model: keras.Model, image_size: int, rng: np.random.Generator) -> None:
    """One Adam step on random data, so that a saved file carries optimizer slots."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = rng.normal(size=(2, image_size, image_size, 3)).astype(np.float32)
    y = np.zeros((2, model.output_shape[-1]), np.float32)
    model.fit(x, y, epochs=1, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["shrunk", "full"], default="shrunk")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: all seven)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    configs = SHRUNK if args.size == "shrunk" else FULL
    for index, (name, cfg) in enumerate(configs.items()):
        if args.only and name not in args.only:
            continue
        rng = np.random.default_rng(1000 + index)
        keras.backend.clear_session()
        model = build(name, cfg, full=args.size == "full")
        with_optimizer = args.size == "shrunk" and name == "ResNet50"
        if with_optimizer:
            add_optimizer_state(model, cfg["image_size"], rng)
        randomize(model, rng)
        images = rng.integers(0, 256, (args.batch, cfg["image_size"], cfg["image_size"], 3), dtype=np.uint8)
        logits = logits_of(model, images.astype(np.float32))
        path = os.path.join(args.out, f"{name}_optimizer.h5" if with_optimizer else f"{name}.h5")
        if name in SAVED_WHOLE:
            model.save(path, include_optimizer=with_optimizer)
        else:
            model.save_weights(path)
        if args.size == "shrunk" and name == "ViT_B16":
            model.save(os.path.join(args.out, "ViT_B16_model.h5"), include_optimizer=False)
        np.savez_compressed(os.path.join(args.out, f"{name}.npz"), images=images, logits=logits, config=json.dumps(cfg))
        print(f"{name}: {model.count_params()} parameters, logits std {logits.std():.3g}, saved {path}", flush=True)


if __name__ == "__main__":
    main()
