"""What a user sees of the pipeline in MLflow (issue 18): training experiments open on their runs, runs list the
prepared dataset they used (training / evaluation), the scored checkpoints are LoggedModels ranked by their
domain FD (the registered version is the best one's), and a registered generator answers ``mlflow models serve``.

One tiny cGAN is trained once (``gan-pipeline train``, real local Ray, real MLflow server over HTTP, real Parquet),
registered and evaluated through its alias; the tests read what that left in MLflow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipelines import tags, tracking
from tests.conftest import free_port, stop_process, wait_http

pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "gan-pipeline")
EXPERIMENT = "lineage-and-serving"
NZ = 16
TINY = ["--batch-size", "16", "--ngf", "8", "--ndf", "8", "--nz", str(NZ), "--log-every", "2",
        "--checkpoint-every", "2", "--sample-every", "2"]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(small_mnist, mlflow_server, tmp_path_factory) -> dict:
    """A 6-step cGAN (three scored checkpoints) trained by the CLI, registered (@candidate) and evaluated through
    that alias."""
    from pipelines.config import build_config
    from pipelines.evaluate import evaluate_stage
    from pipelines.register import register_stage

    work = tmp_path_factory.mktemp("lineage")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([EXE, "train", "--model", "cgan", "--workers", "1", "--max-steps", "6", "--data",
                             small_mnist, "--experiment", EXPERIMENT, "--run-name", "lineage",
                             "--runs-dir", str(work / "runs"), *TINY], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.{tags.RUN_NAME} = 'lineage'")

    cfg = build_config("cgan", overrides={
        "tracking": {"tracking_uri": mlflow_server}, "registry": {"name": f"lineage-cgan-{uuid.uuid4().hex[:6]}"},
        "eval": {"num_samples": 200, "kid_subset_size": 100, "inception": False}})
    cfg.runs_dir = str(work / "runs")
    registered = register_stage(cfg, run.info.run_id)
    evaluate_stage(cfg, model_uri=f"models:/{cfg.registry.name}@candidate", out=str(work / "eval"))
    [evaluation] = client.search_runs([exp.experiment_id], filter_string=f"tags.{tags.STAGE} = 'evaluate'")
    return {"uri": mlflow_server, "data": small_mnist, "experiment": exp, "run": client.get_run(run.info.run_id),
            "evaluation": evaluation, "name": registered["name"], "work": work}


def test_pipeline_experiment_opens_on_training_runs(trained):
    assert trained["experiment"].tags[tags.EXPERIMENT_KIND] == "custom_model_development"


def test_an_existing_experiment_is_marked_but_a_kind_set_by_someone_else_stays(mlflow_server):
    client = _client(mlflow_server)
    unmarked = client.create_experiment(f"made-elsewhere-{uuid.uuid4().hex[:6]}")
    theirs = client.create_experiment(f"genai-{uuid.uuid4().hex[:6]}",
                                      tags={tags.EXPERIMENT_KIND: "genai_development"})
    for experiment_id in (unmarked, theirs):
        tracking.experiment_id(client, client.get_experiment(experiment_id).name)
    assert client.get_experiment(unmarked).tags[tags.EXPERIMENT_KIND] == "custom_model_development"
    assert client.get_experiment(theirs).tags[tags.EXPERIMENT_KIND] == "genai_development"


def _dataset_inputs(run) -> list[tuple[dict, str]]:
    return [({"name": i.dataset.name, "digest": i.dataset.digest, "source_type": i.dataset.source_type,
              "source": json.loads(i.dataset.source), "schema": json.loads(i.dataset.schema),
              "profile": json.loads(i.dataset.profile)},
             {t.key: t.value for t in i.tags}.get("mlflow.data.context")) for i in run.inputs.dataset_inputs]


def _assert_is_the_prepared_dataset(dataset: dict, data_path: str) -> None:
    from pipelines.data.reader import load_manifest

    manifest = load_manifest(data_path)
    assert dataset["name"] == "mnist"
    assert manifest["manifest_hash"].startswith(dataset["digest"]) and len(dataset["digest"]) == 32
    assert dataset["source_type"] == "local" and dataset["source"] == {"uri": data_path}
    assert [c["name"] for c in dataset["schema"]["mlflow_colspec"]] == ["image", "label", "split"]
    profile = dataset["profile"]
    assert profile["train_rows"] == manifest["counts"]["train"] == 2000
    assert profile["num_rows"] == sum(manifest["counts"].values())
    assert profile["manifest_hash"] == manifest["manifest_hash"]


def test_training_run_lists_its_dataset_as_training_input(trained):
    [(dataset, context)] = _dataset_inputs(trained["run"])
    assert context == "training"
    _assert_is_the_prepared_dataset(dataset, trained["data"])


def test_evaluation_run_lists_the_dataset_as_evaluation_input(trained):
    [(dataset, context)] = _dataset_inputs(trained["evaluation"])
    assert context == "evaluation"
    _assert_is_the_prepared_dataset(dataset, trained["data"])
    # the runs table filters on it: both runs share the one dataset record
    client = _client(trained["uri"])
    digest = dataset["digest"]
    found = client.search_runs([trained["experiment"].experiment_id],
                               filter_string=f"dataset.name = 'mnist' AND dataset.digest = '{digest}'")
    assert {r.info.run_id for r in found} >= {trained["run"].info.run_id, trained["evaluation"].info.run_id}


def test_scored_checkpoints_are_logged_models_ranked_by_fd_and_the_registered_version_is_the_best(trained):
    from pipelines.training_metrics import CHEAP_FD

    client, run = _client(trained["uri"]), trained["run"]
    run_id = run.info.run_id
    models = list(client.search_logged_models(
        [trained["experiment"].experiment_id], filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": f"metrics.{CHEAP_FD}", "ascending": True}]))
    assert sorted(int(m.tags[tags.CHECKPOINT_STEP]) for m in models) == [2, 4, 6]  # one per scored checkpoint
    fd = {int(m.tags[tags.CHECKPOINT_STEP]): {x.key: x for x in m.metrics}[CHEAP_FD] for m in models}
    assert [fd[int(m.tags[tags.CHECKPOINT_STEP])].value for m in models] == sorted(v.value for v in fd.values())
    # the same values as the run's curve, linked to the prepared dataset
    assert {m.step: m.value for m in client.get_metric_history(run_id, CHEAP_FD)} == {s: v.value for s, v in fd.items()}
    [(dataset, _)] = _dataset_inputs(run)
    assert {(v.dataset_name, v.dataset_digest) for v in fd.values()} == {(dataset["name"], dataset["digest"])}
    best, others = models[0], models[1:]
    # finish_run's best checkpoint is the best-ranked model; its weights are in checkpoint storage
    assert run.data.tags[tags.GENERATOR_MODEL_ID] == best.model_id
    assert best.tags[tags.CHECKPOINT] == run.data.tags[tags.GENERATOR_CHECKPOINT]
    assert (Path(best.tags[tags.CHECKPOINT]) / "generator.pt").is_file()
    # registering picked it: the version is that model, which alone holds the pyfunc; the others hold no files
    version = client.get_model_version_by_alias(trained["name"], "candidate")
    assert version.source == f"models:/{best.model_id}" and version.run_id == run_id
    assert "MLmodel" in {f.path for f in client.list_logged_model_artifacts(best.model_id)}
    assert all(not client.list_logged_model_artifacts(m.model_id) for m in others)


def test_registered_generator_answers_mlflow_models_serve(trained, tmp_path):
    port = free_port()
    # the server runs `uvicorn` through the shell: the virtual environment's bin must be on PATH
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", MLFLOW_TRACKING_URI=trained["uri"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                 f"models:/{trained['name']}@candidate", "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/ping", timeout=90, proc=proc, what="mlflow models serve")
            except RuntimeError as exc:
                pytest.fail(f"{exc}\n{log_path.read_text()[-3000:]}")
            z = np.random.default_rng(0).standard_normal((3, NZ)).astype(np.float32)
            body = json.dumps({"inputs": {"z": z.tolist(), "label": [1, 4, 8]}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                images = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
        finally:
            stop_process(proc)
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0
    assert "type hints" not in log_path.read_text(), "MLflow's advice to add type hints is printed at load"


def test_sweep_and_its_trials_list_the_dataset_as_training_input(trained):
    """A one-trial sweep (its domain classifier is the session's, trained once: conftest.shared_classifier_cache)."""
    config = trained["work"] / "tune.yaml"
    config.write_text("tune:\n  report_samples: 100\n  report_every: 2\neval:\n  num_samples: 200\n"
                      "  kid_subset_size: 100\n  inception: false\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([EXE, "tune", "--model", "cgan", "--config", str(config), "--samples", "1",
                             "--workers-per-trial", "1", "--max-steps", "2", "--data", trained["data"],
                             "--runs-dir", str(trained["work"] / "runs"), "--experiment", "lineage-sweep",
                             "--name", f"lineage-sweep-{uuid.uuid4().hex[:6]}", "--batch-size", "16", "--ngf", "8",
                             "--nz", str(NZ), "--log-every", "2", "--sample-every", "2"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = _client(trained["uri"])
    experiment = client.get_experiment_by_name("lineage-sweep")
    assert experiment.tags[tags.EXPERIMENT_KIND] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags[tags.STAGE] for r in runs) == ["tune", "tune-trial"]
    for run in runs:
        [(dataset, context)] = _dataset_inputs(run)
        assert context == "training"
        _assert_is_the_prepared_dataset(dataset, trained["data"])


def test_screenshots_of_the_mlflow_ui_show_the_runs_and_the_ranked_checkpoints(trained, tmp_path):
    """docs/screenshots.py in headless Chromium against the session's server: non-blank PNGs of the README's size."""
    import importlib.util

    from PIL import Image, ImageStat

    spec = importlib.util.spec_from_file_location("screenshots", Path(__file__).parents[1] / "docs" / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = screenshots  # its dataclass resolves annotations through its module
    spec.loader.exec_module(screenshots)
    browser = screenshots.chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the MLflow UI cannot be captured")
    pages = {p.file: p for p in screenshots.pages(trained["uri"], EXPERIMENT, trained["name"])}
    assert set(pages) == {"mlflow_runs.png", "mlflow_run_samples.png", "mlflow_run_sample_grid.png",
                          "mlflow_models_tab.png", "mlflow_registry.png"}
    # each page is captured only once it shows its run / its checkpoint models (Browser.shoot waits for the text)
    saved = screenshots.capture_all(browser, [pages["mlflow_runs.png"], pages["mlflow_models_tab.png"]], tmp_path)
    width, height = screenshots.SAVED_WIDTH, round(screenshots.WINDOW[1] * screenshots.SAVED_WIDTH / screenshots.WINDOW[0])
    for path in saved:
        image = Image.open(path)
        assert image.format == "PNG" and image.size == (width, height)
        assert path.stat().st_size < 300_000
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 5, f"{path.name} is blank"  # a blank page: ~0
