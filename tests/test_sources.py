"""Several training cities in one run (data.sources): every city's windows once per epoch in one-city batches, the
validation error as the mean of each city's normalised error, per-source test metrics, exact resume, refusals that
name the source, and a one-channel run used zero-shot on any one-channel data."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from stllm.config import ConfigError, load_config
from stllm.data.synthetic import make_city
from stllm.train import train
from run_results import log_of, numbers

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# two more cities: fewer nodes at a finer step without weather, more nodes at a coarser step
SOURCES = ("data.sources=[{name: synthetic, options: {n_nodes: 4, n_days: 14, interval: 30min, seed: 1, "
           "name: city-b, with_weather: false}}, {name: synthetic, options: {n_nodes: 9, n_days: 28, interval: 2h, "
           "seed: 2, name: city-c}}]")
FAST = ["model.use_llm=false", "train.num_threads=1", "train.train_stride=8", "train.val_windows=8"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A finished encoder-only run on the tiny city and two sources (one epoch), with every training batch seen."""
    import stllm.train as training
    out = tmp_path_factory.mktemp("sources") / "run"
    seen, window_loss = [], training.window_loss

    def spy(model, cities, cfg, accelerator):
        loss = window_loss(model, cities, cfg, accelerator)
        return lambda batch: (seen.append((cities[batch.city].city.name, batch.starts.tolist())), loss(batch))[1]
    mp = pytest.MonkeyPatch()
    mp.setattr(training, "window_loss", spy)
    try:
        cfg = load_config(TINY, [*FAST, SOURCES, "train.max_steps=0", "train.epochs=1", "train.eval_every=4"])
        metrics = train(cfg, out, progress=False)
    finally:
        mp.undo()
    return cfg, out, metrics, seen


def test_an_epoch_reads_every_city_s_training_windows_once_in_one_city_batches(mixed):
    from stllm.train import load_cities, training_windows
    cfg, _, metrics, seen = mixed
    cities = load_cities(cfg)
    assert [p.city.name for p in cities] == ["synthetic", "city-b", "city-c"]
    assert [p.n_nodes for p in cities] == [6, 4, 9] and len({p.city.interval for p in cities}) == 3
    for prep in cities:
        read = sorted(s for name, starts in seen if name == prep.city.name for s in starts)
        assert read == sorted(training_windows(prep, cfg).tolist()), prep.city.name
    assert all(len(starts) <= cfg.train.batch_size for _, starts in seen)
    assert len({name for name, _ in seen[:6]}) > 1                           # interleaved, not city after city
    assert metrics["training"]["windows"] == sum(len(s) for _, s in seen)


def test_the_batch_order_is_fixed_by_the_seed_and_one_city_keeps_the_single_city_order():
    from stllm.train import epoch_batches
    starts = [np.arange(20, 45), np.arange(100, 110)]
    batches = epoch_batches(starts, 4, seed=3)
    assert [(b.city, b.starts.tolist()) for b in batches(0)] == [(b.city, b.starts.tolist()) for b in batches(0)]
    assert [b.starts.tolist() for b in batches(0)] != [b.starts.tolist() for b in batches(1)]
    alone = np.concatenate([b.starts for b in epoch_batches(starts[:1], 4, seed=3)(2)])
    np.testing.assert_array_equal(alone, np.random.default_rng(3 + 2).permutation(starts[0]))   # as before sources


def test_the_selection_error_is_the_mean_of_each_city_s_error_over_its_scale(mixed):
    from stllm.train import error_scale, load_cities
    cfg, out, _, _ = mixed
    scales = {p.city.name: error_scale(p, cfg) for p in load_cities(cfg)}
    assert scales["city-c"] != pytest.approx(scales["city-b"])                 # the test says something
    for record in log_of(out):
        errors = record["val_errors"]
        assert set(errors) == {"synthetic", "city-b", "city-c"}
        assert record["val_error"] == pytest.approx(np.mean([errors[n] / scales[n] for n in errors]), rel=1e-12)


def test_one_city_keeps_its_plain_validation_error(tmp_path, tiny_city):
    from stllm.infer import evaluate, selection_error
    from stllm.model import STLLM
    from stllm.train import _spread
    cfg = load_config(TINY, [*FAST, "train.max_steps=1", "train.eval_every=1", "train.ema=0"])
    train(cfg, tmp_path / "run", city=tiny_city, progress=False)
    record = log_of(tmp_path / "run")[0]
    assert "val_errors" not in record
    model = STLLM.from_pretrained(tmp_path / "run")           # the best weights = the one validated
    prep = model.prepare(tiny_city)
    val = selection_error(evaluate(model, prep, _spread(prep.splits["val"], 8), batch_size=cfg.train.batch_size))
    assert record["val_error"] == pytest.approx(val, rel=1e-6)


def test_metrics_and_meta_report_the_sources(mixed):
    _, out, metrics, _ = mixed
    assert metrics["dataset"] == "synthetic" and metrics["n_nodes"] == 6 and "baselines" in metrics
    assert set(metrics["sources"]) == {"city-b", "city-c"}
    for name, n_nodes in (("city-b", 4), ("city-c", 9)):
        source = metrics["sources"][name]
        assert source["dataset"] == name and source["n_nodes"] == n_nodes and source["split"] == "test"
        assert np.isfinite(source["mae"]) and "historical_average" in source["baselines"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == "synthetic" and meta["sources"] == ["city-b", "city-c"]


def test_a_mixed_run_with_the_language_model_resumes_mid_run_to_the_same_metrics(tmp_path):
    cfg = load_config(TINY, [*FAST[1:], SOURCES, "train.max_steps=5", "train.eval_every=2", "train.ema=0.5"])
    whole = train(cfg, tmp_path / "whole", progress=False)

    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 3:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", progress=False, on_step=stop)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert numbers(resumed) == numbers(whole) and "sources" in resumed
    assert numbers(log_of(tmp_path / "cut")) == numbers(log_of(tmp_path / "whole"))


def test_a_source_with_another_channel_count_is_refused_naming_it(tmp_path):
    two = "data.sources=[{name: synthetic, options: {n_nodes: 4, n_days: 14, seed: 1}}, " \
          "{name: synthetic, options: {n_nodes: 4, n_days: 14, n_channels: 2, name: city-two}}]"
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(synthetic\): 2 channel\(s\) \['inflow', 'outflow'\], "
                                          r"the main dataset synthetic has 1 \['flow'\]"):
        train(load_config(TINY, [*FAST, two]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    bad = "data.sources=[{name: /no/such/file.csv}]"
    with pytest.raises(ValueError, match=r"data.sources\[0\] \(/no/such/file.csv\): "):
        train(load_config(TINY, [*FAST, bad]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_one_channel_run_takes_any_one_channel_data_zero_shot(mixed):
    from stllm.data.fit import fit_to_run
    from stllm.model import STLLM
    _, out, _, _ = mixed
    model = STLLM.from_pretrained(out)
    pm = dataclasses.replace(make_city(n_nodes=5, n_days=21, seed=9, name="air"), channels=["pm25"])
    assert pm.channels == ["pm25"] and model.meta.channels == ["flow"]
    fitted = fit_to_run(pm, model.meta)
    assert fitted.channels == ["pm25"]                                # its own name, for the prompt
    assert "pm25" in model.prepare(fitted).context["channels"]
    result = model.evaluate(fitted)
    assert np.isfinite(result["mae"])
    from stllm.data.city import DataError
    two = make_city(n_nodes=3, n_days=21, n_channels=2)                # more than one channel still needs a map
    with pytest.raises(DataError, match="do not match the run's"):
        fit_to_run(two, model.meta)
    single = dataclasses.replace(model.meta, sources=[])               # a one-city run still asks for a map
    with pytest.raises(DataError, match="do not match the run's"):
        fit_to_run(pm, single)


def test_a_run_that_mixed_steps_takes_data_at_any_of_them(mixed):
    """The run trained at 1 h with sources at 30 min and 2 h: its meta lists them, and a 30-minute city fits (as the
    CLI's `stllm evaluate` needs it); a 15-minute one gets the interval advice."""
    import pandas as pd
    from stllm.data.city import DataError
    from stllm.data.fit import fit_to_run
    from stllm.model import STLLM
    meta = STLLM.from_pretrained(mixed[1]).meta
    assert sorted(meta.source_intervals) == [pd.Timedelta("30min"), pd.Timedelta("2h")]
    half_hour = make_city(n_nodes=3, n_days=21, interval="30min", seed=5, with_weather=False)
    assert fit_to_run(half_hour, meta).interval == pd.Timedelta("30min")
    with pytest.raises(DataError, match="one step is 15min"):
        fit_to_run(make_city(n_nodes=3, n_days=21, interval="15min", seed=5), meta)


def test_another_channel_of_the_run_s_dataset_is_not_its_own_data(mixed):
    """nyc-bike departures trained, nyc-bike arrivals given: not the run's own data, so not the run's scaler."""
    from stllm.data.fit import is_own_data
    from stllm.model import STLLM
    city = make_city(n_nodes=6, n_days=21, seed=0)                      # the main city of `mixed` (tiny.yaml)
    meta = STLLM.from_pretrained(mixed[1]).meta
    assert is_own_data(city, meta)
    assert not is_own_data(dataclasses.replace(city, channels=["other"]), meta)


def test_a_dataset_given_twice_is_told_apart_by_its_channels_or_its_place(tiny_city):
    from stllm.data.prepared import PreparedCity
    from stllm.train import city_names
    cfg = load_config(TINY)
    two = make_city(n_nodes=3, n_days=21, n_channels=2)                  # synthetic: inflow, outflow
    cities = [PreparedCity(c, cfg.data, cfg.encoder) for c in (
        tiny_city, two.select_channels(["inflow"]), two.select_channels(["outflow"]), tiny_city)]
    assert city_names(cities) == ["synthetic", "synthetic:inflow", "synthetic:outflow", "synthetic (data.sources[2])"]


def test_a_source_of_another_dataset_does_not_inherit_the_main_dataset_s_keys(tmp_path):
    """data.channels and data.options describe the main dataset; a source of another dataset (a PEMS-style .npz,
    one channel) keeps its own, a source of the same dataset inherits them."""
    from stllm.train import load_cities
    values = make_city(n_nodes=3, n_days=21, seed=4, with_weather=False).values
    np.savez(tmp_path / "other.npz", data=np.nan_to_num(values))
    (tmp_path / "other.csv").write_text("from,to,cost\n0,1,1.0\n1,2,1.5\n")
    cfg = load_config(TINY, [*FAST, "data.options={n_nodes: 6, n_days: 21, seed: 0, n_channels: 2}",
                             "data.channels=[outflow]",
                             f"data.sources=[{{name: {tmp_path / 'other.npz'}, options: {{start: '2024-01-01'}}}}, "
                             f"{{name: synthetic, channels: [inflow]}}]"])
    cities = load_cities(cfg)
    assert [c.city.n_channels for c in cities] == [1, 1, 1]
    assert cities[1].city.n_nodes == 3 and cities[1].city.channels != ["outflow"]
    assert cities[2].city.channels == ["inflow"] and cities[2].city.n_nodes == 6   # the same dataset's options


def test_test_sources_false_tests_the_main_dataset_only(tmp_path):
    cfg = load_config(TINY, [*FAST, SOURCES, "train.max_steps=2", "train.test_sources=false"])
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert "sources" not in metrics and metrics["mae"] > 0


@pytest.mark.parametrize("given, says", [
    ("[{name: synthetic}, {name: x, chanels: [a]}]", r"data.sources\[1\]: unknown key\(s\) chanels; a source takes"),
    ("[{channels: [a]}]", r"data.sources\[0\] needs a name"),
])
def test_a_wrong_source_is_named_by_its_place_and_key(given, says):
    with pytest.raises(ConfigError, match=says):
        load_config(TINY, [f"data.sources={given}"])


# ------------------------------------------------------------------------------------------ what the series is


def test_series_features_say_the_interval_and_the_words_of_channel_unit_and_domain():
    from stllm.data.prepared import SERIES_FEATURES, series_features
    hourly, half = make_city(n_nodes=3, n_days=7, seed=0), make_city(n_nodes=5, n_days=7, seed=1, interval="30min")
    f_hourly, f_half = series_features(hourly), series_features(half)
    assert f_hourly.shape == (hourly.n_channels, SERIES_FEATURES)
    assert f_hourly[:, 0] == pytest.approx(0.0) and f_half[:, 0] == pytest.approx(np.log(0.5))
    np.testing.assert_allclose(np.linalg.norm(f_hourly[:, 1:], axis=1), 1.0, rtol=1e-6)
    # the words, not the sizes: same channel, unit and domain -> same word part on both cities
    np.testing.assert_array_equal(f_hourly[:, 1:], f_half[:, 1:])
    renamed = dataclasses.replace(hourly, channels=["speed"] * hourly.n_channels, units=["mph"] * hourly.n_channels)
    assert not np.allclose(series_features(renamed)[:, 1:], f_hourly[:, 1:])
    assert series_features(renamed)[:, 0] == pytest.approx(0.0)


def test_series_features_train_and_change_the_forecast_of_another_kind_of_series(tmp_path):
    from stllm.model import STLLM
    out = tmp_path / "run"
    cfg = load_config(TINY, [*FAST, SOURCES, "encoder.series_features=true", "train.max_steps=6",
                             "train.eval_every=3"])
    train(cfg, out, progress=False)
    model = STLLM.from_pretrained(out)
    assert model.encoder.series is not None and model.encoder.series.weight.abs().sum() > 0   # it learned
    city = make_city(n_nodes=6, n_days=21, seed=0)
    other = dataclasses.replace(city, channels=[f"{c} speed" for c in city.channels])
    a, b = model.predict(city, split="test")["prediction"], model.predict(other, split="test")["prediction"]
    assert not np.allclose(a, b)                     # the same numbers, said to be another kind of series
    without = load_config(TINY, [*FAST, "train.max_steps=1"])
    assert without.encoder.series_features is False   # off unless asked: older runs load and behave as before
