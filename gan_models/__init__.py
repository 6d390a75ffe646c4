"""The science: DCGAN, conditional GAN, WGAN and WGAN-GP, with no Ray, MLflow or CLI in sight."""
from gan_models.networks import SUPPORTED_RESOLUTIONS, Discriminator, Generator, init_weights
from gan_models.objectives import NonSaturatingBCE, Wasserstein, WassersteinGP, make_objective
from gan_models.presets import PRESETS
from gan_models.step import GAN, GANSpec, build_gan, train_step, unwrap

__all__ = [
    "GAN", "GANSpec", "PRESETS", "SUPPORTED_RESOLUTIONS", "Discriminator", "Generator", "NonSaturatingBCE",
    "Wasserstein", "WassersteinGP", "build_gan", "init_weights", "make_objective", "train_step", "unwrap",
]
