"""Checks the driver makes before Ray starts: what a worker would otherwise find after 20-40 s of start-up, as an
80-line remote traceback. Each check names the problem and the fix; all raise :class:`BadValue` (exit 2)."""
from __future__ import annotations

import os
from typing import Optional

from pipelines.config import PipelineConfig
from pipelines.errors import BadValue

#: A local instance runs every worker on this machine: more than this many per core only thrashes (each worker
#: holds the whole train split in memory). A cluster (--address) is sized by the cluster.
LOCAL_WORKERS_PER_CORE = 4
LOCAL_MIN_CPUS = 8


def local_cpu_limit() -> int:
    return max(LOCAL_MIN_CPUS, LOCAL_WORKERS_PER_CORE * (os.cpu_count() or 1))


def check_local_size(cfg: PipelineConfig, cpus: Optional[int] = None, what: str = "--workers") -> None:
    """A local instance declares whatever CPUs it is asked for; bound it by the machine."""
    if cfg.train.address:
        return
    cpus = cpus if cpus is not None else cfg.train.workers * cfg.train.cpus_per_worker
    limit = local_cpu_limit()
    if cpus > limit:
        raise BadValue(f"{what}: the run asks for {cpus} CPUs of a local Ray instance on a {os.cpu_count()}-core "
                       f"machine (at most {limit} here: {LOCAL_WORKERS_PER_CORE} per core); lower {what} (or "
                       f"--threads-per-worker), or join a cluster with --address")


def check_dataset_fits(cfg: PipelineConfig, manifest: dict, data_path: str, needs_labels: Optional[str] = None,
                       workers: Optional[int] = None) -> None:
    """The prepared dataset can train ``cfg``'s model: labels for a conditional model (or for ``needs_labels``,
    the stage that scores with the domain classifier), and at least one batch per worker."""
    classes = len(manifest.get("class_names") or [])
    where = f"the dataset at {data_path} ({manifest.get('dataset', '?')})"
    kind = "unlabeled" if classes == 0 else f"labeled with a single class ({manifest['class_names'][0]})"
    if cfg.model.conditional and classes < 2:
        raise BadValue(f"model {cfg.model.name} is conditional, but {where} is {kind}; a conditional model needs "
                       f"two or more classes: use --model dcgan (or wgan, wgan-gp), or prepare an image folder "
                       f"with one subfolder per class")
    if needs_labels and classes < 2:
        raise BadValue(f"{needs_labels} scores generators with a domain classifier, but {where} is {kind}; it needs "
                       f"two or more classes (an image folder with one subfolder per class). Use gan-pipeline "
                       f"train for this dataset instead")
    workers = workers or cfg.train.workers
    train_count = int((manifest.get("counts") or {}).get("train", 0))
    per_worker = max(cfg.train.batch_size // max(cfg.train.workers, 1), 1)  # batch_size is the global batch
    if train_count < per_worker * workers:
        raise BadValue(f"{where} has {train_count} training examples: too few for one batch of {per_worker} on "
                       f"each of {workers} worker(s) (global --batch-size {per_worker * workers}); lower --batch-size "
                       f"(to at most {train_count}), or prepare more data")
