"""Fuzzing the config reader: any YAML document, file or `--set` override, gives a valid Config or a ConfigError."""
import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stllm.config import SECTIONS, Config, ConfigError, config_from_dict, load_config


def _fields() -> dict[str, list[str]]:
    from stllm.backbone import BackboneConfig
    classes = {**SECTIONS, "backbone": BackboneConfig}
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in classes.items()}


FIELDS = _fields()
JUNK = st.sampled_from(["", "lr ", "Train", "data.t_in", "=", "batch-size"]) | st.text(max_size=6)
KEYS = st.sampled_from([*FIELDS, *(k for keys in FIELDS.values() for k in keys)]) | JUNK
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(), st.just(10**400), st.floats(),
    st.sampled_from(["flase", "1e-4", "", "nan", "-inf", "8", "8.0", "-1", "yes", "auto", "mae", "day", "none",
                     "hf:x", "openai:x", "2024-13-01", "tiny-gpt2", "q,v"]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=8)
# Mostly config-shaped: real sections holding their own keys (plus junk), so the value checks are reached.
SECTION = st.sampled_from(sorted(FIELDS)).flatmap(lambda s: st.tuples(st.just(s), st.one_of(
    st.dictionaries(st.sampled_from(FIELDS[s]), SCALARS, max_size=4),
    st.dictionaries(st.sampled_from(FIELDS[s]) | JUNK, VALUES, max_size=4), VALUES)))
DOCUMENTS = st.one_of(st.lists(SECTION, max_size=4).map(dict), st.lists(SECTION, max_size=4).map(dict),
                      st.dictionaries(KEYS, VALUES, max_size=3), VALUES)


def valid_or_config_error(read) -> None:
    """`read()` gives a Config that passes its own checks again, or raises ConfigError; anything else fails."""
    try:
        cfg = read()
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    config_from_dict(cfg.to_dict(), "round trip")


def as_override(section: str, key: str, value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return f"{section}.{key}={text.removesuffix('...').strip()}"   # a scalar's document ends in '...'


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCUMENTS)
def test_random_files(path, doc):
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    valid_or_config_error(lambda: load_config(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCUMENTS, extra=st.lists(st.text(max_size=12), max_size=2))
def test_random_overrides(path, doc, extra):
    path.write_text("data:\n  t_in: 12\n")
    items = [as_override(s, k, v) for s, keys in (doc.items() if isinstance(doc, dict) else [])
             if isinstance(keys, dict) for k, v in keys.items()]
    valid_or_config_error(lambda: load_config(path, items + extra))
