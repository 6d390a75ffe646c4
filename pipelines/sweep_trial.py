"""One trial of a ``tune`` sweep: a Tune function trainable that fits the same ``TorchTrainer`` as ``train``.

Checkpoints cross from Train to Tune and back here, which is what makes population based training and resumed
sweeps work:

- Train -> Tune: a ``UserCallback`` on the trainer hands every checkpointed report (metrics + the persisted Train
  checkpoint) to the trial, which reports it with ``tune.report(metrics, checkpoint=...)``. (Ray's
  ``TuneReportCallback`` forwards metrics only: Tune would hold no checkpoint, and PBT would have nothing to copy.)
  Every report carries a checkpoint, so a trial can be exploited from its first report on.
- Tune -> Train: a trial that starts with ``tune.get_checkpoint()`` (its own last one after a pause or a dead
  driver, or a better trial's after a PBT exploit) trains a new *segment* (a Train run ``<trial>-s<k>``) resumed
  from it through the loop's resume path (``TrainJob.resume_from``): weights, both optimizers' state, step,
  moving average, time spent. The trial's current hyper-parameters are applied to the restored optimizers
  (``pipelines.loop.Worker.resume``): the optimizer state is carried, the learning rate is the trial's own.

MLflow: one child run per trial, whatever its segments; an exploit is recorded on it (tags, ``lineage.json``,
and ``hp.<key>`` metrics: the values the trial trained with, by step).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipelines import checkpoints, tags, tracking

# a config key of trial 0 only (the search algorithm's first point): the preset's own values
PRESET_KEY = "_preset"
LINEAGE_ARTIFACT = "lineage.json"
HYPERPARAMETER_METRIC_PREFIX = "hp."
SEGMENT_SEPARATOR = "-s"
DONOR_COPY_SEPARATOR = "-donor"  # the trial's own copy of a donor's checkpoint: <trial>-donor<segment index>


@dataclass(frozen=True)
class SweepPlan:
    """What every trial of a sweep shares, fixed in the driver (paths absolute): sent to the trial actors."""

    sweep: str
    sweep_storage: str          # the sweep's folder: Tune's trial folders and the trials' Train runs
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    base_config: dict           # PipelineConfig dump of a trial before its values
    data_path: str
    manifest: dict
    score_reference: dict
    preset_values: Optional[dict] = None  # trial 0's values (None: no preset trial in this sweep)
    # seconds since the epoch (--time-budget): no trial trains past it, whatever time its restarts and pauses took
    training_deadline: Optional[float] = None


def is_preset(config: dict, preset_values: Optional[dict]) -> bool:
    """Trial 0: marked by the search algorithm's first point (random search), or, where the algorithm keeps only
    its own keys (Optuna), recognised by its values."""
    if PRESET_KEY in config:
        return bool(config[PRESET_KEY])
    return bool(preset_values) and all(config.get(k) == v for k, v in preset_values.items())


def trial_values(config: dict) -> dict[str, Any]:
    """The hyper-parameter values in a Tune trial config (``section.key``), without the preset marker."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items() if not k.startswith("_")}


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def find_trial_run(client, plan: SweepPlan, name: str):
    runs = client.search_runs([plan.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{plan.parent_run_id}' and tags.`{tags.RUN_NAME}` = '{name}'"))
    return runs[0] if runs else None


class _ReportToTrial:
    """A Ray Train ``UserCallback`` (built lazily: Ray is imported in the trial): each checkpointed report goes
    into a queue that the trial reads and reports to Tune with its checkpoint."""

    @staticmethod
    def make(report_queue):
        from ray.train.v2.api.callback import UserCallback

        class ReportToTrial(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                if checkpoint is not None:
                    report_queue.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint})

        return ReportToTrial()


def _segments(trial_storage: Path, name: str) -> list[Path]:
    return sorted((p for p in trial_storage.glob(f"{name}{SEGMENT_SEPARATOR}*") if p.is_dir()),
                  key=lambda p: int(p.name.rsplit(SEGMENT_SEPARATOR, 1)[1]))


def _start_point(tune_checkpoint_dir: Optional[Path], own_run_id: str, previous_segment: Optional[Path]):
    """Where a trial's new segment starts: ``(checkpoint dir or None, donor run id or None)``.

    A Tune checkpoint written by another trial's run is a PBT exploit: the segment starts from it, nothing else.
    The trial's own Tune checkpoint may lag its Train checkpoints (the driver died between the Train checkpoint
    and Tune's record of it): the newer of the two is taken, as ``train --resume`` does. A checkpoint Tune hands
    over that is gone (its ``num_to_keep`` deleted it before this trial restarted) is passed over."""
    if tune_checkpoint_dir is not None and not (tune_checkpoint_dir / checkpoints.STATE_FILE).is_file():
        print(f"[gan-pipeline] the checkpoint Tune handed this trial is gone ({tune_checkpoint_dir}): it goes on "
              f"from its own last checkpoint", flush=True)
        tune_checkpoint_dir = None
    if tune_checkpoint_dir is not None:
        donor = checkpoints.read_run_config(tune_checkpoint_dir).get("mlflow_run_id")
        if donor != own_run_id:
            return tune_checkpoint_dir, donor
    own_latest = checkpoints.latest_checkpoint(previous_segment) if previous_segment else None
    candidates = [c for c in (tune_checkpoint_dir, own_latest) if c is not None]
    if not candidates:
        return None, None
    return max(candidates, key=lambda c: checkpoints.checkpoint_progress(c)["step"]), None


def _own_copy(donor_checkpoint: Path, trial_storage: Path, name: str, index: int) -> Optional[Path]:
    """The donor's checkpoint copied into this trial's storage before Ray Train starts
    (``<trial>-donor<segment>/checkpoint_<step>``, named as Train names its own), or None if it went away
    meanwhile. The donor trains on while this trial restarts (20-30 s on 2 cores), and Tune's ``num_to_keep``
    deletes the donor's older checkpoints: measured, asynchronous PBT handed over a donor's checkpoint 14 reports
    old that was deleted between this trial's start and its worker's load, and the trial failed."""
    folder = trial_storage / f"{name}{DONOR_COPY_SEPARATOR}{index}"
    partial = folder.with_name(folder.name + ".partial")
    for ours in (partial, folder):  # left by an earlier attempt of this segment
        shutil.rmtree(ours, ignore_errors=True)
    try:
        shutil.copytree(donor_checkpoint, partial)
        step = checkpoints.checkpoint_progress(partial)["step"]
    except (OSError, shutil.Error, checkpoints.CheckpointError):
        shutil.rmtree(partial, ignore_errors=True)
        return None
    folder.mkdir()
    target = folder / checkpoints.checkpoint_dir_name(step)
    os.replace(partial, target)
    return target


def _record_exploit(client, run_id: str, donor_run_id: str, own_step: int, donor_step: int,
                    values: dict[str, Any]) -> dict:
    """The exploit on the trial's run: tags for the runs table, an event appended to ``lineage.json``."""
    donor = client.get_run(donor_run_id)
    event = {"own_step": own_step, "copied_trial": donor.data.tags.get(tags.RUN_NAME, donor_run_id),
             "copied_run_id": donor_run_id, "copied_step": donor_step, "values": values}
    lineage = read_lineage(client, run_id)
    lineage.append(event)
    client.log_text(run_id, json.dumps(lineage, indent=2, sort_keys=True), LINEAGE_ARTIFACT)
    client.set_tag(run_id, tags.EXPLOITED_FROM, event["copied_trial"])
    client.set_tag(run_id, tags.EXPLOITED_AT_STEP, str(donor_step))
    client.set_tag(run_id, tags.EXPLOITS, str(len(lineage)))
    return event


def read_lineage(client, run_id: str) -> list[dict]:
    import tempfile

    if not any(a.path == LINEAGE_ARTIFACT for a in client.list_artifacts(run_id)):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, LINEAGE_ARTIFACT, tmp)).read_text())


def log_values(client, run_id: str, values: dict[str, Any], step: int) -> None:
    """The trial's current hyper-parameters as ``hp.<key>`` metrics at ``step``: PBT's schedules over time."""
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    client.log_batch(run_id, metrics=[Metric(HYPERPARAMETER_METRIC_PREFIX + k, v, now, step)
                                      for k, v in numeric.items()])


def run_trial(plan: SweepPlan, config: dict) -> None:
    """The Tune function trainable (bound to ``plan`` with ``functools.partial``)."""
    from ray import tune

    from pipelines.config import config_from_dict
    from pipelines.launch import build_trainer, fit, finish_run, make_job
    from pipelines.scoring import best_checkpoint
    from pipelines.tune import apply_trial

    values = trial_values(config)
    trial_cfg = apply_trial(config_from_dict(plan.base_config), values)
    name = trial_run_name(plan.sweep, tune.get_context().get_trial_id())
    client = tracking.client(plan.tracking_uri)
    existing = find_trial_run(client, plan, name)
    if existing is None:
        run_tags = {"mlflow.parentRunId": plan.parent_run_id, tags.STAGE: "tune-trial",
                    tags.MODEL: trial_cfg.model.name, tags.RUN_NAME: name}
        if is_preset(config, plan.preset_values):
            run_tags[tags.PRESET_TRIAL] = "true"
        run_id = client.create_run(plan.experiment_id, run_name=name, tags=run_tags).info.run_id
        tracking.log_params(client, run_id, {**trial_cfg.flat(), "data.manifest_hash": plan.manifest["manifest_hash"]})
        tracking.log_dataset_input(client, run_id, plan.data_path, plan.manifest, tracking.DATASET_TRAINING)
    else:  # a restart of this trial (PBT pause or exploit, a resumed sweep): its run goes on
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")

    trial_storage = Path(plan.sweep_storage)
    segments = _segments(trial_storage, name)
    previous = segments[-1] if segments else None
    tune_checkpoint = tune.get_checkpoint()
    with (tune_checkpoint.as_directory() if tune_checkpoint is not None else contextlib.nullcontext()) as local:
        start, donor = _start_point(Path(local) if local else None, run_id, previous)
        if donor is not None and "://" not in plan.sweep_storage:  # remote storage: ``local`` is a download
            copied = _own_copy(start, trial_storage, name, len(segments))
            if copied is None:
                print(f"[gan-pipeline] {name}: the donor's checkpoint {start} went away before it could be copied: "
                      f"the trial goes on from its own last checkpoint", flush=True)
                start, donor = _start_point(None, run_id, previous)
            else:
                start = copied
        start_step = checkpoints.checkpoint_progress(start)["step"] if start is not None else 0
        if donor is not None:
            event = _record_exploit(client, run_id, donor, tracking.committed_step(client, run_id), start_step, values)
            print(f"[gan-pipeline] {name}: exploit: copied {event['copied_trial']} at step {start_step}, "
                  f"continuing with {values}", flush=True)
        segment = f"{name}{SEGMENT_SEPARATOR}{len(segments)}"
        if start is not None and plan.training_deadline is not None and time.time() >= plan.training_deadline:
            # restarted after the sweep's deadline (a PBT trial that waited paused): it ends where it stopped
            print(f"[gan-pipeline] {name}: the sweep's time budget is spent; ending at step {start_step}", flush=True)
            finish_run(client, run_id, start, str(start), plan.sweep_storage,
                       previous.name if previous else segment, generator_checkpoint=str(start))
            return
        log_values(client, run_id, values, start_step)
        job = make_job(trial_cfg, data_path=plan.data_path, run_id=run_id, tracking_uri=plan.tracking_uri,
                       score_reference=plan.score_reference, resume_from=str(start) if start else None,
                       inherited=donor is not None, deadline=plan.training_deadline)
        report_queue = _queue()
        trainer = build_trainer(trial_cfg, job, run_name=segment, callbacks=[_ReportToTrial.make(report_queue)],
                                storage=plan.sweep_storage)
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = fit(trainer, client, run_id)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's own thread below
                outcome["error"] = exc

        thread = threading.Thread(target=train, name=f"fit-{segment}", daemon=True)
        thread.start()
        _forward_reports(report_queue, thread)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        best = best_checkpoint(result) if result.checkpoint is not None else None
        if best is None:  # the segment resumed at the trial's last step: nothing left to train
            from ray.train import Checkpoint

            best = Checkpoint.from_directory(str(start))
        with best.as_directory() as best_dir:
            latest = result.checkpoint.path if result.checkpoint is not None else str(start)
            finish_run(client, run_id, Path(best_dir), latest, plan.sweep_storage, segment,
                       generator_checkpoint=best.path)


def _forward_reports(report_queue, thread: threading.Thread) -> None:
    """Report every checkpointed Train report to Tune, in order, until training ended and the queue is empty.
    Tune may end the trial inside ``tune.report`` (ASHA stop, PBT pause): the trial actor then goes away, and
    its trainer with it."""
    from ray import tune

    while True:
        try:
            item = report_queue.get(timeout=1.0)
        except queue.Empty:  # ray.util.queue.Empty is one
            if not thread.is_alive() and report_queue.empty():
                return
            continue
        persisted = item["checkpoint"]  # Train's, already on storage: Tune copies it into the trial's folder
        tune.report(item["metrics"], checkpoint=tune.Checkpoint(persisted.path, filesystem=persisted.filesystem))


def _queue():
    from ray.util.queue import Queue

    # one item: the Train controller waits until the trial took the previous report (as TuneReportCallback does)
    return Queue(maxsize=1, actor_options={"num_cpus": 0})

