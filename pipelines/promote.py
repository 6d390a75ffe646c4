"""``gan-pipeline promote``: move the ``champion`` alias to a registered version, guarded by an evaluation metric
(the candidate must be better than the champion in the metric's direction, unless forced); the promotion is
recorded in tags on the version (promoted_at, previous_champion, promotion_metric, candidate_value,
champion_value, promoted_from, forced)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from pipelines import registry
from pipelines.config import PipelineConfig
from pipelines.errors import UserError


def promote_stage(cfg: PipelineConfig, name: str, version: Optional[str] = None, from_alias: str = "candidate",
                  to_alias: str = "champion", metric: Optional[str] = None, force: bool = False) -> dict:
    """Point ``to_alias`` at ``version`` (or at the version behind ``from_alias``) unless it is worse than the
    current holder of ``to_alias`` on ``metric``. Returns ``{"name", "version", "alias", "previous",
    "candidate_value", "champion_value", "promoted"}``."""
    from pipelines.safety import check_alias

    check_alias(to_alias, "--to")
    client = registry.registry_client(cfg)
    model = registry.get_registered_model(client, name)
    candidate = registry.resolve_version(client, model, version, from_alias)
    metric = metric or cfg.registry.promote_metric
    from pipelines.metrics.suite import METRIC_DIRECTION, metric_direction

    direction = metric_direction(metric)
    if direction is None:
        raise UserError(f"metric {metric!r} has no better/worse direction; choose one of {', '.join(sorted(METRIC_DIRECTION))}")

    champion = None
    if to_alias in (model.aliases or {}):
        champion = client.get_model_version_by_alias(name, to_alias)
    result = {"name": name, "version": str(candidate.version), "alias": to_alias,
              "previous": None if champion is None else str(champion.version),
              "candidate_value": None, "champion_value": None, "promoted": False}
    if champion is not None and str(champion.version) == str(candidate.version):
        print(f"{name} v{candidate.version} already is @{to_alias}; nothing to do", flush=True)
        return result

    cand_value = registry.version_metric(client, candidate, metric)
    champ_value = None if champion is None else registry.version_metric(client, champion, metric)
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
                f"pass --force to promote v{candidate.version} ({metric} {registry.fmt_value(cand_value)}) anyway")
        worse = cand_value > champ_value if direction == "min" else cand_value < champ_value
        if worse:
            raise UserError(
                f"not promoted: {name} v{candidate.version} has {metric} = {registry.fmt_value(cand_value)}, worse than "
                f"@{to_alias} v{champion.version} with {metric} = {registry.fmt_value(champ_value)} ({better} is better). "
                f"Pass --force to promote it anyway.")

    client.set_registered_model_alias(name, to_alias, str(candidate.version))
    trace = {
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "previous_champion": "none" if champion is None else str(champion.version),
        "promotion_metric": metric,
        "candidate_value": registry.fmt_value(cand_value) if cand_value is not None else "none",
        "champion_value": registry.fmt_value(champ_value) if champ_value is not None else "none",
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
        why = f"{metric} {registry.fmt_value(cand_value)} vs {registry.fmt_value(champ_value)} of v{champion.version}, {better} is better"
        if force:
            why += ", forced"
    print(f"promoted {name} v{candidate.version} to @{to_alias} ({why})", flush=True)
    return result
