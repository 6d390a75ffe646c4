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
GENERATOR_CHECKPOINT = PREFIX + "generator_checkpoint"  # the (best) checkpoint the run's generator came from
GENERATOR_MODEL_ID = PREFIX + "generator_model_id"      # that checkpoint's LoggedModel (what register registers)
STORAGE = PREFIX + "storage"
DIVERGED = PREFIX + "diverged"
RESTARTS = PREFIX + "restarts"
RESUMED_FROM_STEP = PREFIX + "resumed_from_step"

# LoggedModels of scored checkpoints (pipelines.checkpoint_models); also RUN_NAME, MODEL, DATASET
CHECKPOINT_MODEL_TYPE = "gan-generator-checkpoint"  # their model_type
CHECKPOINT_STEP = PREFIX + "checkpoint_step"
CHECKPOINT = PREFIX + "checkpoint"  # the checkpoint directory holding the generator's weights (generator.pt)

# evaluation runs
EVALUATES = PREFIX + "evaluates"
SOURCE_RUN_ID = PREFIX + "source_run_id"

# sweeps
STOPPED_EARLY = PREFIX + "stopped_early"
BEST_RUN_ID = PREFIX + "best_run_id"
SWEEP = PREFIX + "sweep"                      # the sweep's name (its folder; tune --resume NAME)
SCHEDULER = PREFIX + "scheduler"              # asha | fifo | pbt | pb2
PRESET_TRIAL = PREFIX + "preset_trial"        # "true" on the trial that trains the preset's own values
PRESET_RUN_ID = PREFIX + "preset_run_id"      # on the sweep's run
VERDICT = PREFIX + "verdict"                  # on the sweep's run: the one-line verdict
# PBT lineage on a trial's run (the full history in its lineage.json artifact)
EXPLOITED_FROM = PREFIX + "exploited_from"    # the trial (run name) whose checkpoint it copied last
EXPLOITED_AT_STEP = PREFIX + "exploited_at_step"
EXPLOITS = PREFIX + "exploits"                # how many times it copied another trial

# registered model versions: what was registered, byte for byte (pipelines.integrity)
ARTIFACTS_SHA256 = PREFIX + "artifacts_sha256"  # sha256 of the sha256sum-style listing of every file
ARTIFACT_FILES = PREFIX + "artifact_files"      # that listing, 16 hex digits per file (which file changed)
WEIGHTS_SHA256 = PREFIX + "weights_sha256"      # the generator weights (evaluate --model-uri scores the run's copy)
