"""Concurrent sweep trials on one machine: torch threads per trial worker, side by side.

A local `gan-pipeline tune` runs `--max-concurrent` trials at once on this machine's cores. Each trial's worker
used to take the single-run default, all the cores (``cores // workers``); with two trials that is twice the
threads the machine has. This runs N copies of the bare training step at once (``pipelines.loop``'s
``build_training_gan`` + ``BatchStream`` + ``gan_models.train_step``, one process per trial), first with the
cores each, then with the share ``pipelines.tune.trial_threads`` now gives them (cores // N), twice in
alternation, and prints the summed images/s of each and their ratio.

    python benchmarks/bench_trial_threads.py [--model wgan] [--trials 2] [--steps 150]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys
sys.path.insert(0, {root!r})
from benchmarks.bench_startup import bare_rate
from pipelines.config import build_config
print(bare_rate(build_config({model!r}), {data!r}, {steps}, {threads}))
"""


def together(model: str, data: str, trials: int, threads: int, steps: int) -> float:
    """Summed images/s of ``trials`` bare loops running at once with ``threads`` torch threads each."""
    code = CHILD.format(root=str(ROOT), model=model, data=data, steps=steps, threads=threads)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(trials)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wgan")
    parser.add_argument("--trials", type=int, default=2, help="concurrent trials (--max-concurrent)")
    parser.add_argument("--steps", type=int, default=150, help="generator steps per loop")
    args = parser.parse_args()

    from gan_models.performance import machine_info
    from pipelines.config import build_config
    from pipelines.prepare import prepare_dataset

    cores = os.cpu_count() or 1
    share = max(1, cores // args.trials)
    print(f"machine: {machine_info()}; {args.trials} concurrent trials of {args.model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-trial-threads-") as tmp:
        data = prepare_dataset(build_config(args.model).data, out=str(Path(tmp) / "data")).path
        runs: dict[int, list[float]] = {cores: [], share: []}
        for _ in range(2):
            for threads in (cores, share):
                runs[threads].append(together(args.model, data, args.trials, threads, args.steps))
                print(f"  {args.trials} x {threads} thread(s): {runs[threads][-1]:.0f} img/s in all", flush=True)
    old, new = statistics.mean(runs[cores]), statistics.mean(runs[share])
    print(f"\n{args.trials} trials x {cores} threads (all cores each)  {old:8.0f} img/s in all")
    print(f"{args.trials} trials x {share} thread(s) (trial_threads) {new:8.0f} img/s in all")
    print(f"ratio                                {new / old:8.2f}")
    print(f"reproduce: python benchmarks/bench_trial_threads.py --model {args.model} --trials {args.trials} "
          f"--steps {args.steps}")


if __name__ == "__main__":
    main()
