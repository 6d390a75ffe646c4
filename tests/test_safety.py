"""Unit tests of the safety modules (pipelines.safety, .secrets, .integrity, .runs) and of what the corpus in
tests/test_hostile_inputs.py cannot see from the outside: a rebuilt tampered dataset, the verification cache, a
failing sweep's parent run. Real files, a real SQLite MLflow store; no Ray."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines import integrity, safety, secrets
from pipelines.errors import BadValue


@pytest.mark.parametrize("uri, shown", [
    ("https://bob:pw@host/x", "https://***@host/x"),
    ("https://bob:p@ss/w0rd@host:5000/x", "https://***@host:5000/x"),
    ("http://host/?token=abc&x=1", "http://host/?token=***&x=1"),
    ("https://h/o?X-Amz-Signature=abcd&X-Amz-Credential=AKIA/x&v=2", "https://h/o?X-Amz-Signature=***&X-Amz-Credential=***&v=2"),
    ("s3://bucket/key@v1", "s3://bucket/key@v1"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("models:/m@champion", "models:/m@champion"),
    ("see http://u:p@a/ and ftp://c:d@e", "see http://***@a/ and ftp://***@e"),
])
def test_redact_uri(uri, shown):
    assert secrets.redact_uri(uri) == shown


def test_redaction_survives_a_variable_deleted_while_it_reads_the_environment():
    """MLflow's telemetry thread deletes a variable of its own while a sweep's trial redacts its params: the
    deletion between a key's listing and its read raised KeyError and killed the trial."""
    import collections.abc

    class Vanishing(collections.abc.Mapping):  # os.environ's shape: keys listed, then each one read
        def __init__(self):
            self.data = {"_MLFLOW_TELEMETRY_SESSION_ID": "s", "MY_API_TOKEN": "tok-1234567890"}

        def __iter__(self):
            keys = list(self.data)
            del self.data["_MLFLOW_TELEMETRY_SESSION_ID"]  # the other thread, right after the keys were listed
            return iter(keys)

        def __len__(self):
            return len(self.data)

        def __getitem__(self, key):
            return self.data[key]

    assert secrets.redact_text("key tok-1234567890", Vanishing()) == "key ***"


def test_redact_text_masks_secret_environment_values_only():
    env = {"MLFLOW_TRACKING_PASSWORD": "hunter22", "AWS_ACCESS_KEY_ID": "AKIA1234", "PWD": "/home/me",
           "HOME": "/home/me", "MY_API_KEY": "k3y-value", "SHORT_TOKEN": "ab"}
    text = "hunter22 AKIA1234 /home/me k3y-value ab"
    assert secrets.redact_text(text, env) == "*** *** /home/me *** ab"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a b", ".", "..", "-lead", "", "x" * 129, "a\nb", "a..b"])
def test_unsafe_names_refused(name):
    with pytest.raises(BadValue, match="is not a valid name"):
        safety.check_name(name, "--run-name")


@pytest.mark.parametrize("name", ["dcgan-20261126-101010", "mnist-cgan-1a2b3c4d-train-x", "run_1.2", "A"])
def test_safe_names_pass(name):
    assert safety.check_name(name, "--run-name") == name


def test_yaml_refuses_anchors_and_bounds_size(tmp_path):
    good = tmp_path / "ok.yaml"
    good.write_text("train:\n  workers: 2\n")
    assert safety.load_yaml(good) == {"train": {"workers": 2}}
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [1, 1]\nb: [*a, *a]\n")
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="anchors and aliases"):
        safety.load_yaml(bomb)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (safety.MAX_YAML_BYTES + 1))
    with pytest.raises(ConfigError, match="at most"):
        safety.load_yaml(big)


def test_folder_rules(tmp_path):
    safety.check_folder(tmp_path / "new", "x", "--out")  # absent: fine
    (tmp_path / "empty").mkdir()
    safety.check_folder(tmp_path / "empty", "x", "--out")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("work")
    with pytest.raises(safety.ForeignFolder, match="thesis.tex"):
        safety.check_folder(tmp_path / "user", "x", "--out")
    claimed = safety.claim_folder(tmp_path / "mine")
    (claimed / "anything").write_text("ours")
    safety.check_folder(claimed, "x", "--out")  # marked: ours
    (tmp_path / "runs" / "train").mkdir(parents=True)
    safety.check_runs_dir(str(tmp_path / "runs"))  # an older runs folder without marker
    safety.check_storage_folder(tmp_path / "runs" / "checkpoints")


@pytest.fixture
def dataset(tmp_path):
    from pipelines.config import DataConfig
    from pipelines.prepare import prepare_dataset

    return prepare_dataset(DataConfig(dataset="mnist", limit=200), out=str(tmp_path / "ds")).path


def _manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def test_prepare_rebuilds_a_dataset_with_zeroed_hashes(dataset):
    """Before: zeroed hashes were used and prepare answered 'already prepared'."""
    from pipelines.config import DataConfig
    from pipelines.data.reader import load_manifest
    from pipelines.prepare import prepare_dataset

    manifest = _manifest(dataset)
    good = [s["sha256"] for s in manifest["shards"]]
    for shard in manifest["shards"]:
        shard["sha256"] = "0" * 64
    with open(os.path.join(dataset, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    (Path(dataset) / integrity.VERIFIED_CACHE).unlink(missing_ok=True)
    with pytest.raises(integrity.IntegrityError, match="hash mismatch"):
        load_manifest(dataset)
    again = prepare_dataset(DataConfig(dataset="mnist", limit=200), out=dataset)
    assert not again.skipped and [s["sha256"] for s in _manifest(dataset)["shards"]] == good


def test_verification_is_cached_by_mtime_and_catches_same_size_edits(dataset):
    from pipelines.data.reader import load_manifest

    load_manifest(dataset)
    cache = json.loads(open(os.path.join(dataset, integrity.VERIFIED_CACHE)).read())
    assert set(cache) == {s["path"] for s in _manifest(dataset)["shards"]}
    shard = os.path.join(dataset, _manifest(dataset)["shards"][0]["path"])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes, new mtime
    stamp = os.stat(shard).st_mtime_ns
    with open(shard, "wb") as fh:
        fh.write(data)
    os.utime(shard, ns=(stamp + 10**9, stamp + 10**9))
    with pytest.raises(integrity.IntegrityError, match="hash mismatch"):
        load_manifest(dataset)


def test_folder_digest_is_what_sha256sum_prints(tmp_path):
    (tmp_path / "code" / "gan_models").mkdir(parents=True)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "code" / "gan_models" / "a.py").write_text("x = 1\n")
    if shutil.which("sha256sum") and shutil.which("find"):
        import subprocess

        shell = ("(find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum) | sha256sum")
        out = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == integrity.folder_digest(tmp_path)[0]


def test_failed_sweep_marks_its_parent_run_failed(tmp_path, monkeypatch):
    """A sweep that fails after creating its MLflow parent run leaves it FAILED, not RUNNING for good."""
    from mlflow.tracking import MlflowClient

    import pipelines.tune as tune
    from pipelines.config import build_config
    from pipelines.prepare import prepare_dataset

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = prepare_dataset(build_config("dcgan").data.model_copy(update={"limit": 200}), out=str(tmp_path / "d")).path
    cfg = build_config("dcgan", None, {"data": {"path": data}, "tracking": {"tracking_uri": uri},
                                        "train": {"max_steps": 2}})

    def broken(*args, **kwargs):
        raise RuntimeError("the classifier could not be trained")

    import pipelines.scoring

    monkeypatch.setattr(pipelines.scoring, "prepare_reference", broken)
    with pytest.raises(RuntimeError):
        tune.tune_stage(cfg)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
    assert [(r.data.tags["gan_pipeline.stage"], r.info.status) for r in runs] == [("tune", "FAILED")]


def test_a_worker_traceback_inside_a_message_is_cut_to_one_line(tmp_path, monkeypatch):
    from pipelines.guard import without_traceback

    monkeypatch.setenv("GAN_PIPELINE_LOG_DIR", str(tmp_path))
    message = ("training failed: Training failed due to worker errors:\nTraceback (most recent call last):\n"
               '  File "loop.py", line 3, in step\n    x = 1 / 0\nZeroDivisionError: division by zero\n')
    short = without_traceback(message)
    assert "Traceback" not in short and "\n" not in short
    assert short.startswith("training failed") and "ZeroDivisionError: division by zero" in short
    log = next(tmp_path.glob("error-details-*.log"))
    assert str(log) in short and "x = 1 / 0" in log.read_text()
