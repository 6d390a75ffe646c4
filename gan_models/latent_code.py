"""InfoGAN's categorical latent code (Chen et al. 2016), for unconditional models.

A plain generator maps one connected Gaussian onto data made of separate modes (ten digits): whatever it does,
part of the noise lands between two modes and comes out as an ambiguous sample. InfoGAN gives G a discrete input
c ~ Cat(K) next to z and maximises a lower bound of the mutual information I(c; G(z, c)) with a recognition network
Q that guesses c back from the image: L_I = cross-entropy(Q(G(z, c)), c), minimised by G and Q alike. G then has
every reason to give each category a mode of its own. No labels are used: the categories it learns are its own.

- The code is read from the noise: ``c = argmax(z[:K])``. For z ~ N(0, I) that is uniform over the K categories,
  so a generator keeps its ``z -> image`` signature: sampling, evaluation and registered models need no extra
  input, and the same z always gives the same image.                         -> ``latent_code`` / ``code_input``
- G sees ``[z, onehot(c)]``, as a conditional G sees ``[z, onehot(y)]``.    -> ``Generator`` (networks.py)
- A chosen category for the same noise: the largest of the first K entries swapped into place k, which keeps
  z's distribution given c = k (evaluate's code grid, a row per category).     -> ``with_category``
- Continuous codes (the paper's MNIST model has two, beside the ten categories): the ``continuous`` entries of z
  right after the categorical ones. G already sees them (they are part of z); Q regresses them, and the term is
  their Gaussian log-likelihood with unit variance (half the squared error, summed over the codes), as in the
  authors' code. They take smooth factors of the image (slant, width) so that the categories need not.
                                                                             -> ``continuous_code`` / ``information_loss``
- Q is its own small label-blind network (like the AC-GAN classifier, not a head on the critic: a WGAN critic's
  weights are clipped, and Q's are not). It learns c from G's samples in the critic phase; G is scored by it, with
  Q frozen, in the generator phase.                                          -> ``gan_models.step``
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def check_room(nz: int, categories: int) -> None:
    """The code is read from z's first ``categories`` entries: z must have that many."""
    if nz < categories:
        raise ValueError(f"a {categories}-category latent code needs nz >= {categories}, got nz = {nz}")


def latent_code(z: torch.Tensor, categories: int) -> torch.Tensor:
    """The category each noise vector stands for: the index of the largest of its first ``categories`` entries."""
    check_room(z.shape[1], categories)
    return z[:, :categories].argmax(dim=1)


def continuous_code(z: torch.Tensor, categories: int, continuous: int) -> torch.Tensor:
    """The continuous codes of each noise vector: its ``continuous`` entries after the first ``categories``."""
    check_room(z.shape[1], categories + continuous)
    return z[:, categories:categories + continuous]


def information_loss(q_output: torch.Tensor, z: torch.Tensor, categories: int,
                     continuous: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Minus the lower bound of I(c; G(z, c)), up to constants, for Q's output on ``G(z)``: the cross-entropy of the
    categorical code, and (``continuous`` > 0) the unit-variance Gaussian negative log-likelihood of the
    continuous codes (else None)."""
    q_output = q_output.float()
    categorical = F.cross_entropy(q_output[:, :categories], latent_code(z, categories))
    if not continuous:
        return categorical, None
    error = q_output[:, categories:categories + continuous] - continuous_code(z, categories, continuous).float()
    return categorical, 0.5 * error.pow(2).sum(dim=1).mean()


def code_input(z: torch.Tensor, categories: int) -> torch.Tensor:
    """``[z, onehot(c)]``: the noise with its category made explicit."""
    return torch.cat([z, F.one_hot(latent_code(z, categories), categories).to(z.dtype)], dim=1)


def with_category(z: torch.Tensor, categories: int, k: int) -> torch.Tensor:
    """``z`` with every row's category set to ``k``: its largest first-``categories`` entry and entry ``k`` swap."""
    check_room(z.shape[1], categories)
    if not 0 <= k < categories:
        raise ValueError(f"category {k} is outside 0..{categories - 1}")
    z = z.clone()
    rows = torch.arange(z.shape[0])
    top = latent_code(z, categories)
    z[rows, top], z[rows, k] = z[rows, k], z[rows, top].clone()
    return z
