"""More data-parallel workers than cores: what `--workers 4` on a 2-core laptop costs, without Ray around it.

Runs the pipeline's training step (``build_training_gan`` + ``gan_models.train_step``, DDP over gloo, the preset's
global batch split evenly, ``pipelines.loop``'s DDP options and threads per process) in
1, 2 and 4 processes on this machine, side by side in one run (the counts in turn, ``--rounds`` times: a shared
machine's speed drifts), and prints each count's median generator steps per second and its ratio to 1 process; then the latency of one gloo all-reduce of the critic's gradients at each count. A
WGAN step all-reduces 6 times (5 critic updates, 1 generator update), so on an oversubscribed machine the latency,
not the arithmetic, sets the pace.

    python benchmarks/bench_workers_per_core.py [--model wgan] [--workers 1,2,4] [--steps 80] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(rank: int, world: int, model: str, steps: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gan_models import train_step
    from pipelines.config import build_config
    from pipelines.job import cores_per_process
    from pipelines.loop import build_training_gan, ddp_options

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(cores_per_process(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = build_config(model, overrides={"train": {"workers": world}})
    gan = build_training_gan(cfg, {"resolution": 28, "channels": 1, "class_names": [str(i) for i in range(10)]})
    if world > 1:  # as pipelines.loop.wrap_ddp, without Ray Train's prepare_model around it
        gan.generator = DistributedDataParallel(gan.generator, **ddp_options())
        gan.discriminator = DistributedDataParallel(gan.discriminator, **ddp_options())
    batch = cfg.train.batch_per_worker()
    noise = torch.Generator().manual_seed(rank)
    pool = [(torch.rand(batch, 1, 28, 28, generator=noise) * 2 - 1, torch.randint(0, 10, (batch,), generator=noise))
            for _ in range(8)]
    batches = (pool[i % len(pool)] for i in range(10**9))
    for step in range(5):
        train_step(gan, batches, step)
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        train_step(gan, batches, 5 + step)
    dist.barrier()
    rate = steps / (time.perf_counter() - start)
    grads = torch.zeros(sum(p.numel() for p in gan.discriminator.parameters()))
    for _ in range(10):
        dist.all_reduce(grads)
    start = time.perf_counter()
    for _ in range(100):
        dist.all_reduce(grads)
    latency = (time.perf_counter() - start) / 100
    if rank == 0:
        results.put((rate, latency))
    dist.destroy_process_group()


def measure(model: str, world: int, steps: int, port: int) -> tuple[float, float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(rank, world, model, steps, port, results)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a worker of the {world}-process run failed")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wgan")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import statistics

    from gan_models.performance import machine_info
    from pipelines.job import cores_per_process

    counts = [int(w) for w in args.workers.split(",")]
    print("machine:", machine_info())
    runs: dict[int, list[tuple[float, float]]] = {world: [] for world in counts}
    for _ in range(args.rounds):
        for world in counts:
            runs[world].append(measure(args.model, world, args.steps, 29500 + world))
    base = statistics.median(rate for rate, _ in runs[counts[0]])
    print(f"\n| workers | threads each | generator steps/s (median; min..max) | ratio to {counts[0]} | "
          f"one all-reduce of D's gradients |")
    print("| --- | --- | --- | --- | --- |")
    for world, measured in runs.items():
        rates = [rate for rate, _ in measured]
        print(f"| {world} | {cores_per_process(world)} | {statistics.median(rates):.2f} ({min(rates):.2f}..{max(rates):.2f}) | "
              f"{statistics.median(rates) / base:.2f} | {statistics.median(l for _, l in measured) * 1e3:.1f} ms |")
    print(f"\nreproduce: python benchmarks/bench_workers_per_core.py --model {args.model} --workers {args.workers} "
          f"--steps {args.steps} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
