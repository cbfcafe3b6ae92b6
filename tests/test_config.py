import pytest

from stllm.config import ConfigError, load_config, parse_overrides


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=0.005", "data.periods=[day]", "backbone.n_layers=3"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.train.lr == 0.005 and again.data.periods == ["day"] and again.backbone.n_layers == 3


def test_unknown_key_names_the_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 0.1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.learning_rate"):
        load_config(path)


def test_unknown_section_and_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        load_config(None, ["trainer.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="data.split"):
        load_config(None, ["data.split=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=mse"])
    with pytest.raises(ValueError, match="backbone.quantize"):
        load_config(None, ["backbone.quantize=int3"])


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)


def test_numbers_in_exponent_form_become_numbers(tmp_path):
    cfg = load_config(None, ["train.lr=1e-4", "train.lora_lr=2e-5", "train.batch_size=8"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.lora_lr == 2e-5
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n")
    assert load_config(path).train.lr == 5e-4
    with pytest.raises(ConfigError, match="train.lr|lr must be a number"):
        load_config(None, ["train.lr=fast"])
