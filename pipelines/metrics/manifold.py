"""k-NN manifold metrics in a feature space.

- precision / recall (Kynkäänniemi et al. 2019, k = 3): a sample lies in a manifold when it falls inside the
  ball of some point of the other set, the ball's radius being that point's distance to its k-th nearest neighbour
  (itself excluded) within its own set (``<=``, as in the authors' code). precision = generated inside the real
  manifold; recall = real inside the generated manifold.
- density / coverage (Naeem et al. 2020, k = 5), with real balls only (strict ``<``, as in the authors' code):
  density = mean over generated of (number of real balls containing it) / k; coverage = fraction of real points
  whose ball contains at least one generated sample.

Distances are computed with ``torch.cdist`` in row chunks, so 10k × 10k never holds more than ``chunk × N``
distances; everything is done in three passes (real-real, generated-generated, real-generated). The values
depend on the sample counts: compare only runs with equal counts.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_tensor(f: Any, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(f) if not isinstance(f, torch.Tensor) else f)
    if t.ndim != 2:
        raise ValueError(f"features must be N×d, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", dtype).contiguous()


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # squared-norm expansion (matmul) is fast; clamp round-off negatives before the sqrt
    d2 = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d2.clamp_min_(0).sqrt_()


def knn_radii(features: Any, ks: tuple[int, ...], chunk: int = 2048, dtype: torch.dtype = torch.float64) -> dict[int, torch.Tensor]:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded), for each k."""
    x = _as_tensor(features, dtype)
    kmax = max(ks)
    if x.shape[0] <= kmax:
        raise ValueError(f"k-NN radii with k = {kmax} need more than {kmax} samples, got {x.shape[0]}")
    out = {k: torch.empty(x.shape[0], dtype=dtype) for k in ks}
    for i in range(0, x.shape[0], chunk):
        d = _cdist(x[i:i + chunk], x)
        # the k+1 smallest include the point itself (distance 0)
        small = torch.topk(d, kmax + 1, dim=1, largest=False, sorted=True).values
        for k in ks:
            out[k][i:i + chunk] = small[:, k]
    return out


def manifold_metrics(
    generated_features: Any,
    real_features: Any,
    pr_k: int = 3,
    dc_k: int = 5,
    chunk: int = 2048,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """precision, recall (k = ``pr_k``), density, coverage (k = ``dc_k``) in one set of passes."""
    g = _as_tensor(generated_features, dtype)
    r = _as_tensor(real_features, dtype)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {g.shape[1]} vs {r.shape[1]}")
    real_r = knn_radii(r, (pr_k, dc_k), chunk, dtype)
    gen_r = knn_radii(g, (pr_k,), chunk, dtype)[pr_k]
    in_real = torch.zeros(g.shape[0], dtype=torch.bool)      # precision
    real_ball_count = torch.zeros(g.shape[0], dtype=torch.int64)  # density
    real_in_gen = torch.empty(r.shape[0], dtype=torch.bool)   # recall
    covered = torch.empty(r.shape[0], dtype=torch.bool)       # coverage
    for i in range(0, r.shape[0], chunk):
        d = _cdist(r[i:i + chunk], g)  # rows: real, cols: generated
        rp = real_r[pr_k][i:i + chunk, None]
        rd = real_r[dc_k][i:i + chunk, None]
        in_real |= (d <= rp).any(0)
        real_ball_count += (d < rd).sum(0)
        real_in_gen[i:i + chunk] = (d <= gen_r[None, :]).any(1)
        covered[i:i + chunk] = d.min(1).values < rd[:, 0]
    return {
        "precision": float(in_real.double().mean()),
        "recall": float(real_in_gen.double().mean()),
        "density": float(real_ball_count.double().mean() / dc_k),
        "coverage": float(covered.double().mean()),
    }


def density_coverage(generated_features: Any, real_features: Any, k: int = 5, chunk: int = 2048) -> tuple[float, float]:
    m = manifold_metrics(generated_features, real_features, pr_k=k, dc_k=k, chunk=chunk)
    return m["density"], m["coverage"]
