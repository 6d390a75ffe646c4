"""Domain-space metrics for 10k generated vs 10k real images (MNIST, read from the IDX files).

Target: the metric set under 60 s on a 2-core machine, classifier training excluded (timed separately).
"Generated" images are 10k MNIST train images (a stand-in generator); "real" are the 10k test images.

    python benchmarks/bench_metrics.py [--mnist DIR] [--threads N] [--train-images 20000] [--epochs 1]
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.config import EvalConfig
from pipelines.metrics import compute_metrics, train_domain_classifier

TARGET_S = 60.0


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--train-images", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num", type=int, default=10_000, help="generated and real images each")
    args = ap.parse_args()
    mnist = Path(args.mnist)
    if not (mnist / "train-images-idx3-ubyte.gz").is_file():
        import pipelines.data

        mnist = Path(pipelines.data.__file__).resolve().parent / "mnist"  # the bundled copy
    if args.threads:
        torch.set_num_threads(args.threads)

    xtr = read_idx(mnist / "train-images-idx3-ubyte.gz")[:, None]
    ytr = read_idx(mnist / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = read_idx(mnist / "t10k-images-idx3-ubyte.gz")[:, None]
    yte = read_idx(mnist / "t10k-labels-idx1-ubyte.gz").astype(np.int64)

    t0, c0 = time.perf_counter(), time.process_time()
    clf = train_domain_classifier(xtr, ytr, xte, yte, num_classes=10, epochs=args.epochs, seed=0,
                                  max_train=args.train_images)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    cfg = EvalConfig(num_samples=args.num, inception=False)
    timings: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    out = compute_metrics(xtr[-args.num:], None, xte[:args.num], yte[:args.num], clf, cfg, conditional=False,
                          num_classes=10, timings=timings)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"classifier training (excluded): {args.train_images} images x {args.epochs} epoch(s): "
          f"{train_wall:.1f} s wall, {train_cpu:.1f} s CPU, held-out accuracy {clf.heldout_accuracy:.4f}")
    print(f"{args.num} generated vs {args.num} real, seconds (wall):")
    prep = {k: v for k, v in timings.items() if k.startswith("prep/")}
    print(f"  {'features + logits (both sides)':34s} {prep.get('prep/domain', 0.0):7.2f}")
    for key, sec in timings.items():
        if key.startswith("metric/"):
            # metric times include the first use of shared features; subtract them for the metric's own cost
            own = sec - (prep.get("prep/domain", 0.0) if key == "metric/domain_fd" else 0.0)
            print(f"  {key[7:]:34s} {own:7.2f}")
    print(f"  {'total':34s} {total:7.2f}   (CPU {total_cpu:.1f} s)")
    print(f"target {TARGET_S:.0f} s / measured {total:.1f} s = {TARGET_S / total:.2f}x "
          f"({'meets' if total <= TARGET_S else 'MISSES'} the target)")
    print("values: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
