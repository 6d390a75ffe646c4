"""Quality at equal wall time: the default cgan on MNIST trained for the same minutes in fp32 and in bf16, each
scored by the pipeline's own evaluate stage (domain FD, precision, recall, label accuracy, ...).

The train stage takes a step budget, not a time budget, so the budget is turned into steps per precision by a
short calibration of the pipeline's step in this process (both precisions interleaved); the training time each
run actually took (from its MLflow ``images_per_second`` windows) is printed next to its scores.
The issue asks 10 minutes per run (the default).

    python benchmarks/bench_precision_quality.py [--minutes 10] [--precisions fp32,bf16] [--num-samples 10000] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan_models import train_step  # noqa: E402
from gan_models.performance import machine_info  # noqa: E402

SCORES = ["domain_fd", "precision", "recall", "label_accuracy", "kid", "density", "coverage"]


def calibrate(cfg, data_path: str, precisions: list[str], steps: int, rounds: int = 2) -> dict[str, float]:
    """Generator steps per second of the pipeline's step for each precision, interleaved."""
    from pipelines.data.reader import TrainReader, load_manifest
    from pipelines.loop import BatchStream, build_training_gan

    manifest = load_manifest(data_path)
    sides = {}
    for p in precisions:
        gan = build_training_gan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": p})}),
                                 manifest)
        stream = BatchStream(TrainReader(data_path, 0, 1, cfg.train.batch_size, seed=0), torch.device("cpu"))
        for _ in range(3):
            train_step(gan, stream)
        sides[p] = (gan, stream)
    rates: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(rounds):
        for p, (gan, stream) in sides.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(gan, stream)["d_loss"].item()
            rates[p].append(steps / (time.perf_counter() - t0))
    return {p: statistics.median(r) for p, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="cgan")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--num-samples", type=int, default=10000, help="evaluate's samples per side")
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="training seed for both runs (default: the config's)")
    parser.add_argument("--workdir", default=None, help="runs dir (keeps the domain classifier cached)")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from pipelines.config import build_config
    from pipelines.prepare import prepare_dataset

    print("machine:", machine_info())
    print("reproduce: python benchmarks/bench_precision_quality.py " + " ".join(sys.argv[1:]), flush=True)
    work = Path(args.workdir or f"/tmp/gan-bench-quality-{os.getpid()}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    precisions = args.precisions.split(",")
    cfg = build_config(args.model)
    data = prepare_dataset(cfg.data, out=str(work / "data")).path
    torch.set_num_threads(os.cpu_count() or 1)
    rates = calibrate(cfg, data, precisions, args.calibration_steps)
    exe = str(Path(sys.executable).parent / "gan-pipeline")
    client = MlflowClient(uri)
    results = {}
    for p in precisions:
        steps = max(10, int(args.minutes * 60 * rates[p]))
        name = f"quality-{p}-{int(time.time())}"
        cmd = [exe, "train", "--model", args.model, "--data", data, "--precision", p, "--max-steps", str(steps),
               "--checkpoint-every", str(steps), "--sample-every", str(steps), "--log-every", "20",
               "--runs-dir", str(work / "runs"), "--run-name", name]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        print(f"[{p}] calibrated {rates[p]:.2f} steps/s -> {steps} steps for {args.minutes} min\n  $ {' '.join(cmd)}",
              flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        run = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")[0]
        hist = client.get_metric_history(run.info.run_id, "images_per_second")
        train_s = steps * cfg.train.batch_size / statistics.mean(m.value for m in hist) if hist else float("nan")
        ecmd = [exe, "evaluate", "--run-id", run.info.run_id, "--num-samples", str(args.num_samples),
                "--runs-dir", str(work / "runs")]
        print(f"  $ {' '.join(ecmd)}", flush=True)
        subprocess.run(ecmd, env=env, check=True, stdout=subprocess.DEVNULL)
        metrics = client.get_run(run.info.run_id).data.metrics
        results[p] = (steps, train_s, wall, {k: metrics.get(k) for k in SCORES if k in metrics})
    print(f"\nQuality at equal wall time: {args.model} on MNIST, {args.minutes} min of training per precision "
          f"(channels_last {cfg.train.channels_last}), evaluate --num-samples {args.num_samples}")
    keys = [k for k in SCORES if any(k in r[3] for r in results.values())]
    print(f"{'precision':10s} {'steps':>6s} {'train s':>8s} {'wall s':>7s} " + " ".join(f"{k:>15s}" for k in keys))
    for p, (steps, train_s, wall, m) in results.items():
        print(f"{p:10s} {steps:6d} {train_s:8.0f} {wall:7.0f} "
              + " ".join(f"{m[k]:15.4f}" if m.get(k) is not None else f"{'-':>15s}" for k in keys))
    print("(domain_fd: lower is better; precision, recall, label_accuracy: higher is better)")


if __name__ == "__main__":
    main()
