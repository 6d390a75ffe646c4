"""Conditional GAN (Mirza & Osindero 2014): the label y is an extra input of BOTH networks.

- G sees ``[z, onehot(y)]``: the condition enters with the noise.
- D sees ``[x, onehot(y) as constant planes]``: the condition enters with the image.

Conditioning is orthogonal to the objective: any objective (BCE, Wasserstein, Wasserstein-GP) can be
combined with it. The optional auxiliary classifier (the AC-GAN idea, Odena et al. 2017) is a separate
label-blind network; its cross-entropy on G's samples pushes them toward the requested class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def generator_input(z: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None) -> torch.Tensor:
    """Noise (and the one-hot condition) as a 1x1 'image' that the first transposed convolution projects."""
    if num_classes is not None:
        if labels is None:
            raise ValueError("a conditional generator needs labels")
        z = torch.cat([z, F.one_hot(labels, num_classes).to(z.dtype)], dim=1)
    return z[:, :, None, None]


def discriminator_input(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None) -> torch.Tensor:
    """The image with the one-hot condition broadcast as ``num_classes`` constant planes."""
    if num_classes is None:
        return images
    if labels is None:
        raise ValueError("a conditional discriminator needs labels")
    batch, _, height, width = images.shape
    planes = F.one_hot(labels, num_classes).to(images.dtype)[:, :, None, None].expand(batch, num_classes, height, width)
    return torch.cat([images, planes], dim=1)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for this conditional model, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


class AuxiliaryClassifier(nn.Module):
    """A label-blind classifier on images, trained on real data in the discriminator phase.

    It must not see the label (a classifier that reads the label planes learns nothing about the image),
    so it is its own small network rather than a head on the conditional discriminator.
    """

    def __init__(self, body: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Conv2d(features, num_classes, kernel_size=body.final_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images)).flatten(1)
