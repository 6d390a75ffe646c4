"""Local files the product writes: absolute paths, and writes that are atomic (a temp file beside the target,
flushed to disk, renamed over it): a crash or a second writer never leaves half a file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def absolute_path(path: str) -> str:
    """A local path made absolute against this process's working directory; a URI (``s3://...``) kept as given."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def atomic_write(path: Union[str, Path], data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    """Write ``data`` (bytes, text, or a function that writes into the binary file it gets, e.g.
    ``lambda f: torch.save(obj, f)``) to ``path`` atomically, creating its folder. The temp name is unique, so
    concurrent writers of one target cannot collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
