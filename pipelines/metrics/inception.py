"""Optional Inception-v3 (pool3, 2048-d) feature space, through torchmetrics' ``NoTrainInceptionV3``.

That network needs the ``torch-fidelity`` package and the FID Inception weights
(``weights-inception-2015-12-05-6726825d.pth``). Where the weights come from, first found wins:

1. ``EvalConfig.inception_weights`` (the ``weights_path`` argument), else the ``GAN_PIPELINE_INCEPTION_WEIGHTS``
   environment variable: a local copy of that file;
2. torch hub's cache (``$TORCH_HOME/hub/checkpoints/``), where an earlier download put it;
3. a download, only when the network answers within a few seconds and neither ``GAN_PIPELINE_OFFLINE`` nor
   ``HF_HUB_OFFLINE`` is set.

When none works, :func:`load_inception` returns ``None`` and logs ONE warning line saying the Inception metrics
are skipped and how to enable them; it never raises and never waits on the network for long.
Cost: about 6 GFLOPs per image at 299 px - roughly 10-20 images/s on 2 CPU cores, so cap
``eval.inception_num_samples`` on CPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipelines.metrics.classifier import as_images

log = logging.getLogger(__name__)

WEIGHTS_ENV = "GAN_PIPELINE_INCEPTION_WEIGHTS"
OFFLINE_ENVS = ("GAN_PIPELINE_OFFLINE", "HF_HUB_OFFLINE")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
DOWNLOAD_HOST = ("github.com", 443)
HOW_TO = (f"install torch-fidelity and set eval.inception_weights (or {WEIGHTS_ENV}) to a local copy of "
          f"{WEIGHTS_FILE}, or run once with internet access; eval.inception=false silences this")

_warned: set[str] = set()
_loaded: dict[str, nn.Module] = {}


def _skip(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("Inception metrics skipped: %s; to enable them, %s", reason, HOW_TO)
    return None


def _network_ok(timeout: float) -> bool:
    try:
        with socket.create_connection(DOWNLOAD_HOST, timeout=timeout):
            return True
    except OSError:
        return False


class InceptionFeatures(nn.Module):
    """uint8 N×C×H×W (C 1 or 3, any size) -> N×2048 float32 pool3 features; resizing to 299 happens inside."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_images(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        device = next(self.net.parameters(), torch.empty(0)).device
        return self.net(x.to(device)).reshape(x.shape[0], -1).float().cpu()


def load_inception(weights_path: Optional[str] = None, allow_download: bool = True,
                   network_timeout: float = 3.0) -> Optional[InceptionFeatures]:
    """The Inception feature extractor, or ``None`` (after one warning line) when it cannot be had."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return _skip("the torch-fidelity package is not installed")
    path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    if path:
        if not Path(path).is_file():
            origin = "eval.inception_weights" if weights_path else WEIGHTS_ENV
            return _skip(f"{origin} points to {path}, which is not a file")
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
        if cached.is_file():
            path = str(cached)
        elif not allow_download or any(os.environ.get(e, "").strip() not in ("", "0", "false") for e in OFFLINE_ENVS):
            return _skip("the weights are not cached and downloads are off")
        elif not _network_ok(network_timeout):
            return _skip(f"the weights are not cached and {DOWNLOAD_HOST[0]} cannot be reached")
        else:
            try:
                from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
                path = str(cached)
            except Exception as exc:  # noqa: BLE001
                return _skip(f"downloading the weights failed ({type(exc).__name__}: {_first_line(exc)})")
    if path in _loaded:
        return _loaded[path]
    try:
        net = _build_network(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no Inception metrics", never a crash
        return _skip(f"loading the network from {path} failed ({type(exc).__name__}: {_first_line(exc)})")
    model = InceptionFeatures(net)
    _loaded[path] = model
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _build_network(path: str) -> nn.Module:
    """NoTrainInceptionV3 from a weights file, without unrestricted unpickling of that file.

    torch-fidelity opens a given weights path with ``torch.load(weights_only=False)``. So the file is read here with
    ``weights_only=True`` (a file that is not plain tensors is refused), and the network is built from a copy
    re-saved from those tensors into a private temporary directory.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    with tempfile.TemporaryDirectory(prefix="gan-pipeline-inception-") as tmp:
        clean = os.path.join(tmp, WEIGHTS_FILE)
        torch.save(state, clean)
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=clean)


def inception_features(model: nn.Module, images: Any, batch_size: int = 64) -> torch.Tensor:
    x = as_images(images)
    outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, getattr(model, "num_features", 2048))
