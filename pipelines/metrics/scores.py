"""Metrics over the domain classifier's class posteriors.

- classifier score: the Inception-score analogue ``exp(E_x KL(p(y|x) || p(y)))``, in ``splits`` chunks (mean, std).
  Between 1 and ``num_classes``; higher = confident and diverse.
- label accuracy (conditional models): how often the classifier's argmax equals the requested label.
- code purity (InfoGAN-coded models): how well G's own categories line up with the dataset's classes; the share of
  samples whose predicted class is the most common one of their category (1 = every category is one class).
- class histogram KL: ``KL(real_hist || sample_hist)`` of the classifier's predicted classes, with additive
  smoothing so a dropped class gives a large finite value (mode-dropping signal; 0 = same class balance).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _np(a: Any, dtype=np.float64) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=dtype)


def classifier_score(probs: Any, splits: int = 1, eps: float = 1e-12) -> tuple[float, float]:
    p = _np(probs)
    if p.ndim != 2 or p.shape[0] < splits:
        raise ValueError(f"classifier_score needs N×K probabilities with N >= splits ({splits}), got {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(py + eps))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def label_accuracy(probs_or_logits: Any, requested_labels: Any) -> float:
    p = _np(probs_or_logits)
    y = _np(requested_labels, np.int64).reshape(-1)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} requested labels")
    keep = y >= 0
    if not keep.any():
        return float("nan")
    return float((p[keep].argmax(axis=1) == y[keep]).mean())


def code_purity(probs_or_logits: Any, codes: Any) -> tuple[float, int]:
    """(purity, how many distinct classes are some category's majority) of samples generated with ``codes``."""
    predicted = _np(probs_or_logits).argmax(axis=1)
    c = _np(codes, np.int64).reshape(-1)
    if predicted.shape[0] != c.shape[0]:
        raise ValueError(f"{predicted.shape[0]} predictions for {c.shape[0]} codes")
    agree, majorities = 0, set()
    for k in np.unique(c):
        counts = np.bincount(predicted[c == k])
        agree += int(counts.max())
        majorities.add(int(counts.argmax()))
    return agree / max(c.shape[0], 1), len(majorities)


def class_histogram(predicted: Any, num_classes: int) -> np.ndarray:
    """Class frequencies (sum 1) of predicted labels, or of argmax of N×K probabilities."""
    a = _np(predicted)
    labels = a.argmax(axis=1) if a.ndim == 2 else a.astype(np.int64)
    counts = np.bincount(labels[labels >= 0].astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1)


def class_kl(real_hist: Any, sample_hist: Any, num_real: int, num_samples: int, alpha: float = 0.5) -> float:
    """``KL(real || sample)`` of class histograms, each smoothed with ``alpha`` pseudo-counts per class."""
    r = _np(real_hist) * num_real + alpha
    s = _np(sample_hist) * num_samples + alpha
    r, s = r / r.sum(), s / s.sum()
    return float((r * (np.log(r) - np.log(s))).sum())


def per_class_frechet(
    generated_features: Any,
    generated_labels: Any,
    real_features: Any,
    real_labels: Any,
    num_classes: int,
    min_samples: int = 2,
) -> dict[int, float]:
    """Fréchet distance per class: generated samples of requested label k vs real samples of label k.

    Classes with fewer than ``min_samples`` on either side are left out. With fewer samples per class than feature
    dimensions the covariances are singular and the values are biased upward: compare equal sample counts only.
    """
    from pipelines.metrics.distances import frechet_distance_from_features

    g, r = _np(generated_features), _np(real_features)
    gy, ry = _np(generated_labels, np.int64).reshape(-1), _np(real_labels, np.int64).reshape(-1)
    out: dict[int, float] = {}
    for k in range(num_classes):
        gk, rk = g[gy == k], r[ry == k]
        if len(gk) >= min_samples and len(rk) >= min_samples:
            out[k] = frechet_distance_from_features(gk, rk)
    return out
