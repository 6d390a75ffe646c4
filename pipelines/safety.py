"""What the product may write, and under which names: the rules that keep a careless or hostile input from
deleting, overwriting or escaping into anything gan-pipeline did not create.

- Folders: gan-pipeline writes into a folder only when it is new, empty, marked as its own (``.gan-pipeline``,
  written when the product claims a folder) or holds nothing but names the product itself writes there. A
  non-empty foreign folder is refused (exit 2) whatever the flags (``--force`` rebuilds the product's own data,
  never someone else's).
- Names that become paths (run names, ``--resume``, run ids): a safe character set, so they cannot escape the
  folder they are joined to.
- YAML: every file the product reads goes through :func:`load_yaml` (no aliases, bounded size), so an alias
  bomb cannot exhaust memory, not even under ``--dry-run``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import yaml

from pipelines.errors import BadValue

MARKER = ".gan-pipeline"
#: What ``<runs-dir>`` holds when gan-pipeline made it (older versions wrote no marker).
RUNS_DIR_ENTRIES = frozenset({"data", "checkpoints", "train", "pipelines", "evaluations", "classifiers", MARKER})
#: What ``evaluate --out`` writes (and logs, in this order).
EVALUATION_FILES = ("metrics.json", "samples.png", "class_grid.png", "code_grid.png")
EVALUATION_ENTRIES = frozenset({*EVALUATION_FILES, ".metrics.json.tmp", MARKER})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
MAX_YAML_BYTES = 1 << 20


class ForeignFolder(BadValue):
    """A folder that gan-pipeline did not write, named where the product would write."""


# ------------------------------------------------------------------------------------------------ names
def check_name(value: Optional[str], option: str) -> Optional[str]:
    """``value`` if it is a safe name for a file or folder (or None); a :class:`BadValue` otherwise."""
    if value is None:
        return None
    if not _NAME.fullmatch(value) or ".." in value:
        raise BadValue(f"{option} {value!r} is not a valid name: use {NAME_RULE} (names become folder names, so "
                       f"they may not hold '/', '..' or spaces)")
    return value


def check_alias(alias: str, option: str = "registry.alias") -> str:
    """MLflow refuses aliases ``latest`` and ``v<N>`` only after the version exists; say so before."""
    if re.fullmatch(r"[vV]\d+", alias) or alias.lower() == "latest":
        raise BadValue(f"{option} {alias!r} is reserved by MLflow (latest and v<number> name versions); "
                       f"choose another alias, e.g. candidate")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias):
        raise BadValue(f"{option} {alias!r} is not a valid alias: use letters, digits, '_' and '-'")
    return alias


# ------------------------------------------------------------------------------------------------ folders
def _listing(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _own(entry: str, own_entries: frozenset[str]) -> bool:
    """One of ``own_entries``, or the temp file of an atomic write of one (``.<name>.<random>.tmp``)."""
    if entry in own_entries:
        return True
    return entry.startswith(".") and entry.endswith(".tmp") and any(
        entry.startswith(f".{name}.") for name in own_entries)


def check_folder(path: str | os.PathLike, what: str, option: str,
                 own_entries: frozenset[str] = frozenset({MARKER})) -> None:
    """Refuse to write into ``path`` unless it is new, empty, marked as gan-pipeline's, or holds only
    ``own_entries``. Nothing is created or changed here."""
    folder = Path(path)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise ForeignFolder(f"{what} {folder} exists and is not a folder; choose another {option}")
    try:
        entries = set(os.listdir(folder))
    except OSError as exc:
        raise ForeignFolder(f"{what} {folder} cannot be listed ({exc.strerror or exc}); choose another {option}") \
            from None
    if not entries or MARKER in entries or all(_own(entry, own_entries) for entry in entries):
        return
    raise ForeignFolder(
        f"{what} {folder.resolve()} is not empty and was not created by gan-pipeline (it holds "
        f"{_listing(entries)}); nothing in it was touched. Pass {option} a new or empty folder "
        f"(gan-pipeline never deletes or overwrites what it did not write; a folder it made holds a {MARKER} file)")


def claim_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` (if needed) and mark it as gan-pipeline's, so later runs may write there again."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text("This folder was created by gan-pipeline; it may rewrite what is inside.\n")
    return folder


def check_runs_dir(runs_dir: str) -> None:
    check_folder(runs_dir, "runs folder", "--runs-dir", RUNS_DIR_ENTRIES)


def check_dataset_folder(entries: set[str], manifest: Optional[dict], where: str, option: str = "--out") -> None:
    """``prepare``'s output: new/empty, or a gan-pipeline dataset holding nothing but what prepare wrote there."""
    if not entries:
        return
    from pipelines.integrity import VERIFIED_CACHE

    fix = (f"nothing in it was touched. Pass {option} a new or empty folder (gan-pipeline never deletes or "
           f"overwrites what it did not write)")
    if manifest is None or not isinstance(manifest.get("shards"), list) or "manifest_hash" not in manifest:
        raise ForeignFolder(f"{where} is not empty and is not a gan-pipeline dataset (no gan-pipeline manifest.json; "
                            f"it holds {_listing(entries)}); {fix}")
    own = {"manifest.json", VERIFIED_CACHE, MARKER} | {str(s.get("path")) for s in manifest["shards"]
                                                          if isinstance(s, dict)}
    # a temp file of the verification cache, left by a killed process, is ours too
    foreign = {e for e in entries - own if not e.startswith(f".{VERIFIED_CACHE}.")}
    if foreign:
        raise ForeignFolder(f"{where} is a gan-pipeline dataset, but it also holds files prepare did not write "
                            f"({_listing(foreign)}); rebuilding it would delete them, so {fix}")


def check_storage_folder(path: str | os.PathLike) -> None:
    """``--storage-path``: gan-pipeline's own ``<runs-dir>/checkpoints`` (older versions wrote no marker there),
    or a new, empty or marked folder."""
    folder = Path(path)
    parent_is_runs_dir = folder.parent.is_dir() and (
        MARKER in os.listdir(folder.parent) or set(os.listdir(folder.parent)) <= RUNS_DIR_ENTRIES)
    if folder.name == "checkpoints" and parent_is_runs_dir:
        return
    check_folder(folder, "checkpoint storage", "--storage-path")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """A single output file is never written over something that exists (a folder, or a file of the user's)."""
    target = Path(path)
    if target.is_dir():
        raise ForeignFolder(f"{option} {target} is a folder; name a file inside it, e.g. {target / 'samples.png'}")
    if target.exists() or target.is_symlink():
        raise ForeignFolder(f"{option} {target} exists; gan-pipeline does not overwrite files. Choose another "
                            f"{option} (or move the existing file away yourself)")


def check_inside(child: str | os.PathLike, parent: str | os.PathLike, what: str) -> Path:
    """``child`` resolved, refused unless it lies inside ``parent`` (symlinks resolved too)."""
    resolved, root = Path(child).resolve(), Path(parent).resolve()
    if resolved != root and root not in resolved.parents:
        raise BadValue(f"{what} {child} lies outside {root}; names may not lead out of their folder")
    return resolved


# ------------------------------------------------------------------------------------------------ YAML
class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a few lines of ``&a [*b, *b, ...]`` expand to gigabytes."""

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        event = self.peek_event()
        if isinstance(event, yaml.events.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (&name, *name) are not accepted by gan-pipeline; write the "
                "values out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(path: str | os.PathLike, what: str = "config file"):
    """The content of a YAML file, or a :class:`BadValue` naming the file, the problem and the fix."""
    from pipelines.config import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist" if not file.exists() else
                          f"{what} {file} is not a file")
    size = file.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {file} is {size:,} bytes; gan-pipeline reads YAML files of at most "
                          f"{MAX_YAML_BYTES:,} bytes (a config is a few hundred)")
    try:
        return yaml.load(file.read_bytes().decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - safe subclass
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {file} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {file} is not valid YAML: {exc}") from None
