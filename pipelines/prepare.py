"""The ``prepare`` stage: a dataset's original files -> validated, sharded Parquet + manifest (``pipelines.data``).

Call :func:`prepare_dataset` from the CLI. Re-running with the same source files and settings is a no-op that
says so; ``force=True`` rebuilds. The output is published atomically (see ``pipelines.data.store``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from pipelines.config import DataConfig
from pipelines.data import DataError
from pipelines.data.sources import NATIVE, open_source
from pipelines.data.store import summary_text, write_dataset

__all__ = ["PreparedDataset", "ensure_dataset", "prepare_dataset", "prepare_stage", "default_output", "DataError"]


@dataclass(frozen=True)
class PreparedDataset:
    path: str            # local folder or URI, what TrainReader / load_split take
    manifest: dict
    manifest_hash: str   # the dataset version; record it with every run
    skipped: bool        # True: already prepared with the same inputs, nothing was written


def default_output(data: DataConfig, runs_dir: str = "gan-runs") -> str:
    """``data.path`` or ``<runs_dir>/data/<dataset>-<res>px-<ch>ch`` (``-first<N>`` with ``data.limit``)."""
    if data.path:
        return data.path
    native_res, native_ch = NATIVE[data.dataset]
    name = f"{data.dataset}-{data.resolution or native_res}px-{data.channels or native_ch}ch"
    if data.limit is not None:
        name += f"-first{data.limit}"
    return f"{runs_dir.rstrip('/')}/data/{name}"


def prepare_dataset(data: DataConfig, out: Optional[str] = None, force: bool = False, console=None,
                    runs_dir: str = "gan-runs") -> PreparedDataset:
    """Prepare ``data`` into ``out`` (default :func:`default_output`); prints progress and a summary to ``console``
    (a ``rich.console.Console``; default: stderr). Raises :class:`DataError` with the problem and the fix."""
    if console is None:
        from rich.console import Console
        console = Console(stderr=True)
    out = out or default_output(data, runs_dir)
    source = open_source(data)
    manifest, skipped = write_dataset(source, data, out, force=force, console=console)
    where = out if "://" in out else os.path.abspath(out)
    console.print(summary_text(manifest, where, skipped), highlight=False, markup=False, soft_wrap=True)
    manifest = {k: v for k, v in manifest.items() if not k.startswith("_")}
    return PreparedDataset(path=out, manifest=manifest, manifest_hash=manifest["manifest_hash"], skipped=skipped)


def prepare_stage(cfg, out: Optional[str] = None, force: bool = False, console=None) -> PreparedDataset:
    """CLI entry: ``gan-pipeline prepare`` with a resolved ``PipelineConfig`` (uses ``cfg.data``, ``cfg.runs_dir``)."""
    return prepare_dataset(cfg.data, out=out, force=force, console=console, runs_dir=cfg.runs_dir)


def ensure_dataset(cfg) -> tuple[str, dict]:
    """The prepared dataset named by ``data.path``, else the configured dataset prepared now (a no-op when it
    exists with the same inputs): its absolute path (a Ray worker has its own working directory) and manifest."""
    from pipelines.data.reader import load_manifest
    from pipelines.files import absolute_path

    if cfg.data.path:
        return absolute_path(cfg.data.path), load_manifest(cfg.data.path)
    prepared = prepare_dataset(cfg.data, runs_dir=cfg.runs_dir)
    return absolute_path(prepared.path), prepared.manifest
