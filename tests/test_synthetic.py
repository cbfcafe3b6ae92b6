"""The synthetic city: structure, determinism, and that it is learnable but not trivial."""

import numpy as np
import pytest

from stllm.data.city import CityData, DataError
from stllm.data.graphs import bearings_deg, haversine_km, static_graph, wind_from_exog, wind_graph
from stllm.data.synthetic import EXOG_NAMES, make_city


@pytest.fixture(scope="module")
def city() -> CityData:
    return make_city()          # the default: 24 sensors, 56 days, hourly


def _ffill(x: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along time in [T, N] (a leading NaN takes the node's mean)."""
    x = x.copy()
    x[0] = np.where(np.isnan(x[0]), np.nanmean(x, axis=0), x[0])
    idx = np.where(np.isnan(x), 0, np.arange(len(x))[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    return x[idx, np.arange(x.shape[1])[None]]


def _hour_of_week_mean(y: np.ndarray, steps_per_week: int) -> np.ndarray:
    """Each step's (node, hour-of-week) mean over the whole series, [T, N]."""
    how = np.arange(len(y)) % steps_per_week
    means = np.stack([np.nanmean(y[how == h], axis=0) for h in range(steps_per_week)])
    return means[how]


def baselines(city: CityData, t_in: int = 12, t_out: int = 12) -> dict[str, float]:
    """MAE (averaged over the t_out horizons, test = last 20% of the time) of naive forecasts and a linear fit.

    The linear model, fitted by least squares on the first 70% (pooled over nodes, one per horizon h), uses the
    last t_in values and the values one day and one week before both the target step and the last input step.
    """
    y = city.values[..., 0].astype(np.float64)              # [T, N]
    x = _ffill(y)                                            # inputs: missing values carried forward
    t, s = len(y), city.steps_per_day
    w = 7 * s
    origins = np.arange(w, t - t_out)                        # index of the last input step
    train = origins[origins + t_out < int(0.7 * t)]
    test = origins[origins >= int(0.8 * t)]

    def features(o, h):                                      # [len(o), N, t_in + 5]
        cols = [x[o - lag] for lag in range(t_in)] + [x[o + h - s], x[o + h - w], x[o - s], x[o - w]]
        return np.stack(cols + [np.ones_like(x[o])], axis=-1)

    err = {"last_value": [], "same_time_yesterday": [], "same_time_last_week": [], "linear": []}
    for h in range(1, t_out + 1):
        f, target = features(train, h).reshape(-1, t_in + 5), y[train + h].reshape(-1)
        ok = np.isfinite(target)
        coef, *_ = np.linalg.lstsq(f[ok], target[ok], rcond=None)
        target = y[test + h]
        ok = np.isfinite(target)
        for key, pred in [("last_value", x[test]), ("same_time_yesterday", x[test + h - s]),
                          ("same_time_last_week", x[test + h - w]), ("linear", features(test, h) @ coef)]:
            err[key].append(np.abs(pred - target)[ok].mean())
    out = {k: float(np.mean(v)) for k, v in err.items()}
    out["mean_value"] = float(np.nanmean(y[test[0]:]))
    return out


# ---- structure ---------------------------------------------------------------------------------------------------
def test_shapes_and_metadata(city):
    assert isinstance(city, CityData)
    assert city.values.shape == (56 * 24, 24, 1) and city.values.dtype == np.float32
    assert city.exog.shape == (56 * 24, 1, 4) and city.exog_names == EXOG_NAMES
    assert np.isfinite(city.exog).all()
    assert city.channels == ["flow"] and city.units == ["count"]
    assert city.city == "Synthetic City" and city.domain == "synthetic mobility"
    assert city.nodes["id"].iloc[0] == "S00" and city.nodes["name"].iloc[0] == "S00 Riverside"
    assert city.nodes["name"].is_unique and (city.nodes["description"].str.len() > 20).all()
    assert city.has_coordinates
    d = haversine_km(city.nodes["lat"], city.nodes["lon"])
    assert d.max() < 15.0 and np.sort(d, axis=1)[:, 1].min() > 0     # a ~10 km box, no duplicate points
    city.validate()


def test_deterministic_given_seed():
    a, b, c = (make_city(n_nodes=6, n_days=14, seed=seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.exog, b.exog)
    assert a.nodes.equals(b.nodes)
    assert not np.array_equal(np.nan_to_num(a.values), np.nan_to_num(c.values))


def test_values_are_nonnegative_counts(city):
    v = city.values[np.isfinite(city.values)]
    assert v.min() >= 0 and np.array_equal(v, np.round(v))
    assert v.mean() > 10                                   # counts large enough that the rhythm is visible


@pytest.mark.parametrize("rate", [0.0, 0.02, 0.1])
def test_missing_rate(rate):
    c = make_city(n_nodes=20, n_days=28, missing_rate=rate, seed=1)
    nan = np.isnan(c.values).mean()
    assert nan == pytest.approx(rate, abs=0.3 * rate + 1e-9)
    if rate:
        assert max(_longest_nan_run(c.values[:, i, 0]) for i in range(c.n_nodes)) >= 6   # an outage, not only gaps


def _longest_nan_run(x: np.ndarray) -> int:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.isnan(x).astype(int), [0]])))   # run starts and ends
    return int((edges[1::2] - edges[::2]).max(initial=0))


def test_two_channels_are_correlated():
    c = make_city(n_nodes=8, n_days=14, n_channels=2)
    assert c.channels == ["inflow", "outflow"] and c.units == ["count", "count"]
    a, b = c.values[..., 0].ravel(), c.values[..., 1].ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    assert np.corrcoef(a[ok], b[ok])[0, 1] > 0.7


def test_other_interval_and_no_weather():
    c = make_city(n_nodes=5, n_days=7, interval="15min")
    assert c.values.shape == (7 * 96, 5, 1) and c.steps_per_day == 96
    dry = make_city(n_nodes=5, n_days=7, with_weather=False)
    assert dry.exog is None and dry.exog_names == []
    np.testing.assert_array_equal(dry.values, make_city(n_nodes=5, n_days=7).values)   # weather acts, unrecorded


def test_bad_arguments():
    with pytest.raises(DataError, match="interval"):
        make_city(n_days=2, interval="7min")
    with pytest.raises(DataError, match="missing_rate"):
        make_city(n_days=2, missing_rate=0.7)


def test_graphs_build_from_the_synthetic_city(city):
    a = static_graph(city)
    assert a.shape == (24, 24) and (a > 0).any() and np.all(np.diag(a) == 0)
    lat, lon = city.nodes["lat"], city.nodes["lon"]
    speed, direction = wind_from_exog(city)
    g = wind_graph(haversine_km(lat, lon), bearings_deg(lat, lon), speed[:5], direction[:5])
    assert g.shape == (5, 24, 24) and g.min() >= 0 and (g > 0).any()


def test_scales_to_thousands_of_nodes():
    c = make_city(n_nodes=2000, n_days=60)
    assert c.values.shape == (60 * 24, 2000, 1)
    assert np.isfinite(c.values).mean() > 0.9


# ---- what there is to learn ------------------------------------------------------------------------------------
def test_daily_periodicity(city):
    x = _ffill(city.values[..., 0].astype(np.float64))
    x = (x - x.mean(0)) / x.std(0)
    acf = lambda lag: float(np.mean(x[lag:] * x[:-lag]))
    assert acf(24) > 0.5 and acf(24) > acf(12) + 0.5
    assert acf(168) > acf(24)                              # weekends differ: a week back matches better than a day


def test_spatial_spill_over(city):
    """A node's change follows its neighbours' change one step earlier; random far-away nodes' changes do not."""
    y = np.log1p(city.values[..., 0].astype(np.float64))
    change = np.diff(y - _hour_of_week_mean(y, 7 * city.steps_per_day), axis=0)       # [T-1, N]
    order = np.argsort(haversine_km(city.nodes["lat"], city.nodes["lon"]), axis=1)
    rng = np.random.default_rng(0)
    near = np.stack([np.nanmean(change[:-1, order[i, 1:5]], axis=1) for i in range(city.n_nodes)], axis=1)
    far = np.stack([np.nanmean(change[:-1, rng.choice(order[i, 9:], 4, replace=False)], axis=1)
                    for i in range(city.n_nodes)], axis=1)

    def corr(a, b):
        ok = np.isfinite(a) & np.isfinite(b)
        return np.corrcoef(a[ok], b[ok])[0, 1]
    c_near, c_far = corr(change[1:].ravel(), near.ravel()), corr(change[1:].ravel(), far.ravel())
    assert c_near > 0.05 and c_near > c_far + 0.05, (c_near, c_far)


def test_rain_lowers_values(city):
    y = city.values[..., 0].astype(np.float64)
    relative = y / _hour_of_week_mean(y, 7 * city.steps_per_day)
    rain = city.exog[:, 0, EXOG_NAMES.index("rain")]
    wet, dry = np.nanmean(relative[rain > 0.5]), np.nanmean(relative[rain == 0])
    assert (rain > 0.5).sum() >= 24
    assert wet < 0.8 * dry, (wet, dry)


def test_naive_baselines_beatable_but_not_trivial(city):
    b = baselines(city)
    print("\nsynthetic city baselines (MAE, 12 -> 12):", {k: round(v, 2) for k, v in b.items()})
    best = min(b["last_value"], b["same_time_yesterday"], b["same_time_last_week"])
    assert best >= 0.1 * b["mean_value"], "the best naive forecast is nearly perfect: nothing left to learn"
    assert b["linear"] <= 0.9 * best, f"a linear fit beats the best naive baseline by only {1 - b['linear'] / best:.1%}"
