"""Errors meant for the person at the keyboard: the CLI prints their message (no traceback) and exits with the
error's ``exit_code``: 2 for a bad value or config (the user typed something wrong), 1 for a missing or foreign
thing (a file, run, model or server that is absent or not gan-pipeline's)."""


class UserError(Exception):
    """Something the user can fix; the message names the problem and the fix."""

    exit_code = 1


class BadValue(UserError):
    """A value the user typed (an option, a config key, a name) that the product refuses."""

    exit_code = 2


class MetricsRequestError(BadValue, ValueError):
    """Metrics asked of samples or a generator that cannot give them (too few images, no condition, no code).
    A ValueError too: the metrics are a library that callers use without the CLI."""


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached."""


class TrainingDiverged(UserError):
    """A loss became NaN or Inf."""
