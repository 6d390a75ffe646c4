"""Quality by default: every preset x worker count through the real `gan-pipeline run` (prepare -> train -> evaluate
-> register) with its default time budget, scored by the pipeline's own evaluate (10k generated vs 10k held-out).

    python benchmarks/bench_quality.py [--presets wgan,dcgan,wgan-gp,cgan] [--workers 1,4] [--time-budget 8m]
                                       [--epochs N] [--workdir DIR] [--run-options "--code-categories 10"]

Prints one row per run (wall time end to end, generator steps, domain FD, precision, recall, label accuracy for
conditional models, code purity for InfoGAN-coded ones), the machine, and the command to reproduce. The domain
classifier is trained by the first run and shared by the others (GAN_PIPELINE_CLASSIFIER_CACHE), as it is for
repeated runs in one runs dir; the first row's wall time includes its training. With ``--epochs N`` every run trains
the same epochs instead of a time budget: the distributed-quality check (``--workers 4`` within 10% of
``--workers 1`` on domain FD). The tables of levers kept and tried (docs/quality.md) are printed after the results.
``--run-options`` passes more options to every `gan-pipeline run` (a lever against the defaults: run the benchmark
twice, with and without).
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

# Issue 16's targets: (metric, bound), lower is better for domain_fd, higher for the others.
TARGETS = {"wgan": {"domain_fd": 5.0, "precision": 0.7, "recall": 0.7},
           "dcgan": {"domain_fd": 5.0, "precision": 0.7, "recall": 0.7},
           "wgan-gp": {"domain_fd": 5.0, "precision": 0.7, "recall": 0.7},
           "cgan": {"domain_fd": 2.0, "recall": 0.75, "label_accuracy": 0.97}}


def run_one(preset: str, workers: int, workdir: Path, budget: str | None, epochs: int | None = None,
            run_options: str = "") -> dict:
    where = workdir / (f"{preset}-w{workers}" + (f"-e{epochs}" if epochs else "")
                       + ("-" + "".join(c for c in run_options if c.isalnum()) if run_options else ""))
    where.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("gan-pipeline")), "run", "--model", preset, "--workers", str(workers),
           "--runs-dir", str(where / "gan-runs"), "--tracking-uri", f"sqlite:///{where / 'mlflow.db'}"]
    if budget:
        cmd += ["--time-budget", budget]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    cmd += shlex.split(run_options)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=where, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (where / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"preset": preset, "workers": workers, "wall_s": wall, "error": (proc.stderr or proc.stdout)[-300:]}
    state = json.loads(next((where / "gan-runs" / "pipelines").glob("*/state.json")).read_text())
    stages = state["stages"]
    metrics, steps = stages["evaluate"]["outputs"]["metrics"], stages["train"]["outputs"]["steps"]
    return {"preset": preset, "workers": workers, "wall_s": wall, "steps": steps, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="wgan,dcgan,wgan-gp,cgan")
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--time-budget", default=None, help="default: the pipeline's own default budget")
    parser.add_argument("--epochs", type=int, default=None, help="equal epochs instead of the time budget")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--run-options", default="", help='more options for every run, e.g. "--code-categories 10"')
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quality-"))
    os.environ.setdefault("GAN_PIPELINE_CLASSIFIER_CACHE", str(workdir / "classifiers"))
    print(f"machine: {machine_info()}\nworkdir: {workdir}", flush=True)
    rows = []
    for preset in args.presets.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            row = run_one(preset, workers, workdir, args.time_budget, args.epochs, args.run_options)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k in ("preset", "workers", "wall_s", "steps", "domain_fd", "precision", "recall",
                                       "label_accuracy", "code_purity", "error")}), flush=True)
    print("\n| preset | workers | wall (end to end) | steps | domain FD | precision | recall "
          "| label acc (code purity) | targets |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['workers']} | {r['wall_s']:.0f} s | failed: {r['error'][:80]} | | | | | |")
            continue
        met = all((r[k] <= v) if k == "domain_fd" else (r.get(k, 0.0) >= v) for k, v in TARGETS[r["preset"]].items())
        label = (f"{r['label_accuracy']:.3f}" if "label_accuracy" in r
                 else f"({r['code_purity']:.2f})" if "code_purity" in r else "-")
        print(f"| {r['preset']} | {r['workers']} | {r['wall_s'] // 60:.0f} min {r['wall_s'] % 60:.0f} s | {r['steps']} | "
              f"{r['domain_fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {label} | {'met' if met else 'missed'} |")
    by_key = {(r["preset"], r["workers"]): r for r in rows if "error" not in r}
    for preset in args.presets.split(","):
        one, many = by_key.get((preset, 1)), [r for (p, w), r in by_key.items() if p == preset and w > 1]
        for r in many if one else []:
            print(f"{preset}: domain FD with {r['workers']} workers / 1 worker = {r['domain_fd'] / one['domain_fd']:.2f}"
                  f" (target <= 1.10{', equal epochs' if args.epochs else ', equal wall time'})")
    # the levers kept (each with the measurement behind it), then the lab's table of levers tried
    doc = (ROOT / "docs" / "quality.md").read_text()
    for heading, title in (("## What a run does by default now", "Levers kept"), ("## Levers tried", "Levers tried")):
        parts = doc.split(heading, 1)
        if len(parts) == 2:
            print(f"\n{title} (docs/quality.md)" + parts[1].split("\n## ", 1)[0].rstrip())
    print(f"\nreproduce: python benchmarks/bench_quality.py --presets {args.presets} --workers {args.workers}"
          + (f" --time-budget {args.time_budget}" if args.time_budget else "")
          + (f" --epochs {args.epochs}" if args.epochs else "")
          + (f" --run-options {shlex.quote(args.run_options)}" if args.run_options else ""))


if __name__ == "__main__":
    main()
