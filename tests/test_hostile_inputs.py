"""A corpus of hostile and careless inputs across every command, each one asserting what the product promises:

- the documented exit code (2 = a bad value or config, 1 = a missing or foreign thing, 0 where the input is
  harmless and the point is what is printed);
- one clear message naming the problem and the fix (the case's phrases);
- no ``Traceback`` in stdout or stderr;
- nothing outside the product's own folders changed (the sandbox is listed, with sizes and hashes, before and
  after; the product's folders are ``gan-runs/`` and the internal-error log folder);
- no secret in any output: secrets sit in the environment (MLflow password and token, AWS keys) and in URIs.

The CLI runs in-process (``click.testing.CliRunner`` on ``pipelines.cli.cli``, as in tests/test_bad_inputs.py);
no case starts Ray or a server, so each takes about a second. ``docs/reliability.md`` lists the corpus in a table
generated from ``CASES`` (``python -m tests.test_hostile_inputs`` rewrites it; a test checks it is current).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "pw-S3cret/with@signs",
    "MLFLOW_TRACKING_TOKEN": "tok-Secret-4711",
    "AWS_SECRET_ACCESS_KEY": "aws-Secret-Key-0815",
    "AWS_ACCESS_KEY_ID": "AKIASECRETID42",
}
URI_PASSWORD = "uri-P@ss/w0rd"
URI_TOKEN = "uri-token-7f3a9"
ALL_SECRETS = (*SECRETS.values(), URI_PASSWORD, URI_TOKEN)
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
DOC_START, DOC_END = "<!-- hostile-corpus:start -->", "<!-- hostile-corpus:end -->"


class Paths:
    """Where a case points. Real paths in a test; placeholders (``W``, ``DATA``, ...) for the doc table."""

    def __init__(self, w: str, data: str, unlabeled: str, one_class: str, dead: str):
        self.w, self.data, self.unlabeled, self.one_class, self.dead = w, data, unlabeled, one_class, dead

    def __call__(self, *parts: str) -> str:
        return "/".join([self.w, *parts])


DOC_PATHS = Paths("W", "DATA", "UNLABELED", "ONE_CLASS", "127.0.0.1:DEAD")


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Paths], list[str]]
    code: int
    expect: tuple[str, ...]  # phrases of the message: the problem and the fix
    setup: Optional[Callable[[Path, Paths], None]] = None
    kind: str = ""
    env: dict = field(default_factory=dict)
    creates: tuple[str, ...] = ()  # new folders the command may make (its own output); nothing existing may change


# ------------------------------------------------------------------------------------------------ setups
def _victim(root: Path, p: Paths) -> None:
    """A user's folder and files the product must never touch."""
    (root / "victim").mkdir(exist_ok=True)
    (root / "victim" / "thesis.tex").write_text("years of work\n")
    (root / "victim" / "photos").mkdir(exist_ok=True)
    (root / "victim" / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("my notes\n")
    (root / "picture.png").write_bytes(b"\x89PNG user picture")


def _write(name: str, text: str | bytes) -> Callable[[Path, Paths], None]:
    def setup(root: Path, p: Paths) -> None:
        _victim(root, p)
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _dataset_copy(name: str, change: Optional[Callable[[dict, Path], None]] = None, extra: Optional[str] = None):
    """A copy of the prepared dataset, its manifest changed by ``change``, optionally with a user's file."""
    def setup(root: Path, p: Paths) -> None:
        _victim(root, p)
        target = root / name
        shutil.copytree(p.data, target, ignore=shutil.ignore_patterns(".gan-pipeline-verified.json"))
        if change is not None:
            manifest = json.loads((target / "manifest.json").read_text())
            change(manifest, target)
            (target / "manifest.json").write_text(json.dumps(manifest))
        if extra:
            (target / extra).write_text("a file of the user's\n")
    return setup


def _zero_hashes(manifest: dict, root: Path) -> None:
    for shard in manifest["shards"]:
        shard["sha256"] = "0" * 64


def _escape_shard(path: str) -> Callable[[dict, Path], None]:
    def change(manifest: dict, root: Path) -> None:
        manifest["shards"][0]["path"] = path
    return change


def _grow_shard(manifest: dict, root: Path) -> None:
    with open(root / manifest["shards"][0]["path"], "ab") as fh:
        fh.write(b"appended by someone")


def _shards_not_a_list(manifest: dict, root: Path) -> None:
    manifest["shards"] = "train-00000.parquet"


def _symlink(name: str, to: str) -> Callable[[Path, Paths], None]:
    def setup(root: Path, p: Paths) -> None:
        _victim(root, p)
        (root / name).symlink_to(root / to)
    return setup


def _temp_lookalike(root: Path, p: Paths) -> None:
    """A user's folder whose name starts like prepare's temporary sibling of ``ds``."""
    _write("c.yaml", "data:\n  limit: 200\n")(root, p)
    (root / ".ds.tmp-my-notes").mkdir()
    (root / ".ds.tmp-my-notes" / "keep.txt").write_text("mine\n")


def _killed_prepare(root: Path, p: Paths) -> None:
    """What a SIGKILLed prepare leaves: its temporary sibling, half written."""
    _write("c.yaml", "data:\n  limit: 200\n")(root, p)
    junk = root / "gan-runs" / "data" / ".mnist-28px-1ch-first200.tmp-0123456789ab"
    junk.mkdir(parents=True)
    (junk / "train-00000.parquet").write_bytes(b"PAR1 half")


def _record(name: str, text: str) -> Callable[[Path, Paths], None]:
    return _write(f"gan-runs/train/{name}.json", text)


def _checkpoints_of(run: str) -> Callable[[Path, Paths], None]:
    def setup(root: Path, p: Paths) -> None:
        _victim(root, p)
        (root / "gan-runs" / "checkpoints" / run).mkdir(parents=True)
    return setup


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
SPACE_BOMB = "tune:\n  space:\n" + "".join("    " + line + "\n" for line in ALIAS_BOMB.splitlines())
PICKLE_YAML = '!!python/object/apply:os.system ["touch PWNED"]\n'

NAME_FIX = ("is not a valid name", "A-Z a-z 0-9")
FOREIGN_FIX = ("not empty", "new or empty folder", "nothing in it was touched")
VALUE_FIX = ("invalid configuration",)
DEAD_FIX = ("unreachable", "start it")
YAML_FIX = ("anchors and aliases", "write the values out")
S = "--max-steps"  # every training command in the corpus would train 2 steps, were it not refused first


def _train(p: Paths, *args: str) -> list[str]:
    return ["train", "--data", p.data, *args, S, "2"]


CASES: list[Case] = [
    # -- data loss: folders the product did not write are refused, with or without --force
    Case("prepare-out-user-folder", lambda p: ["prepare", "--out", p("victim")], 2, FOREIGN_FIX, _victim, "data loss"),
    Case("prepare-out-user-folder-force", lambda p: ["prepare", "--out", p("victim"), "--force"], 2, FOREIGN_FIX,
         _victim, "data loss"),
    Case("prepare-out-cwd", lambda p: ["prepare", "--out", "."], 2, FOREIGN_FIX, _victim, "data loss"),
    Case("prepare-out-cwd-force", lambda p: ["prepare", "--out", ".", "--force"], 2, FOREIGN_FIX, _victim,
         "data loss"),
    Case("prepare-out-root", lambda p: ["prepare", "--out", "/", "--force"], 2, FOREIGN_FIX, _victim, "data loss"),
    Case("prepare-out-parent", lambda p: ["prepare", "--out", p("victim", ".."), "--force"], 2, FOREIGN_FIX, _victim,
         "data loss"),
    Case("prepare-out-symlink-to-user-folder", lambda p: ["prepare", "--out", p("link"), "--force"], 2, FOREIGN_FIX,
         _symlink("link", "victim"), "data loss"),
    Case("prepare-out-dataset-with-user-file", lambda p: ["prepare", "--out", p("ds"), "--force"], 2,
         ("also holds files prepare did not write", "notes-inside.txt", "new or empty folder"),
         _dataset_copy("ds", extra="notes-inside.txt"), "data loss"),
    Case("prepare-out-foreign-manifest", lambda p: ["prepare", "--out", p("victim"), "--force"], 2,
         ("is not a gan-pipeline dataset", "new or empty folder"), _write("victim/manifest.json", '{"hello": 1}'),
         "data loss"),
    Case("prepare-out-is-a-file", lambda p: ["prepare", "--out", p("notes.txt")], 1,
         ("exists and is not a folder", "choose another --out"), _victim, "data loss"),
    Case("prepare-beside-user-folder-named-like-its-temp",
         lambda p: ["prepare", "--config", p("c.yaml"), "--out", p("ds")], 0, ("examples     train 200",),
         _temp_lookalike, "data loss", creates=("ds",)),
    Case("prepare-after-a-killed-prepare", lambda p: ["prepare", "--config", p("c.yaml")], 0,
         ("examples     train 200",), _killed_prepare, "interrupted"),
    Case("runs-dir-user-folder", lambda p: ["prepare", "--runs-dir", p("victim")], 2,
         ("runs folder", *FOREIGN_FIX[1:]), _victim, "data loss"),
    Case("runs-dir-cwd-train", lambda p: ["train", "--runs-dir", ".", "--dry-run"], 2, ("runs folder", "--runs-dir"),
         _victim, "data loss"),
    Case("runs-dir-is-a-file", lambda p: ["run", "--runs-dir", p("notes.txt")], 2,
         ("exists and is not a folder", "--runs-dir"), _victim, "data loss"),
    Case("storage-path-user-folder", lambda p: _train(p, "--storage-path", p("victim")), 2,
         ("checkpoint storage", *FOREIGN_FIX[1:]), _victim, "data loss"),
    Case("storage-path-symlink-to-user-folder", lambda p: _train(p, "--storage-path", p("link")), 2,
         ("checkpoint storage", "new or empty folder"), _symlink("link", "victim"), "data loss"),
    Case("tune-storage-path-user-folder", lambda p: ["tune", "--data", p.data, "--storage-path", p("victim"), S, "2"],
         2, ("checkpoint storage", "new or empty folder"), _victim, "data loss"),
    Case("evaluate-out-user-folder", lambda p: ["evaluate", "--checkpoint", p("victim"), "--out", p("victim")], 2,
         ("evaluation output", "new or empty folder"), _victim, "data loss"),
    Case("evaluate-out-is-a-file", lambda p: ["evaluate", "--checkpoint", p("victim"), "--out", p("notes.txt")], 2,
         ("exists and is not a folder", "--out"), _victim, "data loss"),
    Case("generate-out-existing-file", lambda p: ["generate", "--model-uri", "models:/x@champion", "--out",
                                                  p("picture.png")], 2,
         ("exists; gan-pipeline does not overwrite files", "Choose another --out"), _victim, "data loss"),
    Case("generate-out-folder", lambda p: ["generate", "--model-uri", "models:/x@champion", "--out", p("victim")], 2,
         ("is a folder", "name a file inside it"), _victim, "data loss"),
    Case("train-name-of-foreign-checkpoints", lambda p: _train(p, "--run-name", "taken"), 1,
         ("checkpoints of a run named 'taken' exist", "choose another --run-name"), _checkpoints_of("taken"),
         "data loss"),
    # -- names that would escape their folder
    Case("run-name-dotdot", lambda p: _train(p, "--run-name", "../../escaped"), 2, NAME_FIX, _victim, "names"),
    Case("run-name-absolute", lambda p: _train(p, "--run-name", "/tmp/escaped"), 2, NAME_FIX, _victim, "names"),
    Case("run-name-with-space", lambda p: _train(p, "--run-name", "my run"), 2, NAME_FIX, _victim, "names"),
    Case("run-name-newline", lambda p: _train(p, "--run-name", "a\nb"), 2, NAME_FIX, _victim, "names"),
    Case("run-name-dot", lambda p: _train(p, "--run-name", "."), 2, NAME_FIX, _victim, "names"),
    Case("resume-dotdot", lambda p: ["train", "--resume", "../../../etc/passwd"], 2, NAME_FIX, _victim, "names"),
    Case("resume-absolute", lambda p: ["train", "--resume", "/etc/passwd"], 2, NAME_FIX, _victim, "names"),
    Case("resume-damaged-record", lambda p: ["train", "--resume", "broken"], 1,
         ("run record", "is damaged or not gan-pipeline's", "Start a new run"), _record("broken", "{not json"),
         "interrupted"),
    Case("resume-foreign-record", lambda p: ["train", "--resume", "foreign"], 1, ("is damaged or not gan-pipeline's",),
         _record("foreign", '{"hello": "world"}'), "interrupted"),
    Case("workflow-name-slash", lambda p: ["run", "--run-name", "a/b", S, "2"], 2, NAME_FIX, _victim, "names"),
    Case("workflow-state-damaged", lambda p: ["run", "--data", p.data, "--run-name", "wf", S, "2"], 1,
         ("workflow state", "is damaged", "another --run-name"), _write("gan-runs/pipelines/wf/state.json", "[1, 2"),
         "interrupted"),
    Case("evaluate-run-id-dotdot", lambda p: ["evaluate", "--run-id", "../../x"], 2, ("--run-id", *NAME_FIX),
         _victim, "names"),
    Case("register-reserved-alias-latest", lambda p: ["register", "--run-id", "0" * 32, "--config", p("c.yaml")], 2,
         ("'latest' is reserved by MLflow", "choose another alias"), _write("c.yaml", "registry:\n  alias: latest\n"),
         "registry"),
    Case("register-reserved-alias-v9", lambda p: ["register", "--run-id", "0" * 32, "--config", p("c.yaml")], 2,
         ("'v9' is reserved by MLflow", "choose another alias"), _write("c.yaml", "registry:\n  alias: v9\n"),
         "registry"),
    Case("register-alias-with-slash", lambda p: ["register", "--run-id", "0" * 32, "--config", p("c.yaml")], 2,
         ("is not a valid alias", "letters, digits"), _write("c.yaml", "registry:\n  alias: a/b\n"), "registry"),
    Case("promote-to-reserved-alias", lambda p: ["promote", "m", "--to", "latest"], 2,
         ("'latest' is reserved by MLflow",), _victim, "registry"),
    Case("promote-to-v3", lambda p: ["promote", "m", "--to", "V3"], 2, ("'V3' is reserved by MLflow",), _victim,
         "registry"),
    # -- numbers
    Case("seed-negative", lambda p: ["train", "--seed", "-1", "--dry-run"], 2, ("train.seed", "greater than or equal to 0"),
         _victim, "numbers"),
    Case("seed-2-pow-64", lambda p: ["train", "--seed", str(2 ** 64), "--dry-run"], 2, ("train.seed", "less than"),
         _victim, "numbers"),
    Case("lr-inf-yaml", lambda p: ["train", "--config", p("c.yaml"), "--dry-run"], 2, ("optim.lr_g", "finite number"),
         _write("c.yaml", "optim:\n  lr_g: .inf\n"), "numbers"),
    Case("lr-nan-option", lambda p: ["train", "--lr-d", "nan", "--dry-run"], 2, ("optim.lr_d", "finite number"),
         _victim, "numbers"),
    Case("lr-above-one", lambda p: ["train", "--lr-g", "5", "--dry-run"], 2, ("optim.lr_g", "less than or equal to 1"),
         _victim, "numbers"),
    Case("clip-value-inf", lambda p: ["train", "--model", "wgan", "--clip-value", "inf", "--dry-run"], 2,
         ("optim.clip_value", "finite number"), _victim, "numbers"),
    Case("clip-value-no-clipping", lambda p: ["train", "--model", "wgan", "--clip-value", "5", "--dry-run"], 2,
         ("optim.clip_value", "less than 1"), _victim, "numbers"),
    Case("gp-weight-huge", lambda p: ["train", "--model", "wgan-gp", "--gp-weight", "1e9", "--dry-run"], 2,
         ("optim.gp_weight", "less than or equal to 1000"), _victim, "numbers"),
    Case("n-critic-million", lambda p: ["train", "--model", "wgan", "--n-critic", "1000000", "--dry-run"], 2,
         ("optim.n_critic", "less than or equal to 100"), _victim, "numbers"),
    Case("workers-10-pow-26", lambda p: ["train", "--workers", str(10 ** 26), "--dry-run"], 2,
         ("train.workers", "less than or equal to 1024"), _victim, "numbers"),
    Case("workers-beyond-local-machine", lambda p: _train(p, "--workers", "1024", "--batch-size", "2048"), 2,
         ("local Ray instance", "lower --workers", "--address"), _victim, "numbers"),
    Case("threads-beyond-local-machine", lambda p: _train(p, "--threads-per-worker", "1000"), 2,
         ("local Ray instance", "--threads-per-worker"), _victim, "numbers"),
    Case("tune-concurrency-beyond-machine", lambda p: ["tune", "--data", p.data, "--samples", "500",
                                                       "--max-concurrent", "500", S, "2"], 2,
         ("local Ray instance", "--max-concurrent"), _victim, "numbers"),
    Case("num-samples-huge", lambda p: ["evaluate", "--num-samples", str(10 ** 12), "--checkpoint", p("victim")], 2,
         ("eval.num_samples", "less than or equal to"), _victim, "numbers"),
    Case("generate-n-huge", lambda p: ["generate", "--model-uri", "models:/x@a", "--n", "100000000", "--out",
                                       p("g.png")], 2, ("--n 100000000 is more than", "several files"), _victim,
         "numbers"),
    # -- data the driver can check before Ray starts
    Case("batch-larger-than-train-split", lambda p: _train(p, "--batch-size", "100000"), 2,
         ("too few for one batch", "lower --batch-size"), _victim, "data"),
    Case("batch-times-workers-larger-than-split", lambda p: _train(p, "--batch-size", "256", "--workers", "4"), 2,
         ("too few for one batch of 64 on each of 4 worker(s)",), _victim, "data"),
    Case("conditional-model-unlabeled-data", lambda p: ["train", "--model", "cgan", "--data", p.unlabeled, S, "2"], 2,
         ("is conditional", "unlabeled", "--model dcgan"), _victim, "data"),
    Case("conditional-model-one-class", lambda p: ["train", "--model", "cgan", "--data", p.one_class, S, "2"], 2,
         ("is conditional", "single class"), _victim, "data"),
    Case("run-on-one-class-data", lambda p: ["run", "--data", p.one_class, S, "2"], 2,
         ("domain classifier", "single class", "gan-pipeline train"), _victim, "data"),
    Case("tune-on-unlabeled-data", lambda p: ["tune", "--data", p.unlabeled, S, "2"], 2,
         ("tune", "unlabeled", "two or more classes"), _victim, "data"),
    # -- manifests
    Case("manifest-zeroed-hashes", lambda p: ["train", "--data", p("ds"), S, "2"], 1,
         ("hash mismatch", "prepare --force"), _dataset_copy("ds", _zero_hashes), "manifests"),
    Case("manifest-shard-outside", lambda p: ["train", "--data", p("ds"), S, "2"], 1,
         ("leads outside the dataset folder", "prepare --force"),
         _dataset_copy("ds", _escape_shard("../../outside/x.parquet")), "manifests"),
    Case("manifest-shard-absolute-run", lambda p: ["run", "--data", p("ds"), S, "2"], 1,
         ("leads outside the dataset folder",), _dataset_copy("ds", _escape_shard("/etc/passwd")), "manifests"),
    Case("manifest-shard-absolute-train", lambda p: ["train", "--data", p("ds"), S, "2"], 1,
         ("leads outside the dataset folder",), _dataset_copy("ds", _escape_shard("/etc/passwd")), "manifests"),
    Case("manifest-shard-grown", lambda p: ["train", "--data", p("ds"), S, "2"], 1,
         ("size mismatch", "modified or damaged", "prepare --force"), _dataset_copy("ds", _grow_shard), "manifests"),
    Case("manifest-shards-not-a-list", lambda p: ["train", "--data", p("ds"), S, "2"], 1,
         ("not a list of records", "prepare --force"), _dataset_copy("ds", _shards_not_a_list), "manifests"),
    # -- YAML
    Case("config-alias-bomb", lambda p: ["train", "--config", p("bomb.yaml"), "--dry-run"], 2, YAML_FIX,
         _write("bomb.yaml", ALIAS_BOMB), "yaml"),
    Case("config-alias-bomb-under-tune-space", lambda p: ["train", "--config", p("bomb.yaml"), "--dry-run"], 2,
         YAML_FIX,
         _write("bomb.yaml", SPACE_BOMB), "yaml"),
    Case("space-file-alias-bomb", lambda p: ["tune", "--space", p("bomb.yaml"), S, "2"], 2, YAML_FIX,
         _write("bomb.yaml", ALIAS_BOMB), "yaml"),
    Case("config-anchor", lambda p: ["train", "--config", p("c.yaml"), "--dry-run"], 2, YAML_FIX,
         _write("c.yaml", "train: &t\n  workers: 1\n"), "yaml"),
    Case("config-python-object-tag", lambda p: ["train", "--config", p("c.yaml"), "--dry-run"], 2,
         ("is not valid YAML", "python/object"), _write("c.yaml", PICKLE_YAML), "yaml"),
    Case("config-huge-file", lambda p: ["train", "--config", p("c.yaml"), "--dry-run"], 2,
         ("bytes; gan-pipeline reads YAML files of at most",), _write("c.yaml", "# x\n" * 300_000), "yaml"),
    Case("config-not-utf8", lambda p: ["train", "--config", p("c.yaml"), "--dry-run"], 2,
         ("is not UTF-8 text", "save it as UTF-8"), _write("c.yaml", b"train:\n  workers: \xff\xfe\n"), "yaml"),
    Case("config-is-dev-zero", lambda p: ["train", "--config", "/dev/zero", "--dry-run"], 2, ("is not a file",),
         _victim, "yaml"),
    Case("space-file-a-list", lambda p: ["tune", "--space", p("s.yaml"), S, "2"], 2, ("must hold a mapping",),
         _write("s.yaml", "- optim.lr_g\n"), "yaml"),
    Case("space-unknown-distribution", lambda p: ["tune", "--space", p("s.yaml"), S, "2"], 2,
         ("unknown distribution 'normal'", "loguniform"), _write("s.yaml", "optim.lr_g:\n  normal: [0, 1]\n"), "yaml"),
    # -- URIs and secrets
    Case("dry-run-uri-with-password", lambda p: ["train", "--tracking-uri",
                                                 f"https://bob:{URI_PASSWORD}@mlflow.example/", "--dry-run"], 0,
         ("https://***@mlflow.example/",), _victim, "secrets"),
    Case("dry-run-uri-with-token", lambda p: ["train", "--tracking-uri",
                                              f"https://mlflow.example/?token={URI_TOKEN}&x=1", "--dry-run"], 0,
         ("token=***",), _victim, "secrets"),
    Case("models-list-dead-server-password", lambda p: ["models", "list", "--tracking-uri",
                                                        f"http://bob:{URI_PASSWORD}@{p.dead}"], 1, DEAD_FIX,
         _victim, "secrets"),
    Case("models-show-dead-server-token", lambda p: ["models", "show", "m", "--tracking-uri",
                                                     f"http://{p.dead}/?secret_key={URI_TOKEN}"], 1, DEAD_FIX,
         _victim, "secrets"),
    Case("generate-dead-server", lambda p: ["generate", "--model-uri", "models:/m@champion", "--out", p("g.png"),
                                            "--tracking-uri", f"http://bob:{URI_PASSWORD}@{p.dead}"], 1, DEAD_FIX,
         _victim, "secrets"),
    Case("register-dead-server", lambda p: ["register", "--run-id", "0" * 32, "--tracking-uri",
                                            f"http://u:{URI_PASSWORD}@{p.dead}"], 1, DEAD_FIX, _victim, "secrets"),
    Case("train-dead-server", lambda p: _train(p, "--tracking-uri", f"http://u:{URI_PASSWORD}@{p.dead}"), 1,
         (*DEAD_FIX, "Nothing was trained"), _victim, "secrets"),
    Case("secret-typed-as-run-name", lambda p: ["train", "--resume", SECRETS["AWS_SECRET_ACCESS_KEY"] + "/x"], 2,
         NAME_FIX, _victim, "secrets"),
    # -- registry
    Case("models-verify-unknown", lambda p: ["models", "verify", "no-such-model@champion"], 1,
         ("registered model models:/no-such-model@champion not found", "models list"), _victim, "registry"),
    Case("models-verify-malformed", lambda p: ["models", "verify", "no-version-or-alias"], 1, ("not found",),
         _victim, "registry"),
    Case("promote-unknown-model", lambda p: ["promote", "no-such-model"], 1, ("no registered model named",),
         _victim, "registry"),
    Case("generate-model-uri-dotdot", lambda p: ["generate", "--model-uri", "models:/../../x@a", "--out", p("g.png")],
         1, ("not found",), _victim, "registry"),
    Case("data-is-a-user-file", lambda p: ["train", "--data", p("notes.txt"), S, "2"], 1,
         ("no prepared dataset", "gan-pipeline prepare"), _victim, "data"),
]

PRODUCT_FOLDERS = ("gan-runs", "logs")


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` outside the product's folders: type, size, mode and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in PRODUCT_FOLDERS:
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(rel)] = (stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0,
                         stat.S_IMODE(st.st_mode), digest)
    return out


def _imagefolder(root: Path, classes: list[Optional[str]], per_class: int = 12) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in classes:
        folder = root if cls is None else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    from pipelines.config import DataConfig
    from pipelines.prepare import prepare_dataset

    base = tmp_path_factory.mktemp("hostile-data")
    out = {"data": prepare_dataset(DataConfig(dataset="mnist", limit=200), out=str(base / "mnist-tiny")).path}
    for key, classes in (("unlabeled", [None]), ("one_class", ["cats"])):
        source = _imagefolder(base / f"src-{key}", classes)
        out[key] = prepare_dataset(DataConfig(dataset="imagefolder", source=str(source), resolution=28, channels=1),
                                   out=str(base / key)).path
    return out


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def run_cli(args: list[str]):
    from click.testing import CliRunner

    from pipelines.cli import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, monkeypatch, datasets, tracking_db):
    from tests.conftest import free_port

    root = tmp_path / "sandbox"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    monkeypatch.setenv("GAN_PIPELINE_LOG_DIR", str(root / "logs"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key, value in {**SECRETS, **case.env}.items():
        monkeypatch.setenv(key, value)
    paths = Paths(str(root), datasets["data"], datasets["unlabeled"], datasets["one_class"], f"127.0.0.1:{free_port()}")
    (case.setup or _victim)(root, paths)
    outside = tmp_path / "outside"  # a manifest's ../../outside/x.parquet would point here
    before, outside_before = _snapshot(root), sorted(p.name for p in tmp_path.iterdir())

    result, output = run_cli(case.argv(paths))

    assert result.exit_code == case.code, f"exit {result.exit_code}, expected {case.code}:\n{output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    for phrase in case.expect:
        assert phrase in output, f"{phrase!r} not in:\n{output}"
    if case.code:
        assert "internal error" not in output, output
    for secret in ALL_SECRETS:
        assert secret not in output, f"secret {secret!r} printed:\n{output}"
        for log in (root / "logs").glob("*"):
            assert secret not in log.read_text(), f"secret in {log}"
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "files outside the product's folders changed"
    created = [k for k in after if k not in before and k.split("/")[0] not in case.creates]
    assert not created, f"created outside the product's folders: {created}"
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before and not outside.exists()
    assert not (root / "PWNED").exists()


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({tuple(c.argv(DOC_PATHS)) + (c.setup.__qualname__ if c.setup else "",) for c in CASES}) >= 60


def test_internal_error_is_one_line_with_a_private_log(tmp_path, monkeypatch):
    """An unexpected exception (a bug) ends in one redacted line; the redacted traceback goes to a 0600 log."""
    import pipelines.prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAN_PIPELINE_LOG_DIR", str(tmp_path / "logs"))
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom with {SECRETS['MLFLOW_TRACKING_PASSWORD']} and https://u:{URI_PASSWORD}@h/x")

    monkeypatch.setattr(pipelines.prepare, "prepare_stage", broken)
    result, output = run_cli(["prepare"])
    assert result.exit_code == 3, output
    lines = sorted({line for line in output.splitlines() if line.strip()})  # stdout and stderr may both hold it
    assert len(lines) == 1 and lines[0].startswith("Error: internal error: RuntimeError: boom"), output
    assert "please report; details in" in output and "Traceback" not in output
    logs = list((tmp_path / "logs").glob("internal-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in output
    assert stat.S_IMODE(logs[0].stat().st_mode) == 0o600
    text = logs[0].read_text()
    assert "Traceback" in text and "broken" in text
    for secret in ALL_SECRETS:
        assert secret not in text and secret not in output


def test_whatever_a_command_prints_is_redacted(tmp_path, monkeypatch):
    """A library printing the tracking URI it was given (MLflow's "View run at ...") or a relayed worker line with
    an environment secret: the console shows neither secret."""
    import pipelines.prepare

    monkeypatch.chdir(tmp_path)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)

    def chatty(*args, **kwargs):
        print(f"View run at: https://bob:{URI_PASSWORD}@mlflow.example/#/runs/1?token={URI_TOKEN}")
        print(f"(RayTrainWorker pid=1) using {SECRETS['AWS_SECRET_ACCESS_KEY']}", file=sys.stderr)

    monkeypatch.setattr(pipelines.prepare, "prepare_stage", chatty)
    result, output = run_cli(["prepare"])
    assert result.exit_code == 0, output
    assert "View run at: https://***@mlflow.example/#/runs/1?token=***" in output and "using ***" in output
    for secret in ALL_SECRETS:
        assert secret not in output


def corpus_table() -> str:
    """The doc's table, from ``CASES``."""
    rows = ["| # | input | kind | command | exit | the message says |", "| --- | --- | --- | --- | --- | --- |"]
    for number, case in enumerate(CASES, 1):
        argv = " ".join(a if a and " " not in a and "\n" not in a else json.dumps(a) for a in case.argv(DOC_PATHS))
        if len(argv) > 110:
            argv = argv[:107] + "..."
        said = "; ".join(f"“{p}”" for p in case.expect).replace("|", "\\|")
        command = argv.replace("|", "\\|")
        rows.append(f"| {number} | {case.id} | {case.kind} | `gan-pipeline {command}` | {case.code} | {said} |")
    return "\n".join(rows)


def render_doc(text: str) -> str:
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    return f"{head}{DOC_START}\n{corpus_table()}\n{DOC_END}{tail}"


def test_doc_table_is_generated_from_the_corpus():
    text = DOC.read_text()
    assert render_doc(text) == text, "docs/reliability.md is stale: run python -m tests.test_hostile_inputs"


if __name__ == "__main__":  # rewrite the doc's table
    DOC.write_text(render_doc(DOC.read_text()))
    print(f"wrote {len(CASES)} cases to {DOC}", file=sys.stderr)
