"""Fixed-noise sample grids: the same z (and labels) at every checkpoint, so progress is visible."""
from __future__ import annotations

import numpy as np
import torch

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


# The pixel convention, in one place: images are stored as uint8 and trained on as floats in [-1, 1].
def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (on the tensor's own device: move it first, convert there)."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(images) -> torch.Tensor:
    """Floats in [-1, 1] (tensor or array) -> uint8 pixels, ``round((x + 1) * 127.5)`` clamped: the inverse of
    ``from_uint8``. uint8 input is returned unchanged (as a tensor), so real images may go through it too."""
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise TypeError(f"to_uint8 expects floats in [-1, 1] or uint8, got dtype {t.dtype}")
    return ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def evaluation_inputs(nz: int, n: int, seed: int, num_classes: int | None = None):
    """The noise (and, for a conditional G, labels cycling through the classes) that evaluation-style sampling
    uses: the same ``seed`` gives the same inputs everywhere (evaluate, tune's reports, generate)."""
    z = torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % num_classes if num_classes else None
    return z, labels


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """H x W x C uint8 array of a grid of [-1, 1] images (C = 3, for PNG and MLflow's image slider)."""
    # imported here: torchvision (and the torch._dynamo it pulls in) is ~1.8 s of every process's start-up,
    # and only the grids need it
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)
