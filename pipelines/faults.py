"""Fault injection for the reliability tests, as a loop hook that only the environment adds:
``GAN_PIPELINE_FAULT=kill@STEP[:RANK]`` SIGKILLs that worker (first attempt only), ``nan@STEP`` makes the
losses non-finite from that step on. ``GAN_PIPELINE_FAULT_DELAY`` (seconds, default 5) waits before the kill."""
from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional

import torch

from pipelines.hooks import Hook, LoopState, console_print

FAULT_ENV = "GAN_PIPELINE_FAULT"
DELAY_ENV = "GAN_PIPELINE_FAULT_DELAY"


class FaultInjector(Hook):
    def __init__(self, spec: str, delay: float = 5.0, kill: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL),
                 print_fn: Callable[[str], None] = console_print):
        kind, _, where = spec.partition("@")
        if kind not in ("kill", "nan") or not where:
            raise ValueError(f"{FAULT_ENV}={spec!r}: use kill@STEP[:RANK] or nan@STEP")
        at, _, rank = where.partition(":")
        self.kind, self.at, self.rank = kind, int(at), int(rank or 0)
        self.delay, self.kill, self.print = delay, kill, print_fn

    def on_step(self, loop: LoopState, stats: dict[str, torch.Tensor]) -> None:
        if self.kind == "nan" and loop.step >= self.at:
            stats["d_loss"] = stats["d_loss"] * float("nan")
        elif self.kind == "kill" and not loop.resumed and loop.step == self.at and loop.rank == self.rank:
            self.print(f"[gan-pipeline] fault injection: SIGKILL of rank {loop.rank} at step {loop.step}")
            # Ray Train's controller registers a reported checkpoint when it next polls the workers (every few
            # seconds); a crash within that window resumes from the checkpoint before. Tests want the usual case.
            time.sleep(self.delay)
            self.kill()


def fault_hooks_from_env(print_fn: Callable[[str], None] = console_print) -> list[Hook]:
    spec: Optional[str] = os.environ.get(FAULT_ENV)
    return [FaultInjector(spec, delay=float(os.environ.get(DELAY_ENV, "5")), print_fn=print_fn)] if spec else []
