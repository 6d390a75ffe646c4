"""Names of the metrics a training run logs: the step's statistics (named by ``gan_models.step``) and what the
loop adds. ``register`` uses them to tell training curves from evaluation results."""
from __future__ import annotations

from gan_models.step import STEP_METRICS

IMAGES_PER_SECOND = "images_per_second"
EPOCH = "epoch"
REPLICA_MAX_ABS_DIFF = "replica_max_abs_diff"
# Checkpoint scores (pipelines.scoring): the cheap domain FD of G and of its moving average, and which one the
# checkpoint exported as its generator.
CHEAP_FD = "domain_fd_cheap"
CHEAP_FD_AVERAGE = "domain_fd_cheap_ema"
EXPORTED_AVERAGE = "exported_average"
# The learning-rate multiplier of the decay schedule (gan_models.schedule).
LR_SCALE = "lr_scale"
LOOP_METRICS = (IMAGES_PER_SECOND, EPOCH, REPLICA_MAX_ABS_DIFF, CHEAP_FD, CHEAP_FD_AVERAGE, EXPORTED_AVERAGE,
                LR_SCALE)

# Logged at every log step; the last step that MLflow holds for it tells how far a run's history goes.
PROGRESS_METRIC = "g_loss"
# What the console line shows, when the objective produces it.
CONSOLE_LOSSES = ("d_loss", "g_loss", "wasserstein_estimate")

TRAINING_METRICS = frozenset(STEP_METRICS) | frozenset(LOOP_METRICS)
