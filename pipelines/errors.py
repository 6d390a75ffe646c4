"""Errors meant for the person at the keyboard: the CLI prints their message (no traceback) and exits 1."""


class UserError(Exception):
    """Something the user can fix; the message names the problem and the fix."""


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached."""


class TrainingDiverged(UserError):
    """A loss became NaN or Inf."""
