"""Fixed-noise sample grids: the same z (and labels) at every checkpoint, so progress is visible."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from gan_models.step import GAN, unwrap


def fixed_inputs(gan: GAN, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise from a private generator (the training RNG stream is left untouched). Conditional models get
    labels laid out class by class, one row per class where ``n`` allows."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, gan.spec.nz, generator=rng).to(gan.device)
    labels = None
    if gan.spec.conditional:
        labels = (torch.arange(n) * gan.spec.num_classes // n).to(gan.device)
    return z, labels


@torch.no_grad()
def generate(generator: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None,
             batch_size: int = 500) -> torch.Tensor:
    """Images in [-1, 1], generated in eval mode (batch-norm running statistics), batched."""
    net = unwrap(generator)
    was_training = net.training
    net.eval()
    try:
        chunks = []
        for start in range(0, z.shape[0], batch_size):
            lab = None if labels is None else labels[start:start + batch_size]
            chunks.append(net(z[start:start + batch_size], lab).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)
    finally:
        net.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, the inverse of the data pipeline's normalisation."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """H x W x C uint8 array of a grid of [-1, 1] images (C = 3, for PNG and MLflow's image slider)."""
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)
