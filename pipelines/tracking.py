"""MLflow: reachability, run creation, and exactly-once metric commits.

Metrics and sample grids are produced every few steps but committed to MLflow only after the checkpoint that
covers them is persisted (they travel inside it). A run that resumes from checkpoint step S replays steps > S,
so committing earlier would leave duplicates; committing later would lose steps if the process died between
checkpoint and commit, which is why the checkpoint carries the pending metrics and a resumed rank 0 commits
them if MLflow does not have them yet.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional

from pipelines import tags
from pipelines.errors import TrackingUnavailable
from pipelines.secrets import environment_snapshot, redact_text
from pipelines.secrets import redact_uri  # noqa: F401 - re-exported for the stages

def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any compute, when the tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        if uri.startswith("file:") or (not uri.startswith("sqlite:") and "://" not in uri):
            raise TrackingUnavailable(
                f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///abs/path/mlflow.db "
                f"or an http(s):// server"
            )
        return
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
                                     + "/health")
    if parts.username is not None:  # user:password@ in the URI: urllib cannot take it there, send it as a header
        import base64

        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    shown = redact_uri(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 200:
                return
            detail = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        detail = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        detail = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(
        f"MLflow tracking server {shown} is unreachable ({detail}); start it (mlflow server --host 127.0.0.1 ...) "
        f"or point --tracking-uri / MLFLOW_TRACKING_URI elsewhere. Nothing was trained."
    )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    """The experiment ``name`` (created if absent), marked as a training experiment for MLflow's UI; a kind
    someone else set on an existing experiment is theirs and stays."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        return mlflow_client.create_experiment(name, tags={tags.EXPERIMENT_KIND: tags.EXPERIMENT_KIND_TRAINING})
    if tags.EXPERIMENT_KIND not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, tags.EXPERIMENT_KIND, tags.EXPERIMENT_KIND_TRAINING)
    return experiment.experiment_id


# how a run used its dataset (MLflow's dataset input context, shown and filterable in the runs table)
DATASET_TRAINING = "training"
DATASET_EVALUATION = "evaluation"
# MLflow keeps at most 36 characters of a dataset digest; 32 hex characters of the manifest hash identify it
DATASET_DIGEST_CHARS = 32


def dataset_digest(manifest_hash: str) -> str:
    """The prepared dataset's MLflow digest (dataset inputs and metrics linked to a dataset use the same)."""
    return manifest_hash[:DATASET_DIGEST_CHARS]


def dataset_entity(data_path: str, manifest: dict):
    """The prepared dataset as an MLflow dataset: name, digest (the manifest hash), where it lies, its columns
    and row counts. Built from the manifest alone: nothing is read from the shards."""
    import pyarrow as pa
    from mlflow.entities import Dataset
    from mlflow.types import ColSpec, DataType, Schema

    from pipelines.data.store import SCHEMA

    arrow_to_mlflow = {pa.binary(): DataType.binary, pa.int64(): DataType.long, pa.string(): DataType.string}
    schema = Schema([ColSpec(arrow_to_mlflow[field.type], field.name) for field in SCHEMA])
    counts = manifest.get("counts", {})
    scheme = data_path.split("://", 1)[0] if "://" in data_path else "file"
    profile = {"num_rows": sum(counts.values()), **{f"{split}_rows": rows for split, rows in counts.items()},
               "classes": len(manifest.get("class_names") or []), "resolution": manifest.get("resolution"),
               "channels": manifest.get("channels"), "manifest_hash": manifest["manifest_hash"]}
    return Dataset(name=manifest["dataset"], digest=dataset_digest(manifest["manifest_hash"]),
                   source_type="local" if scheme == "file" else scheme, source=json.dumps({"uri": data_path}),
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))


def log_dataset_input(mlflow_client, run_id: str, data_path: str, manifest: dict, context: str) -> None:
    """Record that run ``run_id`` used the prepared dataset for ``context`` (``DATASET_TRAINING`` or
    ``DATASET_EVALUATION``): the runs table's Datasets column and filter then show it."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset_entity(data_path, manifest),
                                                            tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_SECRET_MARKERS = ("password", "secret", "token", "key_id", "access_key", "credential")


def redact(params: dict) -> dict:
    """Never log credentials: URIs with user:password@ lose it, secret-looking keys are masked."""
    out = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            text = "***"
        else:
            text = redact_text(text)
        out[key] = text
    return out


def redact_config(dump: dict) -> dict:
    """A ``PipelineConfig.model_dump()`` fit to record (MLflow config.json, checkpoints): URIs lose credentials."""
    return {section: ({k: redact_uri(v) if isinstance(v, str) else v for k, v in values.items()}
                      if isinstance(values, dict) else values) for section, values in dump.items()}


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in redact(params).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def committed_step(mlflow_client, run_id: str) -> int:
    """The last step whose metrics MLflow holds (-1 when none)."""
    from pipelines.training_metrics import PROGRESS_METRIC

    history = mlflow_client.get_metric_history(run_id, PROGRESS_METRIC)
    return max((m.step for m in history), default=-1)


def commit_metrics(mlflow_client, run_id: str, pending: Iterable[tuple[int, dict[str, float]]],
                   after_step: int = -1, retries: int = 5, model_ids: Optional[Mapping[int, str]] = None,
                   dataset: Optional[tuple[str, str]] = None) -> int:
    """Log ``(step, {name: value})`` entries with step > ``after_step``; retried with backoff so a
    restarting server does not lose them. The values of a step in ``model_ids`` are linked to that LoggedModel
    (and to ``dataset``: name, digest). Returns the number of values logged."""
    from mlflow.entities import Metric

    now, model_ids = int(time.time() * 1000), model_ids or {}
    linked = dict(zip(("dataset_name", "dataset_digest"), dataset)) if dataset else {}
    metrics = [Metric(name, float(value), now, step,
                      **({"model_id": model_ids[step], **linked} if step in model_ids else {}))
               for step, values in pending if step > after_step for name, value in values.items()]
    for start in range(0, len(metrics), 1000):
        chunk = metrics[start:start + 1000]
        for attempt in range(retries):
            try:
                mlflow_client.log_batch(run_id, metrics=chunk)
                break
            except Exception as exc:  # noqa: BLE001 - any transport error: retry, then say what was lost
                if attempt == retries - 1:
                    print(f"WARNING: {len(chunk)} metric values (steps {chunk[0].step}-{chunk[-1].step}) could not "
                          f"be logged to MLflow after {retries} tries and are lost: {exc}", flush=True)
                else:
                    time.sleep(min(2 ** attempt, 10))
    return len(metrics)


def commit_images(mlflow_client, run_id: str, pngs: dict[str, bytes]) -> None:
    """Sample grids, named ``<key>_step<N>.png``, as images on MLflow's step slider."""
    from PIL import Image

    for name, data in sorted(pngs.items()):
        key, step = name.rsplit("_step", 1)
        image = Image.open(io.BytesIO(data))
        image.load()
        try:
            mlflow_client.log_image(run_id, image, key=key, step=int(step.split(".")[0]))
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: sample grid {name} could not be logged to MLflow: {exc}", flush=True)


def worker_env(uri: str) -> dict[str, str]:
    """Environment that Ray workers need: the same tracking store (absolute URI, credentials passed on) and
    the project's own GAN_PIPELINE_* settings."""
    env = {"MLFLOW_TRACKING_URI": uri}
    env.update({k: v for k, v in environment_snapshot().items() if k.startswith("GAN_PIPELINE_")})
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def loss_curve_png(mlflow_client, run_id: str, keys: Optional[list[str]] = None) -> bytes:
    """A figure of the loss curves from the run's committed history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or ["d_loss", "g_loss", "wasserstein_estimate", "gradient_penalty"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key in keys:
        history = sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], label=key, linewidth=1)
    ax.set_xlabel("generator step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
