"""``gan-pipeline tune``: Ray Tune over the one training loop.

Each trial (``pipelines.sweep_trial``) is a Tune function trainable that fits the same ``TorchTrainer`` as
``train``; every checkpoint it reports carries the cheap domain Fréchet distance (``pipelines.scoring``), which the
scheduler reads: ASHA stops bad trials early, FIFO runs all to the end, PBT/PB2 copy a better trial's checkpoint
into a worse one and mutate its values. Trial 0 trains the preset's own values (the search algorithm's first
point), never stopped or exploited, so the sweep's verdict (``pipelines.sweep_verdict``) compares the best trial
with the preset at the same budget. A sweep is recorded in its folder (``sweep.json``) and can be continued after
its driver died: ``tune --resume NAME``. MLflow: one parent run per sweep, one child run per trial; the best
trial goes on through ``run``'s evaluate and register stages (registered as ``candidate``).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from pipelines import tags, tracking
from pipelines.config import ConfigError, PipelineConfig, TrainConfig, config_from_dict, read_yaml
from pipelines.errors import UserError
from pipelines.job import absolute_config, absolute_tracking_uri, cores_per_process
from pipelines.sweep_trial import PRESET_KEY, SweepPlan

# Default search spaces per family: (section.key) -> distribution spec. Specs are plain data so that a YAML
# file can replace them: {"loguniform": [lo, hi]}, {"uniform": [lo, hi]}, {"randint": [lo, hi_inclusive]},
# {"choice": [...]}, {"grid": [...]} (every value, times --samples).
DEFAULT_SPACES: dict[str, dict[str, dict]] = {
    "wgan": {  # around the preset (RMSProp 1e-3, c = 0.01, 5 critic steps: gan_models.presets)
        "optim.clip_value": {"loguniform": [0.003, 0.03]},
        "optim.n_critic": {"randint": [1, 10]},
        "optim.lr_g": {"loguniform": [2e-4, 3e-3]},
        "optim.lr_d": {"loguniform": [2e-4, 3e-3]},
    },
    "wgan-gp": {  # around the preset (Adam 8e-4, lambda = 10, 5 critic steps), the paper's 1e-4 included
        "optim.gp_weight": {"loguniform": [1.0, 30.0]},
        "optim.n_critic": {"randint": [1, 10]},
        "optim.lr_g": {"loguniform": [1e-4, 3e-3]},
        "optim.lr_d": {"loguniform": [1e-4, 3e-3]},
        "optim.beta1": {"choice": [0.0, 0.5]},
        "optim.beta2": {"choice": [0.9, 0.99]},
    },
    "dcgan": {  # around the preset (Adam 8e-4), the paper's 2e-4 included
        "optim.lr_g": {"loguniform": [1e-4, 3e-3]},
        "optim.lr_d": {"loguniform": [1e-4, 3e-3]},
        "optim.beta1": {"uniform": [0.3, 0.9]},
    },
}
DEFAULT_SPACES["cgan"] = DEFAULT_SPACES["dcgan"]


SWEEP_RECORD = "sweep.json"
PERTURBATION_REPORTS = 8  # default PBT interval, in reports (tune.perturbation_interval)
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# the part of a sweep's budget kept for Ray's start-up, the best trial's evaluation and its registration
BUDGET_RESERVE_FRACTION, BUDGET_RESERVE_MAX_S, MIN_TRIAL_BUDGET_S = 0.25, 120.0, 30.0


def space_spec(cfg: PipelineConfig, space_file: Optional[str] = None) -> dict[str, dict]:
    """The search space as plain data (``section.key -> {distribution: args}``), checked: the family's default,
    a YAML file's or the config's ``tune.space``."""
    spec = read_yaml(space_file) if space_file else (cfg.tune.space or DEFAULT_SPACES[cfg.model.name])
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("the search space is empty; give section.key: {distribution: args}, e.g. "
                          "optim.lr_g: {loguniform: [1e-5, 1e-3]}")
    for key, dist in spec.items():
        section, _, field = str(key).partition(".")
        model = getattr(cfg, section, None) if field else None
        if section not in ("optim", "model", "train") or model is None or field not in type(model).model_fields:
            raise ConfigError(f"search space key {key!r} is not a config key of a tunable section (optim.*, "
                              f"model.*, train.*; e.g. optim.lr_g)")
        if not isinstance(dist, dict) or len(dist) != 1:
            raise ConfigError(f"search space {key}: give one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}")
        (kind, args), = dist.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"search space {key}: unknown distribution {kind!r}; use {', '.join(DISTRIBUTIONS)}")
        if kind in ("loguniform", "uniform", "randint") and (
                not isinstance(args, list) or len(args) != 2 or not args[0] < args[1]):
            raise ConfigError(f"search space {key}: {kind} takes [low, high] with low < high, got {args!r}")
        if kind in ("choice", "grid") and (not isinstance(args, list) or not args):
            raise ConfigError(f"search space {key}: {kind} takes a non-empty list of values, got {args!r}")
        # every value must make a valid config: refused now, not by a trial after Ray's start-up
        samples = args if kind in ("choice", "grid") else list(args)
        for value in samples:
            try:
                apply_trial(cfg, {key: int(value) if kind == "randint" else value})
            except ConfigError as exc:
                raise ConfigError(f"search space {key}: value {value!r} is not valid: {exc}") from None
    return spec


def search_space(spec: dict[str, dict]) -> dict[str, Any]:
    """The Tune search space of a checked ``space_spec``."""
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice,
              "grid": tune.grid_search, "randint": lambda lo, hi: tune.randint(lo, hi + 1)}
    space = {}
    for key, dist in spec.items():
        (kind, args), = dist.items()
        space[key] = makers[kind](args) if kind in ("choice", "grid") else makers[kind](*args)
    return space


def preset_point(cfg: PipelineConfig, spec: dict[str, dict]) -> dict[str, Any]:
    """Trial 0: the preset's (the config's) own value of every key of the space."""
    point = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".", 1)[1]) for key in spec}
    return {**point, PRESET_KEY: True}


def budget_reserve(sweep_budget: float) -> float:
    """The share of a sweep's budget (at most 2 min) kept for start-up and the best trial's evaluation and
    registration."""
    return min(BUDGET_RESERVE_FRACTION * sweep_budget, BUDGET_RESERVE_MAX_S)


def trial_time_budget(sweep_budget: float, samples: int, concurrent: int) -> float:
    """A trial's training budget from the whole sweep's: the reserve kept, the rest split between the waves of
    concurrent trials. The sweep's deadline (``training_deadline``) caps it: time that trials spend starting,
    restarting (PBT) or paused is not training time, and would otherwise come on top of the budget."""
    waves = -(-samples // concurrent)
    return (sweep_budget - budget_reserve(sweep_budget)) / waves


def training_deadline(sweep_budget: float, started: float) -> float:
    """Seconds since the epoch after which no trial trains: the sweep's start plus its budget, less the reserve."""
    return started + sweep_budget - budget_reserve(sweep_budget)


def check_request(cfg: PipelineConfig, spec: dict[str, dict], concurrent: int) -> None:
    """What cannot run is refused here, before Ray starts or any MLflow run exists."""
    from pipelines import preflight

    t, kinds = cfg.tune, {key: next(iter(dist)) for key, dist in spec.items()}
    per_trial = t.workers_per_trial
    preflight.check_local_size(cfg, concurrent * per_trial, "--max-concurrent x --workers-per-trial")
    if not cfg.train.address and per_trial > (os.cpu_count() or 1):
        raise ConfigError(f"--workers-per-trial {per_trial} needs {per_trial} CPUs per trial; this machine has "
                          f"{os.cpu_count()}. Use --workers-per-trial {os.cpu_count() or 1} or join a cluster "
                          f"(--address).")
    if t.population_based:
        if t.search != "random":
            raise ConfigError(f"--scheduler {t.scheduler} explores by mutating its trials' values itself; it does "
                              f"not take --search {t.search}. Use --search random (the initial population).")
        if t.samples < 2:
            raise ConfigError(f"--scheduler {t.scheduler} needs a population: --samples 2 or more")
        grids = sorted(k for k, kind in kinds.items() if kind == "grid")
        if grids:
            raise ConfigError(f"--scheduler {t.scheduler} cannot mutate a grid ({', '.join(grids)}); use choice")
        interval = perturbation_interval(cfg)
        every = report_interval(cfg)
        if interval % every:
            raise ConfigError(f"tune.perturbation_interval {interval} is not a multiple of the report interval "
                              f"{every} (min of train.checkpoint_every and tune.report_every): an exploit copies "
                              f"the donor's last checkpoint, so decisions must fall on checkpoints")
    if t.scheduler == "pb2":
        discrete = sorted(k for k, kind in kinds.items() if kind in ("choice", "randint"))
        if discrete:
            raise ConfigError(f"--scheduler pb2 models continuous values only; {', '.join(discrete)} "
                              f"{'is' if len(discrete) == 1 else 'are'} discrete. Use --scheduler pbt or a space "
                              f"of uniform/loguniform keys (--space).")
        try:
            import sklearn  # noqa: F401  (PB2's Gaussian process)
        except ImportError:
            raise ConfigError("--scheduler pb2 needs scikit-learn (pip install scikit-learn); or use pbt") from None
    if t.search == "optuna" and any(kind == "grid" for kind in kinds.values()):
        raise ConfigError("--search optuna does not take grid distributions; use choice")
    if t.time_budget is not None:
        per_trial_budget = trial_time_budget(t.time_budget, t.samples, concurrent)
        if per_trial_budget < MIN_TRIAL_BUDGET_S:
            raise ConfigError(f"--time-budget {t.time_budget:.0f}s leaves {per_trial_budget:.0f}s per trial "
                              f"({t.samples} samples, {concurrent} at a time); a trial needs at least "
                              f"{MIN_TRIAL_BUDGET_S:.0f}s. Raise the budget or lower --samples.")


def report_interval(cfg: PipelineConfig) -> int:
    """Steps between a trial's reports (each one a scored checkpoint)."""
    return min(cfg.train.checkpoint_every or cfg.tune.report_every, cfg.tune.report_every)


def perturbation_interval(cfg: PipelineConfig) -> int:
    return cfg.tune.perturbation_interval or PERTURBATION_REPORTS * report_interval(cfg)


def tune_checkpoints_to_keep(cfg: PipelineConfig) -> int:
    """Checkpoints Tune keeps per trial. Under PBT an exploiting trial restores the donor's checkpoint of the
    decision, but with fewer trials running than the population holds it may restart only after the donor trained
    a whole interval on (measured: the donor was 8 reports on, its checkpoint deleted, the trial failed): a
    donor's reports of one interval, and one more, are kept."""
    keep = max(3, cfg.train.keep_checkpoints or 3)
    if cfg.tune.population_based:
        keep = max(keep, perturbation_interval(cfg) // report_interval(cfg) + 2)
    return keep


def apply_trial(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with a trial's values; an integer key gets an integer (PB2 and PBT's perturbations are floats)."""
    dump = cfg.model_dump(mode="json")
    for key, value in values.items():
        if key.startswith("_"):
            continue
        section, field = key.split(".", 1)
        value = value.item() if hasattr(value, "item") else value
        if isinstance(dump[section].get(field), int) and not isinstance(dump[section][field], bool):
            value = int(round(value))
        dump[section][field] = value
    return config_from_dict(dump)


def tune_stage(cfg: PipelineConfig, space_file: Optional[str] = None) -> dict:
    from pipelines.runs import failed_on_error

    with failed_on_error() as created:
        return _new_sweep(cfg, space_file, created)


def _concurrency(cfg: PipelineConfig) -> int:
    per_trial = cfg.tune.workers_per_trial
    return min(cfg.tune.max_concurrent or max(1, (os.cpu_count() or 1) // per_trial), cfg.tune.samples)


def trial_threads(cfg: PipelineConfig, concurrent: int) -> Optional[int]:
    """Torch threads per trial worker. On a local instance the concurrent trials share this machine's cores, so
    each worker gets its share (``--threads-per-worker`` overrides): with the single-run default (all cores per
    worker) two trials on 2 cores ran 4.4x slower than with one thread each, their OpenMP threads spinning on
    each other's cores (``benchmarks/bench_trial_threads.py``). On a cluster (``--address``) the driver does not
    know the nodes' cores: None keeps the worker's own rule."""
    if cfg.train.threads_per_worker or cfg.train.address:
        return cfg.train.threads_per_worker
    return cores_per_process(concurrent * cfg.tune.workers_per_trial)


def _new_sweep(cfg: PipelineConfig, space_file: Optional[str], created) -> dict:
    from pipelines import preflight
    from pipelines.launch import check_storage, storage_root
    from pipelines.prepare import ensure_dataset
    from pipelines.scoring import prepare_reference

    started = time.time()
    concurrent = _concurrency(cfg)
    # trials run in Ray actors with their own working directories: every path is fixed here, in the driver
    cfg = config_from_dict(absolute_config(cfg.model_dump(mode="json")))
    spec = space_spec(cfg, space_file)
    check_request(cfg, spec, concurrent)
    uri = absolute_tracking_uri(cfg.resolved_tracking_uri)
    tracking.check_reachable(uri)
    storage = storage_root(cfg)
    check_storage(storage)
    data_path, manifest = ensure_dataset(cfg)
    preflight.check_dataset_fits(cfg, manifest, data_path, needs_labels="tune (its domain distance)",
                                 workers=cfg.tune.workers_per_trial)
    mlflow_client = tracking.client(uri)
    sweep = f"tune-{cfg.model.name}-{cfg.tune.scheduler}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_id = tracking.experiment_id(mlflow_client, cfg.tracking.experiment)
    parent = mlflow_client.create_run(exp_id, run_name=sweep, tags={
        tags.STAGE: "tune", tags.MODEL: cfg.model.name, tags.SWEEP: sweep, tags.SCHEDULER: cfg.tune.scheduler})
    parent_id = parent.info.run_id
    created(mlflow_client, parent_id)
    tracking.log_params(mlflow_client, parent_id, {**cfg.flat(), "data.manifest_hash": manifest["manifest_hash"],
                                                   "tune.space": str(space_file or cfg.tune.space or "default"),
                                                   "tune.concurrent_trials": concurrent})
    tracking.log_dataset_input(mlflow_client, parent_id, data_path, manifest, tracking.DATASET_TRAINING)
    # every trial's checkpoints are scored (the metric its scheduler reads), whatever train.score_checkpoints says
    reference = prepare_reference(cfg, data_path, manifest, samples=cfg.tune.report_samples)

    base = cfg.model_copy(deep=True)
    base.train.workers = cfg.tune.workers_per_trial
    base.train.threads_per_worker = trial_threads(cfg, concurrent)
    base.train.checkpoint_every = report_interval(cfg)
    if cfg.tune.time_budget is not None:
        base.train.time_budget = trial_time_budget(cfg.tune.time_budget, cfg.tune.samples, concurrent)
        mlflow_client.log_param(parent_id, "tune.trial_time_budget", round(base.train.time_budget, 1))
    preset = preset_point(cfg, spec) if cfg.tune.include_preset else None
    plan = SweepPlan(sweep=sweep, sweep_storage=f"{storage}/{sweep}", tracking_uri=uri, parent_run_id=parent_id,
                     experiment_id=exp_id, base_config=base.model_dump(mode="json"), data_path=data_path,
                     manifest=manifest, score_reference=reference,
                     preset_values={k: v for k, v in preset.items() if k != PRESET_KEY} if preset else None,
                     training_deadline=(training_deadline(cfg.tune.time_budget, started)
                                        if cfg.tune.time_budget is not None else None))
    from pipelines.files import atomic_write

    # what --resume needs, credentials left out (a tracking URI's user:password@ comes from the resuming command)
    record_plan = {**asdict(plan), "tracking_uri": tracking.redact_uri(uri),
                   "base_config": tracking.redact_config(plan.base_config)}
    atomic_write(Path(plan.sweep_storage) / SWEEP_RECORD, json.dumps(
        {"plan": record_plan, "config": tracking.redact_config(cfg.model_dump(mode="json")), "space": spec,
         "concurrent": concurrent}, indent=2, sort_keys=True))
    print(f"[gan-pipeline] sweep {sweep}: {cfg.tune.samples} trials ({cfg.tune.scheduler}), {concurrent} at a "
          f"time; if this driver dies: gan-pipeline tune --resume {sweep}"
          + (f" --runs-dir {cfg.runs_dir}" if not cfg.train.storage_path else f" --storage-path {storage}"),
          flush=True)
    return _fit(cfg, plan, spec, concurrent, mlflow_client, restore=False)


def resume_stage(cfg: PipelineConfig, name: str) -> dict:
    """Continue the sweep ``name``: finished trials kept, the others from their last checkpoints, its MLflow runs
    continued. Its own recorded config is used (the options given now only locate it)."""
    from pipelines.launch import storage_root
    from pipelines.runs import failed_on_error
    from pipelines.safety import check_name

    check_name(name, "--resume")
    storage = storage_root(config_from_dict(absolute_config(cfg.model_dump(mode="json"))))
    record_path = Path(storage) / name / SWEEP_RECORD
    if "://" in storage or not record_path.is_file():
        known = sorted(p.parent.name for p in Path(storage).glob(f"*/{SWEEP_RECORD}")) if "://" not in storage else []
        raise UserError(f"no sweep named {name!r} under {storage}"
                        + (f"; sweeps there: {', '.join(known[-8:])}" if known else "; there is no sweep there")
                        + ". Pass the --runs-dir (or --storage-path) the sweep was started with.")
    from ray.tune import Tuner

    if not Tuner.can_restore(str(record_path.parent)):
        raise UserError(f"sweep {name} stopped before its first trial started: there is nothing to continue; "
                        f"start a new sweep (gan-pipeline tune ...)")
    record = json.loads(record_path.read_text())
    # the deadline was the dead driver's: the resumed trials keep their own time budgets (what they have left)
    plan = replace(SweepPlan(**record["plan"]), training_deadline=None)
    sweep_cfg = config_from_dict(record["config"])
    current_uri = absolute_tracking_uri(cfg.resolved_tracking_uri)
    if tracking.redact_uri(current_uri) == plan.tracking_uri and current_uri != plan.tracking_uri:
        # the sweep's tracking server with the credentials recorded nowhere: this command's
        plan = replace(plan, tracking_uri=current_uri)
        sweep_cfg.tracking.tracking_uri = current_uri if sweep_cfg.tracking.tracking_uri else None
    mlflow_client = tracking.client(plan.tracking_uri)
    tracking.check_reachable(plan.tracking_uri)
    parent = mlflow_client.get_run(plan.parent_run_id)
    if parent.info.status == "FINISHED":
        raise UserError(f"sweep {name} already finished (MLflow run {plan.parent_run_id}); nothing to resume")
    mlflow_client.update_run(plan.parent_run_id, status="RUNNING")
    print(f"[gan-pipeline] resuming sweep {name}: finished trials kept, the others from their last checkpoints",
          flush=True)
    with failed_on_error() as created:
        created(mlflow_client, plan.parent_run_id)
        return _fit(sweep_cfg, plan, record["space"], int(record["concurrent"]), mlflow_client, restore=True)


def make_scheduler(cfg: PipelineConfig, spec: dict[str, dict], preset_values: Optional[dict] = None):
    """The trial scheduler. PBT and PB2 decide on the loop's own step counter (``step``, continued by an exploited
    trial from its donor's), every ``perturbation_interval`` steps: a multiple of the report interval, so every
    decision falls on a checkpoint (``check_request``)."""
    from pipelines.sweep_schedulers import SCHEDULERS as schedulers

    kind = cfg.tune.scheduler
    scheduler = _scheduler(cfg, spec, schedulers)
    scheduler.preset_values = preset_values
    scheduler.final_step = cfg.train.max_steps
    return scheduler


def _scheduler(cfg: PipelineConfig, spec: dict[str, dict], schedulers: dict):
    kind = cfg.tune.scheduler
    if kind == "fifo":
        return schedulers["fifo"]()
    if kind == "asha":
        steps = cfg.train.max_steps
        # max_t one past the last report: a trial that gets there ends by itself (and records its generator)
        # instead of being stopped by the scheduler at its final report.
        return schedulers["asha"](time_attr="training_iteration", grace_period=1, reduction_factor=2,
                                  max_t=max(1, (steps or 10 ** 6) // report_interval(cfg)) + 1)
    common = {"time_attr": "step", "perturbation_interval": perturbation_interval(cfg), "quantile_fraction": 0.5,
              "synch": cfg.tune.pbt_synch}
    if kind == "pb2":
        bounds = {key: list(next(iter(dist.values()))) for key, dist in spec.items()}
        return schedulers["pb2"](hyperparam_bounds=bounds, custom_explore_fn=_within(spec), **common)
    mutations = {}
    for key, dist in spec.items():
        (dist_kind, args), = dist.items()
        mutations[key] = list(args) if dist_kind == "choice" else search_space({key: dist})[key]
    return schedulers["pbt"](hyperparam_mutations=mutations, custom_explore_fn=_within(spec),
                             resample_probability=0.25, **common)


def _within(spec: dict[str, dict]):
    """PBT's explore multiplies values by 0.8 or 1.2: kept inside the space's bounds (and integers integral); the
    preset's marker is not inherited."""
    bounds = {key: (kind, args) for key, dist in spec.items() for kind, args in dist.items()
              if kind in ("loguniform", "uniform", "randint")}

    def explore(config: dict) -> dict:
        # PBT clones the donor's whole config: a trial that copied the preset's trial is not the preset
        config[PRESET_KEY] = False
        for key, (kind, (low, high)) in bounds.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if kind == "randint" else value
        return config

    return explore


# what a trial's own function (it only waits on its TorchTrainer) reserves; counted when the local instance's CPUs
# are declared: without it, two trials of 1 CPU each on 2 declared CPUs could not both start their workers, and the
# second one's worker group timed out again and again while the first trained alone
TRIAL_DRIVER_CPU = 0.01
# A local instance's trial slots, one per concurrent trial. A trial's own CPU is a token (its Train workers ask for
# theirs separately, where Tune does not see them), so without a resource that Tune counts every trial would start
# at once and the extra ones' worker groups would time out while waiting for CPUs. With the slots Tune keeps the
# extra trials PENDING, and PBT time-shares the population (it pauses a trial at a perturbation point and starts a
# pending one), which a search generator's max_concurrent cannot do: paused trials count against that limit.
TRIAL_SLOT = "gan_pipeline_trial_slot"


def declared_cpus(concurrent: int, worker_cpus: int) -> int:
    """CPUs a local instance declares so that ``concurrent`` trials run at once: their workers' and their own."""
    return math.ceil(concurrent * (worker_cpus + TRIAL_DRIVER_CPU))


def _trainable(plan: SweepPlan, local: bool):
    from ray import tune

    from pipelines.sweep_trial import run_trial

    def trial(config: dict) -> None:  # one name, so that Tuner.restore finds the sweep's trainable
        run_trial(plan, config)

    return tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPU, **({TRIAL_SLOT: 1} if local else {})})


def _fit(cfg: PipelineConfig, plan: SweepPlan, spec: dict, concurrent: int, mlflow_client, restore: bool) -> dict:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.cluster import ray_session
    from pipelines.launch import storage_root

    per_trial = cfg.tune.workers_per_trial
    local = not cfg.train.address
    population_based = cfg.tune.population_based
    # the threads the trials were given when the sweep was planned (a resumed sweep keeps them)
    cpus = per_trial * TrainConfig.model_validate(plan.base_config["train"]).cpus_per_worker
    storage = storage_root(cfg)
    start = time.perf_counter()
    with ray_session(cfg.train.address, cpus_needed=cpus, gpus_needed=per_trial if cfg.train.gpu else 0,
                     env=tracking.worker_env(plan.tracking_uri),
                     declare_cpus=declared_cpus(concurrent, cpus), resources={TRIAL_SLOT: concurrent}):
        if restore:
            tuner = tune.Tuner.restore(plan.sweep_storage, trainable=_trainable(plan, local), resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            points = [preset_point(cfg, spec)] if cfg.tune.include_preset else []
            space = {**search_space(spec), PRESET_KEY: False}
            samples = cfg.tune.samples
            if points and any(next(iter(d)) == "grid" for d in spec.values()):
                samples += 1  # a point replaces one sample, and with a grid one sample is the whole grid
            if cfg.tune.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch

                space.pop(PRESET_KEY)  # Optuna keeps its own keys only: the preset is recognised by its values
                search_alg = OptunaSearch(points_to_evaluate=[{k: v for k, v in p.items() if k != PRESET_KEY}
                                                              for p in points] or None)
            else:
                # Ray applies max_concurrent_trials to a Searcher only: a generator passed in carries its own
                # limit (without it --max-concurrent was ignored on a cluster). Not for PBT: see TRIAL_SLOT.
                search_alg = BasicVariantGenerator(points_to_evaluate=points or None,
                                                   max_concurrent=0 if population_based else concurrent)
            keep = tune_checkpoints_to_keep(cfg)
            tuner = tune.Tuner(
                _trainable(plan, local),
                param_space=space,
                tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="min", num_samples=samples,
                                            scheduler=make_scheduler(cfg, spec, plan.preset_values),
                                            search_alg=search_alg,
                                            max_concurrent_trials=None if population_based else concurrent),
                run_config=tune.RunConfig(name=plan.sweep, storage_path=storage, verbose=1,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)),
            )
        results = tuner.fit()
    seconds = time.perf_counter() - start
    from pipelines.sweep_verdict import conclude

    return conclude(cfg, plan, results, spec, mlflow_client, seconds)
