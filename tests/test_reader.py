"""The worker reader: partitions across ranks, per-epoch shuffles, resume, evaluation splits, damaged datasets."""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from pipelines.config import DataConfig
from pipelines.data import DataError
from pipelines.data.reader import TrainReader, load_manifest, load_split
from pipelines.prepare import prepare_dataset

N_TRAIN = 1000


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """The first 1000 MNIST examples of each split, in shards of 100 rows."""
    out = tmp_path_factory.mktemp("reader") / "mnist-small"
    res = prepare_dataset(DataConfig(limit=N_TRAIN, shard_rows=100), out=str(out),
                          console=Console(file=io.StringIO()))
    assert res.manifest["counts"]["train"] == N_TRAIN
    return res.path


@pytest.fixture
def copy(small, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small, dst)
    return dst


@pytest.mark.parametrize("world", [1, 2, 3])
def test_union_of_ranks_is_train_set_exactly_once(small, world):
    readers = [TrainReader(small, r, world, batch_size=7, seed=3, drop_last=False) for r in range(world)]
    for epoch in (0, 1):
        parts = [r.indices(epoch) for r in readers]
        union = np.concatenate(parts)
        assert len(union) == N_TRAIN and np.array_equal(np.sort(union), np.arange(N_TRAIN))
        # and the batches really carry those rows
        for r, idx in zip(readers, parts):
            got = torch.cat([x for x, _ in r.epoch(epoch)]).numpy()
            labels = torch.cat([y for _, y in r.epoch(epoch)]).numpy()
            np.testing.assert_array_equal(got, r.images[idx])
            np.testing.assert_array_equal(labels, r.labels[idx])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_equal_full_batches_disjoint(small, world):
    readers = [TrainReader(small, r, world, batch_size=64, seed=0) for r in range(world)]
    steps = {r.steps_per_epoch for r in readers}
    assert steps == {(N_TRAIN // world) // 64}
    for r in readers:
        batches = list(r.epoch(5))
        assert len(batches) == r.steps_per_epoch == len(r)
        assert all(x.shape == (64, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
                   for x, y in batches)
    union = np.concatenate([r.indices(5) for r in readers])
    assert len(np.unique(union)) == len(union)  # disjoint across ranks


def test_shuffle_differs_per_epoch_and_seed_reproducible(small):
    a = TrainReader(small, 0, 2, batch_size=10, seed=1)
    b = TrainReader(small, 0, 2, batch_size=10, seed=1)
    c = TrainReader(small, 0, 2, batch_size=10, seed=2)
    assert not np.array_equal(a.indices(0), a.indices(1))
    assert set(a.indices(0)) != set(a.indices(1))  # the rank's part changes too (global permutation)
    assert np.array_equal(a.indices(3), b.indices(3))
    assert not np.array_equal(a.indices(3), c.indices(3))


def test_resume_mid_epoch(small):
    r = TrainReader(small, 1, 2, batch_size=16, seed=0)
    full = list(r.epoch(2))
    resumed = list(r.epoch(2, start_batch=5))
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(resumed, full[5:]))
    assert r.position(r.steps_per_epoch * 2 + 5) == (2, 5)
    with pytest.raises(DataError, match="start_batch"):
        next(r.epoch(0, start_batch=r.steps_per_epoch + 1))


def test_metadata_and_bad_arguments(small):
    r = TrainReader(small, 0, 1, batch_size=8, seed=0)
    assert (r.resolution, r.channels, r.class_names[:2]) == (28, 1, ["0", "1"])
    assert r.manifest_hash == load_manifest(small)["manifest_hash"]
    with pytest.raises(DataError, match="rank 2 is outside"):
        TrainReader(small, 2, 2, batch_size=8, seed=0)
    with pytest.raises(DataError, match="too few for one batch"):
        TrainReader(small, 0, 4, batch_size=300, seed=0)


def test_load_split(small):
    x, y = load_split(small)
    assert x.shape == (N_TRAIN, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the t10k file's first labels
    sub, suby = load_split(small, "heldout", limit=50, seed=4)
    again, _ = load_split(small, "heldout", limit=50, seed=4)
    assert sub.shape[0] == 50 and np.array_equal(sub, again)
    assert not np.array_equal(load_split(small, "heldout", limit=50, seed=5)[0], sub)
    tx, _ = load_split(small, "train")
    assert tx.shape[0] == N_TRAIN
    with pytest.raises(DataError, match="split must be"):
        load_split(small, "test")


def test_file_uri(small):
    x, _ = load_split(Path(small).as_uri(), limit=3)
    assert x.shape == (3, 1, 28, 28)


def test_verify_detects_modified_shard(copy):
    load_manifest(str(copy), verify=True)
    shard = copy / "train-00003.parquet"
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = (labels[0] + 1) % 10
    pq.write_table(table.set_column(1, "label", pa.array(labels)), shard)  # valid Parquet, other content
    # found at the next use, not only with verify=True: sizes and hashes are checked (hashes cached by mtime)
    with pytest.raises(DataError, match=r"shard train-00003.parquet (size|hash) mismatch.*prepare --force"):
        load_manifest(str(copy))
    with pytest.raises(DataError, match=r"shard train-00003.parquet (size|hash) mismatch.*prepare --force"):
        load_manifest(str(copy), verify=True)


def _rerecord(copy, name: str) -> None:
    """Make the manifest vouch for a damaged shard (as if it had been written so), to reach the reader's checks."""
    import hashlib
    import json

    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["path"] == name:
            data = (copy / name).read_bytes()
            shard["sha256"], shard["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_parquet_named(copy):
    shard = copy / "train-00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _rerecord(copy, shard.name)
    with pytest.raises(DataError, match=r"train-00002.parquet is not readable Parquet.*prepare --force"):
        TrainReader(str(copy), 0, 1, batch_size=8, seed=0)


def test_foreign_parquet_named(copy):
    pq.write_table(pa.table({"a": [1] * 100, "b": ["x"] * 100}), copy / "heldout-00004.parquet")
    _rerecord(copy, "heldout-00004.parquet")
    with pytest.raises(DataError, match=r"heldout-00004.parquet is foreign Parquet"):
        load_split(str(copy))


def test_wrong_row_count_and_missing_shard(copy):
    pq.write_table(pq.read_table(copy / "train-00001.parquet").slice(0, 50), copy / "train-00001.parquet")
    _rerecord(copy, "train-00001.parquet")
    with pytest.raises(DataError, match=r"train-00001.parquet holds 50 rows, the manifest says 100"):
        load_split(str(copy), "train")
    (copy / "train-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"train-00001.parquet is missing"):
        load_split(str(copy), "train")


def test_no_manifest_is_absent(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="no prepared dataset.*gan-pipeline prepare"):
        TrainReader(str(copy), 0, 1, batch_size=8, seed=0)


def test_reader_is_fast(small):
    r = TrainReader(small, 0, 1, batch_size=64, seed=0)
    list(r.epoch(0))
    t = time.perf_counter()
    n = sum(len(x) for e in range(1, 6) for x, _ in r.epoch(e))
    rate = n / (time.perf_counter() - t)
    assert rate > 50_000, f"{rate:.0f} images/s"  # a DCGAN step consumes < 1,000 images/s here
