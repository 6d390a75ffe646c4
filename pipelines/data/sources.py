"""Dataset sources: the original files -> a stream of ``(image uint8 HxWxC, label int)`` per split.

Every source is built for a target ``resolution`` and ``channels`` and yields images already conformed to them
(centre-crop to square, PIL bilinear resize with antialiasing, mode -> ``L`` or ``RGB``); what it had to convert is
counted in ``source.conversions`` for the summary. Splits are ``"train"`` and ``"heldout"`` (MNIST/Fashion t10k,
CIFAR ``test_batch``, a hash-of-relative-path split for image folders).

Nothing here needs the network except ``download=True`` (torchvision's own download and integrity code).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from pipelines.data import DataError

SPLITS = ("train", "heldout")
NATIVE = {  # dataset -> (resolution, channels)
    "mnist": (28, 1),
    "fashion-mnist": (28, 1),
    "cifar10": (32, 3),
    "imagefolder": (64, 3),
}

# Decompression bombs: refuse images whose *declared* size is above this many pixels (checked before decoding);
# Pillow's own guard is tightened to the same figure (it raises DecompressionBombError above 2x, warns above 1x,
# and we turn the warning into a per-file refusal).
MAX_IMAGE_PIXELS = 40_000_000
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

BUNDLED_MNIST = Path(__file__).resolve().parent / "mnist"
DEFAULT_CACHE = Path(os.environ.get("GAN_PIPELINE_CACHE", Path.home() / ".cache" / "gan-pipeline"))

IDX_FILES = {  # role -> canonical base name (without .gz)
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("heldout", "images"): "t10k-images-idx3-ubyte",
    ("heldout", "labels"): "t10k-labels-idx1-ubyte",
}
# MD5 of the *uncompressed* files (the canonical sums; see pipelines/data/mnist/README.md).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Fashion-MNIST: zalandoresearch publishes MD5s of the .gz files (torchvision checks the same); Debian's
# dataset-fashion-mnist recompresses them, so we also know the uncompressed sums (measured on Debian's copy, whose
# uncompressed bytes are the originals'). Not matching is reported in the summary, not an error.
FASHION_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']  # == torchvision FashionMNIST.classes
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_META = "batches.meta"
CIFAR_MD5 = {  # torchvision.datasets.CIFAR10 lists
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------- conversion
@dataclass
class Conversions:
    resized: int = 0
    cropped: int = 0
    mode_converted: int = 0
    sizes_seen: set = field(default_factory=set)
    modes_seen: set = field(default_factory=set)

    def as_dict(self) -> dict:
        return {"resized": self.resized, "cropped": self.cropped, "mode_converted": self.mode_converted,
                "source_modes": sorted(self.modes_seen), "distinct_source_sizes": len(self.sizes_seen)}


def conform_pil(im: Image.Image, resolution: int, channels: int, conv: Conversions) -> np.ndarray:
    """PIL image -> uint8 HxWxC at the target size/channels (centre-crop to square, bilinear antialiased resize)."""
    target_mode = "L" if channels == 1 else "RGB"
    conv.modes_seen.add(im.mode)
    if len(conv.sizes_seen) < 1000:
        conv.sizes_seen.add(im.size)
    if im.mode != target_mode:
        if im.mode in ("P", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode.startswith("I"):  # 16/32-bit grey: keep the high byte
            im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), mode="L")
        im = im.convert(target_mode)
        conv.mode_converted += 1
    w, h = im.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        conv.cropped += 1
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BILINEAR)  # Pillow scales the kernel when shrinking
        conv.resized += 1
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def conform_array(img: np.ndarray, resolution: int, channels: int, conv: Conversions) -> np.ndarray:
    """uint8 HxWxC (C = 1 or 3) -> target; a no-op view when nothing changes."""
    h, w, c = img.shape
    if h == w == resolution and c == channels:
        return img
    mode = "L" if c == 1 else "RGB"
    return conform_pil(Image.fromarray(img[:, :, 0] if c == 1 else img, mode=mode), resolution, channels, conv)


# --------------------------------------------------------------------------------------------- base
class Source:
    """A dataset's original files. Subclasses set the attributes below and implement ``iter_split``."""

    name: str = ""
    description: str = ""
    location: str = ""
    class_names: list[str] = []
    native_resolution: int = 28
    native_channels: int = 1

    def __init__(self, resolution: Optional[int], channels: Optional[int], limit: Optional[int]):
        self.resolution = resolution or self.native_resolution
        self.channels = channels or self.native_channels
        self.limit = limit
        self.conversions = Conversions()
        self.skipped: list[tuple[str, str]] = []  # (relative path, reason), all of them
        self.notes: list[str] = []

    def checksums(self) -> dict:
        """Identity of the source files (recorded in the manifest; part of the re-run key)."""
        raise NotImplementedError

    def count(self, split: str) -> Optional[int]:
        """Expected number of examples (for progress), None when unknown."""
        return None

    def iter_split(self, split: str) -> Iterator[tuple[np.ndarray, int]]:
        raise NotImplementedError

    def _conform_stream(self, images: np.ndarray, labels: np.ndarray, limit: Optional[int] = None):
        n = len(images) if limit is None else min(limit, len(images))
        for i in range(n):
            yield conform_array(images[i], self.resolution, self.channels, self.conversions), int(labels[i])


# --------------------------------------------------------------------------------------------- IDX (MNIST, Fashion)
def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def parse_idx(data: bytes, expected_magic: int, name: str) -> np.ndarray:
    """Parse an IDX file (big-endian magic, dims, then uint8 data)."""
    if len(data) < 8:
        raise DataError(f"{name}: {len(data)} bytes, too short for an IDX file; restore the original file")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        kind = "images (idx3)" if expected_magic == 2051 else "labels (idx1)"
        raise DataError(
            f"{name}: IDX magic number {magic}, expected {expected_magic} for {kind}; the file is not an "
            f"MNIST-format {kind} file, is swapped with another, or is corrupt - restore the original file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{name}: header declares {dims} = {expected} bytes of data but the file holds {len(data) - header}; "
            f"the file is truncated or corrupt - restore the original file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(dirs: list[Path], base: str) -> Optional[Path]:
    alt = base.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for d in dirs:
        for candidate in (base, base + ".gz", alt, alt + ".gz"):
            p = d / candidate
            if p.is_file():
                return p
    return None


class IdxSource(Source):
    native_resolution, native_channels = 28, 1

    def __init__(self, dataset: str, source: Optional[str], download: bool,
                 resolution=None, channels=None, limit=None):
        super().__init__(resolution, channels, limit)
        self.name = dataset
        if dataset == "mnist":
            self.class_names = [str(i) for i in range(10)]
            if source is None:
                root, self.description = BUNDLED_MNIST, "MNIST original IDX files (bundled copy, CC BY-SA 3.0)"
            else:
                root, self.description = Path(source), "MNIST original IDX files"
            fix_missing = "omit --source to use the bundled copy, or point --source at a folder holding the four files"
        else:
            self.class_names = list(FASHION_CLASSES)
            self.description = "Fashion-MNIST original IDX files"
            if source is None and download:
                root = DEFAULT_CACHE / "fashion-mnist"
                self._download(root)
            elif source is None:
                raise DataError(
                    "fashion-mnist needs its files: install Debian's copy (apt-get install -y dataset-fashion-mnist) "
                    f"and pass --source {FASHION_DEBIAN_DIR}, or pass --download"
                )
            else:
                root = Path(source)
                if download:
                    self._download(root)
            fix_missing = (f"apt-get install -y dataset-fashion-mnist and use --source {FASHION_DEBIAN_DIR}, "
                           "or pass --download")
        if not root.is_dir():
            raise DataError(f"source folder {root} does not exist or is not a folder; {fix_missing}")
        self.location = str(root)
        dirs = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
        self._paths: dict[tuple[str, str], Path] = {}
        missing = []
        for role, base in IDX_FILES.items():
            p = _find_idx(dirs, base)
            if p is None:
                missing.append(base)
            else:
                self._paths[role] = p
        if missing:
            raise DataError(
                f"{dataset}: {root} lacks {', '.join(missing)} (raw or .gz); {fix_missing}"
            )
        self._raw: dict[str, bytes] = {}
        self._checksums: Optional[dict] = None

    @staticmethod
    def _download(root: Path) -> None:  # pragma: no cover - needs the network
        from torchvision.datasets import FashionMNIST
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)  # verifies the published MD5s itself

    def _read(self, role) -> tuple[bytes, bytes]:
        """(uncompressed bytes, bytes as stored)."""
        path = self._paths[role]
        raw = path.read_bytes()
        if path.suffix == ".gz":
            try:
                return gzip.decompress(raw), raw
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: not a valid gzip file ({exc}); restore the original file") from None
        return raw, raw

    def checksums(self) -> dict:
        if self._checksums is not None:
            return self._checksums
        out, canonical = {}, True
        for role, base in IDX_FILES.items():
            data, stored = self._read(role)
            path = self._paths[role]
            md5 = _md5(data)
            if self.name == "mnist":
                if md5 != MNIST_MD5[base]:
                    raise DataError(
                        f"{path}: MD5 of the uncompressed bytes is {md5}, expected {MNIST_MD5[base]} (the canonical "
                        f"MNIST sum); the file is corrupt or not the original. Fix: restore it (reinstall gan-pipeline "
                        f"for the bundled copy, or copy the original from a MNIST mirror / torchvision's download), "
                        f"or omit --source to use the bundled files"
                    )
            else:
                ok = md5 == FASHION_MD5[base] or (path.suffix == ".gz" and _md5(stored) == FASHION_GZ_MD5[base])
                canonical = canonical and ok
            self._raw[base] = data
            out[path.name] = {"md5_uncompressed": md5, "sha256": hashlib.sha256(stored).hexdigest()}
        if self.name != "mnist":
            self.notes.append("checksums match the published Fashion-MNIST files" if canonical else
                              "WARNING: checksums differ from the published Fashion-MNIST files (modified copy?)")
        self._checksums = {"files": out, "canonical": canonical}
        return self._checksums

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        self.checksums()
        ib, lb = IDX_FILES[(split, "images")], IDX_FILES[(split, "labels")]
        ip, lp = self._paths[(split, "images")], self._paths[(split, "labels")]
        images = parse_idx(self._raw[ib], 2051, str(ip))
        labels = parse_idx(self._raw[lb], 2049, str(lp))
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{ip}: expected N x 28 x 28 images and N labels, got {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{ip} holds {len(images)} images but {lp} holds {len(labels)} labels; the files do not belong "
                f"together - restore the original pair"
            )
        if len(labels) and labels.max() >= len(self.class_names):
            raise DataError(f"{lp}: label {labels.max()} outside 0..{len(self.class_names) - 1}; restore the original")
        return images[:, :, :, None], labels

    def count(self, split: str) -> Optional[int]:
        n = len(self._arrays(split)[1])
        return n if self.limit is None else min(n, self.limit)

    def iter_split(self, split: str):
        images, labels = self._arrays(split)
        yield from self._conform_stream(images, labels, self.limit)


# --------------------------------------------------------------------------------------------- CIFAR-10
class _RestrictedUnpickler(pickle.Unpickler):
    """Only what a CIFAR-10 python batch holds: dict/list/bytes/str/int and numpy arrays (no other globals)."""

    def __init__(self, f, filename: str):
        super().__init__(f, encoding="latin1")
        self.filename = filename

    def find_class(self, module: str, name: str):
        try:
            import numpy._core.multiarray as ma  # numpy >= 2
            import numpy._core.numeric as nu
        except ImportError:  # pragma: no cover - numpy 1.x
            import numpy.core.multiarray as ma
            import numpy.core.numeric as nu
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): ma._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): ma._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): nu._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): nu._frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): __import__("codecs").encode,  # how protocol-2 pickles store bytes
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise DataError(
            f"{self.filename}: refused to unpickle {module}.{name} - a CIFAR-10 batch holds only dicts, lists, "
            f"bytes, str, int and numpy arrays. The file is not an original CIFAR-10 batch (possibly malicious); "
            f"re-download it (--download) from the official site"
        )


def load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                        f"re-download the dataset (--download)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}; not a CIFAR-10 python batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class CifarSource(Source):
    native_resolution, native_channels = 32, 3

    def __init__(self, source: Optional[str], download: bool, resolution=None, channels=None, limit=None):
        super().__init__(resolution, channels, limit)
        self.name = "cifar10"
        self.description = "CIFAR-10 python batches (cifar-10-batches-py)"
        if source is None and not download:
            raise DataError("cifar10 needs its files: pass --source DIR (holding cifar-10-batches-py/) or --download")
        root = Path(source) if source else DEFAULT_CACHE / "cifar10"
        if download:  # pragma: no cover - needs the network
            from torchvision.datasets import CIFAR10
            CIFAR10(str(root), train=True, download=True)  # checks the archive's MD5 and extracts
        if not root.is_dir():
            raise DataError(f"source folder {root} does not exist or is not a folder; pass --source DIR or --download")
        batch_dir = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        missing = [n for n in CIFAR_TRAIN + CIFAR_TEST + [CIFAR_META] if not (batch_dir / n).is_file()]
        if missing:
            raise DataError(f"cifar10: {batch_dir} lacks {', '.join(missing)}; pass the folder holding "
                            f"cifar-10-batches-py/ as --source, or --download")
        self.dir = batch_dir
        self.location = str(batch_dir)
        meta = load_cifar_pickle(batch_dir / CIFAR_META)
        names = meta.get("label_names")
        if not isinstance(names, list) or not names:
            raise DataError(f"{batch_dir / CIFAR_META}: no label_names list; not a CIFAR-10 batches.meta")
        self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self._checksums = None

    def checksums(self) -> dict:
        if self._checksums is None:
            files, canonical = {}, True
            for n in CIFAR_TRAIN + CIFAR_TEST + [CIFAR_META]:
                data = (self.dir / n).read_bytes()
                md5 = _md5(data)
                canonical = canonical and md5 == CIFAR_MD5[n]
                files[n] = {"md5": md5, "sha256": hashlib.sha256(data).hexdigest()}
            self.notes.append("checksums match the published CIFAR-10 files" if canonical else
                              "WARNING: checksums differ from the published CIFAR-10 files (modified or test copy)")
            self._checksums = {"files": files, "canonical": canonical}
        return self._checksums

    def iter_split(self, split: str):
        remaining = self.limit
        for n in (CIFAR_TRAIN if split == "train" else CIFAR_TEST):
            path = self.dir / n
            batch = load_cifar_pickle(path)
            data, labels = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: 'data' must be a uint8 N x 3072 array; not a CIFAR-10 batch")
            if not isinstance(labels, list) or len(labels) != len(data):
                raise DataError(f"{path}: {len(data)} images but "
                                f"{len(labels) if isinstance(labels, list) else 'no'} labels; not a CIFAR-10 batch")
            labels = np.asarray(labels, dtype=np.int64)
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise DataError(f"{path}: labels outside 0..{len(self.class_names) - 1}")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> HWC
            if remaining is not None:
                images, labels = images[:remaining], labels[:remaining]
                remaining -= len(images)
            yield from self._conform_stream(images, labels)
            if remaining is not None and remaining <= 0:
                return


# --------------------------------------------------------------------------------------------- image folder
def _split_of(relpath: str, heldout_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h / 2.0 ** 64 < heldout_fraction else "train"


class ImageFolderSource(Source):
    """PNG/JPEG files; class subfolders give labels (sorted names), a flat folder is unlabeled (label -1).

    Only the sorted list of file paths is held in memory; images are decoded one at a time. Symlinks (files or
    folders) are never followed and nothing outside the folder is read. Unreadable, non-PNG/JPEG and oversized
    (decompression bomb) files are skipped and counted, or raise with ``strict``.
    """

    native_resolution, native_channels = 64, 3

    def __init__(self, source: str, heldout_fraction: float, strict: bool = False,
                 resolution=None, channels=None, limit=None):
        super().__init__(resolution, channels, limit)
        self.name = "imagefolder"
        self.description = "folder of PNG/JPEG images"
        self.strict = strict
        given = Path(source)
        if not given.is_dir():
            raise DataError(f"source folder {given} does not exist or is not a folder; pass an existing folder of "
                            f"PNG/JPEG images (class subfolders give labels) as --source")
        self.root = given.resolve()
        self.location = str(self.root)
        top = sorted(os.scandir(self.root), key=lambda e: e.name)
        class_dirs = [e.name for e in top if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        self.labeled = bool(class_dirs)
        self.class_names = class_dirs
        self._files: list[tuple[str, int]] = []  # (relative posix path, label)
        self._stat: list[tuple[str, int, int]] = []
        if self.labeled:
            for e in top:
                if e.name.startswith("."):
                    continue
                if e.is_symlink():
                    self._skip(e.name, "symlink not followed")
                elif e.is_file(follow_symlinks=False):
                    self._skip(e.name, "file outside the class subfolders ignored")
            for label, name in enumerate(class_dirs):
                self._walk(self.root / name, label)
        else:
            self._walk(self.root, -1, recurse=False)
        if not self._files:
            raise DataError(
                f"{self.root}: no PNG/JPEG images found ({len(self.skipped)} other entries skipped); put images "
                f"in the folder (or in one subfolder per class) and retry"
            )
        self._by_split = {s: [(p, lab) for p, lab in self._files if _split_of(p, heldout_fraction) == s] for s in SPLITS}
        if not self._by_split["train"]:
            raise DataError(f"{self.root}: all {len(self._files)} images fell into the held-out split; "
                            f"lower data.heldout_fraction or add images")
        self._checksums = None

    def _skip(self, rel: str, reason: str) -> None:
        if self.strict and reason != "symlink not followed":
            raise DataError(f"{self.root / rel}: {reason} (strict mode); remove or fix the file, "
                            f"or prepare without --strict to skip it")
        self.skipped.append((rel, reason))

    def _walk(self, folder: Path, label: int, recurse: bool = True) -> None:
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = Path(e.path).relative_to(self.root).as_posix()
            if e.name.startswith("."):
                continue
            if e.is_symlink():
                self._skip(rel, "symlink not followed")
            elif e.is_dir(follow_symlinks=False):
                if recurse:
                    self._walk(Path(e.path), label)
            elif not e.is_file(follow_symlinks=False):
                self._skip(rel, "not a regular file")
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                self._skip(rel, "not a PNG/JPEG file")
            else:
                real = os.path.realpath(e.path)
                if not real.startswith(str(self.root) + os.sep):  # belt and braces: never leave the folder
                    self._skip(rel, "path escapes the source folder")
                    continue
                st = e.stat(follow_symlinks=False)
                self._files.append((rel, label))
                self._stat.append((rel, st.st_size, st.st_mtime_ns))

    def checksums(self) -> dict:
        """Fingerprint of the folder: sha256 over (relative path, size, mtime) of every candidate image."""
        if self._checksums is None:
            h = hashlib.sha256()
            for rel, size, mtime in self._stat:
                h.update(f"{rel}\0{size}\0{mtime}\n".encode())
            self._checksums = {"listing_sha256": h.hexdigest(), "files": len(self._stat),
                               "labeled": self.labeled}
        return self._checksums

    def count(self, split: str) -> Optional[int]:
        n = len(self._by_split[split])
        return n if self.limit is None else min(n, self.limit)

    def _load(self, rel: str) -> Optional[np.ndarray]:
        path = self.root / rel
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            self._skip(rel, f"cannot open ({exc.strerror})")
            return None
        with os.fdopen(fd, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(f, formats=["PNG", "JPEG"])
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    self._skip(rel, f"declared size {w}x{h} exceeds {MAX_IMAGE_PIXELS} pixels (decompression bomb?)")
                    return None
                if im.format == "JPEG":  # decode at reduced scale when the target is much smaller
                    im.draft("L" if self.channels == 1 else "RGB", (self.resolution, self.resolution))
                im.load()
                before = self.conversions.resized
                out = conform_pil(im, self.resolution, self.channels, self.conversions)
                if (w, h) != im.size and self.conversions.resized == before:  # the JPEG draft did the resizing
                    self.conversions.resized += 1
                return out
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                self._skip(rel, f"refused as a decompression bomb ({exc})")
            except DataError:
                raise
            except Exception as exc:  # untrusted bytes: any decoder failure means the file is unusable
                self._skip(rel, f"unreadable image ({type(exc).__name__}: {exc})")
        return None

    def iter_split(self, split: str):
        produced = 0
        for rel, label in self._by_split[split]:
            if self.limit is not None and produced >= self.limit:
                return
            img = self._load(rel)
            if img is not None:
                produced += 1
                yield img, label


# --------------------------------------------------------------------------------------------- factory
def open_source(data) -> Source:
    """The source for a ``DataConfig`` (validates paths and file formats up front)."""
    res, ch = data.resolution, data.channels
    limit = getattr(data, "limit", None)
    if data.dataset in ("mnist", "fashion-mnist"):
        return IdxSource(data.dataset, data.source, data.download, res, ch, limit)
    if data.dataset == "cifar10":
        return CifarSource(data.source, data.download, res, ch, limit)
    if data.dataset == "imagefolder":
        if not data.source:
            raise DataError("dataset imagefolder needs --source (the folder of images)")
        return ImageFolderSource(data.source, data.heldout_fraction, data.strict, res, ch, limit)
    raise DataError(f"unknown dataset {data.dataset!r}")  # pragma: no cover - the config validates it
