"""Data path benchmark: prepare MNIST (70k) end to end, read one epoch through TrainReader, and compare the
reader's rate with what a DCGAN training step consumes (the reader must be >= 10x faster).

    python benchmarks/bench_data.py [--batch 64] [--steps 20] [--threads N] [--out DIR]

The DCGAN is a small inline one (28 px, ngf = ndf = 32 by default as in the design notes' reference figure, Adam, non-saturating BCE, batch norm), so the benchmark
does not depend on gan_models' current state.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import torch
from torch import nn


def dcgan(nz: int = 100, ngf: int = 64, ndf: int = 64, channels: int = 1) -> tuple[nn.Module, nn.Module]:
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 7, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),      # 7
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 14
        nn.ConvTranspose2d(ngf * 2, channels, 4, 2, 1, bias=False), nn.Tanh(),                              # 28
    )
    d = nn.Sequential(
        nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),                             # 14
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),     # 7
        nn.Conv2d(ndf * 2, 1, 7, 1, 0, bias=False), nn.Flatten(),
    )
    return g, d


def dcgan_images_per_s(batches, steps: int, nz: int = 100, ngf: int = 64) -> float:
    g, d = dcgan(nz, ngf, ngf)
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()

    def step(images_u8):
        real = images_u8.float().div_(127.5).sub_(1.0)
        b = real.shape[0]
        ones, zeros = torch.ones(b, 1), torch.zeros(b, 1)
        fake = g(torch.randn(b, nz, 1, 1))
        opt_d.zero_grad(set_to_none=True)
        (bce(d(real), ones) + bce(d(fake.detach()), zeros)).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        bce(d(fake), ones).backward()
        opt_g.step()

    it = iter(batches)
    for _ in range(3):  # warm-up
        step(next(it)[0])
    t = time.perf_counter()
    n = 0
    for _ in range(steps):
        x = next(it)[0]
        step(x)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed DCGAN steps")
    p.add_argument("--ngf", type=int, default=32, help="DCGAN width (ngf = ndf); 32 = the design notes' reference figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="where to prepare MNIST (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console

    from pipelines.config import DataConfig
    from pipelines.data.reader import TrainReader
    from pipelines.prepare import prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "mnist-28px-1ch")
        t = time.perf_counter()
        res = prepare_dataset(DataConfig(), out=out, force=True, console=Console(file=io.StringIO()))
        prep_s = time.perf_counter() - t
        n_all = res.manifest["counts"]["train"] + res.manifest["counts"]["heldout"]

        t = time.perf_counter()
        reader = TrainReader(out, rank=0, world_size=1, batch_size=args.batch, seed=0)
        load_s = time.perf_counter() - t
        list(reader.epoch(0))  # warm-up (first torch call)
        t = time.perf_counter()
        n_read = sum(x.shape[0] for x, _ in reader.epoch(1))
        read_rate = n_read / (time.perf_counter() - t)

        gan_rate = dcgan_images_per_s(reader.epoch(2), args.steps, ngf=args.ngf)

    ratio = read_rate / gan_rate
    print("== gan-pipeline data benchmark ==")
    print(f"machine   {os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f} (other processes slow the DCGAN figure)")
    print(f"prepare   MNIST {n_all:,} images in {prep_s:.2f} s = {n_all / prep_s:,.0f} images/s "
          f"(verify MD5, parse IDX, write {len(res.manifest['shards'])} zstd Parquet shards + manifest)")
    print(f"load      train split ({reader.num_examples:,} x {tuple(reader.images.shape[1:])} uint8) "
          f"into RAM in {load_s:.2f} s")
    print(f"reader    one epoch, batch {args.batch}: {read_rate:,.0f} images/s")
    print(f"dcgan     28 px, ngf=ndf={args.ngf}, batch {args.batch}, {args.steps} steps: {gan_rate:,.0f} images/s")
    print(f"ratio     reader / DCGAN step = {ratio:,.0f}x  ({'OK' if ratio >= 10 else 'TOO SLOW'}: need >= 10x)")
    print(f"reproduce python benchmarks/bench_data.py --batch {args.batch} --steps {args.steps} --ngf {args.ngf}"
          + (f" --threads {args.threads}" if args.threads else ""))
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
