"""DCGAN generator and discriminator (Radford et al. 2015), sized from (resolution, channels).

The paper's architecture guidelines, each in one place below:
1. No pooling: D downsamples with strided convolutions, G upsamples with fractionally-strided
   (transposed) convolutions.                                        -> ``_down`` / ``_up``
2. No fully connected hidden layers: G's first layer is a transposed convolution that projects the
   1x1 noise to a ``base x base`` map, D's last layer a ``base x base`` convolution to one score.
                                                                     -> ``Generator.project`` / ``Discriminator.score``
3. Batch norm in both networks, except on G's output layer and D's input layer.
                                                                     -> ``norm=`` arguments below
4. ReLU in G with Tanh on the output; LeakyReLU(0.2) in D.            -> ``_up`` / ``_down`` / ``to_image``
5. Weights drawn from N(0, 0.02).                                    -> ``init_weights``

D returns a raw score (no sigmoid): the objective decides what it means. The BCE objective applies the
sigmoid inside a numerically stable loss; the Wasserstein objectives use the score as is (WGAN's critic).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gan_models.conditioning import discriminator_input, generator_input
from gan_models.latent_code import check_room, code_input

# resolution -> size of the smallest feature map; every other map doubles from there.
BASE_SIZE = {28: 7, 32: 4, 64: 4}
SUPPORTED_RESOLUTIONS = tuple(BASE_SIZE)


def _stages(resolution: int) -> tuple[int, int]:
    if resolution not in BASE_SIZE:
        raise ValueError(f"resolution {resolution} is not supported; use one of {SUPPORTED_RESOLUTIONS}")
    base = BASE_SIZE[resolution]
    return base, int(math.log2(resolution // base))


def _up(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True)]


def _down(in_ch: int, out_ch: int, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class Generator(nn.Module):
    def __init__(self, nz: int, channels: int, resolution: int, ngf: int = 64, num_classes: int | None = None,
                 code_categories: int = 0):
        super().__init__()
        base, n_up = _stages(resolution)
        if code_categories and num_classes:
            raise ValueError("a generator takes a class label or a latent code, not both")
        check_room(nz, code_categories)
        self.nz, self.channels, self.resolution, self.num_classes = nz, channels, resolution, num_classes
        self.code_categories = code_categories
        width = ngf * 2 ** (n_up - 1)
        in_ch = nz + (num_classes or 0) + code_categories
        self.project = nn.Sequential(
            nn.ConvTranspose2d(in_ch, width, base, stride=1, padding=0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )
        body: list[nn.Module] = []
        for _ in range(n_up - 1):
            body += _up(width, width // 2)
            width //= 2
        self.body = nn.Sequential(*body)
        # Output layer: no batch norm, Tanh so that images live in [-1, 1] like the normalized data.
        self.to_image = nn.Sequential(nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1, bias=False), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.code_categories:  # InfoGAN's categorical code, read from z (gan_models.latent_code)
            z = code_input(z, self.code_categories)
        return self.to_image(self.body(self.project(generator_input(z, labels, self.num_classes))))


class DiscriminatorBody(nn.Module):
    """Strided convolutions from the image down to a ``base x base`` feature map."""

    def __init__(self, in_channels: int, resolution: int, ndf: int, batchnorm: bool):
        super().__init__()
        base, n_down = _stages(resolution)
        self.final_size = base
        # Input layer: no batch norm (guideline 3).
        layers = _down(in_channels, ndf, norm=False)
        width = ndf
        for _ in range(n_down - 1):
            layers += _down(width, width * 2, norm=batchnorm)
            width *= 2
        self.layers = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(nn.Module):
    """D for DCGAN/cGAN, the critic for WGAN/WGAN-GP: same body, raw score out (no sigmoid)."""

    def __init__(self, channels: int, resolution: int, ndf: int = 64, batchnorm: bool = True,
                 num_classes: int | None = None):
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.body = DiscriminatorBody(channels + (num_classes or 0), resolution, ndf, batchnorm)
        self.score = nn.Conv2d(self.body.out_channels, 1, self.body.final_size, stride=1, padding=0)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(self.body(discriminator_input(images, labels, self.num_classes))).flatten()


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
