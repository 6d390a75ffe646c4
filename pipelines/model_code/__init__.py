"""MLflow "models from code" files. Each file here is copied into a logged model and run where gan-pipeline may not
be installed: it may import only ``gan_models`` (shipped with the model via ``code_paths``), torch, numpy and mlflow."""
from pathlib import Path

GENERATOR_MODEL_FILE = Path(__file__).with_name("generator_model.py")

