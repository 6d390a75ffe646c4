"""Small shared helpers for tests (no fixtures with side effects here)."""
import torch


class constant_batches:
    """An endless iterator of fixed random batches that counts how many were drawn."""

    def __init__(self, batch, channels, resolution, num_classes=10, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(batch, channels, resolution, resolution, generator=gen) * 2 - 1
        self.labels = torch.randint(0, num_classes, (batch,), generator=gen)
        self.drawn = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        return self.images, self.labels
