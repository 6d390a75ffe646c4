"""The domain classifier: a small CNN trained on the labeled train split, whose penultimate layer is the feature
space of the domain metrics (``domain_fd``, KID, precision/recall, ...) and whose softmax drives the label metrics.

Every image, real or generated, enters through :func:`as_images` (uint8 N×C×H×W); generators' floats in [-1, 1] go
through :func:`to_uint8` first, so both sides see the identical quantisation and normalisation.

Metric values are comparable only between evaluations that used the same classifier weights: the classifier is
cached per dataset manifest hash (:func:`load_or_train_classifier`) and its ``fingerprint`` (sha256 of the weights)
should be logged with the metrics.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gan_models.sampling import from_uint8
from pipelines.files import atomic_write

log = logging.getLogger(__name__)

ARCH = "domain-cnn-v1"
FEATURE_DIM = 128


class ClassifierCacheError(RuntimeError):
    """A cached classifier exists but cannot be trusted or read; worded for the person who runs the pipeline."""


# ---------------------------------------------------------------------------------------------- preprocessing
def as_images(x: Any, name: str = "images") -> torch.Tensor:
    """uint8 N×C×H×W tensor (C 1 or 3) from a tensor or numpy array; N×H×W gains a channel axis.

    Floats are refused rather than guessed at: call :func:`to_uint8` on generator output.
    """
    t = torch.as_tensor(x.copy() if isinstance(x, np.ndarray) and not x.flags.writeable else x)
    if t.dtype != torch.uint8:
        raise TypeError(
            f"{name} must be uint8 (N×C×H×W); got {t.dtype}. Map generator output in [-1, 1] with "
            "pipelines.metrics.to_uint8 first so real and generated images get identical preprocessing"
        )
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be N×C×H×W with C in (1, 3); got shape {tuple(t.shape)}")
    return t


def as_labels(y: Any, n: int, name: str = "labels") -> Optional[torch.Tensor]:
    if y is None:
        return None
    t = torch.as_tensor(y).to(torch.int64).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries for {n} images")
    return t


@contextmanager
def num_threads(n: Optional[int]):
    """torch intra-op threads set to ``n`` while inside (None: unchanged). On a busy 2-core machine one thread
    trains this small CNN several times faster than two (oversubscription)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero while inside (trained conv weights produce denormals that make CPU
    convolutions ~4x slower). torch has no getter for the flag: it is set back to torch's default (off) after."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


# ----------------------------------------------------------------------------------------------- the network
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainClassifier(nn.Module):
    """3 conv blocks (32, 64, 128 channels; ~7.5 MMAC per 28 px image) + global average pooling + a 128-d feature
    layer + a linear head.

    ``features``/``logits``/``probs`` take uint8 images, run batched, without gradients, in eval mode, and return
    float32 CPU tensors.
    """

    def __init__(self, num_classes: int, channels: int, resolution: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.resolution = int(resolution)
        self.feature_dim = int(feature_dim)
        first_pool = 4 if resolution >= 64 else 2  # keep the cost of 64 px close to that of 32 px
        self.body = nn.Sequential(
            _block(channels, 32), nn.MaxPool2d(first_pool),
            _block(32, 64), nn.MaxPool2d(2),
            _block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        # the feature space is the pre-activation of this layer: no dead (constant-zero) ReLU dimensions, so the
        # Gaussian fits of the Fréchet distance have full-rank covariances
        self.embed = nn.Linear(128, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.heldout_accuracy: float = float("nan")
        self.fingerprint: str = ""

    # float input in [-1, 1]; used by training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.body(x)))

    def _prep(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        return from_uint8(batch.to(device))

    def _check(self, images: torch.Tensor) -> None:
        if images.shape[1] != self.channels or images.shape[2] != self.resolution or images.shape[3] != self.resolution:
            raise ValueError(
                f"the domain classifier expects {self.channels}×{self.resolution}×{self.resolution} images, got "
                f"{tuple(images.shape[1:])}; generated and real images must match the prepared dataset"
            )

    @torch.no_grad()
    def _run(self, images: Any, batch_size: int, want: str) -> torch.Tensor:
        x = as_images(images)
        self._check(x)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        outs = []
        try:
            with flush_denormals():
                for i in range(0, x.shape[0], batch_size):
                    h = self.embed(self.body(self._prep(x[i:i + batch_size], device)))
                    outs.append((h if want == "features" else self.head(h)).float().cpu())
        finally:
            self.train(was_training)
        if not outs:
            return torch.empty(0, self.feature_dim if want == "features" else self.num_classes)
        return torch.cat(outs)

    def features_and_logits(self, images: Any, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass over the images (the head is applied to the returned features)."""
        f = self.features(images, batch_size)
        with torch.no_grad():
            logits = self.head(f.to(next(self.parameters()).device)).float().cpu()
        return f, logits

    def features(self, images: Any, batch_size: int = 500) -> torch.Tensor:
        return self._run(images, batch_size, "features")

    def logits(self, images: Any, batch_size: int = 500) -> torch.Tensor:
        return self._run(images, batch_size, "logits")

    def probs(self, images: Any, batch_size: int = 500) -> torch.Tensor:
        return torch.softmax(self.logits(images, batch_size), dim=1)

    def accuracy(self, images: Any, labels: Any, batch_size: int = 500) -> float:
        x = as_images(images)
        y = as_labels(labels, x.shape[0])
        keep = y >= 0
        if int(keep.sum()) == 0:
            return float("nan")
        pred = self.logits(x[keep], batch_size).argmax(1)
        return float((pred == y[keep]).float().mean())

    def meta(self) -> dict:
        return {"arch": ARCH, "num_classes": self.num_classes, "channels": self.channels,
                "resolution": self.resolution, "feature_dim": self.feature_dim,
                "heldout_accuracy": self.heldout_accuracy, "fingerprint": self.fingerprint}


def _fingerprint(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- training
def train_domain_classifier(
    train_images: Any,
    train_labels: Any,
    heldout_images: Any,
    heldout_labels: Any,
    num_classes: int,
    epochs: int = 2,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 5e-3,
    max_train: Optional[int] = None,
    device: str | torch.device = "cpu",
    threads: Optional[int] = None,
) -> DomainClassifier:
    """Train on the labeled train images (label -1 = unlabeled, skipped); record held-out accuracy.

    Adam with a one-cycle schedule. Deterministic for a fixed seed on CPU (same thread count). ``max_train`` caps
    the training images (a seeded subset) for quick runs. On MNIST: 20k images x 1 epoch ~0.97 held-out accuracy
    in ~20 s on 2 cores; 60k x 2 epochs (the default ``eval.classifier_epochs``) ~0.99.
    """
    x = as_images(train_images, "train_images")
    y = as_labels(train_labels, x.shape[0], "train_labels")
    keep = y >= 0
    x, y = x[keep], y[keep]
    if x.shape[0] == 0:
        raise ValueError("the train split has no labeled images: the domain classifier needs labels")
    if int(y.max()) >= num_classes:
        raise ValueError(f"train labels go up to {int(y.max())} but num_classes is {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    if max_train is not None and x.shape[0] > max_train:
        idx = torch.randperm(x.shape[0], generator=gen)[:max_train]
        x, y = x[idx], y[idx]
    torch.manual_seed(seed)
    model = DomainClassifier(num_classes, x.shape[1], x.shape[2]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (x.shape[0] + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    model.train()
    with flush_denormals(), num_threads(threads):
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], batch_size):
                idx = order[i:i + batch_size]
                if idx.numel() < 2:  # batch norm needs two samples
                    continue
                xb = model._prep(x[idx], torch.device(device))
                loss = F.cross_entropy(model(xb), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    if heldout_images is not None and heldout_labels is not None:
        model.heldout_accuracy = model.accuracy(heldout_images, heldout_labels)
    model.fingerprint = _fingerprint(model.state_dict())
    log.info("domain classifier trained in %.1f s on %d images: held-out accuracy %.4f",
             time.perf_counter() - t0, x.shape[0], model.heldout_accuracy)
    return model


# ----------------------------------------------------------------------------------------------------- cache
def cache_paths(cache_dir: str | Path, manifest_hash: str) -> tuple[Path, Path]:
    stem = f"domain-classifier-{ARCH}-{manifest_hash}"
    d = Path(cache_dir)
    return d / f"{stem}.pt", d / f"{stem}.json"


def save_classifier(model: DomainClassifier, weights_path: Path, sidecar_path: Path, extra: Optional[dict] = None) -> None:
    """``state_dict`` via ``torch.save`` (tensors only) + JSON sidecar; each written atomically (temp + replace)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    meta = model.meta() | (extra or {})
    # weights first: a sidecar never points at weights that are not there yet
    atomic_write(Path(weights_path), buf.getvalue())
    atomic_write(Path(sidecar_path), json.dumps(meta, indent=2, sort_keys=True).encode())


def load_classifier(weights_path: Path, sidecar_path: Path) -> DomainClassifier:
    """Load with ``torch.load(weights_only=True)``; any file that is not plain tensors is refused.

    Raises :class:`ClassifierCacheError` when the weights cannot be loaded safely or do not match their sidecar.
    """
    weights_path, sidecar_path = Path(weights_path), Path(sidecar_path)
    try:
        meta = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as exc:
        raise ClassifierCacheError(f"classifier sidecar {sidecar_path} is unreadable: {exc}") from exc
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClassifierCacheError(
            f"refusing the cached domain classifier {weights_path}: torch.load(weights_only=True) rejected it "
            f"({type(exc).__name__}: {first}). The file is not a plain state_dict - it may have been tampered with. "
            f"Inspect it, delete {weights_path} and {sidecar_path}, and rerun to retrain."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClassifierCacheError(f"{weights_path} does not hold a state_dict of tensors; delete it and rerun")
    model = DomainClassifier(meta["num_classes"], meta["channels"], meta["resolution"], meta.get("feature_dim", FEATURE_DIM))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ClassifierCacheError(f"{weights_path} does not match architecture {ARCH}: {exc}") from exc
    fp = _fingerprint(model.state_dict())
    if meta.get("fingerprint") and meta["fingerprint"] != fp:
        raise ClassifierCacheError(
            f"{weights_path} does not match the fingerprint recorded in {sidecar_path}; delete both and rerun"
        )
    model.fingerprint = fp
    model.heldout_accuracy = float(meta.get("heldout_accuracy", float("nan")))
    model.eval()
    return model


def load_or_train_classifier(
    cache_dir: str | Path,
    manifest_hash: str,
    train_images: Any = None,
    train_labels: Any = None,
    heldout_images: Any = None,
    heldout_labels: Any = None,
    num_classes: int = 10,
    epochs: int = 2,
    seed: int = 0,
    **train_kwargs: Any,
) -> DomainClassifier:
    """The classifier for one prepared dataset, cached under ``cache_dir`` by ``manifest_hash``.

    - cache hit whose sidecar matches (arch, num_classes, channels, resolution, epochs, seed): loaded with
      ``weights_only=True``;
    - no cache, or a sidecar recording other settings: trained, then saved atomically;
    - a weights file that ``torch.load(weights_only=True)`` refuses (e.g. a planted pickle) or that does not
      match its recorded fingerprint: **fails** with :class:`ClassifierCacheError` rather than silently retraining,
      since that is a security signal and silently replacing the classifier would change the feature space
      every earlier metric was computed in. Delete the files to retrain.
    """
    weights_path, sidecar_path = cache_paths(cache_dir, manifest_hash)
    want: dict[str, Any] = {"arch": ARCH, "num_classes": int(num_classes), "epochs": int(epochs), "seed": int(seed)}
    if train_images is not None:
        x = as_images(train_images, "train_images")
        want |= {"channels": int(x.shape[1]), "resolution": int(x.shape[2])}
    if train_kwargs.get("max_train") is not None:
        want["max_train"] = int(train_kwargs["max_train"])
    if weights_path.exists() and sidecar_path.exists():
        try:
            meta = json.loads(sidecar_path.read_text())
        except (OSError, ValueError):
            meta = {}
        stale = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if not stale:
            model = load_classifier(weights_path, sidecar_path)
            log.info("domain classifier loaded from %s (held-out accuracy %.4f)", weights_path, model.heldout_accuracy)
            return model
        log.warning("cached domain classifier %s was trained with other settings %s; retraining", weights_path, stale)
    elif weights_path.exists():
        log.warning("cached domain classifier %s has no sidecar; retraining", weights_path)
    if train_images is None or train_labels is None:
        reason = "holds one trained with other settings" if weights_path.exists() else "has none"
        raise ValueError(f"the classifier cache {weights_path} {reason}, and no train images were given to train "
                         f"one for {want}")
    model = train_domain_classifier(train_images, train_labels, heldout_images, heldout_labels,
                                    num_classes=num_classes, epochs=epochs, seed=seed, **train_kwargs)
    extra = {k: v for k, v in want.items() if k not in model.meta()} | {"manifest_hash": manifest_hash}
    save_classifier(model, weights_path, sidecar_path, extra)
    return model
