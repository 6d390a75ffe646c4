"""Training on a real local Ray cluster, tracked in a real MLflow server over HTTP, on real Parquet.

Each test runs ``gan-pipeline train`` as its own process, the way a user does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.checkpoints import safe_load
from tests.conftest import free_port, kill_driver_after_checkpoint

pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "gan-pipeline")
SMALL = ["--batch-size", "16", "--ngf", "16", "--ndf", "16", "--nz", "32", "--log-every", "2",
         "--checkpoint-every", "4", "--sample-every", "4"]


def _train(args, tmp_path, mlflow_server, env_extra=None, timeout=300, wait=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [EXE, "train", "--runs-dir", str(tmp_path / "runs"), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_quiet_console(output: str, steps: int, log_every: int) -> None:
    """Not a terminal (a pipe, as in CI): the product's lines, one per log step, and nothing of Ray's (no worker
    prefixes, no error-level lines of a successful run: they stay in Ray's session logs)."""
    lines = output.splitlines()
    progress = [line for line in lines if line.startswith("[gan-pipeline] step ")]
    assert [line.split()[2] for line in progress] == [f"{s}/{steps}" for s in range(log_every, steps + 1, log_every)], output
    assert sum(line.startswith("[gan-pipeline] trained ") for line in lines) == 1, output
    for noise in ("(RayTrainWorker", "(TrainController", "(raylet)", "pid=", "core_worker", "PreemptionWatcher",
                  "ERROR", "Token authentication", "Started a local Ray instance", "INFO"):
        assert noise not in output, (noise, output)
    assert len(lines) < 20, output


def _run_by_name(client, name):
    runs = client.search_runs(experiment_ids=[client.get_experiment_by_name("gan-pipeline").experiment_id],
                              filter_string=f"tags.gan_pipeline.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, got {len(runs)}"
    return runs[0]


def _steps(client, run_id, key="g_loss"):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_two_workers_log_params_metrics_images_and_keep_replicas_identical(small_mnist, tmp_path, mlflow_server):
    result = _train(["--model", "wgan", "--workers", "2", "--max-steps", "8", "--data", small_mnist,
                     "--run-name", "wgan-two", *SMALL], tmp_path, mlflow_server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_quiet_console(result.stdout + result.stderr, steps=8, log_every=2)
    client = _client(mlflow_server)
    run = _run_by_name(client, "wgan-two")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.clip_value"] == "0.01" and params["optim.n_critic"] == "5"
    assert params["train.workers"] == "2" and len(params["data.manifest_hash"]) == 64
    assert "git_commit" in params and "package_version" in params
    assert _steps(client, run.info.run_id) == [2, 4, 6, 8]
    for key in ("d_loss", "wasserstein_estimate", "d_real", "d_fake", "d_grad_norm", "g_grad_norm",
                "images_per_second"):
        assert _steps(client, run.info.run_id, key) == [2, 4, 6, 8], key
    # both data-parallel ranks hold identical weights at every checkpoint (clipping included)
    spread = client.get_metric_history(run.info.run_id, "replica_max_abs_diff")
    assert [m.step for m in spread] and all(m.value == 0.0 for m in spread)
    # the WGAN preset's learning rates decay over the second half of the run, by the same amount on both ranks
    scales = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr_scale")}
    assert scales == pytest.approx({2: 1.0, 4: 1.0, 6: 0.525, 8: 0.05})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"generator", "loss_curves.png", "config.json"} <= artifacts
    assert any(a.path.startswith("images") for a in client.list_artifacts(run.info.run_id, "images") or []) or \
        "images" in artifacts
    ckpt_dir = Path(run.data.tags["gan_pipeline.checkpoint_dir"])
    state = safe_load(ckpt_dir / "state.pt")
    assert state["progress"]["step"] == 8
    assert [g["lr"] for g in state["opt_g"]["param_groups"]] == pytest.approx([1e-3 * 0.05])
    critic = state["discriminator"]
    assert max(t.abs().max().item() for k, t in critic.items() if t.is_floating_point() and "running" not in k) <= 0.01 + 1e-7


def test_checkpoints_by_time_fall_at_the_same_step_on_every_rank(small_mnist, tmp_path, mlflow_server):
    """No --checkpoint-every: checkpoints come by time. An interval shorter than a log window makes every log step
    a checkpoint; a rank deciding alone would leave the other waiting in ``ray.train.report`` (a hang, not this)."""
    at = SMALL.index("--checkpoint-every")
    timed = SMALL[:at] + SMALL[at + 2:]
    result = _train(["--model", "dcgan", "--workers", "2", "--max-steps", "4", "--no-score-checkpoints",
                     "--data", small_mnist,
                     "--checkpoint-interval", "0.001s", "--run-name", "timed", *timed], tmp_path, mlflow_server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = _client(mlflow_server)
    run = _run_by_name(client, "timed")
    # replica_max_abs_diff is computed at checkpoints only (a collective on both ranks)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "replica_max_abs_diff")] == [2, 4]
    assert safe_load(Path(run.data.tags["gan_pipeline.checkpoint_dir"]) / "state.pt")["progress"]["step"] == 4


def test_killed_worker_restarts_from_checkpoint_without_duplicate_metrics(small_mnist, tmp_path, mlflow_server):
    result = _train(["--model", "dcgan", "--workers", "2", "--max-steps", "12", "--data", small_mnist,
                     "--max-failures", "2", "--run-name", "killed-worker", *SMALL], tmp_path, mlflow_server,
                    env_extra={"GAN_PIPELINE_FAULT": "kill@7:1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    client = _client(mlflow_server)
    run = _run_by_name(client, "killed-worker")
    assert run.info.status == "FINISHED"
    # rank 1 died at step 7; the restarted group resumed from the step-4 checkpoint, once
    assert run.data.tags["gan_pipeline.resumed_from_step"] == "4"
    assert run.data.tags["gan_pipeline.restarts"] == "1"
    assert _steps(client, run.info.run_id) == [2, 4, 6, 8, 10, 12]
    ckpt_dir = Path(run.data.tags["gan_pipeline.checkpoint_dir"])
    assert safe_load(ckpt_dir / "state.pt")["progress"]["step"] == 12
    # the scored checkpoints' LoggedModels: one per step, the restarted worker made none twice
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(int(m.tags["gan_pipeline.checkpoint_step"]) for m in models) == [4, 8, 12]


def test_killed_driver_resumes_with_resume(small_mnist, tmp_path, mlflow_server):
    proc = _train(["--model", "dcgan", "--workers", "1", "--max-steps", "40", "--data", small_mnist,
                   "--run-name", "killed-driver", *SMALL], tmp_path, mlflow_server, wait=False)
    kill_driver_after_checkpoint(proc, tmp_path / "runs" / "checkpoints" / "killed-driver", "checkpoint_00000008", 240)
    time.sleep(2)
    result = _train(["--resume", "killed-driver"], tmp_path, mlflow_server)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    resumed_at = int(output.split("last checkpoint: step ")[1].split()[0])
    assert resumed_at >= 8, "nothing restarts from zero"
    client = _client(mlflow_server)
    run = _run_by_name(client, "killed-driver")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["gan_pipeline.resumed_from_step"]) == resumed_at
    assert _steps(client, run.info.run_id) == list(range(2, 41, 2))


def test_nan_loss_stops_the_run_keeps_last_good_checkpoint_and_marks_it_failed(small_mnist, tmp_path, mlflow_server):
    result = _train(["--model", "dcgan", "--workers", "2", "--max-steps", "12", "--data", small_mnist,
                     "--run-name", "diverges", *SMALL], tmp_path, mlflow_server, env_extra={"GAN_PIPELINE_FAULT": "nan@6"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "training diverged (non-finite d_loss at step 6)" in output
    client = _client(mlflow_server)
    run = _run_by_name(client, "diverges")
    assert run.info.status == "FAILED"
    storage = tmp_path / "runs" / "checkpoints" / "diverges"
    assert (storage / "checkpoint_00000004" / "state.pt").exists()
    assert not list(storage.glob("checkpoint_0000000[6-9]")) and not (storage / "checkpoint_00000012").exists()
    assert _steps(client, run.info.run_id) == [2, 4]


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = subprocess.run([EXE, "train", "--tracking-uri", uri, "--runs-dir", str(tmp_path), "--max-steps", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr
    assert time.monotonic() - start < 30
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()


def test_train_with_default_paths_from_a_fresh_working_directory(small_mnist, tmp_path):
    """No --runs-dir, a relative --data and the default SQLite store: every path is relative to a working
    directory that Ray workers do not share; the driver resolves them before they cross to a worker."""
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([EXE, "train", "--data", os.path.relpath(small_mnist, work), "--max-steps", "4",
                             "--run-name", "relative", *SMALL], cwd=work, env={**env, "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / "gan-runs" / "checkpoints" / "relative" / "checkpoint_00000004" / "generator.pt").is_file()
    client = _client(f"sqlite:///{work / 'mlflow.db'}")
    assert _steps(client, _run_by_name(client, "relative").info.run_id) == [2, 4]
