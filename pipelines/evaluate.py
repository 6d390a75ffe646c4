"""The ``evaluate`` stage: score a generator with ``pipelines.metrics`` and log the scores to MLflow.

The generator comes from a training run (``--run-id``), a checkpoint directory, or a registered model
(``--model-uri``, resolved to the run that produced it). The real reference is the held-out split of the
prepared dataset the generator was trained on; sample counts and seeds are fixed by ``eval`` so the same
generator always gets the same score.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gan_models.latent_code import latent_code, with_category
from gan_models.sampling import evaluation_inputs, generate, image_grid, save_png, to_uint8
from pipelines import checkpoints, tags, tracking
from pipelines.config import PipelineConfig
from pipelines.errors import UserError
from pipelines.files import atomic_write


# Domain classifiers are keyed by the dataset's manifest hash, so one cache can serve several runs dirs.
CLASSIFIER_CACHE_ENV = "GAN_PIPELINE_CLASSIFIER_CACHE"


def classifier_cache_dir(cfg: PipelineConfig) -> Path:
    """``$GAN_PIPELINE_CLASSIFIER_CACHE`` when set, else ``<runs_dir>/classifiers``."""
    return Path(os.environ.get(CLASSIFIER_CACHE_ENV) or Path(cfg.runs_dir) / "classifiers")


def domain_classifier(cfg: PipelineConfig, data_path: str, manifest: dict):
    """The dataset's domain classifier, trained once and cached by manifest hash under ``<runs_dir>/classifiers``."""
    from pipelines.data.reader import load_split
    from pipelines.metrics.classifier import cache_paths, load_or_train_classifier

    num_classes = len(manifest.get("class_names") or [])
    if num_classes < 2:
        kind = "unlabeled" if num_classes == 0 else "labeled with a single class"
        raise UserError(f"the dataset at {data_path} is {kind}; the domain classifier behind the metrics needs "
                        f"two or more classes (prepare an image folder with one subfolder per class)")
    cache_dir = classifier_cache_dir(cfg)
    paths = cache_paths(cache_dir, manifest["manifest_hash"])
    kwargs = {}
    if not all(p.exists() for p in paths):
        start = time.perf_counter()
        print(f"[gan-pipeline] training the domain classifier for {manifest['dataset']} (cached afterwards)", flush=True)
        train_x, train_y = load_split(data_path, "train")
        held_x, held_y = load_split(data_path, "heldout")
        kwargs = dict(train_images=train_x, train_labels=train_y, heldout_images=held_x, heldout_labels=held_y)
    classifier = load_or_train_classifier(cache_dir, manifest["manifest_hash"], num_classes=num_classes,
                                          epochs=classifier_epochs(cfg, manifest), seed=cfg.eval.seed, **kwargs)
    if kwargs:
        print(f"[gan-pipeline] domain classifier: held-out accuracy {classifier.heldout_accuracy:.4f} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    return classifier, paths


# A small dataset still needs enough optimizer steps for a useful feature space (MNIST: one epoch is plenty).
MIN_CLASSIFIER_IMAGES = 50_000


def classifier_epochs(cfg: PipelineConfig, manifest: dict) -> int:
    train_count = max(1, int(manifest["counts"]["train"]))
    return max(cfg.eval.classifier_epochs, -(-MIN_CLASSIFIER_IMAGES // train_count))


def _download_generator(mlflow_client, run_id: str, target: Path) -> Path:
    try:
        names = {a.path for a in mlflow_client.list_artifacts(run_id, checkpoints.GENERATOR_ARTIFACT_DIR)}
    except Exception as exc:  # noqa: BLE001 - unknown run ids surface as various MLflow errors
        raise UserError(f"MLflow run {run_id!r} not found or unreadable: {exc}") from None
    weights = f"{checkpoints.GENERATOR_ARTIFACT_DIR}/{checkpoints.GENERATOR_FILE}"
    if weights not in names:
        raise UserError(f"MLflow run {run_id} has no generator artifacts ({weights}): it is not a "
                        f"finished gan-pipeline training run; train it to the end first (gan-pipeline train --resume)")
    return Path(mlflow_client.download_artifacts(run_id, checkpoints.GENERATOR_ARTIFACT_DIR, str(target)))


def resolve_model_uri(mlflow_client, model_uri: str) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the run that produced that version."""
    from pipelines.integrity import model_version_of

    version = model_version_of(mlflow_client, model_uri)
    source_run = version.tags.get("source_run_id") or version.run_id
    if not source_run:
        raise UserError(f"{model_uri} records no source run; evaluate it with --run-id instead")
    return source_run


def evaluate_stage(cfg: PipelineConfig, run_id: Optional[str] = None, checkpoint: Optional[str] = None,
                   model_uri: Optional[str] = None, out: Optional[str] = None, table: bool = True) -> dict[str, float]:
    """``table``: print every metric (``gan-pipeline run`` shows the main ones in its summary instead)."""
    given = [x for x in (run_id, checkpoint, model_uri) if x]
    if len(given) != 1:
        raise UserError("name exactly one generator: --run-id ID, --checkpoint DIR or --model-uri models:/NAME@ALIAS")
    if out:  # said now, not after minutes of scoring
        from pipelines import safety

        safety.check_folder(out, "evaluation output", "--out", safety.EVALUATION_ENTRIES)
    uri = cfg.resolved_tracking_uri
    tracking.check_reachable(uri)
    mlflow_client = tracking.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        if model_uri:
            run_id = resolve_model_uri(mlflow_client, model_uri)
        if run_id:
            from pipelines.safety import check_name

            check_name(run_id, "--run-id")  # it names the default output folder
            gen_dir = _download_generator(mlflow_client, run_id, Path(tmp))
            if model_uri:  # the weights scored must be the registered ones
                from pipelines.integrity import model_version_of, verify_weights

                verify_weights(gen_dir / "generator.pt", model_version_of(mlflow_client, model_uri).tags or {},
                               model_uri)
        else:
            gen_dir = Path(checkpoint)
            if not gen_dir.is_dir():
                raise UserError(f"checkpoint {checkpoint} is not a directory")
        generator, spec, run_config = checkpoints.load_generator(gen_dir)
    if not run_id and run_config.get("mlflow_run_id"):
        run_id = run_config["mlflow_run_id"]
        _check_training_run_is_here(mlflow_client, run_id, checkpoint, uri)  # before minutes of scoring
    data_path = cfg.data.path or run_config["data_path"]
    from pipelines.data.reader import load_manifest, load_split
    from pipelines.metrics.suite import compute_metrics, real_floor

    manifest = load_manifest(data_path)
    if manifest["manifest_hash"] != run_config["manifest_hash"]:
        raise UserError(f"the dataset at {data_path} (version {manifest['manifest_hash'][:12]}) is not the one the "
                        f"generator was trained on ({run_config['manifest_hash'][:12]}); pass --data with that one")
    n = cfg.eval.num_samples
    from pipelines.metrics.suite import check_counts, resolve_names

    # said now, not after a classifier's training and minutes of sampling
    check_counts(n, min(n, int(manifest.get("counts", {}).get("heldout", n))), cfg.eval,
                 resolve_names(None, cfg.eval, spec.conditional, coded=bool(spec.code_categories)))
    classifier, _ = domain_classifier(cfg, data_path, manifest)
    start = time.perf_counter()
    z, labels = evaluation_inputs(spec.nz, n, cfg.eval.seed, spec.num_classes if spec.conditional else None)
    fake = generate(generator, z, labels, batch_size=cfg.eval.batch_size)
    real_x, real_y = load_split(data_path, "heldout", limit=n, seed=cfg.eval.seed)
    cache: dict = {}
    codes = latent_code(z, spec.code_categories) if spec.code_categories else None
    metrics = compute_metrics(to_uint8(fake), labels, real_x, real_y, classifier, cfg.eval, spec.conditional,
                              spec.num_classes, cache=cache, generated_codes=codes)
    floor = _real_floor(cfg, data_path, manifest, classifier, real_x, real_y, spec, cache, real_floor)
    metrics.update({f"real_floor_{k}": v for k, v in floor.items() if k in ("domain_fd", "precision", "recall",
                                                                             "density", "coverage", "class_kl")})
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}

    out_dir = Path(out) if out else Path(cfg.runs_dir) / "evaluations" / (run_id or gen_dir.name)
    from pipelines import safety

    safety.check_folder(out_dir, "evaluation output", "--out", safety.EVALUATION_ENTRIES)
    safety.claim_folder(out_dir)
    _write_outputs(out_dir, metrics, fake, spec, generator)
    if run_id:
        from pipelines.runs import failed_on_error

        with failed_on_error() as created:  # an evaluation run it creates ends FAILED if logging fails
            _log(mlflow_client, run_id, metrics, out_dir, cfg, model_uri, classifier, data_path, manifest, created)
    if table:
        _print_metrics(metrics, out_dir)
    else:
        print(f"[gan-pipeline] metrics ({len(metrics)}) in MLflow and in {out_dir / 'metrics.json'}")
    return metrics


def _check_training_run_is_here(mlflow_client, run_id: str, checkpoint: str, uri: str) -> None:
    """A checkpoint's metrics go to the run that trained it, so that run must be in this tracking store."""
    from mlflow.exceptions import MlflowException

    from pipelines.registry import is_not_found

    try:
        mlflow_client.get_run(run_id)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise UserError(
            f"checkpoint {checkpoint} was trained in MLflow run {run_id}, which the tracking store at "
            f"{tracking.redact_uri(uri)} does not hold, so its metrics would have nowhere to go; pass the "
            "--tracking-uri it was trained with (or set MLFLOW_TRACKING_URI), or run evaluate from the directory "
            "it was trained in (the default store is mlflow.db there)") from None


def _real_floor(cfg, data_path, manifest, classifier, real_x, real_y, spec, cache, real_floor) -> dict:
    """Real train vs real held-out, computed once per (dataset, sample count, seed) and cached."""
    from pipelines.data.reader import load_split

    path = classifier_cache_dir(cfg) / f"floor-{manifest['manifest_hash'][:16]}-{cfg.eval.num_samples}-{cfg.eval.seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    train_x, train_y = load_split(data_path, "train", limit=cfg.eval.num_samples, seed=cfg.eval.seed)
    names = ["domain_fd", "precision_recall", "density_coverage", "class_kl"]
    floor = real_floor(train_x, real_x, classifier, cfg.eval, train_labels=train_y, heldout_labels=real_y,
                       conditional=False, num_classes=spec.num_classes, names=names, cache=cache)
    floor = {k: float(v) for k, v in floor.items() if isinstance(v, (int, float, np.floating))}
    atomic_write(path, json.dumps(floor))
    return floor


def _write_outputs(out_dir: Path, metrics: dict, fake: torch.Tensor, spec, generator) -> None:
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    save_png(image_grid(fake[:64], nrow=8), out_dir / "samples.png")
    # class and code grids: a row per label or category, the same ten noise vectors in every row
    per_row = 10
    row_z = torch.randn(per_row, spec.nz, generator=torch.Generator().manual_seed(7))
    if spec.conditional:
        labels = torch.arange(spec.num_classes).repeat_interleave(per_row)
        grid = generate(generator, row_z.repeat(spec.num_classes, 1), labels)
        save_png(image_grid(grid, nrow=per_row), out_dir / "class_grid.png")
    if spec.code_categories:  # what each InfoGAN category came to mean
        z = torch.cat([with_category(row_z, spec.code_categories, k) for k in range(spec.code_categories)])
        save_png(image_grid(generate(generator, z, None), nrow=per_row), out_dir / "code_grid.png")


def _log(mlflow_client, run_id: str, metrics: dict, out_dir: Path, cfg: PipelineConfig, model_uri, classifier,
         data_path: str, manifest: dict, created=lambda client, run_id: None) -> None:
    from mlflow.entities import Metric

    from pipelines import safety

    now = int(time.time() * 1000)
    target = run_id
    if model_uri:
        # a registered model gets a linked evaluation run rather than new numbers on its training run
        exp = mlflow_client.get_run(run_id).info.experiment_id
        target = mlflow_client.create_run(exp, run_name=f"evaluate {model_uri}", tags={
            tags.STAGE: "evaluate", tags.EVALUATES: model_uri,
            tags.SOURCE_RUN_ID: run_id}).info.run_id
        created(mlflow_client, target)
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):
        mlflow_client.log_batch(target, metrics=items[start:start + 1000])
    eval_tags = {"eval.num_samples": str(cfg.eval.num_samples), "eval.seed": str(cfg.eval.seed),
            "eval.classifier_fingerprint": str(getattr(classifier, "fingerprint", "")),
            "eval.reference": "heldout split"}
    for key, value in eval_tags.items():
        mlflow_client.set_tag(target, key, value)
    # on a training run that already lists this dataset (as training data) MLflow keeps the first record
    tracking.log_dataset_input(mlflow_client, target, data_path, manifest, tracking.DATASET_EVALUATION)
    for name in safety.EVALUATION_FILES:
        if (out_dir / name).exists():
            mlflow_client.log_artifact(target, str(out_dir / name), artifact_path="evaluation")
    if model_uri:
        mlflow_client.set_terminated(target)


def _print_metrics(metrics: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipelines.metrics.suite import metric_direction

    table = Table(title="evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better")
    table.add_column("real floor", justify="right")
    for key in sorted(metrics):
        if key.startswith("real_floor_") or key.startswith("domain_fd_class_"):
            continue
        direction = metric_direction(key)
        floor = metrics.get(f"real_floor_{key}")
        table.add_row(key, f"{metrics[key]:.4f}", {"min": "lower", "max": "higher"}.get(direction, ""),
                      "" if floor is None else f"{floor:.4f}")
    Console().print(table)
    print(f"[gan-pipeline] metrics.json and sample grids in {out_dir}")
