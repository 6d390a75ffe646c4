"""The one typed configuration that flows from the CLI or a YAML file through every stage.

Precedence, lowest first: the model preset (``gan_models.presets``), a YAML file (``--config``), CLI options.
Unknown keys and wrong types are errors, never silently ignored. Stages receive a ``PipelineConfig`` and never
re-parse options.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gan_models.presets import PRESETS, preset
from gan_models.step import GANSpec

SUPPORTED_RESOLUTIONS = (28, 32, 64)
# `gan-pipeline train` with neither --epochs, --max-steps nor --time-budget trains this long.
DEFAULT_TIME_BUDGET = 450.0
# `gan-pipeline run` promises the whole command in 10 minutes (issue 16). With no limit given, its training ends
# this long after the command started, whatever start-up took (Ray and its workers; a first run in a runs folder
# also trains evaluate's domain classifier, 74 s on an AVX2-only 2-core CPU). The rest is the final checkpoint,
# evaluate and register: ~60 s on an AVX2-only 2-core CPU (docs/quality.md), and a margin.
RUN_TRAINING_ENDS_AFTER = 510.0
# ... unless start-up alone took most of that (a large dataset's first prepare): then the promise is lost anyway and
# training still gets this long.
RUN_MIN_TRAINING = 180.0

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """'450', '90s', '8m', '1h30m', '7m30s' -> seconds."""
    match = _DURATION.match(text)
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration; write seconds or e.g. 90s, 8m, 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds
DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagefolder")


class ConfigError(ValueError):
    """A configuration problem, worded for the person who typed it."""

    exit_code = 2  # a bad value or config file (pipelines.guard)


class _Strict(BaseModel):
    # inf/nan are refused everywhere: `lr_g: .inf` or `clip_value: .inf` (clipping silently off) are typos, not settings
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Architecture, objective and conditioning. Defaults come from the preset named by ``name``."""

    name: Literal["dcgan", "cgan", "wgan", "wgan-gp"] = "dcgan"
    objective: Literal["bce", "wasserstein", "wasserstein-gp"] = "bce"
    conditional: bool = False
    num_classes: int = Field(10, ge=2)
    aux_class_weight: float = Field(0.0, ge=0.0)
    code_categories: int = Field(0, ge=0, description="InfoGAN categorical latent code: categories (0 = none; "
                                 "unconditional models only)")
    code_weight: float = Field(1.0, ge=0.0, description="weight of InfoGAN's mutual-information term in G's loss")
    code_continuous: int = Field(0, ge=0, description="InfoGAN continuous codes beside the categorical one "
                                 "(z's entries after it, regressed by Q; 0 = none)")
    critic_batchnorm: bool = True
    nz: int = Field(100, ge=1)
    ngf: Optional[int] = Field(None, ge=4, description="generator width; default 32 up to 32 px, 64 at 64 px")
    ndf: Optional[int] = Field(None, ge=4, description="critic width; default as ngf")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.objective == "wasserstein-gp" and self.critic_batchnorm:
            raise ValueError(
                "critic_batchnorm=true with objective wasserstein-gp: the gradient penalty is per-sample and "
                "batch norm couples samples; set model.critic_batchnorm: false"
            )
        if self.aux_class_weight > 0 and not self.conditional:
            raise ValueError("aux_class_weight > 0 needs conditional: true (the term pushes samples to their label)")
        if self.code_categories and self.conditional:
            raise ValueError("code_categories > 0 is for unconditional models (a conditional model has its label as "
                             "its code); set model.code_categories: 0")
        if self.code_categories == 1:
            raise ValueError("code_categories: 1 is not a code (one category carries no information); use 0 or >= 2")
        if self.code_continuous and not self.code_categories:
            raise ValueError("code_continuous > 0 needs a categorical code beside it (model.code_categories >= 2); "
                             "set model.code_continuous: 0")
        codes = self.code_categories + self.code_continuous
        if codes > self.nz:
            raise ValueError(f"a latent code of {codes} entries (code_categories + code_continuous) needs nz >= "
                             f"{codes} (the code is read from the noise); raise model.nz or lower the code")
        return self


class OptimConfig(_Strict):
    optimizer: Literal["adam", "rmsprop"] = "adam"
    lr_g: float = Field(2e-4, gt=0, le=1.0)
    lr_d: float = Field(2e-4, gt=0, le=1.0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    # bounds: a generator step runs n_critic critic steps (1,000,000 made one "step" of 1,000 epochs); a clip
    # bound >= 1 leaves the critic's weights (|w| << 1) unclipped
    n_critic: int = Field(1, ge=1, le=100, description="critic updates per generator update")
    critic_warmup: bool = Field(False, description="WGAN reference code: 100 critic updates for the first 25 "
                                                   "generator steps and every 500th (gan_models.step)")
    clip_value: Optional[float] = Field(None, gt=0, lt=1.0, description="WGAN weight clipping bound c")
    gp_weight: float = Field(0.0, ge=0, le=1000.0, description="WGAN-GP penalty weight lambda")
    lr_decay_from: float = Field(1.0, gt=0, le=1.0, description="fraction of the run (steps or time budget) after "
                                                               "which the learning rates decay linearly; 1 = constant")
    lr_final_scale: float = Field(0.05, ge=0, le=1.0, description="learning-rate multiplier reached at the run's end")


class DataConfig(_Strict):
    dataset: Literal["mnist", "fashion-mnist", "cifar10", "imagefolder"] = "mnist"
    source: Optional[str] = Field(None, description="folder with the dataset's original files")
    path: Optional[str] = Field(None, description="prepared dataset (local dir or pyarrow URI); default under runs dir")
    resolution: Optional[int] = Field(None, description="pixels; default: the dataset's native size")
    channels: Optional[int] = Field(None, description="1 or 3; default: the dataset's own")
    heldout_fraction: float = Field(1 / 7, gt=0, lt=1, description="used where a dataset has no test split")
    shard_rows: int = Field(10_000, ge=100)
    strict: bool = False
    download: bool = False
    limit: Optional[int] = Field(
        None, ge=1, description="keep only the first N examples of each split (tests, quick runs); none = all"
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.resolution is not None and self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"resolution {self.resolution} is not supported; use one of {SUPPORTED_RESOLUTIONS}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.dataset == "imagefolder" and not self.source:
            raise ValueError("dataset imagefolder needs data.source (the folder of images)")
        return self


class TrainConfig(_Strict):
    workers: int = Field(1, ge=1, le=1024, description="a local instance is bounded further by the machine's "
                                                       "cores (pipelines.preflight)")
    gpu: bool = False
    address: Optional[str] = Field(None, description="Ray cluster to join: auto, ray://host:10001; none = local")
    time_budget: Optional[float] = Field(
        None, gt=0, description="wall-clock training budget in seconds ('90s', '8m', '1h30m' accepted): training "
                                "ends at the deadline with a final checkpoint. Default, unless --epochs or --max-steps "
                                "is given: 7m30s for train; for run, until 8m30s after the command started, so that "
                                "the whole command ends within 10 minutes")
    epochs: Optional[int] = Field(None, ge=1, description="epochs of the train split")
    max_steps: Optional[int] = Field(None, ge=1, description="generator steps; wins over epochs")
    batch_size: int = Field(64, ge=2, description="global batch, split evenly across the workers")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy and torch seeds (0 .. 2**32-1)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the CPU or GPU has bf16 units, else fp32")
    ema_half_life: float = Field(10_000, ge=0, description="half-life in images of the moving average of G's "
                                                          "weights (gan_models.ema); 0 = off")
    score_checkpoints: bool = Field(True, description="domain FD of G (and its average) at every checkpoint; the "
                                                      "best checkpoint is the run's generator")
    score_samples: int = Field(2000, ge=100, description="generated images per checkpoint score")
    channels_last: bool = Field(True, description="NHWC memory format for G, D and batches: faster on CPU, "
                                                 "neutral on GPU (docs/performance.md)")
    compile: bool = Field(False, description="torch.compile G and D (docs/performance.md)")
    checkpoint_every: Optional[int] = Field(None, ge=1, description="generator steps between checkpoints; unset: "
                                                                     "every checkpoint_interval of training")
    checkpoint_interval: float = Field(
        60, gt=0, description="training seconds between checkpoints when checkpoint_every is unset ('90s', '2m' "
                              "accepted). Every checkpoint is scored (score_checkpoints): by time, scoring costs "
                              "the same few percent of a run on any machine; every 200 steps it cost 20% of a "
                              "DCGAN run on 2 CPU cores (docs/quality.md)")
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(200, ge=1)
    max_failures: int = Field(0, ge=0)
    storage_path: Optional[str] = Field(None, description="checkpoints (local, NFS or cloud URI); default runs dir")
    threads_per_worker: Optional[int] = Field(None, ge=1)

    @field_validator("time_budget", "checkpoint_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @property
    def resolved_time_budget(self) -> Optional[float]:
        """Seconds of training: the budget given, the default one when no epoch or step limit is given either."""
        if self.default_limits:
            return DEFAULT_TIME_BUDGET
        return self.time_budget

    @property
    def default_limits(self) -> bool:
        """Neither a budget, epochs nor steps given: the command picks how long to train."""
        return self.time_budget is None and self.epochs is None and self.max_steps is None

    def batch_per_worker(self) -> int:
        return self.batch_size // self.workers

    @property
    def cpus_per_worker(self) -> int:
        """Ray CPUs a worker reserves: its torch threads (one when unset, the worker then takes the local rule)."""
        return self.threads_per_worker or 1

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainConfig":
        if self.batch_size % self.workers or self.batch_size // self.workers < 2:
            raise ValueError(f"batch_size {self.batch_size} is the global batch and must split evenly into at least "
                             f"2 images per worker over {self.workers} workers; use a multiple of {self.workers} "
                             f"(e.g. {max(2, -(-self.batch_size // self.workers)) * self.workers})")
        return self

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> "TrainConfig":
        # Checked here, not in the Ray workers: there it surfaced as a worker traceback after a minute of startup.
        if self.precision == "fp16" and not self.gpu:
            raise ValueError("precision fp16 needs a GPU (--gpu): fp16 autocast is for GPUs; on CPU use "
                             "--precision bf16 or fp32")
        return self


class TrackingConfig(_Strict):
    tracking_uri: Optional[str] = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite in cwd")
    experiment: str = "gan-pipeline"


class EvalConfig(_Strict):
    num_samples: int = Field(10_000, ge=10, le=1_000_000)
    batch_size: int = Field(500, ge=1)
    seed: int = Field(1234, ge=0, le=2**32 - 1)
    inception: bool = True
    inception_weights: Optional[str] = None
    kid_subset_size: int = Field(1000, ge=2)
    classifier_epochs: int = Field(1, ge=1)
    kid_num_subsets: int = Field(100, ge=1, description="random subsets KID is averaged over")
    precision_recall_k: int = Field(3, ge=1, description="k of the k-NN radii for precision/recall")
    density_coverage_k: int = Field(5, ge=1, description="k of the k-NN radii for density/coverage")
    classifier_score_splits: int = Field(1, ge=1, description="splits for the classifier score's mean/std")
    inception_num_samples: Optional[int] = Field(
        None, ge=2, description="cap on images per side through Inception (slow on CPU); none = all")
    metrics: Optional[list[str]] = Field(
        None, description="metric names from pipelines.metrics.METRICS; none = every one that applies")


class RegisterConfig(_Strict):
    name: Optional[str] = Field(None, description="registered model name; default <dataset>-<model>")
    alias: str = "candidate"
    promote_metric: str = "domain_fd"
    promote: bool = False


class TuneConfig(_Strict):
    samples: int = Field(4, ge=1, description="trials (the preset's own trial included, see include_preset)")
    workers_per_trial: int = Field(1, ge=1)
    max_concurrent: Optional[int] = Field(None, ge=1)
    scheduler: Literal["asha", "fifo", "pbt", "pb2"] = Field(
        "asha", description="asha: stop bad trials early; fifo: every trial to the end; pbt: population based "
                            "training (exploit a better trial's checkpoint, explore by mutating its values); pb2: "
                            "PBT with a Gaussian-process explore step (continuous values only)")
    search: Literal["random", "optuna"] = "random"
    metric: str = "domain_fd"
    report_every: int = Field(50, ge=1, description="steps between a trial's scored checkpoints (its reports)")
    report_samples: int = Field(1000, ge=100)
    perturbation_interval: Optional[int] = Field(
        None, ge=1, description="pbt/pb2: generator steps between exploit/explore decisions; a multiple of the "
                                "report interval (every report carries a checkpoint). Default: 8 reports (a "
                                "synchronous PBT decision restarts every trial, ~20-30 s each on 2 cores: at 2 "
                                "reports of WGAN that was as long as the training between them)")
    pbt_synch: bool = Field(
        True, description="pbt/pb2: every trial waits at each perturbation point until the population got there "
                          "(a restart per trial and interval). Needed where fewer trials run at once than the "
                          "population holds, or trials start at different times (a few cores); false on a "
                          "cluster that runs the whole population at once")
    include_preset: bool = Field(True, description="trial 0 trains the preset's own values (never stopped or "
                                                   "exploited): the verdict compares the best trial with it")
    time_budget: Optional[float] = Field(
        None, gt=0, description="wall-clock budget of the whole sweep ('20m'): each trial trains "
                                "time_budget x concurrent trials / samples (pipelines.tune.trial_time_budget)")
    space: Optional[dict[str, Any]] = None

    @property
    def population_based(self) -> bool:
        """PBT and PB2: trials copy a better trial's checkpoint and values at perturbation points."""
        return self.scheduler in ("pbt", "pb2")

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class PipelineConfig(_Strict):
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegisterConfig = RegisterConfig()
    tune: TuneConfig = TuneConfig()
    runs_dir: str = "gan-runs"

    # ---- derived values: one place, so no stage recomputes them differently
    @property
    def resolved_tracking_uri(self) -> str:
        uri = self.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        # Ray workers have their own working directory: a relative sqlite URI would point elsewhere there.
        return f"sqlite:///{Path('mlflow.db').resolve()}"

    @property
    def registered_name(self) -> str:
        return self.registry.name or f"{self.data.dataset}-{self.model.name}"

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` for logging as MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[f"{section}.{key}"] = value
            else:
                out[section] = values
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved_precision(self) -> str:
        """``auto`` decided by this machine's hardware (in a worker: the worker's)."""
        if self.train.precision != "auto":
            return self.train.precision
        from gan_models.performance import default_precision

        return default_precision("cuda" if self.train.gpu else "cpu")

    def gan_spec(self, resolution: int, channels: int, num_classes: int) -> GANSpec:
        """The config mapped onto what the science needs (geometry comes from the dataset's manifest)."""
        m, o = self.model, self.optim
        # 32 channels at the widest-resolution layer suffice for 28/32 px digits and keep CPUs fast; 64 px images
        # get the DCGAN reference width.
        default_width = 64 if resolution >= 64 else 32
        return GANSpec(
            resolution=resolution, channels=channels, nz=m.nz, ngf=m.ngf or default_width,
            ndf=m.ndf or m.ngf or default_width, objective=m.objective,
            conditional=m.conditional, num_classes=num_classes if m.conditional else m.num_classes,
            critic_batchnorm=m.critic_batchnorm, aux_class_weight=m.aux_class_weight,
            code_categories=m.code_categories, code_weight=m.code_weight, code_continuous=m.code_continuous,
            optimizer=o.optimizer,
            lr_g=o.lr_g, lr_d=o.lr_d, beta1=o.beta1, beta2=o.beta2, n_critic=o.n_critic,
            critic_warmup=o.critic_warmup, clip_value=o.clip_value, gp_weight=o.gp_weight,
            precision=self.resolved_precision(),
        )

    @model_validator(mode="after")
    def _science_rules(self) -> "PipelineConfig":
        """The science's own rules on a GAN (``GANSpec``) fire here, when the config is built, not in a Ray worker."""
        self.gan_spec(resolution=32, channels=1, num_classes=self.model.num_classes)
        return self


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (gan-pipeline train --dry-run prints every valid key)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict:
    from pipelines.safety import load_yaml

    path = Path(path)
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, optim:, ...), got {type(data).__name__}")
    # an empty section ("model:" with its keys commented out) is an empty mapping, not null
    data = {section: {} if values is None else values for section, values in data.items()}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a mapping of keys (e.g. "
                              f"'{section}:' followed by indented 'key: value' lines), got {type(values).__name__} {values!r}")
    return data


def build_config(
    model: Optional[str] = None,
    yaml_path: Optional[str | Path] = None,
    overrides: Optional[dict[str, dict[str, Any]]] = None,
) -> PipelineConfig:
    """Preset <- YAML <- CLI overrides (``{"train": {"workers": 4}}``; ``None`` values mean 'not given')."""
    file_values = read_yaml(yaml_path) if yaml_path else {}
    origin = f"{yaml_path} and command line" if yaml_path else "command line"
    name = model or file_values.get("model", {}).get("name") or "dcgan"
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    cli = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in (overrides or {}).items()
    }
    # an empty override section must not replace a YAML section: `optim: 0.1` was silently reset to defaults
    cli = {section: values for section, values in cli.items() if values}
    merged = _deep_merge(_deep_merge(preset(name), file_values), cli)
    given = {**file_values.get("model", {}), **cli.get("model", {})}
    if given.get("conditional") and "code_categories" not in given:
        # a conditional model has its label for a code: the preset's latent code gives way (one given explicitly
        # is refused with the reason)
        merged["model"]["code_categories"] = 0
    if merged.get("model", {}).get("code_categories") == 0 and "code_continuous" not in given:
        merged["model"]["code_continuous"] = 0  # the preset's continuous codes go with its categorical one
    merged.setdefault("model", {})["name"] = name
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def config_from_dict(values: dict) -> PipelineConfig:
    """Rebuild a config recorded in a checkpoint or an MLflow run."""
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "recorded config")) from None
