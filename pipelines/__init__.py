"""gan-pipeline: the product over the science in ``gan_models`` (stages, services, the CLI)."""
from __future__ import annotations


def package_version() -> str:
    """The installed distribution's version, recorded with every dataset and run (``0+unknown`` from a bare
    checkout)."""
    from importlib import metadata

    try:
        return metadata.version("gan-pipeline")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"
