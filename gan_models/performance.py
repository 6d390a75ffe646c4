"""Speed options of the training step, each measured (``benchmarks/bench_speed.py``, ``docs/performance.md``)
and kept only where it pays:

- ``precision`` (``GANSpec.precision``, ``GAN.autocast``): bf16 autocast on CPU (AMX/avx512_bf16) and GPU, fp16 on
  GPU only (with a GradScaler per optimizer). Parameters, gradients, optimizer state, the losses, weight
  clipping and the WGAN-GP penalty stay float32 (see ``docs/performance.md`` for where and why).
- ``channels_last``: NHWC memory format for G, D and the real batches (oneDNN / cuDNN pick NHWC kernels).
- ``compile``: ``torch.compile`` of G and D (the optimizer step and losses stay eager).
- ``Prefetcher``: the next real batch is read (and on a GPU copied and converted) on a background thread
  while the current step computes; it keeps the stream's checkpoint position exact.

No Ray, MLflow or CLI here: the pipeline's loop calls ``apply_options`` and ``Prefetcher``; the benchmarks call
the same functions, so what is measured is what runs.
"""
from __future__ import annotations

import os
import platform
import queue
import re
import threading
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["apply_options", "to_channels_last", "compile_networks", "Prefetcher", "machine_info"]


def to_channels_last(module: nn.Module) -> nn.Module:
    """NHWC weights (4-d parameters only; 1-d batch-norm parameters are unaffected). In place, returns module."""
    return module.to(memory_format=torch.channels_last)


def compile_networks(gan: Any, mode: Optional[str] = None) -> None:
    """``torch.compile`` G and D in place (same module objects and parameters: optimizers, checkpoints and DDP
    see the same tensors). ``dynamic=False``: batch shapes are fixed within a run."""
    # nn.Module.compile is in place: state_dict keys (checkpoints, MLflow models) stay those of the plain module.
    for net in (gan.generator, gan.discriminator):
        net.compile(mode=mode, dynamic=False)


def apply_options(gan: Any, channels_last: bool = False, compile: bool = False) -> Any:
    """Apply the speed options to a freshly built ``GAN`` (before DDP wrapping)."""
    if channels_last:
        for net in (gan.generator, gan.discriminator, gan.aux_classifier):
            if net is not None:
                to_channels_last(net)
    if compile:
        compile_networks(gan)
    return gan


class Prefetcher:
    """Reads ``depth`` batches ahead of the consumer on a daemon thread.

    ``stream`` is a ``BatchStream``-like iterator with ``epoch``/``batch_in_epoch`` attributes (its resume
    position); this wrapper exposes the same attributes for the batch the consumer last *took*, so a checkpoint
    records where the training step is, not where the read-ahead is. ``channels_last`` converts the batch
    on the background thread. The wrapped stream's own work (index gather, host-to-device copy, uint8 -> float)
    runs on the thread.
    """

    _END = object()

    def __init__(self, stream: Iterator, depth: int = 2, channels_last: bool = False):
        self.stream = stream
        self.epoch = getattr(stream, "epoch", 0)
        self.batch_in_epoch = getattr(stream, "batch_in_epoch", 0)
        self.channels_last = channels_last
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gan-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.stream:
                if self.channels_last:
                    item = (item[0].contiguous(memory_format=torch.channels_last), *item[1:])
                pos = (getattr(self.stream, "epoch", 0), getattr(self.stream, "batch_in_epoch", 0))
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, pos), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced in the consumer, not lost on the thread
            self._queue.put((exc, None))
            return
        self._queue.put((self._END, None))

    def __iter__(self):
        return self

    def __next__(self):
        item, pos = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.epoch, self.batch_in_epoch = pos
        return item

    def close(self) -> None:
        self._stop.set()


def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux; elsewhere the platform's name and no flags)."""
    model = platform.processor() or platform.machine()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return model, set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    n = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    return (n.group(1).strip() if n else model), set(m.group(1).split()) if m else set()


# CPU units that run bf16 matrix work natively (Zen 4 / Cooper Lake: AVX512-BF16; Sapphire Rapids: AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def default_precision(device: torch.device | str = "cpu") -> str:
    """``precision: auto``: bf16 autocast where the hardware has bf16 units, else fp32. Measured on a 2-core
    AVX512-BF16 CPU: bf16 trains about twice the steps of fp32 in the same time, and under a time budget that won
    on every preset (docs/quality.md); without bf16 units autocast emulates it and is slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_flags()[1] & set(BF16_CPU_FLAGS) else "fp32"


def machine_info() -> str:
    """One line: cores, CPU model, the CPU flags that decide bf16 speed, torch version (printed with results)."""
    model, flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    have = [f for f in wanted if f in flags]
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{os.cpu_count()} cores, {model}, flags [{' '.join(have) or 'none of ' + '/'.join(wanted)}], "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}, python {platform.python_version()}")
