"""The metric registry and the functions that compute a whole set of metrics.

``METRICS`` maps a metric name to a function of a :class:`MetricContext` returning flat ``{name: float}`` values
(one registry entry may give several values, e.g. ``domain_kid`` -> ``domain_kid_mean``, ``domain_kid_std``).
Features and class posteriors are computed once per side and shared by every metric; pass the same ``cache`` dict
to repeated calls against the same real set (Tune reporting, model comparisons) to compute the real side once.

``METRIC_DIRECTION`` / :func:`metric_direction` say whether lower ("min") or higher ("max") is better; values
not listed there (stds, counts, the classifier's accuracy) are informational.

Values are comparable only between evaluations with the same classifier (log ``classifier.fingerprint``), the
same real reference set and the same sample counts (FD, KID's spread, precision/recall/density/coverage depend on N).
Recommended reference: the held-out split (the classifier never saw it, as it never saw generated images);
:func:`real_floor` then measures train-vs-held-out, the value a generator cannot be expected to beat.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from pipelines.config import EvalConfig
from pipelines.errors import MetricsRequestError
from pipelines.metrics import distances, inception, manifold, scores
from pipelines.metrics.classifier import DomainClassifier, as_images, as_labels

log = logging.getLogger(__name__)

MetricFn = Callable[["MetricContext"], dict[str, float]]
METRICS: dict[str, MetricFn] = {}
CONDITIONAL_ONLY: set[str] = set()
CODED_ONLY: set[str] = set()  # generators with InfoGAN's categorical code (gan_models.latent_code)
INCEPTION_METRICS: set[str] = set()

METRIC_DIRECTION: dict[str, str] = {
    "domain_fd": "min",
    "domain_kid_mean": "min",
    "precision": "max",
    "recall": "max",
    "density": "max",  # about 1 when generated matches real; > 1 = samples crowd dense real regions
    "coverage": "max",
    "classifier_score": "max",
    "class_kl": "min",
    "label_accuracy": "max",
    "code_purity": "max",
    "domain_fd_class_mean": "min",
    "inception_fd": "min",
    "inception_kid_mean": "min",
}


def metric_direction(name: str) -> Optional[str]:
    """"min", "max" or None (informational) for any output name, per-class names included."""
    if name in METRIC_DIRECTION:
        return METRIC_DIRECTION[name]
    if name.startswith("domain_fd_class_"):
        return "min"
    return None


def register_metric(name: str, conditional_only: bool = False, uses_inception: bool = False, coded_only: bool = False):
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        if conditional_only:
            CONDITIONAL_ONLY.add(name)
        if coded_only:
            CODED_ONLY.add(name)
        if uses_inception:
            INCEPTION_METRICS.add(name)
        return fn
    return deco


@dataclass
class MetricContext:
    """Inputs of one evaluation and the values derived from them, each computed on first use."""

    generated: torch.Tensor
    generated_labels: Optional[torch.Tensor]
    real: torch.Tensor
    real_labels: Optional[torch.Tensor]
    classifier: DomainClassifier
    cfg: EvalConfig
    conditional: bool
    num_classes: int
    generated_codes: Optional[torch.Tensor] = None  # the InfoGAN category of each generated sample
    cache: dict = field(default_factory=dict)       # real-side values, shareable between calls
    _own: dict = field(default_factory=dict)        # generated-side values, this call only
    timings: dict = field(default_factory=dict)

    def _get(self, store: dict, key: str, make: Callable[[], Any]) -> Any:
        if key not in store:
            t0 = time.perf_counter()
            store[key] = make()
            self.timings[f"prep/{key}"] = self.timings.get(f"prep/{key}", 0.0) + time.perf_counter() - t0
        return store[key]

    def _side(self, real: bool) -> tuple[dict, torch.Tensor]:
        return (self.cache, self.real) if real else (self._own, self.generated)

    def feats_logits(self, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
        store, images = self._side(real)
        return self._get(store, "domain", lambda: self.classifier.features_and_logits(images, self.cfg.batch_size))

    def features(self, real: bool) -> torch.Tensor:
        return self.feats_logits(real)[0]

    def probs(self, real: bool) -> torch.Tensor:
        store, _ = self._side(real)
        return self._get(store, "probs", lambda: torch.softmax(self.feats_logits(real)[1].double(), dim=1))

    def stats(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        store, _ = self._side(real)
        return self._get(store, "stats", lambda: distances.gaussian_stats(self.features(real)))

    def inception_model(self) -> Optional[torch.nn.Module]:
        if "inception_model" not in self.cache:
            self.cache["inception_model"] = load_inception_for(self.cfg)
        return self.cache["inception_model"]

    def inception_features(self, real: bool) -> Optional[torch.Tensor]:
        model = self.inception_model()
        if model is None:
            return None
        store, images = self._side(real)
        n = self.cfg.inception_num_samples or images.shape[0]
        return self._get(store, "inception", lambda: inception.inception_features(model, images[:n]))


def load_inception_for(cfg: EvalConfig) -> Optional[torch.nn.Module]:
    return inception.load_inception(cfg.inception_weights) if cfg.inception else None


# ------------------------------------------------------------------------------------------------ the metrics
@register_metric("domain_fd")
def _domain_fd(ctx: MetricContext) -> dict[str, float]:
    return {"domain_fd": distances.frechet_distance(*ctx.stats(False), *ctx.stats(True))}


@register_metric("domain_kid")
def _domain_kid(ctx: MetricContext) -> dict[str, float]:
    mean, std = distances.kernel_distance(ctx.features(False), ctx.features(True), ctx.cfg.kid_subset_size,
                                          ctx.cfg.kid_num_subsets, seed=ctx.cfg.seed)
    return {"domain_kid_mean": mean, "domain_kid_std": std}


@register_metric("precision_recall")
def _precision_recall(ctx: MetricContext) -> dict[str, float]:
    k = ctx.cfg.precision_recall_k
    m = _manifold(ctx)
    return {"precision": m[("pr", k)]["precision"], "recall": m[("pr", k)]["recall"]}


@register_metric("density_coverage")
def _density_coverage(ctx: MetricContext) -> dict[str, float]:
    k = ctx.cfg.density_coverage_k
    m = _manifold(ctx)
    return {"density": m[("dc", k)]["density"], "coverage": m[("dc", k)]["coverage"]}


def _manifold(ctx: MetricContext) -> dict:
    # one set of distance passes serves both registry entries
    def make() -> dict:
        kp, kd = ctx.cfg.precision_recall_k, ctx.cfg.density_coverage_k
        m = manifold.manifold_metrics(ctx.features(False), ctx.features(True), pr_k=kp, dc_k=kd)
        return {("pr", kp): m, ("dc", kd): m}
    return ctx._get(ctx._own, "manifold", make)


@register_metric("classifier_score")
def _classifier_score(ctx: MetricContext) -> dict[str, float]:
    mean, std = scores.classifier_score(ctx.probs(False), splits=ctx.cfg.classifier_score_splits)
    return {"classifier_score": mean, "classifier_score_std": std}


@register_metric("class_kl")
def _class_kl(ctx: MetricContext) -> dict[str, float]:
    real_hist = scores.class_histogram(ctx.probs(True), ctx.num_classes)
    gen_hist = scores.class_histogram(ctx.probs(False), ctx.num_classes)
    return {"class_kl": scores.class_kl(real_hist, gen_hist, ctx.real.shape[0], ctx.generated.shape[0])}


@register_metric("label_accuracy", conditional_only=True)
def _label_accuracy(ctx: MetricContext) -> dict[str, float]:
    return {"label_accuracy": scores.label_accuracy(ctx.probs(False), ctx.generated_labels)}


@register_metric("code_purity", coded_only=True)
def _code_purity(ctx: MetricContext) -> dict[str, float]:
    purity, classes = scores.code_purity(ctx.probs(False), ctx.generated_codes)
    return {"code_purity": purity, "code_majority_classes": float(classes)}


@register_metric("per_class_fd", conditional_only=True)
def _per_class_fd(ctx: MetricContext) -> dict[str, float]:
    per = scores.per_class_frechet(ctx.features(False), ctx.generated_labels, ctx.features(True), ctx.real_labels,
                                   ctx.num_classes)
    out = {f"domain_fd_class_{k}": v for k, v in per.items()}
    if per:
        out["domain_fd_class_mean"] = float(np.mean(list(per.values())))
    return out


@register_metric("inception_fd", uses_inception=True)
def _inception_fd(ctx: MetricContext) -> dict[str, float]:
    g, r = ctx.inception_features(False), ctx.inception_features(True)
    if g is None or r is None:
        return {}
    return {"inception_fd": distances.frechet_distance_from_features(g, r)}


@register_metric("inception_kid", uses_inception=True)
def _inception_kid(ctx: MetricContext) -> dict[str, float]:
    g, r = ctx.inception_features(False), ctx.inception_features(True)
    if g is None or r is None:
        return {}
    mean, std = distances.kernel_distance(g, r, ctx.cfg.kid_subset_size, ctx.cfg.kid_num_subsets, seed=ctx.cfg.seed)
    return {"inception_kid_mean": mean, "inception_kid_std": std}


DEFAULT_ORDER = tuple(METRICS)


# ---------------------------------------------------------------------------------------------- entry points
def resolve_names(names: Optional[list[str]], cfg: EvalConfig, conditional: bool, coded: bool = False) -> list[str]:
    """The registry entries to run: ``names``, else ``cfg.metrics``, else every one that applies."""
    chosen = list(names) if names is not None else (list(cfg.metrics) if cfg.metrics is not None else None)
    if chosen is None:
        return [n for n in DEFAULT_ORDER
                if (conditional or n not in CONDITIONAL_ONLY) and (coded or n not in CODED_ONLY)
                and (cfg.inception or n not in INCEPTION_METRICS)]
    unknown = [n for n in chosen if n not in METRICS]
    if unknown:
        raise MetricsRequestError(f"unknown metric(s) {unknown} in eval.metrics; known: {', '.join(METRICS)}")
    wrong = [n for n in chosen if n in CONDITIONAL_ONLY and not conditional]
    if wrong:
        raise MetricsRequestError(f"metric(s) {wrong} need a conditional model (model.conditional: true)")
    wrong = [n for n in chosen if n in CODED_ONLY and not coded]
    if wrong:
        raise MetricsRequestError(
            f"metric(s) {wrong} need a generator with a latent code (model.code_categories > 1)")
    return chosen


def check_counts(num_generated: int, num_real: int, cfg: EvalConfig, names: list[str]) -> None:
    """Fail before any expensive work when a metric cannot be computed with these sample counts."""
    n = min(num_generated, num_real)
    problem = distances.kid_count_problem(num_generated, num_real, cfg.kid_subset_size)
    if "domain_kid" in names and problem:
        raise MetricsRequestError(f"{problem}; the real ones are at most eval.num_samples of the dataset's held-out "
                                  "split: lower eval.kid_subset_size, raise eval.num_samples, or prepare more images")
    if "inception_kid" in names and cfg.inception_num_samples and cfg.inception_num_samples < cfg.kid_subset_size:
        raise MetricsRequestError(f"eval.inception_num_samples ({cfg.inception_num_samples}) is below "
                                  f"eval.kid_subset_size ({cfg.kid_subset_size}); raise the first or lower the second")
    k = max(cfg.precision_recall_k, cfg.density_coverage_k)
    if any(m in names for m in ("precision_recall", "density_coverage")) and n <= k:
        raise MetricsRequestError(f"precision/recall/density/coverage with k = {k} need more than {k} samples per "
                                  f"side, got {n}; raise eval.num_samples or prepare more images")
    if n < 2:
        raise MetricsRequestError(f"metrics need at least 2 generated and 2 real images, got {num_generated} and "
                                  f"{num_real}")


def compute_metrics(
    generated: Any,
    generated_labels: Any,
    real: Any,
    real_labels: Any,
    classifier: DomainClassifier,
    cfg: EvalConfig,
    conditional: bool,
    num_classes: int,
    names: Optional[list[str]] = None,
    cache: Optional[dict] = None,
    timings: Optional[dict] = None,
    generated_codes: Any = None,
) -> dict[str, float]:
    """Every requested metric, as flat ``{name: float}``, plus ``num_generated``, ``num_real`` and
    ``classifier_heldout_accuracy``.

    ``generated``/``real``: uint8 N×C×H×W (map generator floats with ``to_uint8``). ``generated_labels``: the
    requested labels of a conditional model. ``generated_codes``: each sample's InfoGAN category, for a coded
    generator (``gan_models.latent_code.latent_code`` of its noise). ``cache``: a dict kept across calls with the
    same ``real`` images. ``timings``: filled with seconds per metric (``metric/<name>``) and per feature pass
    (``prep/<what>``).
    """
    gen = as_images(generated, "generated")
    ref = as_images(real, "real")
    gy = as_labels(generated_labels, gen.shape[0], "generated_labels")
    ry = as_labels(real_labels, ref.shape[0], "real_labels")
    codes = as_labels(generated_codes, gen.shape[0], "generated_codes")
    chosen = resolve_names(names, cfg, conditional, coded=codes is not None)
    check_counts(gen.shape[0], ref.shape[0], cfg, chosen)
    if "label_accuracy" in chosen and gy is None:
        raise ValueError("label_accuracy needs generated_labels (the labels the samples were generated for)")
    if "per_class_fd" in chosen and (gy is None or ry is None):
        raise ValueError("per_class_fd needs generated_labels and real_labels")
    ctx = MetricContext(gen, gy, ref, ry, classifier, cfg, conditional, num_classes, generated_codes=codes,
                        cache=cache if cache is not None else {})
    out: dict[str, float] = {}
    for name in chosen:
        t0 = time.perf_counter()
        out.update(METRICS[name](ctx))
        ctx.timings[f"metric/{name}"] = time.perf_counter() - t0
    out["num_generated"] = float(gen.shape[0])
    out["num_real"] = float(ref.shape[0])
    out["classifier_heldout_accuracy"] = float(classifier.heldout_accuracy)
    if timings is not None:
        timings.update(ctx.timings)
    return out


def compute_cheap_metrics(
    generated: Any,
    real: Any,
    classifier: DomainClassifier,
    cfg: EvalConfig,
    num_samples: Optional[int] = None,
    cache: Optional[dict] = None,
) -> dict[str, float]:
    """``domain_fd`` only, from the first ``num_samples`` generated images (e.g. ``tune.report_samples``), for
    frequent reporting. Keep ``cache`` across reports so the real side is featurised once. Biased upward at small
    N: compare only values computed with the same N, never with the full evaluation's ``domain_fd``."""
    gen = as_images(generated, "generated")
    if num_samples is not None:
        gen = gen[:num_samples]
    return compute_metrics(gen, None, real, None, classifier, cfg, conditional=False,
                           num_classes=classifier.num_classes, names=["domain_fd"], cache=cache)


def reference_subset(images: Any, labels: Any, n: int, seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A seeded subset of ``n`` images (all when fewer), the same for the same inputs and seed."""
    x = as_images(images)
    y = as_labels(labels, x.shape[0])
    if x.shape[0] <= n:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx], (y[idx] if y is not None else None)


def real_floor(
    train_images: Any,
    heldout_images: Any,
    classifier: DomainClassifier,
    cfg: EvalConfig,
    train_labels: Any = None,
    heldout_labels: Any = None,
    conditional: bool = False,
    num_classes: Optional[int] = None,
    names: Optional[list[str]] = None,
    cache: Optional[dict] = None,
    timings: Optional[dict] = None,
) -> dict[str, float]:
    """The same metrics with real train images (a seeded ``eval.num_samples`` subset) in the generated role and the
    held-out images as the reference: the floor a generator cannot be expected to beat. With ``conditional``, the
    train labels play the requested labels. Pass the ``cache`` used for the model's evaluation against the same
    held-out images to featurise them once."""
    gen, gy = reference_subset(train_images, train_labels, cfg.num_samples, cfg.seed)
    return compute_metrics(gen, gy if conditional else None, heldout_images, heldout_labels, classifier, cfg,
                           conditional=conditional, num_classes=num_classes or classifier.num_classes, names=names,
                           cache=cache, timings=timings)
