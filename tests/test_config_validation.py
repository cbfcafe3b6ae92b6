"""Config and data-option checks: every mistake is a ConfigError/DataError naming where, which key, what was given
and what is expected (issue "Nothing lost, nothing silently wrong")."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from stllm.config import SECTIONS, ConfigError, TrainConfig, load_config
from stllm.data.city import DataError

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def numeric_fields() -> list[str]:
    from stllm.backbone import BackboneConfig
    classes = {**SECTIONS, "backbone": BackboneConfig}
    return [f"{name}.{f.name}" for name, cls in classes.items() for f in dataclasses.fields(cls)
            if f.type.split(" |")[0] in ("int", "float")]


def test_top_level_list_and_non_mapping_section_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: expected a mapping of sections.*got list"):
        load_config(write(tmp_path, "- data\n- train\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: section train must be a mapping.*got 5"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: section data must be a mapping.*got \['a'\]"):
        load_config(write(tmp_path, "data: [a]\n"))


def test_boolean_must_be_true_or_false(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.use_llm must be true or false, got 'flase'"):
        load_config(write(tmp_path, "model:\n  use_llm: flase\n"))
    with pytest.raises(ConfigError, match=r"--set: model\.use_llm must be true or false, got 1"):
        load_config(None, ["model.use_llm=1"])
    assert load_config(None, ["model.use_llm=false"]).model.use_llm is False


def test_ranges_name_key_value_and_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.batch_size must be >= 1, got 0"):
        load_config(write(tmp_path, "train:\n  batch_size: 0\n"))
    with pytest.raises(ConfigError, match=r"--set: train\.batch_size must be >= 1, got 0"):
        load_config(TINY, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"encoder\.dropout must be in \[0, 1\), got 1\.0"):
        load_config(None, ["encoder.dropout=1.0"])
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0, got 0"):
        load_config(None, ["train.lr=0"])
    with pytest.raises(ConfigError, match=r"train\.batch_size must be >= 1, got 0"):
        TrainConfig(batch_size=0)                  # built in code, checked the same way


@pytest.mark.parametrize("key", numeric_fields())
def test_every_number_field_has_a_range(key):
    with pytest.raises(ConfigError, match=rf"--set.*{re.escape(key)} must be .*, got -1"):
        load_config(None, [f"{key}=-1"])


@pytest.mark.parametrize(("key", "value", "choices"), [
    ("data.scaler", "zscore", "channel|node"), ("encoder.dynamic_graph", "wnd", "auto|wind|data|none"),
    ("model.task", "classify", "forecast|events"), ("model.projector", "qformer", "linear|mlp"),
    ("train.loss", "mse", "mae|huber"), ("explain.mode", "llm", "analytic|generated"),
    ("backbone.quantize", "int4", "none"), ("backbone.dtype", "fp16", "float32"),
])
def test_unknown_choice_names_key_and_choices(key, value, choices):
    with pytest.raises(ConfigError, match=rf"--set: {re.escape(key)} must be .*{re.escape(choices)}.*{value}"):
        load_config(None, [f"{key}={value}"])


def test_types_from_the_annotations(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.batch_size must be an integer, got 8\.5"):
        load_config(write(tmp_path, "train:\n  batch_size: 8.5\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer, got True"):
        load_config(None, ["train.epochs=true"])
    with pytest.raises(ConfigError, match=r"train\.lr must be a finite number.*got nan"):
        load_config(write(tmp_path, "train:\n  lr: .nan\n"))
    with pytest.raises(ConfigError, match=r"encoder\.kernel_sizes must be a list of integers, got \[2, 'x'\]"):
        load_config(None, ["encoder.kernel_sizes=[2, x]"])
    with pytest.raises(ConfigError, match=r"model\.prompt must be a string, got 5"):
        load_config(None, ["model.prompt=5"])
    with pytest.raises(ConfigError, match=r"data\.options must be a mapping, got 'n_nodes=6'"):
        load_config(None, ["data.options=n_nodes=6"])
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-4\n  batch_size: '8'\nbackbone:\n  n_layers: null\n"))
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 8 and cfg.backbone.n_layers is None


def test_yaml_that_pyyaml_cannot_build_is_a_config_error(tmp_path):
    for text in ["train: {lr: !!float x}", "data: {name: 2024-13-01}", "model: {use_llm: !!bool x}",
                 "encoder: {kernel_sizes: &a [*a]}"]:
        with pytest.raises(ConfigError, match=r"c\.yaml"):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"--set 'train\.lr=\[': not valid YAML"):
        load_config(None, ["train.lr=["])


# ---- data options are checked against the loader that will be called ------------------------------------------------
def write_byo_city(folder: Path) -> Path:
    folder.mkdir()
    (folder / "values.csv").write_text("timestamp,s1,s2\n2024-01-01 00:00,1,10\n2024-01-01 01:00,2,3\n")
    (folder / "sensors.csv").write_text("id,lat,lon\ns1,45.0,9.0\ns2,45.1,9.1\n")
    return folder


def tiny_config_for(tmp_path: Path, city: Path) -> Path:
    """configs/tiny.yaml with only data.name changed: its synthetic-city options stay."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["name"] = str(city)
    return write(tmp_path, yaml.safe_dump(raw, sort_keys=False))


def test_synthetic_options_on_a_csv_city_are_refused_before_loading(tmp_path):
    from stllm.data.registry import check_options, load
    cfg = load_config(tiny_config_for(tmp_path, write_byo_city(tmp_path / "city")))
    expected = r"unknown option\(s\) n_nodes, n_days, seed for the bring-your-own CSV loader \(load_byo\); " \
               r"it accepts .*sensors"
    with pytest.raises(DataError, match=expected):
        check_options(cfg.data.name, cfg.data.options)
    with pytest.raises(DataError, match=expected):
        load(cfg.data.name, **cfg.data.options)
    assert load(cfg.data.name, city="Milan").city == "Milan"


def test_check_options_reads_no_data(tmp_path):
    from stllm.data.registry import check_options
    city = write_byo_city(tmp_path / "city")
    (city / "values.csv").write_text("not,a,city\n")      # loading would fail; checking names must not
    check_options(city, {"city": "Milan", "sensors": city / "sensors.csv"})
    (tmp_path / "x.npz").write_bytes(b"")                 # shared names map onto the PEMS loader's own
    check_options(tmp_path / "x.npz", {"sensors": "ids.txt", "adjacency": "edges.csv"})
    with pytest.raises(DataError, match=r"unknown option\(s\) locations for the PEMS .npz loader.*accepts .*ids"):
        check_options(tmp_path / "x.npz", {"locations": "a.csv"})


def test_check_options_for_builtins_and_the_synthetic_city():
    from stllm.data.registry import check_options
    check_options("synthetic", {"n_nodes": 6, "n_days": 21, "seed": 0})
    check_options("nyc-bike-30min", {"mode": "taxi"})      # no data root needed to check names
    with pytest.raises(DataError, match=r"unknown option\(s\) nodes for the synthetic city \(make_city\).*n_nodes"):
        check_options("synthetic", {"nodes": 6})
    with pytest.raises(DataError, match=r"nyc-bike: unknown option\(s\) channels for .*\(load_nyc\).*interval, mode"):
        check_options("nyc-bike", {"channels": ["PM2.5"]})
