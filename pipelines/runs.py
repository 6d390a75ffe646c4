"""MLflow runs a command created: a command that fails leaves them FAILED, never RUNNING for good."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def failed_on_error() -> Iterator[Callable[[object, str], None]]:
    """``with failed_on_error() as created: ... created(client, run_id)``: on any exception (Ctrl-C included) each
    run registered through ``created`` that is still RUNNING is marked FAILED (KILLED for Ctrl-C)."""
    runs: list[tuple[object, str]] = []
    try:
        yield lambda client, run_id: runs.append((client, run_id))
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for client, run_id in runs:
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, status=status)
            except Exception:  # noqa: BLE001 - the server may be what failed; keep the original error
                pass
        raise
