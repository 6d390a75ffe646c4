"""Prepared datasets on disk: Parquet shards + ``manifest.json``, published atomically.

Layout of a prepared dataset (a local folder or any pyarrow filesystem URI, e.g. ``file:///...``, ``s3://...``)::

    train-00000.parquet ...     columns image (binary: uint8 C x H x W, channel-first), label (int64, -1 = none),
    heldout-00000.parquet ...           split ("train" / "heldout"); at most DataConfig.shard_rows rows each
    manifest.json               what, from where, counts, shards with sha256, manifest_hash

Atomic publish: everything is written into a temporary sibling ``.<name>.tmp-<uuid>`` and renamed to ``<name>``
at the end; a failure removes the temporary folder, so a crash never leaves half a dataset under ``<name>``
(a SIGKILL can leave a ``.<name>.tmp-*`` sibling; the next prepare of the same output removes it).
Object stores cannot rename folders (``s3``, ``gcs``): there the shards are written in place and the manifest is
written LAST (and deleted first when rebuilding). Readers treat a folder without ``manifest.json`` as absent.

``manifest_hash`` = sha256 of the canonical JSON (sorted keys, no spaces) of the manifest without ``created_at``,
``manifest_hash`` itself and ``source.location`` (where the files were read from; their checksums are kept): it
identifies the dataset version, and it is the same whenever the same source files are prepared with the same
settings by the same package version.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import posixpath
import re
import sys
import time
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import package_version
from pipelines.data import MANIFEST_NAME, SCHEMA_VERSION, DataError
from pipelines.data.sources import SPLITS, Source

NO_RENAME_FILESYSTEMS = {"s3", "gcs"}  # folders cannot be renamed atomically: manifest-last protocol
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("split", pa.string())])
SKIPPED_IN_MANIFEST = 20  # first N skipped files recorded by path


# --------------------------------------------------------------------------------------------- filesystem
def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a pyarrow filesystem URI."""
    s = str(path_or_uri)
    if "://" in s:
        try:
            fs, path = pafs.FileSystem.from_uri(s)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise DataError(f"cannot open {s}: {exc}; use a local path or a pyarrow URI (file://, s3://, gs://)") from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_manifest_hash(manifest: dict) -> str:
    content = {k: v for k, v in manifest.items() if k not in ("created_at", "manifest_hash")}
    if isinstance(content.get("source"), dict):
        content["source"] = {k: v for k, v in content["source"].items() if k != "location"}
    return hashlib.sha256(canonical_json(content)).hexdigest()


def read_manifest_file(fs: pafs.FileSystem, root: str) -> Optional[dict]:
    """The manifest at ``root``, or None if there is none (a folder without manifest counts as absent)."""
    path = join(root, MANIFEST_NAME)
    if not _exists(fs, path):
        return None
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run gan-pipeline prepare --force") from None


# --------------------------------------------------------------------------------------------- shards
def encode_table(images: np.ndarray, labels: np.ndarray, split: str) -> pa.Table:
    """N x (C*H*W) uint8 rows -> the shard table, without a Python object per row."""
    n, row = images.shape
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row).tobytes())
    image_col = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(np.ascontiguousarray(images))])
    return pa.Table.from_arrays(
        [image_col, pa.array(labels, type=pa.int64()), pa.array([split] * n, type=pa.string())], schema=SCHEMA
    )


def _write_shard(fs: pafs.FileSystem, path: str, table: pa.Table) -> tuple[str, int]:
    """Write one shard; returns (sha256, bytes). Deterministic bytes for the same table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=["split"], write_statistics=["label"],
                   row_group_size=len(table) or 1)
    data = sink.getvalue()
    with fs.open_output_stream(path) as f:
        f.write(data)
    return hashlib.sha256(memoryview(data)).hexdigest(), data.size


class _Progress:
    """A rich bar on a terminal, periodic lines otherwise (logs, CI)."""

    def __init__(self, console, every_s: float = 5.0):
        self.console, self.every_s = console, every_s
        self.bar = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
        self.task, self.split, self.done, self.total, self.last, self.t0 = None, "", 0, None, 0.0, time.perf_counter()

    def start(self, split: str, total: Optional[int]) -> None:
        self.split, self.done, self.total, self.last = split, 0, total, time.perf_counter()
        if self.bar is not None:
            self.task = self.bar.add_task(f"prepare {split}", total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n)
        elif time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            of = f"/{self.total}" if self.total else ""
            self.console.print(f"prepare {self.split}: {self.done}{of} images")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _class_key(label: int, class_names: list[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else "unlabeled"


def _write_split(source: Source, split: str, fs, root: str, shard_rows: int, progress: _Progress) -> tuple[list, dict]:
    c, r = source.channels, source.resolution
    row = c * r * r
    buf = np.empty((shard_rows, row), dtype=np.uint8)
    labels = np.empty(shard_rows, dtype=np.int64)
    shards, counts, fill = [], {}, 0

    def flush(n: int) -> None:
        name = f"{split}-{len(shards):05d}.parquet"
        sha, size = _write_shard(fs, join(root, name), encode_table(buf[:n], labels[:n], split))
        shards.append({"path": name, "split": split, "rows": n, "sha256": sha, "bytes": size})

    progress.start(split, source.count(split))
    for img, label in source.iter_split(split):
        if img.shape != (r, r, c):  # a source bug, not a user error
            raise DataError(f"{source.name}: image of shape {img.shape}, expected {(r, r, c)}")
        buf[fill] = img.transpose(2, 0, 1).reshape(-1)
        labels[fill] = label
        key = _class_key(label, source.class_names)
        counts[key] = counts.get(key, 0) + 1
        fill += 1
        if fill == shard_rows:
            flush(fill)
            fill = 0
            progress.advance(shard_rows)
    if fill:
        flush(fill)
        progress.advance(fill)
    return shards, counts


# --------------------------------------------------------------------------------------------- build
def build_settings(source: Source, data) -> dict:
    return {
        "dataset": source.name, "resolution": source.resolution, "channels": source.channels,
        "heldout_fraction": data.heldout_fraction if source.name == "imagefolder" else None,
        "shard_rows": data.shard_rows, "limit": getattr(data, "limit", None), "strict": data.strict,
    }


def build_key(source: Source, data) -> str:
    """Re-run key: same source checksums + same settings + same package/schema version -> same dataset."""
    return hashlib.sha256(canonical_json({
        "schema_version": SCHEMA_VERSION, "package_version": package_version(),
        "source": source.checksums(), "settings": build_settings(source, data),
    })).hexdigest()


def _shards_present(fs, root: str, manifest: dict) -> bool:
    """Every shard there, inside the dataset, with its recorded size and sha256 (cached by mtime)."""
    from pipelines.integrity import IntegrityError, verify_shards

    try:
        verify_shards(fs, root, manifest, root)
    except IntegrityError:
        return False
    return True


def write_dataset(source: Source, data, out: str, force: bool = False, console=None) -> tuple[dict, bool]:
    """Prepare ``source`` into ``out``. Returns ``(manifest, skipped)``; skipped = already there, nothing done."""
    if console is None:
        from rich.console import Console
        console = Console(stderr=True)
    from pipelines.safety import check_dataset_folder

    fs, final = resolve(out)
    if _exists(fs, final) and fs.get_file_info(final).type != pafs.FileType.Directory:
        raise DataError(f"output {out} exists and is not a folder; choose another --out")
    try:
        existing = read_manifest_file(fs, final)
    except DataError:
        existing = None  # unreadable: not provably gan-pipeline's, so check_dataset_folder refuses it
    entries = {i.base_name for i in fs.get_file_info(pafs.FileSelector(final, allow_not_found=True))}
    check_dataset_folder(entries, existing, f"output folder {out}")  # before anything is read, moved or deleted
    key = build_key(source, data)  # also verifies checksums (MNIST) before anything is written
    if existing is not None and not force and existing.get("build_key") == key and _shards_present(fs, final, existing):
        return existing, True

    rename = fs.type_name not in NO_RENAME_FILESYSTEMS
    parent, name = posixpath.dirname(final.rstrip("/")), posixpath.basename(final.rstrip("/"))
    if rename:
        if parent:
            fs.create_dir(parent, recursive=True)
        prefix = f".{name}.tmp-"
        for info in fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True)):
            # left by a killed earlier prepare of the same output: exactly the names this function makes
            if info.base_name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{6,32}", info.base_name[len(prefix):]):
                fs.delete_dir(info.path)
        work = posixpath.join(parent, f"{prefix}{uuid.uuid4().hex[:12]}")
        fs.create_dir(work, recursive=True)
    else:
        work = final
        if existing is not None:
            fs.delete_file(join(final, MANIFEST_NAME))  # absent from now until the new manifest lands
        fs.create_dir(final, recursive=True)
        fs.delete_dir_contents(final, missing_dir_ok=True)

    t0 = time.perf_counter()
    progress = _Progress(console)
    try:
        shards, class_counts, counts = [], {}, {}
        for split in SPLITS:
            split_shards, split_counts = _write_split(source, split, fs, work, data.shard_rows, progress)
            shards += split_shards
            class_counts[split] = split_counts
            counts[split] = sum(s["rows"] for s in split_shards)
        progress.stop()
        if counts["train"] == 0:
            raise DataError(f"{source.location}: no usable training images ({len(source.skipped)} skipped); "
                            f"check the source files")
        skipped = source.skipped
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": source.name,
            "source": {"description": source.description, "location": source.location,
                       "checksums": source.checksums()},
            "resolution": source.resolution,
            "channels": source.channels,
            "layout": "image: uint8 bytes, channel-first C x H x W; label int64 (-1 = none)",
            "class_names": list(source.class_names),
            "counts": counts,
            "class_counts": class_counts,
            "settings": build_settings(source, data),
            "conversions": source.conversions.as_dict(),
            "skipped": {"count": len(skipped),
                        "files": [{"path": p, "reason": r} for p, r in skipped[:SKIPPED_IN_MANIFEST]]},
            "notes": list(source.notes),
            "shards": shards,
            "build_key": key,
            "package_version": package_version(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["manifest_hash"] = compute_manifest_hash(manifest)
        with fs.open_output_stream(join(work, MANIFEST_NAME)) as f:  # last file written
            f.write(json.dumps(manifest, indent=2, sort_keys=False).encode())
        if rename:
            _publish(fs, work, final, parent, name)
    except BaseException:
        progress.stop()
        try:
            if rename:
                fs.delete_dir(work)
            else:
                fs.delete_dir_contents(final, missing_dir_ok=True)
        except Exception as cleanup_exc:  # pragma: no cover - report, keep the original error
            print(f"warning: could not remove {work}: {cleanup_exc}", file=sys.stderr)
        raise
    manifest["_elapsed_s"] = time.perf_counter() - t0  # not written; for the summary
    return manifest, False


def _publish(fs, work: str, final: str, parent: str, name: str) -> None:
    if _exists(fs, final):
        old = posixpath.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
        fs.move(final, old)
        try:
            fs.move(work, final)
        except BaseException:
            fs.move(old, final)  # put the previous dataset back
            raise
        fs.delete_dir(old)
    else:
        fs.move(work, final)


def dataset_bytes(manifest: dict) -> int:
    return sum(s.get("bytes", 0) for s in manifest.get("shards", []))


def summary_text(manifest: dict, path: str, skipped_run: bool) -> str:
    """One screen: what, where, counts, classes, size, conversions, skipped files."""
    m = manifest
    lines = []
    if skipped_run:
        lines.append(f"already prepared, nothing to do (same source checksums and settings); use --force to rebuild")
    lines += [
        f"dataset      {m['dataset']}  {m['resolution']}x{m['resolution']} px, {m['channels']} channel(s)",
        f"where        {path}",
        f"version      manifest_hash {m['manifest_hash'][:16]}...",
        f"source       {m['source']['description']} ({m['source'].get('location', '?')})",
        f"examples     train {m['counts']['train']:,}  heldout {m['counts']['heldout']:,}",
    ]
    names = m["class_names"]
    if names:
        tc = m["class_counts"]["train"]
        shown = ", ".join(f"{n}: {tc.get(n, 0):,}" for n in names[:12])
        more = f", ... ({len(names)} classes)" if len(names) > 12 else f"  ({len(names)} classes)"
        lines.append(f"classes      {shown}{more}")
        empty = [n for n in names if tc.get(n, 0) == 0]
        if empty:
            lines.append(f"WARNING      classes without training images: {', '.join(empty[:10])}")
    else:
        lines.append("classes      none (unlabeled, label -1)")
    lines.append(f"size         {dataset_bytes(m) / 1e6:.1f} MB in {len(m['shards'])} Parquet shards")
    conv = m.get("conversions", {})
    if conv.get("resized") or conv.get("cropped") or conv.get("mode_converted"):
        lines.append(f"converted    resized {conv['resized']:,}, centre-cropped {conv['cropped']:,}, "
                     f"mode-converted {conv['mode_converted']:,} (source modes {', '.join(conv['source_modes'])})")
    sk = m.get("skipped", {"count": 0, "files": []})
    if sk["count"]:
        lines.append(f"skipped      {sk['count']:,} file(s), e.g.:")
        lines += [f"               {f['path']}: {f['reason']}" for f in sk["files"][:5]]
    for note in m.get("notes", []):
        lines.append(f"note         {note}")
    if "_elapsed_s" in m:
        n = m["counts"]["train"] + m["counts"]["heldout"]
        lines.append(f"time         {m['_elapsed_s']:.1f} s ({n / max(m['_elapsed_s'], 1e-9):,.0f} images/s)")
    return "\n".join(lines)
