"""The typed config: presets <- YAML <- CLI, strict keys, clear errors; the CLI's dry run prints it."""
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.config import ConfigError, build_config


def test_presets_fill_the_papers_defaults():
    cfg = build_config("wgan-gp")
    assert (cfg.optim.optimizer, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == ("adam", 8e-4, 0.5, 0.9)
    assert cfg.optim.gp_weight == 10.0 and cfg.optim.n_critic == 5 and not cfg.model.critic_batchnorm
    assert build_config("cgan").model.conditional is True


def test_cli_overrides_yaml_which_overrides_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: wgan\noptim:\n  clip_value: 0.05\n  n_critic: 3\ntrain:\n  workers: 2\n")
    cfg = build_config(None, path, {"optim": {"n_critic": 7, "clip_value": None}})
    assert cfg.model.name == "wgan" and cfg.optim.optimizer == "rmsprop"
    assert cfg.optim.clip_value == 0.05 and cfg.optim.n_critic == 7 and cfg.train.workers == 2


@pytest.mark.parametrize("yaml_text,match", [
    ("train:\n  wrokers: 2\n", r"train.wrokers: unknown key"),
    ("optim:\n  n_critic: many\n", r"optim.n_critic: Input should be a valid integer"),
    ("- a\n- b\n", "must hold a mapping"),
    ("model: [\n", "not valid YAML"),
    ("bogus_section: {}\n", "bogus_section: unknown key"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, yaml_text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        build_config(None, path)


@pytest.mark.parametrize("overrides,match", [
    ({"optim": {"clip_value": -0.01}}, "optim.clip_value: Input should be greater than 0"),
    ({"optim": {"n_critic": 0}}, "optim.n_critic: Input should be greater than or equal to 1"),
    ({"data": {"resolution": 48}}, "resolution 48 is not supported"),
    ({"model": {"critic_batchnorm": True}}, "critic_batchnorm=true with objective wasserstein-gp"),
])
def test_bad_values_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config("wgan-gp", None, overrides)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'stylegan'; choose one of dcgan, cgan, wgan, wgan-gp"):
        build_config("stylegan")


def test_dry_run_prints_the_resolved_config():
    result = CliRunner().invoke(cli, ["train", "--model", "wgan", "--dry-run", "--n-critic", "3", "--workers", "4"])
    assert result.exit_code == 0, result.output
    for expected in ("optimizer: rmsprop", "lr_g: 0.001", "lr_d: 0.001", "clip_value: 0.01", "n_critic: 3",
                     "gp_weight: 0.0", "conditional: false", "workers: 4", "resolution:"):
        assert expected in result.output


def test_cli_rejects_unknown_model_and_bad_value():
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", "biggan", "--dry-run"])
    assert result.exit_code == 2 and "biggan" in result.output
    result = runner.invoke(cli, ["train", "--model", "wgan", "--clip-value", "-1", "--dry-run"])
    assert result.exit_code == 2 and "optim.clip_value" in result.output


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli, ["--help"])
    for command in ("prepare", "train", "evaluate", "register", "run", "tune", "promote", "generate", "models"):
        assert f"  {command} " in result.output


def test_on_by_default_flags_can_be_switched_off_and_absent_flags_keep_the_yaml(tmp_path):
    runner = CliRunner()
    on = runner.invoke(cli, ["train", "--dry-run"])
    off = runner.invoke(cli, ["train", "--no-channels-last", "--dry-run"])
    assert "channels_last: true" in on.output and "channels_last: false" in off.output
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  channels_last: false\n  gpu: false\n")
    kept = runner.invoke(cli, ["train", "--config", str(config), "--dry-run"])
    assert "channels_last: false" in kept.output, kept.output
    back_on = runner.invoke(cli, ["train", "--config", str(config), "--channels-last", "--dry-run"])
    assert "channels_last: true" in back_on.output


def test_yaml_sections_empty_or_not_mappings(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\noptim:\n")  # keys commented out: empty sections, not a traceback
    assert build_config(yaml_path=yaml_file).model.name == "dcgan"
    yaml_file.write_text("model: 3\n")  # not a mapping: an error that names the section, not a traceback
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        build_config(yaml_path=yaml_file)
