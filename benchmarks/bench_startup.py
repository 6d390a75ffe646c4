"""Start-up and Ray tax of `gan-pipeline train`, side by side with the bare training step (issue 18).

1. Time to the first step: `gan-pipeline train --workers 1 --max-steps 1 --log-every 1` with stdout piped; the
   seconds from the command's start to its `[gan-pipeline] step 1/1` line (the driver polls the progress board
   every second, so this is at most 1 s late), and to the command's end.
2. Ray tax: images/s of the bare loop (pipelines.loop.build_training_gan + BatchStream + gan_models.train_step,
   this process, as many torch threads as the one Ray worker gets) against `gan-pipeline train --workers 1` at the
   same config (model, batch, precision, threads); the pipeline's steady images/s is the median of its MLflow
   `images_per_second` windows (first and last dropped); the bare loop runs right before and right after it (their
   mean is the reference). Ratio = pipeline / bare (target >= 0.97).
3. The same tax as CPU time: over 20 s of that run, the share of the machine's CPU time used by everything but the
   training worker (driver, Ray's processes and actors; on a quiet machine nothing else).

The machine may be shared: the load average is printed before and after; rerun on a quiet machine for figures.

    python benchmarks/bench_startup.py                       # cgan (the quick start's model), 28 px, batch 64
    python benchmarks/bench_startup.py --model dcgan --steps 600 --starts 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXE = str(Path(sys.executable).parent / "gan-pipeline")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_cmd(args, tmp: Path, name: str, data: str, *extra: str) -> list[str]:
    return [EXE, "train", "--model", args.model, "--data", data, "--workers", "1", "--no-score-checkpoints",
            "--runs-dir", str(tmp / f"runs-{name}"), "--run-name", name, *extra]


def time_to_first_step(args, tmp: Path, data: str, attempt: int) -> tuple[float, float, str]:
    name = f"start-{attempt}"
    cmd = train_cmd(args, tmp, name, data, "--max-steps", "1", "--log-every", "1", "--checkpoint-every", "1")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow-{name}.db", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("[gan-pipeline] step 1/1"):
            first = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode or first is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(lines)[-3000:]}")
    return first, total, " ".join(cmd)


def bare_rate(cfg, data: str, steps: int, threads: int) -> float:
    import torch

    from gan_models import train_step
    from pipelines.data.reader import TrainReader, load_manifest
    from pipelines.loop import BatchStream, build_training_gan

    torch.set_num_threads(threads)
    gan = build_training_gan(cfg, load_manifest(data))
    stream = BatchStream(TrainReader(data, 0, 1, cfg.train.batch_size, seed=0), torch.device("cpu"))
    for step in range(10):  # warm-up: allocations, autocast caches
        train_step(gan, stream, step)
    t0 = time.perf_counter()
    for step in range(steps):
        stats = train_step(gan, stream, step)
        if step % cfg.train.log_every == 0:
            stats["d_loss"].item()  # the loop reads numbers at log steps only
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def _cpu_ticks_by_process() -> dict[str, int]:
    """CPU ticks (user + system) of every process on the machine, by ``pid name``. (Ray starts its services and
    workers detached from the driver, so the driver's process tree does not hold them: the machine is the
    scope, and the benchmark asks for a quiet one.)"""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs[f"{stat.parent.name} {(cmdline.split() or ['?'])[0].rsplit('/', 1)[-1][:40]}"] = \
            int(fields[11]) + int(fields[12])
    return procs


def ray_cpu_share(stop: threading.Event, out: dict, window: float = 20.0) -> None:
    """While the run trains: of the CPU time the machine used over ``window`` seconds, the share of everything
    but the training worker (Ray's processes, the driver, whatever else runs). Load-independent, unlike images/s,
    as long as nothing else runs."""
    while not stop.is_set() and not any("RayTrainWorker" in k for k in _cpu_ticks_by_process()):
        time.sleep(1)
    time.sleep(5)  # past the first steps
    first = _cpu_ticks_by_process()
    if stop.wait(window):
        return
    last = _cpu_ticks_by_process()
    used = {k: last[k] - first[k] for k in last if k in first and k.split()[0] != str(os.getpid())}
    worker = sum(v for k, v in used.items() if "RayTrainWorker" in k)
    out.update(share=(sum(used.values()) - worker) / max(sum(used.values()), 1), worker=worker,
               top=sorted(((v, k) for k, v in used.items() if "RayTrainWorker" not in k), reverse=True)[:6])


def pipeline_rate(args, tmp: Path, data: str, log_every: int) -> tuple[float, float, float, str, dict]:
    name = "tax"
    uri = f"sqlite:///{tmp}/mlflow-{name}.db"
    cmd = train_cmd(args, tmp, name, data, "--max-steps", str(args.steps), "--log-every", str(log_every),
                    "--checkpoint-every", str(args.steps), "--sample-every", str(args.steps))
    from benchmarks.bench_speed import steady_throughput

    stop, share = threading.Event(), {}
    sampler = threading.Thread(target=ray_cpu_share, args=(stop, share), daemon=True)
    sampler.start()
    med, lo, hi, _ = steady_throughput(cmd, uri)
    stop.set()
    sampler.join(timeout=30)
    return med, lo, hi, " ".join(cmd), share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cgan")
    parser.add_argument("--steps", type=int, default=400, help="generator steps of the Ray-tax run")
    parser.add_argument("--starts", type=int, default=2, help="start-up measurements (the median is reported)")
    args = parser.parse_args()

    from gan_models.performance import machine_info
    from pipelines.config import build_config
    from pipelines.prepare import prepare_dataset

    print(f"machine: {machine_info()}; load average before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as name:
        tmp = Path(name)
        cfg = build_config(args.model)
        data = prepare_dataset(cfg.data, out=str(tmp / "data")).path
        log_every = max(args.steps // 12, 1)
        cfg = build_config(args.model, overrides={"train": {"log_every": log_every}})

        starts = [time_to_first_step(args, tmp, data, i) for i in range(args.starts)]
        for first, total, _ in starts:
            print(f"  start-up: first step's line after {first:.1f} s, command done after {total:.1f} s", flush=True)
        threads = os.cpu_count() or 1  # what the one worker of a local run gets (cores // workers)
        before = bare_rate(cfg, data, args.steps // 2, threads)
        piped, lo, hi, cmd, share = pipeline_rate(args, tmp, data, log_every)
        after = bare_rate(cfg, data, args.steps // 2, threads)
        bare = (before + after) / 2

    first = statistics.median(s[0] for s in starts)
    print(f"\n{args.model}, batch {cfg.train.batch_size}, {cfg.resolved_precision()}, {threads} threads; "
          f"load average after: {load()}")
    print(f"time to the first step   {first:6.1f} s (median of {len(starts)}; target <= 10 s)\n"
          f"    $ {starts[0][2]}")
    print(f"bare step                {bare:8.0f} img/s ({before:.0f} before, {after:.0f} after)")
    print(f"through Ray (1 worker)   {piped:8.0f} img/s (median window; {lo:.0f}..{hi:.0f})\n    $ {cmd}")
    print(f"ratio through Ray / bare {piped / bare:8.2f} (target >= 0.97)")
    if share:
        print(f"CPU time of the run's process tree over 20 s of training: everything but the training worker "
              f"{100 * share['share']:.1f}% (worker {share['worker']} ticks); largest: "
              + ", ".join(f"{k.split(' ', 1)[1]} {v}" for v, k in share["top"]))


if __name__ == "__main__":
    main()
