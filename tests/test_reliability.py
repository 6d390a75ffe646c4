"""Faults on real processes: the MLflow server restarted mid-run, checkpoint storage full or read-only, four
Tune trials logging at once, and bit-identical reruns. Each test runs ``gan-pipeline`` as its own process,
like tests/test_train_integration.py (which covers worker SIGKILL, driver kill + --resume, NaN, and an
unreachable server at start). Measured numbers are printed with ``[measured]`` (run with ``-s`` to see them);
docs/reliability.md records them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.checkpoints import safe_load
from tests.conftest import free_port, stop_process, wait_http

pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "gan-pipeline")
SMALL = ["--batch-size", "16", "--ngf", "16", "--ndf", "16", "--nz", "32", "--log-every", "2",
         "--checkpoint-every", "4", "--sample-every", "4", "--seed", "7"]
# Fake credentials in the environment of the restart run: tests/test_security.py checks none reaches MLflow params
# or the console.
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-SECRET-4c1d", "AWS_ACCESS_KEY_ID": "AKIA-SECRET-77aa",
           "AWS_SECRET_ACCESS_KEY": "aws-SECRET-91be"}


def start_mlflow(root: Path, port: int) -> subprocess.Popen:
    mlflow_exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen([mlflow_exe, "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    log.close()
    wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc, what="mlflow server")
    return proc


def train_cmd(runs_dir: Path, *args) -> list[str]:
    return [EXE, "train", "--runs-dir", str(runs_dir), *args]


def env_for(uri: str, **extra) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **extra}


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def run_by_name(mlflow_client, name: str):
    exp = mlflow_client.get_experiment_by_name("gan-pipeline")
    runs = mlflow_client.search_runs([exp.experiment_id], filter_string=f"tags.gan_pipeline.run_name = '{name}'")
    assert len(runs) == 1, f"expected one run named {name}, got {len(runs)}"
    return runs[0]


def history_steps(mlflow_client, run_id: str, key: str = "g_loss") -> list[int]:
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))


def final_generator(run) -> dict[str, torch.Tensor]:
    return safe_load(Path(run.data.tags["gan_pipeline.checkpoint_dir"]) / "generator.pt")


_RESTART: dict = {}
RESTART_ARGS = ["--model", "dcgan", "--workers", "1", "--max-steps", "40", *SMALL]


@pytest.fixture(scope="session")
def restart_run(small_mnist, tmp_path_factory):
    """A 40-step run during which its MLflow server is stopped and restarted (same port, same SQLite file).
    Session-scoped: tests/test_security.py reads its params and output, test_determinism compares its weights.
    (Imported there, pytest makes a second fixture of it; the cache makes both the same single run.)"""
    if _RESTART:
        yield _RESTART["value"]
        return
    root = tmp_path_factory.mktemp("restart")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(root, port)
    runs = root / "runs"
    proc = subprocess.Popen(train_cmd(runs, "--data", small_mnist, "--run-name", "restart", *RESTART_ARGS),
                            env=env_for(uri, **SECRETS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out_lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    measured: dict = {}
    try:
        c = client(uri)
        deadline = time.monotonic() + 400
        run_id = None
        while True:  # the first checkpoint's metrics (steps 2, 4) are visible
            assert proc.poll() is None, "".join(out_lines)[-4000:]
            assert time.monotonic() < deadline, "no committed metrics within 400 s"
            try:
                run_id = run_id or run_by_name(c, "restart").info.run_id
                if 4 in history_steps(c, run_id):
                    break
            except (AssertionError, AttributeError):
                pass
            time.sleep(0.5)
        measured["step_when_stopped"] = max(history_steps(c, run_id))
        stopped_at = time.monotonic()
        stop_process(server)
        time.sleep(5)
        server = start_mlflow(root, port)
        measured["outage_s"] = time.monotonic() - stopped_at
        proc.wait(timeout=600)
        reader.join(timeout=10)
        measured["returncode"] = proc.returncode
        output = "".join(out_lines)
        run = c.get_run(run_id)
        _RESTART["value"] = {"uri": uri, "client": c, "run": run, "run_id": run_id, "output": output, "runs": runs,
               "measured": measured, "root": root}
        yield _RESTART["value"]
    finally:
        _RESTART.clear()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        stop_process(server)


def test_tracking_server_restart_mid_run_loses_nothing(restart_run):
    r = restart_run
    m, c, run_id, output = r["measured"], r["client"], r["run_id"], r["output"]
    print(f"\n[measured] server down for {m['outage_s']:.1f} s (stop -> /health OK again) after step "
          f"{m['step_when_stopped']} was committed")
    assert m["returncode"] == 0, output[-4000:]
    assert "step 40/40 (100%)" in output
    assert r["run"].info.status == "FINISHED"
    for key in ("g_loss", "d_loss", "d_real", "images_per_second"):
        entries = c.get_metric_history(run_id, key)
        steps = [e.step for e in entries]
        # every step, once: nothing lost while the server was down, nothing duplicated by the retries
        assert sorted(steps) == list(range(2, 41, 2)), (key, sorted(steps))
    # neither commit_metrics ("... are lost") nor commit_images gave up
    assert "could not be logged to MLflow" not in output, "a commit gave up during the outage"
    print(f"[measured] g_loss history after the restart: 20/20 steps (2..40), 0 duplicates, 0 'lost' warnings")


def test_determinism_same_seed_bit_identical_weights(restart_run, small_mnist, tmp_path):
    """Same seed and config, CPU: a second 1-worker run gives bit-identical generator weights (the server
    restart in the first run does not matter: metrics never feed back into training). Two 2-worker runs are
    compared with each other; the three runs go at once to save wall time."""
    uri = restart_run["uri"]
    procs = {
        "again-1w": subprocess.Popen(train_cmd(tmp_path / "a", "--data", small_mnist, "--run-name", "again-1w",
                                               *RESTART_ARGS), env=env_for(uri), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True),
    }
    two = ["--model", "dcgan", "--workers", "2", "--max-steps", "12", *SMALL]
    for name in ("twice-2w-a", "twice-2w-b"):
        procs[name] = subprocess.Popen(train_cmd(tmp_path / name, "--data", small_mnist, "--run-name", name, *two),
                                       env=env_for(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, outputs[name][-3000:])
    c = restart_run["client"]
    first = final_generator(restart_run["run"])
    again = final_generator(run_by_name(c, "again-1w"))
    assert first.keys() == again.keys()
    diff1 = max((first[k].float() - again[k].float()).abs().max().item() for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first), f"1 worker: max |diff| {diff1}"
    a, b = (final_generator(run_by_name(c, n)) for n in ("twice-2w-a", "twice-2w-b"))
    diff2 = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"\n[measured] 1 worker x2 (40 steps): max |diff| {diff1}; 2 workers x2 (12 steps): max |diff| {diff2}")
    assert all(torch.equal(a[k], b[k]) for k in a), f"2 workers: max |diff| {diff2}"
    # the loss histories agree too
    ga = [m.value for m in sorted(c.get_metric_history(run_by_name(c, "twice-2w-a").info.run_id, "g_loss"),
                                  key=lambda m: m.step)]
    gb = [m.value for m in sorted(c.get_metric_history(run_by_name(c, "twice-2w-b").info.run_id, "g_loss"),
                                  key=lambda m: m.step)]
    assert ga == gb and len(ga) == 6


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (root only); yields a function mount(size, readonly) -> Path; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str, readonly: bool = False) -> Path:
        target = tmp_path / name
        target.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_read_only_storage_is_refused_before_training(tmpfs, tmp_path, mlflow_server):
    """Root ignores permission bits, so read-only is a read-only mount: refused in seconds, before Ray."""
    ro = tmpfs("ro", "1m", readonly=True)
    start = time.monotonic()
    result = subprocess.run(train_cmd(tmp_path / "runs", "--storage-path", str(ro / "ckpt"), "--max-steps", "2"),
                            env=env_for(mlflow_server), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    print(f"\n[measured] read-only storage refused in {seconds:.1f} s")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"checkpoint storage {ro / 'ckpt'} is not a writable directory (Read-only file system)" in result.stderr
    assert "Traceback" not in result.stderr and seconds < 60


def test_storage_full_after_first_checkpoint_keeps_it_intact(tmpfs, small_mnist, tmp_path, mlflow_server):
    """A 2 MiB tmpfs holds one checkpoint (~1.2 MB); the second one hits ENOSPC. The run fails with a clear
    message, checkpoint 4 stays complete and loadable, and MLflow holds exactly the steps it covers."""
    full = tmpfs("full", "2m")
    start = time.monotonic()
    result = subprocess.run(train_cmd(tmp_path / "runs", "--data", small_mnist, "--storage-path", str(full),
                                      "--run-name", "full-disk", "--model", "dcgan", "--max-steps", "12", *SMALL),
                            env=env_for(mlflow_server), capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    print(f"\n[measured] storage full: exit {result.returncode} after {seconds:.0f} s; last lines:\n"
          + "\n".join(result.stderr.strip().splitlines()[-3:]))
    assert result.returncode == 1, output[-4000:]
    assert "No space left on device" in output
    assert f"checkpoint storage {full}/full-disk is full (No space left on device)" in result.stderr
    assert "gan-pipeline train --resume full-disk" in result.stderr
    first = full / "full-disk" / "checkpoint_00000004"
    state = safe_load(first / "state.pt")
    assert state["progress"]["step"] == 4
    assert safe_load(first / "generator.pt").keys() == state["generator"].keys()
    c = client(mlflow_server)
    run = run_by_name(c, "full-disk")
    assert run.info.status == "FAILED"
    assert history_steps(c, run.info.run_id) == [2, 4]


@pytest.mark.timeout(1000)
def test_four_tune_trials_log_concurrently_to_one_server(small_mnist, tmp_path, mlflow_server):
    """``tune --samples 4 --max-concurrent 4``: every child run has every metric step, none twice. Four trials on two
    cores already put more workers than cores on one server at once; eight took longer for no more coverage."""
    config = tmp_path / "tune.yaml"
    config.write_text("tune:\n  report_samples: 100\neval:\n  num_samples: 200\n  kid_subset_size: 50\n"
                      "  kid_num_subsets: 5\n  inception: false\n")
    start = time.monotonic()
    result = subprocess.run([EXE, "tune", "--model", "dcgan", "--config", str(config), "--samples", "4",
                             "--max-concurrent", "4", "--workers-per-trial", "1", "--max-steps", "4",
                             "--checkpoint-every", "2", "--log-every", "1", "--sample-every", "4", "--scheduler", "fifo",
                             "--batch-size", "16", "--ngf", "16", "--ndf", "16", "--nz", "32", "--data", small_mnist,
                             "--runs-dir", str(tmp_path / "runs"), "--name", "tune-four"],
                            env=env_for(mlflow_server), capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    c = client(mlflow_server)
    exp = c.get_experiment_by_name("gan-pipeline").experiment_id
    parent = [p for p in c.search_runs([exp], filter_string="tags.gan_pipeline.stage = 'tune'")
              if p.data.params.get("registry.name") == "tune-four"]
    assert len(parent) == 1
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    counts = {ch.info.run_name: {key: [m.step for m in c.get_metric_history(ch.info.run_id, key)]
                                 for key in ("g_loss", "d_loss", "images_per_second")} for ch in children}
    print(f"\n[measured] tune 4 trials x 4 steps, 4 concurrent: {seconds:.0f} s wall; metric steps per child: "
          f"{sorted(len(v['g_loss']) for v in counts.values())}")
    assert len(children) == 4
    for name, per_key in counts.items():
        for key, steps in per_key.items():
            assert sorted(steps) == [1, 2, 3, 4], (name, key, steps)
    assert all(ch.info.status == "FINISHED" for ch in children)
