"""Pickle-free pyfunc generator (MLflow "models from code").

Artifacts: ``weights`` (the generator's state_dict, read with ``torch.load(weights_only=True)``) and ``config``
(the run's ``generator/config.json``: ``gan_spec`` sizes the network). Only ``gan_models`` (shipped via
``code_paths``), torch, numpy and mlflow are imported, so the model loads where gan-pipeline is not installed.

Input (tensor-based signature):
    z      float32 (-1, nz)   latent vectors
    label  int64   (-1,)      class of each image, in [0, num_classes) (conditional models only, required there)
Output: float32 (-1, C, H, W) images in [-1, 1]; with ``params={"output": "uint8"}`` uint8 pixels in [0, 255].
"""
from __future__ import annotations

import json
from typing import Any, Optional

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

BATCH = 256


def _as_array(value, dtype) -> np.ndarray:
    if hasattr(value, "to_numpy"):  # a pandas Series (of lists, for z)
        value = value.to_numpy()
    array = np.asarray(value)
    if array.dtype == object:
        array = np.stack([np.asarray(v) for v in array])
    return array.astype(dtype, copy=False)


class _Generator:
    """What the model does; ``GeneratorModel`` below makes it an MLflow model.

    Why apart: MLflow checks the type hint of a ``predict`` defined in a ``PythonModel`` subclass's own body and,
    without one, prints "Add type hints to the `predict` method" wherever the model loads (``mlflow models
    serve`` included). No hint fits this input: MLflow 3.17 accepts ``list[...]`` (then converts and validates
    the input itself, which two named tensors cannot go through), the opaque ``np.ndarray`` / ``pd.DataFrame``
    (which would misdescribe the dict of arrays that arrives here) and refuses ``dict[str, np.ndarray]`` when the
    model is logged. The explicit tensor signature validates the input instead.
    """

    def load_context(self, context) -> None:
        import torch

        from gan_models.step import GANSpec, build_generator

        with open(context.artifacts["config"]) as fh:
            spec = GANSpec(**json.load(fh)["gan_spec"])
        self.conditional = spec.conditional
        self.num_classes = spec.num_classes if self.conditional else None
        self.nz = spec.nz
        self.generator = build_generator(spec)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator.load_state_dict(state)
        self.generator.eval()

    def _inputs(self, model_input):
        if hasattr(model_input, "columns"):  # a pandas DataFrame (e.g. dataframe_split): one row per image
            model_input = {col: model_input[col] for col in model_input.columns}
        if isinstance(model_input, np.ndarray):
            model_input = {"z": model_input}
        if not isinstance(model_input, dict) or "z" not in model_input:
            raise ValueError('input must be {"z": float32 (N, nz)[, "label": int64 (N,)]}')
        z = _as_array(model_input["z"], np.float32)
        if z.ndim != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must have shape (N, {self.nz}), got {tuple(z.shape)}")
        label = model_input.get("label")
        if self.conditional:
            if label is None:
                raise ValueError(f"this generator is conditional: give 'label' (int64, N values in [0, {self.num_classes}))")
            label = _as_array(label, np.int64).reshape(-1)
            if label.shape[0] != z.shape[0]:
                raise ValueError(f"'label' has {label.shape[0]} values for {z.shape[0]} rows of z")
            if label.size and (label.min() < 0 or label.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got {sorted(set(label.tolist()))}")
        elif label is not None:
            raise ValueError("this generator is unconditional: do not give 'label'")
        return z, label

    def predict(self, context, model_input, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        import torch

        z, label = self._inputs(model_input)
        output = (params or {}).get("output", "float32")
        if output not in ("float32", "uint8"):
            raise ValueError(f"params.output must be 'float32' or 'uint8', got {output!r}")
        chunks = []
        with torch.inference_mode():
            for start in range(0, z.shape[0], BATCH):
                zb = torch.from_numpy(np.ascontiguousarray(z[start:start + BATCH]))
                lb = None if label is None else torch.from_numpy(np.ascontiguousarray(label[start:start + BATCH]))
                chunks.append(self.generator(zb, lb).float().clamp_(-1, 1))
        images = torch.cat(chunks) if chunks else torch.zeros((0,))
        if output == "uint8":
            from gan_models.sampling import to_uint8

            return to_uint8(images).numpy()
        return images.numpy().astype(np.float32, copy=False)


class GeneratorModel(_Generator, PythonModel):
    pass


mlflow.models.set_model(GeneratorModel())
