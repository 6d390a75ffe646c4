"""`gan-pipeline tune` (a real ASHA sweep) and `gan-pipeline run` (the resumable workflow), on a real local Ray
cluster and a real MLflow server, with the bundled MNIST (a small prepared subset)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gan_models.presets import preset
from tests.conftest import kill_driver_after_checkpoint


pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "gan-pipeline")
TINY = ["--batch-size", "16", "--ngf", "16", "--nz", "32", "--log-every", "2", "--sample-every", "4"]


def _env(uri):
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(900)  # four trials one at a time (the grid's three and the preset's)
def test_asha_sweep_tracks_trials_stops_a_bad_one_and_registers_the_best(small_mnist, tmp_path, mlflow_server):
    # a grid makes the outcome certain: the good learning rates come first, the destructive one (Adam at 0.5
    # throws G's weights around: domain FD ~9,900 at its first report against ~2,050) last, run one at a time,
    # so ASHA has good trials to compare it with.
    # The Train worker does not wait for Tune's verdict on a report: ASHA's stop reaches a trial a moment after
    # the report, and a tiny trial of 16 steps had sometimes finished by then (a CI failure). 48 steps leave the
    # stop ten reports to arrive in.
    STEPS = 48
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_g:\n  grid: [0.0002, 0.0005, 0.5]\n")
    config = tmp_path / "tune.yaml"
    config.write_text("tune:\n  report_samples: 200\n  report_every: 4\neval:\n  num_samples: 1000\n"
                      "  kid_subset_size: 200\n  inception: false\n")
    # typed as a user would, from a fresh working directory: the default relative --runs-dir and a relative --data
    # (trials are Ray actors with their own working directories: they must get the paths the driver resolved;
    # a default `tune` once failed in every trial that way)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([EXE, "tune", "--model", "cgan", "--config", str(config), "--space", str(space),
                             "--samples", "1", "--max-concurrent", "1", "--workers-per-trial", "1",
                             "--max-steps", str(STEPS), "--data", os.path.relpath(small_mnist, work),
                             "--name", "tuned", "--experiment", "asha-sweep", *TINY], env=_env(mlflow_server),
                            cwd=work, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert len({c.parent for c in (work / "gan-runs" / "checkpoints").glob("tune-cgan-*/trial_*/checkpoint_*")}) == 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    # its own experiment: other tests' sweeps share the session's MLflow server
    exp = client.get_experiment_by_name("asha-sweep").experiment_id
    parents = client.search_runs([exp], filter_string="tags.gan_pipeline.stage = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # the grid's three trials, and trial 0 with the preset's own values (the verdict's reference)
    children = [c for c in runs if c.data.tags.get("gan_pipeline.preset_trial") != "true"]
    assert len(runs) == 4 and len(children) == 3
    assert sorted(float(c.data.params["optim.lr_g"]) for c in children) == [0.0002, 0.0005, 0.5]
    # the swept key only: the critic's rate stays the preset's
    assert all(float(c.data.params["optim.lr_d"]) == preset("cgan")["optim"]["lr_d"] for c in children)
    # --max-concurrent 1 honoured: each trial starts after the one before it ended (Ray ignored the limit for a
    # search generator passed in; all four ran at once, in any order, and the test failed when the bad one was
    # first, with no finished trial for ASHA to compare it with)
    # (the training steps' timestamps: a stopped trial's run is marked KILLED when the sweep ends)
    spans = sorted((min(times), max(times)) for times in
                   ([m.timestamp for m in client.get_metric_history(r.info.run_id, "g_loss")] for r in runs))
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
    bad = next(c for c in children if float(c.data.params["optim.lr_g"]) == 0.5)
    good_steps = max(max((m.step for m in client.get_metric_history(c.info.run_id, "g_loss")), default=0)
                     for c in children)
    bad_steps = max((m.step for m in client.get_metric_history(bad.info.run_id, "g_loss")), default=0)
    assert good_steps == STEPS and bad_steps < STEPS, "ASHA stopped the hopeless trial early"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"tune_results.csv", "metric_vs_hyperparameters.png", "verdict.csv", "verdict.txt"} <= artifacts
    best_run_id = parent.data.tags["gan_pipeline.best_run_id"]
    assert float(client.get_run(best_run_id).data.params["optim.lr_g"]) != 0.5
    assert bad.info.status == "KILLED" and bad.data.tags.get("gan_pipeline.stopped_early") == "true"
    version = client.get_model_version_by_alias("tuned", "candidate")
    assert version.tags["source_run_id"] == best_run_id


def test_run_interrupted_in_train_resumes_instead_of_starting_over(small_mnist, tmp_path, mlflow_server):
    config = tmp_path / "run.yaml"
    config.write_text("eval:\n  num_samples: 1000\n  kid_subset_size: 200\n  inception: false\n")
    cmd = [EXE, "run", "--model", "dcgan", "--config", str(config), "--data", small_mnist, "--max-steps", "24",
           "--checkpoint-every", "8", "--runs-dir", str(tmp_path / "runs"), "--run-name", "wf", *TINY]
    proc = subprocess.Popen(cmd, env=_env(mlflow_server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    kill_driver_after_checkpoint(proc, tmp_path / "runs" / "checkpoints", "*/checkpoint_00000008", 300)
    state = json.loads((tmp_path / "runs" / "pipelines" / "wf" / "state.json").read_text())
    assert state["stages"]["prepare"]["status"] == "done"
    assert state["stages"]["train"]["status"] == "running"
    time.sleep(2)

    result = subprocess.run(cmd, env=_env(mlflow_server), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "prepare: done earlier with the same inputs, skipped" in output
    assert "last checkpoint: step " in output, output[-5000:]
    resumed_at = int(output.split("last checkpoint: step ")[1].split()[0])
    assert resumed_at >= 8, "the train stage resumed instead of starting over"
    state = json.loads((tmp_path / "runs" / "pipelines" / "wf" / "state.json").read_text())
    assert [state["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "register")] == ["done"] * 4
    assert state["stages"]["train"]["outputs"]["steps"] == 24
    assert state["stages"]["evaluate"]["outputs"]["metrics"]["num_generated"] == 1000
    assert state["stages"]["register"]["outputs"]["name"] == "mnist-dcgan"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = state["stages"]["train"]["outputs"]["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "g_loss")]
    assert sorted(steps) == list(range(2, 25, 2)), "one MLflow run, no duplicated or missing steps"
    assert "domain_fd" in client.get_run(run_id).data.metrics
    # dcgan's InfoGAN code: how well its categories line up with the digits, and a row per category to look at
    assert 0.0 < client.get_run(run_id).data.metrics["code_purity"] <= 1.0
    assert "evaluation/code_grid.png" in {a.path for a in client.list_artifacts(run_id, "evaluation")}

    # the same command once more: everything is done, nothing runs again
    again = subprocess.run(cmd, env=_env(mlflow_server), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("done earlier with the same inputs, skipped") == 4
