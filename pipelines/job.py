"""``TrainJob``: everything a Ray Train worker needs, fixed in the driver and sent across the Ray boundary.

A Ray worker runs in its own working directory, so a relative path means something else there: every path and
URI in a job is made absolute once, here, in the driver (``TrainJob.create``), and a job refuses to exist with a
relative one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipelines.files import absolute_path

SQLITE_PREFIX = "sqlite:///"


def cores_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` training processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // processes)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` names a file relative to the working directory: made absolute. Servers kept."""
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        return SQLITE_PREFIX + absolute_path(uri[len(SQLITE_PREFIX):])
    return uri


def absolute_config(config: dict) -> dict:
    """A config dump whose paths (runs dir, data path, checkpoint storage, tracking URI) are absolute."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    out["runs_dir"] = absolute_path(out["runs_dir"])
    for section, key in (("data", "path"), ("train", "storage_path")):
        if out[section].get(key):
            out[section][key] = absolute_path(out[section][key])
    if out["tracking"].get("tracking_uri"):
        out["tracking"]["tracking_uri"] = absolute_tracking_uri(out["tracking"]["tracking_uri"])
    return out


def _is_absolute(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


@dataclass(frozen=True)
class TrainJob:
    """One training run's worker inputs. ``hook_factories`` build extra loop hooks in each worker (``tune``'s
    reporter); the loop's own hooks come from ``pipelines.hooks.default_hooks``."""

    config: dict                      # PipelineConfig dump (redacted, paths absolute)
    data_path: str                    # prepared dataset directory
    run_id: str                       # the MLflow run the loop commits to
    tracking_uri: str
    threads: Optional[int] = None     # torch threads per worker; None: the node's cores / workers
    resume_from: Optional[str] = None  # a checkpoint the driver found (newer than Ray's record of the run)
    inherited: bool = False           # resume_from is another run's (a PBT exploit): its pending metrics are not ours
    hook_factories: tuple[Callable[[], Any], ...] = field(default=())
    score_reference: Optional[dict] = None  # scoring.prepare_reference's paths: checkpoints get scored
    progress_board: Any = None        # the driver's pipelines.progress board (a Ray actor); None: print
    deadline: Optional[float] = None  # seconds since the epoch: the time budget ends here at the latest (a sweep's)

    def __post_init__(self) -> None:
        paths = {"data_path": self.data_path, "runs_dir": self.config["runs_dir"],
                 "resume_from": self.resume_from or "/", "data.path": self.config["data"].get("path") or "/"}
        if self.tracking_uri.startswith("sqlite:"):
            paths["tracking_uri"] = self.tracking_uri[len(SQLITE_PREFIX):] if self.tracking_uri.startswith(
                SQLITE_PREFIX) else ""
        relative = sorted(name for name, path in paths.items() if not _is_absolute(path))
        if relative:
            raise ValueError(f"TrainJob needs absolute paths (a Ray worker has its own working directory); "
                             f"relative: {', '.join(relative)}. Build it with TrainJob.create.")

    @classmethod
    def create(cls, config: dict, *, data_path: str, run_id: str, tracking_uri: str, **kwargs) -> "TrainJob":
        """A job whose paths are resolved against the driver's working directory."""
        resume_from = kwargs.pop("resume_from", None)
        return cls(config=absolute_config(config), data_path=absolute_path(data_path), run_id=run_id,
                   tracking_uri=absolute_tracking_uri(tracking_uri),
                   resume_from=absolute_path(str(resume_from)) if resume_from else None, **kwargs)
