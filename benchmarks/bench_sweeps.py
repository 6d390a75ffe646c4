"""Sweeps at the same budget: PBT, ASHA and random search (FIFO) against `gan-pipeline run` at its default budget.

    python benchmarks/bench_sweeps.py [--model wgan] [--time-budget 20m] [--samples 4] [--max-concurrent 2]
                                      [--schedulers pbt,asha,fifo] [--no-baseline] [--workdir DIR] [--tiny]
                                      [--tune-options "--perturbation-interval 400 --workers-per-trial 1"]

Every sweep is the real `gan-pipeline tune --scheduler S --time-budget B` (trial 0 the preset's own values), its
best trial evaluated in full by the pipeline's evaluate (domain FD, precision, recall) and registered; the
baseline is `gan-pipeline run --model M` at the default budget. One table: best domain FD, precision, recall,
wall time end to end, trials, and each sweep's verdict against its own preset trial. The domain classifier is
trained once and shared (GAN_PIPELINE_CLASSIFIER_CACHE). ``--tiny`` proves the script in a few minutes (a small
dataset, tiny networks, a step cap): its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan_models.performance import machine_info  # noqa: E402

EXE = str(Path(sys.executable).with_name("gan-pipeline"))
TINY = ["--batch-size", "16", "--ngf", "16", "--nz", "32", "--log-every", "2", "--sample-every", "4",
        "--max-steps", "8"]
TINY_CONFIG = ("data:\n  limit: 2000\ntune:\n  report_samples: 100\n  report_every: 4\n"
               "eval:\n  num_samples: 200\n  kid_subset_size: 100\n  inception: false\n")


def _run(cmd: list[str], where: Path, log: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=where, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (where / log).write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr, wall


def sweep(model: str, scheduler: str, args, workdir: Path, extra: list[str]) -> dict:
    where = workdir / f"tune-{scheduler}"
    where.mkdir(parents=True, exist_ok=True)
    cmd = [EXE, "tune", "--model", model, "--scheduler", scheduler, "--samples", str(args.samples),
           "--max-concurrent", str(args.max_concurrent), "--time-budget", args.time_budget,
           "--runs-dir", str(where / "gan-runs"), "--tracking-uri", f"sqlite:///{where / 'mlflow.db'}",
           "--name", f"bench-{model}-{scheduler}", *extra]
    code, out, wall = _run(cmd, where, "tune.log")
    row = {"what": f"tune --scheduler {scheduler}", "wall_s": wall, "trials": args.samples}
    if code != 0:
        return {**row, "error": out[-300:]}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.gan_pipeline.stage = 'tune'")[0]
    m = parent.data.metrics
    return {**row, "domain_fd": m.get("best_domain_fd"), "precision": m.get("best_precision"),
            "recall": m.get("best_recall"), "verdict": parent.data.tags.get("gan_pipeline.verdict", "")}


def baseline(model: str, workdir: Path, extra: list[str]) -> dict:
    where = workdir / "run"
    where.mkdir(parents=True, exist_ok=True)
    cmd = [EXE, "run", "--model", model, "--runs-dir", str(where / "gan-runs"),
           "--tracking-uri", f"sqlite:///{where / 'mlflow.db'}", *extra]
    code, out, wall = _run(cmd, where, "run.log")
    row = {"what": f"run --model {model}", "wall_s": wall, "trials": 1}
    if code != 0:
        return {**row, "error": out[-300:]}
    state = json.loads(next((where / "gan-runs" / "pipelines").glob("*/state.json")).read_text())
    metrics = state["stages"]["evaluate"]["outputs"]["metrics"]
    return {**row, **{k: metrics.get(k) for k in ("domain_fd", "precision", "recall")}}


def _fmt(value, digits=3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wgan")
    parser.add_argument("--time-budget", default="20m", help="each sweep's whole budget")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--schedulers", default="pbt,asha,fifo")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tiny", action="store_true", help="prove the script: tiny data, networks and steps")
    parser.add_argument("--tune-options", default="", help="more `gan-pipeline tune` options for every sweep, "
                                                           "e.g. \"--perturbation-interval 400 --workers-per-trial 1\"")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sweeps-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GAN_PIPELINE_CLASSIFIER_CACHE", str(workdir / "classifiers"))
    extra: list[str] = []
    if args.tiny:
        (workdir / "tiny.yaml").write_text(TINY_CONFIG)
        extra = ["--config", str(workdir / "tiny.yaml"), *TINY]
    print(f"machine: {machine_info()}\nworkdir: {workdir}", flush=True)
    rows = []
    if not args.no_baseline:  # first: it trains the shared domain classifier, outside the sweeps' budgets
        rows.append(baseline(args.model, workdir, extra))
        print(rows[-1], flush=True)
    for scheduler in [s for s in args.schedulers.split(",") if s]:
        rows.append(sweep(args.model, scheduler, args, workdir, [*extra, *shlex.split(args.tune_options)]))
        print(rows[-1], flush=True)
    print(f"\n| what | best domain FD | precision | recall | wall time | trials |\n|---|---|---|---|---|---|")
    for row in rows:
        error = " ".join(row.get("error", "").split())[-160:]
        print(f"| {row['what']} | {_fmt(row.get('domain_fd'), 2)} | {_fmt(row.get('precision'))} | "
              f"{_fmt(row.get('recall'))} | {row['wall_s'] / 60:.1f} min | {row['trials']} |"
              + (f" ERROR: {error}" if error else ""))
    for row in rows:
        if row.get("verdict"):
            print(f"{row['what']}: {row['verdict']}")
    print("\nreproduce: python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
