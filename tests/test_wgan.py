"""WGAN (Arjovsky et al. 2017): no log, no sigmoid, clipping, RMSProp, n_critic critic steps per G step."""
import pytest
import torch
from torch import nn

from gan_models import GANSpec, Wasserstein, build_gan, train_step
from gan_models.presets import WGAN_PAPER_LR, preset
from gan_models.step import critic_iterations
from tests.helpers import constant_batches


def _wgan(**overrides):
    spec = dict(resolution=28, channels=1, ngf=8, ndf=8, nz=16, objective="wasserstein", optimizer="rmsprop",
                lr_g=5e-5, lr_d=5e-5, n_critic=5, clip_value=0.01)
    spec.update(overrides)
    return build_gan(GANSpec(**spec), seed=0)


def test_preset_keeps_the_papers_rules():
    p = preset("wgan")
    # the paper's rules: RMSProp, c = 0.01, n_critic = 5; the learning rate leaves the paper's constant 5e-5
    # (measured, presets): 1e-3, decaying over the second half of the run
    assert p["optim"] == {"optimizer": "rmsprop", "lr_g": 1e-3, "lr_d": 1e-3, "beta1": 0.0, "beta2": 0.999,
                          "n_critic": 5, "clip_value": 0.01, "gp_weight": 0.0, "lr_decay_from": 0.5}
    assert p["model"]["objective"] == "wasserstein"
    assert WGAN_PAPER_LR == 5e-5


def test_critic_warmup_follows_the_reference_code():
    spec = GANSpec(resolution=28, channels=1, objective="wasserstein", clip_value=0.01, n_critic=5, critic_warmup=True)
    schedule = [critic_iterations(spec, step) for step in range(1001)]
    assert schedule[:25] == [100] * 25 and schedule[25:500] == [5] * 475
    assert schedule[500] == 100 and schedule[501] == 5 and schedule[1000] == 100
    assert all(critic_iterations(GANSpec(resolution=28, channels=1, objective="wasserstein", clip_value=0.01,
                                         n_critic=5), step) == 5 for step in range(30))


def test_warmup_step_takes_a_hundred_critic_updates():
    gan = _wgan(critic_warmup=True)
    counts = {"d": 0}
    gan.opt_d.register_step_post_hook(lambda *a: counts.__setitem__("d", counts["d"] + 1))
    batches = constant_batches(8, 1, 28)
    train_step(gan, batches, step=0)
    train_step(gan, batches, step=30)
    assert counts["d"] == 105 and batches.drawn == 105


def test_losses_have_no_log_and_critic_outputs_raw_scores():
    obj = Wasserstein(clip_value=0.01)
    real, fake = torch.tensor([3.0, 1.0]), torch.tensor([-2.0, 0.0])
    assert obj.discriminator_loss(real, fake).item() == pytest.approx(-3.0)  # E[f(fake)] - E[f(real)]
    assert obj.generator_loss(fake).item() == pytest.approx(1.0)
    gan = _wgan()
    assert not any(isinstance(m, nn.Sigmoid) for m in gan.discriminator.modules())
    with torch.no_grad():
        scores = gan.discriminator(torch.rand(4, 1, 28, 28) * 2 - 1)
    assert scores.shape == (4,)


def test_every_critic_weight_clipped_after_each_critic_step():
    gan = _wgan(lr_d=0.5)  # a huge step pushes weights far outside [-c, c] unless clipped
    batches = constant_batches(8, 1, 28)
    train_step(gan, batches)
    for p in gan.discriminator.parameters():
        assert p.abs().max().item() <= 0.01 + 1e-8
    # and the generator is not clipped
    assert max(p.abs().max().item() for p in gan.generator.parameters()) > 0.01


def test_exactly_n_critic_updates_per_generator_update():
    gan = _wgan(n_critic=4)
    counts = {"d": 0, "g": 0}
    gan.opt_d.register_step_post_hook(lambda *a: counts.__setitem__("d", counts["d"] + 1))
    gan.opt_g.register_step_post_hook(lambda *a: counts.__setitem__("g", counts["g"] + 1))
    batches = constant_batches(8, 1, 28)
    for _ in range(3):
        train_step(gan, batches)
    assert counts == {"d": 12, "g": 3}
    assert batches.drawn == 12, "each critic step takes a fresh real batch"


def test_rmsprop_is_the_optimizer():
    gan = _wgan()
    assert isinstance(gan.opt_d, torch.optim.RMSprop) and isinstance(gan.opt_g, torch.optim.RMSprop)
    assert gan.opt_d.param_groups[0]["lr"] == 5e-5


@pytest.mark.parametrize("bad,match", [({"clip_value": -0.1}, "clip value must be positive"),
                                        ({"n_critic": 0}, "n_critic must be >= 1"),
                                        ({"clip_value": None}, "needs a clip value")])
def test_bad_hyperparameters_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        _wgan(**bad)
