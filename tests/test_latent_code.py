"""InfoGAN's categorical latent code (Chen et al. 2016): read from z, fed to G, recovered by Q."""
import json
import math
from dataclasses import asdict

import pytest
import torch

from gan_models import GANSpec, build_gan, train_step
from gan_models.latent_code import code_input, continuous_code, information_loss, latent_code, with_category
from gan_models.step import build_generator, generator_phase
from pipelines.config import ConfigError, build_config
from tests.helpers import constant_batches


def _spec(**kw):
    base = dict(resolution=28, channels=1, ngf=8, ndf=8, nz=16, code_categories=4)
    return GANSpec(**{**base, **kw})


def test_the_code_is_a_uniform_category_read_from_the_noise():
    z = torch.randn(40_000, 16, generator=torch.Generator().manual_seed(0))
    codes = latent_code(z, 4)
    assert torch.equal(codes, latent_code(z.clone(), 4))  # a function of z: the same z, the same code
    share = torch.bincount(codes, minlength=4).float() / len(codes)
    assert share.sub(0.25).abs().max() < 0.01
    x = code_input(z[:3], 4)
    assert x.shape == (3, 20) and torch.equal(x[:, 16:].argmax(1), codes[:3]) and torch.equal(x[:, 16:].sum(1), torch.ones(3))


def test_with_category_sets_the_code_and_keeps_the_noise_it_had():
    z = torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    for k in range(4):
        moved = with_category(z, 4, k)
        assert torch.equal(latent_code(moved, 4), torch.full((500,), k))
        assert torch.equal(moved[:, 4:], z[:, 4:])  # only the code's entries move, and only by a swap
        assert torch.equal(moved[:, :4].sort(1).values, z[:, :4].sort(1).values)
        already = latent_code(z, 4) == k
        assert torch.equal(moved[already], z[already])
    with pytest.raises(ValueError, match="outside 0..3"):
        with_category(z, 4, 4)


def test_generator_takes_noise_alone_and_its_output_follows_the_code():
    g = build_generator(_spec()).eval()
    assert g.project[0].in_channels == 16 + 4
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    other = z.clone()
    top = int(latent_code(z, 4))
    other[0, (top + 1) % 4] = z[0, top] + 1.0  # another category, every other entry unchanged
    with torch.no_grad():
        same, moved = g(torch.cat([z, z])), g(other)
    assert torch.equal(same[0], same[1])
    # the one-hot input switched: the image changes by more than the small change of z alone would make
    plain = build_generator(_spec(code_categories=0)).eval()
    assert plain.project[0].in_channels == 16
    assert (moved - same[:1]).abs().mean() > 1e-4


def test_q_learns_the_code_in_the_critic_phase_and_g_learns_to_show_it():
    gan = build_gan(_spec(), seed=0)
    assert gan.aux_classifier(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    first = train_step(gan, constant_batches(32, 1, 28))
    assert {"code_loss_q", "code_loss_g"} <= set(first) and "aux_loss_real" not in first
    for step in range(1, 80):
        last = train_step(gan, constant_batches(32, 1, 28), step)
    # from chance (log 4 = 1.39) to a legible code
    assert float(first["code_loss_g"]) > 0.8 * math.log(4)
    assert float(last["code_loss_g"]) < 0.5 * math.log(4)


def test_q_is_not_updated_by_the_generator_phase():
    gan = build_gan(_spec(), seed=0)
    before = [p.detach().clone() for p in gan.aux_classifier.parameters()]
    g_before = [p.detach().clone() for p in gan.generator.parameters()]
    stats = generator_phase(gan, batch=8)
    assert "code_loss_g" in stats
    assert all(torch.equal(a, b) for a, b in zip(before, gan.aux_classifier.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, gan.generator.parameters()))


def test_the_code_works_with_every_objective():
    for kw in (dict(objective="wasserstein", optimizer="rmsprop", clip_value=0.01, n_critic=2),
               dict(objective="wasserstein-gp", critic_batchnorm=False, gp_weight=10.0, n_critic=2)):
        gan = build_gan(_spec(**kw), seed=0)
        stats = train_step(gan, constant_batches(8, 1, 28))
        assert math.isfinite(float(stats["code_loss_g"]))
        if kw["objective"] == "wasserstein":  # Q is its own network: the critic's clipping does not reach it
            assert max(p.abs().max() for p in gan.discriminator.parameters()) <= 0.01 + 1e-7
            assert max(p.abs().max() for p in gan.aux_classifier.parameters()) > 0.01


def test_the_information_term_scores_q_on_the_category_and_the_continuous_codes():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(continuous_code(z, 4, 2), z[:, 4:6])
    perfect = torch.cat([torch.nn.functional.one_hot(latent_code(z, 4), 4) * 50.0, z[:, 4:6]], dim=1)
    categorical, continuous = information_loss(perfect, z, 4, 2)
    assert float(categorical) < 1e-6 and float(continuous) == 0.0
    blind = torch.zeros(64, 6)  # guesses nothing: chance for the category, the prior's mean for the codes
    categorical, continuous = information_loss(blind, z, 4, 2)
    assert float(categorical) == pytest.approx(math.log(4), rel=1e-6)
    assert float(continuous) == pytest.approx(float(0.5 * z[:, 4:6].pow(2).sum(1).mean()), rel=1e-6)
    assert information_loss(blind[:, :4], z, 4)[1] is None  # no continuous code: no term


def test_q_learns_the_continuous_codes_and_g_learns_to_show_them():
    gan = build_gan(_spec(code_continuous=2), seed=0)
    assert gan.aux_classifier(torch.rand(2, 1, 28, 28)).shape == (2, 4 + 2)
    first = train_step(gan, constant_batches(32, 1, 28))
    assert {"code_loss_g", "code_continuous_loss_q", "code_continuous_loss_g"} <= set(first)
    for step in range(1, 80):
        last = train_step(gan, constant_batches(32, 1, 28), step)
    # from the prior's spread (0.5 * E|c|^2 = 1 for two unit Gaussians) to codes Q reads back
    assert float(first["code_continuous_loss_g"]) > 0.6
    assert float(last["code_continuous_loss_g"]) < 0.5 * float(first["code_continuous_loss_g"])
    assert float(last["code_loss_g"]) < 0.5 * math.log(4)


@pytest.mark.parametrize("override, message", [
    ({"model": {"conditional": True, "code_categories": 10}}, "unconditional models"),
    ({"model": {"code_categories": 1}}, "one category carries no information"),
    ({"model": {"nz": 8, "code_categories": 10}}, "needs nz >= 10"),
    ({"model": {"nz": 11, "code_categories": 10, "code_continuous": 2}}, "a latent code of 12 entries .*needs nz >= 12"),
    ({"model": {"code_categories": 0, "code_continuous": 2}}, "needs a categorical code beside it"),
])
def test_config_refuses_codes_that_cannot_work(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("dcgan", overrides=override)


def test_code_flows_from_the_config_to_the_spec():
    cfg = build_config("wgan", overrides={"model": {"code_categories": 6, "code_weight": 0.5}})
    spec = cfg.gan_spec(resolution=28, channels=1, num_classes=10)
    assert (spec.code_categories, spec.code_weight) == (6, 0.5)
    assert build_config("wgan", overrides={"model": {"code_categories": 0}}).gan_spec(28, 1, 10).code_categories == 0
    cfg = build_config("dcgan", overrides={"model": {"code_continuous": 2}})
    assert cfg.gan_spec(resolution=28, channels=1, num_classes=10).code_continuous == 2
    # the paper's DCGAN, one flag away, whatever continuous codes the preset has
    assert build_config("dcgan", overrides={"model": {"code_categories": 0}}).gan_spec(28, 1, 10).code_continuous == 0


def test_dcgan_has_the_code_by_default_and_the_papers_model_is_one_flag_away(tmp_path):
    assert build_config("dcgan").model.code_categories == 10
    assert build_config("dcgan", overrides={"model": {"code_categories": 0}}).model.code_categories == 0
    for name in ("wgan", "wgan-gp", "cgan"):
        assert build_config(name).model.code_categories == 0
    # a conditional DCGAN from a YAML file: the label is its code, the preset's latent code gives way
    yaml_file = tmp_path / "cond.yaml"
    yaml_file.write_text("model:\n  conditional: true\n")
    cfg = build_config("dcgan", yaml_path=yaml_file)
    assert cfg.model.conditional and cfg.model.code_categories == 0
    # ... but one asked for explicitly is refused, with the reason
    with pytest.raises(ConfigError, match="unconditional models"):
        build_config("dcgan", yaml_path=yaml_file, overrides={"model": {"code_categories": 10}})


def test_a_checkpoint_of_another_layout_is_refused_by_name(tmp_path):
    """A run resumed into a model its checkpoint does not fit (here: a coded model from a checkpoint of one without
    the code, whose Q it lacks) gets a CheckpointError that says so and what to do, not a state-dict traceback."""
    from pipelines.checkpoints import CONFIG_FILE, CheckpointError, load_generator, restore, write_checkpoint

    write_checkpoint(tmp_path, build_gan(_spec(code_categories=0), seed=0), {"step": 3, "epoch": 0, "batch_in_epoch": 3},
                     {}, [], {})
    with pytest.raises(CheckpointError, match="does not fit this model.*start a new run"):
        restore(build_gan(_spec(), seed=1), tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore(build_gan(_spec(code_categories=0, ngf=16), seed=1), tmp_path)  # another width
    assert restore(build_gan(_spec(code_categories=0), seed=2), tmp_path)[0]["step"] == 3
    # evaluate/register's loader: a generator.pt beside another checkpoint's config.json
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"gan_spec": asdict(_spec())}))
    with pytest.raises(CheckpointError, match="does not fit this model.*must come from the same checkpoint"):
        load_generator(tmp_path)
