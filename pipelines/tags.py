"""MLflow tag names that gan-pipeline sets on experiments, runs and model versions: the one place they are spelled.

Stages set them and read them back (``evaluate`` finds the source run, ``tune`` finds its best trial,
``register`` copies the model and dataset); tests and users filter on them (``tags.gan_pipeline.stage``).
"""
from __future__ import annotations

PREFIX = "gan_pipeline."

# on every experiment the pipeline creates or uses: MLflow's UI opens a "custom model development" experiment
# on its training runs instead of its GenAI overview (traces, token usage)
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"

# on every run the pipeline creates
STAGE = PREFIX + "stage"            # train | tune | tune-trial | evaluate
MODEL = PREFIX + "model"            # model family (dcgan, cgan, wgan, wgan-gp); also on model versions
DATASET = PREFIX + "dataset"        # also on model versions
RUN_NAME = PREFIX + "run_name"

# training runs: written by the driver when a run finishes, or by the loop
CHECKPOINT_DIR = PREFIX + "checkpoint_dir"
STORAGE = PREFIX + "storage"
DIVERGED = PREFIX + "diverged"
RESTARTS = PREFIX + "restarts"
RESUMED_FROM_STEP = PREFIX + "resumed_from_step"

# evaluation runs
EVALUATES = PREFIX + "evaluates"
SOURCE_RUN_ID = PREFIX + "source_run_id"

# sweeps
STOPPED_EARLY = PREFIX + "stopped_early"
BEST_RUN_ID = PREFIX + "best_run_id"
