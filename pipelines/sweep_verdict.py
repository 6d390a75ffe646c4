"""The end of a sweep: did it beat the preset, by how much, with which values, at what cost.

On the sweep's MLflow run: ``tune_results.csv`` (one row per trial), ``verdict.csv`` (the best trial and the
preset's own trial, both evaluated in full the same way: domain FD, precision, recall), ``verdict.txt`` (the
printed summary), ``metric_vs_hyperparameters.png``, for PBT/PB2 ``hyperparameter_schedules.png`` (each trial's
values over its steps, exploits included), and ``best_vs_preset_samples.png`` (the two sample grids side by side).
The best trial is evaluated and registered (``candidate``) through the stages ``run`` uses.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from pipelines import tags
from pipelines.errors import UserError
from pipelines.sweep_trial import HYPERPARAMETER_METRIC_PREFIX, SweepPlan, is_preset, trial_run_name, trial_values

VERDICT_METRICS = ("domain_fd", "precision", "recall")
LOWER_IS_BETTER = {"domain_fd": True, "precision": False, "recall": False}


def _best_report(result, metric: str) -> tuple[Optional[float], Any]:
    """A trial's best reported score and the Tune checkpoint it came with (its latest where none matches)."""
    scored = [(m.get(metric), c) for c, m in (result.best_checkpoints or []) if _finite(m.get(metric))]
    history = getattr(result, "metrics_dataframe", None)
    best_value = None
    if history is not None and metric in history:
        values = [v for v in history[metric].tolist() if _finite(v)]
        best_value = min(values) if values else None
    if scored:
        value, checkpoint = min(scored, key=lambda pair: pair[0])
        return (best_value if best_value is not None else value), checkpoint
    return best_value, result.checkpoint


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def improvement(best: float, preset: float, lower_is_better: bool = True) -> float:
    """Relative improvement of ``best`` over ``preset`` in percent (positive = better)."""
    if preset == 0:
        return 0.0
    return 100.0 * ((preset - best) if lower_is_better else (best - preset)) / abs(preset)


def summary_line(best_name: str, best: dict, preset: Optional[dict], values: dict, metric: str = "domain_fd") -> str:
    if preset is None:
        return f"no preset trial to compare with; best trial {best_name}: {metric} {best[metric]:.3f} with {values}"
    gain = improvement(best[metric], preset[metric], LOWER_IS_BETTER.get(metric, True))
    if best_name == preset.get("trial") or gain <= 0:
        return (f"did not beat the preset: best {metric} {best[metric]:.3f} vs the preset's {preset[metric]:.3f} "
                f"at the same budget")
    return (f"beat the preset by {gain:.1f}% on {metric} ({best[metric]:.3f} vs {preset[metric]:.3f}) with values "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def conclude(cfg, plan: SweepPlan, results, spec: dict, mlflow_client, seconds: float) -> dict:
    """Results table, verdict and plots on the parent run; the best trial evaluated in full and registered."""
    parent_id, metric = plan.parent_run_id, cfg.tune.metric
    exp_id = plan.experiment_id
    children = mlflow_client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    for child in children:
        if child.info.status == "RUNNING":  # its trial was stopped by the scheduler (or failed) mid-training
            mlflow_client.set_tag(child.info.run_id, tags.STOPPED_EARLY, "true")
            mlflow_client.set_terminated(child.info.run_id, status="KILLED")
    runs_by_name = {c.data.tags.get(tags.RUN_NAME): c for c in children}
    rows, best_reports = [], {}
    for result in results:
        config = result.config or {}
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "")
        name = trial_run_name(plan.sweep, trial_id)
        value, checkpoint = _best_report(result, metric)
        best_reports[name] = (value, checkpoint, result)
        run = runs_by_name.get(name)
        rows.append({"trial": name, "preset": is_preset(config, plan.preset_values), **trial_values(config),
                     f"best_{metric}": value, "last_step": metrics.get("step"),
                     "reports": metrics.get("training_iteration"),
                     "exploits": int(run.data.tags.get(tags.EXPLOITS, "0")) if run else 0,
                     "error": type(result.error).__name__ if result.error else ""})
    if not rows:
        mlflow_client.set_terminated(parent_id, status="FAILED")
        raise UserError("the sweep produced no trials")
    mlflow_client.log_text(parent_id, _csv(rows), "tune_results.csv")
    mlflow_client.log_figure(parent_id, plot_metric_vs_values(rows, list(spec), f"best_{metric}"),
                             "metric_vs_hyperparameters.png")
    if cfg.tune.population_based:
        mlflow_client.log_figure(parent_id, plot_schedules(mlflow_client, children, list(spec)),
                                 "hyperparameter_schedules.png")
    scored = [(v, name) for name, (v, _, _) in best_reports.items() if _finite(v)]
    if not scored:
        mlflow_client.set_terminated(parent_id, status="FAILED")
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise UserError(f"no trial reported {metric}" + (f" (trial errors: {', '.join(errors)})" if errors else ""))
    best_name = min(scored)[1]
    best_run = runs_by_name.get(best_name)
    if best_run is None:
        raise UserError(f"could not find the MLflow run of the best trial {best_name}")
    _finish_if_stopped(mlflow_client, best_run, best_reports[best_name][1])
    from pipelines.run import Workflow, run_after_training

    outputs = run_after_training(cfg, plan.sweep, {"run_id": best_run.info.run_id, "run_name": best_name})
    best_metrics, registered = outputs["evaluate"]["metrics"], outputs["register"]
    workflow_dir = Workflow(cfg, plan.sweep).directory
    preset_row = next((r for r in rows if r["preset"]), None)
    preset = None
    if preset_row is not None:
        preset_run = runs_by_name.get(preset_row["trial"])
        if preset_row["trial"] == best_name:
            preset_metrics = best_metrics
        else:
            from pipelines.evaluate import evaluate_stage

            _finish_if_stopped(mlflow_client, preset_run, best_reports[preset_row["trial"]][1])
            preset_metrics = evaluate_stage(cfg, run_id=preset_run.info.run_id,
                                            out=str(workflow_dir / "preset-evaluation"))
        preset = {"trial": preset_row["trial"], **{k: preset_metrics.get(k) for k in VERDICT_METRICS}}
        mlflow_client.set_tag(parent_id, tags.PRESET_RUN_ID, preset_run.info.run_id)
    best = {"trial": best_name, **{k: best_metrics.get(k) for k in VERDICT_METRICS}}
    best_values = trial_values(best_reports[best_name][2].config or {})
    line = summary_line(best_name, best, preset, best_values, "domain_fd")
    table = [{"role": "best", **best, "values": str(best_values)}]
    if preset is not None:
        table.append({"role": "preset", **preset, "values": str(trial_values(
            best_reports[preset["trial"]][2].config or {}))})
    mlflow_client.log_text(parent_id, _csv(table), "verdict.csv")
    cost = (f"{len(rows)} trials, {seconds / 60:.1f} min of wall time, {cfg.tune.workers_per_trial} worker(s) "
            f"per trial")
    mlflow_client.log_text(parent_id, f"{line}\ncost: {cost}\n", "verdict.txt")
    mlflow_client.set_tag(parent_id, tags.VERDICT, line[:5000])
    grids = [(f"best: {best_name.rsplit('-', 1)[-1]}", workflow_dir / "evaluation" / "samples.png")]
    if preset is not None and preset["trial"] != best_name:
        grids.append((f"preset: {preset['trial'].rsplit('-', 1)[-1]}",
                      workflow_dir / "preset-evaluation" / "samples.png"))
    if all(path.is_file() for _, path in grids):
        mlflow_client.log_image(parent_id, side_by_side(grids), "best_vs_preset_samples.png")
    for key in VERDICT_METRICS:
        if _finite(best.get(key)):
            mlflow_client.log_metric(parent_id, f"best_{key}", float(best[key]))
        if preset is not None and _finite(preset.get(key)):
            mlflow_client.log_metric(parent_id, f"preset_{key}", float(preset[key]))
    mlflow_client.log_metric(parent_id, "sweep_seconds", seconds)
    mlflow_client.set_tag(parent_id, tags.BEST_RUN_ID, best_run.info.run_id)
    mlflow_client.set_terminated(parent_id, status="FINISHED")
    _print_verdict(plan.sweep, rows, table, line, cost, registered, parent_id)
    return {"parent_run_id": parent_id, "best_run_id": best_run.info.run_id, "best_config": best_values,
            "metrics": best_metrics, "preset": preset, "verdict": line, "registered": registered, "trials": rows,
            "seconds": seconds}


def _finish_if_stopped(mlflow_client, run, checkpoint) -> None:
    """A trial stopped by its scheduler after its best report has no generator artifacts yet: record the
    generator of the checkpoint that report came with."""
    if run is None or checkpoint is None or mlflow_client.get_run(run.info.run_id).info.status == "FINISHED":
        return
    from pipelines.launch import finish_run

    with checkpoint.as_directory() as local:
        finish_run(mlflow_client, run.info.run_id, Path(local), checkpoint.path, str(Path(checkpoint.path).parent),
                   run.data.tags.get(tags.RUN_NAME, ""))


def _csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _print_verdict(sweep, rows, table, line, cost, registered, parent_id) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"sweep {sweep}: best trial vs the preset (full evaluation)")
    for column in ("role", "trial", *VERDICT_METRICS, "values"):
        out.add_column(column)
    for row in table:
        out.add_row(row["role"], row["trial"].rsplit("-", 1)[-1],
                    *(f"{row[k]:.3f}" if _finite(row.get(k)) else "-" for k in VERDICT_METRICS), row["values"])
    console = Console()
    console.print(out)
    stopped = sum(1 for r in rows if r["reports"] is not None and r["reports"] < max(
        (x["reports"] or 0) for x in rows))
    print(f"[gan-pipeline] {line}\n[gan-pipeline] cost: {cost} ({stopped} stopped early); registered "
          f"{registered['name']} v{registered['version']} @candidate; MLflow parent run {parent_id}", flush=True)


def plot_metric_vs_values(rows, keys, metric):
    """One panel per hyper-parameter: each trial's best score against its (final) value; the preset marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for preset, style in ((False, {"color": "tab:blue"}), (True, {"color": "tab:red", "marker": "*", "s": 150,
                                                                      "label": "preset"})):
            points = [(r[key], r[metric]) for r in rows if _finite(r.get(metric)) and r["preset"] == preset
                      and key in r]
            if points:
                ax.scatter(*zip(*points), **style)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key.startswith("optim.lr") or key in ("optim.clip_value", "optim.gp_weight"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best")
    fig.tight_layout()
    return fig


def plot_schedules(mlflow_client, children, keys):
    """PBT: each trial's values over its steps (``hp.<key>`` metrics, logged at every start and exploit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for child in children:
            history = sorted((m.step, m.value) for m in
                             mlflow_client.get_metric_history(child.info.run_id, HYPERPARAMETER_METRIC_PREFIX + key))
            if history:
                steps, values = zip(*history)
                trial = child.data.tags.get(tags.RUN_NAME, "").rsplit("-", 1)[-1]
                ax.step(steps, values, where="post", marker="o", label=trial)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if key.startswith("optim.lr") or key in ("optim.clip_value", "optim.gp_weight"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def side_by_side(grids: list[tuple[str, Path]]):
    """Sample grids next to each other under their titles, as one RGB array."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = [Image.open(path).convert("RGB") for _, path in grids]
    title_h, gap = 18, 8
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images) + title_h), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for (title, _), image in zip(grids, images):
        draw.text((x + 4, 3), title, fill="black")
        canvas.paste(image, (x, title_h))
        x += image.width + gap
    return np.asarray(canvas)
