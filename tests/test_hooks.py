"""The loop's hooks and the TrainJob, each on its own: no Ray, no MLflow server (a small in-memory client)."""
from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from gan_models import GANSpec, build_gan, train_step
from gan_models.step import STEP_METRICS
from pipelines import tags
from pipelines.faults import FaultInjector, fault_hooks_from_env
from pipelines.hooks import (ConsoleProgress, DivergenceGuard, Hook, LoopState, MLflowCommitter, SampleGrids,
                             StopTraining, default_hooks, format_eta)
from pipelines.job import TrainJob, absolute_tracking_uri
from pipelines.progress import WorkerConsole
from pipelines.training_metrics import IMAGES_PER_SECOND, TRAINING_METRICS
from tests.helpers import constant_batches


def _gan(conditional=False, objective="bce", n_critic=1):
    spec = GANSpec(resolution=28, channels=1, nz=8, ngf=8, ndf=8, objective=objective, conditional=conditional,
                   num_classes=10, n_critic=n_critic, clip_value=0.01 if objective == "wasserstein" else None,
                   gp_weight=10.0 if objective == "wasserstein-gp" else 0.0)
    return build_gan(spec, seed=0)


def _loop(gan=None, **kw) -> LoopState:
    args = dict(gan=gan, rank=0, world=1, total_steps=10, checkpoint_every=5, log_every=2, sample_every=3, seed=0)
    args.update(kw)
    return LoopState(**args)


class FakeClient:
    """The MlflowClient calls the committer makes, kept in memory."""

    def __init__(self):
        self.metrics: dict[str, dict[int, float]] = {}
        self.tags: dict[str, str] = {}
        self.images: list = []

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for s, v in self.metrics.get(key, {}).items()]

    def log_batch(self, run_id, metrics=(), params=()):
        for m in metrics:
            self.metrics.setdefault(m.key, {})[m.step] = m.value

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(tags=dict(self.tags)))

    def set_tag(self, run_id, key, value):
        self.tags[key] = value

    def log_image(self, run_id, image, key, step):
        self.images.append((key, step))


@pytest.mark.parametrize("objective,conditional", [("bce", False), ("bce", True), ("wasserstein", False),
                                                   ("wasserstein-gp", False)])
def test_step_statistics_are_named_by_the_step_module(objective, conditional):
    gan = _gan(conditional, objective)
    stats = train_step(gan, constant_batches(4, 1, 28))
    assert set(stats) <= set(STEP_METRICS), set(stats) - set(STEP_METRICS)


def test_training_metrics_name_what_the_loop_logs_and_nothing_it_does_not():
    # the replica check is logged at every checkpoint; learning rates are never logged
    assert "replica_max_abs_diff" in TRAINING_METRICS
    assert not {"lr_g", "lr_d"} & TRAINING_METRICS


def test_register_keeps_training_curves_off_the_version_tags():
    from pipelines.register import _is_eval_metric

    assert not _is_eval_metric("replica_max_abs_diff") and not _is_eval_metric("g_loss")
    assert _is_eval_metric("domain_fd") and not _is_eval_metric("system/cpu_utilization_percentage")


def test_divergence_guard_stops_every_rank_and_rank_0_records_why():
    reasons = []
    loop = _loop(step=7)
    DivergenceGuard(reasons.append, print_fn=lambda m: None).on_log(loop, {"d_loss": 1.0})
    with pytest.raises(StopTraining):
        DivergenceGuard(reasons.append, print_fn=lambda m: None).on_log(loop, {"d_loss": math.nan, "g_loss": 1.0})
    with pytest.raises(StopTraining):
        DivergenceGuard().on_log(_loop(rank=1), {"g_loss": math.inf})  # other ranks: stop, record nothing
    assert reasons == ["non-finite d_loss at step 7"]


def test_console_progress_prints_losses_throughput_and_time_left():
    lines = []
    hook = ConsoleProgress(WorkerConsole(print_fn=lines.append))
    loop = _loop(step=4)
    hook.on_log(loop, {"d_loss": 0.5, "g_loss": 2.0, IMAGES_PER_SECOND: 100.0})
    assert lines[0].startswith("[gan-pipeline] step 4/10 (40%)") and "d_loss 0.5000" in lines[0]
    assert "100 img/s" in lines[0] and "ETA" in lines[0]
    assert format_eta(3725) == "1h02m" and format_eta(65) == "1m05s"


def test_sample_grids_at_sample_steps_and_at_the_last_step():
    gan = _gan(conditional=True)
    hook, loop = SampleGrids(gan, seed=0), _loop(gan)
    for step, last in ((1, False), (3, False), (4, True)):
        loop.step, loop.last = step, last
        hook.after_step(loop)
    assert sorted(loop.pending_images) == ["samples_step00000003.png", "samples_step00000004.png"]
    assert loop.pending_images["samples_step00000003.png"].startswith(b"\x89PNG")


def test_committer_commits_once_and_a_resume_commits_what_the_checkpoint_carried():
    client = FakeClient()
    hook, loop = MLflowCommitter(client, "run"), _loop(step=4)
    loop.pending = [(2, {"g_loss": 1.0}), (4, {"g_loss": 0.5})]
    hook.after_checkpoint(loop)
    hook.after_checkpoint(loop)  # a second commit of the same steps adds nothing
    assert client.metrics["g_loss"] == {2: 1.0, 4: 0.5}
    resumed = _loop(step=6)
    hook.on_resume(resumed, [(4, {"g_loss": 9.0}), (6, {"g_loss": 0.25})])
    assert client.metrics["g_loss"] == {2: 1.0, 4: 0.5, 6: 0.25}
    assert client.tags[tags.RESTARTS] == "1" and client.tags[tags.RESUMED_FROM_STEP] == "6"
    hook.mark_diverged("non-finite d_loss at step 3")
    assert client.tags[tags.DIVERGED] == "non-finite d_loss at step 3"


def test_rank_0_gets_the_mlflow_hooks_other_ranks_only_the_guard():
    gan = _gan()
    chief = default_hooks(gan, _loop(gan), FakeClient(), "run")
    assert [type(h) for h in chief] == [DivergenceGuard, ConsoleProgress, SampleGrids, MLflowCommitter]
    assert [type(h) for h in default_hooks(gan, _loop(gan, rank=1), None, "run")] == [DivergenceGuard]


def test_a_hook_can_request_a_stop_and_its_reason_is_kept():
    loop = _loop()
    loop.request_stop("time budget")
    loop.request_stop("later reason")
    assert loop.stop_reason == "time budget"


def test_base_hook_is_a_no_op_with_no_state():
    hook, loop = Hook(), _loop()
    hook.on_step(loop, {})
    assert hook.checkpoint_metrics(loop) == {} and hook.report_metrics(loop) == {} and hook.state_dict() is None
    assert hook.state_key == "Hook"


def test_fault_injector_kills_only_the_chosen_rank_at_the_chosen_step_of_the_first_attempt():
    killed = []
    hook = FaultInjector("kill@3:1", delay=0, kill=lambda: killed.append(True), print_fn=lambda m: None)
    for rank, step, resumed in ((1, 2, False), (0, 3, False), (1, 3, True), (1, 3, False)):
        hook.on_step(_loop(rank=rank, step=step, resumed=resumed), {})
    assert killed == [True]


def test_fault_injector_makes_losses_non_finite_from_its_step_on(monkeypatch):
    monkeypatch.setenv("GAN_PIPELINE_FAULT", "nan@2")
    (hook,) = fault_hooks_from_env()
    stats = {"d_loss": torch.tensor(1.0)}
    hook.on_step(_loop(step=1), stats)
    assert stats["d_loss"].item() == 1.0
    hook.on_step(_loop(step=2), stats)
    assert math.isnan(stats["d_loss"].item())
    monkeypatch.delenv("GAN_PIPELINE_FAULT")
    assert fault_hooks_from_env() == []
    with pytest.raises(ValueError, match="kill@STEP"):
        FaultInjector("boom@1")


def _config(**over) -> dict:
    from pipelines.config import build_config

    return build_config(model="dcgan").model_dump(mode="json") | over


def test_job_resolves_relative_paths_in_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config()
    cfg["data"]["path"] = "prepared/mnist"
    job = TrainJob.create(cfg, data_path="prepared/mnist", run_id="r", tracking_uri="sqlite:///m.db",
                          resume_from="gan-runs/checkpoints/x/checkpoint_00000010")
    assert job.data_path == str(tmp_path / "prepared/mnist") == job.config["data"]["path"]
    assert job.config["runs_dir"] == str(tmp_path / "gan-runs")
    assert job.tracking_uri == f"sqlite:///{tmp_path}/m.db"
    assert job.resume_from == str(tmp_path / "gan-runs/checkpoints/x/checkpoint_00000010")
    assert pickle.loads(pickle.dumps(job)) == job  # it crosses the Ray boundary
    with pytest.raises(AttributeError):
        job.run_id = "other"  # frozen


def test_job_refuses_a_relative_path():
    with pytest.raises(ValueError, match="data_path"):
        TrainJob(config=_config(runs_dir="/abs"), data_path="rel/data", run_id="r", tracking_uri="http://h:5000")
    with pytest.raises(ValueError, match="runs_dir"):
        TrainJob(config=_config(), data_path="/abs/data", run_id="r", tracking_uri="http://h:5000")


def test_tracking_uris_other_than_relative_sqlite_are_kept():
    for uri in ("http://127.0.0.1:5000", "sqlite:////abs/m.db", "databricks"):
        assert absolute_tracking_uri(uri) == uri


def test_hook_state_travels_in_the_checkpoint(tmp_path):
    from pipelines import checkpoints

    gan = _gan()
    ema = {"generator": {k: v.clone() + 1 for k, v in gan.generator.state_dict().items()}}
    checkpoints.write_checkpoint(tmp_path, gan, {"step": 5, "epoch": 0, "batch_in_epoch": 5}, {}, [], {},
                                 hook_states={"EMA": ema})
    progress, states = checkpoints.restore(_gan(), tmp_path)
    assert progress["step"] == 5
    assert all(torch.equal(states["EMA"]["generator"][k], v) for k, v in ema["generator"].items())


def test_atomic_write_leaves_no_temp_file_and_replaces_whole(tmp_path):
    from pipelines.files import atomic_write

    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    atomic_write(target, lambda f: torch.save({"x": torch.ones(1)}, f))
    assert torch.load(target, weights_only=True)["x"].item() == 1.0
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
