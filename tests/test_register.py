"""Registry against a real MLflow server: register (pickle-free pyfunc) -> alias -> guarded promote -> load by
alias in a fresh process with pickle disabled -> generate; plus the errors a user can run into.

(Serving a trained model: test_lineage_serving.py.) Training runs are faked without Ray: a tiny generator's state_dict and config.json logged as a finished run's
``generator/`` artifacts, exactly what ``pipelines.train.finish_run`` leaves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_models import GANSpec, build_gan
from pipelines.config import PipelineConfig, TrackingConfig, build_config
from pipelines.errors import UserError


pytestmark = pytest.mark.integration

NZ, NUM_CLASSES = 16, 10


# ---------------------------------------------------------------- helpers
def make_training_run(uri: str, workdir: Path, *, conditional: bool = True, metrics: dict | None = None,
                      with_generator: bool = True, model: str = "cgan", dataset: str = "mnist", seed: int = 0,
                      code_categories: int = 0) -> str:
    """A finished 'training run' as ``finish_run`` leaves it; returns its run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test-register")
    exp_id = exp.experiment_id if exp else client.create_experiment("test-register")
    run = client.create_run(exp_id, run_name=f"{model}-fake-{seed}",
                            tags={"gan_pipeline.model": model, "gan_pipeline.dataset": dataset})
    run_id = run.info.run_id
    client.log_param(run_id, "data.manifest_hash", "abc123manifest")
    if with_generator:
        spec = GANSpec(resolution=28, channels=1, ngf=8, nz=NZ, conditional=conditional, num_classes=NUM_CLASSES,
                       code_categories=code_categories)
        gan = build_gan(spec, seed=seed)
        out = workdir / f"gen-{uuid.uuid4().hex[:8]}"
        out.mkdir(parents=True)
        torch.save(gan.generator.state_dict(), out / "generator.pt")
        config = build_config(model).model_dump(mode="json")
        (out / "config.json").write_text(json.dumps({
            "config": config, "gan_spec": dataclasses.asdict(spec), "manifest_hash": "abc123manifest",
            "class_names": [str(i) for i in range(NUM_CLASSES)], "dataset": dataset, "data_path": "/nowhere",
            "mlflow_run_id": run_id}))
        for name in ("generator.pt", "config.json"):
            client.log_artifact(run_id, str(out / name), artifact_path="generator")
    for step in range(3):
        client.log_metric(run_id, "g_loss", 1.0 / (step + 1), step=step)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def cfg_for(uri: str, name: str | None = None) -> PipelineConfig:
    cfg = PipelineConfig(tracking=TrackingConfig(tracking_uri=uri))
    cfg.registry.name = name
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("register")


@pytest.fixture(scope="module")
def flow(mlflow_server, workdir):
    """A conditional model with three versions: v1 (fd 10) champion, v2 (fd 20) refused, v3 (fd 5) promoted;
    the test below checks each step. Returns the facts later tests need."""
    from pipelines.promote import promote_stage
    from pipelines.register import register_stage

    name = f"test-cgan-{uuid.uuid4().hex[:6]}"
    cfg = cfg_for(mlflow_server, name)
    facts = {"name": name, "cfg": cfg, "uri": mlflow_server}
    run1 = make_training_run(mlflow_server, workdir, metrics={"domain_fd": 10.0, "precision": 0.5}, seed=1)
    facts["reg1"] = register_stage(cfg, run1)
    facts["run1"] = run1
    facts["promote1"] = promote_stage(cfg, name)
    run2 = make_training_run(mlflow_server, workdir, metrics={"domain_fd": 20.0}, seed=2)
    facts["reg2"] = register_stage(cfg, run2)
    with pytest.raises(UserError) as refused:
        promote_stage(cfg, name)
    facts["refused"] = str(refused.value)
    run3 = make_training_run(mlflow_server, workdir, metrics={"domain_fd": 5.0}, seed=3)
    facts["reg3"] = register_stage(cfg, run3)
    facts["promote3"] = promote_stage(cfg, name)
    return facts


# ---------------------------------------------------------------- the flow
def test_register_alias_and_guarded_promotion(flow):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=flow["uri"], registry_uri=flow["uri"])
    name = flow["name"]
    assert [flow[f"reg{i}"]["version"] for i in (1, 2, 3)] == ["1", "2", "3"]
    assert flow["reg1"]["uri"] == f"models:/{name}/1"

    v1 = client.get_model_version(name, "1")
    assert v1.tags["manifest_hash"] == "abc123manifest"
    assert v1.tags["model_family"] == "cgan" and v1.tags["dataset"] == "mnist"
    assert v1.tags["source_run_id"] == flow["run1"]
    assert float(v1.tags["metric.domain_fd"]) == 10.0 and float(v1.tags["metric.precision"]) == 0.5
    assert "metric.g_loss" not in v1.tags  # training metrics are not evaluation results
    assert v1.description and "conditional" in v1.description
    assert v1.run_id == flow["run1"]  # logged on the training run
    run = client.get_run(flow["run1"])
    assert run.info.status == "FINISHED"  # logging the model did not reopen the run

    # no champion yet -> promoted; a worse candidate is refused with both numbers; a better one goes through
    assert flow["promote1"]["promoted"] and flow["promote1"]["previous"] is None
    refused = flow["refused"]
    assert "20" in refused and "10" in refused and "--force" in refused and "domain_fd" in refused
    assert flow["promote3"]["promoted"] and flow["promote3"]["previous"] == "1"

    model = client.get_registered_model(name)
    assert model.aliases["candidate"] == "3" and model.aliases["champion"] == "3"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["previous_champion"] == "1" and v3.tags["promotion_metric"] == "domain_fd"
    assert float(v3.tags["candidate_value"]) == 5.0 and float(v3.tags["champion_value"]) == 10.0
    assert v3.tags["promoted_at"] and v3.tags["forced"] == "false"
    assert client.get_model_version(name, "1").tags["champion_value"] == "none"


def test_force_overrides_the_guard(flow, mlflow_server):
    from mlflow.tracking import MlflowClient
    from pipelines.promote import promote_stage

    cfg, name = flow["cfg"], flow["name"]
    with pytest.raises(UserError, match="worse"):
        promote_stage(cfg, name, version="2")
    result = promote_stage(cfg, name, version="2", force=True)
    assert result["promoted"] and result["previous"] == "3"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert client.get_registered_model(name).aliases["champion"] == "2"
    assert client.get_model_version(name, "2").tags["forced"] == "true"
    # put the better model back as champion (no guard problem: 5 < 20)
    assert promote_stage(cfg, name, version="3")["promoted"]


LOAD_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class NoPipelines(importlib.abc.MetaPathFinder):
        # the model must load without the gan-pipeline product code (only gan_models, shipped with it)
        def find_spec(self, name, path=None, target=None):
            if name == "pipelines" or name.startswith("pipelines."):
                raise ImportError("pipelines is not available here")
            return None

    sys.meta_path.insert(0, NoPipelines())
    import mlflow
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import gan_models
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, int(sys.argv[2]))).astype(np.float32)
    images = model.predict({"z": z, "label": np.array([0, 1, 2, 9], dtype=np.int64)})
    pixels = model.predict({"z": z, "label": np.array([0, 1, 2, 9], dtype=np.int64)}, params={"output": "uint8"})
    print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "min": float(images.min()),
                      "max": float(images.max()), "std": float(images.std()), "pixel_dtype": str(pixels.dtype),
                      "gan_models": gan_models.__file__}))
""")


def test_load_by_alias_in_fresh_process_without_pickle(flow, tmp_path):
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", MLFLOW_TRACKING_URI=flow["uri"])
    env.pop("PYTHONPATH", None)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), f"models:/{flow['name']}@candidate", str(NZ)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4, 1, 28, 28] and result["dtype"] == "float32"
    assert -1.0 <= result["min"] and result["max"] <= 1.0 and result["std"] > 0
    assert result["pixel_dtype"] == "uint8"
    assert "/code/" in result["gan_models"].replace(os.sep, "/")  # the copy shipped with the model


def test_generate_with_label_and_cycling(flow, tmp_path):
    from PIL import Image

    from pipelines.generate import generate_stage

    uri = f"models:/{flow['name']}@champion"
    out = tmp_path / "three.npy"
    result = generate_stage(flow["cfg"], model_uri=uri, n=6, label=3, seed=1, out=str(out), fmt="npy")
    array = np.load(out)
    assert array.shape == (6, 1, 28, 28) and array.dtype == np.uint8 and array.std() > 0
    assert result["labels"] == [3] * 6
    again = tmp_path / "again.npy"
    generate_stage(flow["cfg"], model_uri=uri, n=6, label=3, seed=1, out=str(again), fmt="npy")
    assert np.array_equal(np.load(again), array)  # seeded

    png = tmp_path / "grid.png"
    result = generate_stage(flow["cfg"], model_uri=uri, n=20, seed=0, out=str(png))
    assert result["labels"] == [i % NUM_CLASSES for i in range(20)]
    with Image.open(png) as img:
        assert img.size == (2 + 10 * 30, 2 + 2 * 30)  # one column per class, two rows
    strip = tmp_path / "strip.png"
    generate_stage(flow["cfg"], model_uri=uri, n=5, label=7, seed=0, out=str(strip), interpolate=True)
    with Image.open(strip) as img:
        assert img.size == (2 + 5 * 30, 2 + 30)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cli_models_list_and_show(flow):
    from click.testing import CliRunner

    from pipelines.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "list", "--tracking-uri", flow["uri"]])
    assert listed.exit_code == 0, listed.output
    assert flow["name"] in listed.output and "@champion=v3" in listed.output and "@candidate=v3" in listed.output
    shown = runner.invoke(cli, ["models", "show", flow["name"], "--tracking-uri", flow["uri"]])
    assert shown.exit_code == 0, shown.output
    assert "domain_fd" in shown.output and "@champion" in shown.output and flow["run1"] in shown.output
    refused = runner.invoke(cli, ["promote", flow["name"], "--version", "2", "--tracking-uri", flow["uri"]])
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output


# ---------------------------------------------------------------- what a user can get wrong
def test_unknown_model_name(flow):
    from pipelines.models import models_show_stage
    from pipelines.promote import promote_stage

    with pytest.raises(UserError, match="no registered model named 'no-such-model'") as err:
        promote_stage(flow["cfg"], "no-such-model")
    assert flow["name"] in str(err.value)  # lists what exists
    with pytest.raises(UserError, match=flow["name"]):
        models_show_stage(flow["cfg"], "no-such-model")


def test_unknown_alias(flow):
    from pipelines.promote import promote_stage

    with pytest.raises(UserError, match="no alias 'nightly'") as err:
        promote_stage(flow["cfg"], flow["name"], from_alias="nightly")
    assert "@candidate" in str(err.value) and "@champion" in str(err.value)


def test_unknown_version(flow):
    from pipelines.promote import promote_stage

    with pytest.raises(UserError, match="no version '99'") as err:
        promote_stage(flow["cfg"], flow["name"], version="99")
    assert "v1, v2, v3" in str(err.value)


def test_unknown_metric(flow):
    from pipelines.promote import promote_stage

    with pytest.raises(UserError, match="no better/worse direction"):
        promote_stage(flow["cfg"], flow["name"], metric="g_loss_typo")


def test_run_without_generator(mlflow_server, workdir):
    from pipelines.register import register_stage

    run_id = make_training_run(mlflow_server, workdir, with_generator=False)
    with pytest.raises(UserError, match=run_id) as err:
        register_stage(cfg_for(mlflow_server, "never-registered"), run_id)
    assert "generator" in str(err.value) and "train" in str(err.value).lower()
    with pytest.raises(UserError, match="does not exist"):
        register_stage(cfg_for(mlflow_server, "never-registered"), "0" * 32)


def test_label_outside_classes(flow, tmp_path):
    from pipelines.generate import generate_stage

    for bad in (NUM_CLASSES, -1):
        with pytest.raises(UserError, match=r"outside the classes.*0\.\.9"):
            generate_stage(flow["cfg"], model_uri=f"models:/{flow['name']}@champion", n=2, label=bad,
                           out=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_label_given_to_unconditional_model(mlflow_server, workdir, tmp_path, capfd):
    from pipelines.generate import generate_stage
    from pipelines.register import register_stage

    name = f"test-dcgan-{uuid.uuid4().hex[:6]}"
    run_id = make_training_run(mlflow_server, workdir, conditional=False, model="dcgan", metrics={"domain_fd": 3.0})
    capfd.readouterr()
    reg = register_stage(cfg_for(mlflow_server, name), run_id)
    # MLflow's own notes stay off the console (the stage prints its own line): "Successfully registered model"
    console = "".join(capfd.readouterr())
    assert "Successfully registered model" not in console and "Created version" not in console, console
    cfg = cfg_for(mlflow_server)
    with pytest.raises(UserError, match="unconditional"):
        generate_stage(cfg, model_uri=reg["alias_uri"], n=2, label=0, out=str(tmp_path / "x.png"))
    result = generate_stage(cfg, model_uri=reg["alias_uri"], n=4, out=str(tmp_path / "ok.npy"), fmt="npy")
    assert result["shape"] == (4, 1, 28, 28) and result["labels"] is None


def test_a_generator_with_a_latent_code_is_registered_and_served_with_it(mlflow_server, workdir):
    """InfoGAN's code is read from z inside G: the registered model takes z alone and draws what G draws."""
    import mlflow

    from pipelines.register import register_stage

    name = f"test-info-{uuid.uuid4().hex[:6]}"
    run_id = make_training_run(mlflow_server, workdir, conditional=False, model="dcgan", metrics={"domain_fd": 3.0},
                               code_categories=4, seed=5)
    reg = register_stage(cfg_for(mlflow_server, name), run_id)
    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(reg["alias_uri"])
    z = np.random.default_rng(0).standard_normal((6, NZ)).astype(np.float32)
    local = build_gan(GANSpec(resolution=28, channels=1, ngf=8, nz=NZ, code_categories=4), seed=5).generator.eval()
    with torch.no_grad():
        expected = local(torch.from_numpy(z)).numpy()
    assert local.code_categories == 4
    np.testing.assert_allclose(served.predict({"z": z}), expected, atol=1e-5)


def test_generate_draws_one_category_of_a_coded_generator(mlflow_server, workdir, tmp_path, flow):
    """``generate --category K``: every image gets category K, the rest of each noise vector kept."""
    from gan_models.latent_code import latent_code, with_category
    from gan_models.sampling import evaluation_inputs, to_uint8
    from pipelines.generate import generate_stage
    from pipelines.register import register_stage

    name = f"test-info-cat-{uuid.uuid4().hex[:6]}"
    run_id = make_training_run(mlflow_server, workdir, conditional=False, model="dcgan", code_categories=4, seed=6)
    reg = register_stage(cfg_for(mlflow_server, name), run_id)
    cfg = cfg_for(mlflow_server)
    out = tmp_path / "two.npy"
    generate_stage(cfg, model_uri=reg["alias_uri"], n=8, seed=3, out=str(out), fmt="npy", category=2)
    z, _ = evaluation_inputs(NZ, 8, 3, None)
    chosen = with_category(z, 4, 2)
    assert (latent_code(chosen, 4) == 2).all() and not (latent_code(z, 4) == 2).all()
    local = build_gan(GANSpec(resolution=28, channels=1, ngf=8, nz=NZ, code_categories=4), seed=6).generator.eval()
    with torch.no_grad():
        expected = to_uint8(local(chosen)).numpy()
    assert np.abs(np.load(out).astype(int) - expected.astype(int)).max() <= 1  # the same images, up to rounding
    with pytest.raises(UserError, match=r"outside the 4 categories .*: use 0\.\.3"):
        generate_stage(cfg, model_uri=reg["alias_uri"], n=2, out=str(tmp_path / "x.png"), category=4)
    with pytest.raises(UserError, match="has no latent code .*drop --category, or pick a class with --label"):
        generate_stage(cfg, model_uri=f"models:/{flow['name']}@champion", n=2, out=str(tmp_path / "y.png"),
                       category=0)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_default_name_is_dataset_dash_model():
    from types import SimpleNamespace

    from pipelines.register import _default_name

    recorded = build_config("wgan-gp", overrides={"data": {"dataset": "fashion-mnist"}}).model_dump(mode="json")
    run = SimpleNamespace(data=SimpleNamespace(tags={}))
    assert _default_name(PipelineConfig(), run, {"config": recorded}) == "fashion-mnist-wgan-gp"
    assert _default_name(cfg_for("x", "override"), run, {"config": recorded}) == "override"
    run = SimpleNamespace(data=SimpleNamespace(tags={"gan_pipeline.model": "wgan", "gan_pipeline.dataset": "cifar10"}))
    assert _default_name(PipelineConfig(), run, {}) == "cifar10-wgan"


def test_edited_artifact_is_refused(mlflow_server, workdir, tmp_path):
    """An attacker with write access to the artifact store edits the registered model's code: every gan-pipeline
    command that would load it refuses, naming the file, and the code never runs; the untouched version verifies."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    from pipelines.generate import generate_stage
    from pipelines.integrity import ARTIFACTS_TAG, verify_stage
    from pipelines.register import register_stage

    name = f"test-tamper-{uuid.uuid4().hex[:6]}"
    cfg = cfg_for(mlflow_server, name)
    reg = register_stage(cfg, make_training_run(mlflow_server, workdir, seed=7))
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert len(client.get_model_version(name, reg["version"]).tags[ARTIFACTS_TAG]) == 64
    assert verify_stage(cfg, f"{name}@candidate")["files"] >= 5

    marker = tmp_path / "PWNED"
    edited = tmp_path / "generator_model.py"
    edited.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                      + (Path(__file__).resolve().parents[1] / "pipelines/model_code/generator_model.py").read_text())
    repo = get_artifact_repository(client.get_model_version_download_uri(name, reg["version"]))
    repo.log_artifact(str(edited))  # replaces the registered generator_model.py in the store

    for attempt in (lambda: verify_stage(cfg, f"{name}@candidate"),
                    lambda: generate_stage(cfg, model_uri=f"models:/{name}@candidate", n=2,
                                           out=str(tmp_path / "g.png"))):
        with pytest.raises(UserError, match=r"does not match its registration.*generator_model\.py"):
            attempt()
    assert not marker.exists() and not (tmp_path / "g.png").exists()
