"""The training loop's side concerns, one small class each, around ``pipelines.loop``'s few lines.

The loop calls every hook of a worker, in order, at these points (all optional; the base class does nothing):

    on_resume(loop, pending)        after a checkpoint was restored (``pending``: its uncommitted metrics)
    on_step(loop, stats)            after every step, on every rank, with the step's detached statistics
                                    (``loop.gan`` is the model: e.g. an exponential moving average of G)
    on_log(loop, values)            at log steps, with the statistics averaged across ranks (same on all ranks);
                                    may add values; raise ``StopTraining`` to end the run without a checkpoint
    after_step(loop)                after the step's logging (``loop.last`` / ``loop.at_checkpoint`` known)
    checkpoint_metrics(loop)        at checkpoints: {name: value} logged to MLflow with the step and reported
    report_metrics(loop)            at checkpoints: {name: value} reported to Ray/Tune only (not logged)
    state_dict() / load_state_dict  extra state saved in the checkpoint (under ``state_key``), restored on resume
    after_checkpoint(loop)          after the checkpoint is persisted (the exactly-once commit point)

A hook ends training early with ``loop.request_stop(reason)``: at the next log step (where the ranks already
exchange numbers, so all of them agree) the loop treats the step as the last one: final checkpoint, commit.
Hooks that talk to MLflow or print run on rank 0 only; ``default_hooks`` builds a worker's list, a ``TrainJob``'s
``hook_factories`` add more (built in each worker). A training curve a hook logs should be named in
``pipelines.training_metrics`` so that ``register`` does not copy it onto model versions as an evaluation result.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from pipelines import tags, tracking
from pipelines.config import TrainConfig
from pipelines.progress import TrainingProgress, WorkerConsole, format_eta
from pipelines.training_metrics import CONSOLE_LOSSES, IMAGES_PER_SECOND, LR_SCALE


def console_print(message: str) -> None:
    print(message, flush=True)


class StopTraining(Exception):
    """Raised by a hook to end the run at once, without a checkpoint (the last good one is kept)."""


@dataclass
class LoopState:
    """What hooks see of a worker's loop. ``pending``: (step, values) logged since the last checkpoint;
    ``pending_images``: PNGs by file name (``<key>_step<N>.png``); both travel in the next checkpoint."""

    gan: Any
    rank: int
    world: int
    total_steps: Optional[int]  # None: until the time budget runs out
    checkpoint_every: Optional[int]  # None: checkpoints by time, every ``checkpoint_interval`` seconds
    log_every: int
    sample_every: int
    seed: int
    checkpoint_interval: float = TrainConfig.model_fields["checkpoint_interval"].default
    step: int = 0
    epoch: int = 0
    resumed: bool = False
    last: bool = False
    at_checkpoint: bool = False
    stop_reason: Optional[str] = None
    progress: float = 0.0  # fraction of the run done (steps or time budget), the same on every rank; set at log steps
    time_budget: Optional["TimeBudget"] = None
    exported_generator: Optional[Any] = None  # what a checkpoint saves as generator.pt; None: G as trained
    pending: list = field(default_factory=list)
    pending_images: dict = field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def request_stop(self, reason: str) -> None:
        """End training at the next log step, with a final checkpoint and commit as at the last step."""
        self.stop_reason = self.stop_reason or reason


class Hook:
    """Base class: every method is a no-op. ``state_key``: where ``state_dict`` goes in a checkpoint."""

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_resume(self, loop: LoopState, pending: list) -> None: ...

    def on_step(self, loop: LoopState, stats: dict[str, torch.Tensor]) -> None: ...

    def on_log(self, loop: LoopState, values: dict[str, float]) -> None: ...

    def after_step(self, loop: LoopState) -> None: ...

    def checkpoint_metrics(self, loop: LoopState) -> dict[str, float]:
        return {}

    def report_metrics(self, loop: LoopState) -> dict[str, float]:
        return {}

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None: ...

    def after_checkpoint(self, loop: LoopState) -> None: ...


class ConsoleProgress(Hook):
    """Where the run stands at every log step (losses, throughput, time left), to the worker's console: the
    driver's live display or its plain lines (``pipelines.progress``)."""

    def __init__(self, console: Optional[WorkerConsole] = None):
        self.console = console or WorkerConsole()
        self.window_start, self.window_step = time.perf_counter(), 0

    def on_resume(self, loop: LoopState, pending: list) -> None:
        self.window_step = loop.step
        self.console.message(f"[gan-pipeline] resumed from checkpoint at step {loop.step}/{loop.total_steps or '-'}")

    def on_log(self, loop: LoopState, values: dict[str, float]) -> None:
        now = time.perf_counter()
        seconds_per_step = (now - self.window_start) / max(loop.step - self.window_step, 1)
        self.window_start, self.window_step = now, loop.step
        # progress and time left: by steps, by the time budget, whichever ends first
        done, left = [], []
        if loop.total_steps:
            done.append(loop.step / loop.total_steps)
            left.append((loop.total_steps - loop.step) * seconds_per_step)
        budget = loop.time_budget
        if budget is not None:
            done.append(budget.spent() / budget.seconds)
            left.append(budget.seconds - budget.spent())
        self.console.progress(TrainingProgress(
            step=loop.step, total_steps=loop.total_steps, epoch=loop.epoch,
            losses={k: values[k] for k in CONSOLE_LOSSES if k in values}, images_per_second=values[IMAGES_PER_SECOND],
            fraction=min(max(done), 1.0), eta_seconds=min(left),
            budget_spent=budget.spent() if budget else None, budget_seconds=budget.seconds if budget else None,
        ), wait=loop.at_checkpoint or loop.last)


class TimeBudget(Hook):
    """A wall-clock budget for training (``train.time_budget``): at the deadline the run ends as at its last step,
    with a final checkpoint. The time spent is checkpointed, so a resumed run spends only what is left.

    ``deadline`` (seconds since the epoch; a sweep's trials get the sweep's): the budget shrinks to end there at the
    latest, whatever time restarts and pauses took in between, so progress, ETA and the learning-rate decay follow
    the time that is really left."""

    state_key = "time_budget"

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, deadline: Optional[float] = None,
                 wall_clock: Callable[[], float] = time.time):
        self.budget, self.deadline, self.clock, self.wall_clock = seconds, deadline, clock, wall_clock
        self.spent_before, self.started = 0.0, clock()
        self.seconds = self._capped()

    def _capped(self) -> float:
        if self.deadline is None:
            return self.budget
        return min(self.budget, self.spent_before + max(self.deadline - self.wall_clock(), 0.0))

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def on_step(self, loop: LoopState, stats) -> None:
        if self.spent() >= self.seconds:
            loop.request_stop(f"time budget of {format_eta(self.seconds)} reached")

    def state_dict(self) -> dict:
        return {"spent": self.spent()}

    def load_state_dict(self, state: dict) -> None:
        self.spent_before, self.started = float(state["spent"]), self.clock()
        self.seconds = self._capped()


class LearningRateDecay(Hook):
    """``gan_models.schedule`` at every log step, from ``loop.progress`` (agreed across ranks, so replicas keep
    identical rates). The progress goes into the checkpoint: a resumed run starts from the rates it stopped at, the
    same on every rank (a clock read at resume would differ a little between ranks, and so would their updates)."""

    state_key = "lr_decay"

    def __init__(self, decay_from: float, final_scale: float):
        self.decay_from, self.final_scale = decay_from, final_scale
        self.progress = 0.0

    def apply(self, loop: LoopState) -> float:
        from gan_models.schedule import lr_scale, set_learning_rates

        self.progress = loop.progress
        scale = lr_scale(loop.progress, self.decay_from, self.final_scale)
        set_learning_rates(loop.gan, scale)
        return scale

    def on_resume(self, loop: LoopState, pending: list) -> None:
        loop.progress = self.progress
        self.apply(loop)

    def on_log(self, loop: LoopState, values: dict[str, float]) -> None:
        values[LR_SCALE] = self.apply(loop)

    def state_dict(self) -> dict:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.progress = float(state["progress"])


class GeneratorAverage(Hook):
    """The exponential moving average of G's weights (``gan_models.ema``), updated after every step. Rank 0 only:
    replicas hold identical weights, and only rank 0 scores and writes checkpoints."""

    state_key = "generator_ema"

    def __init__(self, gan, half_life_images: float, images_per_step: int):
        from gan_models.ema import GeneratorEMA

        self.ema = GeneratorEMA(gan.generator, half_life_images)
        self.images_per_step = images_per_step

    @property
    def module(self):
        return self.ema.module

    def on_step(self, loop: LoopState, stats) -> None:
        self.ema.update(loop.gan.generator, self.images_per_step)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


class DivergenceGuard(Hook):
    """Non-finite averaged statistics end the run on every rank (they are the same on all ranks);
    ``on_diverged(message)`` records why (rank 0: an MLflow tag)."""

    def __init__(self, on_diverged: Optional[Callable[[str], None]] = None, print_fn: Callable[[str], None] = console_print):
        self.on_diverged, self.print = on_diverged, print_fn

    def on_log(self, loop: LoopState, values: dict[str, float]) -> None:
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if not bad:
            return
        if self.on_diverged is not None:
            self.on_diverged(f"non-finite {', '.join(bad)} at step {loop.step}")
            self.print(f"[gan-pipeline] training diverged at step {loop.step}: {', '.join(bad)} not finite; "
                       f"stopping (the last good checkpoint is kept)")
        raise StopTraining(f"diverged at step {loop.step}")


def png_bytes(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class SampleGrids(Hook):
    """G's output on fixed inputs every ``sample_every`` steps and at the last one, as ``samples_step<N>.png``."""

    def __init__(self, gan, seed: int):
        from gan_models.sampling import fixed_inputs

        self.conditional = gan.spec.conditional
        n = 10 * gan.spec.num_classes if self.conditional else 64
        self.z, self.labels = fixed_inputs(gan, n=n, seed=seed)

    def after_step(self, loop: LoopState) -> None:
        if loop.step % loop.sample_every and not loop.last:
            return
        from gan_models.sampling import generate, image_grid

        grid = image_grid(generate(loop.gan.generator, self.z, self.labels), nrow=10 if self.conditional else 8)
        loop.pending_images[f"samples_step{loop.step:08d}.png"] = png_bytes(grid)


class MLflowCommitter(Hook):
    """Exactly-once metrics: what a checkpoint covers is committed after that checkpoint is persisted, and a
    resumed run commits the pending metrics of the checkpoint it restored if MLflow does not hold them yet.
    ``checkpoint_models`` (``pipelines.checkpoint_models.CheckpointModels``): scored checkpoints become LoggedModels
    their metrics are linked to."""

    def __init__(self, client, run_id: str, checkpoint_models=None):
        self.client, self.run_id, self.models = client, run_id, checkpoint_models

    def _commit(self, pending: list) -> None:
        done = tracking.committed_step(self.client, self.run_id)
        model_ids = self.models.link(pending, committed_step=done) if self.models is not None else {}
        tracking.commit_metrics(self.client, self.run_id, pending, after_step=done, model_ids=model_ids,
                                dataset=self.models.dataset if self.models is not None else None)
        if model_ids:
            self.models.finalize(model_ids)

    def on_resume(self, loop: LoopState, pending: list) -> None:
        self._commit(pending)
        # a trace on the run (worker stdout can be lost when a worker dies): how often, and from where
        restarts = int(self.client.get_run(self.run_id).data.tags.get(tags.RESTARTS, "0")) + 1
        self.client.set_tag(self.run_id, tags.RESTARTS, str(restarts))
        self.client.set_tag(self.run_id, tags.RESUMED_FROM_STEP, str(loop.step))

    def after_checkpoint(self, loop: LoopState) -> None:
        self._commit(loop.pending)
        tracking.commit_images(self.client, self.run_id, loop.pending_images)

    def mark_diverged(self, message: str) -> None:
        self.client.set_tag(self.run_id, tags.DIVERGED, message)


def default_hooks(gan, loop: LoopState, mlflow_client, run_id: str,
                  console: Optional[WorkerConsole] = None, checkpoint_models=None) -> list[Hook]:
    """A worker's own hooks. Order matters where hooks build on each other: the divergence guard sees the
    values before the console shows them, and the committer comes last."""
    if not loop.is_chief:
        return [DivergenceGuard()]
    console = console or WorkerConsole()
    committer = MLflowCommitter(mlflow_client, run_id, checkpoint_models)
    return [DivergenceGuard(committer.mark_diverged, console.message), ConsoleProgress(console),
            SampleGrids(gan, loop.seed), committer]
