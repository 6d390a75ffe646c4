"""``gan-pipeline models list`` / ``models show``: tables of registered models and their versions."""
from __future__ import annotations

import time
from typing import Optional

from pipelines import registry
from pipelines.config import PipelineConfig
from pipelines.tracking import redact_uri


def _created(ms: Optional[int]) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def models_list_stage(cfg: PipelineConfig) -> list[dict]:
    """A table of registered models and their aliases. Returns the rows."""
    from rich.table import Table

    client = registry.registry_client(cfg)
    models = sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name)
    console = registry.console()
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

    client = registry.registry_client(cfg)
    model = registry.get_registered_model(client, name)
    versions = registry.model_versions(client, name)
    by_version = registry.aliases_by_version(model)
    metric_names = [m for m in dict.fromkeys((cfg.registry.promote_metric, *registry.KEY_METRICS))
                    if any(registry.METRIC_TAG_PREFIX + m in (v.tags or {}) for v in versions)]
    table = Table(title=f"{name}" + (f": {model.description}" if model.description else ""))
    for column in ("version", "aliases", *metric_names, "family", "dataset", "manifest", "run id", "created"):
        table.add_column(column, overflow="fold")
    rows = []
    for v in versions:
        run_tags = v.tags or {}
        metrics = {m: registry.version_metric(client, v, m) for m in metric_names}
        row = {"version": str(v.version), "aliases": by_version.get(str(v.version), []), "metrics": metrics,
               "model_family": run_tags.get("model_family", ""), "dataset": run_tags.get("dataset", ""),
               "manifest_hash": run_tags.get("manifest_hash", ""), "run_id": v.run_id or run_tags.get("source_run_id", ""),
               "created": _created(v.creation_timestamp)}
        rows.append(row)
        table.add_row(f"v{v.version}", ", ".join(f"@{a}" for a in row["aliases"]) or "-",
                      *(registry.fmt_value(metrics[m]) for m in metric_names), row["model_family"] or "-", row["dataset"] or "-",
                      row["manifest_hash"][:12] or "-", row["run_id"] or "-", row["created"])
    registry.console().print(table)
    return rows
