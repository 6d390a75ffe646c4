"""Training throughput: the pipeline (Ray Train, 1 and 2 workers) against a plain single-process PyTorch loop
of the same model and batch size on the same cores, side by side in one run.

Steady state: the pipeline's images/s comes from its own per-window measurement (MLflow ``images_per_second``),
first window dropped; startup (Ray, workers, torch import, DDP setup) is reported separately.
Target (issue 4): ratio >= 0.9 for 1 and for 2 workers.

    python benchmarks/bench_train.py [--steps 120] [--resolution 32] [--ngf 32] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan_models import GANSpec, build_gan, train_step  # noqa: E402
from gan_models.performance import apply_options  # noqa: E402
from pipelines.config import DataConfig, TrainConfig  # noqa: E402
from pipelines.data.reader import TrainReader  # noqa: E402
from pipelines.loop import BatchStream  # noqa: E402
from pipelines.prepare import prepare_dataset  # noqa: E402


def plain_loop(data_path: str, args, threads: int) -> float:
    """The pytorch/examples-style loop: one process, the same networks, step and batch size."""
    torch.set_num_threads(threads)
    spec = GANSpec(resolution=args.resolution, channels=1, ngf=args.ngf, ndf=args.ngf, nz=100)
    gan = apply_options(build_gan(spec, seed=0), channels_last=TrainConfig().channels_last)  # as the loop does
    stream = BatchStream(TrainReader(data_path, 0, 1, args.batch_size, seed=0), torch.device("cpu"))
    for _ in range(10):
        train_step(gan, stream)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(gan, stream)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def pipeline(data_path: str, args, workers: int, tmp: Path) -> tuple[float, float]:
    """`gan-pipeline train` as a user runs it; returns (steady images/s, wall seconds)."""
    db = tmp / f"mlflow-{workers}.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    steps = args.steps * 2 // workers + 20  # same work per worker-step budget, plus a warm-up window
    cmd = [str(Path(sys.executable).parent / "gan-pipeline"), "train", "--model", "dcgan", "--data", data_path,
           "--workers", str(workers), "--max-steps", str(steps), "--no-score-checkpoints",
           # --batch-size is the global batch: args.batch_size per worker
           "--batch-size", str(args.batch_size * workers),
           "--ngf", str(args.ngf), "--ndf", str(args.ngf), "--log-every", "10", "--checkpoint-every", str(steps),
           "--sample-every", str(steps), "--precision", "fp32", "--runs-dir", str(tmp / f"runs-{workers}"), "--run-name", f"bench-{workers}"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])[0]
    history = sorted(client.get_metric_history(run.info.run_id, "images_per_second"), key=lambda m: m.step)
    steady = [m.value for m in history[2:-1]] or [m.value for m in history]
    return sum(steady) / len(steady), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = prepare_dataset(DataConfig(dataset="mnist", resolution=args.resolution),
                               out=str(tmp / "mnist")).path
        cores = os.cpu_count() or 1
        plain = plain_loop(data, args, threads=cores)
        rows = []
        for workers in (1, 2):
            rate, wall = pipeline(data, args, workers, tmp)
            rows.append((workers, rate, wall))
    print(f"machine: {cores} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print(f"model: DCGAN {args.resolution}px, ngf=ndf={args.ngf}, batch {args.batch_size} per worker")
    print(f"plain single-process loop ({cores} threads): {plain:8.1f} images/s")
    for workers, rate, wall in rows:
        print(f"pipeline, {workers} worker(s):               {rate:8.1f} images/s   ratio {rate / plain:5.2f} "
              f"(target >= 0.90)   wall {wall:.0f}s incl. startup")
    print("reproduce: python benchmarks/bench_train.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
