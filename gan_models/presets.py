"""The papers' hyper-parameters, in one table. ``--model NAME`` picks a row; every value stays overridable.

- dcgan:   Radford et al. 2015 - Adam beta1 0.5, non-saturating BCE, batch norm in G and D; plus InfoGAN's
           10-category latent code (Chen et al. 2016, ``gan_models.latent_code``) by default: on the CPU budget domain
           FD 7.0 instead of 10.1, precision 0.74 / 0.75, recall 0.74 / 0.80 (docs/quality.md).
           ``--code-categories 0`` gives the paper's DCGAN alone. Learning rate 8e-4 instead of the paper's 2e-4
           (dcgan and cgan alike): measured through ``run`` on a 2-core fp32 CPU (docs/quality.md), cgan after 3,200
           steps reached domain FD 0.83 with 8e-4, 0.93 with 5e-4, 3.8-4.0 with 2e-4 (label accuracy 0.985 / 0.981 /
           0.95); dcgan in the default budget 4.64 / 5.02 / 7.89 (three seeds; the spread is the code's alignment
           with the digits, ``code_purity`` 0.61 / 0.48 / 0.32) with 8e-4, 6.47 with 5e-4, 6.12 with 1.2e-3, 9.43
           with 2e-4.
           ``--lr-g 2e-4 --lr-d 2e-4`` (``DCGAN_PAPER_LR``) is the paper's value.
- cgan:    Mirza & Osindero 2014 on the DCGAN body - the label enters G (with z) and D (with the image);
           plus the auxiliary class term (Odena et al. 2017) by default, see the row.
- wgan:    Arjovsky et al. 2017, Algorithm 1 - RMSProp, clip c = 0.01, n_critic = 5, no log, no sigmoid. Learning
           rate 1e-3 instead of the paper's 5e-5: measured on MNIST at batch 64 (docs/quality.md), the paper's rate
           draws blobs for thousands of steps, 2e-4 reached domain FD 28.6 after 1,000 steps, 5e-4 21.0, 1e-3 17.6,
           2e-3 28.3. ``--lr-g 5e-5 --lr-d 5e-5`` (``WGAN_PAPER_LR``) is the paper's value. The rates decay
           linearly over the second half of the run to 5% (``lr_decay_from`` 0.5, ``gan_models.schedule``; the
           paper's constant rate is ``--lr-decay-from 1``): domain FD 13.7 instead of 16.6 after 2,000 steps.
- wgan-gp: Gulrajani et al. 2017, Algorithm 1 - Adam betas (0.5, 0.9), lambda = 10, n_critic = 5, no batch norm in
           the critic (the penalty is per sample). Learning rate 8e-4 instead of the paper's 1e-4: measured on MNIST
           at batch 64 (docs/quality.md), step-matched, domain FD after 1,750 steps 23.1 with 1e-4, 10.5 with 3e-4,
           8.1 with 5e-4; through `run` (its default budget, two seeds) 5.25 / 5.29 with 8e-4, 5.98 / 7.63 with
           5e-4, 15.1 with the paper's rate (an earlier stop).
           ``--lr-g 1e-4 --lr-d 1e-4`` (``WGAN_GP_PAPER_LR``) is the paper's value.

Every unconditional row can take InfoGAN's categorical code (``model.code_categories``, ``--code-categories K``);
only dcgan has it by default: with WGAN it cost recall (0.45-0.51), with WGAN-GP its categories did not line up
with the digits at the CPU's step counts (docs/quality.md). The paper's continuous codes (``--code-continuous 2``)
and a stronger term (``--code-weight 3``) did not make dcgan's categories line up more reliably across seeds.
"""
from __future__ import annotations

import copy

DCGAN_PAPER_LR = 2e-4
WGAN_PAPER_LR = 5e-5
WGAN_GP_PAPER_LR = 1e-4

_DCGAN_OPTIM = {"optimizer": "adam", "lr_g": 8e-4, "lr_d": 8e-4, "beta1": 0.5, "beta2": 0.999,
                "n_critic": 1, "clip_value": None, "gp_weight": 0.0}

PRESETS: dict[str, dict] = {
    "dcgan": {
        "model": {"objective": "bce", "conditional": False, "critic_batchnorm": True, "aux_class_weight": 0.0,
                  "code_categories": 10},
        "optim": dict(_DCGAN_OPTIM),
    },
    "cgan": {
        # aux_class_weight 1.0: the auxiliary class term (AC-GAN) on top of the paper's conditioning; on a CPU
        # budget it lifts label accuracy from ~0.85 to >0.9. --aux-class-weight 0 gives the paper's cGAN alone.
        "model": {"objective": "bce", "conditional": True, "critic_batchnorm": True, "aux_class_weight": 1.0},
        "optim": dict(_DCGAN_OPTIM),
    },
    "wgan": {
        "model": {"objective": "wasserstein", "conditional": False, "critic_batchnorm": True, "aux_class_weight": 0.0},
        "optim": {"optimizer": "rmsprop", "lr_g": 1e-3, "lr_d": 1e-3, "beta1": 0.0, "beta2": 0.999,
                  "n_critic": 5, "clip_value": 0.01, "gp_weight": 0.0, "lr_decay_from": 0.5},
    },
    "wgan-gp": {
        "model": {"objective": "wasserstein-gp", "conditional": False, "critic_batchnorm": False, "aux_class_weight": 0.0},
        "optim": {"optimizer": "adam", "lr_g": 8e-4, "lr_d": 8e-4, "beta1": 0.5, "beta2": 0.9,
                  "n_critic": 5, "clip_value": None, "gp_weight": 10.0},
    },
}


def preset(name: str) -> dict:
    return copy.deepcopy(PRESETS[name])
