"""Baselines on hand-made cities with known answers, and on NYC bike against REFERENCE.md's figures."""
from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest

from stllm.baselines import (BASELINES, historical_average, last_value, run_baselines, same_time_last_week,
                             same_time_yesterday)
from stllm.data.city import CityData
from stllm.metrics import evaluate_forecast


def make_city(values: np.ndarray, start: str = "2024-01-01", freq: str = "1h") -> CityData:
    """values [T, N, C] -> CityData on a regular grid."""
    t, n, c = values.shape
    return CityData(name="toy", values=values, timestamps=pd.date_range(start, periods=t, freq=freq).values,
                    interval=freq, channels=[f"ch{i}" for i in range(c)], units=["u"] * c,
                    nodes=pd.DataFrame({"id": [f"s{i}" for i in range(n)]}))


def targets(city: CityData, starts: np.ndarray, t_out: int) -> np.ndarray:
    return city.values[starts[:, None] + np.arange(t_out)[None, :]]  # [b, t_out, n, c]


def weekly_city(t: int = 24 * 7 * 6, n: int = 3, seed: int = 0) -> CityData:
    """A random pattern per hour of week, repeated every week; node/channel offsets."""
    rng = np.random.default_rng(seed)
    pattern = rng.uniform(1, 10, size=(168, n, 2))
    return make_city(pattern[np.arange(t) % 168].astype(np.float32))


def test_shapes_and_dtype():
    city = weekly_city()
    starts = np.array([200, 300, 500])
    for f in (last_value, same_time_yesterday, same_time_last_week):
        out = f(city, starts, 5)
        assert out.shape == (3, 5, 3, 2) and out.dtype == np.float32
    assert historical_average(city, starts, 5, train_end=400).shape == (3, 5, 3, 2)


def test_last_value_exact_on_constant_series():
    values = np.broadcast_to(np.array([3.0, 7.0, 11.0])[None, :, None], (100, 3, 1)).copy()
    city = make_city(values)
    starts = np.arange(1, 90)
    np.testing.assert_array_equal(last_value(city, starts, 10), targets(city, starts, 10))
    # and it really is values[s - 1] on a non-constant series
    city = make_city(np.arange(100, dtype=np.float32).reshape(100, 1, 1))
    np.testing.assert_array_equal(last_value(city, np.array([5, 50]), 3)[:, :, 0, 0], [[4, 4, 4], [49, 49, 49]])


@pytest.mark.parametrize("t_out", [12, 30])  # 30 > one day: the last day before the window is repeated
def test_same_time_yesterday_exact_on_daily_sine(t_out):
    t = np.arange(24 * 10)
    values = (np.sin(2 * np.pi * t / 24)[:, None, None] * np.array([1.0, 2.0])[None, :, None] + 5).astype(np.float32)
    city = make_city(values)
    starts = np.arange(24, len(t) - t_out + 1)
    np.testing.assert_allclose(same_time_yesterday(city, starts, t_out), targets(city, starts, t_out), atol=1e-6)
    assert np.abs(last_value(city, starts, t_out) - targets(city, starts, t_out)).max() > 1  # not trivially exact


def test_same_time_last_week_exact_on_weekly_pattern():
    city = weekly_city()
    starts = np.arange(168, city.n_steps - 24 + 1)
    np.testing.assert_array_equal(same_time_last_week(city, starts, 24), targets(city, starts, 24))
    assert np.abs(same_time_yesterday(city, starts, 24) - targets(city, starts, 24)).max() > 1


def test_no_baseline_reads_its_target():
    city = weekly_city()
    s, t_out = 500, 200  # horizon longer than a day
    before = {f.__name__: f(city, np.array([s]), t_out, train_end=400)
              for f in (last_value, same_time_yesterday, same_time_last_week, historical_average)}
    future = city.values.copy()
    future[s:] = -999.0
    spoiled = make_city(future)
    for f in (last_value, same_time_yesterday, same_time_last_week, historical_average):
        np.testing.assert_array_equal(f(spoiled, np.array([s]), t_out, train_end=400), before[f.__name__])


def test_historical_average_is_slot_mean_of_training_part_only():
    rng = np.random.default_rng(1)
    base = weekly_city().values
    values = (base + rng.normal(0, 1, size=base.shape)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    city = make_city(values)  # starts on Monday 2024-01-01 00:00, so slot = t % 168
    train_end = 168 * 4 + 30
    expected = np.full((168, 3, 2), np.nan)
    for slot in range(168):
        rows = [values[t] for t in range(train_end) if t % 168 == slot]
        expected[slot] = np.nanmean(np.stack(rows), axis=0)
    starts = np.arange(train_end, city.n_steps - 12 + 1, 7)
    pred = historical_average(city, starts, 12, train_end)
    slots = (starts[:, None] + np.arange(12)[None, :]) % 168
    np.testing.assert_allclose(pred, expected[slots], rtol=1e-5)

    changed = values.copy()
    changed[train_end:] = rng.uniform(100, 200, size=changed[train_end:].shape)
    np.testing.assert_array_equal(historical_average(make_city(changed), starts, 12, train_end), pred)
    changed = values.copy()
    changed[train_end - 1] += 50.0  # the last training step does count
    assert not np.array_equal(historical_average(make_city(changed), starts, 12, train_end), pred)


def test_historical_average_slot_comes_from_timestamps():
    """value = pandas' day_of_week * 24 + hour; the average at any slot must be that number."""
    ts = pd.date_range("2023-03-15 05:00", periods=24 * 7 * 3, freq="1h")  # a Wednesday, mid-day
    slot = (ts.day_of_week * 24 + ts.hour).to_numpy()
    city = make_city(slot.astype(np.float32)[:, None, None], start="2023-03-15 05:00")
    starts = np.array([200, 333, 480])
    pred = historical_average(city, starts, 20, train_end=24 * 7 * 2)
    np.testing.assert_array_equal(pred[:, :, 0, 0], targets(city, starts, 20)[:, :, 0, 0])
    # 30-minute data: 48 steps a day
    ts = pd.date_range("2023-03-16 00:30", periods=48 * 7 * 2, freq="30min")
    slot = (ts.day_of_week * 48 + ts.hour * 2 + ts.minute // 30).to_numpy()
    city = make_city(slot.astype(np.float32)[:, None, None], start="2023-03-16 00:30", freq="30min")
    pred = historical_average(city, np.array([400, 600]), 12, train_end=48 * 7)
    np.testing.assert_array_equal(pred[:, :, 0, 0], targets(city, np.array([400, 600]), 12)[:, :, 0, 0])


def test_missing_reference_falls_back_to_last_observed_then_training_mean():
    values = np.arange(1, 201, dtype=np.float32).reshape(200, 1, 1)
    values[100:110] = np.nan
    values[:5] = np.nan
    city = make_city(values)
    # last value at s = 105: values[104] missing -> last observed value is values[99] = 100
    np.testing.assert_array_equal(last_value(city, np.array([105]), 3).ravel(), [100, 100, 100])
    # yesterday at s = 130, h = 0..3 -> refs 106..109 missing -> values[129] = 130
    np.testing.assert_array_equal(same_time_yesterday(city, np.array([130]), 4).ravel(), [130] * 4)
    # refs before t = 0 and nothing observed before s = 3 -> mean of the training part values[:50] (6..50)
    train_mean = np.mean(np.arange(6, 51))
    np.testing.assert_allclose(same_time_last_week(city, np.array([3]), 2, train_end=50).ravel(), [train_mean] * 2)
    np.testing.assert_allclose(last_value(city, np.array([0]), 2, train_end=50).ravel(), [train_mean] * 2)
    # ref before t = 0 with data before s -> last observed
    np.testing.assert_array_equal(same_time_last_week(city, np.array([20]), 2).ravel(), [20, 20])
    # a time-of-week slot never seen in training -> last observed before the window
    pred = historical_average(city, np.array([60]), 3, train_end=50)  # slots 60..62 lie beyond the 50 train hours
    np.testing.assert_array_equal(pred.ravel(), [60, 60, 60])


def test_missing_skip_leaves_nan_and_run_baselines_scores_only_predictions():
    values = np.arange(1, 401, dtype=np.float32).reshape(400, 1, 1)
    values[300] = np.nan
    city = make_city(values)
    pred = same_time_yesterday(city, np.array([320, 330]), 3, missing="skip")[:, :, 0, 0]
    np.testing.assert_array_equal(np.isnan(pred), [[False, False, False], [False, False, False]])
    pred = same_time_yesterday(city, np.array([323]), 3, missing="skip")[0, :, 0, 0]  # refs 299, 300, 301
    np.testing.assert_array_equal(pred, [300, np.nan, 302])
    assert np.isnan(last_value(city, np.array([0]), 2, missing="skip")).all()
    out = run_baselines(city, np.array([323]), 3, train_end=200, missing="skip")
    assert out["same_time_yesterday"]["mae"] == pytest.approx(24.0)  # two scored positions, each off by 24
    assert out["same_time_yesterday"]["per_horizon"]["mae"] == pytest.approx([24.0, float("nan"), 24.0], nan_ok=True)
    with pytest.raises(ValueError, match="missing"):
        last_value(city, np.array([5]), 2, missing="zero")


def test_bad_starts_raise():
    city = weekly_city()
    with pytest.raises(ValueError, match="window starts"):
        last_value(city, np.array([-1]), 3)
    with pytest.raises(ValueError, match="integer"):
        last_value(city, np.array([1.5]), 3)
    with pytest.raises(ValueError, match="window starts"):
        run_baselines(city, np.array([city.n_steps - 2]), 3, train_end=100)


def test_run_baselines_matches_single_functions_and_batching():
    rng = np.random.default_rng(2)
    values = (weekly_city().values + rng.normal(0, 1, size=(1008, 3, 2))).clip(0).round().astype(np.float32)
    values[rng.random(values.shape) < 0.02] = np.nan
    city = make_city(values)
    train_end, t_out = 700, 12
    starts = np.arange(800, city.n_steps - t_out + 1)
    out = run_baselines(city, starts, t_out, train_end, batch_size=17)
    assert tuple(out) == BASELINES
    true = targets(city, starts, t_out)
    singles = {"last": last_value(city, starts, t_out, train_end),
               "same_time_yesterday": same_time_yesterday(city, starts, t_out, train_end),
               "same_time_last_week": same_time_last_week(city, starts, t_out, train_end),
               "historical_average": historical_average(city, starts, t_out, train_end)}
    for name, pred in singles.items():
        assert not np.isnan(pred).any()
        ref = evaluate_forecast(pred, true)
        for key in ("mae", "rmse", "mape"):
            assert out[name][key] == pytest.approx(ref[key])
            assert out[name]["unmasked"][key] == pytest.approx(ref["unmasked"][key])
    assert out["same_time_last_week"]["mae"] < out["last"]["mae"]
    one_batch = run_baselines(city, starts, t_out, train_end, batch_size=10_000)
    assert one_batch["last"]["mae"] == pytest.approx(out["last"]["mae"])


# ---- real data: REFERENCE.md's baseline table -------------------------------------------------------------------
# The protocol that reproduces every row to the printed two decimals (t_in = t_out = 12, T steps):
#   time axis split at train_end = int(0.7 T) and test_start = int(0.8 T);
#   test windows s = test_start .. T - t_out (s = first target step; history may lie in the validation part);
#   historical average fitted on values[:train_end]; targets equal to 0 (and NaN) ignored; MAE pooled over steps;
#   a position whose reference value is missing is not scored (missing="skip"; only Beijing has gaps).
REFERENCE_MAE = {  # last, same hour yesterday, same hour last week, historical average
    "nyc_bike": (32.35, 12.88, 12.60, 16.64),
    "nyc_taxi": (26.41, 9.38, 7.53, 98.36),
    "bayarea_bike": (2.23, 1.68, 1.57, 1.21),
    "beijing_pm25": (31.08, 57.55, 75.56, 59.64),
}


def shared_data_root() -> str:
    root = os.environ.get("STLLM_DATA_ROOT")
    if not root or not os.path.isdir(root):
        reason = f"STLLM_DATA_ROOT is unset or not a directory ({root!r}); real-data checks need ../shared/data"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return root


def load_reference_city(root: str, name: str) -> CityData:
    """The REFERENCE.md datasets, read directly with numpy/pandas (not through stllm's loaders)."""
    def need(rel: str) -> str:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            pytest.fail(f"{path} missing under STLLM_DATA_ROOT")
        return path

    if name in ("nyc_bike", "nyc_taxi"):
        mode = name.split("_")[1]
        values = np.load(need(f"NYC_Manhattan_TaxiBike/60min/201901-202012-NYC{mode}-inoutflow.npz"))["arr_0"]
        return make_city(values, start="2019-01-01 00:00")  # [17544, 69, 2], hourly
    if name == "bayarea_bike":
        z = np.load(need("BayArea_BikeShare_2014/bayarea_bike_2014_60min.npz"))
        return make_city(z["flow"], start=str(z["time"][0]))  # [8760, 70, 2], hourly 2014
    files = sorted(glob.glob(os.path.join(need("BeijingAirQuality"), "PRSA_Data_*.csv.gz")))
    assert len(files) == 12, files
    frames = [pd.read_csv(f, usecols=["year", "month", "day", "hour", "PM2.5"]) for f in files]
    values = np.stack([f["PM2.5"].to_numpy(np.float32) for f in frames], axis=1)[:, :, None]  # [35064, 12, 1]
    return make_city(values, start="2013-03-01 00:00")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_MAE))
def test_baselines_reproduce_reference_table(name):
    city = load_reference_city(shared_data_root(), name)
    t, t_in, t_out = city.n_steps, 12, 12
    train_end, test_start = int(0.7 * t), int(0.8 * t)
    starts = np.arange(max(test_start, t_in), t - t_out + 1)
    got = run_baselines(city, starts, t_out, train_end, missing="skip")
    for baseline, ref in zip(BASELINES, REFERENCE_MAE[name]):
        assert got[baseline]["mae"] == pytest.approx(ref, abs=0.0051), (name, baseline, got[baseline]["mae"])
    if np.isnan(city.values).any():  # the default fallback only changes the figures where references are missing
        filled = run_baselines(city, starts, t_out, train_end)
        for baseline, ref in zip(BASELINES, REFERENCE_MAE[name]):
            assert filled[baseline]["mae"] == pytest.approx(ref, rel=0.02)


def test_a_baseline_without_the_history_it_needs_is_reported_missing_not_replaced():
    import json

    from stllm.baselines import unsupported
    from stllm.cli import comparison_table
    from stllm.metrics import format_table
    city = weekly_city()                                       # hourly: a week is 168 steps
    starts = np.arange(40, 400, 5)
    out = run_baselines(city, starts, 12, train_end=100)
    assert tuple(out) == BASELINES
    week, average = out["same_time_last_week"], out["historical_average"]
    assert week["missing"] == "needs 168 steps of history before the first window, has 40"
    assert average["missing"].startswith("needs 168 steps of training data") and average["missing"].endswith("has 100")
    assert week["mae"] is None and week["unmasked"]["rmse"] is None and week == unsupported(week["missing"])
    for name in ("last", "same_time_yesterday"):               # these had their 1 and 24 steps: real figures
        assert "missing" not in out[name] and np.isfinite(out[name]["mae"])
    assert json.loads(json.dumps(out))["same_time_last_week"]["mae"] is None   # metrics.json holds null

    text = format_table({"model": out["last"], **out})
    row = next(line for line in text.splitlines() if line.startswith("same_time_last_week"))
    assert row.split()[1:] == ["n/a"] * 5
    assert "same_time_last_week: n/a, needs 168 steps of history before the first window, has 40" in text
    assert "historical_average: n/a, needs 168 steps of training data" in text
    cli = comparison_table({**out["last"], "baselines": out})       # the table `stllm evaluate` prints
    assert "n/a" in cli and "has 40" in cli

    starts = np.arange(10, 400, 5)                              # ten steps: not even a day for "yesterday"
    out = run_baselines(city, starts, 12, train_end=24 * 7 * 4)
    assert out["same_time_yesterday"]["missing"] == "needs 24 steps of history before the first window, has 10"
    assert "missing" not in out["historical_average"] and "missing" not in out["last"]
    assert run_baselines(city, np.array([0]), 3, train_end=200)["last"]["mae"] is None


def test_exactly_enough_history_gives_every_baseline_figures():
    city = weekly_city()
    out = run_baselines(city, np.array([168, 300]), 12, train_end=168, missing="skip")
    assert out["last_4_weeks"]["missing"] == "needs 672 steps of history before the first window, has 168"
    assert all("missing" not in m and np.isfinite(m["mae"]) for k, m in out.items() if k != "last_4_weeks")
    out = run_baselines(city, np.array([672, 700]), 12, train_end=168, missing="skip")
    assert all("missing" not in m and np.isfinite(m["mae"]) for m in out.values())


def test_last_4_weeks_averages_the_same_time_of_the_four_weeks_before():
    """A level that rises by 10 every week: the four-week average lags it by 2.5 weeks' rise (25), last week's
    value by one (10); a missing week is left out of the mean, not counted as 0."""
    from stllm.baselines import last_4_weeks
    t = 24 * 7 * 6
    level = (np.arange(t) // 168 * 10.0)[:, None, None] + np.zeros((1, 2, 1))
    city = make_city(level.astype(np.float32))
    starts = np.array([24 * 7 * 5 + 3])                                  # in week 5 (level 50)
    np.testing.assert_allclose(last_4_weeks(city, starts, 6), (40 + 30 + 20 + 10) / 4)
    np.testing.assert_allclose(same_time_last_week(city, starts, 6), 40.0)
    gap = level.copy()
    gap[24 * 7 * 3:24 * 7 * 4] = np.nan                                   # week 3 unobserved
    np.testing.assert_allclose(last_4_weeks(make_city(gap.astype(np.float32)), starts, 6), (40 + 20 + 10) / 3)
    assert run_baselines(city, starts, 6, train_end=24 * 7 * 4)["last_4_weeks"]["mae"] == pytest.approx(25.0)
