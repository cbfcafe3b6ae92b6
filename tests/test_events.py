"""Event metrics against an explicit-loop reference, event baselines on hand-made data, the classification head."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stllm.data import CityData
from stllm.events import (EventAccumulator, classification_metrics, event_rates, fit_rate_thresholds,
                          format_event_table, historical_rate, previous_day, run_event_baselines, st_shn_eval_mask)
from stllm.nn.classification import ClassificationHead, event_loss, positive_weight


# ---- reference: confusion counts by explicit loops, formulas written out --------------------------------------
def div(a: float, b: float) -> float:
    return a / b if b else 0.0


def reference(prob: np.ndarray, counts: np.ndarray, threshold, mask=None) -> dict:
    """Per category k: tp/fp/fn/tn over every element, then recall, precision, F1, F1 of the negative class."""
    b, t, n, k = prob.shape
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), (k,))
    mask = np.ones(prob.shape, bool) if mask is None else np.broadcast_to(mask, prob.shape)
    cm = np.zeros((k, 4))  # tp, fp, fn, tn
    for idx in np.ndindex(b, t, n, k):
        if np.isnan(counts[idx]) or not mask[idx]:
            continue
        y, p = counts[idx] > 0, prob[idx] >= thr[idx[3]]
        cm[idx[3], [y and p, p and not y, y and not p, not y and not p].index(True)] += 1
    cats = []
    for tp, fp, fn, tn in cm:
        f1, f1n = div(2 * tp, 2 * tp + fp + fn), div(2 * tn, 2 * tn + fn + fp)
        cats.append({"recall": div(tp, tp + fn), "precision": div(tp, tp + fp), "f1": f1,
                     "urbangpt_macro_f1": (f1 + f1n) / 2, "accuracy": div(tp + tn, tp + fp + fn + tn),
                     "positives": tp + fn})
    tp, fp, fn, tn = cm.sum(0)
    return {"per_category": cats,
            "recall": np.mean([c["recall"] for c in cats]), "precision": np.mean([c["precision"] for c in cats]),
            "macro_f1": np.mean([c["f1"] for c in cats]), "micro_f1": div(2 * tp, 2 * tp + fp + fn),
            "urbangpt_macro_f1": np.mean([c["urbangpt_macro_f1"] for c in cats]),
            "accuracy": div(tp + tn, tp + fp + fn + tn)}


def assert_matches(got: dict, ref: dict, names) -> None:
    for key in ("recall", "precision", "macro_f1", "micro_f1", "urbangpt_macro_f1", "accuracy"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    for name, cat in zip(names, ref["per_category"]):
        for key, value in cat.items():
            assert got["per_category"][name][key] == pytest.approx(value, abs=1e-12), (name, key)


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    counts = rng.poisson([0.2, 0.6, 1.5], (6, 3, 5, 3)).astype(float)   # [b, t_out, N, K], rates differ by category
    prob = rng.random(counts.shape)
    return prob, counts


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_metrics_match_reference(sample):
    prob, counts = sample
    names = ["burglary", "robbery", "theft"]
    got = classification_metrics(prob, counts, categories=names)
    assert_matches(got, reference(prob, counts, 0.5), names)
    assert list(got["per_category"]) == names
    assert got["n_windows"] == 6 and got["threshold"] == 0.5
    json.dumps(got)  # plain Python types only
    # per-category thresholds and a mask (e.g. only some cells scored)
    thr, mask = [0.3, 0.5, 0.8], np.array([True, False, True, True, False])[:, None]  # [N, 1]
    got = classification_metrics(prob, counts, threshold=thr, categories=names, mask=mask)
    assert_matches(got, reference(prob, counts, thr, mask), names)
    assert got["threshold"] == thr


def test_labels_and_decisions_work_like_counts_and_probabilities(sample):
    prob, counts = sample
    a = classification_metrics(prob, counts)
    b = classification_metrics((prob >= 0.5).astype(float), (counts > 0).astype(float))
    assert a == b


def test_per_horizon_and_streaming(sample):
    prob, counts = sample
    whole = classification_metrics(prob, counts)
    acc = EventAccumulator()
    for i in range(0, 6, 4):                                # uneven batches
        acc.update(torch.as_tensor(prob[i:i + 4]), counts[i:i + 4])   # torch tensors accepted
    assert acc.compute() == whole
    for h in range(3):
        step = reference(prob[:, h:h + 1], counts[:, h:h + 1], 0.5)
        for key in ("recall", "macro_f1", "micro_f1", "urbangpt_macro_f1"):
            assert whole["per_horizon"][key][h] == pytest.approx(step[key], abs=1e-12)


def test_category_without_events_counts_as_zero():
    counts = np.zeros((2, 1, 3, 2))
    counts[:, :, :, 0] = [[[1, 0, 2]], [[0, 0, 1]]]            # category 1 never happens
    prob = np.zeros_like(counts)
    prob[:, :, :, 0] = counts[:, :, :, 0] > 0                  # category 0 perfect, category 1: no event predicted
    got = classification_metrics(prob, counts, categories=["a", "b"])
    b = got["per_category"]["b"]
    assert (b["recall"], b["precision"], b["f1"], b["positives"], b["predicted"]) == (0.0, 0.0, 0.0, 0, 0)
    assert b["urbangpt_macro_f1"] == 0.5                       # (F1 event 0 + F1 no-event 1) / 2
    assert got["per_category"]["a"]["f1"] == 1.0
    assert got["macro_f1"] == 0.5                              # the empty category stays in the average
    assert got["micro_f1"] == 1.0


def test_nan_targets_skipped_nan_predictions_shown(sample):
    prob, counts = sample
    counts = counts.copy()
    counts[0, 0, 0, :] = np.nan
    got = classification_metrics(prob, counts)
    assert_matches(got, reference(prob, counts, 0.5), ["0", "1", "2"])
    prob = prob.copy()
    prob[1, 0, 0, 2] = np.nan
    got = classification_metrics(prob, counts)
    assert np.isnan(got["per_category"]["2"]["f1"]) and np.isnan(got["macro_f1"])
    assert got["per_category"]["0"]["f1"] == pytest.approx(reference(prob, counts, 0.5)["per_category"][0]["f1"])


def test_shape_errors(sample):
    prob, counts = sample
    with pytest.raises(ValueError, match="must match"):
        classification_metrics(prob, counts[:, :2])
    with pytest.raises(ValueError, match="category names"):
        classification_metrics(prob, counts, categories=["a"])
    with pytest.raises(ValueError, match="thresholds"):
        classification_metrics(prob, counts, threshold=[0.5, 0.5])


# ---- baselines -------------------------------------------------------------------------------------------------
def toy_city() -> CityData:
    """T=6 days, 3 cells, 3 categories; training part = the first 4 days.

    category 0: cells have events on 4, 2, 1 of the 4 training days (rates 1, .5, .25)
    category 1: 3, 1, 0 of 4 (rates .75, .25, 0);  category 2: no training event at all.
    """
    v = np.zeros((6, 3, 3))
    v[:4, 0, 0] = [1, 2, 1, 3]
    v[:4, 1, 0] = [0, 1, 0, 4]
    v[:4, 2, 0] = [0, 0, 1, 0]
    v[:4, 0, 1] = [1, 1, 0, 1]
    v[:4, 1, 1] = [0, 0, 2, 0]
    v[4] = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    v[5] = [[0, 0, 0], [1, 1, 0], [0, 0, 0]]
    return CityData(name="toy-crime", values=v, timestamps=pd.date_range("2020-01-01", periods=6, freq="D"),
                    interval="1D", channels=["a", "b", "c"], units=["events"] * 3,
                    nodes=pd.DataFrame({"id": ["r0c0", "r0c1", "r1c0"]}))


def test_previous_day():
    city = toy_city()
    pred = previous_day(city, np.array([4, 5]), t_out=2)
    assert pred.shape == (2, 2, 3, 3) and pred.dtype == np.float32
    np.testing.assert_array_equal(pred[0, 0], city.values[3] > 0)
    np.testing.assert_array_equal(pred[0, 1], city.values[3] > 0)    # repeated over the horizon
    np.testing.assert_array_equal(pred[1, 0], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="window starts"):
        previous_day(city, np.array([0]), t_out=1)                    # no day before the first


def test_rates_and_thresholds():
    city = toy_city()
    np.testing.assert_allclose(event_rates(city, 4), [[1, .75, 0], [.5, .25, 0], [.25, 0, 0]])
    # category 0: θ=1 -> F1 8/11, θ=.5 -> 12/15, θ=.25 -> 14/19; category 1: θ=.75 -> 6/8, θ=.25 -> 8/12
    np.testing.assert_allclose(fit_rate_thresholds(city, 4), [0.5, 0.75, 1.0])
    pred = historical_rate(city, np.array([4, 5]), t_out=1, train_end=4)
    np.testing.assert_array_equal(pred[0, 0], [[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(historical_rate(city, np.array([4]), 1, 4, threshold="f1")[0, 0],
                                  [[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(historical_rate(city, np.array([4]), 1, 4, threshold=[0.2, 0.2, 0.0])[0, 0],
                                  [[1, 1, 1], [1, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(st_shn_eval_mask(city, 4), [[0, 1, 0], [1, 1, 0], [1, 0, 0]])


def test_fit_rate_thresholds_brute_force():
    rng = np.random.default_rng(1)
    v = rng.poisson(rng.gamma(0.5, 1.0, (1, 12, 4)), (10, 12, 4)).astype(float)  # heterogeneous cells, ties likely
    v[:, :, 3] = (v[:, :, 3] > 0) * (np.arange(12) % 3 == 0)                       # many tied rates
    city = CityData(name="t", values=v, timestamps=pd.date_range("2020-01-01", periods=10, freq="D"),
                    interval="1D", channels=list("abcd"), units=["events"] * 4, nodes=pd.DataFrame({"id": range(12)}))
    got = fit_rate_thresholds(city, 8)
    rates = (v[:8] > 0).mean(0)
    for k in range(4):
        best, best_f1 = 1.0, -1.0
        for theta in sorted(set(rates[:, k][rates[:, k] > 0]), reverse=True):
            pred = np.broadcast_to(rates[:, k] >= theta, (8, 12))
            y = v[:8, :, k] > 0
            tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
            f1 = 2 * tp / (2 * tp + fp + fn)
            if f1 > best_f1 + 1e-12:
                best, best_f1 = theta, f1
        assert got[k] == pytest.approx(best), k


def test_run_event_baselines():
    city = toy_city()
    out = run_event_baselines(city, np.array([4, 5]), t_out=1, train_end=4)
    assert set(out) == {"previous_day", "historical_rate", "historical_rate_f1"}
    true = city.values[[4, 5]][:, None]
    expect = classification_metrics(previous_day(city, np.array([4, 5]), 1), true, categories=city.channels)
    assert out["previous_day"] == expect
    # historical rate >= .5 predicts cells {0, 1} for a, {0} for b, none for c on both days
    a = out["historical_rate"]["per_category"]["a"]
    assert (a["positives"], a["predicted"], a["recall"], a["precision"]) == (2, 4, 1.0, 0.5)
    assert out["historical_rate_f1"]["rate_thresholds"] == {"a": 0.5, "b": 0.75, "c": 1.0}
    masked = run_event_baselines(city, np.array([4, 5]), 1, 4, mask=st_shn_eval_mask(city, 4))
    assert masked["previous_day"]["per_category"]["a"]["scored"] == 4    # 2 days x cells 1, 2
    json.dumps(out)
    assert "previous_day" in format_event_table(out)
    with pytest.raises(ValueError, match="window starts"):
        run_event_baselines(city, np.array([5]), t_out=2, train_end=4)  # target past the end


# ---- head and loss ---------------------------------------------------------------------------------------------
def test_head_shapes_and_prior():
    torch.manual_seed(0)
    head = ClassificationHead(d_llm=16, n_tokens=2, t_out=3, n_categories=4, hidden=8)
    logits = head(torch.randn(2, 5, 2, 16), torch.randn(2, 5, 16))
    assert logits.shape == (2, 3, 5, 4)
    torch.nn.init.zeros_(head.w3.weight)
    head.set_prior([0.1, 0.2, 0.3, 0.4])
    prob = torch.sigmoid(head(torch.randn(2, 5, 2, 16), torch.randn(2, 5, 16)))
    torch.testing.assert_close(prob, torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(2, 3, 5, 4))


def test_event_loss_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 2)
    counts = torch.poisson(torch.full((2, 3, 4, 2), 0.5))
    counts[0, 0, 0, 0] = float("nan")
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None]        # [N, 1]: node 2 not scored
    pw = torch.tensor([3.0, 0.5])
    got = event_loss(logits, counts, mask=mask, pos_weight=pw)
    total, n = 0.0, 0
    for idx in np.ndindex(*logits.shape):
        c = counts[idx].item()
        if np.isnan(c) or idx[2] == 2:
            continue
        p, y = torch.sigmoid(logits[idx]).item(), float(c > 0)
        total += -(pw[idx[3]].item() * y * np.log(p) + (1 - y) * np.log(1 - p))
        n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)
    assert event_loss(logits, counts, mask=torch.zeros(4, 1)).item() == 0.0
    torch.testing.assert_close(positive_weight([0.2, 0.5]), torch.tensor([4.0, 1.0]))


def test_loss_decreases_when_fitting_a_tiny_batch():
    torch.manual_seed(0)
    head = ClassificationHead(d_llm=16, n_tokens=2, t_out=2, n_categories=3, hidden=16)
    h_his, h_pre = torch.randn(4, 5, 2, 16), torch.randn(4, 5, 16)
    counts = torch.poisson(torch.full((4, 2, 5, 3), 0.4))
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run ~100x slower with 2 threads on a busy 2-core machine
    try:
        for _ in range(12):
            opt.zero_grad()
            loss = event_loss(head(h_his, h_pre), counts, pos_weight=2.0)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
