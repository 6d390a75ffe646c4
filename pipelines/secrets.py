"""Secrets never leave the process in clear text: every text the product shows or records (console, error
messages, the ``--dry-run`` YAML, MLflow params and tags, config.json, the internal-error log) goes through
:func:`redact_text` or :func:`redact_uri` first.

What counts as a secret:
- a URI's password (``scheme://user:password@host``, the password may itself hold ``@``, ``/`` or ``:``);
- a URI's query values whose names look secret (``?token=``, ``secret_key=``, ``X-Amz-Signature=``, ...);
- the value of any environment variable whose name looks secret (``*PASSWORD*``, ``*SECRET*``, ``*TOKEN*``,
  ``AWS_ACCESS_KEY_ID``, ...), wherever it appears in a text.
"""
from __future__ import annotations

import os
import re

MASK = "***"
_QUERY_WORDS = ("password", "passwd", "pwd", "secret", "token", "key", "signature", "sig", "credential", "auth",
                "session")
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&\s#]*(?:" + "|".join(_QUERY_WORDS) + r")[^=&\s#]*=)([^&;\s#'\"]+)")
# environment names: narrower than query names (PWD is the working directory, XAUTHORITY a path)
_ENV_WORDS = ("password", "passwd", "secret", "token", "credential", "signature", "private")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
#: Environment variables whose values are secrets (besides names holding a secret word).
_SECRET_ENV = {"AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_USERNAME"}
_MIN_SECRET_LEN = 4  # shorter values ("1", "yes") would mask half of every text


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return (name.upper() in _SECRET_ENV or any(word in lowered for word in _ENV_WORDS)
            or lowered.endswith(("_key", "_key_id", "-key")) or lowered == "key")


def _redact_one(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    # userinfo ends at the LAST '@' (a password may hold '@' or '/'); an '@' after a '/' without a ':' before it
    # belongs to a path (s3://bucket/key@v1) and is left alone
    at = rest.rfind("@")
    if at > 0:
        userinfo = rest[:at]
        if "/" not in userinfo or ":" in userinfo:
            rest = f"{MASK}@{rest[at + 1:]}"
    return f"{scheme}://{_SECRET_PARAM.sub(lambda m: m.group(1) + MASK, rest)}"


def redact_uri(text: str) -> str:
    """Every URI in ``text`` without its password and secret query values; everything else unchanged."""
    if "://" not in text:
        return text
    return _URI.sub(lambda m: _redact_one(m.group(0)), text)


def environment_snapshot(environ=None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) that other threads cannot break while it is taken:
    MLflow's telemetry thread sets and deletes a variable of its own, and ``os.environ.items()`` raised KeyError
    in a sweep's trial when the deletion fell between a key and its value. (``list(os.environ)`` is atomic.)"""
    env = os.environ if environ is None else environ
    return {k: v for k in list(env) if (v := env.get(k)) is not None}


def secret_values(environ=None) -> list[str]:
    """Values of the secret-looking environment variables, longest first."""
    env = environment_snapshot(environ)
    values = {v for k, v in env.items() if v and len(v) >= _MIN_SECRET_LEN and is_secret_name(k)}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, environ=None) -> str:
    """``text`` fit to show or record: URIs redacted, secret environment values masked."""
    text = redact_uri(text)
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text
