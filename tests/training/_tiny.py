"""Tiny models and data for the trainer tests (CPU, seconds)."""
import torch
import torch.nn as nn

from harmonizer_fast.training.data_mix import ShuffledBatches, TensorRecords

NUM_CLASSES = 5
SIZE = 32


class TinyNet(nn.Module):
    """Conv -> GroupNorm -> GELU -> conv -> pool -> linear: smooth (twice differentiable) and BN-free."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = nn.functional.gelu(self.norm(self.conv1(x)))
        x = nn.functional.gelu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def make_records(n: int = 24, seed: int = 0, size: int = SIZE) -> TensorRecords:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centers = torch.randint(4, size - 4, (n, 2), generator=g)
    heatmaps = torch.exp(-((yy - centers[:, :1, None]) ** 2 + (xx - centers[:, 1:, None]) ** 2) / 20.0)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorRecords(images, heatmaps, labels, num_classes=NUM_CLASSES)


def make_stream(batch_size: int = 4, seed: int = 0, **kwargs) -> ShuffledBatches:
    return ShuffledBatches(make_records(), batch_size, seed=seed, **kwargs)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def train_config(**overrides):
    from harmonizer_fast.training.trainer import TrainerConfig

    base = dict(model="tiny", num_classes=NUM_CLASSES, batch_size=8, steps=2, lr=0.05, schedule="constant",
                momentum=0.9, progress=False, seed=3)
    base.update(overrides)
    return TrainerConfig(**base)
