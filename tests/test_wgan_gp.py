"""WGAN-GP (Gulrajani et al. 2017): the gradient penalty, no batch norm in the critic, Adam with betas (0.5, 0.9)."""
import pytest
import torch
from torch import nn

from gan_models import GANSpec, WassersteinGP, build_gan, train_step
from gan_models.presets import WGAN_GP_PAPER_LR, preset
from tests.helpers import constant_batches


def test_penalty_equals_hand_computed_value():
    # Linear critic f(x) = sum(w * x): grad_x f = w everywhere, so the penalty is lambda * (||w|| - 1)^2
    w = torch.tensor([[[[3.0, 4.0]]]])  # ||w|| = 5
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    real, fake = torch.randn(6, 1, 1, 2), torch.randn(6, 1, 1, 2)
    assert WassersteinGP(gp_weight=10.0).penalty(critic, real, fake).item() == pytest.approx(10 * (5 - 1) ** 2)


def test_penalty_on_a_nonlinear_critic_matches_autograd_by_hand():
    torch.manual_seed(0)
    critic = lambda x: (x ** 2).flatten(1).sum(1)  # noqa: E731  grad = 2 x_hat
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    torch.manual_seed(1)
    penalty = WassersteinGP(gp_weight=2.0).penalty(critic, real, fake)
    torch.manual_seed(1)
    eps = torch.rand(4, 1, 1, 1)
    x_hat = eps * real + (1 - eps) * fake
    expected = 2.0 * ((2 * x_hat).flatten(1).norm(dim=1) - 1).pow(2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_preset_and_built_critic():
    p = preset("wgan-gp")
    assert p["optim"]["gp_weight"] == 10.0 and p["optim"]["n_critic"] == 5
    # the paper's betas; the learning rate leaves the paper's 1e-4 (measured, presets), which stays one flag away
    assert (p["optim"]["lr_g"], p["optim"]["lr_d"], p["optim"]["beta1"], p["optim"]["beta2"]) == (8e-4, 8e-4, 0.5, 0.9)
    assert WGAN_GP_PAPER_LR == 1e-4
    gan = build_gan(GANSpec(resolution=32, channels=3, ngf=8, ndf=8, nz=16, objective="wasserstein-gp",
                            critic_batchnorm=False, n_critic=5, gp_weight=10.0, lr_g=1e-4, lr_d=1e-4,
                            beta1=0.5, beta2=0.9), seed=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gan.discriminator.modules())
    assert gan.opt_d.param_groups[0]["betas"] == (0.5, 0.9)
    stats = train_step(gan, constant_batches(8, 3, 32))
    assert stats["gradient_penalty"].item() > 0
    assert "wasserstein_estimate" in stats
