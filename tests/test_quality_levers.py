"""The levers behind good generators by default, each pinned on its own (no Ray, no MLflow server): the moving
average of G, the time budget, checkpoint scoring and best-checkpoint selection, precision ``auto``, the global
batch. Quality numbers live in benchmarks/bench_quality.py, not here."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gan_models import GANSpec, build_gan, train_step
from gan_models.ema import GeneratorEMA
from gan_models.performance import default_precision
from pipelines.config import ConfigError, build_config, config_from_dict, parse_duration
from gan_models.schedule import lr_scale
from pipelines.hooks import GeneratorAverage, LearningRateDecay, LoopState, TimeBudget
from pipelines.loop import run_progress
from pipelines.scoring import CHECKPOINT_SCORE, CheckpointScore, best_checkpoint
from tests.helpers import constant_batches


def _gan():
    return build_gan(GANSpec(resolution=28, channels=1, nz=8, ngf=8, ndf=8), seed=0)


def _loop(gan, **kw):
    args = dict(gan=gan, rank=0, world=1, total_steps=None, checkpoint_every=5, log_every=2, sample_every=3, seed=0)
    args.update(kw)
    return LoopState(**args)


def test_moving_average_differs_from_g_and_follows_it():
    gan = _gan()
    ema = GeneratorEMA(gan.generator, half_life_images=64, rampup=None)
    batches = constant_batches(8, 1, 28)
    for _ in range(5):
        train_step(gan, batches)
        ema.update(gan.generator, images=8)
    trained = dict(gan.generator.named_parameters())
    averaged = dict(ema.module.named_parameters())
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained), "the average is not G itself"
    # one more update with decay 0.5 ** (8 / 64): each weight moves 1 - decay of the way towards G's
    before = {k: v.detach().clone() for k, v in averaged.items()}
    train_step(gan, batches)
    ema.update(gan.generator, images=8)
    decay = 0.5 ** (8 / 64)
    for k, v in averaged.items():
        torch.testing.assert_close(v, decay * before[k] + (1 - decay) * trained[k].detach())


def test_moving_average_ramps_up_and_survives_a_checkpoint():
    gan = _gan()
    ema = GeneratorEMA(gan.generator, half_life_images=10_000, rampup=0.05)
    ema.images_seen = 100
    assert ema.decay(8) == pytest.approx(0.5 ** (8 / 5.0))  # early on the horizon is 5% of the images seen
    ema.update(gan.generator, 8)
    restored = GeneratorEMA(_gan().generator, half_life_images=10_000)
    restored.load_state_dict(ema.state_dict())
    assert restored.images_seen == ema.images_seen
    for a, b in zip(restored.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


def _stopped_at(budget: TimeBudget, now: list, at: float) -> bool:
    """Whether the budget asks a fresh loop to stop when the clock reads ``at``."""
    loop = _loop(_gan())
    now[0] = at
    budget.on_step(loop, {})
    return loop.stop_reason is not None and "time budget" in loop.stop_reason


def test_time_budget_stops_at_the_deadline_and_resumes_with_what_is_left():
    now = [0.0]
    budget = TimeBudget(60, clock=lambda: now[0])
    assert not _stopped_at(budget, now, 59.0)
    assert _stopped_at(budget, now, 60.5)
    # a run resumed after 40 s of training has 20 s left
    now[0] = 1000.0
    resumed = TimeBudget(60, clock=lambda: now[0])
    resumed.load_state_dict({"spent": 40.0})
    assert not _stopped_at(resumed, now, 1019.0)
    assert _stopped_at(resumed, now, 1020.5)


def test_a_deadline_shrinks_the_budget_to_the_time_really_left():
    """A sweep's trial: restarts and pauses are not training time, so its budget ends at the sweep's deadline."""
    now, wall = [0.0], [5000.0]
    budget = TimeBudget(60, clock=lambda: now[0], deadline=5030.0, wall_clock=lambda: wall[0])
    assert budget.seconds == pytest.approx(30.0)  # the progress and the learning-rate decay follow this
    assert not _stopped_at(budget, now, 29.0)
    assert _stopped_at(budget, now, 30.5)
    # checkpointed after 20 s of training, paused, restarted 5 s before the deadline: 5 s left, not 40
    wall[0], now[0] = 5025.0, 2000.0
    resumed = TimeBudget(60, clock=lambda: now[0], deadline=5030.0, wall_clock=lambda: wall[0])
    resumed.load_state_dict({"spent": 20.0})
    assert resumed.seconds == pytest.approx(25.0)
    assert not _stopped_at(resumed, now, 2004.0)
    assert _stopped_at(resumed, now, 2005.5)
    # a far deadline leaves the budget as it is
    assert TimeBudget(60, deadline=wall[0] + 10_000, wall_clock=lambda: wall[0]).seconds == 60


def test_a_jobs_deadline_reaches_the_workers_time_budget(tmp_path):
    from pipelines.launch import make_job
    from pipelines.loop import quality_hooks

    cfg = build_config("dcgan", overrides={"train": {"time_budget": 600}})
    job = make_job(cfg, data_path=str(tmp_path), run_id="r", tracking_uri="http://127.0.0.1:1", deadline=1234.0)
    loop = _loop(_gan())
    quality_hooks(config_from_dict(job.config), loop.gan, loop, None, job.deadline)
    assert loop.time_budget.deadline == 1234.0 and loop.time_budget.seconds == 0.0  # that moment has passed


def test_checkpoint_exports_the_better_of_g_and_its_average(monkeypatch):
    gan = _gan()
    loop = _loop(gan)
    average = GeneratorAverage(gan, half_life_images=100, images_per_step=8)
    scores = iter([12.0, 9.0, 7.0, 11.0])  # checkpoint 1: average better; checkpoint 2: G better
    monkeypatch.setattr("pipelines.scoring.cheap_fd", lambda *a, **k: next(scores))
    hook = CheckpointScore(reference={}, average=average)
    values = hook.checkpoint_metrics(loop)
    assert loop.exported_generator is average.module and values["exported_average"] == 1.0
    assert hook.report_metrics(loop) == {CHECKPOINT_SCORE: 9.0}
    values = hook.checkpoint_metrics(loop)
    assert loop.exported_generator is None and values["exported_average"] == 0.0
    assert hook.report_metrics(loop) == {CHECKPOINT_SCORE: 7.0}
    # other ranks neither score nor report
    assert hook.checkpoint_metrics(_loop(gan, rank=1)) == {} and hook.report_metrics(_loop(gan, rank=1)) == {}


def test_best_checkpoint_is_the_lowest_score_not_the_last():
    latest = SimpleNamespace(path="/c/checkpoint_00000600")
    best = SimpleNamespace(path="/c/checkpoint_00000400")
    result = SimpleNamespace(checkpoint=latest, best_checkpoints=[
        (SimpleNamespace(path="/c/checkpoint_00000200"), {CHECKPOINT_SCORE: 30.0}),
        (best, {CHECKPOINT_SCORE: 8.5}), (latest, {CHECKPOINT_SCORE: 9.1})])
    assert best_checkpoint(result) is best
    unscored = SimpleNamespace(checkpoint=latest, best_checkpoints=[(latest, {"step": 600})])
    assert best_checkpoint(unscored) is latest


def test_written_checkpoint_holds_the_exported_generator(tmp_path):
    from pipelines import checkpoints

    gan = _gan()
    other = _gan().generator
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    checkpoints.write_checkpoint(tmp_path, gan, {"step": 1, "epoch": 0, "batch_in_epoch": 1}, {}, [], {},
                                 generator=other)
    saved = torch.load(tmp_path / checkpoints.GENERATOR_FILE, weights_only=True)
    state = torch.load(tmp_path / checkpoints.STATE_FILE, weights_only=True)
    for key, value in other.state_dict().items():
        assert torch.equal(saved[key], value)
        assert torch.equal(state["generator"][key], gan.generator.state_dict()[key]), "training state stays G's"


@pytest.mark.parametrize("text,seconds", [("450", 450), ("90s", 90), ("8m", 480), ("1h30m", 5400),
                                          ("7m30s", 450)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_time_budget_is_the_default_limit_unless_epochs_or_steps_are_given():
    assert build_config("wgan").train.resolved_time_budget == 450
    assert build_config("wgan", overrides={"train": {"max_steps": 10}}).train.resolved_time_budget is None
    assert build_config("wgan", overrides={"train": {"epochs": 1}}).train.resolved_time_budget is None
    assert build_config("wgan", overrides={"train": {"time_budget": "2m", "epochs": 1}}).train.resolved_time_budget == 120
    with pytest.raises(ConfigError, match="not a duration"):
        build_config("wgan", overrides={"train": {"time_budget": "soon"}})


def test_run_trains_until_a_fixed_time_after_the_command_started(monkeypatch, tmp_path):
    """`run`'s promise is end to end: start-up (a first run's classifier, Ray) comes out of training, not on top."""
    from pipelines import run as run_module
    from pipelines.config import RUN_MIN_TRAINING, RUN_TRAINING_ENDS_AFTER

    calls = []
    monkeypatch.setattr("pipelines.train.train_stage", lambda cfg, **kw: calls.append((cfg, kw)) or SimpleNamespace(
        run_id="r", run_name=kw.get("run_name") or kw.get("resume"), steps=1, checkpoint_dir="c"))
    cfg = build_config("wgan").model_copy(update={"runs_dir": str(tmp_path)})
    started = 1_000.0
    monkeypatch.setattr(run_module.time, "time", lambda: started + 70)  # 70 s of start-up
    wf = run_module.Workflow(cfg, "w", started=started)
    run_module._train(cfg, {"prepare": {"data_path": "d"}}, wf)
    trained, kw = calls[-1]
    assert kw["deadline"] == started + RUN_TRAINING_ENDS_AFTER
    assert trained.train.time_budget == RUN_TRAINING_ENDS_AFTER, "the budget grows to the window; the deadline ends it"
    assert cfg.train.time_budget is None, "the workflow's own config (its inputs hash) is untouched"

    monkeypatch.setattr(run_module.time, "time", lambda: started + 500)  # a slow first prepare
    run_module._train(cfg, {"prepare": {"data_path": "d"}}, run_module.Workflow(cfg, "w2", started=started))
    assert calls[-1][1]["deadline"] == started + 500 + RUN_MIN_TRAINING

    limited = build_config("wgan", overrides={"train": {"max_steps": 10}}).model_copy(update={"runs_dir": str(tmp_path)})
    run_module._train(limited, {"prepare": {"data_path": "d"}}, run_module.Workflow(limited, "w3", started=started))
    assert calls[-1][1]["deadline"] is None and calls[-1][0].train.time_budget is None


def test_batch_is_global_and_split_across_workers():
    cfg = build_config("wgan", overrides={"train": {"workers": 4}})
    assert cfg.train.batch_size == 64 and cfg.train.batch_per_worker() == 16
    with pytest.raises(ConfigError, match="split evenly"):
        build_config("wgan", overrides={"train": {"workers": 3}})


def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr("gan_models.performance.cpu_flags", lambda: ("cpu", {"avx2", "avx512_bf16"}))
    assert default_precision("cpu") == "bf16"
    monkeypatch.setattr("gan_models.performance.cpu_flags", lambda: ("cpu", {"avx2"}))
    assert default_precision("cpu") == "fp32"
    assert build_config("dcgan").gan_spec(28, 1, 10).precision == "fp32"
    assert build_config("dcgan", overrides={"train": {"precision": "bf16"}}).gan_spec(28, 1, 10).precision == "bf16"


def test_learning_rates_stay_then_decay_linearly_to_the_final_scale():
    assert [lr_scale(p, 0.5, 0.05) for p in (0.0, 0.5, 0.75, 1.0, 1.3)] == pytest.approx([1, 1, 0.525, 0.05, 0.05])
    assert lr_scale(0.99, 1.0, 0.05) == 1.0, "decay_from 1 is the papers' constant rate"


def test_decay_hook_sets_both_optimizers_from_the_spec_and_logs_the_scale():
    gan = build_gan(GANSpec(resolution=28, channels=1, nz=8, ngf=8, ndf=8, lr_g=2e-4, lr_d=4e-4), seed=0)
    loop = _loop(gan)
    loop.progress = 0.75
    values = {}
    LearningRateDecay(0.5, 0.05).on_log(loop, values)
    assert values["lr_scale"] == pytest.approx(0.525)
    assert [g["lr"] for g in gan.opt_g.param_groups] == pytest.approx([2e-4 * 0.525])
    assert [g["lr"] for g in gan.opt_d.param_groups] == pytest.approx([4e-4 * 0.525])
    # a resumed run takes the rates it stopped at from the checkpoint's progress, not from a clock
    resumed = build_gan(GANSpec(resolution=28, channels=1, nz=8, ngf=8, ndf=8, lr_g=2e-4, lr_d=4e-4), seed=0)
    hook = LearningRateDecay(0.5, 0.05)
    hook.load_state_dict(LearningRateDecay(0.5, 0.05).state_dict() | {"progress": 0.75})
    hook.on_resume(_loop(resumed), [])
    assert [g["lr"] for g in resumed.opt_g.param_groups] == pytest.approx([2e-4 * 0.525])


def test_progress_is_the_larger_of_steps_and_time_spent():
    now = [0.0]
    loop = _loop(_gan(), total_steps=100)
    loop.step = 30
    assert run_progress(loop) == pytest.approx(0.3)
    loop.time_budget = TimeBudget(60, clock=lambda: now[0])
    now[0] = 45.0
    assert run_progress(loop) == pytest.approx(0.75)
    loop.total_steps, now[0] = None, 90.0
    assert run_progress(loop) == 1.0


def test_checkpoints_fall_by_time_unless_steps_are_given(monkeypatch):
    import pipelines.loop as loop_module

    clock = [100.0]
    monkeypatch.setattr(loop_module.time, "monotonic", lambda: clock[0])
    by_time = loop_module._CheckpointDue(_loop(_gan(), checkpoint_every=None, checkpoint_interval=60.0))
    clock[0] = 159.0
    assert not by_time.by_time() and not by_time.by_steps()
    clock[0] = 160.0
    assert by_time.by_time()
    by_time.restart()  # a checkpoint was written: the interval counts from it
    assert not by_time.by_time()

    loop = _loop(_gan(), checkpoint_every=5, checkpoint_interval=1.0)
    by_steps = loop_module._CheckpointDue(loop)
    clock[0] = 1e6
    assert not by_steps.by_time()  # --checkpoint-every given: the clock never decides
    loop.step = 10
    assert by_steps.by_steps()
    loop.step = 11
    assert not by_steps.by_steps()


def test_checkpoint_interval_is_the_default_and_takes_durations():
    cfg = build_config("wgan")
    assert cfg.train.checkpoint_every is None and cfg.train.checkpoint_interval == 60
    assert build_config("wgan", overrides={"train": {"checkpoint_interval": "2m"}}).train.checkpoint_interval == 120
    with pytest.raises(ConfigError, match="checkpoint_interval"):
        build_config("wgan", overrides={"train": {"checkpoint_interval": 0}})
