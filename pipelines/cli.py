"""``gan-pipeline``: options -> one typed ``PipelineConfig`` -> a stage function. Nothing below re-parses options.

Stage modules are imported inside the commands so that ``--help`` stays instant (torch and Ray take seconds).
"""
from __future__ import annotations

import functools
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

# before the imports that take seconds (torch): `run`'s 10 minutes count from here
COMMAND_STARTED = time.time()

import click  # noqa: E402

from pipelines.config import ConfigError, PipelineConfig, build_config  # noqa: E402
from pipelines.guard import GuardedGroup  # noqa: E402


@dataclass(frozen=True)
class Opt:
    """A CLI option that sets one config key (``section.key``)."""

    key: str
    flags: tuple[str, ...]
    type: Any = None
    help: str = ""
    is_flag: bool = False

    @property
    def param(self) -> str:
        return self.key.replace(".", "__")


def choices(key: str) -> click.Choice:
    """The values a config key's ``Literal`` type allows: the CLI offers exactly what the config accepts."""
    section, name = key.split(".")
    return click.Choice(list(typing.get_args(PipelineConfig.model_fields[section].annotation.model_fields[name].annotation)))


MODEL_OPTS = [
    Opt("model.nz", ("--nz",), int, "noise dimension"),
    Opt("model.ngf", ("--ngf",), int, "generator width"),
    Opt("model.ndf", ("--ndf",), int, "discriminator/critic width"),
    Opt("model.aux_class_weight", ("--aux-class-weight",), float, "auxiliary class term in G's loss (conditional)"),
    Opt("model.code_categories", ("--code-categories",), int,
        "InfoGAN categorical code in G's input (unconditional; 0 = the paper's model without it)"),
    Opt("model.code_weight", ("--code-weight",), float, "weight of InfoGAN's mutual-information term"),
    Opt("model.code_continuous", ("--code-continuous",), int,
        "InfoGAN continuous codes beside the categorical one (0 = none)"),
    Opt("optim.lr_g", ("--lr-g",), float, "generator learning rate"),
    Opt("optim.lr_d", ("--lr-d",), float, "discriminator/critic learning rate"),
    Opt("optim.beta1", ("--beta1",), float, "Adam beta1"),
    Opt("optim.beta2", ("--beta2",), float, "Adam beta2"),
    Opt("optim.n_critic", ("--n-critic",), int, "critic updates per generator update"),
    Opt("optim.clip_value", ("--clip-value",), float, "WGAN weight clipping bound c"),
    Opt("optim.gp_weight", ("--gp-weight",), float, "WGAN-GP penalty weight lambda"),
    Opt("optim.lr_decay_from", ("--lr-decay-from",), float,
        "fraction of the run after which learning rates decay linearly (1 = constant, as in the papers)"),
    Opt("optim.lr_final_scale", ("--lr-final-scale",), float, "learning-rate multiplier at the run's end"),
    Opt("optim.critic_warmup", ("--critic-warmup",), None,
        "WGAN reference code: 100 critic updates for the first 25 generator steps and every 500th", is_flag=True),
]
DATA_OPTS = [
    Opt("data.dataset", ("--dataset",), choices("data.dataset"),
        "dataset (default mnist, bundled, offline)"),
    Opt("data.source", ("--source",), str, "folder with the dataset's original files"),
    Opt("data.resolution", ("--resolution",), int, "28, 32 or 64 px (default: the dataset's own)"),
    Opt("data.channels", ("--channels",), int, "1 or 3 (default: the dataset's own)"),
]
DATA_PATH_OPT = Opt("data.path", ("--data",), str, "a prepared dataset (dir or URI); default: prepare on the fly")
TRAIN_OPTS = [
    Opt("train.workers", ("--workers",), int, "data-parallel Ray Train workers"),
    Opt("train.gpu", ("--gpu",), None, "one GPU per worker (NCCL)", is_flag=True),
    Opt("train.address", ("--address",), str, "Ray cluster to join (auto, ray://host:10001); default local"),
    Opt("train.time_budget", ("--time-budget",), str,
        "wall-clock training budget, e.g. 90s, 8m, 1h30m (default unless --epochs or --max-steps is given: 7m30s for "
        "train; for run, until 8m30s after the command started, so that it ends within 10 minutes)"),
    Opt("train.epochs", ("--epochs",), int, "epochs of the train split"),
    Opt("train.max_steps", ("--max-steps",), int, "generator steps (wins over --epochs)"),
    Opt("train.batch_size", ("--batch-size",), int, "global batch size, split evenly across the workers"),
    Opt("train.seed", ("--seed",), int, "random seed"),
    Opt("train.precision", ("--precision",), choices("train.precision"),
        "autocast precision (default auto: bf16 where the CPU/GPU has bf16 units, else fp32)"),
    Opt("train.ema_half_life", ("--ema-half-life",), float,
        "half-life in images of the moving average of G's weights (0 = off)"),
    Opt("train.score_checkpoints", ("--score-checkpoints/--no-score-checkpoints",), None,
        "score every checkpoint (cheap domain FD) and keep the best as the run's generator (default on)", is_flag=True),
    Opt("train.channels_last", ("--channels-last/--no-channels-last",), None,
        "NHWC memory format for G and D (default on: 1.1-1.3x on CPU, neutral on GPU)", is_flag=True),
    Opt("train.compile", ("--compile",), None, "torch.compile G and D", is_flag=True),
    Opt("train.checkpoint_every", ("--checkpoint-every",), int, "generator steps between checkpoints (default: by time)"),
    Opt("train.checkpoint_interval", ("--checkpoint-interval",), str, "training time between checkpoints when "
        "--checkpoint-every is not given, e.g. 90s, 2m (default 60s)"),
    Opt("train.log_every", ("--log-every",), int, "generator steps between metric logs"),
    Opt("train.sample_every", ("--sample-every",), int, "generator steps between sample grids"),
    Opt("train.threads_per_worker", ("--threads-per-worker",), int, "torch threads (and Ray CPUs) per worker"),
    Opt("train.max_failures", ("--max-failures",), int, "worker failures survived (restart from checkpoint)"),
    Opt("train.storage_path", ("--storage-path",), str, "checkpoint storage (dir, NFS, s3://, gs://)"),
]
TRACKING_OPTS = [
    Opt("tracking.tracking_uri", ("--tracking-uri",), str, "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite)"),
    Opt("tracking.experiment", ("--experiment",), str, "MLflow experiment"),
]
EVAL_OPTS = [
    Opt("eval.num_samples", ("--num-samples",), int, "samples per side for the metrics (default 10000)"),
    Opt("eval.inception_weights", ("--inception-weights",), str, "local Inception-v3 weights for FID (offline)"),
]
REGISTER_OPTS = [Opt("registry.name", ("--name",), str, "registered model name (default <dataset>-<model>)")]
TUNE_OPTS = [
    Opt("tune.samples", ("--samples",), int, "number of trials"),
    Opt("tune.workers_per_trial", ("--workers-per-trial",), int, "Ray Train workers per trial"),
    Opt("tune.max_concurrent", ("--max-concurrent",), int, "trials at once"),
    Opt("tune.scheduler", ("--scheduler",), choices("tune.scheduler"), "trial scheduler"),
    Opt("tune.search", ("--search",), choices("tune.search"), "search algorithm"),
    Opt("tune.time_budget", ("--time-budget",), str,
        "wall-clock budget of the whole sweep, e.g. 20m: each trial trains budget x concurrent / samples"),
    Opt("tune.perturbation_interval", ("--perturbation-interval",), int,
        "pbt/pb2: steps between exploit/explore decisions (a multiple of the report interval)"),
]


def config_options(*groups: list[Opt], model_choice: bool = True) -> Callable:
    """Add the options of ``groups`` plus --config/--model/--runs-dir; hand the command a built ``cfg``."""
    opts = [o for group in groups for o in group]

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(config_file, model, runs_dir, **kwargs):
            overrides: dict[str, dict[str, Any]] = {}
            for opt in opts:
                value = kwargs.pop(opt.param)
                if opt.is_flag and not value and "/" not in opt.flags[0]:
                    value = None  # an absent flag must not override a YAML 'true'; --no-x is a real False
                section, key = opt.key.split(".")
                overrides.setdefault(section, {})[key] = value
            try:
                cfg = build_config(model, config_file, overrides)
                if runs_dir:
                    cfg.runs_dir = runs_dir
            except ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            from pipelines.safety import check_runs_dir

            check_runs_dir(cfg.runs_dir)
            return fn(cfg=cfg, **kwargs)

        for opt in reversed(opts):
            wrapper = click.option(*opt.flags, opt.param, type=opt.type, is_flag=opt.is_flag, default=None,
                                   help=opt.help)(wrapper)
        wrapper = click.option("--runs-dir", "runs_dir", default=None,
                               help="where prepared data, checkpoints and run state go (default ./gan-runs)")(wrapper)
        if model_choice:
            wrapper = click.option("--model", "model", type=choices("model.name"),
                                   default=None, help="model preset (default dcgan)")(wrapper)
        else:
            wrapper = click.option("--model", "model", hidden=True, default=None)(wrapper)
        wrapper = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                               help="YAML file with config sections; CLI options override it")(wrapper)
        return wrapper

    return decorator


def _fail_cleanly(fn: Callable) -> Callable:
    """Errors meant for the user end the command with their message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipelines.errors import UserError

        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError) as exc:
            error = click.ClickException(str(exc))
            error.exit_code = getattr(exc, "exit_code", 1)
            raise error from None

    return wrapper


def _print_config(cfg: PipelineConfig) -> None:
    click.echo("# resolved configuration (preset <- --config file <- options)")
    from pipelines.secrets import redact_text

    click.echo(redact_text(cfg.to_yaml()), nl=False)
    click.echo(f"# tracking URI: {redact_text(cfg.resolved_tracking_uri)}")


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="gan-pipeline")
def cli() -> None:
    """Distributed GAN training: prepare -> train -> evaluate -> register, on Ray, tracked in MLflow.

    \b
    Quick start (offline, bundled MNIST):
      gan-pipeline run --model cgan
      mlflow ui --backend-store-uri sqlite:///mlflow.db
    """


@cli.command()
@config_options(DATA_OPTS, model_choice=False)
@click.option("--out", default=None, help="output dir or URI (default <runs-dir>/data/<dataset>-<res>px-<ch>ch)")
@click.option("--force", is_flag=True, help="rebuild even if an identical dataset exists")
@click.option("--strict", is_flag=True, help="fail on the first unreadable image instead of skipping it")
@_fail_cleanly
def prepare(cfg: PipelineConfig, out: Optional[str], force: bool, strict: bool) -> None:
    """Turn a dataset into validated, sharded Parquet with a manifest."""
    from pipelines.prepare import prepare_stage

    if strict:
        cfg.data.strict = True
    prepare_stage(cfg, out=out, force=force)


@cli.command()
@config_options(MODEL_OPTS, DATA_OPTS, [DATA_PATH_OPT], TRAIN_OPTS, TRACKING_OPTS)
@click.option("--dry-run", is_flag=True, help="print the resolved configuration and exit")
@click.option("--resume", default=None, help="resume a run (its name under the storage path) from its last checkpoint")
@click.option("--run-name", default=None, help="name of this training run (default <model>-<time>)")
@_fail_cleanly
def train(cfg: PipelineConfig, dry_run: bool, resume: Optional[str], run_name: Optional[str]) -> None:
    """Data-parallel training on Ray Train, tracked in MLflow, resumable."""
    if dry_run:
        _print_config(cfg)
        return
    from pipelines.train import train_stage

    train_stage(cfg, run_name=run_name, resume=resume)


@cli.command()
@config_options(EVAL_OPTS, [DATA_PATH_OPT], TRACKING_OPTS, model_choice=False)
@click.option("--run-id", default=None, help="MLflow run of a training run")
@click.option("--checkpoint", default=None, help="a checkpoint directory")
@click.option("--model-uri", default=None, help="a registered model, e.g. models:/mnist-cgan@champion")
@click.option("--out", default=None, help="directory for metrics.json and grids")
@_fail_cleanly
def evaluate(cfg: PipelineConfig, run_id, checkpoint, model_uri, out) -> None:
    """Score a generator (Frechet distance, KID, precision/recall, ...) and log the scores."""
    from pipelines.evaluate import evaluate_stage

    evaluate_stage(cfg, run_id=run_id, checkpoint=checkpoint, model_uri=model_uri, out=out)


@cli.command()
@config_options(REGISTER_OPTS, TRACKING_OPTS, model_choice=False)
@click.option("--run-id", required=True, help="MLflow run of a training run")
@_fail_cleanly
def register(cfg: PipelineConfig, run_id: str) -> None:
    """Register the run's generator in the MLflow Model Registry (alias 'candidate')."""
    from pipelines.register import register_stage

    register_stage(cfg, run_id=run_id)


@cli.command()
@config_options(MODEL_OPTS, DATA_OPTS, [DATA_PATH_OPT], TRAIN_OPTS, TRACKING_OPTS, EVAL_OPTS, REGISTER_OPTS)
@click.option("--promote", is_flag=True, help="try to promote the new version to 'champion' at the end")
@click.option("--dry-run", is_flag=True, help="print the resolved configuration and exit")
@click.option("--run-name", default=None, help="name of the pipeline run; re-running it resumes")
@_fail_cleanly
def run(cfg: PipelineConfig, promote: bool, dry_run: bool, run_name: Optional[str]) -> None:
    """prepare -> train -> evaluate -> register in one resumable command."""
    if promote:
        cfg.registry.promote = True
    if dry_run:
        _print_config(cfg)
        return
    from pipelines.run import run_stage

    run_stage(cfg, run_name=run_name, started=COMMAND_STARTED)


# in `tune`, --time-budget is the whole sweep's (tune.time_budget); a trial's own comes from it
TRIAL_TRAIN_OPTS = [o for o in TRAIN_OPTS if o.key != "train.time_budget"]


@cli.command()
@config_options(TUNE_OPTS, MODEL_OPTS, DATA_OPTS, [DATA_PATH_OPT], TRIAL_TRAIN_OPTS, TRACKING_OPTS, EVAL_OPTS,
                REGISTER_OPTS)
@click.option("--space", "space_file", type=click.Path(dir_okay=False), default=None,
              help="YAML search space replacing the family's default")
@click.option("--resume", "resume_name", default=None,
              help="continue the sweep NAME whose driver died (finished trials kept, the others from their last "
                   "checkpoints, the same MLflow runs); other options are taken from that sweep")
@_fail_cleanly
def tune(cfg: PipelineConfig, space_file: Optional[str], resume_name: Optional[str]) -> None:
    """Ray Tune sweep over the training loop (ASHA, FIFO or population based training), tracked in MLflow."""
    from pipelines.tune import resume_stage, tune_stage

    if resume_name:
        resume_stage(cfg, resume_name)
    else:
        tune_stage(cfg, space_file=space_file)


@cli.command()
@click.argument("name")
@click.option("--version", "version", default=None, help="the version to promote")
@click.option("--from", "from_alias", default="candidate", show_default=True, help="alias to promote from")
@click.option("--to", "to_alias", default="champion", show_default=True, help="alias to move")
@click.option("--metric", default=None, help="metric the guard compares (default: registry.promote_metric)")
@click.option("--force", is_flag=True, help="promote even if the candidate is worse")
@config_options(TRACKING_OPTS, model_choice=False)
@_fail_cleanly
def promote(cfg: PipelineConfig, name, version, from_alias, to_alias, metric, force) -> None:
    """Move an alias (candidate -> champion) with a quality guard."""
    from pipelines.promote import promote_stage

    promote_stage(cfg, name=name, version=version, from_alias=from_alias, to_alias=to_alias, metric=metric, force=force)


@cli.command()
@click.option("--model-uri", required=True, help="e.g. models:/mnist-cgan@champion")
@click.option("--n", "n", default=64, show_default=True, help="number of images")
@click.option("--label", type=int, default=None, help="class of every image (conditional models)")
@click.option("--category", type=int, default=None,
              help="InfoGAN category of every image (models trained with --code-categories; dcgan by default)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, help="output file (.png grid or .npy)")
@click.option("--format", "fmt", type=click.Choice(["png", "npy"]), default="png", show_default=True)
@click.option("--interpolate", is_flag=True, help="a latent interpolation strip instead of random samples")
@config_options(TRACKING_OPTS, model_choice=False)
@_fail_cleanly
def generate(cfg: PipelineConfig, model_uri, n, label, category, seed, out, fmt, interpolate) -> None:
    """Sample images from a registered generator."""
    from pipelines.generate import generate_stage

    generate_stage(cfg, model_uri=model_uri, n=n, label=label, seed=seed, out=out, fmt=fmt, interpolate=interpolate,
                   category=category)


@cli.group()
def models() -> None:
    """Inspect registered generators."""


@models.command("list")
@config_options(TRACKING_OPTS, model_choice=False)
@_fail_cleanly
def models_list(cfg: PipelineConfig) -> None:
    """Registered models with their aliases."""
    from pipelines.models import models_list_stage

    models_list_stage(cfg)


@models.command("show")
@click.argument("name")
@config_options(TRACKING_OPTS, model_choice=False)
@_fail_cleanly
def models_show(cfg: PipelineConfig, name: str) -> None:
    """Versions of one model: aliases, metrics, dataset, run."""
    from pipelines.models import models_show_stage

    models_show_stage(cfg, name=name)


@models.command("verify")
@click.argument("model_ref", metavar="MODEL")
@config_options(TRACKING_OPTS, model_choice=False)
@_fail_cleanly
def models_verify(cfg: PipelineConfig, model_ref: str) -> None:
    """Check a registered model's files (NAME@ALIAS or NAME/VERSION) against the sha256 recorded when it was
    registered; exit 1 if any file was changed, added or removed."""
    from pipelines.integrity import verify_stage

    verify_stage(cfg, model_ref)


def main() -> None:
    import os

    # Progress lines of our own are printed where they matter; MLflow's per-download bars only clutter the log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's INFO lines (creating database tables, system metrics started/stopped) are not the user's concern.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    cli(prog_name="gan-pipeline")


if __name__ == "__main__":
    sys.exit(main())
