"""Learning-rate decay over a run: constant, then linear down to a fraction of the base rate.

A run under a wall-clock budget cannot count its steps in advance, so the schedule reads *progress* (0 at the
start, 1 at the end: steps done / steps planned, or time spent / time budget) instead of a step number. The
papers train at a constant rate; on a short budget, decaying the second half settles G where the constant rate
keeps it moving (docs/quality.md: WGAN on MNIST, domain FD 13.7 instead of 16.6 after 2,000 steps).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gan_models.step import GAN


def lr_scale(progress: float, decay_from: float, final_scale: float) -> float:
    """1 until ``progress`` reaches ``decay_from``, then linear to ``final_scale`` at progress 1."""
    if decay_from >= 1.0 or progress <= decay_from:
        return 1.0
    done = min(1.0, (progress - decay_from) / (1.0 - decay_from))
    return 1.0 - (1.0 - final_scale) * done


def set_learning_rates(gan: "GAN", scale: float) -> None:
    """The spec's base rates times ``scale``, on both optimizers (their other state is untouched)."""
    for optimizer, base in ((gan.opt_g, gan.spec.lr_g), (gan.opt_d, gan.spec.lr_d)):
        for group in optimizer.param_groups:
            group["lr"] = base * scale
