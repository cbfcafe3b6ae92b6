"""Metrics against a loop-based numpy reference written here, with NaN and zero targets."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stllm.metrics import (MetricAccumulator, evaluate_forecast, format_table, mae, mape, masked_mae, masked_mape,
                           masked_rmse, rmse)


def reference(pred: np.ndarray, true: np.ndarray, skip_zero: bool) -> tuple[float, float, float]:
    """MAE, RMSE, MAPE% by explicit loops over every element."""
    abs_err, sq_err, ape = [], [], []
    for p, t in zip(pred.ravel().tolist(), true.ravel().tolist()):
        if math.isnan(t) or (skip_zero and t == 0.0):
            continue
        abs_err.append(abs(p - t))
        sq_err.append((p - t) ** 2)
        if t != 0.0:
            ape.append(abs(p - t) / abs(t))
    return (sum(abs_err) / len(abs_err), math.sqrt(sum(sq_err) / len(sq_err)), 100 * sum(ape) / len(ape))


@pytest.fixture
def forecast() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 6, size=(7, 4, 5, 2)).astype(np.float64)  # [b, t_out, n, c], many zeros
    true[rng.random(true.shape) < 0.1] = np.nan
    pred = true + rng.normal(0, 2, size=true.shape)
    pred[np.isnan(pred)] = 1.5  # predictions are always defined
    assert (true == 0).sum() > 20 and np.isnan(true).sum() > 5
    return pred, true


def test_single_metrics_match_reference(forecast):
    pred, true = forecast
    ref_m = reference(pred, true, skip_zero=True)
    ref_u = reference(pred, true, skip_zero=False)
    assert masked_mae(pred, true) == pytest.approx(ref_m[0])
    assert masked_rmse(pred, true) == pytest.approx(ref_m[1])
    assert masked_mape(pred, true) == pytest.approx(ref_m[2])
    assert mae(pred, true) == pytest.approx(ref_u[0])
    assert rmse(pred, true) == pytest.approx(ref_u[1])
    assert mape(pred, true) == pytest.approx(ref_u[2])


def test_masked_ignores_zeros_unmasked_does_not():
    true = np.array([[0.0, 2.0, np.nan]])[:, :, None, None]  # [1, 3, 1, 1]
    pred = np.array([[5.0, 3.0, 100.0]])[:, :, None, None]
    assert masked_mae(pred, true) == pytest.approx(1.0)
    assert mae(pred, true) == pytest.approx(3.0)  # (5 + 1) / 2: the zero counts, the NaN never does
    assert rmse(pred, true) == pytest.approx(math.sqrt(13.0))
    assert mape(pred, true) == pytest.approx(50.0)  # zero target can't be a denominator
    assert masked_mae(pred, true, null_value=None) == pytest.approx(3.0)
    assert masked_mae(pred, true, null_value=2.0) == pytest.approx(5.0)
    assert masked_mae(pred, true + 5e-5) == pytest.approx(1.0, abs=1e-3)  # near-zero counts as zero


def test_evaluate_forecast_matches_reference(forecast):
    pred, true = forecast
    out = evaluate_forecast(pred, true)
    t_out = true.shape[1]
    for key in ("mae", "rmse", "mape"):
        assert len(out["per_horizon"][key]) == t_out
    steps = [reference(pred[:, h], true[:, h], skip_zero=True) for h in range(t_out)]
    pooled_m, pooled_u = reference(pred, true, skip_zero=True), reference(pred, true, skip_zero=False)
    for i, key in enumerate(("mae", "rmse", "mape")):
        assert out[key] == pytest.approx(pooled_m[i])  # headline: all steps pooled, the field's convention
        assert out["unmasked"][key] == pytest.approx(pooled_u[i])
        assert out["per_horizon"][key] == pytest.approx([s[i] for s in steps])
        assert out["step_mean"][key] == pytest.approx(np.mean([s[i] for s in steps]))
    assert out["n_windows"] == true.shape[0]
    assert out["mae"] == pytest.approx(masked_mae(pred, true))
    assert out["unmasked"]["rmse"] == pytest.approx(rmse(pred, true))
    # the masks differ per step here, so the two averages differ (RMSE: mean of steps <= pooled)
    assert out["step_mean"]["rmse"] < out["rmse"]
    assert out["step_mean"]["mae"] != pytest.approx(out["mae"], rel=1e-9)


def test_json_serialisable_plain_floats(forecast):
    out = evaluate_forecast(*forecast)
    again = json.loads(json.dumps(out))
    assert again == out
    assert all(type(out[k]) is float for k in ("mae", "rmse", "mape"))
    assert all(type(x) is float for x in out["per_horizon"]["rmse"])


def test_accumulator_over_batches_equals_one_shot(forecast):
    pred, true = forecast
    acc = MetricAccumulator()
    for lo, hi in ((0, 2), (2, 3), (3, 7)):
        acc.update(pred[lo:hi], true[lo:hi])
    batched, one_shot = acc.compute(), evaluate_forecast(pred, true)
    for key in ("mae", "rmse", "mape"):
        assert batched[key] == pytest.approx(one_shot[key])
        assert batched["unmasked"][key] == pytest.approx(one_shot["unmasked"][key])
        assert batched["step_mean"][key] == pytest.approx(one_shot["step_mean"][key])
        assert batched["per_horizon"][key] == pytest.approx(one_shot["per_horizon"][key])
    assert batched["n_windows"] == one_shot["n_windows"]


def test_accumulator_rejects_changed_horizon_and_empty(forecast):
    pred, true = forecast
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    acc.update(pred, true)
    with pytest.raises(ValueError, match="horizon changed"):
        acc.update(pred[:, :2], true[:, :2])
    with pytest.raises(ValueError, match="must match"):
        evaluate_forecast(pred[:, :2], true)


def test_torch_tensors_accepted(forecast):
    pred, true = forecast
    expected = evaluate_forecast(pred, true)
    got = evaluate_forecast(torch.tensor(pred, dtype=torch.float32), torch.tensor(true, dtype=torch.float32))
    assert got["mae"] == pytest.approx(expected["mae"], rel=1e-5)
    assert masked_mae(torch.tensor(pred).bfloat16(), torch.tensor(true).bfloat16()) == pytest.approx(
        expected["mae"], rel=0.05)


def test_nan_prediction_is_not_hidden_and_empty_step_is_skipped():
    true = np.ones((2, 3, 1, 1))
    pred = np.ones((2, 3, 1, 1))
    pred[0, 1] = np.nan
    assert math.isnan(evaluate_forecast(pred, true)["mae"])
    true[:, 2] = 0.0  # step 2 has nothing to score
    pred = np.full_like(true, 3.0)
    out = evaluate_forecast(pred, true)
    assert math.isnan(out["per_horizon"]["mae"][2])
    assert out["mae"] == pytest.approx(2.0) and out["step_mean"]["mae"] == pytest.approx(2.0)


def test_format_table_lists_every_row(forecast):
    rows = {"last": evaluate_forecast(*forecast), "zero": evaluate_forecast(np.zeros_like(forecast[0]), forecast[1])}
    text = format_table(rows)
    lines = text.splitlines()
    assert "MAE" in lines[0] and "RMSE" in lines[0] and "MAPE" in lines[0]
    assert lines[2].startswith("last") and lines[3].startswith("zero")
    assert f"{rows['last']['mae']:.2f}" in lines[2]


def test_masked_error_sum_pools_to_masked_mae_over_chosen_entries():
    from stllm.metrics import masked_error_sum
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=(5, 3, 2)).astype(float)
    true[0, 0, 0] = np.nan
    pred = rng.normal(size=true.shape)
    where = rng.random((5, 3, 1)) < 0.5                                      # broadcast over the last axis
    total, n = masked_error_sum(pred, true, where)
    keep = np.isfinite(true) & (true != 0) & np.broadcast_to(where, true.shape)
    assert n == keep.sum() and np.isclose(total, np.abs(pred - true)[keep].sum())
    halves = [masked_error_sum(pred[i:i + 2], true[i:i + 2]) for i in (0, 2, 4)]   # pooled over batches
    assert np.isclose(sum(t for t, _ in halves) / sum(k for _, k in halves), masked_mae(pred, true))
