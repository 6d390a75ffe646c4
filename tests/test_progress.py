"""The console of a training run (pipelines.progress): the live display on a terminal, plain lines elsewhere.
No Ray here: the board is a plain object; tests/test_train_integration.py runs the real relay."""
from __future__ import annotations

import io

from rich.console import Console

from pipelines.progress import LineView, LiveView, ProgressBoard, TrainingProgress, WorkerConsole, view_for_console


def _progress(step=40, total=100, budget=None):
    return TrainingProgress(step=step, total_steps=total, epoch=1, losses={"d_loss": 0.5, "g_loss": 2.25},
                            images_per_second=1480.0, fraction=step / total if total else 0.3, eta_seconds=75,
                            budget_spent=budget and budget * 0.3, budget_seconds=budget)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_view_on_a_terminal_shows_step_losses_speed_and_eta_and_prints_messages_above():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with LiveView("training run-1", console=console) as view:
        assert "%" not in out.getvalue()  # before the first step: no made-up percentage
        view.show("[gan-pipeline] resumed from checkpoint at step 20/100")
        view.show(_progress())
    text = out.getvalue()
    assert "resumed from checkpoint at step 20/100" in text
    final = text.rsplit("\r", 1)[-1]  # the display as last redrawn
    assert "training run-1" in text and "step 40/100" in final and "40%" in final
    assert "d_loss 0.500" in final and "g_loss 2.250" in final and "1,480 img/s" in final and "ETA 1m15s" in final
    assert "[gan-pipeline] step" not in text  # no plain lines on a terminal


def test_live_view_of_a_time_budget_shows_time_spent_of_the_budget():
    out = io.StringIO()
    with LiveView("training", console=Console(file=out, force_terminal=True, width=160, color_system=None)) as view:
        view.show(_progress(step=700, total=None, budget=450))
    assert "step 700" in out.getvalue() and "2m15s of 7m30s" in out.getvalue()


def test_not_a_terminal_gets_one_plain_line_per_event():
    lines: list[str] = []
    with LineView(lines.append) as view:
        view.show(_progress())
        view.show("a message")
    assert lines == ["[gan-pipeline] step 40/100 (40%)  epoch 1  d_loss 0.5000  g_loss 2.2500  1480 img/s  ETA 1m15s",
                     "a message"]


def test_the_view_follows_where_stdout_goes():
    assert isinstance(view_for_console("t", stream=io.StringIO()), LineView)
    assert isinstance(view_for_console("t", stream=_Terminal()), LiveView)
    assert isinstance(view_for_console("t", print_fn=print, stream=_Terminal()), LineView)  # a caller's printer wins


class _Remote:
    """A stand-in for a Ray actor method: ``.remote`` calls it at once."""

    def __init__(self, fn):
        self.remote = fn


class _LocalBoard:
    def __init__(self):
        self.board = ProgressBoard()
        self.put = _Remote(self.board.put)


def test_a_worker_console_publishes_to_the_board_in_order_or_prints_without_one(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    local = _LocalBoard()
    console = WorkerConsole(local)
    console.message("resumed")
    console.progress(_progress(), wait=True)
    assert local.board.take() == ["resumed", _progress()] and local.board.take() == []
    printed: list[str] = []
    WorkerConsole(print_fn=printed.append).progress(_progress())
    assert printed == [_progress().line()]


def test_a_stage_spinner_only_on_a_terminal():
    from pipelines.progress import stage_spinner

    piped = io.StringIO()
    with stage_spinner("evaluate", stream=piped):
        pass
    assert piped.getvalue() == ""  # logs stay clean
    terminal = _Terminal()
    with stage_spinner("evaluate", stream=terminal):
        pass
    assert "evaluate" in terminal.getvalue()


def test_start_up_imports_no_torchvision():
    """torchvision (and the torch._dynamo it pulls in) was ~1.8 s of the driver's and of every worker's start-up;
    only sample grids need it, and they import it when they draw."""
    import subprocess
    import sys

    code = ("import sys, pipelines.cli, pipelines.train, pipelines.loop, pipelines.scoring, pipelines.launch; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
