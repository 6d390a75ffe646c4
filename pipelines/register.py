"""Model registry: register a training run's generator as a pickle-free MLflow model, promote it with a quality
guard, and list what is registered.

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
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pipelines.config import ConfigError, PipelineConfig, config_from_dict
from pipelines.errors import UserError
from pipelines.tracking import redact_uri

GENERATOR_ARTIFACT_DIR = "generator"
WEIGHTS_FILE = "generator.pt"
CONFIG_FILE = "config.json"
# The LoggedModel's name on the run. Not "generator": MLflow 3 resolves runs:/<id>/<name> and run artifact listings
# of <name>/ to the logged model of that name, which would shadow the run's generator/ artifacts (weights + config).
MODEL_NAME = "generator_pyfunc"
METRIC_TAG_PREFIX = "metric."
METADATA_KEY = "gan_pipeline"

# Logged by the training loop every few steps: not evaluation results, never copied to version tags.
TRAINING_METRICS = frozenset({
    "d_loss", "g_loss", "wasserstein_estimate", "gradient_penalty", "aux_loss_real", "aux_loss_fake",
    "d_grad_norm", "g_grad_norm", "d_real", "d_fake", "images_per_second", "epoch", "lr_g", "lr_d",
})
# Used only if pipelines.metrics.suite cannot be imported.
_FALLBACK_DIRECTION = {
    "domain_fd": "min", "domain_kid_mean": "min", "precision": "max", "recall": "max", "density": "max",
    "coverage": "max", "classifier_score": "max", "class_kl": "min", "label_accuracy": "max",
    "domain_fd_class_mean": "min", "inception_fd": "min", "inception_kid_mean": "min",
}
# Columns of ``models show`` (those present).
KEY_METRICS = ("domain_fd", "precision", "recall", "label_accuracy", "inception_fd")


# ---------------------------------------------------------------- helpers
def metric_direction(name: str) -> Optional[str]:
    """"min" / "max" / None, from ``pipelines.metrics.suite`` when importable, else a built-in table."""
    try:
        from pipelines.metrics.suite import metric_direction as suite_direction

        return suite_direction(name)
    except Exception:  # noqa: BLE001 - metrics are optional here (heavy deps, being rewritten)
        pass
    try:
        from pipelines.metrics.suite import METRIC_DIRECTION

        table = METRIC_DIRECTION
    except Exception:  # noqa: BLE001
        table = _FALLBACK_DIRECTION
    if name in table:
        return table[name]
    return "min" if name.startswith("domain_fd_class_") else None


def _known_metrics() -> list[str]:
    try:
        from pipelines.metrics.suite import METRIC_DIRECTION

        return sorted(METRIC_DIRECTION)
    except Exception:  # noqa: BLE001
        return sorted(_FALLBACK_DIRECTION)


def _is_eval_metric(name: str) -> bool:
    return name not in TRAINING_METRICS and not name.startswith("system/")


def _client(cfg: PipelineConfig):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = cfg.resolved_tracking_uri
    from pipelines.tracking import check_reachable

    check_reachable(uri)  # a dead server: seconds and a clear line, not minutes of MLflow retries
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}"


def _console():
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


def _model_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def _get_registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    names = _model_names(client)
    listing = ", ".join(names) if names else "none (register one with: gan-pipeline register --run-id RUN_ID)"
    raise UserError(f"no registered model named {name!r}; registered models: {listing}")


def _versions(client, name: str) -> list:
    found = client.search_model_versions(f"name='{name}'", max_results=1000)
    return sorted(found, key=lambda v: int(v.version))


def _aliases_by_version(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return {k: sorted(v) for k, v in out.items()}


def _alias_listing(model) -> str:
    aliases = model.aliases or {}
    if not aliases:
        return "none"
    return ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items()))


def _resolve_version(client, model, version: Optional[str], alias: Optional[str]):
    from mlflow.exceptions import MlflowException

    name = model.name
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not _not_found(exc):
                raise
        existing = ", ".join(f"v{v.version}" for v in _versions(client, name)) or "none"
        raise UserError(f"model {name!r} has no version {version!r}; its versions: {existing}")
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    raise UserError(f"model {name!r} has no alias {alias!r}; its aliases: {_alias_listing(model)} "
                    f"(or pass --version)")


def _version_metric(client, mv, metric: str) -> Optional[float]:
    """The metric recorded on the version (tag), else the source run's latest value (evaluated after registering)."""
    raw = (mv.tags or {}).get(METRIC_TAG_PREFIX + metric)
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            return None
    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except Exception:  # noqa: BLE001 - the run may be gone
            value = None
        if value is not None and not math.isnan(value):
            return float(value)
    return None


# ---------------------------------------------------------------- register
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
    tags = run.data.tags
    dataset = tags.get("gan_pipeline.dataset") or run_config.get("dataset") or cfg.data.dataset
    model = tags.get("gan_pipeline.model") or cfg.model.name
    return f"{dataset}-{model}"


def _log_on_run(mlflow, client, run, **log_kwargs):
    """Log the model on the (usually finished) training run, leaving the run's status and end time as they were."""
    from pipelines.model_code import quiet_type_hint_warning

    with quiet_type_hint_warning():
        return _log_on_run_inner(mlflow, client, run, **log_kwargs)


def _log_on_run_inner(mlflow, client, run, **log_kwargs):
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
    client = _client(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _not_found(exc):
            raise UserError(f"MLflow run {run_id!r} does not exist at {redact_uri(cfg.resolved_tracking_uri)}") from None
        raise
    present = {Path(f.path).name for f in client.list_artifacts(run_id, GENERATOR_ARTIFACT_DIR)}
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if f not in present]
    if missing:
        raise UserError(
            f"run {run_id} ({run.info.run_name or 'unnamed'}, status {run.info.status}) has no "
            f"{GENERATOR_ARTIFACT_DIR}/{' or '.join(missing)} artifact: it is not a finished training run. "
            f"Train it to the end first (gan-pipeline train, or resume it with --resume) so that it logs its generator."
        )

    with tempfile.TemporaryDirectory(prefix="gan-register-") as tmp:
        local = Path(client.download_artifacts(run_id, GENERATOR_ARTIFACT_DIR, tmp))
        weights, config_path = local / WEIGHTS_FILE, local / CONFIG_FILE
        try:
            run_config = json.loads(config_path.read_text())
            spec = dict(run_config["gan_spec"])
            for key in ("nz", "channels", "resolution"):
                int(spec[key])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"run {run_id}: {GENERATOR_ARTIFACT_DIR}/{CONFIG_FILE} is not a gan-pipeline generator "
                            f"config ({exc!r})") from None
        # Fail here, not in a server at load time, if the weights do not fit the recorded architecture.
        from pipelines.checkpoints import load_generator

        load_generator(local)
        weights_sha256 = integrity.sha256_file(weights)

        name = _default_name(cfg, run, run_config)
        tags = run.data.tags
        params = run.data.params
        conditional = bool(spec.get("conditional", False))
        num_classes = int(spec.get("num_classes", 10)) if conditional else None
        family = tags.get("gan_pipeline.model") or (run_config.get("config") or {}).get("model", {}).get("name", "")
        dataset = tags.get("gan_pipeline.dataset") or run_config.get("dataset") or ""
        manifest = params.get("data.manifest_hash") or run_config.get("manifest_hash") or ""
        class_names = run_config.get("class_names")
        metadata = {METADATA_KEY: {
            "conditional": conditional, "num_classes": num_classes, "nz": int(spec["nz"]),
            "channels": int(spec["channels"]), "resolution": int(spec["resolution"]),
            "class_names": class_names, "model_family": family, "dataset": dataset, "manifest_hash": manifest,
            "source_run_id": run_id, "output_range": [-1.0, 1.0],
        }}
        info = _log_on_run(
            mlflow, client, run,
            name=MODEL_NAME,
            python_model=str(GENERATOR_MODEL_FILE),
            artifacts={"weights": str(weights), "config": str(config_path)},
            code_paths=[str(Path(gan_models.__file__).resolve().parent)],
            signature=_signature(spec),
            input_example=_input_example(spec),
            pip_requirements=_pip_requirements(),
            metadata=metadata,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)

    eval_metrics = {k: v for k, v in run.data.metrics.items() if _is_eval_metric(k)}
    version_tags = {
        "manifest_hash": manifest, "model_family": family, "dataset": dataset, "source_run_id": run_id,
        "conditional": str(conditional).lower(), "num_classes": "" if num_classes is None else str(num_classes),
        "nz": str(spec["nz"]), "resolution": str(spec["resolution"]), "channels": str(spec["channels"]),
        "model_uri": info.model_uri,
    }
    version_tags.update({METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in eval_metrics.items()})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    kind = f"conditional on {num_classes} classes" if conditional else "unconditional"
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(eval_metrics.items())) or "not evaluated yet"
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
            "alias_uri": f"models:/{name}@{alias}", "model_uri": info.model_uri}


# ---------------------------------------------------------------- promote
def promote_stage(cfg: PipelineConfig, name: str, version: Optional[str] = None, from_alias: str = "candidate",
                  to_alias: str = "champion", metric: Optional[str] = None, force: bool = False) -> dict:
    """Point ``to_alias`` at ``version`` (or at the version behind ``from_alias``) unless it is worse than the
    current holder of ``to_alias`` on ``metric``. Returns ``{"name", "version", "alias", "previous",
    "candidate_value", "champion_value", "promoted"}``."""
    from pipelines.safety import check_alias

    check_alias(to_alias, "--to")
    client = _client(cfg)
    model = _get_registered_model(client, name)
    candidate = _resolve_version(client, model, version, from_alias)
    metric = metric or cfg.registry.promote_metric
    direction = metric_direction(metric)
    if direction is None:
        raise UserError(f"metric {metric!r} has no better/worse direction; choose one of {', '.join(_known_metrics())}")

    champion = None
    if to_alias in (model.aliases or {}):
        champion = client.get_model_version_by_alias(name, to_alias)
    result = {"name": name, "version": str(candidate.version), "alias": to_alias,
              "previous": None if champion is None else str(champion.version),
              "candidate_value": None, "champion_value": None, "promoted": False}
    if champion is not None and str(champion.version) == str(candidate.version):
        print(f"{name} v{candidate.version} already is @{to_alias}; nothing to do", flush=True)
        return result

    cand_value = _version_metric(client, candidate, metric)
    champ_value = None if champion is None else _version_metric(client, champion, metric)
    result.update(candidate_value=cand_value, champion_value=champ_value)
    better = "lower" if direction == "min" else "higher"
    if champion is not None and not force:
        if cand_value is None:
            raise UserError(
                f"cannot compare: {name} v{candidate.version} has no {metric} (evaluate its run first: "
                f"gan-pipeline evaluate --run-id {candidate.run_id}); pass --force to promote it anyway")
        if champ_value is None:
            raise UserError(
                f"cannot compare: the current @{to_alias} {name} v{champion.version} has no {metric}; "
                f"pass --force to promote v{candidate.version} ({metric} {_fmt(cand_value)}) anyway")
        worse = cand_value > champ_value if direction == "min" else cand_value < champ_value
        if worse:
            raise UserError(
                f"not promoted: {name} v{candidate.version} has {metric} = {_fmt(cand_value)}, worse than "
                f"@{to_alias} v{champion.version} with {metric} = {_fmt(champ_value)} ({better} is better). "
                f"Pass --force to promote it anyway.")

    client.set_registered_model_alias(name, to_alias, str(candidate.version))
    trace = {
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "previous_champion": "none" if champion is None else str(champion.version),
        "promotion_metric": metric,
        "candidate_value": _fmt(cand_value) if cand_value is not None else "none",
        "champion_value": _fmt(champ_value) if champ_value is not None else "none",
        "promoted_to": to_alias,
        "promoted_from": f"v{candidate.version}" if version is not None else f"@{from_alias}",
        "forced": str(bool(force)).lower(),
    }
    for key, value in trace.items():
        client.set_model_version_tag(name, str(candidate.version), key, value)
    result["promoted"] = True
    if champion is None:
        why = f"no @{to_alias} before"
    else:
        why = f"{metric} {_fmt(cand_value)} vs {_fmt(champ_value)} of v{champion.version}, {better} is better"
        if force:
            why += ", forced"
    print(f"promoted {name} v{candidate.version} to @{to_alias} ({why})", flush=True)
    return result


# ---------------------------------------------------------------- list / show
def _created(ms: Optional[int]) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def models_list_stage(cfg: PipelineConfig) -> list[dict]:
    """A table of registered models and their aliases. Returns the rows."""
    from rich.table import Table

    client = _client(cfg)
    models = sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name)
    console = _console()
    if not models:
        console.print(f"no registered models at {redact_uri(cfg.resolved_tracking_uri)} "
                      f"(register one with: gan-pipeline register --run-id RUN_ID)")
        return []
    table = Table(title=f"registered models ({redact_uri(cfg.resolved_tracking_uri)})")
    for column in ("name", "aliases", "latest", "updated", "description"):
        table.add_column(column, overflow="fold")
    rows = []
    for m in models:
        latest = max((int(v.version) for v in (m.latest_versions or [])), default=None)
        aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted((m.aliases or {}).items())) or "-"
        row = {"name": m.name, "aliases": dict(m.aliases or {}), "latest": latest,
               "updated": _created(m.last_updated_timestamp), "description": m.description or ""}
        rows.append(row)
        desc = row["description"]
        table.add_row(m.name, aliases, "-" if latest is None else f"v{latest}", row["updated"],
                      desc if len(desc) <= 60 else desc[:57] + "...")
    console.print(table)
    return rows


def models_show_stage(cfg: PipelineConfig, name: str) -> list[dict]:
    """A table of the versions of ``name``: aliases, key metrics, dataset, run, creation time. Returns the rows."""
    from rich.table import Table

    client = _client(cfg)
    model = _get_registered_model(client, name)
    versions = _versions(client, name)
    by_version = _aliases_by_version(model)
    metric_names = [m for m in dict.fromkeys((cfg.registry.promote_metric, *KEY_METRICS))
                    if any(METRIC_TAG_PREFIX + m in (v.tags or {}) for v in versions)]
    table = Table(title=f"{name}" + (f": {model.description}" if model.description else ""))
    for column in ("version", "aliases", *metric_names, "family", "dataset", "manifest", "run id", "created"):
        table.add_column(column, overflow="fold")
    rows = []
    for v in versions:
        tags = v.tags or {}
        metrics = {m: _version_metric(client, v, m) for m in metric_names}
        row = {"version": str(v.version), "aliases": by_version.get(str(v.version), []), "metrics": metrics,
               "model_family": tags.get("model_family", ""), "dataset": tags.get("dataset", ""),
               "manifest_hash": tags.get("manifest_hash", ""), "run_id": v.run_id or tags.get("source_run_id", ""),
               "created": _created(v.creation_timestamp)}
        rows.append(row)
        table.add_row(f"v{v.version}", ", ".join(f"@{a}" for a in row["aliases"]) or "-",
                      *(_fmt(metrics[m]) for m in metric_names), row["model_family"] or "-", row["dataset"] or "-",
                      row["manifest_hash"][:12] or "-", row["run_id"] or "-", row["created"])
    _console().print(table)
    return rows
