"""Scored checkpoints as MLflow LoggedModels (pipelines.checkpoint_models) against a real MLflow server over HTTP:
exactly one model per (run, checkpoint step) whatever restarts, metrics linked to it and to the dataset, ranked by
the cheap FD; registering a run picks its best checkpoint's model. (Through real Ray: test_lineage_serving.py.)
"""
from __future__ import annotations

import json
import uuid

import pytest
from mlflow.entities import LoggedModelStatus

from pipelines import tags
from pipelines.checkpoint_models import CheckpointModels, generator_model_id, model_name
from pipelines.hooks import LoopState, MLflowCommitter
from pipelines.training_metrics import CHEAP_FD
from tests.test_register import cfg_for, make_training_run

pytestmark = pytest.mark.integration
DATASET = ("mnist", "0123456789abcdef" * 2)
BY_FD = [{"field_name": f"metrics.{CHEAP_FD}", "ascending": True}]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _committer(client, run_id):
    """Rank 0's committer as a (re)started worker builds it."""
    models = CheckpointModels(client, run_id, params={"model.name": "cgan"}, dataset=DATASET,
                              model_tags={tags.MODEL: "cgan"}, checkpoint_root="/storage/run")
    return MLflowCommitter(client, run_id, models)


def _checkpoint(committer, step, fd):
    loop = LoopState(None, 0, 1, None, 4, 2, 4, 0, step=step)
    loop.pending = [(step - 2, {"g_loss": 1.0}), (step, {"g_loss": 0.5, CHEAP_FD: fd})]
    committer.after_checkpoint(loop)
    return loop.pending


def _models(client, run_id):
    experiment = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'",
                                            order_by=BY_FD))


def test_one_model_per_scored_checkpoint_whatever_restarts(mlflow_server, tmp_path):
    client = _client(mlflow_server)
    run_id = make_training_run(mlflow_server, tmp_path, seed=11)
    first = _committer(client, run_id)
    _checkpoint(first, 4, 30.0)
    pending = _checkpoint(first, 8, 20.0)
    # a restarted worker resumes from the step-8 checkpoint: it carries step 8's metrics, MLflow holds them
    _committer(client, run_id).on_resume(LoopState(None, 0, 1, None, 4, 2, 4, 0, step=8), pending)
    # a worker that died after creating step 12's model, before committing its metrics
    crashed = _committer(client, run_id)
    crashed.models.link([(12, {CHEAP_FD: 10.0})], committed_step=8)
    _committer(client, run_id).on_resume(LoopState(None, 0, 1, None, 4, 2, 4, 0, step=12),
                                         [(12, {"g_loss": 0.4, CHEAP_FD: 10.0})])

    models = _models(client, run_id)
    assert [m.tags[tags.CHECKPOINT_STEP] for m in models] == ["12", "8", "4"]  # one each, best (lowest FD) first
    run = client.get_run(run_id)
    for model, fd in zip(models, (10.0, 20.0, 30.0)):
        step = int(model.tags[tags.CHECKPOINT_STEP])
        assert model.name == model_name(run.info.run_name, step) and model.source_run_id == run_id
        assert model.status == LoggedModelStatus.READY and model.model_type == tags.CHECKPOINT_MODEL_TYPE
        assert model.tags[tags.CHECKPOINT] == f"/storage/run/checkpoint_{step:08d}"
        assert model.params == {"model.name": "cgan"}
        linked = {m.key: (m.value, m.step, m.dataset_name, m.dataset_digest) for m in model.metrics}
        assert linked[CHEAP_FD] == (fd, step, *DATASET) and linked["g_loss"][1] == step
    assert sorted(o.step for o in run.outputs.model_outputs) == [4, 8, 12]
    assert [m.step for m in client.get_metric_history(run_id, CHEAP_FD)] == [4, 8, 12]  # once each on the run


def test_register_picks_the_best_checkpoints_model_and_links_the_version(mlflow_server, tmp_path):
    from pipelines import integrity
    from pipelines.register import register_stage

    client = _client(mlflow_server)
    run_id = make_training_run(mlflow_server, tmp_path, seed=12)
    committer = _committer(client, run_id)
    for step, fd in ((4, 30.0), (8, 12.0), (12, 25.0)):
        _checkpoint(committer, step, fd)
    best = generator_model_id(client, run_id, "/storage/run/checkpoint_00000008")  # what finish_run does
    client.set_tag(run_id, tags.GENERATOR_MODEL_ID, best)
    assert best == _models(client, run_id)[0].model_id

    name = f"picked-{uuid.uuid4().hex[:6]}"
    first = register_stage(cfg_for(mlflow_server, name), run_id)
    again = register_stage(cfg_for(mlflow_server, name), run_id)  # the same checkpoint, picked again
    for registered in (first, again):
        # the version's source is the LoggedModel (OSS MLflow keeps no model_id column on versions)
        version = client.get_model_version(name, registered["version"])
        assert version.source == registered["model_uri"] == f"models:/{best}" and version.run_id == run_id
    picked = client.get_logged_model(best)
    # what the Models tab shows as its registered versions (MLflow 3.17's client and server both append to it)
    listed = {(v["name"], str(v["version"])) for v in json.loads(picked.tags["mlflow.modelVersions"])}
    assert listed == {(name, first["version"]), (name, again["version"])}
    # no second model was logged on the run, and the first version's files are untouched by the second register
    assert len(_models(client, run_id)) == 3
    integrity.verify_model(client, f"models:/{name}/{first['version']}")
