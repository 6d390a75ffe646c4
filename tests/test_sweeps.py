"""Sweeps: population based training through the trials' checkpoints, a sweep resumed after its driver died,
the verdict against the preset, and requests refused before anything runs. Real local Ray, a real MLflow server,
the bundled MNIST (a small prepared subset), tiny networks and few steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gan_models.presets import DCGAN_PAPER_LR

EXE = str(Path(sys.executable).parent / "gan-pipeline")
TINY = ["--batch-size", "16", "--ngf", "16", "--nz", "32", "--log-every", "2", "--sample-every", "4"]
EVAL_SMALL = ("eval:\n  num_samples: 200\n  kid_subset_size: 100\n  inception: false\n")


def _env(uri):
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}


def _children(client, experiment: str):
    exp = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([exp], filter_string="tags.gan_pipeline.stage = 'tune'")
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents, children


# ------------------------------------------------------------------------------------------------ unit
def test_requests_that_cannot_run_are_refused_before_any_run(tmp_path):
    """Each refusal exits with a usage error naming the problem, and no MLflow store or run is created."""
    cases = [(["--scheduler", "pbt", "--search", "optuna"], "does not take --search optuna"),
             (["--scheduler", "pbt", "--perturbation-interval", "3"], "not a multiple of the report interval"),
             (["--workers-per-trial", str((os.cpu_count() or 1) + 1)], "CPUs per trial"),
             (["--scheduler", "pb2"], "continuous values only"),
             (["--time-budget", "40s", "--samples", "8"], "a trial needs at least")]
    space = tmp_path / "space.yaml"
    space.write_text("optim.not_a_key:\n  uniform: [0, 1]\n")
    cases.append((["--space", str(space)], "is not a config key"))
    for args, message in cases:
        result = subprocess.run([EXE, "tune", "--model", "wgan", "--runs-dir", str(tmp_path / "runs"), *args],
                                cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.db").exists(), "refused before any MLflow run was created"


def test_unknown_or_unsafe_sweep_name_is_a_clear_error(tmp_path):
    for name, message in (("no-such-sweep", "no sweep named 'no-such-sweep'"), ("../etc", "not a valid name")):
        result = subprocess.run([EXE, "tune", "--resume", name, "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path,
                                env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_trial_budget_rule_and_verdict_wording():
    from pipelines.sweep_verdict import improvement, summary_line
    from pipelines.tune import trial_time_budget, training_deadline

    # 20 min, 4 samples, 2 at a time: 2 min kept, 2 waves of 9 min
    assert trial_time_budget(1200, 4, 2) == pytest.approx(540)
    # and no trial trains past the sweep's start + 18 min, whatever its restarts and pauses took
    assert training_deadline(1200, started=1000.0) == pytest.approx(1000.0 + 1080)
    assert improvement(8.0, 10.0) == pytest.approx(20.0)
    assert summary_line("s-b", {"domain_fd": 8.0}, {"trial": "s-p", "domain_fd": 10.0}, {"optim.lr_g": 1e-3}
                        ).startswith("beat the preset by 20.0% on domain_fd")
    assert summary_line("s-p", {"domain_fd": 10.0}, {"trial": "s-p", "domain_fd": 10.0}, {}
                        ).startswith("did not beat the preset")


def test_concurrent_local_trials_share_the_cores_instead_of_each_taking_them_all(monkeypatch):
    from pipelines.config import build_config
    from pipelines.tune import trial_threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert trial_threads(build_config("wgan"), concurrent=2) == 1
    assert trial_threads(build_config("wgan"), concurrent=1) == 2
    assert trial_threads(build_config("wgan"), concurrent=8) == 1
    assert trial_threads(build_config("wgan", overrides={"train": {"threads_per_worker": 2}}), concurrent=2) == 2
    # a cluster's nodes are not this machine: the worker's own rule
    assert trial_threads(build_config("wgan", overrides={"train": {"address": "10.0.0.1:6379"}}), concurrent=2) is None


def test_the_local_instance_has_room_for_every_concurrent_trial_at_once():
    """Each trial reserves its worker's CPUs and a little for its own function: 2 trials of 1 CPU on 2 declared
    CPUs let only one worker start (the other's worker group timed out for 18 minutes)."""
    from pipelines.tune import TRIAL_DRIVER_CPU, declared_cpus

    for concurrent, worker_cpus in ((2, 1), (8, 1), (1, 2), (3, 4)):
        assert declared_cpus(concurrent, worker_cpus) >= concurrent * (worker_cpus + TRIAL_DRIVER_CPU)


def test_synchronous_pbt_decides_when_a_trial_ends_before_the_perturbation_point():
    """Ray's synchronous PBT decides on the last live trial's report at the point; a trial that ends (error,
    budget spent) before it never reports, and the others waited, paused, for ever. Now its end replays a waiting
    trial's last result, so Ray's decision runs; while another trial is still on its way, nothing happens."""
    from types import SimpleNamespace

    from pipelines.sweep_schedulers import PBTKeepingPreset

    pbt = PBTKeepingPreset(time_attr="step", metric="domain_fd", mode="min", perturbation_interval=100,
                           hyperparam_mutations={"optim.lr_g": [1e-4, 1e-3]}, synch=True)
    replayed = []
    pbt.on_trial_result = lambda controller, trial, result: replayed.append((trial, result))
    waiting, behind, ended = "waiting", "behind", "ended"
    pbt._next_perturbation_sync = 100
    pbt._trial_state = {waiting: SimpleNamespace(last_result={"step": 100, "domain_fd": 9.0}, last_train_time=100),
                        behind: SimpleNamespace(last_result={"step": 50, "domain_fd": 8.0}, last_train_time=50)}
    controller = SimpleNamespace(get_live_trials=lambda: [waiting, behind, ended])
    pbt.on_trial_error(controller, ended)
    assert replayed == []  # "behind" will report at the point itself
    controller = SimpleNamespace(get_live_trials=lambda: [waiting, ended])  # "behind" finished its budget
    pbt.on_trial_complete(controller, ended, {"step": 60})
    assert replayed == [(waiting, {"step": 100, "domain_fd": 9.0})]


def test_synchronous_pbt_runs_on_when_the_ended_trial_skipped_the_point_the_waiting_one_was_decided_at():
    """Reports can skip a perturbation point. Seen: the preset's trial was decided at step 12 and paused to wait
    for the other at 12 (the next point); the other went from 8 straight to its last step, 16, and ended. Ray's
    own replay returns early (12 is no interval past 12), so the waiting trial must be let on by moving the point."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers.pbt import _PBTTrialState

    from pipelines.sweep_schedulers import PBTKeepingPreset

    class FakeTrial:
        def __init__(self, status):
            self.status, self.config, self.experiment_tag = status, {"optim.lr_g": 1e-4}, ""

        def is_finished(self):
            return self.status == Trial.TERMINATED

    pbt = PBTKeepingPreset(time_attr="step", metric="domain_fd", mode="min", perturbation_interval=4,
                           hyperparam_mutations={"optim.lr_g": [1e-4, 1e-3]}, synch=True)
    waiting, ended = FakeTrial(Trial.PAUSED), FakeTrial(Trial.TERMINATED)
    controller = SimpleNamespace(get_live_trials=lambda: [waiting], get_trials=lambda: [waiting, ended],
                                 search_alg=None)
    for trial in (waiting, ended):
        pbt._trial_state[trial] = _PBTTrialState(trial)
    pbt._trial_state[waiting].last_result = {"step": 12, "domain_fd": 9.0}
    pbt._trial_state[waiting].last_train_time = pbt._trial_state[waiting].last_perturbation_time = 12
    pbt._trial_state[ended].last_train_time = pbt._trial_state[ended].last_perturbation_time = 8
    pbt._next_perturbation_sync = 12
    assert pbt.choose_trial_to_run(controller) is None  # stuck: the hang
    pbt.on_trial_complete(controller, ended, {"step": 16, "domain_fd": 8.0})
    assert pbt.choose_trial_to_run(controller) is waiting
    assert pbt._next_perturbation_sync == 16


def test_pbt_keeps_a_donors_checkpoints_of_a_whole_interval():
    """An exploiting trial may restart only after the donor trained a whole perturbation interval on."""
    from pipelines.config import build_config
    from pipelines.tune import tune_checkpoints_to_keep

    pbt = build_config("wgan", overrides={"tune": {"scheduler": "pbt", "perturbation_interval": 400,
                                                   "report_every": 50}})
    assert tune_checkpoints_to_keep(pbt) == 400 // 50 + 2
    asha = build_config("wgan", overrides={"tune": {"scheduler": "asha"}})
    assert tune_checkpoints_to_keep(asha) == 3


def test_restored_optimizers_keep_their_state_but_take_the_new_learning_rate(tmp_path):
    import torch

    from pipelines import checkpoints
    from pipelines.config import build_config
    from pipelines.loop import apply_hyperparameters, build_training_gan

    manifest = {"resolution": 28, "channels": 1, "class_names": [str(i) for i in range(10)]}
    cfg = build_config("dcgan", None, {"model": {"ngf": 8, "ndf": 8, "nz": 16}})
    gan = build_training_gan(cfg, manifest)
    loss = gan.generator(torch.randn(2, 16)).mean()
    loss.backward()
    gan.opt_g.step()
    checkpoints.write_checkpoint(tmp_path, gan, {"step": 7, "epoch": 0, "batch_in_epoch": 7}, {}, [], {})
    tuned = build_config("dcgan", None, {"model": {"ngf": 8, "ndf": 8, "nz": 16}, "optim": {"lr_g": 3e-3}})
    other = build_training_gan(tuned, manifest)
    checkpoints.restore(other, tmp_path)
    apply_hyperparameters(other, tuned)
    assert other.opt_g.param_groups[0]["lr"] == 3e-3
    assert int(other.opt_g.state_dict()["state"][0]["step"]) == 1, "Adam's moments and step count carried"
    assert checkpoints.checkpoint_progress(tmp_path)["step"] == 7


def test_a_trial_starts_from_a_donors_checkpoint_as_given_and_from_its_own_newest(tmp_path):
    """PBT exploit: the donor's checkpoint and nothing else; the trial's own Tune checkpoint: the newer of it and
    its previous segment's latest Train checkpoint (a driver killed between the two)."""
    from pipelines import checkpoints
    from pipelines.config import build_config
    from pipelines.loop import build_training_gan
    from pipelines.sweep_trial import _start_point

    manifest = {"resolution": 28, "channels": 1, "class_names": [str(i) for i in range(10)]}
    gan = build_training_gan(build_config("dcgan", None, {"model": {"ngf": 8, "ndf": 8, "nz": 16}}), manifest)

    def write(where: Path, step: int, run_id: str) -> Path:
        checkpoints.write_checkpoint(where, gan, {"step": step, "epoch": 0, "batch_in_epoch": step},
                                     {"mlflow_run_id": run_id}, [], {})
        return where

    donor = write(tmp_path / "tune" / "checkpoint_000001", 8, "donor-run")
    segment = tmp_path / "trial-s0"
    write(segment / checkpoints.checkpoint_dir_name(12), 12, "own-run")
    assert _start_point(donor, "own-run", segment) == (donor, "donor-run")
    own = write(tmp_path / "tune" / "checkpoint_000002", 8, "own-run")
    assert _start_point(own, "own-run", segment) == (segment / "checkpoint_00000012", None)
    assert _start_point(None, "own-run", None) == (None, None)
    # a checkpoint Tune hands over that is gone (deleted by its num_to_keep before this trial restarted): the
    # trial goes on from its own newest instead of failing
    gone = tmp_path / "tune" / "checkpoint_000003"
    assert _start_point(gone, "own-run", segment) == (segment / "checkpoint_00000012", None)


def test_an_exploiting_trial_trains_from_its_own_copy_of_the_donors_checkpoint(tmp_path):
    """The donor trains on while the exploiting trial restarts, and Tune's retention deletes the donor's older
    checkpoints: the trial copies the checkpoint into its own storage first, and a checkpoint gone before it could
    be copied leaves nothing behind (the trial then goes on from its own)."""
    import shutil

    from pipelines import checkpoints
    from pipelines.config import build_config
    from pipelines.loop import build_training_gan
    from pipelines.sweep_trial import _own_copy, _segments

    manifest = {"resolution": 28, "channels": 1, "class_names": [str(i) for i in range(10)]}
    gan = build_training_gan(build_config("dcgan", None, {"model": {"ngf": 8, "ndf": 8, "nz": 16}}), manifest)
    donor = tmp_path / "donor-trial" / "checkpoint_000031"
    checkpoints.write_checkpoint(donor, gan, {"step": 1600, "epoch": 8, "batch_in_epoch": 0},
                                 {"mlflow_run_id": "donor-run"}, [], {})
    sweep = tmp_path / "sweep"
    (sweep / "trial-b-s0").mkdir(parents=True)
    copy = _own_copy(donor, sweep, "trial-b", 1)
    assert copy == sweep / "trial-b-donor1" / checkpoints.checkpoint_dir_name(1600)
    assert checkpoints.checkpoint_step(copy) == 1600, "named as Train names its checkpoints"
    shutil.rmtree(donor)  # the donor's num_to_keep
    assert checkpoints.checkpoint_progress(copy)["step"] == 1600
    assert checkpoints.read_run_config(copy)["mlflow_run_id"] == "donor-run"
    assert [p.name for p in _segments(sweep, "trial-b")] == ["trial-b-s0"], "a copy is not a segment"
    assert _own_copy(donor, sweep, "trial-b", 2) is None
    assert sorted(p.name for p in sweep.iterdir()) == ["trial-b-donor1", "trial-b-s0"], "nothing half-copied left"


# ------------------------------------------------------------------------------------------------ integration
@pytest.mark.integration
@pytest.mark.timeout(900)  # the first test of a session also trains the domain classifier (minutes on a busy machine)
def test_pbt_exploit_continues_from_the_donors_checkpoint_and_records_lineage(small_mnist, tmp_path, mlflow_server):
    # trial 0 is the preset (it barely moves in 16 steps of this tiny model: domain FD ~1,965 throughout); trial 1
    # draws a destructive lr in [0.3, 0.5]: PBT copies the preset's checkpoint into it at the perturbation point
    # (step 4; synchronous PBT: both trials wait there). Step 4, not 8: by step 8 a rate of 0.4 had sometimes
    # thrown G somewhere better than the untrained preset (FD 1,265-1,647 against 1,968; a CI failure), while at
    # step 4 it was far worse in every run seen (5,594-13,439). The trials train at DCGAN's paper rate (2e-4).
    # One trial at a time for a population of two, as on a laptop (4 samples, 2 at a time by default): PBT pauses
    # trial 0 at step 4 and runs trial 1 up to it (pipelines.tune.TRIAL_SLOT), or nothing is ever exploited.
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_g:\n  uniform: [0.3, 0.5]\n")
    config = tmp_path / "tune.yaml"
    config.write_text("tune:\n  report_samples: 100\n  report_every: 4\n  perturbation_interval: 4\n"
                      f"optim:\n  lr_g: {DCGAN_PAPER_LR}\n  lr_d: {DCGAN_PAPER_LR}\n" + EVAL_SMALL)
    try:  # a hang shows the sweep's own output, not only pytest-timeout's stack
        result = subprocess.run([EXE, "tune", "--model", "dcgan", "--scheduler", "pbt", "--config", str(config),
                                 "--space", str(space), "--samples", "2", "--max-concurrent", "1",
                                 "--workers-per-trial", "1", "--max-steps", "16", "--data", small_mnist,
                                 "--runs-dir", str(tmp_path / "runs"), "--name", "pbt-tuned", "--experiment",
                                 "pbt-sweep", *TINY], env=_env(mlflow_server), capture_output=True, text=True,
                                timeout=840)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the sweep did not end in {hung.timeout} s:\n"
                    f"{(hung.stdout or '')[-6000:]}{(hung.stderr or '')[-3000:]}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    from mlflow.tracking import MlflowClient

    from pipelines import checkpoints
    from pipelines.sweep_trial import read_lineage

    client = MlflowClient(mlflow_server)
    parents, children = _children(client, "pbt-sweep")
    assert len(parents) == 1 and len(children) == 2, "one run per trial, whatever its restarts"
    preset = next(c for c in children if c.data.tags.get("gan_pipeline.preset_trial") == "true")
    exploited = next(c for c in children if c is not preset)
    assert exploited.data.tags.get("gan_pipeline.exploited_from") == preset.data.tags["gan_pipeline.run_name"], \
        output[-6000:]
    lineage = read_lineage(client, exploited.info.run_id)
    copied_step = lineage[0]["copied_step"]
    assert copied_step >= 4 and lineage[0]["copied_trial"] == preset.data.tags["gan_pipeline.run_name"]
    new_lr = lineage[0]["values"]["optim.lr_g"]
    # the segment after the exploit continued at the donor's step, with the donor's optimizer state and its own lr
    name = exploited.data.tags["gan_pipeline.run_name"]
    sweep_dir = next((tmp_path / "runs" / "checkpoints").glob("tune-dcgan-pbt-*"))
    first = min((sweep_dir / f"{name}-s1").glob("checkpoint_*"))
    # the donor's checkpoint, copied before the trial's Train run started
    own_copy, = (sweep_dir / f"{name}-donor1").glob("checkpoint_*")
    assert checkpoints.checkpoint_progress(own_copy)["step"] == copied_step
    assert checkpoints.checkpoint_step(first) == copied_step + 4, "continued from the donor's step, not from 0"
    state = checkpoints.safe_load(first / checkpoints.STATE_FILE)
    assert int(state["opt_g"]["state"][0]["step"]) == copied_step + 4, "the donor's optimizer state was carried"
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(new_lr)
    # the lr schedule: the drawn value from step 0, the new one from the copied step
    schedule = sorted((m.step, m.value) for m in client.get_metric_history(exploited.info.run_id, "hp.optim.lr_g"))
    assert schedule[0][0] == 0 and 0.3 <= schedule[0][1] <= 0.5
    assert (copied_step, pytest.approx(new_lr)) in schedule
    steps = [m.step for m in client.get_metric_history(exploited.info.run_id, "g_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 16, "no duplicated steps, trained to the end"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"tune_results.csv", "verdict.csv", "verdict.txt", "metric_vs_hyperparameters.png",
            "hyperparameter_schedules.png", "best_vs_preset_samples.png"} <= artifacts, artifacts
    import csv
    import io

    table = io.StringIO(client.download_artifacts(parents[0].info.run_id, "tune_results.csv", str(tmp_path)) and
                        (tmp_path / "tune_results.csv").read_text())
    assert sorted(row["preset"] for row in csv.DictReader(table)) == ["False", "True"], \
        "a trial that copied the preset's trial is not the preset"
    assert "the preset" in output and "@candidate" in output
    assert parents[0].data.tags.get("gan_pipeline.verdict")
    assert client.get_model_version_by_alias("pbt-tuned", "candidate").tags["source_run_id"] == \
        parents[0].data.tags["gan_pipeline.best_run_id"]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: parent ids), children first found first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_sweep(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep's driver and everything it started (its local Ray: the driver leads their process group;
    descendants are collected first in case one left the group): a crash of the driver's machine."""
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(2)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sweep_killed_after_its_first_checkpoints_resumes_to_completion(small_mnist, tmp_path, mlflow_server):
    config = tmp_path / "tune.yaml"
    config.write_text("tune:\n  report_samples: 100\n  report_every: 4\n  include_preset: false\n" + EVAL_SMALL)
    runs = tmp_path / "runs"
    common = ["--config", str(config), "--runs-dir", str(runs), "--experiment", "resumed-sweep"]
    # one trial at a time: the first finishes, the second is killed mid-training
    proc = subprocess.Popen([EXE, "tune", "--model", "dcgan", "--scheduler", "fifo", *common, "--samples", "2",
                             "--max-concurrent", "1", "--workers-per-trial", "1", "--max-steps", "12",
                             "--data", small_mnist, "--name", "resumed", *TINY], env=_env(mlflow_server),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    storage = runs / "checkpoints"
    while len({p.parent.name for p in storage.glob("tune-dcgan-fifo-*/*-s0/checkpoint_00000004")}) < 2:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoints of two trials within 10 minutes"
        time.sleep(0.5)
    _kill_sweep(proc)
    sweep = next(storage.glob("tune-dcgan-fifo-*")).name

    result = subprocess.run([EXE, "tune", "--resume", sweep, *common], env=_env(mlflow_server),
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"resuming sweep {sweep}" in output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    parents, children = _children(client, "resumed-sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "one parent run, continued"
    assert len(children) == 2, "the same two trials, no duplicated child runs"
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "g_loss")]
        assert sorted(steps) == list(range(2, 13, 2)), f"gap- and duplicate-free history: {sorted(steps)}"
        assert child.info.status == "FINISHED"
    resumed = [c for c in children if c.data.tags.get("gan_pipeline.resumed_from_step")]
    assert resumed and all(int(c.data.tags["gan_pipeline.resumed_from_step"]) >= 4 for c in resumed), \
        "the interrupted trial continued from its last checkpoint"
    assert client.get_model_version_by_alias("resumed", "candidate")
