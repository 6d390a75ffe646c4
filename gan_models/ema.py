"""An exponential moving average of the generator's weights, the G that gets sampled, scored and registered.

GAN generators oscillate around a good solution instead of settling on it; averaging the iterates over time
(Yazici et al. 2019, "The Unusual Effectiveness of Averaging in GAN Training"; Karras et al. 2018's G_ema)
gives a smoother, better generator at no training cost. The averaging horizon is a half-life counted in images
that G has been trained on, so it means the same at any batch size or worker count; it ramps up with training
(stylegan2-ada's ``ema_rampup``) so that early averages are not dominated by the random initial weights.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class GeneratorEMA:
    """``update(generator, images)`` after every generator step; ``module`` is the averaged generator."""

    def __init__(self, generator: nn.Module, half_life_images: float = 10_000, rampup: float | None = 0.05):
        if half_life_images <= 0:
            raise ValueError(f"EMA half-life must be positive, got {half_life_images} images")
        # Batch-norm running statistics are averaged too (use_buffers): they belong to the averaged weights.
        self.averaged = AveragedModel(_plain(generator), use_buffers=True)
        self.half_life_images, self.rampup = float(half_life_images), rampup
        self.images_seen = 0

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def decay(self, images: int) -> float:
        half_life = self.half_life_images
        if self.rampup:
            half_life = min(half_life, self.images_seen * self.rampup)
        return 0.5 ** (images / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, generator: nn.Module, images: int) -> None:
        """``images``: how many samples G was trained on in this step (its batch times the number of workers)."""
        self.images_seen += images
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.decay(images))
        self.averaged.update_parameters(_plain(generator))

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.images_seen = int(state["images_seen"])


def _plain(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # the network inside a DDP wrapper

