"""``gan-pipeline tune``: Ray Tune over the one training loop.

Each trial is a Tune *function* trainable that builds and fits the same ``TorchTrainer`` as ``train``
(``pipelines.launch``); ``TuneReportCallback`` forwards what the workers report at each checkpoint, including the
cheap domain Fréchet distance (``pipelines.scoring.CheckpointScore``), so ASHA can stop bad trials early. MLflow: one
parent run for the sweep, one child run per trial; the best trial goes on through ``run``'s evaluate and register
stages (registered as ``candidate``).
"""
from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any, Optional

from pipelines import tags, tracking
from pipelines.config import ConfigError, PipelineConfig, config_from_dict, read_yaml
from pipelines.errors import UserError
from pipelines.job import absolute_config, absolute_tracking_uri

# Default search spaces per family: (section.key) -> distribution spec. Specs are plain data so that a YAML
# file can replace them: {"loguniform": [lo, hi]}, {"uniform": [lo, hi]}, {"randint": [lo, hi_inclusive]},
# {"choice": [...]}, {"grid": [...]} (every value, times --samples).
DEFAULT_SPACES: dict[str, dict[str, dict]] = {
    "wgan": {
        "optim.clip_value": {"loguniform": [0.003, 0.03]},
        "optim.n_critic": {"randint": [1, 10]},
        "optim.lr_g": {"loguniform": [1e-5, 2e-4]},
        "optim.lr_d": {"loguniform": [1e-5, 2e-4]},
    },
    "wgan-gp": {
        "optim.gp_weight": {"loguniform": [1.0, 30.0]},
        "optim.n_critic": {"randint": [1, 10]},
        "optim.lr_g": {"loguniform": [3e-5, 3e-4]},
        "optim.lr_d": {"loguniform": [3e-5, 3e-4]},
        "optim.beta1": {"choice": [0.0, 0.5]},
        "optim.beta2": {"choice": [0.9, 0.99]},
    },
    "dcgan": {
        "optim.lr_g": {"loguniform": [5e-5, 1e-3]},
        "optim.lr_d": {"loguniform": [5e-5, 1e-3]},
        "optim.beta1": {"uniform": [0.3, 0.9]},
    },
}
DEFAULT_SPACES["cgan"] = DEFAULT_SPACES["dcgan"]


def search_space(cfg: PipelineConfig, space_file: Optional[str] = None) -> dict[str, Any]:
    """The Tune search space: the family's default, or a YAML file's / the config's ``tune.space``."""
    from ray import tune

    spec = read_yaml(space_file) if space_file else (cfg.tune.space or DEFAULT_SPACES[cfg.model.name])
    space = {}
    for key, dist in spec.items():
        section, _, field = key.partition(".")
        model = getattr(cfg, section, None) if field else None
        if model is None or field not in type(model).model_fields:
            raise ConfigError(f"search space key {key!r} is not a config key (section.key, e.g. optim.lr_g)")
        if not isinstance(dist, dict) or len(dist) != 1:
            raise ConfigError(f"search space {key}: give one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}")
        (kind, args), = dist.items()
        makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice,
                  "grid": tune.grid_search, "randint": lambda lo, hi: tune.randint(lo, hi + 1)}
        if kind not in makers:
            raise ConfigError(f"search space {key}: unknown distribution {kind!r}; use {', '.join(makers)}")
        space[key] = makers[kind](args) if kind in ("choice", "grid") else makers[kind](*args)
    return space


def apply_trial(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    dump = cfg.model_dump(mode="json")
    for key, value in values.items():
        section, field = key.split(".", 1)
        dump[section][field] = value.item() if hasattr(value, "item") else value
    return config_from_dict(dump)


def tune_stage(cfg: PipelineConfig, space_file: Optional[str] = None) -> dict:
    from pipelines.runs import failed_on_error

    with failed_on_error() as created:
        return _tune_stage(cfg, space_file, created)


def _tune_stage(cfg: PipelineConfig, space_file: Optional[str], created) -> dict:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipelines import preflight
    from pipelines.cluster import ray_session
    from pipelines.launch import build_trainer, check_storage, finish_run, fit, make_job, storage_root
    from pipelines.prepare import ensure_dataset
    from pipelines.scoring import best_checkpoint, prepare_reference

    per_trial = cfg.tune.workers_per_trial
    concurrent = min(cfg.tune.max_concurrent or max(1, (os.cpu_count() or 1) // per_trial), cfg.tune.samples)
    preflight.check_local_size(cfg, concurrent * per_trial, "--max-concurrent x --workers-per-trial")
    # trials run in Ray actors with their own working directories: every path is fixed here, in the driver
    cfg = config_from_dict(absolute_config(cfg.model_dump(mode="json")))
    uri = absolute_tracking_uri(cfg.resolved_tracking_uri)
    tracking.check_reachable(uri)
    check_storage(storage_root(cfg))
    space = search_space(cfg, space_file)
    data_path, manifest = ensure_dataset(cfg)
    preflight.check_dataset_fits(cfg, manifest, data_path, needs_labels="tune (its domain distance)", workers=per_trial)
    mlflow_client = tracking.client(uri)
    sweep = f"tune-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_id = tracking.experiment_id(mlflow_client, cfg.tracking.experiment)
    parent = mlflow_client.create_run(exp_id, run_name=sweep, tags={tags.STAGE: "tune",
                                                                    tags.MODEL: cfg.model.name})
    parent_id = parent.info.run_id
    created(mlflow_client, parent_id)
    tracking.log_params(mlflow_client, parent_id, {**cfg.flat(), "data.manifest_hash": manifest["manifest_hash"],
                                                   "tune.space": str(space_file or cfg.tune.space or "default")})
    tracking.log_dataset_input(mlflow_client, parent_id, data_path, manifest, tracking.DATASET_TRAINING)
    # every trial's checkpoints are scored (the metric its scheduler reads), whatever train.score_checkpoints says
    reference = prepare_reference(cfg, data_path, manifest, samples=cfg.tune.report_samples)

    checkpoint_every = min(cfg.train.checkpoint_every, cfg.tune.report_every)
    base = cfg.model_copy(deep=True)
    base.train.workers = per_trial
    base.train.checkpoint_every = checkpoint_every
    storage = storage_root(cfg)

    def trial(values: dict) -> None:
        trial_cfg = apply_trial(base, values)
        context = tune.get_context()
        name = f"{sweep}-{context.get_trial_id()}"
        client = tracking.client(uri)
        child = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_id,
                                                               tags.STAGE: "tune-trial",
                                                               tags.MODEL: trial_cfg.model.name,
                                                               tags.RUN_NAME: name})
        tracking.log_params(client, child.info.run_id, {**trial_cfg.flat(), "data.manifest_hash": manifest["manifest_hash"]})
        tracking.log_dataset_input(client, child.info.run_id, data_path, manifest, tracking.DATASET_TRAINING)
        job = make_job(trial_cfg, data_path=data_path, run_id=child.info.run_id, tracking_uri=uri,
                       score_reference=reference)
        trainer = build_trainer(trial_cfg, job, run_name=name, callbacks=[TuneReportCallback()],
                                storage=f"{storage}/{sweep}")
        result = fit(trainer, client, child.info.run_id)
        best = best_checkpoint(result)
        with best.as_directory() as local:
            finish_run(client, child.info.run_id, Path(local), result.checkpoint.path, f"{storage}/{sweep}", name,
                       generator_checkpoint=best.path)

    steps = cfg.train.max_steps
    # max_t one past the last report: a trial that gets there ends by itself (and records its generator)
    # instead of being stopped by the scheduler at its final report.
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2,
                               max_t=max(1, (steps or 10 ** 6) // checkpoint_every) + 1)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    search_alg = None
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    trainable = tune.with_resources(trial, {"CPU": 0.01})
    cpus = concurrent * per_trial
    start = time.perf_counter()
    with ray_session(cfg.train.address, cpus_needed=per_trial, gpus_needed=per_trial if cfg.train.gpu else 0,
                     env=tracking.worker_env(uri), declare_cpus=cpus):
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="min", num_samples=cfg.tune.samples,
                                        scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=sweep, storage_path=storage, verbose=1),
        )
        results = tuner.fit()
    seconds = time.perf_counter() - start
    return _conclude(cfg, results, space, mlflow_client, parent_id, sweep, seconds)


def _conclude(cfg, results, space, mlflow_client, parent_id, sweep, seconds) -> dict:
    """Results table and plots on the parent run; the best trial evaluated in full and registered."""
    exp_id = mlflow_client.get_run(parent_id).info.experiment_id
    for child in mlflow_client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        if child.info.status == "RUNNING":  # its trial was stopped by the scheduler (or failed) mid-training
            mlflow_client.set_tag(child.info.run_id, tags.STOPPED_EARLY, "true")
            mlflow_client.set_terminated(child.info.run_id, status="KILLED")
    rows = []
    for result in results:
        config = {k: v for k, v in (result.config or {}).items()}
        metrics = result.metrics or {}
        rows.append({"trial_id": metrics.get("trial_id", ""), **config,
                     cfg.tune.metric: metrics.get(cfg.tune.metric), "step": metrics.get("step"),
                     "iterations": metrics.get("training_iteration"),
                     "error": type(result.error).__name__ if result.error else ""})
    if not rows:
        mlflow_client.set_terminated(parent_id, status="FAILED")
        raise UserError("the sweep produced no trials")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    mlflow_client.log_text(parent_id, buf.getvalue(), "tune_results.csv")
    mlflow_client.log_figure(parent_id, _plot(rows, list(space), cfg.tune.metric), "metric_vs_hyperparameters.png")
    try:
        best = results.get_best_result(metric=cfg.tune.metric, mode="min", filter_nan_and_inf=True)
    except RuntimeError as exc:
        mlflow_client.set_terminated(parent_id, status="FAILED")
        raise UserError(f"no trial reported {cfg.tune.metric}: {exc}") from None
    best_run = mlflow_client.search_runs(
        [mlflow_client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{tags.RUN_NAME}` = '{sweep}-{best.metrics['trial_id']}'")
    if not best_run:
        raise UserError("could not find the MLflow run of the best trial")
    best_run_id = best_run[0].info.run_id
    checkpoint_path = best.metrics.get("checkpoint_path")
    if mlflow_client.get_run(best_run_id).info.status != "FINISHED" and checkpoint_path:
        # the best trial was stopped by the scheduler after its best report: record the generator of the
        # checkpoint that report came with (TuneReportCallback passes its path)
        from ray.train import Checkpoint

        from pipelines.launch import finish_run

        with Checkpoint(checkpoint_path).as_directory() as local:
            finish_run(mlflow_client, best_run_id, Path(local), checkpoint_path, str(Path(checkpoint_path).parent),
                       best_run[0].data.tags.get(tags.RUN_NAME, ""))
    from pipelines.run import run_after_training

    outputs = run_after_training(cfg, sweep, {"run_id": best_run_id, "run_name": f"{sweep}-{best.metrics['trial_id']}"})
    metrics, registered = outputs["evaluate"]["metrics"], outputs["register"]
    mlflow_client.set_tag(parent_id, tags.BEST_RUN_ID, best_run_id)
    mlflow_client.log_metric(parent_id, f"best_{cfg.tune.metric}", float(best.metrics[cfg.tune.metric]))
    mlflow_client.set_terminated(parent_id, status="FINISHED")
    stopped = sum(1 for r in rows if r["iterations"] is not None and r["iterations"] < max(
        (x["iterations"] or 0) for x in rows))
    print(f"[gan-pipeline] sweep {sweep}: {len(rows)} trials in {seconds:.0f}s ({stopped} stopped early); best "
          f"{cfg.tune.metric} {best.metrics[cfg.tune.metric]:.3f} with {best.config}; registered "
          f"{registered['name']} v{registered['version']} @candidate; MLflow parent run {parent_id}")
    return {"parent_run_id": parent_id, "best_run_id": best_run_id, "best_config": best.config,
            "metrics": metrics, "registered": registered, "trials": rows}


def _plot(rows, keys, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[key] for r in rows if r.get(metric) is not None]
        ys = [r[metric] for r in rows if r.get(metric) is not None]
        ax.scatter(xs, ys)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key.startswith("optim.lr") or key in ("optim.clip_value", "optim.gp_weight"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
