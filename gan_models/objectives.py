"""The three objectives. Each one is a small class: the discriminator/critic loss, the generator loss, and the
constraint that keeps the critic admissible (nothing, weight clipping, or a gradient penalty).

Scores arrive as raw outputs of ``Discriminator`` and are cast to float32 here: losses are reductions over the
batch, where bf16/fp16 lose precision (this is why mixed precision stops at the network boundary).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Critic = Callable[[torch.Tensor], torch.Tensor]


class Objective:
    name = "base"
    #: whether ``discriminator_loss`` needs ``penalty`` terms (only the gradient penalty)
    uses_penalty = False

    def discriminator_loss(self, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator_loss(self, fake_scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def constrain(self, critic: nn.Module) -> None:
        """Applied after every critic update, on every rank, to identical weights: stays identical."""

    def penalty(self, critic: Critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return real.new_zeros(())


class NonSaturatingBCE(Objective):
    """DCGAN / cGAN (Goodfellow et al. 2014): D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z))
    (the non-saturating form, whose gradient does not vanish when D wins early).

    ``softplus(-s) = -log sigmoid(s)``: the sigmoid of D lives here, inside a numerically stable log.
    """

    name = "bce"

    def discriminator_loss(self, real_scores, fake_scores):
        return F.softplus(-real_scores.float()).mean() + F.softplus(fake_scores.float()).mean()

    def generator_loss(self, fake_scores):
        return F.softplus(-fake_scores.float()).mean()


class Wasserstein(Objective):
    """WGAN (Arjovsky et al. 2017): the critic maximises E[f(x)] - E[f(G(z))]; no log, no sigmoid.
    f must be K-Lipschitz: enforced crudely by clipping every critic weight to [-c, c] after each update."""

    name = "wasserstein"

    def __init__(self, clip_value: float | None):
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"clip value must be positive, got {clip_value}")
        self.clip_value = clip_value

    def discriminator_loss(self, real_scores, fake_scores):
        return fake_scores.float().mean() - real_scores.float().mean()

    def generator_loss(self, fake_scores):
        return -fake_scores.float().mean()

    @torch.no_grad()
    def constrain(self, critic: nn.Module) -> None:
        if self.clip_value is None:
            return
        for p in critic.parameters():
            p.clamp_(-self.clip_value, self.clip_value)


class WassersteinGP(Wasserstein):
    """WGAN-GP (Gulrajani et al. 2017): the Lipschitz constraint as a penalty
    lambda * E[(||grad_x f(x_hat)||_2 - 1)^2] on random interpolates x_hat between real and fake samples."""

    name = "wasserstein-gp"
    uses_penalty = True

    def __init__(self, gp_weight: float):
        super().__init__(clip_value=None)
        if gp_weight < 0:
            raise ValueError(f"gradient penalty weight must be >= 0, got {gp_weight}")
        self.gp_weight = gp_weight

    def penalty(self, critic: Critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast: the penalty differentiates a gradient, and half-precision
        # second derivatives underflow.
        with torch.autocast(device_type=real.device.type, enabled=False):
            real, fake = real.float(), fake.float()
            eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
            interpolates = (eps * real + (1 - eps) * fake).requires_grad_(True)
            scores = critic(interpolates).float()
            (grads,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
            norms = grads.flatten(1).norm(2, dim=1)
            return self.gp_weight * ((norms - 1) ** 2).mean()


def make_objective(name: str, clip_value: float | None = None, gp_weight: float = 10.0) -> Objective:
    if name == "bce":
        return NonSaturatingBCE()
    if name == "wasserstein":
        return Wasserstein(clip_value)
    if name == "wasserstein-gp":
        return WassersteinGP(gp_weight)
    raise ValueError(f"unknown objective {name!r}; choose bce, wasserstein or wasserstein-gp")
