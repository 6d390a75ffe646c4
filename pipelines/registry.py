"""The MLflow model registry as the stages use it: the client, registered models and their versions, aliases,
and the metrics recorded on a version (``register`` writes them, ``promote`` and ``models`` read them)."""
from __future__ import annotations

import math
import sys
from typing import Optional

from pipelines.config import PipelineConfig
from pipelines.errors import UserError

METRIC_TAG_PREFIX = "metric."   # version tag of an evaluation metric: metric.<name>
# Columns of ``models show`` (those present).
KEY_METRICS = ("domain_fd", "precision", "recall", "label_accuracy", "inception_fd")


def registry_client(cfg: PipelineConfig):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import check_reachable

    uri = cfg.resolved_tracking_uri
    check_reachable(uri)  # a dead server: seconds and a clear line, not minutes of MLflow retries
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def fmt_value(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}"


def console():
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


def model_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def get_registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
    names = model_names(client)
    listing = ", ".join(names) if names else "none (register one with: gan-pipeline register --run-id RUN_ID)"
    raise UserError(f"no registered model named {name!r}; registered models: {listing}")


def model_versions(client, name: str) -> list:
    found = client.search_model_versions(f"name='{name}'", max_results=1000)
    return sorted(found, key=lambda v: int(v.version))


def aliases_by_version(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return {k: sorted(v) for k, v in out.items()}


def alias_listing(model) -> str:
    aliases = model.aliases or {}
    if not aliases:
        return "none"
    return ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items()))


def resolve_version(client, model, version: Optional[str], alias: Optional[str]):
    from mlflow.exceptions import MlflowException

    name = model.name
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not is_not_found(exc):
                raise
        existing = ", ".join(f"v{v.version}" for v in model_versions(client, name)) or "none"
        raise UserError(f"model {name!r} has no version {version!r}; its versions: {existing}")
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
    raise UserError(f"model {name!r} has no alias {alias!r}; its aliases: {alias_listing(model)} "
                    f"(or pass --version)")


def version_metric(client, mv, metric: str) -> Optional[float]:
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
