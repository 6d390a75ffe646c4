"""Launching the training loop: a ``TorchTrainer`` over ``pipelines.loop.train_worker`` for one ``TrainJob``, its
fit, where checkpoints are stored, and what a finished run leaves on MLflow. ``train`` (and so ``run``) and every
``tune`` trial launch training through here."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipelines import checkpoint_models, checkpoints, tags, tracking
from pipelines.config import PipelineConfig
from pipelines.errors import TrainingDiverged, UserError
from pipelines.files import absolute_path
from pipelines.job import TrainJob


def storage_root(cfg: PipelineConfig) -> str:
    """Checkpoints go here: a local path (made absolute; Ray needs it) or a cloud/NFS URI, kept as given."""
    return absolute_path(cfg.train.storage_path or os.path.join(cfg.runs_dir, "checkpoints"))


def check_storage(path: str) -> None:
    """A local checkpoint location must be a writable directory: said now, in a second, not by a Ray worker
    after startup and the first checkpoint's steps. Cloud URIs are checked by Ray at the first checkpoint."""
    if "://" in path:
        return
    from pipelines import safety

    safety.check_storage_folder(path)
    try:
        safety.claim_folder(path)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gan-pipeline-write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"checkpoint storage {path} is not a writable directory ({exc.strerror or exc}); pass "
                        f"--storage-path a directory you can write to (or fix its permissions / free space). "
                        f"Nothing was trained.") from None


def make_job(cfg: PipelineConfig, *, data_path: str, run_id: str, tracking_uri: str,
             resume_from: Optional[str] = None, hook_factories: Sequence[Callable] = (),
             score_reference: Optional[dict] = None, inherited: bool = False, progress_board=None,
             deadline: Optional[float] = None) -> TrainJob:
    """The worker's inputs for ``cfg``: config redacted, every path resolved here, in the driver."""
    return TrainJob.create(tracking.redact_config(cfg.model_dump(mode="json")), data_path=data_path, run_id=run_id,
                           tracking_uri=tracking_uri, threads=cfg.train.threads_per_worker,
                           resume_from=resume_from, hook_factories=tuple(hook_factories),
                           score_reference=score_reference, inherited=inherited, progress_board=progress_board,
                           deadline=deadline)


def build_trainer(cfg: PipelineConfig, job: TrainJob, *, run_name: str, callbacks: Sequence = (),
                  storage: Optional[str] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.loop import train_worker

    from pipelines.scoring import CHECKPOINT_SCORE

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    # scored runs keep their best checkpoints (and always the latest, to resume from); others the latest few
    ranking = ({"checkpoint_score_attribute": CHECKPOINT_SCORE, "checkpoint_score_order": "min"}
               if job.score_reference is not None else {})
    if t.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        functools.partial(train_worker, job),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage or storage_root(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, **ranking),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
    )


def fit(trainer, mlflow_client, run_id: str):
    """Run the trainer; a diverged run is an error (the loop stops all ranks and tags the MLflow run)."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        if "No space left on device" in str(exc) or "[Errno 28]" in str(exc):
            rc = getattr(trainer, "run_config", None)
            where = f"{getattr(rc, 'storage_path', '?')}/{getattr(rc, 'name', '?')}"
            raise UserError(f"training failed: checkpoint storage {where} is full (No space left on device). The "
                            f"last complete checkpoint there is kept; free space (or lower train.keep_checkpoints) "
                            f"and continue with gan-pipeline train --resume {getattr(rc, 'name', 'RUN')}") from None
        raise UserError(f"training failed: {exc}") from exc
    tag = mlflow_client.get_run(run_id).data.tags.get(tags.DIVERGED)
    if tag:
        raise TrainingDiverged(
            f"training diverged ({tag}). The last good checkpoint is kept; lower the learning rates "
            f"(--lr-g/--lr-d) or, for WGAN, the clip value, and train again."
        )
    return result


def finish_run(mlflow_client, run_id: str, ckpt: Path, checkpoint_uri: str, storage: str, run_name: str,
               generator_checkpoint: Optional[str] = None) -> None:
    """Generator weights + config as run artifacts (what evaluate/register read) from ``ckpt`` (the best
    checkpoint, ``generator_checkpoint``, and its LoggedModel), a loss-curve figure, where the checkpoints are
    (``checkpoint_uri``: the latest, to resume from), and the run marked finished."""
    for name in (checkpoints.GENERATOR_FILE, checkpoints.CONFIG_FILE):
        mlflow_client.log_artifact(run_id, str(ckpt / name), artifact_path=checkpoints.GENERATOR_ARTIFACT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        curve = Path(tmp) / checkpoints.LOSS_CURVES_ARTIFACT
        curve.write_bytes(tracking.loss_curve_png(mlflow_client, run_id))
        mlflow_client.log_artifact(run_id, str(curve))
    mlflow_client.set_tag(run_id, tags.CHECKPOINT_DIR, checkpoint_uri)
    mlflow_client.set_tag(run_id, tags.GENERATOR_CHECKPOINT, generator_checkpoint or checkpoint_uri)
    # the LoggedModel of that checkpoint (scored runs): what register materializes and registers
    model_id = checkpoint_models.generator_model_id(mlflow_client, run_id, generator_checkpoint or checkpoint_uri)
    if model_id:
        mlflow_client.set_tag(run_id, tags.GENERATOR_MODEL_ID, model_id)
    mlflow_client.set_tag(run_id, tags.STORAGE, f"{storage}/{run_name}")
    mlflow_client.set_terminated(run_id, status="FINISHED")
