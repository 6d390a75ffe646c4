"""Shared fixtures. ``mlflow_server``: one real MLflow tracking server (SQLite + local artifacts) per session;
``small_mnist``: the first 2,000 MNIST training images, prepared once per session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_classifier_cache(tmp_path_factory):
    """Every run scores its checkpoints with the dataset's domain classifier: train it once per dataset for the
    whole session (the cache is keyed by manifest hash), not once per test's runs dir."""
    from pipelines.evaluate import CLASSIFIER_CACHE_ENV

    before = os.environ.get(CLASSIFIER_CACHE_ENV)
    os.environ[CLASSIFIER_CACHE_ENV] = str(tmp_path_factory.mktemp("classifiers"))
    yield os.environ[CLASSIFIER_CACHE_ENV]
    if before is None:
        os.environ.pop(CLASSIFIER_CACHE_ENV, None)
    else:
        os.environ[CLASSIFIER_CACHE_ENV] = before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Terminate ``proc`` and its process group (the server forks workers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=timeout)


def kill_orphaned_ray_workers() -> None:
    """A driver killed with SIGKILL leaves its local Ray's training actors running for a while; a real crash of
    the machine would take them along. Tests that kill a driver end them too, so they cannot write on."""
    subprocess.run(["pkill", "-9", "-f", "ray::RayTrainWorker|ray::TrainController"], check=False)
    time.sleep(1)


def kill_driver_after_checkpoint(proc: subprocess.Popen, storage: Path, pattern: str, timeout: float) -> None:
    """Wait until a checkpoint matching ``pattern`` exists under ``storage``, then SIGKILL the driver's process
    group and its orphaned Ray training actors: a driver crash in the middle of training."""
    deadline = time.monotonic() + timeout
    while not list(storage.glob(pattern)):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint {pattern} within {timeout:.0f} s"
        time.sleep(0.5)
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)
    kill_orphaned_ray_workers()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI (``http://127.0.0.1:<port>``) of a real ``mlflow server`` on SQLite; stopped at session end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    cmd = [mlflow_exe, "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
           "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "wb")
    # The server's background job runners (several huey consumers) are not needed for tracking and would
    # compete with training for the two cores.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=90, proc=proc, what="mlflow server")
    except RuntimeError as exc:
        stop_process(proc)
        log.close()
        raise RuntimeError(f"{exc}\n--- server log ---\n{(root / 'server.log').read_text()[-4000:]}") from None
    try:
        yield uri
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory) -> str:
    """Path of a prepared dataset of the first 2,000 MNIST training images (and the held-out split)."""
    from pipelines.config import DataConfig
    from pipelines.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "mnist-small"
    return prepare_dataset(DataConfig(dataset="mnist", limit=2000), out=str(out)).path
