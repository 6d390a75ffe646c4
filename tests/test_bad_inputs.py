"""Every bad input ends the command with a clear message naming the problem and the fix: an exit code of 2
(usage: a value or a config file) or 1 (a missing/foreign file, run, model or server), and never a traceback.

The CLI runs in-process (``click.testing.CliRunner`` on ``pipelines.cli.cli``); nothing here starts Ray or a
server, so the file runs in seconds. Other bad inputs are covered elsewhere (see docs/reliability.md):
tests/test_config.py, tests/test_prepare.py, tests/test_reader.py, tests/test_register.py, tests/test_metrics.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.config import DataConfig
from pipelines.prepare import prepare_dataset
from tests.conftest import free_port


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "mnist-tiny"
    return prepare_dataset(DataConfig(dataset="mnist", limit=200), out=str(out)).path


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def work(tmp_path, monkeypatch, tracking_db):
    """A private working directory and a SQLite tracking store (no server, no Ray)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    return tmp_path


def invoke(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result, output


def assert_clean_failure(result, output: str, code: int, phrase: str) -> None:
    assert result.exit_code == code, f"exit {result.exit_code}:\n{output}\n{result.exception!r}"
    # click reports UsageError/ClickException via SystemExit; anything else is an uncaught crash
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    assert phrase in output, output


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (id, args builder(work dir, dataset) -> argv, exit code, key phrase)
CASES = [
    ("workers-0", lambda w, d: ["train", "--workers", "0", "--dry-run"], 2,
     "train.workers: Input should be greater than or equal to 1"),
    ("fp16-on-cpu", lambda w, d: ["train", "--precision", "fp16", "--dry-run"], 2,
     "precision fp16 needs a GPU (--gpu)"),
    ("batch-size-1", lambda w, d: ["train", "--batch-size", "1", "--dry-run"], 2,
     "train.batch_size: Input should be greater than or equal to 2"),
    ("checkpoint-every-0", lambda w, d: ["train", "--checkpoint-every", "0", "--dry-run"], 2,
     "train.checkpoint_every: Input should be greater than or equal to 1"),
    ("resolution-48", lambda w, d: ["train", "--resolution", "48", "--dry-run"], 2,
     "resolution 48 is not supported; use one of (28, 32, 64)"),
    ("channels-2", lambda w, d: ["train", "--channels", "2", "--dry-run"], 2, "channels must be 1 or 3, got 2"),
    ("imagefolder-without-source", lambda w, d: ["prepare", "--dataset", "imagefolder"], 2,
     "dataset imagefolder needs data.source"),
    ("workers-not-a-number", lambda w, d: ["train", "--workers", "two"], 2, "'two' is not a valid integer"),
    ("precision-unknown", lambda w, d: ["train", "--precision", "fp8"], 2, "Invalid value for '--precision'"),
    ("tune-max-concurrent-0", lambda w, d: ["tune", "--max-concurrent", "0"], 2,
     "tune.max_concurrent: Input should be greater than or equal to 1"),
    ("config-missing", lambda w, d: ["train", "--config", str(w / "nope.yaml"), "--dry-run"], 2,
     "nope.yaml does not exist"),
    ("config-not-yaml", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "train: [workers: 2\n"), "--dry-run"],
     2, "is not valid YAML"),
    ("config-a-list", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "- train\n- model\n"), "--dry-run"], 2,
     "must hold a mapping of sections"),
    ("config-unknown-key", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "train:\n  wrkers: 2\n"),
                                         "--dry-run"], 2, "train.wrkers: unknown key; check the spelling"),
    ("config-unknown-section", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "trian:\n  workers: 2\n"),
                                             "--dry-run"], 2, "trian: unknown key"),
    ("config-wrong-type", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "train:\n  workers: many\n"),
                                        "--dry-run"], 2, "train.workers: Input should be a valid integer"),
    ("config-section-not-mapping", lambda w, d: ["train", "--config", _yaml(w / "c.yaml", "optim: 0.1\n"),
                                                 "--dry-run"], 2, "section 'optim' must be a mapping"),
    ("tracking-file-store", lambda w, d: ["train", "--tracking-uri", "file:./mlruns", "--max-steps", "2"], 1,
     "is a file store, which MLflow 3 refuses"),
    ("resume-unknown-run", lambda w, d: ["train", "--resume", "no-such-run"], 1,
     "no training run named 'no-such-run'"),
    ("data-not-a-dataset", lambda w, d: ["train", "--data", str(w), "--max-steps", "2"], 1,
     "manifest.json is missing: never prepared"),
    ("data-missing-dir", lambda w, d: ["train", "--data", str(w / "nowhere"), "--max-steps", "2"], 1,
     "no prepared dataset at"),
    ("data-manifest-not-json", lambda w, d: ["train", "--data", _manifest(w, "{not json"), "--max-steps", "2"], 1,
     "is not valid JSON"),
    ("data-manifest-foreign", lambda w, d: ["train", "--data", _manifest(w, '{"hello": 1}'), "--max-steps", "2"], 1,
     "not a gan-pipeline manifest"),
    ("storage-path-is-a-file", lambda w, d: ["train", "--data", d, "--storage-path", _file(w / "f") + "/ckpt",
                                             "--max-steps", "2"], 1, "is not a writable directory"),
    ("run-name-exists", lambda w, d: ["train", "--data", d, "--run-name", _record(w, "taken"), "--max-steps", "2"],
     1, "a training run named 'taken' exists; resume it with --resume taken"),
    ("evaluate-no-source", lambda w, d: ["evaluate"], 1, "name exactly one generator"),
    ("evaluate-two-sources", lambda w, d: ["evaluate", "--run-id", "abc", "--checkpoint", str(w)], 1,
     "name exactly one generator"),
    ("evaluate-checkpoint-missing", lambda w, d: ["evaluate", "--checkpoint", str(w / "nowhere")], 1,
     "is not a directory"),
    ("evaluate-checkpoint-not-a-checkpoint", lambda w, d: ["evaluate", "--checkpoint", str(w)], 1,
     "is not a gan-pipeline checkpoint: config.json is missing"),
    ("evaluate-checkpoint-truncated", lambda w, d: ["evaluate", "--checkpoint", _checkpoint(w, b"PK\x03\x04trunc")],
     1, "is unreadable or truncated"),
    ("evaluate-checkpoint-no-weights", lambda w, d: ["evaluate", "--checkpoint", _checkpoint(w, None)], 1,
     "generator.pt is missing"),
    ("evaluate-checkpoint-of-a-run-elsewhere", lambda w, d: ["evaluate", "--checkpoint", _foreign_run_checkpoint(w, d)],
     1, "does not hold, so its metrics would have nowhere to go; pass the --tracking-uri it was trained with"),
    ("evaluate-dataset-too-small-for-the-metrics",
     lambda w, d: ["evaluate", "--checkpoint", _foreign_run_checkpoint(w, d, run_id=None)], 2,
     "real ones are at most eval.num_samples of the dataset's held-out split: lower eval.kid_subset_size"),
    ("evaluate-run-unknown", lambda w, d: ["evaluate", "--run-id", "0123456789abcdef"], 1,
     "MLflow run '0123456789abcdef' not found"),
    ("evaluate-model-uri-malformed", lambda w, d: ["evaluate", "--model-uri", "mnist-cgan"], 1,
     "must look like models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("evaluate-model-unknown-alias", lambda w, d: ["evaluate", "--model-uri", "models:/no-such-model@champion"], 1,
     "registered model models:/no-such-model@champion not found"),
    ("generate-n-0", lambda w, d: ["generate", "--model-uri", "models:/x@champion", "--n", "0", "--out",
                                   str(w / "g.png")], 2, "--n must be at least 1, got 0"),
    ("generate-format-gif", lambda w, d: ["generate", "--model-uri", "models:/x@champion", "--format", "gif",
                                          "--out", str(w / "g.gif")], 2, "Invalid value for '--format'"),
    ("tune-space-unknown-key", lambda w, d: ["tune", "--space", _yaml(w / "s.yaml", "optim.lrg:\n  uniform: [0, 1]\n"),
                                             "--max-steps", "2"], 2,
     "search space key 'optim.lrg' is not a config key"),
]


def _manifest(w: Path, text: str) -> str:
    d = w / "fake-dataset"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(text)
    return str(d)


def _file(path: Path) -> str:
    path.write_text("not a directory")
    return str(path)


def _record(w: Path, name: str) -> str:
    (w / "gan-runs" / "train").mkdir(parents=True, exist_ok=True)
    (w / "gan-runs" / "train" / f"{name}.json").write_text("{}")
    return name


def _checkpoint(w: Path, generator_bytes) -> str:
    """A checkpoint dir with a valid config.json and a broken (or no) generator.pt."""
    from pipelines.config import PipelineConfig

    d = w / "ckpt"
    d.mkdir(exist_ok=True)
    spec = PipelineConfig().gan_spec(28, 1, 10)
    (d / "config.json").write_text(json.dumps({"gan_spec": asdict(spec), "data_path": "x", "manifest_hash": "y"}))
    if generator_bytes is not None:
        (d / "generator.pt").write_bytes(generator_bytes)
    return str(d)


def _foreign_run_checkpoint(w: Path, data_path: str, run_id="0123456789abcdef0123456789abcdef") -> str:
    """A sound checkpoint whose training run lives in another tracking store than the one the command uses
    (``run_id=None``: a checkpoint with no training run, whose metrics stay on disk)."""
    import torch

    from gan_models.step import build_generator
    from pipelines.config import PipelineConfig
    from pipelines.data.reader import load_manifest

    d = w / "ckpt-from-elsewhere"
    d.mkdir()
    spec = PipelineConfig().gan_spec(28, 1, 10)
    config = {"gan_spec": asdict(spec), "data_path": data_path,
              "manifest_hash": load_manifest(data_path)["manifest_hash"]}
    (d / "config.json").write_text(json.dumps({**config, **({"mlflow_run_id": run_id} if run_id else {})}))
    torch.save(build_generator(spec).state_dict(), d / "generator.pt")
    return str(d)


@pytest.mark.parametrize("args, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(args, code, phrase, work, tiny_data):
    result, output = invoke(args(work, tiny_data))
    assert_clean_failure(result, output, code, phrase)


def test_storage_refusal_comes_before_any_work(work, tiny_data):
    """An unwritable storage path costs a second: no MLflow run, no prepared data, no Ray."""
    blocker = Path(_file(work / "blocker"))
    start = time.monotonic()
    result, output = invoke(["train", "--storage-path", str(blocker / "ckpt"), "--max-steps", "2"])
    assert_clean_failure(result, output, 1, f"checkpoint storage {blocker / 'ckpt'} is not a writable directory")
    assert "--storage-path" in output and time.monotonic() - start < 10
    assert not (work / "gan-runs" / "data").exists() and not (work / "gan-runs" / "train").exists()


@pytest.mark.integration  # ray.init is attempted (no cluster is started)
def test_dead_cluster_address_fails_fast(work, tiny_data):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    result, output = invoke(["train", "--address", address, "--data", tiny_data, "--max-steps", "2"])
    seconds = time.monotonic() - start
    assert_clean_failure(result, output, 1, f"cannot join the Ray cluster at {address!r}")
    assert seconds < 30, f"took {seconds:.0f} s"
