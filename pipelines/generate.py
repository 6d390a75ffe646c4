"""Sample images from a registered (or any pyfunc) generator: a PNG grid or a uint8 ``.npy`` array.

What the model takes (conditional? how many classes? nz?) is read from the loaded model: its signature's inputs
(``z`` width, presence of ``label``) and the metadata written at registration (``num_classes``), never guessed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from pipelines.config import PipelineConfig
from pipelines.errors import BadValue, UserError
from pipelines.files import atomic_write


def model_info(model) -> dict:
    """``{"nz", "conditional", "num_classes", "class_names", "code_categories"}`` of a loaded pyfunc generator."""
    meta = model.metadata
    schema = meta.get_input_schema()
    if schema is None or not schema.is_tensor_spec():
        raise UserError("this model has no tensor input signature (z[, label]); is it a gan-pipeline generator?")
    inputs = {spec.name: spec for spec in schema.inputs}
    if "z" not in inputs:
        raise UserError(f"this model's inputs are {sorted(inputs)}, not z[, label]; is it a gan-pipeline generator?")
    nz = int(inputs["z"].shape[-1])
    conditional = "label" in inputs
    extra = (meta.metadata or {}).get("gan_pipeline", {}) or {}
    num_classes = extra.get("num_classes")
    if conditional and num_classes is None:
        try:  # older registrations: ask the loaded python model itself
            num_classes = model.unwrap_python_model().num_classes
        except Exception:  # noqa: BLE001
            num_classes = None
        if num_classes is None:
            raise UserError("this conditional model does not record its number of classes (metadata num_classes)")
    code_categories = extra.get("code_categories")
    if code_categories is None:  # registered before the code was recorded: ask the loaded python model
        try:
            code_categories = model.unwrap_python_model().generator.code_categories
        except Exception:  # noqa: BLE001
            code_categories = 0
    return {"nz": nz, "conditional": conditional, "num_classes": int(num_classes) if conditional else None,
            "class_names": extra.get("class_names"), "code_categories": int(code_categories or 0)}


def slerp(z0, z1, steps: int):
    """Spherical interpolation from ``z0`` to ``z1`` (1-D tensors) in ``steps`` points, ends included."""
    import torch

    t = torch.linspace(0.0, 1.0, steps).unsqueeze(1)
    a, b = z0 / z0.norm(), z1 / z1.norm()
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if float(omega) < 1e-6:
        return (1 - t) * z0 + t * z1
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * z0 + torch.sin(t * omega) / so * z1


_VERIFIED_COPIES: list = []
MAX_IMAGES = 100_000  # 64 px RGB: 1.2 GB of uint8, 4.9 GB as float32 on the way


def _load(model_uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        source = model_uri
        if model_uri.startswith("models:/"):  # verified against its registration before its code runs
            import tempfile

            from pipelines.integrity import download_verified

            keep = tempfile.TemporaryDirectory(prefix="gan-generate-")
            _VERIFIED_COPIES.append(keep)  # the loaded model imports from it: kept until the process ends
            source = str(download_verified(mlflow.tracking.MlflowClient(), model_uri, keep.name))
        return mlflow.pyfunc.load_model(source)
    except MlflowException as exc:
        raise UserError(f"cannot load model {model_uri!r}: {exc.message} "
                        f"(list models with: gan-pipeline models list / models show NAME)") from None
    except OSError as exc:
        raise UserError(f"cannot load model {model_uri!r}: {exc}") from None


def generate_stage(cfg: PipelineConfig, model_uri: str, n: int = 64, label: Optional[int] = None, seed: int = 0,
                   out: str = "samples.png", fmt: str = "png", interpolate: bool = False,
                   category: Optional[int] = None) -> dict:
    """Write ``n`` images (or an ``n``-step interpolation strip) of ``model_uri`` to ``out``.

    PNG: a grid (conditional models without ``label`` cycle labels over the classes, one class per column).
    ``category``: for a generator with InfoGAN's latent code, every image of that category (what each category
    means is the model's own: ``evaluate`` draws a row per category in ``code_grid.png``).
    npy: uint8 array N x C x H x W. Returns ``{"out", "shape", "labels"}``.
    """
    import mlflow
    import numpy as np
    import torch

    from gan_models.sampling import evaluation_inputs

    if n < 1:
        raise BadValue(f"--n must be at least 1, got {n}")
    if n > MAX_IMAGES:
        raise BadValue(f"--n {n} is more than {MAX_IMAGES:,} images in one file; generate several files instead")
    if fmt not in ("png", "npy"):
        raise UserError(f"--format must be png or npy, got {fmt!r}")
    from pipelines.safety import check_output_file
    from pipelines.tracking import check_reachable

    check_output_file(out, "--out")
    check_reachable(cfg.resolved_tracking_uri)
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    mlflow.set_registry_uri(cfg.resolved_tracking_uri)
    model = _load(model_uri)
    info = model_info(model)

    if label is not None:
        if not info["conditional"]:
            raise UserError(f"--label {label} given, but {model_uri} is unconditional (its inputs have no label); "
                            f"drop --label")
        if not 0 <= label < info["num_classes"]:
            names = info["class_names"]
            hint = f" ({', '.join(f'{i}={c}' for i, c in enumerate(names))})" if names else ""
            raise UserError(f"--label {label} is outside the classes of {model_uri}: use 0..{info['num_classes'] - 1}"
                            f"{hint}")

    if category is not None:
        k = info["code_categories"]
        if not k:
            raise UserError(f"--category {category} given, but {model_uri} has no latent code (it was trained "
                            f"without --code-categories); drop --category"
                            + (", or pick a class with --label" if info["conditional"] else ""))
        if not 0 <= category < k:
            raise UserError(f"--category {category} is outside the {k} categories of {model_uri}: use 0..{k - 1}")

    cycling = None
    if interpolate:
        ends = torch.randn(2, info["nz"], generator=torch.Generator().manual_seed(seed))
        z = slerp(ends[0], ends[1], n)
        nrow = n
    else:
        z, cycling = evaluation_inputs(info["nz"], n, seed, info["num_classes"] if info["conditional"] else None)
        nrow = info["num_classes"] if info["conditional"] and label is None else max(1, math.ceil(math.sqrt(n)))
    if category is not None:
        from gan_models.latent_code import with_category

        z = with_category(z, info["code_categories"], category)
    inputs = {"z": z.numpy().astype(np.float32)}
    labels = None
    if info["conditional"]:
        if label is not None:
            labels = np.full(n, label, dtype=np.int64)
        elif interpolate:
            labels = np.zeros(n, dtype=np.int64)  # one class along the strip; --label picks another
        else:
            labels = cycling.numpy()
        inputs["label"] = labels

    images = np.asarray(model.predict(inputs), dtype=np.float32)
    if images.ndim != 4 or images.shape[0] != n:
        raise UserError(f"{model_uri} returned an array of shape {images.shape}, expected ({n}, C, H, W)")

    from gan_models.sampling import image_grid, to_uint8

    path = Path(out)
    tensor = torch.from_numpy(images)
    if fmt == "npy":
        array = to_uint8(tensor).numpy()
        atomic_write(path, lambda fh: np.save(fh, array))
    else:
        from PIL import Image

        grid = Image.fromarray(image_grid(tensor, nrow=nrow))
        atomic_write(path, lambda fh: grid.save(fh, format="PNG"))
    what = f"interpolation strip of {n} steps" if interpolate else f"{n} images"
    print(f"wrote {what} {tuple(images.shape[1:])} from {model_uri} to {path}", flush=True)
    return {"out": str(path), "shape": tuple(images.shape), "labels": None if labels is None else labels.tolist()}
