"""The floor under every forecast: per-window normalisation (data.window_norm) and the naive floor (model.floor)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from stllm.data.fit import RunMeta
from stllm.data.prepared import PreparedCity
from stllm.model import STLLM
from stllm.nn.floor import NaiveFloor, normalized, window_stats


def encoder_model(cfg, city):
    """An untrained encoder-only model with the meta of `city` (its scaler), as training would attach it."""
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    torch.manual_seed(0)
    model = STLLM(cfg, city.n_channels, prep.n_exog).eval()
    with torch.no_grad():   # the floor's read-out starts at zero: give it weights so the test sees the encoder too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.meta = RunMeta.from_prepared(prep)
    return model


def times(city, factor: float):
    return replace(city, values=city.values * factor)


def test_ten_times_the_values_gives_ten_times_the_forecast(tiny_city, tiny_config):
    """With the run's own scaler (same dataset: the z-scores are not the same), only the window's own scale can make
    the forecast follow: data.window_norm does, and without it the forecast does not."""
    for fit in ("false", "true"):                 # model.floor_fit weighs by errors on the window's own scale
        cfg = tiny_config(["model.use_llm=false", "data.window_norm=true", "model.floor=true", "data.profile=true",
                           f"model.floor_fit={fit}"])
        model = encoder_model(cfg, tiny_city)
        base = model.predict(tiny_city)["prediction"]
        big = model.predict(times(tiny_city, 10.0))["prediction"]
        np.testing.assert_allclose(big, 10 * base, rtol=1e-4, atol=1e-3)

    plain = encoder_model(tiny_config(["model.use_llm=false"]), tiny_city)
    base, big = plain.predict(tiny_city)["prediction"], plain.predict(times(tiny_city, 10.0))["prediction"]
    assert not np.allclose(big, 10 * base, rtol=1e-2)


def test_ten_times_holds_zero_shot_with_the_language_model(tiny_city, tiny_config):
    """A city the run never saw (its own scaler) with the tiny language model: x10 in, x10 out."""
    cfg = tiny_config(["data.window_norm=true", "model.floor=true"])
    from stllm.train import build_model
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    torch.manual_seed(0)
    model = build_model(cfg, prep).eval()
    other = replace(tiny_city, name="elsewhere")
    base = model.predict(other)["prediction"]
    big = model.predict(times(other, 10.0))["prediction"]
    np.testing.assert_allclose(big, 10 * base, rtol=1e-4, atol=1e-3)


def test_window_stats_cover_history_and_period_windows():
    torch.manual_seed(0)
    batch = {"x": torch.randn(2, 6, 3, 1) * 4 + 7, "x_mask": torch.ones(2, 6, 3, 1),
             "periods": torch.randn(2, 2, 4, 3, 1) * 4 + 7, "period_mask": torch.ones(2, 2, 4, 3, 1)}
    batch["x_mask"][0, 0] = 0.0                                   # an unobserved step is left out of the stats
    batch["x"][0, 0] = 1e6
    mean, spread = window_stats(batch)
    out = normalized(batch, mean, spread)
    seen = torch.cat([out["x"], out["periods"].flatten(1, 2)], 1)
    m = torch.cat([batch["x_mask"], batch["period_mask"].flatten(1, 2)], 1)
    n = m.sum(1)
    np.testing.assert_allclose((seen * m).sum(1) / n, 0.0, atol=1e-5)
    np.testing.assert_allclose(((seen * m) ** 2).sum(1) / n, 1.0, atol=1e-4)
    assert (out["x"][0, 0] == 0).all()                           # unobserved entries stay 0


def test_naive_floor_mixes_only_what_the_history_reaches():
    floor = NaiveFloor(t_out=3, n_references=3)                   # last value, a day, a week earlier
    x = torch.zeros(1, 4, 2, 1)
    x[:, -1] = 5.0
    periods = torch.stack([torch.full((1, 3, 2, 1), 1.0), torch.full((1, 3, 2, 1), 3.0)], 1)   # [b, P, t_out, N, C]
    pmask = torch.ones_like(periods)
    pmask[:, 1, :, 1] = 0.0                                       # node 1's week-earlier window is not in the history
    y = floor({"x": x, "x_mask": torch.ones_like(x), "periods": periods, "period_mask": pmask}).detach()
    np.testing.assert_allclose(y[0, :, 0, 0], (5 + 1 + 3) / 3, rtol=1e-6)   # equal weights at the start
    np.testing.assert_allclose(y[0, :, 1, 0], (5 + 1) / 2, rtol=1e-6)       # the missing one gets no weight
    with pytest.raises(ValueError, match="naive references"):
        floor({"x": x, "x_mask": torch.ones_like(x)})


def test_a_fitted_floor_leans_on_the_reference_that_fits_the_window_s_history():
    """model.floor_fit: a history that repeats the day before exactly and jumps around its last value leans on the
    day-earlier reference; the same references with the fit off mix equally."""
    t_in, t_out = 6, 3
    day_before = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 6.0])                 # the history: zig-zag
    x = day_before.reshape(1, t_in, 1, 1)
    hist_refs = torch.stack([x, torch.full_like(x, 10.0)], 1)     # [b, P, t_in, N, C]: a day, a week earlier
    batch = {"x": x, "x_mask": torch.ones_like(x), "periods_hist": hist_refs,
             "periods_hist_mask": torch.ones_like(hist_refs),
             "periods": torch.stack([torch.full((1, t_out, 1, 1), 2.0), torch.full((1, t_out, 1, 1), 10.0)], 1)}
    batch["period_mask"] = torch.ones_like(batch["periods"])
    fitted = NaiveFloor(t_out, 3, fit=True)
    errors = fitted.history_errors(batch)[:, 0, 0, 0, 0]
    assert errors.tolist() == pytest.approx([2.6, 0.0, 6.5])                  # last value (one step ahead), day, week
    with torch.no_grad():
        fitted.sharpness.fill_(5.0)                                           # a sharpness training would give
        y = fitted(batch)[0, :, 0, 0]
        plain = NaiveFloor(t_out, 3)(batch)[0, :, 0, 0]
    np.testing.assert_allclose(y, 2.0, atol=1e-3)                             # the day-earlier forecast
    np.testing.assert_allclose(plain, (6.0 + 2.0 + 10.0) / 3, rtol=1e-6)
    no_week = dict(batch, periods_hist_mask=torch.stack([torch.ones_like(x), torch.zeros_like(x)], 1))
    assert fitted.history_errors(no_week)[2].item() == pytest.approx(2.6)    # no evidence: the worst error there


def test_floor_starts_from_the_naive_mix(tiny_city, tiny_config):
    """model.floor zeroes the read-out: before training the forecast is the naive mix exactly."""
    cfg = tiny_config(["model.use_llm=false", "model.floor=true"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    model = STLLM(cfg, tiny_city.n_channels, prep.n_exog).eval()
    batch = prep.batch(prep.splits["test"][:4])
    with torch.no_grad():
        np.testing.assert_allclose(model(batch), model.floor(batch), atol=1e-6)


def test_floor_needs_forecasts(tiny_config):
    with pytest.raises(ValueError, match="model.task=forecast"):
        STLLM(tiny_config(["model.use_llm=false", "model.task=events", "model.floor=true"]), 1, 0)


def test_a_floor_run_saves_and_loads_to_the_same_forecasts(tmp_path, tiny_city, tiny_config):
    from stllm.train import build_model
    cfg = tiny_config(["data.window_norm=true", "model.floor=true", "data.periods=[day]"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    with torch.no_grad():
        model.floor.logits.copy_(torch.randn_like(model.floor.logits))
    model.save_pretrained(tmp_path / "run")
    again = STLLM.from_pretrained(tmp_path / "run")
    np.testing.assert_allclose(again.predict(tiny_city)["prediction"], model.predict(tiny_city)["prediction"],
                               rtol=1e-5, atol=1e-4)


def test_the_per_node_explanation_path_refuses_a_floor_run(tiny_city, tiny_config):
    """The student and generated explanations run the model node by node without the floor: refused, not wrong."""
    from stllm.distill.node_layout import slot_vectors
    from stllm.train import build_model
    cfg = tiny_config(["model.floor=true"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep)
    with pytest.raises(ValueError, match="model.floor"):
        slot_vectors(model, prep.batch(prep.splits["test"][:1]))


def test_nonnegative_raises_forecasts_below_zero_to_zero(tiny_city, tiny_config):
    """model.nonnegative: the same weights, the forecasts below 0 raised to 0 and the rest unchanged; the metrics
    are those of what predict returns."""
    city = replace(tiny_city, values=tiny_city.values - np.nanmean(tiny_city.values))   # around 0: some below
    plain = encoder_model(tiny_config(["model.use_llm=false"]), city)
    clamped = encoder_model(tiny_config(["model.use_llm=false", "model.nonnegative=true"]), city)
    a, b = plain.predict(city)["prediction"], clamped.predict(city)["prediction"]
    assert (a < 0).any() and (b >= 0).all()
    np.testing.assert_allclose(b, np.maximum(a, 0), rtol=1e-6, atol=1e-6)
    from stllm.infer import evaluate
    prep = clamped.prepare(city)
    truth = clamped.predict(city)["truth"]
    seen = np.isfinite(truth) & (np.abs(truth) > 1e-4)
    assert evaluate(clamped, prep, prep.splits["test"])["mae"] == pytest.approx(np.abs(b - truth)[seen].mean(), rel=1e-5)


def test_reference_fit_finds_the_reference_the_city_s_training_part_follows(tiny_city, tiny_config):
    """PreparedCity.reference_fit: in a city whose values repeat the day before exactly, the day-earlier reference
    has no error on the training part, the last value a large one; x10 in the values changes nothing (relative)."""
    steps = tiny_city.n_steps
    day = np.sin(np.arange(steps) * 2 * np.pi / 24)[:, None, None] * np.arange(1, 7)[None, :, None] + 10
    daily = replace(tiny_city, values=day.astype(np.float32), exog=None, exog_names=[])
    cfg = tiny_config(["data.periods=[day,week]", "data.profile=true"])
    fit = PreparedCity(daily, cfg.data, cfg.encoder).reference_fit             # [R, t_out, N, C]
    assert fit.shape == (4, cfg.data.t_out, 6, 1)                              # last value, day, week, profile
    np.testing.assert_allclose(fit[1:], 0.0, atol=1e-4)                        # a day, a week, the profile: exact
    assert (fit[0] > 0.1).all()                                                # the last value is not
    assert fit[0, -1].mean() > fit[0, 0].mean()                                # and worse the further ahead
    big = PreparedCity(times(daily, 10.0), cfg.data, cfg.encoder).reference_fit
    np.testing.assert_allclose(big, fit, rtol=1e-4, atol=1e-5)


def test_a_city_fitted_floor_leans_on_the_reference_with_the_smallest_city_error():
    """model.floor_city_fit: the references' errors on the city's training part move each node's mix; with no
    difference in those errors it is the plain mix."""
    t_out = 2
    x = torch.zeros(1, 4, 2, 1)                                                # history: last value 0, two nodes
    periods = torch.stack([torch.full((1, t_out, 2, 1), 5.0), torch.full((1, t_out, 2, 1), 9.0)], 1)
    fit = torch.zeros(3, t_out, 2, 1)
    fit[:, :, 0] = torch.tensor([3.0, 0.0, 3.0])[:, None, None]               # node 0: the day reference fits
    fit[:, :, 1] = torch.tensor([3.0, 3.0, 0.0])[:, None, None]               # node 1: the week reference fits
    batch = {"x": x, "x_mask": torch.ones_like(x), "periods": periods, "period_mask": torch.ones_like(periods),
             "reference_fit": fit}
    floor = NaiveFloor(t_out, 3, city_fit=True)
    with torch.no_grad():
        floor.city_sharpness.fill_(8.0)
        y = floor(batch)[0, :, :, 0]
        flat = floor(dict(batch, reference_fit=torch.zeros_like(fit)))[0, :, :, 0]
    np.testing.assert_allclose(y[:, 0], 5.0, atol=1e-3)
    np.testing.assert_allclose(y[:, 1], 9.0, atol=1e-3)
    np.testing.assert_allclose(flat, (0.0 + 5.0 + 9.0) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="reference_fit"):
        floor({k: v for k, v in batch.items() if k != "reference_fit"})


def test_ten_times_holds_with_the_city_fitted_floor(tiny_city, tiny_config):
    cfg = tiny_config(["model.use_llm=false", "data.window_norm=true", "model.floor=true", "data.profile=true",
                       "model.floor_fit=true", "model.floor_city_fit=true"])
    model = encoder_model(cfg, tiny_city)
    base = model.predict(tiny_city)["prediction"]
    np.testing.assert_allclose(model.predict(times(tiny_city, 10.0))["prediction"], 10 * base, rtol=1e-4, atol=1e-3)


def test_the_city_fit_needs_the_floor(tiny_config):
    from stllm.config import ConfigError
    with pytest.raises(ConfigError, match="floor_city_fit.*model.floor=true"):
        tiny_config(["model.floor_city_fit=true"])


def test_profile_weeks_is_the_mean_of_the_same_step_in_the_weeks_before(tiny_city, tiny_config):
    """data.profile_weeks=K: the profile reference at a step is the mean of the same step 1..K weeks earlier (causal,
    on the scaled axis), over the observed ones; without K weeks behind it, over those there are; none: masked."""
    from stllm.config import ConfigError
    cfg = tiny_config(["data.profile=true", "data.profile_weeks=2"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    values, mask = prep.profile
    week = 168
    t = 2 * week + 30
    np.testing.assert_allclose(values[t], (prep.x[t - week] + prep.x[t - 2 * week]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values[week + 5], prep.x[5], rtol=1e-5, atol=1e-6)        # one week behind it
    seen = prep.mask[:-week] + torch.cat([torch.zeros_like(prep.mask[:week]), prep.mask[:-2 * week]])  # 1 or 2 weeks
    assert mask[:week].sum() == 0 and torch.equal(mask[week:] > 0, seen > 0)
    with pytest.raises(ConfigError, match="profile_weeks.*data.profile=true"):
        tiny_config(["data.profile_weeks=4"])
