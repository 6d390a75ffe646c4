"""Where a training step's time goes: the input path and the pipeline's own Python, against the whole step.

Runs the pipeline's step (the default config of a model, as ``gan-pipeline train`` builds it: same spec, same
speed options, same BatchStream over prepared Parquet) under cProfile and prints
  - input path share: time in ``next(batches)`` (Parquet-backed reader, uint8 -> float) / step time
  - pipeline Python share: self time of functions defined in gan_models/ and pipelines/ / step time
  - the top functions by self time (torch's C++ kernels appear as the built-in methods that call them)
Both shares are measured in one run, so the machine's load falls on numerator and denominator alike.

    python benchmarks/profile_step.py [--model cgan] [--steps 300] [--precision fp32]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan_models import train_step  # noqa: E402
from gan_models.performance import machine_info  # noqa: E402


class TimedStream:
    def __init__(self, stream):
        self.stream, self.seconds = stream, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = next(self.stream)
        self.seconds += time.perf_counter() - t0
        return item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cgan")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precision", default=None, help="default: the model's configured precision")
    args = parser.parse_args()
    from pipelines.config import build_config
    from pipelines.data.reader import TrainReader, load_manifest
    from pipelines.loop import BatchStream, build_training_gan
    from pipelines.prepare import prepare_dataset

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = build_config(args.model, overrides={"train": {"precision": args.precision}} if args.precision else None)
    print("machine:", machine_info())
    print("reproduce: python benchmarks/profile_step.py " + " ".join(sys.argv[1:]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_dataset(cfg.data, out=str(Path(tmp) / "data")).path
        manifest = load_manifest(data)
        gan = build_training_gan(cfg, manifest)
        spec = gan.spec
        stream = TimedStream(BatchStream(TrainReader(data, 0, 1, cfg.train.batch_size, seed=0), torch.device("cpu")))
        for _ in range(10):
            train_step(gan, stream)
        stream.seconds = 0.0
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(args.steps):
            train_step(gan, stream)
        profiler.disable()
        wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    ours = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.stats.items()
               if f"{os.sep}gan_models{os.sep}" in file or f"{os.sep}pipelines{os.sep}" in file)
    print(f"\n{args.model} ({spec.resolution}px, batch {cfg.train.batch_size}, {spec.precision}, channels_last "
          f"{cfg.train.channels_last}): {args.steps} steps in {wall:.1f}s under cProfile "
          f"({args.steps * cfg.train.batch_size * spec.n_critic / wall:.0f} real img/s)")
    print(f"  input path (next(batches)):      {stream.seconds / wall:6.1%} of step time")
    print(f"  pipeline's own Python (self time): {ours / wall:6.1%} of step time")
    print("  top self time:")
    stats.sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
