"""Conditional GAN (Mirza & Osindero 2014): the label enters G with the noise and D with the image."""
import pytest
import torch

from gan_models import Discriminator, GANSpec, Generator, build_gan, init_weights, train_step
from tests.helpers import constant_batches


def _nets():
    torch.manual_seed(0)
    g = Generator(nz=16, channels=1, resolution=28, ngf=8, num_classes=10)
    d = Discriminator(channels=1, resolution=28, ndf=8, num_classes=10)
    g.apply(init_weights)
    d.apply(init_weights)
    return g.eval(), d.eval()


def test_generator_output_changes_with_the_label_for_the_same_noise():
    g, _ = _nets()
    z = torch.randn(1, 16).repeat(10, 1)
    with torch.no_grad():
        images = g(z, torch.arange(10))
    diffs = [(images[i] - images[0]).abs().mean().item() for i in range(1, 10)]
    assert min(diffs) > 1e-4


def test_discriminator_sees_the_label():
    _, d = _nets()
    x = torch.rand(1, 1, 28, 28).repeat(10, 1, 1, 1)
    with torch.no_grad():
        scores = d(x, torch.arange(10))
    assert scores.unique().numel() == 10


def test_conditional_nets_need_labels():
    g, d = _nets()
    with pytest.raises(ValueError, match="needs labels"):
        g(torch.randn(2, 16))
    with pytest.raises(ValueError, match="needs labels"):
        d(torch.rand(2, 1, 28, 28))


def test_conditioning_is_orthogonal_to_the_objective():
    # a conditional WGAN-GP, with the auxiliary class term
    spec = GANSpec(resolution=28, channels=1, ngf=8, ndf=8, nz=16, objective="wasserstein-gp", conditional=True,
                   critic_batchnorm=False, n_critic=2, gp_weight=10.0, aux_class_weight=1.0)
    gan = build_gan(spec, seed=0)
    stats = train_step(gan, constant_batches(8, 1, 28))
    assert {"gradient_penalty", "aux_loss_real", "aux_loss_fake"} <= set(stats)


def test_auxiliary_term_pushes_samples_toward_their_label():
    spec = GANSpec(resolution=28, channels=1, ngf=8, ndf=8, nz=16, conditional=True, aux_class_weight=1.0)
    gan = build_gan(spec, seed=0)
    # the auxiliary classifier does not read the label: its input is the image alone
    assert gan.aux_classifier(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_labels_out_of_range_are_refused():
    gan = build_gan(GANSpec(resolution=28, channels=1, ngf=8, ndf=8, nz=16, conditional=True), seed=0)
    batches = constant_batches(4, 1, 28, num_classes=12)
    batches.labels[:] = 11
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        train_step(gan, batches)
