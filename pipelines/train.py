"""The ``train`` stage: one MLflow run, trained by ``pipelines.launch`` (a Ray Train ``TorchTrainer`` over
``pipelines.loop``), resumable by run name.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pipelines import checkpoints, package_version, progress, tags, tracking
from pipelines.cluster import ray_session
from pipelines.config import PipelineConfig, config_from_dict
from pipelines.errors import UserError
from pipelines.files import atomic_write
from pipelines.job import absolute_tracking_uri
from pipelines.launch import build_trainer, check_storage, finish_run, fit, make_job, storage_root
from pipelines.prepare import ensure_dataset
from pipelines.scoring import best_checkpoint, prepare_reference


@dataclass
class TrainResult:
    run_name: str
    run_id: str
    checkpoint_dir: str
    steps: int
    seconds: float
    data_path: str
    manifest_hash: str


def _record_path(cfg: PipelineConfig, run_name: str) -> Path:
    from pipelines.safety import check_name

    check_name(run_name, "run name")
    return Path(cfg.runs_dir) / "train" / f"{run_name}.json"


def _write_record(cfg: PipelineConfig, record: dict) -> None:
    path = _record_path(cfg, record["run_name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2))


def load_record(cfg: PipelineConfig, run: str) -> dict:
    path = _record_path(cfg, run)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if all(key in record for key in ("run_name", "run_id", "data_path", "config")):
                return record
        except (ValueError, TypeError):
            pass
        raise UserError(f"the run record {path} is damaged or not gan-pipeline's; it cannot be resumed. Start a "
                        f"new run (another --run-name); the checkpoints of {run!r} are kept")
    known = sorted(p.stem for p in _record_path(cfg, "x").parent.glob("*.json"))
    raise UserError(f"no training run named {run!r} under {path.parent}; known runs: {', '.join(known) or 'none'}. "
                    f"Pass the run name printed at the start of training (and the same --runs-dir).")


def _new_run(cfg: PipelineConfig, mlflow_client, run_name: str, data_path: str, manifest: dict) -> str:
    exp_id = tracking.experiment_id(mlflow_client, cfg.tracking.experiment)
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags={
        tags.MODEL: cfg.model.name, tags.DATASET: manifest["dataset"],
        tags.STAGE: "train", tags.RUN_NAME: run_name,
    })
    run_id = run.info.run_id
    params = cfg.flat()
    params.update({"data.manifest_hash": manifest["manifest_hash"], "data.resolved_path": data_path,
                   "package_version": package_version(), "git_commit": tracking.git_commit()})
    tracking.log_params(mlflow_client, run_id, params)
    mlflow_client.log_dict(run_id, tracking.redact_config(cfg.model_dump(mode="json")), "config.json")
    tracking.log_dataset_input(mlflow_client, run_id, data_path, manifest, tracking.DATASET_TRAINING)
    return run_id


def train_stage(cfg: PipelineConfig, run_name: Optional[str] = None, resume: Optional[str] = None,
                console_print: Callable[[str], None] = print, deadline: Optional[float] = None) -> TrainResult:
    """``deadline`` (seconds since the epoch): the time budget ends there at the latest (``run``'s promise)."""
    from pipelines import preflight

    preflight.check_local_size(cfg)
    uri = absolute_tracking_uri(cfg.resolved_tracking_uri)
    tracking.check_reachable(uri)
    mlflow_client = tracking.client(uri)
    check_storage((load_record(cfg, resume).get("storage") or storage_root(cfg)) if resume else storage_root(cfg))
    if resume:
        record = load_record(cfg, resume)
        cfg = config_from_dict(record["config"])
        run_name, run_id, data_path = record["run_name"], record["run_id"], record["data_path"]
        from pipelines.data.reader import load_manifest

        manifest = load_manifest(data_path)
        mlflow_client.update_run(run_id, status="RUNNING")
        step = "none yet: from the start"
        storage = record.get("storage", storage_root(cfg))
        latest = checkpoints.latest_checkpoint(Path(storage) / run_name) if "://" not in storage else None
        if latest is not None:
            # a full (weights-only) load, not just the name: a planted state.pt is refused here, before Ray starts
            step = f"step {checkpoints.safe_load(latest / checkpoints.STATE_FILE)['progress']['step']}"
        console_print(f"[gan-pipeline] resuming {run_name} (MLflow run {run_id}); last checkpoint: {step}")
    else:
        run_name = run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if _record_path(cfg, run_name).exists():
            raise UserError(f"a training run named {run_name!r} exists; resume it with --resume {run_name} "
                            f"or choose another --run-name")
        if "://" not in storage_root(cfg) and (Path(storage_root(cfg)) / run_name).exists():
            raise UserError(f"checkpoints of a run named {run_name!r} exist in {storage_root(cfg)} (from another "
                            f"runs folder?); choose another --run-name")
        data_path, manifest = ensure_dataset(cfg)
        preflight.check_dataset_fits(cfg, manifest, data_path)
        run_id = _new_run(cfg, mlflow_client, run_name, data_path, manifest)
        # credentials stay out of the record: a resume takes the tracking URI from its own command line
        _write_record(cfg, {"run_name": run_name, "run_id": run_id, "data_path": data_path,
                            "storage": storage_root(cfg), "config": tracking.redact_config(cfg.model_dump(mode="json")),
                            "tracking_uri": tracking.redact_uri(uri)})
        console_print(f"[gan-pipeline] training {run_name}: {cfg.model.name} on {manifest['dataset']} "
                      f"with {cfg.train.workers} worker(s); MLflow run {run_id}")
    return run_training(cfg, mlflow_client, uri, run_name, run_id, data_path, manifest, console_print,
                        resume_from=latest if resume else None, deadline=deadline)


def run_training(cfg: PipelineConfig, mlflow_client, uri: str, run_name: str, run_id: str, data_path: str,
                 manifest: dict, console_print: Callable[[str], None] = print,
                 resume_from: Optional[Path] = None, deadline: Optional[float] = None) -> TrainResult:
    import mlflow

    start = time.perf_counter()
    workers = cfg.train.workers
    cpus = workers * cfg.train.cpus_per_worker
    mlflow.set_tracking_uri(uri)
    status = "FAILED"
    try:
        with ray_session(cfg.train.address, cpus_needed=cpus, gpus_needed=workers if cfg.train.gpu else 0,
                         env=tracking.worker_env(uri), worker_output=False, lean=True):
            # after joining the cluster: a wrong address fails in seconds, not after the classifier's training
            reference = prepare_reference(cfg, data_path, manifest) if cfg.train.score_checkpoints else None
            board = progress.create_board()
            job = make_job(cfg, data_path=data_path, run_id=run_id, tracking_uri=uri,
                           resume_from=str(resume_from) if resume_from else None, score_reference=reference,
                           progress_board=board, deadline=deadline)
            trainer = build_trainer(cfg, job, run_name=run_name)
            view = progress.view_for_console("train",
                                             print_fn=None if console_print is print else console_print)
            with _system_metrics(run_id), progress.relayed(board, view):
                result = fit(trainer, mlflow_client, run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            mlflow_client.set_terminated(run_id, status=status)
    seconds = time.perf_counter() - start
    best = best_checkpoint(result)
    checkpoint_dir = result.checkpoint.path
    with best.as_directory() as local_dir:  # a local copy where storage is remote
        finish_run(mlflow_client, run_id, Path(local_dir), checkpoint_dir, storage_root(cfg), run_name,
                   generator_checkpoint=best.path)
    with result.checkpoint.as_directory() as local_dir:
        steps = checkpoints.checkpoint_progress(Path(local_dir))["step"]
    chosen = "" if best.path == result.checkpoint.path else f"; best checkpoint: step {checkpoints.checkpoint_step(best.path)}"
    console_print(f"[gan-pipeline] trained {run_name}: {steps} steps in {seconds:.0f}s{chosen}; MLflow run {run_id}; "
                  f"checkpoints in {Path(checkpoint_dir).parent}")
    return TrainResult(run_name, run_id, checkpoint_dir, int(steps), seconds, data_path, manifest["manifest_hash"])


class _system_metrics:
    """MLflow system metrics (CPU, memory, GPU) of the driver's node for the run's duration."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.monitor = None

    def __enter__(self):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, samples_before_logging=1)
            self.monitor.start()
        except Exception as exc:  # noqa: BLE001 - optional telemetry must not stop training
            print(f"[gan-pipeline] system metrics off: {exc}", flush=True)
            self.monitor = None
        return self

    def __exit__(self, *exc):
        if self.monitor is not None:
            self.monitor.finish()
        return False
