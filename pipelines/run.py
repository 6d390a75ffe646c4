"""``gan-pipeline run``: prepare -> train -> evaluate -> register as one resumable workflow.

Each stage records its inputs' hash and its outputs in ``<runs_dir>/pipelines/<name>/state.json``. Re-running the
same command skips every stage that completed with the same inputs and resumes the one that did not (training
from its last checkpoint). Stages talk to each other only through these recorded outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipelines import progress
from pipelines.config import RUN_MIN_TRAINING, RUN_TRAINING_ENDS_AFTER, PipelineConfig
from pipelines.errors import UserError
from pipelines.files import atomic_write


@dataclass(frozen=True)
class Stage:
    name: str
    #: config sections whose values are this stage's inputs (with the upstream outputs)
    sections: tuple[str, ...]
    run: Callable[[PipelineConfig, dict, "Workflow"], dict]


def _prepare(cfg: PipelineConfig, upstream: dict, wf: "Workflow") -> dict:
    from pipelines.preflight import check_dataset_fits
    from pipelines.prepare import ensure_dataset

    data_path, manifest = ensure_dataset(cfg)
    check_dataset_fits(cfg, manifest, data_path, needs_labels="gan-pipeline run (its evaluate stage)")
    return {"data_path": data_path, "manifest_hash": manifest["manifest_hash"], "dataset": manifest["dataset"]}


def _train(cfg: PipelineConfig, upstream: dict, wf: "Workflow") -> dict:
    from pipelines.train import train_stage

    cfg = cfg.model_copy(deep=True)
    cfg.data.path = upstream["prepare"]["data_path"]
    deadline = None
    if cfg.train.default_limits:
        now = time.time()
        deadline = training_deadline(wf.started, now)
        # the budget is the whole window (what a resumed run has left is counted against it); the deadline ends it
        cfg.train.time_budget = RUN_TRAINING_ENDS_AFTER
        until = time.strftime('%H:%M:%S', time.localtime(deadline))
        if deadline > wf.started + RUN_TRAINING_ENDS_AFTER:
            print(f"[gan-pipeline] start-up took {now - wf.started:.0f}s: training until {until} "
                  f"({RUN_MIN_TRAINING:.0f}s at least), so this run ends after its usual 10 minutes")
        else:
            print(f"[gan-pipeline] training until {until}, so that the whole run ends within 10 minutes "
                  f"(--time-budget, --epochs or --max-steps to choose)")
    started = wf.state.get("train_started")
    if started and started["inputs"] == wf.inputs_hash("train"):
        result = train_stage(cfg, resume=started["run_name"], deadline=deadline)
    else:
        run_name = f"{wf.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
        wf.state["train_started"] = {"run_name": run_name, "inputs": wf.inputs_hash("train")}
        wf.save()
        result = train_stage(cfg, run_name=run_name, deadline=deadline)
    return {"run_id": result.run_id, "run_name": result.run_name, "steps": result.steps,
            "checkpoint_dir": result.checkpoint_dir}


def training_deadline(command_started: float, now: float) -> float:
    """When ``run``'s training ends with the default limits (seconds since the epoch): RUN_TRAINING_ENDS_AFTER
    after the command started, but no sooner than RUN_MIN_TRAINING from ``now``."""
    return max(command_started + RUN_TRAINING_ENDS_AFTER, now + RUN_MIN_TRAINING)


def _evaluate(cfg: PipelineConfig, upstream: dict, wf: "Workflow") -> dict:
    from pipelines.evaluate import evaluate_stage

    metrics = evaluate_stage(cfg, run_id=upstream["train"]["run_id"], out=str(wf.directory / "evaluation"),
                             table=False)  # the summary table shows the main ones
    return {"metrics": metrics}


def _register(cfg: PipelineConfig, upstream: dict, wf: "Workflow") -> dict:
    from pipelines.promote import promote_stage
    from pipelines.register import register_stage

    registered = register_stage(cfg, run_id=upstream["train"]["run_id"])
    outputs = {"name": registered["name"], "version": registered["version"], "promoted": False}
    if cfg.registry.promote:
        try:
            promote_stage(cfg, name=registered["name"], version=str(registered["version"]), from_alias=None,
                          to_alias="champion", metric=None, force=False)
            outputs["promoted"] = True
        except UserError as exc:
            print(f"[gan-pipeline] not promoted: {exc}")
    return outputs


# The stage graph, in one place: each stage depends on all stages before it.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("data",), _prepare),
    Stage("train", ("model", "optim", "train"), _train),
    Stage("evaluate", ("eval",), _evaluate),
    Stage("register", ("registry",), _register),
)


class Workflow:
    def __init__(self, cfg: PipelineConfig, name: str, started: Optional[float] = None):
        from pipelines.safety import check_name

        self.cfg, self.name = cfg, check_name(name, "--run-name")
        self.started = started if started is not None else time.time()
        self.directory = Path(cfg.runs_dir) / "pipelines" / name
        self.path = self.directory / "state.json"
        try:
            self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}
            if not isinstance(self.state.get("stages"), dict):
                raise ValueError("no stages")
        except (ValueError, AttributeError):
            raise UserError(f"the workflow state {self.path} is damaged or not gan-pipeline's; run under another "
                            f"--run-name (the finished stages of {name!r} cannot be reused)") from None

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.state, indent=2, sort_keys=True))

    def inputs_hash(self, stage_name: str) -> str:
        """A stage's inputs: its config sections and everything upstream (their inputs and outputs)."""
        parts: dict[str, Any] = {}
        for stage in STAGES:
            dump = self.cfg.model_dump(mode="json")
            parts[stage.name] = {s: dump[s] for s in stage.sections}
            if stage.name == stage_name:
                break
            parts[stage.name + ":outputs"] = self.state["stages"].get(stage.name, {}).get("outputs")
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def default_name(cfg: PipelineConfig) -> str:
    """The same command names the same workflow, so re-running it resumes."""
    dump = cfg.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps({k: dump[k] for k in ("model", "optim", "data", "train", "eval", "registry")},
                                       sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.name}-{digest}"


def run_stage(cfg: PipelineConfig, run_name: Optional[str] = None, started: Optional[float] = None) -> dict:
    """``started`` (seconds since the epoch): when the command started, for the default training deadline."""
    from pipelines import tracking
    from pipelines.preflight import check_local_size

    check_local_size(cfg)
    tracking.check_reachable(cfg.resolved_tracking_uri)
    wf = Workflow(cfg, run_name or default_name(cfg), started=started)
    print(f"[gan-pipeline] workflow {wf.name} (state: {wf.path})")
    upstream: dict[str, dict] = {}
    report: list[tuple[str, str, float]] = []
    for stage in STAGES:
        inputs = wf.inputs_hash(stage.name)
        record = wf.state["stages"].get(stage.name)
        if record and record.get("inputs") == inputs and record.get("status") == "done":
            upstream[stage.name] = record["outputs"]
            report.append((stage.name, "skipped (done, same inputs)", 0.0))
            print(f"[gan-pipeline] {stage.name}: done earlier with the same inputs, skipped")
            continue
        print(f"[gan-pipeline] {stage.name}: running")
        start = time.perf_counter()
        wf.state["stages"][stage.name] = {"inputs": inputs, "status": "running"}
        wf.save()
        # training shows its own live display; the other stages a spinner (on a terminal)
        with progress.stage_spinner(stage.name) if stage.name != "train" else contextlib.nullcontext():
            outputs = stage.run(cfg, upstream, wf)
        seconds = time.perf_counter() - start
        wf.state["stages"][stage.name] = {"inputs": inputs, "status": "done", "outputs": outputs,
                                          "seconds": round(seconds, 1)}
        wf.save()
        upstream[stage.name] = outputs
        report.append((stage.name, "ran", seconds))
    _summary(cfg, wf, upstream, report)
    return upstream


def run_after_training(cfg: PipelineConfig, name: str, trained: dict) -> dict:
    """The stages after ``train`` for a run trained elsewhere (``tune``'s best trial: ``trained`` holds its
    ``run_id`` and ``run_name``), outputs by stage name. Not recorded for resuming: the sweep is the unit."""
    wf = Workflow(cfg, name)
    upstream: dict[str, dict] = {"train": trained}
    for stage in STAGES[[s.name for s in STAGES].index("train") + 1:]:
        upstream[stage.name] = stage.run(cfg, upstream, wf)
    return upstream


def _summary(cfg: PipelineConfig, wf: Workflow, outputs: dict, report: list) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"gan-pipeline run {wf.name}")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("outputs")
    for name, status, seconds in report:
        out = outputs.get(name, {})
        if name == "prepare":
            detail = f"{out.get('dataset')} {out.get('manifest_hash', '')[:12]}"
        elif name == "train":
            detail = f"run {out.get('run_id')} ({out.get('steps')} steps)"
        elif name == "evaluate":
            m = out.get("metrics", {})
            keys = ("domain_fd", "precision", "recall", "label_accuracy", "classifier_score")
            detail = "  ".join(f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), (int, float)))
        else:
            detail = f"{out.get('name')} v{out.get('version')}" + (" -> champion" if out.get("promoted") else
                                                                   f" @{cfg.registry.alias}")
        table.add_row(name, status, f"{seconds:.0f}" if seconds else "-", detail)
    console.print(table)
    uri = cfg.resolved_tracking_uri
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}")
    console.print(f"MLflow UI: {ui}   (then: experiment '{cfg.tracking.experiment}', model '{outputs.get('register', {}).get('name')}')",
                  highlight=False, soft_wrap=True)
    grid = wf.directory / "evaluation" / "samples.png"
    if grid.exists():
        console.print(f"Samples: {grid}", highlight=False)
