"""Training progress, from the workers to the person at the keyboard.

Rank 0's loop publishes a :class:`TrainingProgress` at every log step (and short messages: a resume, a
divergence) to a :class:`ProgressBoard`, a small Ray actor the driver creates; the driver polls it and shows what
arrives. An actor works wherever the workers run (another node of a cluster included), which worker stdout relayed
by Ray's log monitor does too, but with Ray's prefixes and its own lines mixed in; with the board, the driver starts
Ray with ``log_to_driver=False`` and Ray's output stays in its session logs.

How it is shown depends on where the driver's stdout goes:

- a terminal: one live display (``rich``): a bar, step/total or time spent/budget, losses, images/s, ETA;
- anything else (CI, ``ray job submit`` logs, a pipe): one plain line per log step, ``[gan-pipeline] step ...``.

A worker without a board (inside a Tune trial, whose driver relays worker stdout) prints the same plain lines.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

PREFIX = "[gan-pipeline]"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass(frozen=True)
class TrainingProgress:
    """Where a run stands at a log step. ``fraction``: done, by steps or by the time budget, whichever ends first;
    ``eta_seconds``: the time left by the same rule."""

    step: int
    total_steps: Optional[int]
    epoch: int
    losses: dict[str, float]
    images_per_second: float
    fraction: float
    eta_seconds: float
    budget_spent: Optional[float] = None
    budget_seconds: Optional[float] = None

    def line(self) -> str:
        """The plain line (a log file, a pipe, a Tune trial's worker output)."""
        of = f"/{self.total_steps}" if self.total_steps else ""
        losses = "  ".join(f"{k} {v:.4f}" for k, v in self.losses.items())
        return (f"{PREFIX} step {self.step}{of} ({100 * self.fraction:.0f}%)  epoch {self.epoch}  {losses}  "
                f"{self.images_per_second:.0f} img/s  ETA {format_eta(self.eta_seconds)}")


Event = Union[TrainingProgress, str]  # a progress snapshot, or a message line


class ProgressBoard:
    """The Ray actor between rank 0 and the driver: events in arrival order, taken in batches."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def put(self, event: Event) -> None:
        self.events.append(event)

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events


def create_board():
    """A board for one training run, owned by the driver (it goes when the driver's Ray session ends). No CPU: it
    must never wait for one that the workers hold."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


class WorkerConsole:
    """What a worker shows: on the driver's board when there is one, else printed (and relayed by Ray)."""

    def __init__(self, board: Any = None, print_fn: Callable[[str], None] = None):
        self.board = board
        self.print = print_fn or (lambda text: print(text, flush=True))
        self._last = None

    def progress(self, progress: TrainingProgress, wait: bool = False) -> None:
        """``wait``: return once the board holds it (at checkpoints and the last step: a worker that exits right
        after must not take its final line with it)."""
        self._publish(progress, progress.line(), wait)

    def message(self, text: str) -> None:
        self._publish(text, text, wait=True)

    def _publish(self, event: Event, text: str, wait: bool) -> None:
        if self.board is None:
            self.print(text)
            return
        import ray

        self._last = self.board.put.remote(event)
        if wait:
            try:
                ray.get(self._last, timeout=30)
            except Exception:  # noqa: BLE001 - progress is shown on a best-effort basis; training goes on
                self.board = None


# ---- the driver's side -------------------------------------------------------------------------------------------

class LineView:
    """Not a terminal: one plain line per event, flushed (a log collector sees it at once)."""

    def __init__(self, print_fn: Callable[[str], None] = None):
        self.print = print_fn or (lambda text: print(text, flush=True))

    def __enter__(self) -> "LineView":
        return self

    def show(self, event: Event) -> None:
        self.print(event.line() if isinstance(event, TrainingProgress) else event)

    def __exit__(self, *exc) -> None:
        return None


class LiveView:
    """A terminal: one live progress display for the stage, redrawn in place; messages print above it."""

    def __init__(self, title: str, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console or Console(file=sys.stdout)
        self.bar = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                            BarColumn(bar_width=24), TextColumn("{task.fields[percent]}"),
                            TextColumn("{task.fields[where]}"), TimeElapsedColumn(),
                            TextColumn("{task.fields[detail]}"),
                            console=self.console, transient=False, refresh_per_second=4)
        self.task = self.bar.add_task(title, total=None, percent="", where="starting the workers", detail="")

    def __enter__(self) -> "LiveView":
        self.bar.start()
        return self

    def show(self, event: Event) -> None:
        if not isinstance(event, TrainingProgress):
            self.bar.console.print(event, highlight=False, markup=False, soft_wrap=True)
            return
        p = event
        where = f"step {p.step}/{p.total_steps}" if p.total_steps else f"step {p.step}"
        if p.budget_seconds:
            where += f"  {format_eta(min(p.budget_spent or 0, p.budget_seconds))} of {format_eta(p.budget_seconds)}"
        losses = "  ".join(f"{k} {v:.3f}" for k, v in p.losses.items())
        detail = f"{losses}  {p.images_per_second:,.0f} img/s  ETA {format_eta(p.eta_seconds)}"
        self.bar.update(self.task, total=1.0, completed=min(p.fraction, 1.0), percent=f"{100 * p.fraction:3.0f}%",
                        where=where, detail=detail)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def view_for_console(title: str, print_fn: Optional[Callable[[str], None]] = None, stream=None):
    """A live display where stdout is a terminal, plain lines elsewhere (``print_fn`` given: always lines)."""
    stream = stream or sys.stdout
    if print_fn is None and stream.isatty():
        return LiveView(title)
    return LineView(print_fn)


@contextlib.contextmanager
def stage_spinner(name: str, stream=None) -> Iterator[None]:
    """A stage without steps to count (evaluate, register): a spinner and the time it has taken, on a terminal
    only; what the stage prints goes above it."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn(name), TimeElapsedColumn(),
                  console=Console(file=stream), transient=True) as spinner:
        spinner.add_task(name, total=None)
        yield


@contextlib.contextmanager
def relayed(board, view, poll_seconds: float = 1.0) -> Iterator[None]:
    """Show what arrives on ``board`` with ``view`` while the block runs (a Ray Train ``fit``), then what is
    left on it."""
    import ray

    stop = threading.Event()

    def drain(timeout: float) -> None:
        for event in ray.get(board.take.remote(), timeout=timeout):
            view.show(event)

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                drain(timeout=10)
            except Exception:  # noqa: BLE001 - a board that stopped answering: training's own errors tell why
                return

    with view:
        thread = threading.Thread(target=poll, name="gan-pipeline-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=15)
            with contextlib.suppress(Exception):
                drain(timeout=10)
