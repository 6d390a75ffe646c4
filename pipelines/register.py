"""``gan-pipeline register``: a training run's generator as a pickle-free MLflow model version (``promote`` and
``models`` read what it records; ``pipelines.registry`` holds the shared registry helpers).

The logged model is an MLflow "models from code" pyfunc (``pipelines/model_code/generator_model.py``): the weights
travel as a state_dict read with ``torch.load(weights_only=True)`` and the network code (``gan_models``) travels in
``code_paths``, so ``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` works with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` and where gan-pipeline is not installed.

Signature (tensor based):
    inputs  z     float32 (-1, nz)
            label int64   (-1,)         conditional models only
    output        float32 (-1, C, H, W) images in [-1, 1]
    params  output: "float32" (default) | "uint8" (pixels in [0, 255])

Registry conventions (read by ``promote`` and ``models show``):
    version tags  manifest_hash, model_family, dataset, source_run_id, conditional, num_classes, nz, resolution,
                  channels and ``metric.<name>`` for every evaluation metric on the run at registration time
    aliases       new versions get ``registry.alias`` (default ``candidate``); ``promote`` moves ``champion``
    promotion     tags on the promoted version: promoted_at, previous_champion, promotion_metric, candidate_value,
                  champion_value, promoted_from, forced
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipelines import checkpoints, registry, tags
from pipelines.config import ConfigError, PipelineConfig, config_from_dict
from pipelines.errors import UserError
from pipelines.guard import library_notes_to_log
from pipelines.tracking import redact_uri

# The LoggedModel's name on the run. Not "generator": MLflow 3 resolves runs:/<id>/<name> and run artifact listings
# of <name>/ to the logged model of that name, which would shadow the run's generator/ artifacts (weights + config).
MODEL_NAME = "generator_pyfunc"
METADATA_KEY = "gan_pipeline"


def _is_eval_metric(name: str) -> bool:
    """Training curves (step statistics, loop metrics) and MLflow system metrics are not evaluation results."""
    from pipelines.training_metrics import TRAINING_METRICS

    return name not in TRAINING_METRICS and not name.startswith("system/")


def _signature(spec: dict):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = [TensorSpec(np.dtype(np.float32), (-1, int(spec["nz"])), "z")]
    if spec.get("conditional"):
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "label"))
    outputs = Schema([TensorSpec(np.dtype(np.float32),
                                 (-1, int(spec["channels"]), int(spec["resolution"]), int(spec["resolution"])),
                                 "images")])
    params = ParamSchema([ParamSpec("output", "string", "float32")])
    return ModelSignature(inputs=Schema(inputs), outputs=outputs, params=params)


def _input_example(spec: dict) -> dict:
    import numpy as np

    n = 2
    example: dict[str, Any] = {"z": np.zeros((n, int(spec["nz"])), dtype=np.float32)}
    if spec.get("conditional"):
        example["label"] = np.arange(n, dtype=np.int64) % int(spec.get("num_classes", 10))
    return example


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pinned(dist: str) -> str:
        return f"{dist}=={version(dist).split('+')[0]}"

    return [pinned("mlflow"), pinned("torch"), pinned("numpy")]


def _default_name(cfg: PipelineConfig, run, run_config: dict) -> str:
    if cfg.registry.name:
        return cfg.registry.name
    recorded = run_config.get("config")
    if isinstance(recorded, dict):
        try:
            return config_from_dict(recorded).registered_name
        except ConfigError:
            pass
    run_tags = run.data.tags
    dataset = run_tags.get(tags.DATASET) or run_config.get("dataset") or cfg.data.dataset
    model = run_tags.get(tags.MODEL) or cfg.model.name
    return f"{dataset}-{model}"


def _log_on_run(mlflow, client, run, **log_kwargs):
    """Log the model on the (usually finished) training run, leaving the run's status and end time as they were."""
    run_id = run.info.run_id
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return mlflow.pyfunc.log_model(**log_kwargs)
    status, end_time = run.info.status, run.info.end_time
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        info = mlflow.pyfunc.log_model(**log_kwargs)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif status != "FINISHED" or end_time:
        client.set_terminated(run_id, status=status, end_time=end_time)
    return info


def _picked_model(client, run):
    """The LoggedModel of the checkpoint the run's generator came from (``finish_run`` names it), or None: a run
    trained without checkpoint scoring, or before checkpoints were recorded as models."""
    from mlflow.exceptions import MlflowException

    model_id = run.data.tags.get(tags.GENERATOR_MODEL_ID)
    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id)
    except MlflowException as exc:
        if registry.is_not_found(exc):
            return None
        raise


def _holds_model(client, model) -> bool:
    """Whether the LoggedModel already holds an MLflow model (a previous register of the run materialized it)."""
    return any(f.path == "MLmodel" for f in client.list_logged_model_artifacts(model.model_id))


def _log_and_register(mlflow, client, run, registered_model_name: str, **log_kwargs) -> tuple[str, str]:
    """Registering picks one of the run's checkpoint models: the best one's LoggedModel receives the pyfunc (once;
    a later register of the same run registers the same model again) and the version links to it. Runs without
    one log a new LoggedModel, as before. Returns (version, model URI)."""
    from mlflow.entities import LoggedModelStatus

    picked = _picked_model(client, run)
    if picked is None:
        info = _log_on_run(mlflow, client, run, name=MODEL_NAME, registered_model_name=registered_model_name,
                           **log_kwargs)
        return str(info.registered_model_version), info.model_uri
    model_uri = f"models:/{picked.model_id}"
    if picked.status == LoggedModelStatus.READY and _holds_model(client, picked):
        # its files are what earlier versions' digests cover: registered again, never rewritten
        version = mlflow.register_model(model_uri, registered_model_name)
        return str(version.version), model_uri
    # no run is started: the model is the run's output already, with its metrics (pipelines.checkpoint_models)
    info = mlflow.pyfunc.log_model(name=picked.name, model_id=picked.model_id,
                                   registered_model_name=registered_model_name, **log_kwargs)
    return str(info.registered_model_version), model_uri


def register_stage(cfg: PipelineConfig, run_id: str) -> dict:
    """Register the generator of training run ``run_id`` as a new version; alias it ``registry.alias``.

    Returns ``{"name", "version", "uri", "alias", "alias_uri"}``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    import gan_models
    from pipelines import integrity
    from pipelines.model_code import GENERATOR_MODEL_FILE
    from pipelines.safety import check_alias

    check_alias(cfg.registry.alias)  # MLflow would refuse it only after creating the version
    client = registry.registry_client(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if registry.is_not_found(exc):
            raise UserError(f"MLflow run {run_id!r} does not exist at {redact_uri(cfg.resolved_tracking_uri)}") from None
        raise
    present = {Path(f.path).name for f in client.list_artifacts(run_id, checkpoints.GENERATOR_ARTIFACT_DIR)}
    missing = [f for f in (checkpoints.GENERATOR_FILE, checkpoints.CONFIG_FILE) if f not in present]
    if missing:
        raise UserError(
            f"run {run_id} ({run.info.run_name or 'unnamed'}, status {run.info.status}) has no "
            f"{checkpoints.GENERATOR_ARTIFACT_DIR}/{' or '.join(missing)} artifact: it is not a finished training run. "
            f"Train it to the end first (gan-pipeline train, or resume it with --resume) so that it logs its generator."
        )

    with tempfile.TemporaryDirectory(prefix="gan-register-") as tmp:
        local = Path(client.download_artifacts(run_id, checkpoints.GENERATOR_ARTIFACT_DIR, tmp))
        weights, config_path = local / checkpoints.GENERATOR_FILE, local / checkpoints.CONFIG_FILE
        try:
            run_config = json.loads(config_path.read_text())
            spec = dict(run_config["gan_spec"])
            for key in ("nz", "channels", "resolution"):
                int(spec[key])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"run {run_id}: {checkpoints.GENERATOR_ARTIFACT_DIR}/{checkpoints.CONFIG_FILE} is not a gan-pipeline generator "
                            f"config ({exc!r})") from None
        # Fail here, not in a server at load time, if the weights do not fit the recorded architecture.
        from pipelines.checkpoints import load_generator

        load_generator(local)
        weights_sha256 = integrity.sha256_file(weights)

        name = _default_name(cfg, run, run_config)
        run_tags = run.data.tags
        params = run.data.params
        conditional = bool(spec.get("conditional", False))
        num_classes = int(spec.get("num_classes", 10)) if conditional else None
        family = run_tags.get(tags.MODEL) or (run_config.get("config") or {}).get("model", {}).get("name", "")
        dataset = run_tags.get(tags.DATASET) or run_config.get("dataset") or ""
        manifest = params.get("data.manifest_hash") or run_config.get("manifest_hash") or ""
        class_names = run_config.get("class_names")
        metadata = {METADATA_KEY: {
            "conditional": conditional, "num_classes": num_classes, "nz": int(spec["nz"]),
            "code_categories": int(spec.get("code_categories", 0)),
            "channels": int(spec["channels"]), "resolution": int(spec["resolution"]),
            "class_names": class_names, "model_family": family, "dataset": dataset, "manifest_hash": manifest,
            "source_run_id": run_id, "output_range": [-1.0, 1.0],
        }}
        with library_notes_to_log("mlflow"):  # "Successfully registered model ...": the stage prints its own line
            version, model_uri = _log_and_register(
                mlflow, client, run,
                python_model=str(GENERATOR_MODEL_FILE),
                artifacts={"weights": str(weights), "config": str(config_path)},
                code_paths=[str(Path(gan_models.__file__).resolve().parent)],
                signature=_signature(spec),
                input_example=_input_example(spec),
                pip_requirements=_pip_requirements(),
                metadata=metadata,
                registered_model_name=name,
            )

    eval_metrics = {k: v for k, v in run.data.metrics.items() if _is_eval_metric(k)}
    version_tags = {
        "manifest_hash": manifest, "model_family": family, "dataset": dataset, "source_run_id": run_id,
        "conditional": str(conditional).lower(), "num_classes": "" if num_classes is None else str(num_classes),
        "nz": str(spec["nz"]), "resolution": str(spec["resolution"]), "channels": str(spec["channels"]),
        "model_uri": model_uri,
    }
    version_tags.update({registry.METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in eval_metrics.items()})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    kind = f"conditional on {num_classes} classes" if conditional else "unconditional"
    shown = ", ".join(f"{k}={registry.fmt_value(v)}" for k, v in sorted(eval_metrics.items())) or "not evaluated yet"
    client.update_model_version(name, version, description=(
        f"{family or 'GAN'} generator trained on {dataset or 'unknown data'} (manifest {manifest[:12] or '?'}), "
        f"{kind}, {spec['channels']}x{spec['resolution']}x{spec['resolution']} images in [-1, 1], nz={spec['nz']}. "
        f"Source run {run_id}. Metrics at registration: {shown}. "
        f"Input {{'z': float32 (N, {spec['nz']})" + (", 'label': int64 (N,)" if conditional else "")
        + "}; params {'output': 'uint8'} for pixels."))
    model = client.get_registered_model(name)
    if not model.description:
        client.update_registered_model(name, description=(
            f"gan-pipeline generators ({dataset}-{family}). Aliases: @candidate = newest registered, "
            f"@champion = promoted with a metric guard (gan-pipeline promote)."))
    alias = cfg.registry.alias
    try:
        digest = integrity.record_digests(client, name, version, f"models:/{name}/{version}", weights_sha256)
        client.set_registered_model_alias(name, alias, version)
    except BaseException:
        client.delete_model_version(name, version)  # no half-registered version without its digest or alias
        raise
    print(f"registered {name} v{version} from run {run_id} (alias @{alias}, artifacts sha256 {digest[:16]}...); "
          f"load it with mlflow.pyfunc.load_model('models:/{name}@{alias}')", flush=True)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "alias": alias,
            "alias_uri": f"models:/{name}@{alias}", "model_uri": model_uri}
