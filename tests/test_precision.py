"""Mixed precision and speed options, unit level (no Ray): bf16 autocast keeps parameters, optimizer state and
losses in float32; the WGAN-GP penalty stays float32; clipping holds; fp16 is refused on CPU; channels_last
gives the same results as the default; the prefetcher keeps the checkpoint position exact."""
from __future__ import annotations

import itertools

import pytest
import torch

from gan_models import GANSpec, build_gan, train_step
from gan_models.performance import Prefetcher, apply_options


def batches(batch: int, channels: int, resolution: int, seed: int = 0, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.rand(batch, channels, resolution, resolution, generator=g) * 2 - 1,
               torch.randint(0, classes, (batch,), generator=g))


def small(**kw) -> GANSpec:
    return GANSpec(**{"resolution": 28, "channels": 1, "nz": 16, "ngf": 8, "ndf": 8, **kw})


def _all_fp32(gan) -> None:
    for net in (gan.generator, gan.discriminator):
        for name, p in net.named_parameters():
            assert p.dtype == torch.float32, name
            assert p.grad is None or p.grad.dtype == torch.float32, name
    for opt in (gan.opt_g, gan.opt_d):
        assert opt.state, "the optimizer took no step"
        for state in opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    assert value.dtype == torch.float32, key


@pytest.mark.parametrize("conditional", [False, True])
def test_bf16_step_keeps_parameters_optimizer_state_and_losses_fp32(conditional):
    gan = build_gan(small(precision="bf16", conditional=conditional), seed=0)
    with gan.autocast():  # autocast is really on: G computes in bf16 under it
        assert gan.generator(gan.noise(2), gan.random_labels(2)).dtype == torch.bfloat16
    stats = train_step(gan, batches(8, 1, 28))
    for key in ("d_loss", "g_loss", "d_grad_norm", "g_grad_norm", "d_real", "d_fake"):
        assert stats[key].dtype == torch.float32, key
        assert torch.isfinite(stats[key]), key
    _all_fp32(gan)
    stats = train_step(gan, batches(8, 1, 28, seed=1))
    _all_fp32(gan)


def test_wgan_gp_penalty_is_fp32_under_bf16():
    gan = build_gan(small(precision="bf16", objective="wasserstein-gp", gp_weight=10.0, critic_batchnorm=False,
                          n_critic=2, optimizer="adam", beta2=0.9), seed=0)
    real = torch.rand(4, 1, 28, 28) * 2 - 1
    fake = torch.rand(4, 1, 28, 28).to(torch.bfloat16)
    seen = []
    with gan.autocast():
        penalty = gan.objective.penalty(lambda x: seen.append(x.dtype) or gan.discriminator(x), real, fake)
    assert penalty.dtype == torch.float32 and seen == [torch.float32]
    stats = train_step(gan, batches(4, 1, 28))
    assert stats["gradient_penalty"].dtype == torch.float32 and torch.isfinite(stats["gradient_penalty"])
    _all_fp32(gan)


def test_weight_clipping_holds_under_bf16():
    c = 0.01
    gan = build_gan(small(precision="bf16", objective="wasserstein", clip_value=c, optimizer="rmsprop",
                          lr_d=0.5, lr_g=5e-5, n_critic=2), seed=0)
    stream = batches(8, 1, 28)
    for _ in range(2):
        train_step(gan, stream)
    for name, p in gan.discriminator.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.abs().max() <= c, name  # the big lr would throw weights far out without the clip
    _all_fp32(gan)


def test_fp16_refused_on_cpu_with_a_clear_message():
    with pytest.raises(ValueError, match="bf16"):
        build_gan(small(precision="fp16"), device="cpu")
    build_gan(small(precision="bf16"), device="cpu")


def test_fp16_refused_on_cpu_at_configuration_time():
    from pipelines.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="fp16"):
        build_config("dcgan", overrides={"train": {"precision": "fp16"}})
    assert build_config("dcgan", overrides={"train": {"precision": "fp16", "gpu": True}}).train.precision == "fp16"
    assert build_config("dcgan", overrides={"train": {"precision": "bf16"}}).train.precision == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_gives_the_default_results(precision):
    results = []
    for channels_last in (False, True):
        gan = apply_options(build_gan(small(precision=precision, resolution=32, conditional=True), seed=0),
                            channels_last=channels_last)
        if channels_last:
            conv = gan.discriminator.body.layers[0].weight
            assert conv.is_contiguous(memory_format=torch.channels_last)
        torch.manual_seed(3)
        stats = train_step(gan, batches(8, 1, 32))
        with torch.no_grad():
            torch.manual_seed(4)
            out = gan.generator.eval()(torch.randn(4, 16), torch.arange(4))
        results.append((stats, out))
    (s0, o0), (s1, o1) = results
    assert o0.shape == o1.shape == (4, 1, 32, 32)
    tol = 1e-4 if precision == "fp32" else 3e-2
    for key in ("d_loss", "g_loss"):
        assert torch.allclose(s0[key], s1[key], rtol=tol, atol=tol), key
    assert torch.allclose(o0.float(), o1.float(), atol=10 * tol)


class _Stream:
    """BatchStream's contract: iterator with an ``epoch``/``batch_in_epoch`` resume position."""

    def __init__(self, per_epoch: int = 3):
        self.per_epoch, self.epoch, self.batch_in_epoch, self.count = per_epoch, 0, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch_in_epoch == self.per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.batch_in_epoch += 1
        self.count += 1
        return torch.full((2, 1, 4, 4), float(self.count)), torch.zeros(2, dtype=torch.long)


def test_prefetcher_keeps_order_and_the_position_of_the_consumed_batch():
    plain, pre = _Stream(), Prefetcher(_Stream(), depth=3)
    try:
        for _ in range(7):
            a, b = next(plain), next(pre)
            assert torch.equal(a[0], b[0])
            assert (pre.epoch, pre.batch_in_epoch) == (plain.epoch, plain.batch_in_epoch)
    finally:
        pre.close()


def test_prefetcher_surfaces_reader_errors():
    def failing():
        yield from itertools.islice(batches(2, 1, 4), 2)
        raise RuntimeError("shard unreadable")

    pre = Prefetcher(failing())
    next(pre), next(pre)
    with pytest.raises(RuntimeError, match="shard unreadable"):
        next(pre)
