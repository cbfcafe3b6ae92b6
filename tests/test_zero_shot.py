"""Zero-shot: a run trained on one city predicts another with a different number of sensors, unchanged."""
import json

import numpy as np
import pytest

from stllm.cli import main
from stllm.data.city import CityData, DataError
from stllm.data.synthetic import make_city
from stllm.data.fit import RunMeta, fit_to_run
from stllm.data.windows import Scaler
from stllm.model import STLLM
from stllm.train import train


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_config_module):
    city = make_city(n_nodes=8, n_days=28, seed=3, name="city-a")
    cfg = tiny_config_module(["train.max_steps=60", "train.eval_every=20", "train.lr=0.003"])
    out = tmp_path_factory.mktemp("zs") / "run"
    train(cfg, out, city=city, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_config_module():
    from pathlib import Path

    from stllm.config import load_config
    root = Path(__file__).resolve().parent.parent
    return lambda overrides=(): load_config(root / "configs" / "tiny.yaml", list(overrides))


def test_transfer_to_a_bigger_unseen_city_beats_last_value(source_run):
    model = STLLM.from_pretrained(source_run)
    target = make_city(n_nodes=13, n_days=28, seed=11, name="city-b")     # other sensors, other map, other scales
    prep = model.prepare(target)
    assert prep.scaler is not None and prep.city.n_nodes == 13
    m = model.evaluate(prep, "test")
    assert m["n_nodes"] == 13 and np.isfinite(m["mae"]) and m["zero_shot"] and m["source_dataset"] == "city-a"
    assert m["mae"] < m["baselines"]["last"]["mae"], (m["mae"], m["baselines"]["last"]["mae"])


def test_target_scaler_never_sees_target_futures(source_run):
    model = STLLM.from_pretrained(source_run)
    target = make_city(n_nodes=5, n_days=28, seed=12, name="city-c")
    a = model.prepare(target)
    future = target.values.copy()
    future[a.splits["test"][0]:] *= 1000.0                                  # the evaluated future explodes
    b = model.prepare(CityData(**{**target.__dict__, "values": future}))
    np.testing.assert_array_equal(a.scaler.mean, b.scaler.mean)
    np.testing.assert_array_equal(a.scaler.std, b.scaler.std)
    assert not np.allclose(a.scaler.mean, model.meta.scaler.mean)           # fitted on the target, not reused


def test_cli_zero_shot_json(source_run, tmp_path, monkeypatch):
    import stllm.data.registry as registry
    other = make_city(n_nodes=10, n_days=28, seed=5, name="city-d")
    monkeypatch.setattr(registry, "load", lambda name, **kw: other)
    monkeypatch.setattr("stllm.data.load", lambda name, **kw: other)
    assert main(["evaluate", "--run", str(source_run), "--data", "city-d", "--out", str(tmp_path / "zs.json")]) == 0
    m = json.loads((tmp_path / "zs.json").read_text())
    assert m["zero_shot"] is True and m["source_dataset"] == "city-a" and m["dataset"] == "city-d"


def hourly_run(channels: list[str]) -> RunMeta:
    """The meta of a run trained on hourly data with these channels (scaler and sizes do not matter here)."""
    c = len(channels)
    return RunMeta(dataset="source", n_nodes=1, channels=channels, units=[""] * c, interval="1h",
                   scaler=Scaler(np.zeros((1, c), np.float32), np.ones((1, c), np.float32)))


def test_channel_mapping_and_its_errors():
    meta = hourly_run(["flow"])
    two = make_city(n_nodes=4, n_days=10, n_channels=2, seed=1)             # inflow, outflow
    with pytest.raises(DataError, match=r"do not match the run's \['flow'\].*--channels"):
        fit_to_run(two, meta)
    mapped = fit_to_run(two, meta, ["outflow=0"])
    assert mapped.channels == ["outflow"] and np.array_equal(mapped.values[..., 0], two.values[..., 1], equal_nan=True)
    assert fit_to_run(two, meta, ["outflow=flow"]).channels == ["outflow"]
    with pytest.raises(DataError, match="no channel 'speed'"):
        fit_to_run(two, meta, ["outflow=speed"])
    with pytest.raises(DataError, match="unknown channel 'pickups'"):
        fit_to_run(two, meta, ["pickups=0"])
    with pytest.raises(DataError, match="TARGET=RUN"):
        fit_to_run(two, meta, ["outflow"])
    two_meta = hourly_run(["a", "b"])
    with pytest.raises(DataError, match=r"without data; map every run channel"):
        fit_to_run(two, two_meta, ["inflow=a"])


def test_other_interval_is_refused_or_resampled():
    meta = hourly_run(["flow"])
    fine = make_city(n_nodes=3, n_days=5, interval="30min", seed=2)
    with pytest.raises(DataError, match="--resample"):
        fit_to_run(fine, meta)
    hourly = fit_to_run(fine, meta, resample="sum")
    assert str(hourly.interval) == "0 days 01:00:00" and hourly.n_steps == fine.n_steps // 2


def test_few_shot_starts_from_the_source_run_and_uses_only_the_first_days(source_run, tmp_path, tiny_config_module):
    import torch

    from stllm.checkpoint import load
    target = make_city(n_nodes=9, n_days=28, seed=21, name="city-e")
    cfg = tiny_config_module([f"train.init_from={source_run}", "data.train_days=7", "train.max_steps=0",
                              "train.epochs=1", "train.batch_size=4", "train.eval_every=0"])
    metrics = train(cfg, tmp_path / "few", city=target, progress=False)
    windows = 7 * 24 - 12 - 12 + 1                                        # s in [12, 7 days - 12]
    assert metrics["training"]["steps"] == -(-windows // 4)
    zero = load(source_run / "model.safetensors")[0]
    few = load(tmp_path / "few" / "model.safetensors")[0]
    assert set(zero) == set(few) and any(not torch.equal(zero[k], few[k]) for k in zero)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(tiny_config_module(["train.init_from=/nowhere"]), tmp_path / "bad", city=target, progress=False)


def test_test_time_adaptation_touches_only_norms_and_never_the_evaluated_future(source_run):
    import torch

    from stllm.adapt import adapt, adaptable_parameters
    model = STLLM.from_pretrained(source_run)
    target = make_city(n_nodes=7, n_days=28, seed=31, name="city-f")
    prep = model.prepare(target)
    before = int(prep.splits["test"][0])
    adapted = adapt(model, prep, before=before, steps=5)
    names = {n for n, _ in adaptable_parameters(model)}
    assert names and all("norm" in n for n in names)
    old, new = dict(model.named_parameters()), dict(adapted.named_parameters())
    changed = {n for n in old if not torch.equal(old[n], new[n])}
    assert changed and changed <= names                                      # only LayerNorms moved

    future = target.values.copy()
    future[before:] = 1e6                                                   # the evaluated future is poisoned
    poisoned = model.prepare(CityData(**{**target.__dict__, "values": future}))
    again = dict(adapt(model, poisoned, before=before, steps=5).named_parameters())
    assert all(torch.equal(again[n], new[n]) for n in names)                # ... and adaptation never saw it
