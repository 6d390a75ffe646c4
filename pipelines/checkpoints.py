"""Checkpoints: plain state dicts and tensors, written with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so loading one never runs pickled code.

A checkpoint directory holds:
    state.pt            G, D, (aux), both optimizers, grad scalers, progress counters (noise is reseeded per checkpoint),
                        and the loop hooks' own state ("hooks": {state_key: state_dict}, when a hook has one)
    generator.pt        the generator's weights alone (what evaluate/register need): G as trained, or its
                        moving average where that scored better (pipelines.scoring)
    config.json         the resolved PipelineConfig and the data geometry
    pending_metrics.json  metrics produced since the previous checkpoint (committed to MLflow after this one)
    samples/*.png       fixed-noise grids produced since the previous checkpoint

The names below are the artifact layout's one owner, the run artifacts a finished run leaves included.
"""
from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from gan_models import GAN, GANSpec, Generator, unwrap
from gan_models.step import build_generator
from pipelines.errors import UserError
from pipelines.files import atomic_write

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
CONFIG_FILE = "config.json"
PENDING_METRICS_FILE = "pending_metrics.json"
SAMPLES_DIR = "samples"
# A finished training run's MLflow artifacts: GENERATOR_FILE and CONFIG_FILE of its final checkpoint under this
# folder (what evaluate and register read), and the loss-curve figure.
GENERATOR_ARTIFACT_DIR = "generator"
LOSS_CURVES_ARTIFACT = "loss_curves.png"


class CheckpointError(UserError):
    pass


def write_checkpoint(directory: Path, gan: GAN, progress: dict[str, int], run_config: dict,
                     pending_metrics: list, sample_pngs: dict[str, bytes], hook_states: Optional[dict] = None,
                     generator: Optional[torch.nn.Module] = None) -> None:
    """``generator``: the network saved as ``generator.pt`` (what evaluate and register use) when it is not G as
    trained, e.g. G's moving average where that scored better (pipelines.scoring)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "generator": unwrap(gan.generator).state_dict(),
        "discriminator": unwrap(gan.discriminator).state_dict(),
        "opt_g": gan.opt_g.state_dict(),
        "opt_d": gan.opt_d.state_dict(),
        "progress": dict(progress),
    }
    if gan.aux_classifier is not None:
        state["aux_classifier"] = unwrap(gan.aux_classifier).state_dict()
    for name, scaler in (("scaler_g", gan.scaler_g), ("scaler_d", gan.scaler_d)):
        if scaler is not None:
            state[name] = scaler.state_dict()
    if hook_states:
        state["hooks"] = hook_states
    atomic_write(directory / STATE_FILE, lambda f: torch.save(state, f))
    exported = unwrap(generator if generator is not None else gan.generator).state_dict()
    atomic_write(directory / GENERATOR_FILE, lambda f: torch.save(exported, f))
    atomic_write(directory / CONFIG_FILE, json.dumps(run_config, indent=2, sort_keys=True))
    atomic_write(directory / PENDING_METRICS_FILE, json.dumps(pending_metrics))
    if sample_pngs:
        (directory / SAMPLES_DIR).mkdir(exist_ok=True)
        for name, data in sample_pngs.items():
            (directory / SAMPLES_DIR / name).write_bytes(data)


def safe_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; a planted pickle is refused, not executed."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; is {path.parent} a gan-pipeline checkpoint?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True). gan-pipeline never unpickles arbitrary code; only load checkpoints you made."
            f"\n  detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint file {path} is unreadable or truncated: {exc}") from None


@contextlib.contextmanager
def _must_fit(directory: Path, way_out: str):
    """Weights that do not fit the networks built for them: a CheckpointError naming the checkpoint, not a
    ``load_state_dict`` traceback."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {directory} does not fit this model: its networks were built with other settings (model "
            f"sizes, code, conditioning) or by an older gan-pipeline whose layout differs. {way_out}"
            f"\n  detail: {str(exc).splitlines()[0]}"
        ) from None


def restore(gan: GAN, directory: Path) -> tuple[dict[str, int], dict]:
    """Load a checkpoint into ``gan`` (before DDP wrapping); return its progress counters and the hooks' states."""
    state = safe_load(Path(directory) / STATE_FILE)
    with _must_fit(directory, "Resume it with the release and settings that wrote it, or start a new run."):
        unwrap(gan.generator).load_state_dict(state["generator"])
        unwrap(gan.discriminator).load_state_dict(state["discriminator"])
        if gan.aux_classifier is not None:
            unwrap(gan.aux_classifier).load_state_dict(state["aux_classifier"])
        gan.opt_g.load_state_dict(state["opt_g"])
        gan.opt_d.load_state_dict(state["opt_d"])
    for name in ("scaler_g", "scaler_d"):
        if name in state and getattr(gan, name) is not None:
            getattr(gan, name).load_state_dict(state[name])
    return {k: int(v) for k, v in state["progress"].items()}, state.get("hooks", {})


def checkpoint_progress(directory: Path) -> dict[str, int]:
    """The progress counters (step, epoch, batch_in_epoch) a checkpoint was written at."""
    return {k: int(v) for k, v in safe_load(Path(directory) / STATE_FILE)["progress"].items()}


def read_run_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a gan-pipeline checkpoint: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def read_pending_metrics(directory: Path) -> list:
    path = Path(directory) / PENDING_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def load_generator(directory: Path, device: str = "cpu") -> tuple[Generator, GANSpec, dict]:
    """The generator of a checkpoint (or of a run's ``generator`` artifact dir), in eval mode."""
    run_config = read_run_config(directory)
    spec = GANSpec(**run_config["gan_spec"])
    generator = build_generator(spec)
    weights = safe_load(Path(directory) / GENERATOR_FILE)
    with _must_fit(directory, f"Its {GENERATOR_FILE} and {CONFIG_FILE} must come from the same checkpoint."):
        generator.load_state_dict(weights)
    return generator.to(device).eval(), spec, run_config


def checkpoint_dir_name(step: int) -> str:
    """Zero-padded, so that names sort by step (``latest_checkpoint``) and tell their step (``checkpoint_step``)."""
    return f"checkpoint_{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint directory (local path or storage URI) was written at, from its name."""
    return int(Path(str(path)).name.removeprefix("checkpoint_"))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest ``checkpoint_*`` directory under a Ray Train run directory that holds a complete state."""
    candidates = sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).is_file())
    return candidates[-1] if candidates else None
