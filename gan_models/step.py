"""One training step, the single loop body that ``train``, ``run`` and ``tune`` share (on 1 process or N Ray
workers alike): ``n_critic`` discriminator/critic phases, each on a fresh real batch, then one generator phase.

A "step" counts generator updates, as in the WGAN paper's Algorithm 1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gan_models.conditioning import AuxiliaryClassifier, check_labels
from gan_models.latent_code import check_room, information_loss
from gan_models.networks import Discriminator, DiscriminatorBody, Generator, init_weights
from gan_models.objectives import Objective, make_objective

Batch = tuple[torch.Tensor, torch.Tensor]  # images in [-1, 1], labels (int64; -1 = none)

# The statistics ``train_step`` returns (each objective a subset), named here where they are made: the pipeline
# logs them under these names and tells them apart from evaluation metrics by this tuple.
STEP_METRICS = (
    "d_loss", "g_loss", "d_real", "d_fake", "wasserstein_estimate", "gradient_penalty",
    "aux_loss_real", "aux_loss_fake", "code_loss_q", "code_loss_g", "code_continuous_loss_q",
    "code_continuous_loss_g", "d_grad_norm", "g_grad_norm",
)


@dataclass
class GANSpec:
    """What the science needs to know; the pipeline's typed config maps onto it."""

    resolution: int
    channels: int
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    objective: str = "bce"
    conditional: bool = False
    num_classes: int = 10
    critic_batchnorm: bool = True
    aux_class_weight: float = 0.0
    code_categories: int = 0  # InfoGAN's categorical code (gan_models.latent_code); 0 = none
    code_weight: float = 1.0  # lambda of the mutual-information term in G's loss
    code_continuous: int = 0  # InfoGAN's continuous codes, z's entries after the categorical ones; 0 = none
    optimizer: str = "adam"
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_critic: int = 1
    critic_warmup: bool = False
    clip_value: Optional[float] = None
    gp_weight: float = 0.0
    precision: str = "fp32"

    def __post_init__(self):
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")
        if self.objective == "wasserstein" and self.clip_value is None:
            raise ValueError("the wasserstein objective needs a clip value (WGAN clips critic weights to [-c, c])")
        if self.code_categories and (self.code_categories < 2 or self.conditional):
            raise ValueError("code_categories must be 0 or >= 2, and only on an unconditional model "
                             f"(a conditional one has its label), got {self.code_categories}")
        if self.code_continuous and not self.code_categories:
            raise ValueError("code_continuous needs a categorical code beside it (code_categories >= 2)")
        if self.code_categories:
            check_room(self.nz, self.code_categories + self.code_continuous)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class GAN:
    """Networks, optimizers and objective. ``generator``/``discriminator`` may be DDP-wrapped by the caller."""

    spec: GANSpec
    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    objective: Objective
    aux_classifier: Optional[nn.Module] = None  # AC-GAN's class predictor, or InfoGAN's Q (code_categories)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scaler_g: Optional[torch.amp.GradScaler] = None
    scaler_d: Optional[torch.amp.GradScaler] = None

    @property
    def num_classes(self) -> Optional[int]:
        return self.spec.num_classes if self.spec.conditional else None

    def autocast(self):
        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def noise(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.spec.nz, device=self.device)

    def random_labels(self, batch: int) -> Optional[torch.Tensor]:
        if not self.spec.conditional:
            return None
        return torch.randint(0, self.spec.num_classes, (batch,), device=self.device)


def _optimizer(params, spec: GANSpec, lr: float) -> torch.optim.Optimizer:
    # Multi-tensor kernels on every device: torch picks the per-parameter Python loop on CPU by default, which
    # shows in a profile of the step (benchmarks/profile_step.py).
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(spec.beta1, spec.beta2), fused=True)
    if spec.optimizer == "rmsprop":
        # WGAN: momentum-based optimizers were unstable with the clipped critic; the paper uses RMSProp.
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose adam or rmsprop")


def build_generator(spec: GANSpec) -> Generator:
    """G as the spec describes it (weights as constructed): training, checkpoints and registered models alike."""
    return Generator(spec.nz, spec.channels, spec.resolution, spec.ngf,
                     spec.num_classes if spec.conditional else None, spec.code_categories)


def build_gan(spec: GANSpec, device: torch.device | str = "cpu", seed: int | None = None) -> GAN:
    """Networks initialised as in DCGAN, optimizers and objective. ``seed`` fixes the initial weights."""
    if spec.precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("fp16 autocast is for GPUs; on CPU use precision bf16")
    device = torch.device(device)
    if seed is not None:
        torch.manual_seed(seed)
    num_classes = spec.num_classes if spec.conditional else None
    generator = build_generator(spec)
    discriminator = Discriminator(spec.channels, spec.resolution, spec.ndf, spec.critic_batchnorm, num_classes)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    aux = None
    d_params = list(discriminator.parameters())
    aux_outputs = (spec.num_classes if spec.conditional and spec.aux_class_weight > 0
                   else spec.code_categories + spec.code_continuous)
    if aux_outputs:
        body = DiscriminatorBody(spec.channels, spec.resolution, max(spec.ndf // 2, 8), batchnorm=True)
        aux = AuxiliaryClassifier(body, body.out_channels, aux_outputs)
        aux.apply(init_weights)
        aux.to(device)
        d_params += list(aux.parameters())
    generator.to(device)
    discriminator.to(device)
    objective = make_objective(spec.objective, spec.clip_value, spec.gp_weight)
    # Clipping applies from the first critic evaluation, not only after the first update.
    objective.constrain(discriminator)
    fp16 = spec.precision == "fp16"
    return GAN(
        spec=spec,
        generator=generator,
        discriminator=discriminator,
        opt_g=_optimizer(generator.parameters(), spec, spec.lr_g),
        opt_d=_optimizer(d_params, spec, spec.lr_d),
        objective=objective,
        aux_classifier=aux,
        device=device,
        scaler_g=torch.amp.GradScaler(device.type) if fp16 else None,
        scaler_d=torch.amp.GradScaler(device.type) if fp16 else None,
    )


def _no_sync(module: nn.Module):
    """The generator phase backpropagates through D only to reach G: D's gradients are thrown away,
    so DDP need not all-reduce them."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _frozen(*modules: Optional[nn.Module]):
    """Parameters that need no gradient while a phase's graph is recorded (as stylegan2-ada's phases do).

    Autograd decides at forward time which weight gradients a backward computes: with D frozen while G's loss is
    built, backpropagation through D computes only what reaches G (the input gradients), not D's own weight
    gradients, which the generator phase would throw away -- one D backward's weight half less per step.
    """
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> torch.Tensor:
    """Backward, step, and the (unscaled) gradient norm of the optimizer's parameters."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return norm.detach()


def discriminator_phase(gan: GAN, real: torch.Tensor, real_labels: torch.Tensor,
                        fake_batch: Optional[tuple] = None) -> dict[str, torch.Tensor]:
    batch = real.shape[0]
    cond = gan.spec.conditional
    d_labels = real_labels if cond else None
    # (images, labels, codes), usually train_step's; D sees the images detached
    fake, fake_labels, codes = fake_batch if fake_batch is not None else _fake_batch(gan, batch, with_graph=False)
    fake = fake.detach()
    with gan.autocast():
        real_scores = gan.discriminator(real, d_labels)
        fake_scores = gan.discriminator(fake, fake_labels)
    loss = gan.objective.discriminator_loss(real_scores, fake_scores)
    stats = {"d_real": real_scores.detach().float().mean(), "d_fake": fake_scores.detach().float().mean()}
    if gan.objective.uses_penalty:
        penalty = gan.objective.penalty(lambda x: gan.discriminator(x, d_labels), real, fake.float())
        stats["gradient_penalty"] = penalty.detach()
        loss = loss + penalty
    if gan.aux_classifier is not None and codes is not None:
        # InfoGAN's Q learns to read G's code back from G's samples.
        with gan.autocast():
            q_output = gan.aux_classifier(fake)
        loss = loss + _information_term(gan, q_output, codes, stats, "q")
    elif gan.aux_classifier is not None:
        with gan.autocast():
            aux_logits = gan.aux_classifier(real)
        aux_loss = F.cross_entropy(aux_logits.float(), real_labels)
        stats["aux_loss_real"] = aux_loss.detach()
        loss = loss + aux_loss
    stats["d_grad_norm"] = _backward_and_step(loss, gan.opt_d, gan.scaler_d)
    gan.objective.constrain(unwrap(gan.discriminator))
    stats["d_loss"] = loss.detach()
    if gan.objective.name != "bce":
        stats["wasserstein_estimate"] = stats["d_real"] - stats["d_fake"]
    return stats


def generator_phase(gan: GAN, batch: int, fake_batch: Optional[tuple] = None) -> dict[str, torch.Tensor]:
    # G's output (with its graph) from the last critic phase, as in DCGAN's Algorithm 1
    fake, labels, codes = fake_batch if fake_batch is not None else _fake_batch(gan, batch, with_graph=True)
    aux_logits = None
    with _frozen(gan.discriminator, gan.aux_classifier), gan.autocast():
        with _no_sync(gan.discriminator):
            scores = gan.discriminator(fake, labels)
        if gan.aux_classifier is not None:
            with _no_sync(gan.aux_classifier):
                aux_logits = gan.aux_classifier(fake)
    loss = gan.objective.generator_loss(scores)
    stats = {}
    if aux_logits is not None and codes is not None:
        # The mutual-information term: G makes its code legible to Q.
        loss = loss + gan.spec.code_weight * _information_term(gan, aux_logits, codes, stats, "g")
    elif aux_logits is not None:
        aux_loss = F.cross_entropy(aux_logits.float(), labels)
        stats["aux_loss_fake"] = aux_loss.detach()
        loss = loss + gan.spec.aux_class_weight * aux_loss
    stats["g_grad_norm"] = _backward_and_step(loss, gan.opt_g, gan.scaler_g)
    stats["g_loss"] = loss.detach()
    return stats


# WGAN's reference code (Arjovsky et al., the authors' "WassersteinGAN" repository, main.py) trains the critic
# 100 times per generator iteration for the first 25 generator iterations and every 500th, so the critic is close
# to optimal where the generator relies on its gradients most. Off by default: measured no better at equal wall
# time here (docs/quality.md); ``optim.critic_warmup: true`` turns it on.
WARMUP_CRITIC_ITERATIONS, WARMUP_GENERATOR_STEPS, WARMUP_EVERY = 100, 25, 500


def critic_iterations(spec: GANSpec, step: int) -> int:
    """Critic updates before generator update number ``step`` (0-based): ``n_critic``, or the warm-up's 100."""
    if spec.critic_warmup and (step < WARMUP_GENERATOR_STEPS or step % WARMUP_EVERY == 0):
        return max(spec.n_critic, WARMUP_CRITIC_ITERATIONS)
    return spec.n_critic


def train_step(gan: GAN, batches: Iterator[Batch], step: int = 0) -> dict[str, torch.Tensor]:
    """``critic_iterations(spec, step)`` critic updates (each on the next real batch), then one generator update.
    ``step``: how many generator updates came before this one.

    Returns detached tensors: callers convert to floats only when they log, so no step waits on a
    device-to-host copy.
    """
    stats: dict[str, torch.Tensor] = {}
    gan.generator.train()
    gan.discriminator.train()
    n_critic = critic_iterations(gan.spec, step)
    for i in range(n_critic):
        real, labels = next(batches)
        if gan.spec.conditional:
            check_labels(labels, gan.spec.num_classes)
        # The last critic phase's fake batch is generated with its graph kept and reused by the generator
        # phase (G's weights do not change in between): one G forward per step instead of two.
        fake_batch = _fake_batch(gan, real.shape[0], with_graph=i == n_critic - 1)
        stats = discriminator_phase(gan, real, labels, fake_batch=fake_batch)
    stats.update(generator_phase(gan, real.shape[0], fake_batch=fake_batch))
    return stats


def _information_term(gan: GAN, q_output: torch.Tensor, z: torch.Tensor, stats: dict, who: str) -> torch.Tensor:
    categorical, continuous = information_loss(q_output, z, gan.spec.code_categories, gan.spec.code_continuous)
    stats[f"code_loss_{who}"] = categorical.detach()
    if continuous is None:
        return categorical
    stats[f"code_continuous_loss_{who}"] = continuous.detach()
    return categorical + continuous


def _fake_batch(gan: GAN, batch: int, with_graph: bool) -> tuple:
    """``(images, labels, codes)`` from G: labels for a conditional G, for a coded one the noise its InfoGAN codes
    are read from (``gan_models.latent_code``), else None."""
    z, labels = gan.noise(batch), gan.random_labels(batch)
    codes = z if gan.spec.code_categories else None
    with torch.set_grad_enabled(with_graph), gan.autocast():
        return gan.generator(z, labels), labels, codes


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)
