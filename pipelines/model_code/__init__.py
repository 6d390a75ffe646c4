"""MLflow "models from code" files. Each file here is copied into a logged model and run where gan-pipeline may not
be installed: it may import only ``gan_models`` (shipped with the model via ``code_paths``), torch, numpy and mlflow."""
from pathlib import Path

GENERATOR_MODEL_FILE = Path(__file__).with_name("generator_model.py")


def quiet_type_hint_warning():
    """A context in which MLflow's "add type hints to predict()" advice is not shown: the generator model has an
    explicit tensor signature. (MLflow prepends its own 'once' filter, so a message filter does not work.)"""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def quiet():
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def show(message, *args, **kwargs):
                if "type hints to the `predict` method" not in str(message):
                    shown(message, *args, **kwargs)

            warnings.showwarning = show
            yield

    return quiet()
