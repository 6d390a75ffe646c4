"""Reading prepared datasets back: training workers (``TrainReader``) and evaluation (``load_split``).

Plain pyarrow + numpy + torch; no Ray inside, so a Ray Train worker just builds a ``TrainReader`` with its
rank and world size.

Memory: ``TrainReader`` holds the whole train split in RAM as uint8 (N x C x H x W) in every worker: the
per-epoch global permutation it partitions can hand any example to any rank. That is 47 MB for MNIST, 154 MB for
CIFAR-10, 12 KB per image for 64 px RGB folders (1.2 GB per worker for 100k images). Batches are fancy-indexed
copies of that array, so reading costs microseconds per batch.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data import MANIFEST_NAME, DataError
from pipelines.data.store import join, read_manifest_file, resolve

_REQUIRED = ("shards", "resolution", "channels", "counts", "class_names")


def load_manifest(path_or_uri: str, verify: bool = False) -> dict:
    """The dataset's manifest, its shards checked (``pipelines.integrity.verify_shards``: inside the dataset, size
    and sha256, hashes cached by mtime). ``verify=True`` recomputes every sha256, cache or not."""
    fs, root = resolve(path_or_uri)
    manifest = read_manifest_file(fs, root)
    if manifest is None:
        raise DataError(
            f"no prepared dataset at {path_or_uri} ({MANIFEST_NAME} is missing: never prepared, or a prepare was "
            f"interrupted); run gan-pipeline prepare (with --out {path_or_uri} if it is not the default)"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"{join(root, MANIFEST_NAME)} lacks {', '.join(missing)}; not a gan-pipeline manifest - "
                        f"re-run gan-pipeline prepare --force")
    from pipelines.integrity import verify_shards

    verify_shards(fs, root, manifest, str(path_or_uri), full=verify)
    return manifest


def _read_shard_into(fs: pafs.FileSystem, root: str, shard: dict, row_bytes: int,
                     images_out: np.ndarray, labels_out: np.ndarray) -> None:
    path = join(root, shard["path"])
    fix = "re-run gan-pipeline prepare --force"
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {fix}") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"shard {path} is not readable Parquet (truncated or corrupt: {exc}); {fix}") from None
    schema = table.schema
    ok = ("image" in schema.names and "label" in schema.names
          and schema.field("image").type in (pa.binary(), pa.large_binary())
          and pa.types.is_integer(schema.field("label").type))
    if not ok:
        raise DataError(f"shard {path} is foreign Parquet: columns {dict(zip(schema.names, map(str, schema.types)))}, "
                        f"expected image (binary), label (int64), split (string); {fix}")
    n = table.num_rows
    if n != shard["rows"] or n != len(images_out):
        raise DataError(f"shard {path} holds {n} rows, the manifest says {shard['rows']}; {fix}")
    col = table.column("image").combine_chunks()
    if col.null_count:
        raise DataError(f"shard {path} has {col.null_count} null images; {fix}")
    offset_type = np.int64 if col.type == pa.large_binary() else np.int32
    offsets = np.frombuffer(col.buffers()[1], dtype=offset_type, count=n + 1, offset=col.offset * offset_type().itemsize)
    if n and not np.all(np.diff(offsets) == row_bytes):
        raise DataError(f"shard {path}: image sizes differ from {row_bytes} bytes (C x H x W of the manifest); {fix}")
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)
    if n:
        images_out[:] = data[offsets[0]:offsets[-1]].reshape(n, row_bytes)
    labels_out[:] = table.column("label").to_numpy()


def _load(path_or_uri: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    if split not in ("train", "heldout"):
        raise DataError(f"split must be 'train' or 'heldout', got {split!r}")
    manifest = load_manifest(path_or_uri)
    fs, root = resolve(path_or_uri)
    c, r = int(manifest["channels"]), int(manifest["resolution"])
    shards = [s for s in manifest["shards"] if s["split"] == split]
    n = sum(s["rows"] for s in shards)
    images = np.empty((n, c * r * r), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    at = 0
    for s in shards:
        _read_shard_into(fs, root, s, c * r * r, images[at:at + s["rows"]], labels[at:at + s["rows"]])
        at += s["rows"]
    return images.reshape(n, c, r, r), labels, manifest


def load_split(path_or_uri: str, split: str = "heldout", limit: Optional[int] = None,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x C x H x W, labels int64 N)``; ``limit`` takes a seeded random subset (in file order)."""
    images, labels, _ = _load(path_or_uri, split)
    if limit is not None and limit < len(labels):
        idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
        return images[idx], labels[idx]
    return images, labels


class TrainReader:
    """Per-rank batches of the train split for data-parallel training.

    Epoch ``e`` draws one global permutation from ``(seed, e)``; rank ``r`` takes positions ``r, r+W, r+2W, ...``
    of it, so the ranks' parts are disjoint and together cover every example once. With ``drop_last`` (the
    default, what DDP needs) the permutation is cut to a multiple of ``world_size`` and each rank's part to a
    multiple of ``batch_size``: every rank runs exactly ``steps_per_epoch`` full batches (a different few
    examples are left out each epoch). Without it, all examples are delivered and the last batch may be short
    (rank step counts may then differ by one: use it on one rank or for evaluation).

    Resume mid-epoch with ``epoch(e, start_batch=k)`` (or ``position(step)`` to turn a global step count into
    ``(epoch, batch)``). The whole train split is held in RAM (see the module docstring).
    """

    def __init__(self, path_or_uri: str, rank: int, world_size: int, batch_size: int, seed: int,
                 drop_last: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels, self.manifest = _load(path_or_uri, "train")
        self.path, self.rank, self.world_size = str(path_or_uri), rank, world_size
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_examples = n = len(self.labels)
        if drop_last:
            self.per_rank = n // world_size
            self.steps_per_epoch = self.per_rank // batch_size
            if self.steps_per_epoch == 0:
                raise DataError(
                    f"the train split has {n} examples: too few for one batch of {batch_size} on each of "
                    f"{world_size} worker(s); lower train.batch_size or train.workers, or prepare more data"
                )
        else:
            self.per_rank = len(range(rank, n, world_size))
            self.steps_per_epoch = -(-self.per_rank // batch_size)

    # metadata the trainer needs
    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def manifest_hash(self) -> str:
        return self.manifest["manifest_hash"]

    def position(self, step: int) -> tuple[int, int]:
        """Global step count (batches already consumed) -> ``(epoch, start_batch)`` to resume from."""
        return divmod(int(step), self.steps_per_epoch)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's example indices for ``epoch``, in delivery order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        if self.drop_last:
            mine = perm[: self.per_rank * self.world_size][self.rank::self.world_size]
            return mine[: self.steps_per_epoch * self.batch_size]
        return perm[self.rank::self.world_size]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        """Batches ``(images uint8 B x C x H x W, labels int64 B)`` of ``epoch``, from ``start_batch`` on."""
        import torch

        if not 0 <= start_batch <= self.steps_per_epoch:
            raise DataError(f"start_batch {start_batch} outside 0..{self.steps_per_epoch}")
        idx = self.indices(epoch)
        b = self.batch_size
        for k in range(start_batch, self.steps_per_epoch):
            sel = idx[k * b:(k + 1) * b]
            yield torch.from_numpy(self.images[sel]), torch.from_numpy(self.labels[sel])

    def __len__(self) -> int:
        return self.steps_per_epoch
