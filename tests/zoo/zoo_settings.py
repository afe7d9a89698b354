"""Tiny sweep settings shared by the zoo tests (small models, 32-pixel stimuli, few images)."""

#: Small simulated image-level benchmark: 96 images of 4 objects, 8 sites.
TINY_IMAGE_LEVEL = {
    "n_images": 96, "n_neuroids": 8, "n_objects": 4, "n_features": 6, "image_size": 32,
    "n_splits": 3, "selection_splits": 2,
}
#: Small simulated spatial benchmark: 5 stimuli, 8x8 grid, 6 sites.
TINY_SPATIAL = {"n_images": 5, "grid_size": 8, "n_channels": 4, "n_neurons": 6, "image_size": 48}
#: Small timm models (random weights) with 4-5 feature stages each.
TINY_MODELS = ["resnet10t", "mobilenetv3_small_050", "regnetx_002"]
