"""The CLI's last line of defence: whatever goes wrong, the person at the keyboard gets one line, never a traceback.

Exit codes (documented in README and docs/reliability.md):
    0  done
    1  something missing or foreign: a file, folder, run, model or server that is absent or not gan-pipeline's
    2  a bad value: an option, a config or space file, a name (click's usage errors are 2 as well)
    3  an internal error (a bug): one line ``internal error: ..., please report; details in <log file>``; the
       traceback goes to that log file (mode 0600), never to the terminal
  130  interrupted (Ctrl-C)
Every message and every log line goes through ``pipelines.secrets.redact_text`` first.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import click

from pipelines.errors import UserError
from pipelines.secrets import redact_text

INTERNAL_ERROR_EXIT = 3


def state_dir() -> Path:
    """The product's private folder: ``$GAN_PIPELINE_STATE_DIR``, else ``$XDG_STATE_HOME/gan-pipeline``
    (``~/.local/state/gan-pipeline``): internal-error logs, the local Ray instance's auth token."""
    configured = os.environ.get("GAN_PIPELINE_STATE_DIR")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "gan-pipeline"


def log_dir() -> Path:
    """``$GAN_PIPELINE_LOG_DIR``, else ``<state_dir>/logs``."""
    configured = os.environ.get("GAN_PIPELINE_LOG_DIR")
    return Path(configured) if configured else state_dir() / "logs"


def write_error_log(exc: BaseException, kind: str = "internal-error") -> str:
    """The redacted traceback of ``exc`` in a new file only the user can read; its path (or why there is none)."""
    text = redact_text("".join([
        f"gan-pipeline {kind.replace('-', ' ')}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n",
        f"command: {' '.join(sys.argv)}\n", f"python {sys.version.split()[0]}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__)]))
    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return str(path)
    except OSError as err:
        return f"(none: could not write a log under {folder}: {err.strerror or err})"


class _PrivateFileHandler(logging.FileHandler):
    """A log file only the user can read, created at its first line (most commands never write one)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, self.mode, encoding=self.encoding)


_LIBRARY_LOG: list[logging.Handler] = []


def library_log_handler() -> logging.Handler:
    """This process's log file for what libraries log that the console does not show (Ray's INFO and WARNING
    lines), next to the error logs: ``<log_dir>/libraries-<time>-<pid>.log``, mode 0600, redacted."""
    if not _LIBRARY_LOG:
        folder = log_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            handler: logging.Handler = _PrivateFileHandler(
                folder / f"libraries-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", delay=True)
        except OSError:
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_redact_record)
        _LIBRARY_LOG.append(handler)
    return _LIBRARY_LOG[0]


class _LinesToLog:
    """A text stream whose lines become records of ``logger`` (a library's notes kept in the log file)."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.buffer = logger, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in filter(str.strip, lines):
            self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        if self.buffer.strip():
            self.logger.info(self.buffer)
        self.buffer = ""


@contextlib.contextmanager
def library_notes_to_log(library: str):
    """What ``library`` prints on stderr inside the block (MLflow's ``Successfully registered model ...``,
    ``Created version ...``) goes to the log file, not the console: the stage prints its own line."""
    logger = logging.getLogger(f"gan_pipeline.{library}")
    logger.propagate, logger.level = False, logging.INFO
    if library_log_handler() not in logger.handlers:
        logger.addHandler(library_log_handler())
    stream = _LinesToLog(logger)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.flush()


def _redact_record(record: logging.LogRecord) -> bool:
    record.msg, record.args = redact_text(record.getMessage()), None
    return True


def without_traceback(message: str) -> str:
    """A message that carries a traceback (a Ray worker's, inside ``training failed: ...``) keeps its first line and
    the exception it ends with; the whole text goes to a log file."""
    if "Traceback (most recent call last)" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    last = next((line.strip() for line in reversed(lines) if not line.startswith((" ", "\t"))), lines[-1].strip())
    log = write_error_log(RuntimeError(message), kind="error-details")
    return f"{lines[0].split('Traceback (most recent call last)')[0].rstrip()} ... {last} (details in {log})"


class RedactingStream:
    """A text stream that redacts what is written to it: the console of a command, whatever prints there (MLflow's
    "View run at <tracking URI>", Ray's relayed worker output, a library's warning)."""

    def __init__(self, stream):
        self._stream = stream
        self._secrets = None

    def write(self, text: str) -> int:
        from pipelines.secrets import MASK, redact_uri, secret_values

        if self._secrets is None:
            self._secrets = secret_values()
        text = redact_uri(text)
        for value in self._secrets:
            text = text.replace(value, MASK)
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, buffer, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_console():
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class GuardedGroup(click.Group):
    """A click group whose commands end in one redacted line on any exception."""

    def invoke(self, ctx: click.Context):
        try:
            with redacted_console():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as exc:
            exc.message = without_traceback(redact_text(exc.message))
            raise
        except UserError as exc:
            raise _Failure(without_traceback(redact_text(str(exc))), exc.exit_code) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the point of the guard
            log = write_error_log(exc)
            summary = redact_text(f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__)
            if len(summary) > 300:
                summary = summary[:297] + "..."
            raise _Failure(f"internal error: {summary}, please report; details in {log}",
                           INTERNAL_ERROR_EXIT) from None
