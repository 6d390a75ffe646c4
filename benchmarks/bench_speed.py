"""Training speed of the pipeline's DCGAN against a plain PyTorch loop of the same networks, side by side.

Part A (benchmarks 1-2 of the issue), in ONE process, variants interleaved round by round so that the load of a
shared machine falls on every side alike:
  plain-fp32      a pytorch/examples-style DCGAN loop written inline below (BCE on a sigmoid D, Adam 2e-4/0.5)
  plain-bf16      the same under torch.autocast(bfloat16)          (the issue's "quick paired test")
  pipe-*          the pipeline's own step (gan_models.build_gan/train_step + pipelines.loop.BatchStream, the code
                  every Ray worker runs) in fp32 / bf16, with channels_last and/or torch.compile
Ratios are against plain-fp32 (targets: pipe-fp32 >= 1.0, pipe-bf16 >= 1.5); per-round ratios give the spread.

Part B (--workers2): benchmarks 1-3 through Ray Train, as users run them: `gan-pipeline train --workers 1|2`
(gloo; 2 threads per worker for 1 worker, 1 thread each for 2) in fp32 and bf16, against the plain fp32 loop with
every core, at 32 and 64 px; the pipeline's steady images/s is the median of its MLflow ``images_per_second``
windows (first and last dropped); the plain loop is measured before AND after each run (the mean is the reference).

    python benchmarks/bench_speed.py                       # part A, 64 px, batch 64, ngf=ndf=64
    python benchmarks/bench_speed.py --variants plain-fp32,pipe-fp32,pipe-bf16 --rounds 5
    python benchmarks/bench_speed.py --workers2 [--workers 1,2] [--precision fp32,bf16] [--resolutions 32,64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan_models import GANSpec, build_gan, train_step  # noqa: E402
from gan_models.performance import Prefetcher, apply_options, machine_info  # noqa: E402

ALL_VARIANTS = ["plain-fp32", "plain-bf16", "pipe-fp32", "pipe-bf16", "pipe-fp32-cl", "pipe-bf16-cl",
                "pipe-fp32-prefetch", "pipe-bf16-compile", "pipe-bf16-cl-compile"]
DEFAULT_VARIANTS = ["plain-fp32", "plain-bf16", "pipe-fp32", "pipe-bf16", "pipe-fp32-cl", "pipe-bf16-cl",
                    "pipe-fp32-prefetch"]


# ----------------------------------------------------------------------------------------------------------------
# The plain loop, in the style of pytorch/examples dcgan (written here, not copied): explicit G and D stacks for
# 64 px, sigmoid + BCELoss, D updated on a real and a fake batch, the fake batch reused for G's update.
def plain_generator(nz: int, ngf: int, nc: int, resolution: int) -> nn.Sequential:
    mult = resolution // 8  # 64 px -> 8, 32 px -> 4
    layers: list[nn.Module] = [nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * mult),
                               nn.ReLU(True)]
    while mult > 1:
        layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                   nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
        mult //= 2
    layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def plain_discriminator(ndf: int, nc: int, resolution: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    width, size = ndf, resolution // 2
    while size > 4:
        layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                   nn.LeakyReLU(0.2, inplace=True)]
        width, size = width * 2, size // 2
    layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _dcgan_init(m: nn.Module) -> None:
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PlainLoop:
    """One iteration = the examples' loop body: D on real (backward), D on G(z).detach() (backward), D step;
    then D on the same fake for G (backward), G step. ``.item()`` of the losses each iteration, as there."""

    def __init__(self, images_u8: torch.Tensor, batch: int, resolution: int, ngf: int = 64, ndf: int = 64,
                 nz: int = 100, bf16: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        self.images, self.batch, self.nz, self.bf16 = images_u8, batch, nz, bf16
        nc = images_u8.shape[1]
        self.netG = plain_generator(nz, ngf, nc, resolution)
        self.netD = plain_discriminator(ndf, nc, resolution)
        self.netG.apply(_dcgan_init)
        self.netD.apply(_dcgan_init)
        self.criterion = nn.BCELoss()
        self.optD = torch.optim.Adam(self.netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.pos = 0

    def _next_real(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.images):
            self.pos = 0
        x = self.images[self.pos:self.pos + self.batch].float().div_(127.5).sub_(1.0)
        self.pos += self.batch
        return x

    def _ac(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def step(self) -> None:
        real = self._next_real()
        b = real.shape[0]
        self.netD.zero_grad()
        with self._ac():
            out = self.netD(real).view(-1)
        err_real = self.criterion(out.float(), torch.ones(b))
        err_real.backward()
        noise = torch.randn(b, self.nz, 1, 1)
        with self._ac():
            fake = self.netG(noise)
            out = self.netD(fake.detach()).view(-1)
        err_fake = self.criterion(out.float(), torch.zeros(b))
        err_fake.backward()
        self.optD.step()
        self.netG.zero_grad()
        with self._ac():
            out = self.netD(fake).view(-1)
        err_g = self.criterion(out.float(), torch.ones(b))
        err_g.backward()
        self.optG.step()
        err_real.item(), err_fake.item(), err_g.item()


# ----------------------------------------------------------------------------------------------------------------
class PipelineSide:
    """The pipeline's step with the options under test, fed by the pipeline's own BatchStream."""

    def __init__(self, data_path: str, args, precision: str, channels_last: bool, compile: bool, prefetch: bool):
        from pipelines.data.reader import TrainReader
        from pipelines.loop import BatchStream

        spec = GANSpec(resolution=args.resolution, channels=1, ngf=args.ngf, ndf=args.ngf, nz=100,
                       precision=precision)
        self.gan = apply_options(build_gan(spec, seed=0), channels_last=channels_last, compile=compile)
        stream = BatchStream(TrainReader(data_path, 0, 1, args.batch_size, seed=0), torch.device("cpu"))
        self.stream = Prefetcher(stream, channels_last=channels_last) if prefetch else stream

    def step(self) -> None:
        stats = train_step(self.gan, self.stream)
        stats["d_loss"].item()  # the loop reads numbers only every log_every steps; one sync here is harsher


def build_variant(name: str, data_path: str, images: torch.Tensor, args):
    if name.startswith("plain-"):
        return PlainLoop(images, args.batch_size, args.resolution, args.ngf, args.ngf, bf16=name.endswith("bf16"))
    parts = name.split("-")
    return PipelineSide(data_path, args, precision=parts[1], channels_last="cl" in parts, compile="compile" in parts,
                        prefetch="prefetch" in parts)


def part_a(data_path: str, args) -> None:
    from pipelines.data.reader import load_split

    images = torch.from_numpy(load_split(data_path, "train")[0][:4096].copy())
    variants = args.variants.split(",")
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    sides = {}
    for name in variants:
        t0 = time.perf_counter()
        sides[name] = build_variant(name, data_path, images, args)
        for _ in range(args.warmup):
            sides[name].step()
        print(f"  built + warmed {name:22s} in {time.perf_counter() - t0:6.1f}s", flush=True)
    rates: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        for name in variants:  # interleaved: every round runs every variant back to back
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sides[name].step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {rates[n][-1]:.1f}" for n in variants), flush=True)
    base = "plain-fp32" if "plain-fp32" in rates else variants[0]
    print(f"\nPart A: DCGAN {args.resolution}px, batch {args.batch_size}, ngf=ndf={args.ngf}, nz=100, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps (interleaved)")
    print(f"{'variant':24s} {'median img/s':>12s} {'min':>7s} {'max':>7s} {'ratio vs ' + base:>18s} "
          f"{'per-round ratio min..max':>26s}")
    for name in variants:
        med = statistics.median(rates[name])
        per_round = [a / b for a, b in zip(rates[name], rates[base])]
        print(f"{name:24s} {med:12.1f} {min(rates[name]):7.1f} {max(rates[name]):7.1f} "
              f"{med / statistics.median(rates[base]):18.2f} {min(per_round):12.2f} .. {max(per_round):.2f}")


# ----------------------------------------------------------------------------------------------------------------
def plain_rate(images: torch.Tensor, resolution: int, args, steps: int) -> float:
    loop = PlainLoop(images, args.batch_size, resolution, args.ngf, args.ngf)
    for _ in range(args.warmup):
        loop.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return steps * args.batch_size / (time.perf_counter() - t0)


def pipeline_rate(data_path: str, resolution: int, args, tmp: Path, workers: int, precision: str) -> tuple:
    """`gan-pipeline train` as a user runs it (Ray Train, gloo); steady images/s from its MLflow windows."""
    name = f"speed-{resolution}-{workers}-{precision}"
    uri = f"sqlite:///{tmp}/mlflow-{name}.db"
    steps = args.cli_steps * (64 // resolution) ** 2  # about the same seconds of training at every size
    cmd = [str(Path(sys.executable).parent / "gan-pipeline"), "train", "--model", "dcgan", "--data", data_path,
           "--workers", str(workers), "--max-steps", str(steps), "--no-score-checkpoints",
           # --batch-size is the global batch: args.batch_size per worker
           "--batch-size", str(args.batch_size * workers),
           "--ngf", str(args.ngf), "--ndf", str(args.ngf), "--log-every", str(max(steps // 12, 1)),
           "--checkpoint-every", str(steps), "--sample-every", str(steps), "--precision", precision,
           "--runs-dir", str(tmp / f"runs-{name}"), "--run-name", name]
    med, lo, hi, wall = steady_throughput(cmd, uri)
    return med, lo, hi, wall, " ".join(cmd)


def steady_throughput(cmd: list[str], uri: str) -> tuple[float, float, float, float]:
    """Run a `gan-pipeline train` command tracked at ``uri``; the median, min and max of its MLflow
    ``images_per_second`` windows, and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])[0]
    hist = sorted(client.get_metric_history(run.info.run_id, "images_per_second"), key=lambda m: m.step)
    # The first window holds the first steps' allocations; the last one the final checkpoint and sample grid.
    steady = [m.value for m in hist[1:-1]] or [m.value for m in hist]
    return statistics.median(steady), min(steady), max(steady), wall


def part_b(args, tmp: Path) -> None:
    """Benchmarks 1-3 through Ray Train: ``gan-pipeline train --workers N`` against the plain fp32 loop using
    every core, measured right before and right after each pipeline run (their mean is the reference)."""
    from pipelines.config import DataConfig
    from pipelines.data.reader import load_split
    from pipelines.prepare import prepare_dataset

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"\nPart B: gan-pipeline train (Ray Train workers x {os.cpu_count()} // workers threads) vs the plain fp32 "
          f"loop with {torch.get_num_threads()} threads; batch {args.batch_size} per worker, ngf=ndf={args.ngf}")
    rows = []
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        data = prepare_dataset(DataConfig(dataset="mnist", resolution=resolution),
                               out=str(tmp / f"mnist{resolution}")).path
        images = torch.from_numpy(load_split(data, "train")[0][:4096].copy())
        for workers in [int(w) for w in args.workers.split(",")]:
            for precision in args.precision.split(","):
                before = plain_rate(images, resolution, args, args.plain_steps * (64 // resolution) ** 2)
                med, lo, hi, wall, cmd = pipeline_rate(data, resolution, args, tmp, workers, precision)
                after = plain_rate(images, resolution, args, args.plain_steps * (64 // resolution) ** 2)
                plain = (before + after) / 2
                rows.append((resolution, workers, precision, plain, med, lo, hi, wall))
                print(f"  {resolution}px {workers} worker(s) {precision}: plain {before:.1f} before / {after:.1f} after; "
                      f"pipeline median window {med:.1f} img/s ({lo:.1f}..{hi:.1f}); ratio {med / plain:.2f}; "
                      f"wall {wall:.0f}s incl. Ray start\n    $ {cmd}", flush=True)
    print(f"\n{'px':>3s} {'workers':>7s} {'precision':>9s} {'plain fp32':>10s} {'pipeline':>9s} {'ratio':>6s} "
          f"{'window range ratio':>19s}")
    for resolution, workers, precision, plain, med, lo, hi, wall in rows:
        print(f"{resolution:3d} {workers:7d} {precision:>9s} {plain:10.1f} {med:9.1f} {med / plain:6.2f} "
              f"{lo / plain:9.2f} .. {hi / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {ALL_VARIANTS}")
    parser.add_argument("--workers2", action="store_true", help="run part B (through Ray Train) instead of part A")
    parser.add_argument("--workers", default="1,2", help="part B: worker counts")
    parser.add_argument("--resolutions", default="32,64")
    parser.add_argument("--cli-steps", type=int, default=60, help="part B: pipeline steps at 64 px (x4 at 32 px)")
    parser.add_argument("--plain-steps", type=int, default=8)
    parser.add_argument("--precision", default="fp32,bf16", help="part B: pipeline precisions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", machine_info())
    print("reproduce: python benchmarks/bench_speed.py " + " ".join(sys.argv[1:]), flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.workers2:
            part_b(args, tmp)
        else:
            from pipelines.config import DataConfig
            from pipelines.prepare import prepare_dataset

            data = prepare_dataset(DataConfig(dataset="mnist", resolution=args.resolution, limit=8192),
                                   out=str(tmp / "mnist")).path
            part_a(data, args)


if __name__ == "__main__":
    main()
