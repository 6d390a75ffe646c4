"""GPU speed check (run by benchmarks/gpu_check.sh).

Benchmarks 1-2 of the issue on one CUDA device, side by side in one process, variants interleaved per round:
the plain pytorch/examples-style loop (benchmarks/bench_speed.py) in fp32/bf16 against the pipeline's step in fp32,
bf16, fp16 (GradScaler), channels_last and torch.compile. Uint8 batches live on the GPU (speed only; the
data path is covered by the train --gpu run of gpu_check.sh). Prints images/s, ratio vs plain fp32, spread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import _dcgan_init, plain_discriminator, plain_generator  # noqa: E402
from gan_models import GANSpec, build_gan, train_step  # noqa: E402
from gan_models.performance import apply_options, machine_info  # noqa: E402

DEV = torch.device("cuda")


def real_batches(data_u8: torch.Tensor, batch: int):
    pos = 0
    while True:
        if pos + batch > len(data_u8):
            pos = 0
        yield data_u8[pos:pos + batch].float().div_(127.5).sub_(1.0), torch.zeros(batch, dtype=torch.long, device=DEV)
        pos += batch


class Plain:
    def __init__(self, data, args, dtype):
        torch.manual_seed(0)
        self.g = plain_generator(100, args.ngf, 1, args.resolution).to(DEV)
        self.d = plain_discriminator(args.ngf, 1, args.resolution).to(DEV)
        self.g.apply(_dcgan_init), self.d.apply(_dcgan_init)
        self.og = torch.optim.Adam(self.g.parameters(), 2e-4, betas=(0.5, 0.999))
        self.od = torch.optim.Adam(self.d.parameters(), 2e-4, betas=(0.5, 0.999))
        self.bce, self.it, self.dtype = nn.BCELoss(), real_batches(data, args.batch_size), dtype

    def step(self):
        real, _ = next(self.it)
        b = real.shape[0]
        ones, zeros = torch.ones(b, device=DEV), torch.zeros(b, device=DEV)
        ac = torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None)
        self.d.zero_grad()
        with ac:
            out_r = self.d(real).view(-1)
            fake = self.g(torch.randn(b, 100, 1, 1, device=DEV))
            out_f = self.d(fake.detach()).view(-1)
        (self.bce(out_r.float(), ones) + self.bce(out_f.float(), zeros)).backward()
        self.od.step()
        self.g.zero_grad()
        with ac:
            out = self.d(fake).view(-1)
        self.bce(out.float(), ones).backward()
        self.og.step()


class Pipe:
    def __init__(self, data, args, precision, channels_last, compile):
        spec = GANSpec(resolution=args.resolution, channels=1, ngf=args.ngf, ndf=args.ngf, precision=precision)
        self.gan = apply_options(build_gan(spec, device=DEV, seed=0), channels_last=channels_last, compile=compile)
        self.it = real_batches(data, args.batch_size)

    def step(self):
        train_step(self.gan, self.it)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True  # as pipelines/loop.py sets it on GPU workers
    print("machine:", machine_info())
    print("reproduce: bash benchmarks/gpu_check.sh   (or python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]) + ")")
    data = torch.randint(0, 256, (4096, 1, args.resolution, args.resolution), dtype=torch.uint8, device=DEV)
    makers = {
        "plain-fp32": lambda: Plain(data, args, None),
        "plain-bf16": lambda: Plain(data, args, torch.bfloat16),
        "pipe-fp32": lambda: Pipe(data, args, "fp32", False, False),
        "pipe-bf16": lambda: Pipe(data, args, "bf16", False, False),
        "pipe-fp16": lambda: Pipe(data, args, "fp16", False, False),
        "pipe-fp32-cl": lambda: Pipe(data, args, "fp32", True, False),
        "pipe-bf16-cl": lambda: Pipe(data, args, "bf16", True, False),
        "pipe-fp32-compile": lambda: Pipe(data, args, "fp32", False, True),
        "pipe-bf16-cl-compile": lambda: Pipe(data, args, "bf16", True, True),
    }
    if args.variants:
        makers = {n: makers[n] for n in args.variants.split(",")}
    sides = {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        try:
            sides[name] = make()
            for _ in range(5):
                sides[name].step()
            torch.cuda.synchronize()
        except Exception as exc:  # one failing variant (e.g. compile without a toolchain) must not end the check
            print(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            sides.pop(name, None)
            continue
        print(f"  built + warmed {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    rates = {n: [] for n in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                side.step()
            torch.cuda.synchronize()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    base = statistics.median(rates["plain-fp32"]) if "plain-fp32" in rates else None
    print(f"\nGPU: DCGAN {args.resolution}px batch {args.batch_size} ngf=ndf={args.ngf}, "
          f"{args.rounds} rounds x {args.steps} steps")
    for name, r in rates.items():
        med = statistics.median(r)
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"  {name:22s} {med:9.0f} img/s  (min {min(r):.0f}, max {max(r):.0f})  ratio vs plain-fp32 {ratio}")


if __name__ == "__main__":
    main()
