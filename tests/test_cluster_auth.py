"""Joining a token-auth Ray cluster (``ray start --head``, Ray 2.60) with ``gan-pipeline train --address``: the
user's token is used; without one, the error says what is missing and how to provide it."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, stop_process

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
TINY = ["--batch-size", "16", "--ngf", "8", "--ndf", "8", "--nz", "16", "--log-every", "2",
        "--checkpoint-every", "2", "--sample-every", "2"]


def _env(home: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A real ``ray start --head`` that requires the token in its user's ``~/.ray/auth_token``."""
    home = tmp_path_factory.mktemp("head-home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    # Ray's socket paths must stay short (107 bytes): not under pytest's long tmp path
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    port = free_port()
    log_path = home / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", str(port),
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard",
                                 "false", "--temp-dir", temp_dir, "--disable-usage-stats"],
                                env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "home": home}
    finally:
        stop_process(proc, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _train(token_head, home, tmp_path, mlflow_server, small_mnist):
    return subprocess.run([str(BIN / "gan-pipeline"), "train", "--address", token_head["address"], "--workers", "1",
                           "--max-steps", "2", "--data", small_mnist, "--runs-dir", str(tmp_path / "runs"), *TINY],
                          env=_env(home, MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True,
                          timeout=300)


def test_train_joins_a_token_cluster_with_the_users_token(token_head, tmp_path, mlflow_server, small_mnist):
    result = _train(token_head, token_head["home"], tmp_path, mlflow_server, small_mnist)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "step 2/2" in result.stdout + result.stderr


def test_without_a_token_the_error_says_what_is_missing(token_head, tmp_path, mlflow_server, small_mnist):
    stranger = tmp_path / "no-token-home"
    stranger.mkdir()
    result = _train(token_head, stranger, tmp_path, mlflow_server, small_mnist)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "No Ray authentication token was found" in output and "RAY_AUTH_TOKEN" in output, output[-3000:]
    assert "ray get-auth-token" in output and "Traceback" not in output
