"""The training loop, written once: every Ray Train worker of ``train``, ``run`` and ``tune`` runs ``train_worker``
on a ``TrainJob``: setup, resume, then ``gan_models.train_step`` with the hooks of ``pipelines.hooks`` around it
(console, divergence guard, sample grids, the MLflow committer, plus the job's own, e.g. Tune's reporter).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from gan_models import GAN, build_gan, performance, train_step
from gan_models.sampling import from_uint8
from pipelines import checkpoint_models, checkpoints, tracking
from pipelines.config import PipelineConfig, config_from_dict
from pipelines.faults import fault_hooks_from_env
from pipelines.hooks import GeneratorAverage, Hook, LearningRateDecay, LoopState, StopTraining, TimeBudget, default_hooks
from pipelines.job import TrainJob, cores_per_process
from pipelines.progress import WorkerConsole
from pipelines.training_metrics import EPOCH, IMAGES_PER_SECOND, REPLICA_MAX_ABS_DIFF


def build_training_gan(cfg: PipelineConfig, manifest: dict, device: torch.device = torch.device("cpu")) -> GAN:
    """The GAN a worker trains: the config's spec for this dataset, weights seeded by ``train.seed``, the speed
    options applied. The benchmarks build their pipeline side with it too, so they measure what runs."""
    spec = cfg.gan_spec(manifest["resolution"], manifest["channels"], max(len(manifest["class_names"]), 2))
    gan = build_gan(spec, device=device, seed=cfg.train.seed)
    return performance.apply_options(gan, channels_last=cfg.train.channels_last, compile=cfg.train.compile)


def total_steps(cfg: PipelineConfig, steps_per_epoch: int) -> Optional[int]:
    """Generator steps of the run: ``max_steps``, else ``epochs`` of real batches (n_critic per step); None when
    only the time budget ends it."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if cfg.train.epochs:
        return max(1, cfg.train.epochs * steps_per_epoch // cfg.optim.n_critic)
    return None


def quality_hooks(cfg: PipelineConfig, gan: GAN, loop: LoopState, score_reference: Optional[dict],
                  deadline: Optional[float] = None) -> list[Hook]:
    """The hooks that make a run end with a good generator: the time budget, the learning-rate decay, and on rank 0 the moving average of
    G and the checkpoint score that picks the better of the two at every checkpoint (pipelines.scoring)."""
    from pipelines.scoring import CheckpointScore

    t, hooks = cfg.train, []
    if t.resolved_time_budget:
        loop.time_budget = TimeBudget(t.resolved_time_budget, deadline=deadline)
        hooks.append(loop.time_budget)
    if cfg.optim.lr_decay_from < 1.0:
        hooks.append(LearningRateDecay(cfg.optim.lr_decay_from, cfg.optim.lr_final_scale))
    if score_reference is not None and loop.is_chief:
        average = GeneratorAverage(gan, t.ema_half_life, images_per_step=t.batch_size) if t.ema_half_life else None
        hooks += [h for h in (average, CheckpointScore(score_reference, average)) if h is not None]
    return hooks


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels travel to the worker's device; the float conversion happens there."""
    return from_uint8(images.to(device, non_blocking=True))


class BatchStream:
    """Real batches across epoch boundaries, with a position that checkpoints can restore."""

    def __init__(self, reader, device: torch.device, epoch: int = 0, batch_in_epoch: int = 0):
        self.reader, self.device = reader, device
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._it: Optional[Iterator] = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._it = iter(self.reader.epoch(self.epoch, start_batch=self.batch_in_epoch))
            try:
                images, labels = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.batch_in_epoch = None, self.epoch + 1, 0
                continue
            self.batch_in_epoch += 1
            return normalize(images, self.device), labels.to(self.device, non_blocking=True)


def _mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all logged scalars: every rank sees the same numbers, NaN on any rank included."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if dist.is_available() and dist.is_initialized():
        stacked = stacked.to(_collective_device())
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.cpu().tolist()))


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_buffers(*modules: torch.nn.Module) -> None:
    """Batch-norm running statistics drift apart per rank (buffers are not broadcast, see ``wrap_ddp``);
    averaging them before a checkpoint makes every rank, and the checkpoint, identical."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for module in modules:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= dist.get_world_size()


def replica_spread(*modules: torch.nn.Module) -> float:
    """Largest absolute difference between any rank's parameters and rank 0's (0.0 = identical replicas).
    Checked at every checkpoint: a silent divergence of replicas would make the checkpoint rank 0's alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    flat = torch.cat([p.detach().flatten().float() for m in modules for p in m.parameters()]).to(_collective_device())
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    spread = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread.item())


def ddp_options() -> dict:
    """``DistributedDataParallel`` keyword arguments of every wrapped network: no buffer sync at forward. D runs
    forward on real and fake before one backward; broadcasting batch-norm buffers at the second forward modifies
    in place what the first one saved for backward. (Buffers are still synced once at init.)"""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 names it forward_sync_buffers; older releases broadcast_buffers.
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return {name: False}


def wrap_ddp(gan: GAN) -> None:
    """G and D (and the auxiliary classifier) are wrapped separately, with ``ddp_options``."""
    import ray.train.torch

    kwargs = {"parallel_strategy_kwargs": ddp_options(), "move_to_device": False}
    gan.generator = ray.train.torch.prepare_model(gan.generator, **kwargs)
    gan.discriminator = ray.train.torch.prepare_model(gan.discriminator, **kwargs)
    if gan.aux_classifier is not None:
        gan.aux_classifier = ray.train.torch.prepare_model(gan.aux_classifier, **kwargs)


def apply_hyperparameters(gan: GAN, cfg: PipelineConfig) -> None:
    """The config's learning rates (and Adam's betas) on restored optimizers: their state (moments, step counts)
    is carried over, the values are this run's own (a PBT trial that copied another's checkpoint)."""
    from gan_models.schedule import set_learning_rates

    set_learning_rates(gan, 1.0)  # the spec's rates are the config's (build_training_gan)
    for optimizer in (gan.opt_g, gan.opt_d):
        for group in optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (cfg.optim.beta1, cfg.optim.beta2)


def _reseed(seed: int, rank: int, step: int) -> None:
    """Every step's noise comes from (seed, rank, step): a run resumed from step S draws exactly the noise the
    uninterrupted run drew after S, wherever checkpoints fell (by time they differ between runs), and each rank
    draws different noise. (Seeding costs microseconds; a step, milliseconds.)"""
    torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank)


class _CheckpointDue:
    """When the next checkpoint falls: every ``checkpoint_every`` steps when set, else once
    ``checkpoint_interval`` seconds of training have passed since the last one (or the start). The time rule is
    checked at log steps, whose all-reduce makes every rank take the same decision at the same step."""

    def __init__(self, loop: LoopState):
        self.loop = loop
        self.restart()

    def restart(self) -> None:
        self.since = time.monotonic()

    def by_steps(self) -> bool:
        return self.loop.checkpoint_every is not None and self.loop.step % self.loop.checkpoint_every == 0

    def by_time(self) -> bool:
        return (self.loop.checkpoint_every is None
                and time.monotonic() - self.since >= self.loop.checkpoint_interval)


class CountedBatches:
    """The real batches ``train_step`` takes, counted: throughput from what was consumed, whatever the number of
    critic iterations per step."""

    def __init__(self, batches: Iterator):
        self.batches, self.images = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        images, labels = next(self.batches)
        self.images += images.shape[0]
        return images, labels


class Worker:
    """One worker's training: what ``setup`` builds, ``resume`` restores and ``run`` trains."""

    def __init__(self, job: TrainJob):
        import ray.train
        import ray.train.torch

        from pipelines.data.reader import TrainReader, load_manifest

        self.job, self.cfg = job, config_from_dict(job.config)
        t = self.cfg.train
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(job.threads or cores_per_process(world))
        self.device = ray.train.torch.get_device() if t.gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        manifest = load_manifest(job.data_path)
        self.gan = build_training_gan(self.cfg, manifest, self.device)
        self.reader = TrainReader(job.data_path, rank=rank, world_size=world, batch_size=t.batch_per_worker(),
                                  seed=t.seed)
        self.run_config = {"config": job.config, "gan_spec": asdict(self.gan.spec), "data_path": job.data_path,
                           "manifest_hash": manifest["manifest_hash"], "mlflow_run_id": job.run_id,
                           "class_names": manifest["class_names"], "dataset": manifest["dataset"]}
        self.loop = LoopState(self.gan, rank, world, total_steps(self.cfg, self.reader.steps_per_epoch),
                              t.checkpoint_every, t.log_every, t.sample_every, t.seed, t.checkpoint_interval)
        client = tracking.client(job.tracking_uri) if rank == 0 else None
        console = WorkerConsole(job.progress_board)
        # scored checkpoints are recorded as MLflow LoggedModels (the experiment's Models tab ranks them)
        models = (checkpoint_models.for_worker(client, job.run_id, self.cfg, manifest)
                  if rank == 0 and job.score_reference is not None else None)
        self.hooks: list[Hook] = [*fault_hooks_from_env(console.message),
                                  *quality_hooks(self.cfg, self.gan, self.loop, job.score_reference, job.deadline),
                                  *default_hooks(self.gan, self.loop, client, job.run_id, console,
                                                 checkpoint_models=models),
                                  *(make() for make in job.hook_factories)]
        self.position = {"epoch": 0, "batch_in_epoch": 0}

    def resume(self) -> None:
        """From Ray's latest checkpoint of the run, or the driver's when newer (Ray registers checkpoints
        asynchronously: a driver killed just after one was written leaves it on storage, not in Ray's records)."""
        import ray.train

        checkpoint, newer = ray.train.get_checkpoint(), self.job.resume_from
        if newer and (checkpoint is None or checkpoints.checkpoint_step(newer) > checkpoints.checkpoint_step(checkpoint.path)):
            checkpoint = ray.train.Checkpoint.from_directory(newer)
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                progress, hook_states = checkpoints.restore(self.gan, Path(ckpt_dir))
                # another run's checkpoint (a PBT exploit): its uncommitted metrics belong to that run
                pending = [] if self.job.inherited else checkpoints.read_pending_metrics(Path(ckpt_dir))
            apply_hyperparameters(self.gan, self.cfg)
            self.loop.step, self.loop.resumed = progress["step"], True
            self.position = {"epoch": progress["epoch"], "batch_in_epoch": progress["batch_in_epoch"]}
            for hook in self.hooks:
                if hook.state_key in hook_states:
                    hook.load_state_dict(hook_states[hook.state_key])
                hook.on_resume(self.loop, pending)

    def run(self) -> None:
        loop, hooks = self.loop, self.hooks
        wrap_ddp(self.gan)
        stream = BatchStream(self.reader, self.device, **self.position)
        # reads and host-to-device copies overlap the step (on CPU: a small in-memory gather)
        batches = CountedBatches(performance.Prefetcher(stream) if self.device.type == "cuda" else stream)
        throughput = _Throughput(batches, loop.world)
        due = _CheckpointDue(loop)
        while not loop.last and (loop.total_steps is None or loop.step < loop.total_steps):
            _reseed(self.cfg.train.seed, loop.rank, loop.step)
            stats = train_step(self.gan, batches, loop.step)
            loop.step += 1
            loop.epoch = batches.batches.epoch
            for hook in hooks:
                hook.on_step(loop, stats)
            loop.last = loop.total_steps is not None and loop.step >= loop.total_steps
            loop.at_checkpoint = loop.last or due.by_steps()
            if loop.step % loop.log_every == 0 or loop.at_checkpoint:
                flags = {_STOP: loop.stop_reason is not None, _CHECKPOINT_DUE: due.by_time(),
                         _PROGRESS: run_progress(loop)}
                values = _mean_across_ranks({**stats, **{k: torch.tensor(float(v), device=self.device)
                                                         for k, v in flags.items()}})
                if values.pop(_STOP) > 0:  # some rank's hook asked to stop: all ranks end here, as at the last step
                    loop.last = loop.at_checkpoint = True
                if values.pop(_CHECKPOINT_DUE) > 0:  # any rank's clock: every rank checkpoints at this same step
                    loop.at_checkpoint = True
                loop.progress = values.pop(_PROGRESS)  # ranks' clocks differ a little: their mean is the same everywhere
                values[IMAGES_PER_SECOND] = throughput.images_per_second()
                values[EPOCH] = loop.epoch + batches_in_epoch(batches) / max(self.reader.steps_per_epoch, 1)
                try:
                    for hook in hooks:
                        hook.on_log(loop, values)
                except StopTraining:
                    return
                loop.pending.append((loop.step, values))
            for hook in hooks:
                hook.after_step(loop)
            if loop.at_checkpoint:
                self.checkpoint({"step": loop.step, "epoch": loop.epoch, "batch_in_epoch": batches_in_epoch(batches)})
                due.restart()

    def checkpoint(self, progress: dict[str, int]) -> None:
        """Persist a checkpoint (rank 0 writes, every rank reports), then let the hooks commit what it covers."""
        import ray.train

        loop, hooks = self.loop, self.hooks
        average_buffers(self.gan.generator, self.gan.discriminator)
        values = loop.pending[-1][1]
        values[REPLICA_MAX_ABS_DIFF] = replica_spread(self.gan.generator, self.gan.discriminator)
        for hook in hooks:
            values.update(hook.checkpoint_metrics(loop))
        reported = {"step": loop.step, **values}
        for hook in hooks:
            reported.update(hook.report_metrics(loop))
        states = {h.state_key: state for h in hooks if (state := h.state_dict()) is not None}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if loop.is_chief:
                checkpoints.write_checkpoint(Path(tmp), self.gan, progress, self.run_config, loop.pending,
                                             loop.pending_images, hook_states=states,
                                             generator=loop.exported_generator)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(reported, checkpoint=ckpt, checkpoint_dir_name=checkpoints.checkpoint_dir_name(loop.step))
        for hook in hooks:  # the checkpoint is persisted: now (and only now) what it covers is committed
            hook.after_checkpoint(loop)
        loop.pending, loop.pending_images = [], {}


_STOP = "_stop_requested"
_CHECKPOINT_DUE = "_checkpoint_due"
_PROGRESS = "_progress"


def run_progress(loop: LoopState) -> float:
    """Fraction of the run done on this rank: steps of the planned steps, or time of the budget (the larger)."""
    done = loop.step / loop.total_steps if loop.total_steps else 0.0
    if loop.time_budget is not None:
        done = max(done, loop.time_budget.spent() / loop.time_budget.seconds)
    return min(1.0, done)


def batches_in_epoch(batches: CountedBatches) -> int:
    return batches.batches.batch_in_epoch


class _Throughput:
    """Images per second over the window since the previous call, from the real batches consumed on all ranks."""

    def __init__(self, batches: CountedBatches, world: int):
        self.batches, self.world = batches, world
        self.start, self.images = time.perf_counter(), batches.images

    def images_per_second(self) -> float:
        now = time.perf_counter()
        rate = (self.batches.images - self.images) * self.world / max(now - self.start, 1e-9)
        self.start, self.images = now, self.batches.images
        return rate


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO; the loop prints its own progress. (Some of its loggers are named
    by file path, not by module.)"""
    for name in ["ray.train", *(n for n in logging.root.manager.loggerDict
                                if n.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in n)]:
        logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(job: TrainJob) -> None:
    """Ray Train worker entry point (``launch.build_trainer`` binds the job)."""
    _quiet_ray_train_logs()
    worker = Worker(job)
    worker.resume()
    worker.run()
