"""Digests: the bytes gan-pipeline uses are the bytes it wrote.

Datasets: every shard named by a manifest must lie inside the dataset folder (a plain relative name, no ``..``,
no absolute path) and match the manifest's size and sha256. The hash is computed at first use and cached by
``(path, size, mtime_ns)`` in ``<dataset>/.gan-pipeline-verified.json``, so later uses cost a ``stat`` per shard.
On object stores (s3://, gs://) the size is checked at every use and the hash only with ``verify=True``.

Registered models: at registration the sha256 of every file of the logged model (weights, config, MLmodel,
``generator_model.py``, ``code/gan_models/...``) is recorded on the model version (tag
``gan_pipeline.artifacts_sha256``, the digest of the listing below, and ``gan_pipeline.weights_sha256``). Before
any gan-pipeline command loads a model, its files are downloaded, the listing is recomputed and compared, and only
the verified local copy is loaded. The listing is exactly what coreutils print, so anyone can check it::

    mlflow artifacts download -u models:/NAME/VERSION -d model
    (cd model && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum) | sha256sum
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path
from pipelines import tags
from pipelines.data import DataError
from pipelines.errors import UserError

VERIFIED_CACHE = ".gan-pipeline-verified.json"
ARTIFACTS_TAG, FILES_TAG, WEIGHTS_TAG = tags.ARTIFACTS_SHA256, tags.ARTIFACT_FILES, tags.WEIGHTS_SHA256
_FIX = "re-run gan-pipeline prepare --force"


class IntegrityError(DataError):
    """Bytes that are not what gan-pipeline wrote (exit 1: a foreign thing)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ datasets
def confined_shard_path(shard_path: object, where: str) -> str:
    """A manifest's shard path, refused unless it is a plain relative path inside the dataset folder."""
    if not isinstance(shard_path, str) or not shard_path:
        raise IntegrityError(f"{where}: a shard has no path; {_FIX}")
    normal = posixpath.normpath(shard_path)
    if (shard_path.startswith(("/", "\\")) or "\\" in shard_path or "://" in shard_path or ":" in shard_path
            or normal.startswith("..") or normal != shard_path):
        raise IntegrityError(f"{where}: shard path {shard_path!r} leads outside the dataset folder; a gan-pipeline "
                             f"manifest names shards by plain file names - {_FIX}")
    return shard_path


def _read_cache(root: Path) -> dict:
    try:
        data = json.loads((root / VERIFIED_CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(root: Path, cache: dict) -> None:
    from pipelines.files import atomic_write

    try:
        atomic_write(root / VERIFIED_CACHE, json.dumps(cache, sort_keys=True))
    except OSError:  # a read-only dataset is verified again next time; nothing else depends on the cache
        pass


def verify_shards(fs, root: str, manifest: dict, where: str, full: bool = False) -> None:
    """Every shard: confined to ``root``, present, of the recorded size and sha256 (cached, see module doc)."""
    import pyarrow.fs as pafs

    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise IntegrityError(f"{where}: the manifest's shards are not a list of records; not a gan-pipeline "
                             f"manifest - {_FIX}")
    paths = [confined_shard_path(s.get("path") if isinstance(s, dict) else None, where) for s in shards]
    local = isinstance(fs, pafs.LocalFileSystem)
    cache = _read_cache(Path(root)) if local and not full else {}
    fresh, changed = {}, False
    for shard, rel in zip(shards, paths):
        path = f"{root.rstrip('/')}/{rel}"
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise IntegrityError(f"shard {rel} is missing from {where}; {_FIX}")
        if "bytes" in shard and info.size != shard["bytes"]:
            raise IntegrityError(f"shard {rel} size mismatch in {where}: {info.size} bytes, the manifest records "
                                 f"{shard['bytes']}: the file was modified or damaged - {_FIX}")
        if not local and not full:
            continue
        stamp = [info.size, info.mtime_ns, shard.get("sha256")]
        if cache.get(rel) == stamp:
            fresh[rel] = stamp
            continue
        h = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != shard.get("sha256"):
            raise IntegrityError(
                f"shard {rel} hash mismatch in {where}: sha256 {h.hexdigest()[:16]}... but the manifest records "
                f"{str(shard.get('sha256'))[:16]}...; the file was modified or damaged - {_FIX}")
        fresh[rel], changed = stamp, True
    if local and (changed or set(fresh) != set(cache)):
        _write_cache(Path(root), fresh)


# ------------------------------------------------------------------------------------------------ models
def listing(folder: str | os.PathLike) -> str:
    """``<sha256>  <relative path>`` lines, paths sorted bytewise: what ``sha256sum`` prints for the files."""
    root = Path(folder)
    files = sorted((p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()),
                   key=lambda name: name.encode())
    return "".join(f"{sha256_file(root / name)}  {name}\n" for name in files)


def folder_digest(folder: str | os.PathLike) -> tuple[str, str]:
    """``(digest, listing)``: the sha256 of :func:`listing`."""
    text = listing(folder)
    return hashlib.sha256(text.encode()).hexdigest(), text


def short_listing(text: str, limit: int = 4800) -> str:
    """The listing as a tag value (MLflow tags hold 5000 characters): 16 hex digits per file."""
    short = "".join(f"{line[:16]}  {line.split('  ', 1)[1]}\n" for line in text.splitlines())
    return short if len(short) <= limit else short[:limit - 4] + "...\n"


def verify_folder(folder: str | os.PathLike, tags: dict, what: str, fix: str) -> None:
    """Refuse ``folder`` unless its digest is the one recorded in ``tags`` at registration."""
    recorded = tags.get(ARTIFACTS_TAG)
    if not recorded:
        raise IntegrityError(f"{what} records no artifact digest ({ARTIFACTS_TAG}): it was registered by an older "
                             f"gan-pipeline or by hand, so its code cannot be verified before it runs; {fix}")
    digest, text = folder_digest(folder)
    if digest == recorded:
        return
    expected = {line.split("  ", 1)[1]: line[:16] for line in (tags.get(FILES_TAG) or "").splitlines() if "  " in line}
    actual = {line.split("  ", 1)[1]: line[:16] for line in text.splitlines()}
    differ = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    detail = f" (changed, added or removed: {', '.join(differ[:6])})" if expected and differ else ""
    raise IntegrityError(f"{what} does not match its registration: artifact digest {digest[:16]}... but "
                         f"{recorded[:16]}... was recorded{detail}. Its files were modified in the artifact store; "
                         f"it was not loaded. {fix}")


def verify_weights(path: str | os.PathLike, tags: dict, what: str) -> None:
    recorded = tags.get(WEIGHTS_TAG)
    if recorded and sha256_file(path) != recorded:
        raise IntegrityError(f"{what}: the generator weights differ from the registered ones (sha256 recorded at "
                             f"registration does not match); they were modified in the artifact store - register "
                             f"the run again from a trusted copy")


def model_version_of(client, model_uri: str):
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the model version (or a clear error)."""
    if not model_uri.startswith("models:/"):
        raise UserError(f"model URI {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = model_uri[len("models:/"):]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, number = rest.rsplit("/", 1)
        return client.get_model_version(name, number)
    except Exception as exc:  # noqa: BLE001 - unknown names/aliases/versions surface as MlflowException
        raise UserError(f"registered model {model_uri} not found: {getattr(exc, 'message', exc)}. List them with "
                        f"gan-pipeline models list") from None


def download_verified(client, model_uri: str, target: str | os.PathLike, version=None) -> Path:
    """The files of registered model ``model_uri`` in ``target``, verified against their registration."""
    import mlflow

    version = version or model_version_of(client, model_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                     dst_path=str(target)))
    verify_folder(local, version.tags or {}, f"registered model {version.name} v{version.version} ({model_uri})",
                  "register the source run again (gan-pipeline register --run-id "
                  f"{(version.tags or {}).get('source_run_id') or version.run_id}) from a trusted copy")
    return local


def record_digests(client, name: str, version: str, model_uri: str, weights_sha256: str) -> str:
    """At registration: hash the logged model's files as stored, record them on the version; returns the digest."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="gan-digest-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        digest, text = folder_digest(local)
    client.set_model_version_tag(name, version, ARTIFACTS_TAG, digest)
    client.set_model_version_tag(name, version, FILES_TAG, short_listing(text))
    client.set_model_version_tag(name, version, WEIGHTS_TAG, weights_sha256)
    return digest


def verify_model(client, model_uri: str) -> dict:
    """``gan-pipeline models verify``: download, recompute, compare; returns what was checked."""
    import tempfile

    version = model_version_of(client, model_uri)
    with tempfile.TemporaryDirectory(prefix="gan-verify-") as tmp:
        local = download_verified(client, model_uri, tmp, version=version)
        count = sum(1 for p in Path(local).rglob("*") if p.is_file())
    return {"name": version.name, "version": str(version.version), "files": count,
            "digest": (version.tags or {}).get(ARTIFACTS_TAG, "")}


def verify_stage(cfg, model: str) -> dict:
    """``gan-pipeline models verify NAME@ALIAS|NAME/VERSION``: exit 0 and one line when the files match."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import check_reachable

    uri = cfg.resolved_tracking_uri
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model_uri = model if model.startswith("models:/") else f"models:/{model}"
    result = verify_model(MlflowClient(tracking_uri=uri, registry_uri=uri), model_uri)
    print(f"verified {result['name']} v{result['version']}: {result['files']} files match the sha256 recorded at "
          f"registration ({result['digest'][:16]}...)", flush=True)
    return result
