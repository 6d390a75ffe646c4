"""The training loop, written once: every Ray Train worker of ``train``, ``run`` and ``tune`` runs
``train_loop_per_worker``. Its body is ``gan_models.train_step``; around it: data, DDP, checkpoints, metrics.
"""
from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from gan_models import GAN, GANSpec, build_gan, performance, train_step
from gan_models.sampling import fixed_inputs, generate, image_grid
from pipelines import checkpoints, tracking
from pipelines.config import PipelineConfig, config_from_dict

DIVERGED_TAG = "gan_pipeline.diverged"
RESTARTS_TAG = "gan_pipeline.restarts"
RESUMED_FROM_TAG = "gan_pipeline.resumed_from_step"


def gan_spec(cfg: PipelineConfig, resolution: int, channels: int, num_classes: int) -> GANSpec:
    """The typed config, mapped onto what the science needs (geometry comes from the dataset manifest)."""
    m, o = cfg.model, cfg.optim
    # 32 channels at the widest-resolution layer suffice for 28/32 px digits and keep CPUs fast; 64 px images
    # get the DCGAN reference width.
    default_width = 64 if resolution >= 64 else 32
    return GANSpec(
        resolution=resolution, channels=channels, nz=m.nz, ngf=m.ngf or default_width,
        ndf=m.ndf or m.ngf or default_width, objective=m.objective,
        conditional=m.conditional, num_classes=num_classes if m.conditional else m.num_classes,
        critic_batchnorm=m.critic_batchnorm, aux_class_weight=m.aux_class_weight, optimizer=o.optimizer,
        lr_g=o.lr_g, lr_d=o.lr_d, beta1=o.beta1, beta2=o.beta2, n_critic=o.n_critic, clip_value=o.clip_value,
        gp_weight=o.gp_weight, precision=cfg.train.precision,
    )


def build_training_gan(cfg: PipelineConfig, manifest: dict, device: torch.device = torch.device("cpu")) -> GAN:
    """The GAN a worker trains: the config's spec for this dataset, weights seeded by ``train.seed``, the speed
    options applied. The benchmarks build their pipeline side with it too, so they measure what runs."""
    spec = gan_spec(cfg, manifest["resolution"], manifest["channels"], max(len(manifest["class_names"]), 2))
    gan = build_gan(spec, device=device, seed=cfg.train.seed)
    return performance.apply_options(gan, channels_last=cfg.train.channels_last, compile=cfg.train.compile)


def total_steps(cfg: PipelineConfig, steps_per_epoch: int) -> int:
    """Generator steps of the run: ``max_steps``, else ``epochs`` of real batches (n_critic per step)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, cfg.train.epochs * steps_per_epoch // cfg.optim.n_critic)


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels travel to the worker's device; the float conversion happens there."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


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


def _injected_fault(step: int, rank: int, resumed: bool) -> None:
    """Fault injection for the reliability tests: ``GAN_PIPELINE_FAULT=kill@STEP[:RANK]`` SIGKILLs that worker
    (first attempt only), ``nan@STEP`` makes the losses non-finite from that step on."""
    spec = os.environ.get("GAN_PIPELINE_FAULT", "")
    if not spec.startswith("kill@") or resumed:
        return
    at, _, which = spec[5:].partition(":")
    if step == int(at) and rank == int(which or 0):
        import signal

        print(f"[gan-pipeline] fault injection: SIGKILL of rank {rank} at step {step}", flush=True)
        # Ray Train's controller registers a reported checkpoint when it next polls the workers (every few
        # seconds); a crash within that window resumes from the checkpoint before. Tests want the usual case.
        time.sleep(float(os.environ.get("GAN_PIPELINE_FAULT_DELAY", "5")))
        os.kill(os.getpid(), signal.SIGKILL)


def _nan_injected(step: int) -> bool:
    spec = os.environ.get("GAN_PIPELINE_FAULT", "")
    return spec.startswith("nan@") and step >= int(spec[4:])


def wrap_ddp(gan: GAN) -> None:
    """G and D (and the auxiliary classifier) are wrapped separately. No buffer sync at forward: D runs
    forward on real and fake before one backward; broadcasting batch-norm buffers at the second forward
    modifies in place what the first one saved for backward. (Buffers are still synced once at init.)"""
    import inspect

    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 names it forward_sync_buffers; older releases broadcast_buffers.
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    kwargs = {"parallel_strategy_kwargs": {name: False}, "move_to_device": False}
    gan.generator = ray.train.torch.prepare_model(gan.generator, **kwargs)
    gan.discriminator = ray.train.torch.prepare_model(gan.discriminator, **kwargs)
    if gan.aux_classifier is not None:
        gan.aux_classifier = ray.train.torch.prepare_model(gan.aux_classifier, **kwargs)


def _reseed(seed: int, rank: int, step: int) -> None:
    """Noise streams restart at every checkpoint from (seed, rank, step): a run resumed from step S draws
    exactly the noise the uninterrupted run drew after S, and each rank draws different noise."""
    torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker entry point. ``loop_config``: config (dict), data_path, run_id, tracking_uri,
    optional ``report_hook`` (Tune: a callable(step, gan, metrics) -> dict of extra metrics to report)."""
    import ray.train
    import ray.train.torch

    from pipelines.data.reader import TrainReader, load_manifest

    # Ray Train logs every report at INFO; the loop prints its own progress.
    # (some of its loggers are named by file path, not by module)
    for name in ["ray.train", *(n for n in logging.root.manager.loggerDict
                                if n.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in n)]:
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config.get("threads") or max(1, (os.cpu_count() or 1) // world))
    device = ray.train.torch.get_device() if cfg.train.gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    manifest = load_manifest(loop_config["data_path"])
    gan = build_training_gan(cfg, manifest, device)
    spec = gan.spec
    reader = TrainReader(loop_config["data_path"], rank=rank, world_size=world,
                         batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    steps = total_steps(cfg, reader.steps_per_epoch)
    run_config = {"config": loop_config["config"], "gan_spec": asdict(spec), "manifest_hash": manifest["manifest_hash"],
                  "data_path": loop_config["data_path"], "mlflow_run_id": loop_config["run_id"],
                  "class_names": manifest["class_names"], "dataset": manifest["dataset"]}

    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    mlflow_client = tracking.client(loop_config["tracking_uri"]) if rank == 0 else None
    checkpoint = ray.train.get_checkpoint()
    resume_from = loop_config.get("resume_from")
    if resume_from and (checkpoint is None
                        or checkpoints.checkpoint_step(resume_from) > checkpoints.checkpoint_step(checkpoint.path)):
        # Ray registers a checkpoint asynchronously: a driver killed just after one was written leaves it on
        # storage but not in Ray's records. The driver found the newest complete one; it wins when newer.
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            progress = checkpoints.restore(gan, Path(ckpt_dir))
            pending = checkpoints.read_pending_metrics(Path(ckpt_dir))
        if rank == 0:
            done = tracking.committed_step(mlflow_client, loop_config["run_id"])
            tracking.commit_metrics(mlflow_client, loop_config["run_id"], pending, after_step=done)
            # a trace on the run (worker stdout can be lost when a worker dies): how often, and from where
            restarts = int(mlflow_client.get_run(loop_config["run_id"]).data.tags.get(RESTARTS_TAG, "0")) + 1
            mlflow_client.set_tag(loop_config["run_id"], RESTARTS_TAG, str(restarts))
            mlflow_client.set_tag(loop_config["run_id"], RESUMED_FROM_TAG, str(progress["step"]))
            print(f"[gan-pipeline] resumed from checkpoint at step {progress['step']}/{steps}", flush=True)
    _reseed(cfg.train.seed, rank, progress["step"])
    wrap_ddp(gan)

    stream = BatchStream(reader, device, progress["epoch"], progress["batch_in_epoch"])
    if device.type == "cuda":  # reads and host-to-device copies overlap the step (on CPU: a small in-memory gather)
        stream = performance.Prefetcher(stream)
    fixed_z, fixed_labels = fixed_inputs(gan, n=64 if not spec.conditional else 10 * spec.num_classes, seed=cfg.train.seed)
    pending: list = []
    pending_pngs: dict[str, bytes] = {}
    report_hook: Optional[Callable] = loop_config.get("report_hook")
    images_per_step = cfg.train.batch_size * spec.n_critic * world
    window_start, window_steps = time.perf_counter(), 0
    step = progress["step"]

    resumed = checkpoint is not None
    while step < steps:
        stats = train_step(gan, stream)
        step += 1
        _injected_fault(step, rank, resumed)
        if _nan_injected(step):
            stats["d_loss"] = stats["d_loss"] * float("nan")
        window_steps += 1
        last = step == steps
        is_checkpoint = last or step % cfg.train.checkpoint_every == 0
        if step % cfg.train.log_every == 0 or is_checkpoint:
            values = _mean_across_ranks(stats)
            elapsed = time.perf_counter() - window_start
            values["images_per_second"] = images_per_step * window_steps / max(elapsed, 1e-9)
            window_start, window_steps = time.perf_counter(), 0
            if not all(math.isfinite(v) for v in values.values()):
                bad = sorted(k for k, v in values.items() if not math.isfinite(v))
                if rank == 0:
                    mlflow_client.set_tag(loop_config["run_id"], DIVERGED_TAG,
                                          f"non-finite {', '.join(bad)} at step {step}")
                    print(f"[gan-pipeline] training diverged at step {step}: {', '.join(bad)} not finite; "
                          f"stopping (the last good checkpoint is kept)", flush=True)
                return
            values["epoch"] = stream.epoch + stream.batch_in_epoch / max(reader.steps_per_epoch, 1)
            pending.append((step, values))
            if rank == 0:
                eta = (steps - step) * images_per_step / max(values["images_per_second"], 1e-9)
                losses = "  ".join(f"{k} {values[k]:.4f}" for k in ("d_loss", "g_loss", "wasserstein_estimate")
                                   if k in values)
                print(f"[gan-pipeline] step {step}/{steps} ({100 * step / steps:.0f}%)  epoch {stream.epoch}  "
                      f"{losses}  {values['images_per_second']:.0f} img/s  ETA {_format_eta(eta)}", flush=True)
        if rank == 0 and (step % cfg.train.sample_every == 0 or last):
            grid = image_grid(generate(gan.generator, fixed_z, fixed_labels),
                              nrow=10 if spec.conditional else 8)
            pending_pngs[f"samples_step{step:08d}.png"] = _png(grid)
        if not is_checkpoint:
            continue

        average_buffers(gan.generator, gan.discriminator)
        spread = replica_spread(gan.generator, gan.discriminator)
        if pending:
            pending[-1][1]["replica_max_abs_diff"] = spread
        extra = report_hook(step, gan, loop_config) if report_hook and rank == 0 else {}
        progress = {"step": step, "epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch}
        metrics = {"step": step, **(pending[-1][1] if pending else {}), **(extra or {})}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoints.write_checkpoint(Path(tmp), gan, progress, run_config, pending, pending_pngs)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoints.checkpoint_dir_name(step))
        if rank == 0:
            # The checkpoint is persisted: now (and only now) the metrics it covers are committed; steps that
            # MLflow already holds (from an attempt that outlived its driver) are not logged twice.
            done = tracking.committed_step(mlflow_client, loop_config["run_id"])
            tracking.commit_metrics(mlflow_client, loop_config["run_id"], pending, after_step=done)
            tracking.commit_images(mlflow_client, loop_config["run_id"], pending_pngs)
        pending, pending_pngs = [], {}
        _reseed(cfg.train.seed, rank, step)
