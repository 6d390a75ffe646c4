"""Security: planted pickles in checkpoints are refused (never executed), servers bind 127.0.0.1, credentials
never reach MLflow params, recorded configs or the console. (The classifier-cache pickle is in
tests/test_metrics.py; the infra compose binding in tests/test_infra.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipelines import tracking
from pipelines.cli import cli
from pipelines.config import PipelineConfig, build_config
from tests.test_reliability import EXE, SECRETS, env_for, restart_run  # noqa: F401 (a session fixture)


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, path)


def test_payload_is_live_when_unpickled(tmp_path):
    """Control: the planted file really runs code under a plain ``torch.load(weights_only=False)``."""
    marker = tmp_path / "control-marker"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_evaluate_checkpoint_refuses_planted_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"gan_spec": asdict(PipelineConfig().gan_spec(28, 1, 10))}))
    marker = tmp_path / "pwned-evaluate"
    plant(ckpt / "generator.pt", marker)
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(ckpt)])
    assert result.exit_code == 1, result.output
    assert f"refused to load {ckpt / 'generator.pt'}" in result.output
    assert "never unpickles arbitrary code" in result.output and "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.integration
def test_resume_refuses_planted_state(restart_run, tmp_path):
    """``train --resume`` of a run whose last checkpoint's state.pt was replaced by a pickle payload: the worker
    refuses it, the run fails with the refusal in its message, and the payload never runs."""
    run_dir = restart_run["runs"] / "checkpoints" / "restart"
    last = sorted(run_dir.glob("checkpoint_0*"))[-1]
    marker = tmp_path / "pwned-resume"
    plant(last / "state.pt", marker)
    result = subprocess.run([EXE, "train", "--runs-dir", str(restart_run["runs"]), "--resume", "restart"],
                            env=env_for(restart_run["uri"]), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    # the driver reads the last checkpoint's progress before starting Ray: refused there, in seconds
    assert f"refused to load {last / 'state.pt'}" in result.stderr, output[-4000:]
    assert "never unpickles arbitrary code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_local_ray_dashboard_binds_loopback(monkeypatch):
    """The local Ray instance the project starts: dashboard on 127.0.0.1, always a fresh instance."""
    import ray

    from pipelines import cluster

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4})
    with cluster.ray_session(None, cpus_needed=1, env={"MLFLOW_TRACKING_PASSWORD": "pw"}):
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw"  # inherited by the local workers
    assert seen["dashboard_host"] == "127.0.0.1" and seen["address"] == "local"
    assert seen["_node_ip_address"] == "127.0.0.1"
    assert "runtime_env" not in seen  # Ray writes runtime_env env_vars in clear to its session logs


def test_redact_params_and_configs():
    uri = "http://alice:hunter2@mlflow.example:5000"
    params = tracking.redact({"tracking.tracking_uri": uri, "aws_secret_access_key": "abc", "s3_token": "t",
                              "train.workers": 2, "data.path": "s3://AKIAX:sekrit@bucket/data"})
    assert params["tracking.tracking_uri"] == "http://***@mlflow.example:5000"
    assert params["aws_secret_access_key"] == "***" and params["s3_token"] == "***"
    assert params["data.path"] == "s3://***@bucket/data" and params["train.workers"] == "2"
    dump = tracking.redact_config(build_config(overrides={"tracking": {"tracking_uri": uri}}).model_dump(mode="json"))
    assert "hunter2" not in json.dumps(dump) and dump["tracking"]["tracking_uri"] == "http://***@mlflow.example:5000"


def test_new_run_records_no_credentials(monkeypatch):
    """The param-building path of ``train`` (``_new_run``): params and the config.json artifact."""
    from pipelines import train

    logged = {"params": [], "dicts": []}

    class FakeClient:
        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, tags=None):
            return "1"

        def create_run(self, exp, run_name, tags):
            return type("R", (), {"info": type("I", (), {"run_id": "r1"})()})()

        def log_batch(self, run_id, params=(), metrics=()):
            logged["params"].extend(params)

        def log_dict(self, run_id, d, name):
            logged["dicts"].append(d)

        def log_inputs(self, run_id, datasets=None, models=None):
            logged["dicts"].extend(str(d) for d in datasets or ())

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-SECRET")
    cfg = build_config(overrides={"tracking": {"tracking_uri": "https://bob:pw-SECRET@mlflow.example"}})
    train._new_run(cfg, FakeClient(), "r", "/data", {"manifest_hash": "h" * 64, "dataset": "mnist"})
    text = json.dumps([(p.key, p.value) for p in logged["params"]]) + json.dumps(logged["dicts"])
    assert "pw-SECRET" not in text
    assert {p.key: p.value for p in logged["params"]}["tracking.tracking_uri"] == "https://***@mlflow.example"


def test_tracking_uri_with_credentials_is_reachable_and_never_echoed():
    from pipelines.errors import TrackingUnavailable
    from tests.conftest import free_port

    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable) as err:
        tracking.check_reachable(uri, timeout=2)
    assert "hunter2" not in str(err.value) and "http://***@127.0.0.1" in str(err.value)


@pytest.mark.integration
def test_real_run_params_and_output_hold_no_secrets(restart_run):
    """The restart run had MLFLOW_TRACKING_PASSWORD and AWS keys in its environment (passed on to the workers):
    none appears in its MLflow params, its config artifacts, or its console output."""
    c, run_id = restart_run["client"], restart_run["run_id"]
    params = c.get_run(run_id).data.params
    assert len(params) > 50
    dumped = json.dumps(params) + restart_run["output"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for artifact in ("config.json", "generator/config.json"):
            dumped += Path(c.download_artifacts(run_id, artifact, tmp)).read_text()
    for secret in SECRETS.values():
        assert secret not in dumped
