"""Fréchet distance between Gaussian fits and the kernel (MMD) distance, over any feature space.

Both are computed in float64 on N×d feature arrays. The Fréchet distance is
``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)`` (Heusel et al. 2017); KID is the unbiased MMD² with the cubic
polynomial kernel ``k(x, y) = (x·y / d + 1)³`` averaged over random subsets (Bińkowski et al. 2018).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)


def _as_features(f: Any, name: str) -> np.ndarray:
    a = f.detach().cpu().numpy() if hasattr(f, "detach") else np.asarray(f)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an N×d feature array, got shape {a.shape}")
    return a


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64; the covariance uses N - 1."""
    f = _as_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # singular products are handled by the caller (finite check + eps offset)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        out = linalg.sqrtm(a)
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    When ``sqrtm(S1 S2)`` is not finite (near-singular product) both covariances are offset by ``eps·I`` and it is
    retried; a complex result keeps its real part (a large imaginary part is logged: the value is then unreliable).
    Tiny negative results from round-off are clamped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian fits: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        log.warning("Fréchet distance: sqrtm(S1 S2) is not finite (singular product); adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag)) if covmean.size else 0.0
        if imag > 1e-3:
            log.warning("Fréchet distance: sqrtm has an imaginary component of %.3g on its diagonal; the value is "
                        "unreliable (too few samples for the feature dimension?)", imag)
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance_from_features(f1: Any, f2: Any, eps: float = 1e-6) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2), eps=eps)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = x.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid_count_problem(num_generated: int, num_real: int, subset_size: int) -> Optional[str]:
    """Why KID cannot be computed from these sample counts (each side needs ``subset_size``), or None."""
    if num_generated >= subset_size and num_real >= subset_size:
        return None
    return (f"KID needs at least {subset_size} generated and {subset_size} real samples (eval.kid_subset_size = "
            f"{subset_size}), got {num_generated} generated and {num_real} real")


def kernel_distance(
    generated_features: Any,
    real_features: Any,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: (mean, std over subsets) of the unbiased polynomial-kernel MMD².

    Each subset draws ``subset_size`` generated and ``subset_size`` real samples without replacement.
    Raises ``ValueError`` when either side has fewer than ``subset_size`` samples.
    """
    g = _as_features(generated_features, "generated features")
    r = _as_features(real_features, "real features")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {g.shape[1]} vs {r.shape[1]}")
    if subset_size < 2:
        raise ValueError("eval.kid_subset_size must be at least 2")
    problem = kid_count_problem(g.shape[0], r.shape[0], subset_size)
    if problem:
        raise ValueError(f"{problem}; lower eval.kid_subset_size or raise eval.num_samples")
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        xs = g[rng.choice(g.shape[0], subset_size, replace=False)]
        ys = r[rng.choice(r.shape[0], subset_size, replace=False)]
        vals[i] = _poly_mmd2_unbiased(xs, ys)
    return float(vals.mean()), float(vals.std())
