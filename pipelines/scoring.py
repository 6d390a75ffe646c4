"""Scoring checkpoints while training, so a run keeps its best generator rather than its last one.

GAN training does not converge to a point: sample quality wanders, and the last checkpoint is often not the best
one. At every checkpoint rank 0 computes a cheap domain Fréchet distance (``score_samples`` generated images
against held-out features cached by the driver) for G as trained and for its moving average
(``gan_models.ema``); the better of the two becomes the checkpoint's ``generator.pt``, and Ray keeps the best
checkpoints by that score next to the latest one (``launch.build_trainer``). ``evaluate`` and ``register`` read
the run's generator from the best checkpoint. Tune trials report the same score to their scheduler.

The cheap FD is biased upward at small N: compare it only with itself, never with ``evaluate``'s ``domain_fd``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from pipelines.files import absolute_path, atomic_write
from pipelines.hooks import Hook, LoopState
from pipelines.training_metrics import CHEAP_FD, CHEAP_FD_AVERAGE, EXPORTED_AVERAGE

# What Ray ranks checkpoints by and what Tune's schedulers read (lower is better): the better of the two FDs.
CHECKPOINT_SCORE = "domain_fd"
# A generator whose FD is not finite (collapsed to NaN) still gets a score that ranks it last.
WORST_SCORE = 1e9

_CACHE: dict[str, Any] = {}


def prepare_reference(cfg, data_path: str, manifest: dict, samples: Optional[int] = None) -> dict:
    """In the driver: the dataset's domain classifier (trained once, cached by manifest hash) and the features of
    ``samples`` (default ``train.score_samples``) held-out images, saved beside it. Absolute paths: workers have
    their own working directory."""
    import torch

    from pipelines.data.reader import load_split
    from pipelines.evaluate import domain_classifier

    classifier, paths = domain_classifier(cfg, data_path, manifest)
    samples = samples or cfg.train.score_samples
    target = Path(paths[0]).with_name(f"real-features-{manifest['manifest_hash'][:16]}-{samples}-{cfg.eval.seed}.pt")
    if not target.is_file():
        images, _ = load_split(data_path, "heldout", limit=samples, seed=cfg.eval.seed)
        features = classifier.features(torch.from_numpy(images)).cpu()
        atomic_write(target, lambda f: torch.save(features, f))
    return {"weights": absolute_path(str(paths[0])), "sidecar": absolute_path(str(paths[1])),
            "real_features": absolute_path(str(target)), "samples": samples}


def _load_reference(reference: dict):
    """The classifier and the real features, loaded once per worker process."""
    import torch

    from pipelines.metrics.classifier import load_classifier

    key = reference["real_features"]
    if key not in _CACHE:
        classifier = load_classifier(Path(reference["weights"]), Path(reference["sidecar"]))
        _CACHE[key] = (classifier, torch.load(key, weights_only=True))
    return _CACHE[key]


def cheap_fd(generator, spec, device, reference: dict) -> float:
    from gan_models.sampling import evaluation_inputs, generate, to_uint8
    from pipelines.metrics.distances import frechet_distance_from_features

    classifier, real = _load_reference(reference)
    z, labels = evaluation_inputs(spec.nz, reference["samples"], seed=0,
                                  num_classes=spec.num_classes if spec.conditional else None)
    fake = to_uint8(generate(generator, z.to(device), labels.to(device) if labels is not None else None))
    fd = frechet_distance_from_features(classifier.features(fake).numpy(), real.numpy())
    return fd if math.isfinite(fd) else WORST_SCORE


class CheckpointScore(Hook):
    """Rank 0, at every checkpoint: the cheap FD of G and of its average (``average``: the loop's
    ``GeneratorAverage`` hook, or None); the better one is exported as the checkpoint's generator."""

    def __init__(self, reference: dict, average: Optional[Hook] = None):
        self.reference, self.average = reference, average
        self.score: Optional[float] = None

    def checkpoint_metrics(self, loop: LoopState) -> dict[str, float]:
        if not loop.is_chief:
            return {}
        gan = loop.gan
        values = {CHEAP_FD: cheap_fd(gan.generator, gan.spec, gan.device, self.reference)}
        loop.exported_generator = None
        if self.average is not None:
            values[CHEAP_FD_AVERAGE] = cheap_fd(self.average.module, gan.spec, gan.device, self.reference)
            if values[CHEAP_FD_AVERAGE] < values[CHEAP_FD]:
                loop.exported_generator = self.average.module
            values[EXPORTED_AVERAGE] = float(loop.exported_generator is not None)
        self.score = min(values[CHEAP_FD], values.get(CHEAP_FD_AVERAGE, math.inf))
        return values

    def report_metrics(self, loop: LoopState) -> dict[str, float]:
        return {CHECKPOINT_SCORE: self.score} if loop.is_chief and self.score is not None else {}


def best_checkpoint(result):
    """The best-scored checkpoint Ray kept for a finished run (its latest where none was scored)."""
    scored = [(metrics[CHECKPOINT_SCORE], ckpt) for ckpt, metrics in (result.best_checkpoints or [])
              if metrics.get(CHECKPOINT_SCORE) is not None]
    return min(scored, key=lambda pair: pair[0])[1] if scored else result.checkpoint
