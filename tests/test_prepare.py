"""The prepare stage: sources -> Parquet shards + manifest, on real files (bundled MNIST, Debian Fashion-MNIST,
CIFAR-10 python batches written here, image folders written here)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from pipelines.config import DataConfig
from pipelines.data import DataError, store
from pipelines.data.sources import BUNDLED_MNIST, FASHION_CLASSES, MNIST_MD5, _split_of
from pipelines.prepare import default_output, prepare_dataset

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def prep(tmp_path, name="out", **data):
    console = quiet()
    res = prepare_dataset(DataConfig(**data), out=str(tmp_path / name), console=console)
    return res, console.file.getvalue()


def raw_idx(name: str) -> np.ndarray:
    data = gzip.decompress((BUNDLED_MNIST / f"{name}.gz").read_bytes())
    header = 16 if "images" in name else 8
    return np.frombuffer(data, np.uint8, offset=header)


# ------------------------------------------------------------------------------------------------ full MNIST
@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "mnist-28px-1ch"
    console = quiet()
    res = prepare_dataset(DataConfig(), out=str(out), console=console)
    return res, console.file.getvalue()


def test_mnist_bundled_native(mnist):
    res, text = mnist
    m = res.manifest
    assert not res.skipped
    assert (m["resolution"], m["channels"]) == (28, 1)
    assert m["counts"] == {"train": 60000, "heldout": 10000}
    assert m["class_names"] == [str(i) for i in range(10)]
    for split in ("train", "heldout"):
        assert sum(m["class_counts"][split].values()) == m["counts"][split]
        assert sum(s["rows"] for s in m["shards"] if s["split"] == split) == m["counts"][split]
    assert m["class_counts"]["train"]["1"] == 6742 and m["class_counts"]["heldout"]["5"] == 892
    assert all(s["rows"] <= 10_000 for s in m["shards"])
    assert [s["path"] for s in m["shards"]][:2] == ["train-00000.parquet", "train-00001.parquet"]
    assert m["shards"][-1]["path"] == "heldout-00000.parquet"
    assert set(m["source"]["checksums"]["files"]) == {f"{n}.gz" for n in MNIST_MD5}
    assert all(f["md5_uncompressed"] == MNIST_MD5[n[:-3]] for n, f in m["source"]["checksums"]["files"].items())
    assert "60,000" in text and "manifest_hash" in text and "MB" in text


def test_mnist_shard_content_is_chw_uint8(mnist):
    res, _ = mnist
    table = pq.read_table(Path(res.path) / "train-00000.parquet")
    assert table.schema.names == ["image", "label", "split"]
    assert str(table.schema.field("label").type) == "int64"
    first = np.frombuffer(table.column("image")[0].as_py(), np.uint8)
    assert first.size == 784
    np.testing.assert_array_equal(first, raw_idx("train-images-idx3-ubyte")[:784])
    assert table.column("label")[0].as_py() == int(raw_idx("train-labels-idx1-ubyte")[0]) == 5
    assert set(table.column("split").to_pylist()) == {"train"}


def test_manifest_hash_definition_and_file(mnist):
    res, _ = mnist
    on_disk = json.loads((Path(res.path) / "manifest.json").read_text())
    assert on_disk["manifest_hash"] == res.manifest_hash == store.compute_manifest_hash(on_disk)
    changed = dict(on_disk, created_at="1999-01-01T00:00:00+00:00")
    assert store.compute_manifest_hash(changed) == res.manifest_hash  # created_at excluded
    changed["counts"] = {"train": 1, "heldout": 0}
    assert store.compute_manifest_hash(changed) != res.manifest_hash
    for s in on_disk["shards"]:
        assert hashlib.sha256((Path(res.path) / s["path"]).read_bytes()).hexdigest() == s["sha256"]


def test_rerun_is_noop_then_force_rebuilds_same_hash(mnist):
    res, _ = mnist
    manifest_file = Path(res.path) / "manifest.json"
    before = manifest_file.stat().st_mtime_ns
    console = quiet()
    again = prepare_dataset(DataConfig(), out=res.path, console=console)
    assert again.skipped and again.manifest_hash == res.manifest_hash
    assert "nothing to do" in console.file.getvalue()
    assert manifest_file.stat().st_mtime_ns == before
    rebuilt = prepare_dataset(DataConfig(), out=res.path, force=True, console=quiet())
    assert not rebuilt.skipped
    assert manifest_file.stat().st_mtime_ns != before
    assert rebuilt.manifest_hash == res.manifest_hash  # deterministic shards -> same dataset version
    assert not [p for p in Path(res.path).parent.iterdir() if p.name.startswith(".")]


def test_changed_settings_rebuild(tmp_path):
    a, _ = prep(tmp_path, limit=300, shard_rows=100)
    b, _ = prep(tmp_path, limit=300, shard_rows=150)
    assert not b.skipped and a.manifest_hash != b.manifest_hash
    assert [s["rows"] for s in b.manifest["shards"]] == [150, 150, 150, 150]


def test_errors_are_user_errors_and_stage_entry(tmp_path):
    from pipelines.config import PipelineConfig
    from pipelines.errors import UserError
    from pipelines.prepare import prepare_stage

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)  # CLI prints them cleanly
    cfg = PipelineConfig(data=DataConfig(limit=100), runs_dir=str(tmp_path / "runs"))
    res = prepare_stage(cfg, console=quiet())
    assert res.path == str(tmp_path / "runs" / "data" / "mnist-28px-1ch-first100")
    assert (Path(res.path) / "manifest.json").is_file()


def test_default_output_names():
    assert default_output(DataConfig()) == "gan-runs/data/mnist-28px-1ch"
    assert default_output(DataConfig(dataset="cifar10", channels=1, limit=5), "r") == "r/data/cifar10-32px-1ch-first5"
    assert default_output(DataConfig(path="s3://b/x")) == "s3://b/x"


def test_resize_and_channels_from_mnist(tmp_path):
    res, text = prep(tmp_path, limit=120, resolution=32, channels=3)
    m = res.manifest
    assert (m["resolution"], m["channels"]) == (32, 3) and m["counts"] == {"train": 120, "heldout": 120}
    assert m["conversions"]["resized"] == 240 and "converted" in text
    img = np.frombuffer(pq.read_table(tmp_path / "out" / "train-00000.parquet").column("image")[0].as_py(), np.uint8)
    img = img.reshape(3, 32, 32)
    np.testing.assert_array_equal(img[0], img[1])  # grey replicated into RGB
    assert img.max() > 200


# ------------------------------------------------------------------------------------------------ atomicity
def _count_calls_then_fail(monkeypatch, fail_after=1):
    """Make the shard writer raise after ``fail_after`` real shards; ``calls["armed"] = False`` disarms it."""
    real, calls = store._write_shard, {"written": [], "armed": True}

    def flaky(*args, **kwargs):
        if calls["armed"] and len(calls["written"]) >= fail_after:
            raise RuntimeError("simulated crash while writing a shard")
        calls["written"].append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_write_shard", flaky)
    return calls


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = _count_calls_then_fail(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep(tmp_path, limit=300, shard_rows=100)
    assert len(calls["written"]) == 1  # one shard was really written before the crash
    assert list(tmp_path.iterdir()) == []  # no output dir, no temp dir


def test_crash_during_force_keeps_previous_dataset(tmp_path, monkeypatch):
    first, _ = prep(tmp_path, limit=300, shard_rows=100)
    _count_calls_then_fail(monkeypatch)
    with pytest.raises(RuntimeError):
        prepare_dataset(DataConfig(limit=300, shard_rows=100), out=str(tmp_path / "out"), force=True, console=quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    from pipelines.data.reader import load_manifest
    assert load_manifest(str(tmp_path / "out"), verify=True)["manifest_hash"] == first.manifest_hash


def test_stale_temp_dir_removed(tmp_path):
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / "train-00000.parquet").write_bytes(b"half")
    prep(tmp_path, limit=200, shard_rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_object_store_protocol_manifest_last(tmp_path, monkeypatch):
    """Where folders cannot be renamed: shards in place, manifest last; a crash leaves a dir without manifest,
    which readers treat as absent, and the next prepare rebuilds it."""
    monkeypatch.setattr(store, "NO_RENAME_FILESYSTEMS", {"local"})
    calls = _count_calls_then_fail(monkeypatch)
    with pytest.raises(RuntimeError):
        prep(tmp_path, limit=300, shard_rows=100)
    from pipelines.data.reader import load_manifest
    with pytest.raises(DataError, match="no prepared dataset"):
        load_manifest(str(tmp_path / "out"))
    calls["armed"] = False
    res, _ = prep(tmp_path, limit=300, shard_rows=100)
    assert res.manifest["counts"]["train"] == 300
    assert load_manifest(str(tmp_path / "out"), verify=True)["manifest_hash"] == res.manifest_hash


def test_file_uri_output(tmp_path):
    uri = (tmp_path / "viauri").as_uri()
    res = prepare_dataset(DataConfig(limit=150, shard_rows=100), out=uri, console=quiet())
    assert res.path == uri and (tmp_path / "viauri" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["viauri"]
    assert prepare_dataset(DataConfig(limit=150, shard_rows=100), out=uri, console=quiet()).skipped


# ------------------------------------------------------------------------------------------------ IDX errors
def write_idx_set(folder: Path, n_train=30, n_test=10, labels_train=None, gz=True, magic_images=2051):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def put(name, magic, arr):
        dims = arr.shape
        data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + arr.astype(np.uint8).tobytes()
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)

    put("train-images-idx3-ubyte", magic_images, rng.integers(0, 256, (n_train, 28, 28)))
    put("train-labels-idx1-ubyte", 2049, rng.integers(0, 10, labels_train if labels_train is not None else n_train))
    put("t10k-images-idx3-ubyte", 2051, rng.integers(0, 256, (n_test, 28, 28)))
    put("t10k-labels-idx1-ubyte", 2049, rng.integers(0, 10, n_test))
    return folder


def test_missing_source_dir(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*bundled copy"):
        prep(tmp_path, source=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        prep(tmp_path, dataset="imagefolder", source=str(tmp_path / "nope"))


def test_missing_files_named(tmp_path):
    src = write_idx_set(tmp_path / "src")
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        prep(tmp_path, dataset="fashion-mnist", source=str(src))


def test_wrong_idx_magic(tmp_path):
    src = write_idx_set(tmp_path / "src", magic_images=2049 + 0x100)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: IDX magic number 2305, expected 2051"):
        prep(tmp_path, dataset="fashion-mnist", source=str(src))
    assert not (tmp_path / "out").exists()


def test_image_label_count_mismatch(tmp_path):
    src = write_idx_set(tmp_path / "src", n_train=30, labels_train=29)
    with pytest.raises(DataError, match=r"30 images but .*train-labels.* 29 labels"):
        prep(tmp_path, dataset="fashion-mnist", source=str(src))


def test_truncated_idx(tmp_path):
    src = write_idx_set(tmp_path / "src", gz=False)
    p = src / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        prep(tmp_path, dataset="fashion-mnist", source=str(src))


def test_idx_raw_files_fashion_synthetic(tmp_path):
    src = write_idx_set(tmp_path / "src", gz=False)
    res, text = prep(tmp_path, dataset="fashion-mnist", source=str(src), shard_rows=100)
    assert res.manifest["counts"] == {"train": 30, "heldout": 10}
    assert res.manifest["class_names"] == FASHION_CLASSES
    assert "differ from the published" in text  # synthetic files are not the originals: said, not fatal


def test_mnist_md5_mismatch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in MNIST_MD5:
        shutil.copy(BUNDLED_MNIST / f"{n}.gz", src)
    labels = bytearray(gzip.decompress((src / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] ^= 0x01
    (src / "train-labels-idx1-ubyte.gz").unlink()
    (src / "train-labels-idx1-ubyte").write_bytes(bytes(labels))  # raw form accepted, and checked too
    actual = hashlib.md5(bytes(labels)).hexdigest()
    with pytest.raises(DataError) as err:
        prep(tmp_path, source=str(src))
    msg = str(err.value)
    assert "train-labels-idx1-ubyte" in msg and MNIST_MD5["train-labels-idx1-ubyte"] in msg and actual in msg
    assert "restore" in msg
    assert not (tmp_path / "out").exists()


def test_mnist_source_dir_raw_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in MNIST_MD5:
        (src / n).write_bytes(gzip.decompress((BUNDLED_MNIST / f"{n}.gz").read_bytes()))
    res, _ = prep(tmp_path, source=str(src), limit=100)
    assert res.manifest["counts"] == {"train": 100, "heldout": 100}
    assert res.manifest["source"]["location"] == str(src)


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_from_debian(tmp_path):
    res, text = prep(tmp_path, dataset="fashion-mnist", source=str(FASHION_DIR), limit=500, shard_rows=200)
    m = res.manifest
    assert m["counts"] == {"train": 500, "heldout": 500} and (m["resolution"], m["channels"]) == (28, 1)
    assert m["class_names"] == FASHION_CLASSES
    assert m["source"]["checksums"]["canonical"] is True and "match the published" in text
    table = pq.read_table(tmp_path / "out" / "train-00000.parquet")
    raw = gzip.decompress((FASHION_DIR / "train-images-idx3-ubyte.gz").read_bytes())
    assert table.column("image")[0].as_py() == raw[16:16 + 784]
    assert [s["rows"] for s in m["shards"]] == [200, 200, 100, 200, 200, 100]


# ------------------------------------------------------------------------------------------------ CIFAR-10
def write_cifar(folder: Path, per_batch=4, n_test=3) -> Path:
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        batch = {"batch_label": f"batch {i}", "labels": [int(x) for x in rng.integers(0, 10, n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}_{k}.png" for k in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_cifar10_tiny_batches(tmp_path):
    src = write_cifar(tmp_path / "src")
    res, text = prep(tmp_path, dataset="cifar10", source=str(src), shard_rows=100)
    m = res.manifest
    assert m["counts"] == {"train": 20, "heldout": 3}
    assert (m["resolution"], m["channels"]) == (32, 3) and m["class_names"][0] == "airplane"
    assert "differ from the published CIFAR-10" in text
    first = pickle.loads((src / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    table = pq.read_table(tmp_path / "out" / "train-00000.parquet")
    assert table.column("image")[0].as_py() == first["data"][0].tobytes()  # CIFAR rows are already C x H x W
    assert table.column("label").to_pylist()[:4] == first["labels"]
    # grey 28 px from CIFAR
    res2, _ = prep(tmp_path, "grey", dataset="cifar10", source=str(src / "cifar-10-batches-py"),
                   resolution=28, channels=1, limit=5)
    assert (res2.manifest["channels"], res2.manifest["counts"]["train"]) == (1, 5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/should-not-exist-gan-pipeline",))


def test_cifar10_refuses_foreign_pickle(tmp_path):
    src = write_cifar(tmp_path / "src")
    (src / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: refused to unpickle (posix|os)\.system"):
        prep(tmp_path, dataset="cifar10", source=str(src))
    assert not Path("/tmp/should-not-exist-gan-pipeline").exists()
    assert not (tmp_path / "out").exists()


def test_cifar10_missing_batches(tmp_path):
    src = write_cifar(tmp_path / "src")
    (src / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        prep(tmp_path, dataset="cifar10", source=str(src))


# ------------------------------------------------------------------------------------------------ image folders
def save(path: Path, size=(40, 30), mode="RGB", fmt=None, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}.get(mode, 3)
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8) if value is None else \
        np.full((size[1], size[0], channels), value, np.uint8)
    im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode="L" if channels == 1 else
                         ("RGBA" if channels == 4 else "RGB"))
    if mode == "P":
        im = im.convert("P")
    im.save(path, format=fmt)
    return path


def test_imagefolder_mixed_sizes_and_modes(tmp_path):
    src = tmp_path / "src"
    save(src / "cat" / "a.png", (40, 30), "RGB")
    save(src / "cat" / "b.jpg", (64, 64), "L")
    save(src / "cat" / "nested" / "c.PNG", (20, 50), "RGBA")
    save(src / "dog" / "d.png", (32, 32), "P")
    save(src / "dog" / "e.jpeg", (100, 80), "RGB")
    save(src / "dog" / "f.png", (32, 32), "RGB", value=7)
    res, text = prep(tmp_path, dataset="imagefolder", source=str(src), resolution=32, heldout_fraction=0.01)
    m = res.manifest
    assert m["class_names"] == ["cat", "dog"] and (m["resolution"], m["channels"]) == (32, 3)
    total = m["counts"]["train"] + m["counts"]["heldout"]
    assert total == 6 and m["skipped"]["count"] == 0
    assert sum(m["class_counts"]["train"].values()) + sum(m["class_counts"]["heldout"].values()) == 6
    conv = m["conversions"]
    assert conv["cropped"] == 3 and conv["mode_converted"] == 3 and conv["resized"] == 4
    assert "converted" in text and "centre-cropped 3" in text
    from pipelines.data.reader import load_split
    imgs, labels = load_split(res.path, "train")
    assert imgs.shape[1:] == (3, 32, 32)
    # f.png (uniform 7, already 32x32 RGB) passes through untouched
    assert any((im == 7).all() for im in imgs) or any((im == 7).all() for im in load_split(res.path)[0])


def test_imagefolder_native_default_64_rgb_and_flat_unlabeled(tmp_path):
    src = tmp_path / "flat"
    for i in range(8):
        save(src / f"img{i}.png", (70, 70), "L")
    res, text = prep(tmp_path, dataset="imagefolder", source=str(src), heldout_fraction=0.2)
    m = res.manifest
    assert (m["resolution"], m["channels"]) == (64, 3) and m["class_names"] == []
    expected_heldout = sum(_split_of(f"img{i}.png", 0.2) == "heldout" for i in range(8))
    assert m["counts"]["heldout"] == expected_heldout and m["counts"]["train"] == 8 - expected_heldout
    labels = pq.read_table(tmp_path / "out" / "train-00000.parquet").column("label").to_pylist()
    assert set(labels) == {-1} and "unlabeled" in text


def test_imagefolder_corrupt_skipped_or_strict(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        save(src / "a" / f"ok{i}.png", (16, 16))
    (src / "a" / "garbage.png").write_bytes(b"not a png at all")
    good = save(tmp_path / "tmp.jpg", (64, 64), fmt="JPEG").read_bytes()
    (src / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "a" / "notes.txt").write_text("hello")
    res, text = prep(tmp_path, dataset="imagefolder", source=str(src), heldout_fraction=0.01, resolution=32)
    m = res.manifest
    assert m["counts"]["train"] + m["counts"]["heldout"] == 4
    assert m["skipped"]["count"] == 3
    reasons = {f["path"]: f["reason"] for f in m["skipped"]["files"]}
    assert set(reasons) == {"a/garbage.png", "a/truncated.jpg", "a/notes.txt"}
    assert "skipped      3 file(s)" in text and "a/garbage.png" in text
    with pytest.raises(DataError, match=r"(garbage\.png|notes\.txt|truncated\.jpg).*strict"):
        prep(tmp_path, "strict", dataset="imagefolder", source=str(src), strict=True)
    assert not (tmp_path / "strict").exists()


def test_imagefolder_decompression_bomb_refused(tmp_path):
    src = tmp_path / "src"
    save(src / "ok.png", (16, 16))
    Image.new("1", (8000, 8000)).save(src / "bomb.png")  # 64 Mpx declared, a few KB on disk
    assert (src / "bomb.png").stat().st_size < 100_000
    res, _ = prep(tmp_path, dataset="imagefolder", source=str(src), heldout_fraction=0.01)
    skipped = res.manifest["skipped"]
    assert skipped["count"] == 1 and skipped["files"][0]["path"] == "bomb.png"
    assert "decompression bomb" in skipped["files"][0]["reason"]


def test_imagefolder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG images found"):
        prep(tmp_path, dataset="imagefolder", source=str(tmp_path / "empty"))
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no PNG/JPEG images found"):
        prep(tmp_path, dataset="imagefolder", source=str(tmp_path / "empty"))


def test_imagefolder_symlinks_not_followed(tmp_path):
    outside = tmp_path / "outside"
    save(outside / "secret.png", (16, 16))
    save(outside / "dir" / "s2.png", (16, 16))
    src = tmp_path / "src"
    for i in range(3):
        save(src / "cls" / f"ok{i}.png", (16, 16))
    os.symlink(outside / "secret.png", src / "cls" / "link.png")
    os.symlink(outside / "dir", src / "cls" / "linkdir")
    os.symlink(outside, src / "evil")  # a 'class folder' that is a symlink outside
    res, _ = prep(tmp_path, dataset="imagefolder", source=str(src), heldout_fraction=0.01)
    m = res.manifest
    assert m["class_names"] == ["cls"]
    assert m["counts"]["train"] + m["counts"]["heldout"] == 3
    reasons = {f["path"]: f["reason"] for f in m["skipped"]["files"]}
    assert reasons == {"evil": "symlink not followed", "cls/link.png": "symlink not followed",
                       "cls/linkdir": "symlink not followed"}


def test_imagefolder_limit_and_heldout_deterministic(tmp_path):
    src = tmp_path / "src"
    for i in range(40):
        save(src / ("x" if i % 2 else "y") / f"{i:03d}.png", (8, 8), "L")
    a, _ = prep(tmp_path, "a", dataset="imagefolder", source=str(src), heldout_fraction=0.25, channels=1,
                resolution=28)
    b, _ = prep(tmp_path, "b", dataset="imagefolder", source=str(src), heldout_fraction=0.25, channels=1,
                resolution=28)
    assert a.manifest_hash == b.manifest_hash  # location is not part of the dataset version
    assert 0 < a.manifest["counts"]["heldout"] < 40
    c, _ = prep(tmp_path, "c", dataset="imagefolder", source=str(src), heldout_fraction=0.25, limit=5)
    assert c.manifest["counts"] == {"train": 5, "heldout": min(5, a.manifest["counts"]["heldout"])}
