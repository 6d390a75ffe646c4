"""Datasets: sources (MNIST, Fashion-MNIST, CIFAR-10, image folders) -> validated, sharded Parquet + manifest.

- ``sources``  read the original files, streaming ``(image uint8 HxWxC, label int)`` per split.
- ``store``    write Parquet shards and ``manifest.json`` into a temporary sibling, publish by rename.
- ``reader``   what training workers and evaluation read back (no Ray dependency).

Every error a person can fix is a :class:`DataError` whose message names the problem and the fix.
"""
from __future__ import annotations


try:  # the CLI prints UserErrors without a traceback
    from pipelines.errors import UserError as _UserError
except ImportError:  # pragma: no cover - pipelines.errors absent
    class _UserError(Exception):
        pass


class DataError(_UserError, ValueError):
    """A data problem (missing/corrupt source, bad prepared dataset), worded with the fix."""


MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

__all__ = ["DataError", "MANIFEST_NAME", "SCHEMA_VERSION"]
