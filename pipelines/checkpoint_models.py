"""Scored checkpoints as MLflow LoggedModels: the experiment's Models tab lists every checkpoint a run scored,
ranked by its cheap domain FD, and registering a run's generator picks one of them.

One LoggedModel per scored checkpoint (``pipelines.scoring``), created by rank 0 when the checkpoint's metrics are
committed (``pipelines.hooks.MLflowCommitter``): linked to the training run (source run, a run output at the
checkpoint's step), carrying the run's parameters, tags naming its step and the checkpoint directory, and the
checkpoint step's metrics (``domain_fd_cheap`` and the losses) linked by ``model_id`` and to the prepared dataset.

No weights are uploaded per checkpoint: the generator of each checkpoint already lies in checkpoint storage, where
Ray keeps the best-scored ones (``train.keep_checkpoints``); uploading it at every checkpoint would stall all ranks
at the next collective for the upload and grow the MLflow store by a generator per checkpoint, for models nobody
picked. ``register`` materializes the picked one: it logs the pickle-free pyfunc into the best checkpoint's
LoggedModel (``finish_run`` names it on the run, ``tags.GENERATOR_MODEL_ID``) and registers that model, so the
model version links to it.

Exactly once: a LoggedModel is found by (run id, checkpoint step) before one is created, and created only for a
checkpoint whose metrics MLflow does not hold yet; a resumed run or a restarted worker finds the ones it made.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from pipelines import tags
from pipelines.training_metrics import CHEAP_FD


def find(mlflow_client, experiment_id: str, run_id: str, step: int):
    """The LoggedModel of run ``run_id``'s checkpoint at ``step``, or None."""
    found = mlflow_client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.`{tags.CHECKPOINT_STEP}` = '{int(step)}'",
        max_results=2)
    return found[0] if found else None


def model_name(run_name: str, step: int) -> str:
    """``<run name>-step<N>``: MLflow refuses '/', ':', '.', '%' and quotes in LoggedModel names."""
    safe = "".join("-" if c in "/:.%\"'" else c for c in run_name) or "run"
    return f"{safe}-step{int(step)}"


def scored_steps(pending: Iterable[tuple[int, Mapping[str, float]]]) -> list[int]:
    """The steps of ``pending`` (step, values) entries that are scored checkpoints."""
    return [int(step) for step, values in pending if CHEAP_FD in values]


class CheckpointModels:
    """Rank 0's recorder of a run's scored checkpoints. ``params``: the run's (redacted) parameters;
    ``model_tags``: tags every model carries (family, dataset); ``checkpoint_root``: the run's checkpoint storage
    (each checkpoint is ``<root>/checkpoint_<step>``), None where unknown."""

    def __init__(self, mlflow_client, run_id: str, *, params: Mapping[str, str], dataset: tuple[str, str],
                 model_tags: Mapping[str, str], checkpoint_root: Optional[str]):
        self.client, self.run_id = mlflow_client, run_id
        self.params, self.dataset, self.model_tags = dict(params), dataset, dict(model_tags)
        self.checkpoint_root = checkpoint_root
        self._run_info = None

    @property
    def run_info(self):
        if self._run_info is None:  # the experiment and run name: asked once, at the first checkpoint
            self._run_info = self.client.get_run(self.run_id).info
        return self._run_info

    def link(self, pending: Iterable[tuple[int, Mapping[str, float]]], committed_step: int) -> dict[int, str]:
        """The model id of every scored checkpoint in ``pending``: found, or created where its metrics are not
        committed yet (step > ``committed_step``). A committed checkpoint without a model (trained before models
        were recorded) stays without one: its metrics could not be linked any more."""
        ids = {}
        for step in scored_steps(pending):
            model = find(self.client, self.run_info.experiment_id, self.run_id, step)
            if model is None and step > committed_step:
                model = self._create(step)
            if model is not None:
                ids[step] = model.model_id
        return ids

    def finalize(self, model_ids: Mapping[int, str]) -> None:
        """Mark the models READY once their metrics are committed (a model left PENDING: its commit was cut off,
        and the resumed run finishes it)."""
        from mlflow.entities import LoggedModelStatus

        for model_id in model_ids.values():
            if self.client.get_logged_model(model_id).status != LoggedModelStatus.READY:
                self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)

    def _create(self, step: int):
        from mlflow.entities import LoggedModelOutput

        from pipelines.checkpoints import checkpoint_dir_name

        model_tags = {**self.model_tags, tags.CHECKPOINT_STEP: str(step), tags.RUN_NAME: self.run_info.run_name or ""}
        if self.checkpoint_root:
            model_tags[tags.CHECKPOINT] = f"{self.checkpoint_root.rstrip('/')}/{checkpoint_dir_name(step)}"
        model = self.client.create_logged_model(
            experiment_id=self.run_info.experiment_id, name=model_name(self.run_info.run_name or self.run_id, step),
            source_run_id=self.run_id, tags=model_tags, params=self.params, model_type=tags.CHECKPOINT_MODEL_TYPE)
        # the run page lists it among the run's logged models, at its step
        self.client.log_outputs(self.run_id, models=[LoggedModelOutput(model.model_id, step=step)])
        return model


def generator_model_id(mlflow_client, run_id: str, checkpoint: str) -> Optional[str]:
    """The LoggedModel of the checkpoint (a path ending in ``checkpoint_<step>``) a run's generator came from."""
    from pipelines.checkpoints import checkpoint_step

    try:
        step = checkpoint_step(checkpoint)
    except ValueError:
        return None
    model = find(mlflow_client, mlflow_client.get_run(run_id).info.experiment_id, run_id, step)
    return model.model_id if model is not None else None


def for_worker(mlflow_client, run_id: str, cfg, manifest: dict) -> CheckpointModels:
    """The recorder of a Ray Train worker (rank 0) training ``cfg`` on the prepared dataset ``manifest``."""
    import ray.train

    from pipelines import tracking

    params = tracking.redact({**cfg.flat(), "data.manifest_hash": manifest["manifest_hash"]})
    try:  # a developer API of Ray Train: without it the models lack their checkpoint path, nothing else
        checkpoint_root = ray.train.get_context().get_storage().experiment_fs_path
    except (AttributeError, RuntimeError):
        checkpoint_root = None
    return CheckpointModels(mlflow_client, run_id, params={k: v[:6000] for k, v in params.items()},
                            dataset=(manifest["dataset"], tracking.dataset_digest(manifest["manifest_hash"])),
                            model_tags={tags.MODEL: cfg.model.name, tags.DATASET: manifest["dataset"]},
                            checkpoint_root=checkpoint_root)
