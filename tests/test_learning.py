"""Learning happens: a short seeded single-process run on real MNIST measurably improves the samples."""
import itertools

import numpy as np
import pytest
import torch

from gan_models import GANSpec, build_gan, train_step
from gan_models.sampling import generate
from pipelines.config import DataConfig
from pipelines.data.sources import open_source


@pytest.fixture(scope="module")
def mnist():
    source = open_source(DataConfig(dataset="mnist"))
    rows = list(itertools.islice(source.iter_split("train"), 6000))
    images = torch.from_numpy(np.stack([img for img, _ in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.tensor([label for _, label in rows])
    return images, labels


def _nearest_real_distance(fake, real):
    return torch.cdist(fake.flatten(1), real.flatten(1)).min(dim=1).values.mean().item()


def test_short_run_brings_samples_toward_the_data(mnist):
    images, labels = mnist
    torch.manual_seed(0)
    gan = build_gan(GANSpec(resolution=28, channels=1, nz=32, ngf=16, ndf=16, conditional=True), seed=0)
    z = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    fixed_labels = torch.arange(256) % 10
    reference = images[:3000]
    before = _nearest_real_distance(generate(gan.generator, z, fixed_labels), reference)

    def batches():
        gen = torch.Generator().manual_seed(0)
        while True:
            for idx in torch.randperm(len(images), generator=gen).split(64):
                if len(idx) == 64:
                    yield images[idx], labels[idx]

    stream = batches()
    for _ in range(250):
        stats = train_step(gan, stream)
    after = _nearest_real_distance(generate(gan.generator, z, fixed_labels), reference)
    assert after < 0.75 * before, (before, after)
    # and D can no longer separate real from fake perfectly
    assert stats["d_fake"].item() > -8
