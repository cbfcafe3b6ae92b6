"""Simple forecasting baselines: last value, same time yesterday, same time last week, historical average, and the
same time averaged over the last four weeks.

A model that does not clearly beat the best of these has not learned the dataset (REFERENCE.md).

Every function takes a `CityData`, window starts `starts` [b] (index of each window's FIRST TARGET step: the target is
`values[s : s + t_out]`) and `t_out`, and returns predictions [b, t_out, n, c] float32 on the original scale.
Only values before `s` are ever read, so no baseline sees its own target.

Seasonal naive with lag L predicts step s + h from `values[s + h - L]`; when t_out > L that would be a target step,
so the last season before the window is repeated instead: reference = s - L + (h mod L).

Missing references (NaN, or before t = 0; or, for the historical average, a time-of-week slot never observed in the
training part) fall back to the last value observed before the window, and when nothing was observed before the
window, to the mean of that node and channel over the training part `[0, train_end)` (if the node has no training
value: the channel's training mean over all nodes, else 0). `train_end=None` means the whole series — pass it
whenever the series contains the test period.

`missing="skip"` instead leaves NaN at such positions, and `run_baselines` then scores each baseline only where it
made a prediction. That is how REFERENCE.md's independent numpy figures were computed: on Beijing PM2.5 (2% missing)
"skip" gives its 31.08 / 57.55 / 75.56 / 59.64 exactly, "fallback" 31.21 / 57.06 / 74.65 / 59.64. On data without
gaps the two agree whenever every reference lies at t >= 0.

A baseline the history cannot support is reported as missing, never replaced by another one: `run_baselines` gives
it metrics of None (format_table prints "n/a") and a reason under "missing", e.g. "needs 168 steps of history before
the first window, has 40". A seasonal naive with lag L needs L steps before the first window (last value 1, same
time yesterday one day, same time last week one week); the historical average needs a whole week of training data
(`train_end` >= one week of steps), so that every time-of-week slot had a chance to be seen. The fallbacks above
only fill single missing references of a baseline that the history does support. The four-week average
(`last_4_weeks`: the mean of the same time one, two, three and four weeks earlier, over those observed) needs four
weeks of history before the first window; it follows a city whose level drifts (NYC taxi in 2020) where the
training-part average cannot. The single functions
(`same_time_last_week(...)`) still return the fallback forecast; the check is the scoreboard's.
"""
from __future__ import annotations

import numpy as np

from stllm.data.city import CityData
from stllm.metrics import MetricAccumulator

BASELINES = ("last", "same_time_yesterday", "same_time_last_week", "historical_average", "last_4_weeks")
WEEKS = 4   # last_4_weeks: how many weeks back it averages


# ---- helpers ------------------------------------------------------------------------------------------------------
def _check_starts(city: CityData, starts, t_out: int, need_target: bool = False) -> np.ndarray:
    starts = np.asarray(starts)
    if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer):
        raise ValueError(f"starts must be a 1-D integer array of window starts, got {starts.dtype} {starts.shape}")
    if t_out < 1:
        raise ValueError(f"t_out must be >= 1, got {t_out}")
    stop = city.n_steps - (t_out if need_target else 0)
    if len(starts) and (starts.min() < 0 or starts.max() > stop):
        raise ValueError(f"{city.name}: window starts must lie in [0, {stop}] (T={city.n_steps}, t_out={t_out}), "
                         f"got [{starts.min()}, {starts.max()}]")
    return starts.astype(np.int64)


def _train_mean(values: np.ndarray, train_end: int | None) -> np.ndarray:
    """[N, C] NaN-aware mean over values[:train_end]; node without data -> channel mean; channel without data -> 0."""
    part = values if train_end is None else values[:train_end]
    obs = ~np.isnan(part)
    sums, counts = np.where(obs, part, 0.0).sum(0, dtype=np.float64), obs.sum(0)  # [N, C]
    node_mean = sums / np.maximum(counts, 1)
    chan_mean = sums.sum(0) / np.maximum(counts.sum(0), 1)  # [C]; 0 where the channel has no data at all
    return np.where(counts > 0, node_mean, chan_mean[None, :]).astype(np.float32)


def _fallback_table(values: np.ndarray, train_end: int | None) -> np.ndarray:
    """[T + 1, N, C]: row s is what a window starting at s falls back to — the last value observed before s,
    or the training mean where nothing was observed yet (row 0 is the training mean)."""
    mean = _train_mean(values, train_end)
    obs = ~np.isnan(values)
    if obs.all():
        return np.concatenate([mean[None], values], axis=0)
    t = values.shape[0]
    last = np.where(obs, np.arange(t, dtype=np.int32)[:, None, None], np.int32(-1))  # [T, N, C] own index if seen
    np.maximum.accumulate(last, axis=0, out=last)  # index of the last observed value at or before t
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=0)
    filled = np.where(last >= 0, filled, mean[None])
    return np.concatenate([mean[None], filled], axis=0).astype(np.float32)


def _fallback_or_none(values: np.ndarray, train_end: int | None, missing: str) -> np.ndarray | None:
    if missing not in ("fallback", "skip"):
        raise ValueError(f"missing must be 'fallback' or 'skip', got {missing!r}")
    return _fallback_table(values, train_end) if missing == "fallback" else None


def _lookup(values: np.ndarray, ref: np.ndarray, fallback: np.ndarray | None, starts: np.ndarray) -> np.ndarray:
    """values[ref] [b, t_out, N, C], with fallback[starts] (NaN if fallback is None) where ref < 0 or value is NaN."""
    pred = values[np.maximum(ref, 0)]  # [b, t_out, N, C]
    bad = np.isnan(pred) | (ref < 0)[:, :, None, None]
    if bad.any():
        pred = np.where(bad, np.nan if fallback is None else fallback[starts][:, None], pred)
    return pred.astype(np.float32, copy=False)


def _seasonal_naive(city: CityData, starts: np.ndarray, t_out: int, lag: int,
                    fallback: np.ndarray | None) -> np.ndarray:
    h = np.arange(t_out)
    ref = starts[:, None] - lag + (h % lag)[None, :]  # [b, t_out], always < s
    return _lookup(city.values, ref, fallback, starts)


def _weeks_average(city: CityData, starts: np.ndarray, t_out: int, fallback: np.ndarray | None,
                   weeks: int = WEEKS) -> np.ndarray:
    """[b, t_out, N, C]: the mean of the same time 1..weeks weeks earlier, over the observed ones; where none is
    observed, the fallback (NaN without one)."""
    refs = np.stack([_seasonal_naive(city, starts, t_out, k * 7 * city.steps_per_day, None)
                     for k in range(1, weeks + 1)])                               # [weeks, b, t_out, N, C]
    seen = ~np.isnan(refs)
    count = seen.sum(0)
    with np.errstate(invalid="ignore"):
        mean = np.where(seen, refs, 0.0).sum(0) / count
    if fallback is not None:
        mean = np.where(count > 0, mean, fallback[starts][:, None])
    return mean.astype(np.float32)


def _time_of_week_slot(city: CityData, index: np.ndarray) -> np.ndarray:
    """Slot day_of_week * steps_per_day + step_of_day (Monday = 0) of step `index` (any int array, may run
    past the data: the timestamp grid is extended by `interval`)."""
    day_ns, step_ns = 86_400 * 10**9, city.interval.value
    t0 = city.timestamps[0].astype("datetime64[ns]").astype(np.int64)
    ns = t0 + np.asarray(index, dtype=np.int64) * step_ns
    days = ns // day_ns
    dow = (days + 3) % 7  # 1970-01-01 was a Thursday
    step = np.minimum((ns - days * day_ns) // step_ns, city.steps_per_day - 1)
    return dow * city.steps_per_day + step


def _slot_table(city: CityData, train_end: int) -> np.ndarray:
    """[7 * steps_per_day, N, C] NaN-aware mean per time-of-week slot over values[:train_end]; NaN if never seen."""
    part = city.values[:train_end]
    slots = _time_of_week_slot(city, np.arange(part.shape[0]))
    obs = ~np.isnan(part)
    n_slots = 7 * city.steps_per_day
    sums = np.zeros((n_slots, *part.shape[1:]))
    counts = np.zeros((n_slots, *part.shape[1:]))
    np.add.at(sums, slots, np.where(obs, part, 0.0))
    np.add.at(counts, slots, obs)
    with np.errstate(invalid="ignore"):
        return (sums / counts).astype(np.float32)  # NaN where counts == 0


# ---- public baselines ---------------------------------------------------------------------------------------------
def last_value(city: CityData, starts, t_out: int, train_end: int | None = None,
               missing: str = "fallback") -> np.ndarray:
    """Repeat values[s - 1] (the last observed value before s if that one is missing). [b, t_out, n, c]."""
    starts = _check_starts(city, starts, t_out)
    return _seasonal_naive(city, starts, t_out, 1, _fallback_or_none(city.values, train_end, missing))


def same_time_yesterday(city: CityData, starts, t_out: int, train_end: int | None = None,
                        missing: str = "fallback") -> np.ndarray:
    """values[s + h - steps_per_day] for h in 0..t_out-1. [b, t_out, n, c]."""
    starts = _check_starts(city, starts, t_out)
    fallback = _fallback_or_none(city.values, train_end, missing)
    return _seasonal_naive(city, starts, t_out, city.steps_per_day, fallback)


def same_time_last_week(city: CityData, starts, t_out: int, train_end: int | None = None,
                        missing: str = "fallback") -> np.ndarray:
    """values[s + h - 7 * steps_per_day] for h in 0..t_out-1. [b, t_out, n, c]."""
    starts = _check_starts(city, starts, t_out)
    fallback = _fallback_or_none(city.values, train_end, missing)
    return _seasonal_naive(city, starts, t_out, 7 * city.steps_per_day, fallback)


def last_4_weeks(city: CityData, starts, t_out: int, train_end: int | None = None,
                 missing: str = "fallback") -> np.ndarray:
    """The mean of values[s + h - k * 7 * steps_per_day] for k = 1..4, over the observed ones. [b, t_out, n, c]."""
    starts = _check_starts(city, starts, t_out)
    return _weeks_average(city, starts, t_out, _fallback_or_none(city.values, train_end, missing))


def historical_average(city: CityData, starts, t_out: int, train_end: int, missing: str = "fallback") -> np.ndarray:
    """Mean of the training part [0, train_end) at the target's time-of-week slot
    (day_of_week * steps_per_day + step_of_day, from city.timestamps). [b, t_out, n, c]."""
    starts = _check_starts(city, starts, t_out)
    return _historical_average(city, starts, t_out, _slot_table(city, train_end),
                               _fallback_or_none(city.values, train_end, missing))


def _historical_average(city: CityData, starts: np.ndarray, t_out: int, table: np.ndarray,
                        fallback: np.ndarray | None) -> np.ndarray:
    slots = _time_of_week_slot(city, starts[:, None] + np.arange(t_out)[None, :])  # [b, t_out]
    return _lookup(table, slots, fallback, starts)


def run_baselines(city: CityData, starts, t_out: int, train_end: int, batch_size: int = 512,
                  missing: str = "fallback") -> dict[str, dict]:
    """Evaluate every baseline on the windows `starts` against values[s : s + t_out].

    Returns {name: evaluate_forecast dict} for names in BASELINES. Works in batches of windows, so memory stays
    at a few [batch_size, t_out, n, c] arrays. missing="skip": positions a baseline has no reference for are left
    out of that baseline's metrics. A baseline the history cannot support gets `unsupported(reason)` instead.
    """
    starts = _check_starts(city, starts, t_out, need_target=True)
    if len(starts) == 0:
        raise ValueError(f"{city.name}: no windows to evaluate (starts is empty)")
    fallback = _fallback_or_none(city.values, train_end, missing)
    table = _slot_table(city, train_end)
    spd = city.steps_per_day
    predictors = {
        "last": lambda s: _seasonal_naive(city, s, t_out, 1, fallback),
        "same_time_yesterday": lambda s: _seasonal_naive(city, s, t_out, spd, fallback),
        "same_time_last_week": lambda s: _seasonal_naive(city, s, t_out, 7 * spd, fallback),
        "historical_average": lambda s: _historical_average(city, s, t_out, table, fallback),
        "last_4_weeks": lambda s: _weeks_average(city, s, t_out, fallback),
    }
    reasons = _unsupported(city, starts, train_end)
    predictors = {name: f for name, f in predictors.items() if name not in reasons}
    accs = {name: MetricAccumulator() for name in predictors}
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        true = city.values[s[:, None] + np.arange(t_out)[None, :]]  # [b, t_out, n, c]
        for name, predict in predictors.items():
            pred = predict(s)
            accs[name].update(pred, np.where(np.isnan(pred), np.nan, true))  # skip: unpredicted = unscored
    return {name: unsupported(reasons[name]) if name in reasons else accs[name].compute() for name in BASELINES}


def unsupported(reason: str) -> dict:
    """The metrics dict of a baseline that could not be computed: every figure None, and why under "missing"."""
    blank = {"mae": None, "rmse": None, "mape": None}
    return {**blank, "per_horizon": dict(blank), "unmasked": dict(blank), "step_mean": dict(blank),
            "n_windows": 0, "missing": reason}


def _unsupported(city: CityData, starts: np.ndarray, train_end: int | None) -> dict[str, str]:
    """{baseline: reason} for the baselines whose reference history does not exist for these windows."""
    spd, first = city.steps_per_day, int(starts.min())
    reasons = {name: f"needs {lag} steps of history before the first window, has {first}"
               for name, lag in (("last", 1), ("same_time_yesterday", spd), ("same_time_last_week", 7 * spd),
                                 ("last_4_weeks", WEEKS * 7 * spd))
               if first < lag}
    trained = city.n_steps if train_end is None else min(int(train_end), city.n_steps)
    if trained < 7 * spd:
        reasons["historical_average"] = (f"needs {7 * spd} steps of training data (one week, for every time-of-week "
                                         f"slot), has {trained}")
    return reasons
