import numpy as np
import pandas as pd
import pytest

from stllm.config import load_config
from stllm.data.city import CityData, DataError
from stllm.data.prepared import PreparedCity
from stllm.data.windows import Scaler, split_starts, time_features


def test_split_protocol_keeps_targets_inside_their_part():
    splits = split_starts(1000, 12, 12)
    assert splits["train"][0] == 12 and splits["train"][-1] + 12 <= 700
    assert splits["val"][0] == 700 and splits["val"][-1] + 12 <= 800
    assert splits["test"][0] == 800 and splits["test"][-1] == 1000 - 12
    with pytest.raises(DataError, match="too few"):
        split_starts(20, 12, 12)


def test_scaler_uses_only_the_training_part(tiny_city):
    cfg = load_config()
    a = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    changed = tiny_city.values.copy()
    changed[a.train_end:] *= 100.0                        # the future explodes
    b = PreparedCity(CityData(**{**tiny_city.__dict__, "values": changed}), cfg.data, cfg.encoder)
    np.testing.assert_allclose(a.scaler.mean, b.scaler.mean)
    np.testing.assert_allclose(a.scaler.std, b.scaler.std)
    ref = np.nanmean(tiny_city.values[: a.train_end], axis=(0, 1))
    np.testing.assert_allclose(a.scaler.mean[0], ref, rtol=1e-5)


def test_scaler_inverse_is_exact():
    values = np.random.default_rng(0).normal(5, 3, (50, 4, 2)).astype(np.float32)
    for per_node in (False, True):
        s = Scaler.fit(values, per_node=per_node)
        np.testing.assert_allclose(s.inverse(s.transform(values)), values, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(Scaler.from_dict(s.to_dict()).mean, s.mean)


def test_time_features_hand_values():
    tf = time_features(np.array(["2024-01-01T06:00", "2024-01-07T18:00"], dtype="datetime64[ns]"))
    # 06:00 is a quarter day: sin = 1, cos = 0. 2024-01-01 is a Monday (day 0 of the week).
    np.testing.assert_allclose(tf[0, :2], [1.0, 0.0], atol=1e-6)
    week_frac = (0 + 0.25) / 7
    np.testing.assert_allclose(tf[0, 2:], [np.sin(2 * np.pi * week_frac), np.cos(2 * np.pi * week_frac)], atol=1e-6)
    np.testing.assert_allclose(tf[1, :2], [-1.0, 0.0], atol=1e-6)


def test_batch_cuts_the_right_values(tiny_city):
    cfg = load_config()
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    starts = prep.splits["test"][:3]
    batch = prep.batch(starts, mask_zeros=False)
    assert batch["x"].shape == (3, 12, 6, 1) and batch["y"].shape == (3, 12, 6, 1)
    assert batch["periods"].shape == (3, 2, 12, 6, 1) and batch["tf_out"].shape == (3, 12, 4)
    assert batch["dynamic_adj"].shape == (3, 6, 6)          # the synthetic city has wind
    s = starts[1]
    raw = tiny_city.values
    expect_x = np.nan_to_num(prep.scaler.transform(raw[s - 12:s]))
    np.testing.assert_allclose(batch["x"][1].numpy(), expect_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["x_mask"][1].numpy(), np.isfinite(raw[s - 12:s]))
    np.testing.assert_allclose(batch["y_raw"][1].numpy(), raw[s:s + 12], rtol=1e-6, equal_nan=True)
    week = 7 * 24                                           # target-aligned window one week earlier
    expect_week = np.nan_to_num(prep.scaler.transform(raw[s - week:s - week + 12]))
    np.testing.assert_allclose(batch["periods"][1, 1].numpy(), expect_week, rtol=1e-5, atol=1e-5)
    assert np.allclose(batch["dynamic_adj"].sum(-1).numpy(), 1.0)


def test_mask_zeros_drops_zero_targets():
    t = np.arange(24 * 10)
    values = np.where(t % 5 == 0, 0.0, 1.0 + t % 7)[:, None, None].repeat(2, 1).astype(np.float32)
    city = CityData("z", values, pd.date_range("2024", periods=len(t), freq="h"), "1h", ["v"], [""],
                    pd.DataFrame({"id": ["a", "b"], "lat": [40.0, 40.01], "lon": [-74.0, -74.0]}))
    cfg = load_config(None, ["data.periods=[day]"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    b = prep.batch(prep.splits["train"][:4], mask_zeros=True)
    assert ((b["y_raw"] == 0) == (b["y_mask"] == 0)).all()


def test_last_window_forecasts_beyond_the_data(tiny_city):
    cfg = load_config()
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    batch = prep.batch(np.array([tiny_city.n_steps]))
    assert batch["y_raw"].isnan().all() and batch["x_mask"].sum() > 0
    with pytest.raises(DataError, match="window starts"):
        prep.batch(np.array([tiny_city.n_steps + 1]))


def test_resample_sums_counts_and_averages_wind_on_the_circle(tiny_city):
    half = tiny_city.resample("2h", "sum")
    assert half.n_steps == tiny_city.n_steps // 2 and str(half.interval) == "0 days 02:00:00"
    v = tiny_city.values
    np.testing.assert_allclose(half.values[3], np.nansum(v[6:8], axis=0), rtol=1e-6)
    wd = tiny_city.exog_names.index("wind_dir_deg")
    city = CityData(**{**tiny_city.__dict__, "exog": tiny_city.exog.copy()})
    city.exog[0, 0, wd], city.exog[1, 0, wd] = 350.0, 10.0
    assert min(abs(city.resample("2h", "mean").exog[0, 0, wd] - 0.0), 360 - city.resample("2h", "mean").exog[0, 0, wd]) < 1e-3
    with pytest.raises(DataError, match="whole multiple"):
        tiny_city.resample("90min")


def test_profile_is_the_training_hour_of_week_mean_and_reaches_the_encoder():
    """data.profile: one more period token holding each node's hour-of-week mean over the training part only."""
    import torch
    from stllm.config import load_config
    from stllm.data.prepared import PreparedCity
    from stllm.data.synthetic import make_city
    from pathlib import Path
    city = make_city(n_nodes=3, n_days=21, seed=1)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", ["data.profile=true"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    start = int(prep.splits["test"][0])
    batch = prep.batch(np.array([start]))
    assert batch["periods"].shape[1] == len(cfg.data.periods) + 1
    got = batch["periods"][0, -1, 0, 1, 0].item()                           # first target step, node 1
    week = 168
    same_hour = np.arange(start % week, prep.train_end, week)                 # training steps at that hour of week
    raw = city.values[same_hour, 1, 0]
    expected = np.nanmean(prep.scaler.transform(city.values[same_hour])[:, 1, 0][np.isfinite(raw)])
    assert abs(got - expected) < 1e-5
    # the test part's own values never enter: changing them leaves the profile as it was
    city.values[prep.train_end:] *= 3
    again = PreparedCity(city, cfg.data, cfg.encoder, scaler=prep.scaler).batch(np.array([start]))
    assert torch.equal(again["periods"][:, -1], batch["periods"][:, -1])


def test_a_training_target_is_left_out_of_its_own_profile():
    """A training window's profile at a target step is the mean over the *other* training weeks at that hour."""
    from stllm.config import load_config
    from stllm.data.prepared import PreparedCity
    from stllm.data.synthetic import make_city
    from pathlib import Path
    city = make_city(n_nodes=3, n_days=21, seed=1, missing_rate=0.0)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", ["data.profile=true"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    start = int(prep.splits["train"][30])
    got = prep.batch(np.array([start]))["periods"][0, -1, 0, 1, 0].item()    # first target step, node 1
    week = 168
    others = [t for t in range(start % week, prep.train_end, week) if t != start]
    expected = prep.scaler.transform(city.values[others])[:, 1, 0].mean()
    assert abs(got - expected) < 1e-5
    assert abs(got - prep.scaler.transform(city.values[[start] + others])[:, 1, 0].mean()) > 1e-4


def test_a_period_shorter_than_the_horizon_is_refused():
    """At 4 h steps a day is 6 steps: the window a day earlier would hold the targets of a 12-step forecast."""
    from stllm.config import load_config
    from stllm.data.city import DataError
    from stllm.data.prepared import PreparedCity
    from stllm.data.synthetic import make_city
    from pathlib import Path
    city = make_city(n_nodes=3, n_days=60, interval="4h", seed=1)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", ["data.periods=[day]"])
    with pytest.raises(DataError, match=r"one day is 6 steps .* data.t_out=12, .* drop 'day'"):
        PreparedCity(city, cfg.data, cfg.encoder)
