"""DCGAN architecture rules (Radford et al. 2015), checked on the built networks for every supported geometry."""
import pytest
import torch
from torch import nn

from gan_models import Discriminator, Generator, init_weights
from gan_models.networks import SUPPORTED_RESOLUTIONS

GEOMETRIES = [(r, c) for r in SUPPORTED_RESOLUTIONS for c in (1, 3)]


def _nets(resolution, channels, num_classes=None, batchnorm=True):
    torch.manual_seed(0)
    g = Generator(nz=32, channels=channels, resolution=resolution, ngf=16, num_classes=num_classes)
    d = Discriminator(channels=channels, resolution=resolution, ndf=16, batchnorm=batchnorm, num_classes=num_classes)
    g.apply(init_weights)
    d.apply(init_weights)
    return g, d


@pytest.mark.parametrize("resolution,channels", GEOMETRIES)
def test_shapes_and_output_range(resolution, channels):
    g, d = _nets(resolution, channels)
    z = torch.randn(5, 32) * 10  # large inputs would escape [-1, 1] without the Tanh
    images = g(z)
    assert images.shape == (5, channels, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images).shape == (5,)


@pytest.mark.parametrize("resolution,channels", GEOMETRIES)
def test_no_pooling_and_no_hidden_linear_layers(resolution, channels):
    for net in _nets(resolution, channels):
        kinds = {type(m) for m in net.modules()}
        assert not any(issubclass(k, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
                       for k in kinds)
        assert nn.Linear not in kinds
    g, d = _nets(resolution, channels)
    strides = [m.stride for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert strides[:-1] and all(s == (2, 2) for s in strides[:-1]), "D downsamples with strided convolutions"
    up = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(m.stride == (2, 2) for m in up[1:]), "G upsamples with fractionally-strided convolutions"


def _ordered_layers(net):
    return [m for m in net.modules() if not list(m.children())]


def test_batchnorm_placement_and_activations():
    g, d = _nets(64, 3)
    g_layers, d_layers = _ordered_layers(g), _ordered_layers(d)
    # G: BN after every transposed conv except the output one, ReLU inside, Tanh on the output.
    assert isinstance(g_layers[-1], nn.Tanh) and isinstance(g_layers[-2], nn.ConvTranspose2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g_layers) == sum(isinstance(m, nn.ConvTranspose2d) for m in g_layers) - 1
    assert all(isinstance(m, nn.ReLU) for m in g_layers if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
    # D: no BN right after the input conv, LeakyReLU(0.2) everywhere, no sigmoid anywhere.
    assert isinstance(d_layers[0], nn.Conv2d) and isinstance(d_layers[1], nn.LeakyReLU)
    assert all(m.negative_slope == 0.2 for m in d_layers if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, (nn.Sigmoid, nn.ReLU)) for m in d_layers)
    assert any(isinstance(m, nn.BatchNorm2d) for m in d_layers)


def test_critic_without_batchnorm_for_gradient_penalty():
    _, d = _nets(32, 1, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())


def test_init_statistics():
    g, d = _nets(64, 3)
    weights = torch.cat([m.weight.flatten() for net in (g, d) for m in net.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    bn = torch.cat([m.weight.flatten() for net in (g, d) for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.std().item() == pytest.approx(0.02, rel=0.2)


def test_unsupported_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="resolution 48 is not supported; use one of"):
        Generator(nz=8, channels=1, resolution=48)
