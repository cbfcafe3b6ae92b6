"""Event classification (e.g. crime occurrence): metrics and baselines. numpy, vectorised.

Targets are binary: "at least one event of category k in cell n at step t", i.e. `counts > 0` (labels 0/1 work
too). Predictions are probabilities (or 0/1 decisions) compared with a threshold: `prob >= threshold` is an event.
Pass probabilities, i.e. sigmoid(logits), not logits. Arrays are `[b, t_out, N, K]` (horizon on axis 1, categories
last; every other axis is pooled). NaN targets are not scored; a NaN prediction at a scored target makes that
category's figures NaN (as in `stllm.metrics`: a broken model must show).

Per category k, with TP, FP, FN, TN pooled over windows, horizon steps and cells:
    recall_k = TP / (TP + FN)      precision_k = TP / (TP + FP)      f1_k = 2 TP / (2 TP + FP + FN)
A ratio with a zero denominator is 0 (sklearn's zero_division=0): a category with no event in the scored data has
recall = F1 = 0 and still counts in every average below; `positives` in its entry shows when that happens.

Averages (keys of `classification_metrics`):
    recall, precision   mean over categories of recall_k / precision_k
    macro_f1            mean over categories of f1_k (the standard macro-F1 over the K event types)
    micro_f1            2 ΣTP / (2 ΣTP + ΣFP + ΣFN), counts summed over categories (the standard micro-F1)
    urbangpt_macro_f1   mean over categories of (f1_k + f1_neg_k) / 2, where f1_neg_k is the F1 of the
                        "no event" class, 2 TN / (2 TN + FN + FP)
    accuracy            (ΣTP + ΣTN) / scored
Which papers use which. UrbanGPT (HKUDS/UrbanGPT, metric_calculation/result_test.py, `test_classfication`) scores
each crime category on its own: labels `y_true > 1 -> 1`, predictions `>= 0.5 -> 1`, everything flattened, then
sklearn `recall_score(y, p)` (the event class) and `f1_score(y, p, average='macro')`, i.e. the mean of the F1 of
the two classes {no event, event}; its "MicroF1" (`average='micro'`) is the accuracy. Those are each category's
`recall` and `urbangpt_macro_f1` here, and UrbanGPT's tables report them per category. ST-SHN (akaxlh/ST-SHN,
HG_ST_labcode.py, `testEpoch`) names the two standard averages the other way round: its "microF1" is the mean of
the per-category F1 (`macro_f1` here) and its "macroF1" is the pooled F1 (`micro_f1` here); it also scores only the
(cell, category) pairs whose training event rate lies in (0.2, 0.8) (`st_shn_eval_mask`). STHSL's released code
(LZH-YS1998/STHSL) trains and evaluates the crime counts by regression (MAE / MAPE) only.

Baselines take a CityData, window starts `starts` [b] (index of each window's first target step) and `t_out`, and
return 0/1 decisions [b, t_out, N, K] float32; they read only steps before `s` (or the training part).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from stllm.data.city import CityData
from stllm.metrics import to_numpy

ST_SHN_RATE_RANGE = (0.2, 0.8)  # ST-SHN scores a (cell, category) only when its training event rate is inside


# ---- metrics ------------------------------------------------------------------------------------------------------
class EventAccumulator:
    """Confusion counts per horizon step and category, accumulated over batches.

    acc = EventAccumulator(categories); for prob, counts in batches: acc.update(prob, counts); acc.compute() -> dict
    (keys as in `classification_metrics`). `threshold`: one float, or one per category [K].
    """

    _STATS = ("tp", "fp", "fn", "tn", "nan")

    def __init__(self, categories: Sequence[str] | None = None, threshold: float | Sequence[float] = 0.5) -> None:
        self.categories = None if categories is None else [str(c) for c in categories]
        self.threshold = np.asarray(threshold, dtype=np.float64)
        if self.threshold.ndim > 1:
            raise ValueError(f"threshold must be a float or one float per category, got shape {self.threshold.shape}")
        self.t_out: int | None = None
        self.n_windows = 0
        self._sums: dict[str, np.ndarray] = {}

    def update(self, prob: Any, counts: Any, mask: Any = None) -> None:
        """prob, counts: [b, t_out, ..., K]; mask: optional bool, broadcastable to them, True = scored."""
        prob, counts = to_numpy(prob), to_numpy(counts)
        if prob.shape != counts.shape:
            raise ValueError(f"predictions have shape {prob.shape}, targets {counts.shape}; they must match")
        if prob.ndim < 3:
            raise ValueError(f"predictions/targets need shape [b, t_out, ..., K], got {prob.shape}")
        t_out, k = prob.shape[1], prob.shape[-1]
        if self.t_out is None:
            self._start(t_out, k)
        elif t_out != self.t_out or k != self._sums["tp"].shape[1]:
            raise ValueError(f"[t_out, K] changed between batches: {list(self._sums['tp'].shape)} then {[t_out, k]}")
        scored = ~np.isnan(counts)
        if mask is not None:
            scored &= np.broadcast_to(np.asarray(to_numpy(mask), dtype=bool), prob.shape)
        event = counts > 0
        with np.errstate(invalid="ignore"):
            pred = prob >= self.threshold  # threshold broadcasts over the category axis
        nan = np.isnan(prob)
        pred, nan = pred & ~nan, nan & scored
        axes = tuple(range(prob.ndim))[2:-1] + (0,)  # pool all but horizon and category
        s = self._sums
        s["tp"] += (pred & event & scored).sum(axis=axes)
        s["fp"] += (pred & ~event & scored).sum(axis=axes)
        s["fn"] += (~pred & event & scored).sum(axis=axes)
        s["tn"] += (~pred & ~event & scored).sum(axis=axes)
        s["nan"] += nan.sum(axis=axes)
        self.n_windows += prob.shape[0]

    def _start(self, t_out: int, k: int) -> None:
        if self.categories is not None and len(self.categories) != k:
            raise ValueError(f"{len(self.categories)} category names for {k} categories")
        if self.threshold.ndim == 1 and len(self.threshold) != k:
            raise ValueError(f"{len(self.threshold)} thresholds for {k} categories")
        self.t_out = t_out
        self._sums = {name: np.zeros((t_out, k), dtype=np.int64) for name in self._STATS}

    def compute(self) -> dict:
        """Plain-Python dict (json.dumps works; NaN where a prediction was NaN):

          recall, precision, macro_f1, micro_f1, urbangpt_macro_f1, accuracy   see the module docstring
          per_category   {name: {recall, precision, f1, urbangpt_macro_f1, accuracy, positives, predicted, scored}}
          per_horizon    {recall, macro_f1, micro_f1, urbangpt_macro_f1: [t_out floats]}
          threshold      float or [K] floats;  n_windows   int
        """
        if self.t_out is None:
            raise ValueError("EventAccumulator.compute() called before any update()")
        s = self._sums
        pooled = {name: v.sum(axis=0) for name, v in s.items()}  # [K]
        out = _summary({name: v[None] for name, v in pooled.items()})  # one "step" holding all steps
        out = {name: float(v[0]) for name, v in out.items()}
        steps = _summary(s)
        cats = self.categories or [str(i) for i in range(len(pooled["tp"]))]
        per_cat = _per_category(pooled)
        out["per_category"] = {name: {key: val[i] for key, val in per_cat.items()} for i, name in enumerate(cats)}
        out["per_horizon"] = {key: [float(x) for x in steps[key]]
                              for key in ("recall", "macro_f1", "micro_f1", "urbangpt_macro_f1")}
        out["threshold"] = self.threshold.tolist()
        out["n_windows"] = int(self.n_windows)
        return out


def classification_metrics(prob_or_pred: Any, counts_or_labels: Any, threshold: float | Sequence[float] = 0.5,
                           categories: Sequence[str] | None = None, mask: Any = None) -> dict:
    """Event metrics of probabilities (or 0/1 decisions) against counts (or 0/1 labels), both [b, t_out, N, K].

    `categories` names the K per-category entries (default "0", "1", ...); `mask` (bool, broadcastable, True =
    scored) restricts the scored positions, e.g. to `st_shn_eval_mask`. Keys: see `EventAccumulator.compute`.
    """
    acc = EventAccumulator(categories, threshold)
    acc.update(prob_or_pred, counts_or_labels, mask)
    return acc.compute()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (sklearn's zero_division=0)."""
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def _per_category(s: dict[str, np.ndarray]) -> dict[str, list]:
    """Per-category figures [..., K] from confusion counts [..., K]; NaN where a prediction was NaN."""
    tp, fp, fn, tn = (s[k].astype(np.float64) for k in ("tp", "fp", "fn", "tn"))
    f1, f1_neg = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)
    broken = s["nan"] > 0
    nan_if = lambda x: np.where(broken, np.nan, x)
    figures = {"recall": nan_if(_ratio(tp, tp + fn)), "precision": nan_if(_ratio(tp, tp + fp)), "f1": nan_if(f1),
               "urbangpt_macro_f1": nan_if((f1 + f1_neg) / 2), "accuracy": nan_if(_ratio(tp + tn, tp + fp + fn + tn))}
    out = {k: [float(x) for x in np.ravel(v)] for k, v in figures.items()}
    out.update(positives=[int(x) for x in np.ravel(tp + fn)], predicted=[int(x) for x in np.ravel(tp + fp)],
               scored=[int(x) for x in np.ravel(tp + fp + fn + tn)])
    return out


def _summary(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Averages per row of confusion counts [steps, K] -> {name: [steps]}."""
    tp, fp, fn, tn = (s[k].astype(np.float64) for k in ("tp", "fp", "fn", "tn"))
    broken = (s["nan"] > 0).any(axis=1)
    f1, f1_neg = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)
    stp, sfp, sfn, stn = tp.sum(1), fp.sum(1), fn.sum(1), tn.sum(1)
    figures = {"recall": _ratio(tp, tp + fn).mean(1), "precision": _ratio(tp, tp + fp).mean(1),
               "macro_f1": f1.mean(1), "micro_f1": _ratio(2 * stp, 2 * stp + sfp + sfn),
               "urbangpt_macro_f1": ((f1 + f1_neg) / 2).mean(1),
               "accuracy": _ratio(stp + stn, stp + sfp + sfn + stn)}
    return {k: np.where(broken, np.nan, v) for k, v in figures.items()}


# ---- baselines ----------------------------------------------------------------------------------------------------
def event_rates(city: CityData, train_end: int) -> np.ndarray:
    """[N, K] fraction of the training steps [0, train_end) with an event (missing steps left out; 0 if none seen)."""
    part = city.values[:train_end]
    obs = ~np.isnan(part)
    return _ratio((part > 0).sum(0), obs.sum(0))


def st_shn_eval_mask(city: CityData, train_end: int, rate_range: tuple[float, float] = ST_SHN_RATE_RANGE
                     ) -> np.ndarray:
    """[N, K] bool: the (cell, category) pairs ST-SHN scores, training event rate strictly inside `rate_range`."""
    rates = event_rates(city, train_end)
    return (rates > rate_range[0]) & (rates < rate_range[1])


def previous_day(city: CityData, starts, t_out: int) -> np.ndarray:
    """The event indicator of step s - 1 (the day before the window, for daily data), repeated over the horizon.

    [b, t_out, N, K] float32 of 0/1; a missing count at s - 1 counts as "no event".
    """
    starts = _check_starts(city, starts, t_out, first=1)
    last = np.nan_to_num(city.values[starts - 1]) > 0                       # [b, N, K]
    return np.repeat(last[:, None], t_out, axis=1).astype(np.float32)     # [b, t_out, N, K]


def fit_rate_thresholds(city: CityData, train_end: int) -> np.ndarray:
    """[K] per category, the rate threshold θ for which "event where rate >= θ" has the best F1 on the training part.

    In-sample: each cell's rate, computed on [0, train_end), predicts every training day of that cell, so a cell
    with P positive days out of D observed adds P true and D - P false positives when predicted. Candidates are the
    cells' positive rates (ties kept together), searched exactly through cumulative sums over cells sorted by rate.
    A category without any training event gets θ = 1, which no cell reaches (it is never predicted).
    """
    part = city.values[:train_end]
    pos, obs = (part > 0).sum(0).astype(np.float64), (~np.isnan(part)).sum(0).astype(np.float64)  # [N, K]
    rates = _ratio(pos, obs)
    order = np.argsort(-rates, axis=0, kind="stable")
    r, p, o = (np.take_along_axis(x, order, axis=0) for x in (rates, pos, obs))  # sorted by rate, descending
    tp, predicted = np.cumsum(p, axis=0), np.cumsum(o, axis=0)                  # predicting the top j+1 cells
    f1 = _ratio(2 * tp, predicted + pos.sum(0))                                  # 2TP / (2TP + FP + FN)
    end_of_tie = np.ones_like(r, dtype=bool)
    end_of_tie[:-1] = r[:-1] != r[1:]
    f1 = np.where(end_of_tie & (r > 0), f1, -1.0)
    best = np.argmax(f1, axis=0)                                                 # first max = highest threshold
    theta = r[best, np.arange(r.shape[1])]
    return np.where(pos.sum(0) > 0, theta, 1.0)


def historical_rate(city: CityData, starts, t_out: int, train_end: int,
                    threshold: float | Sequence[float] | str = 0.5) -> np.ndarray:
    """Predict an event where the cell's training event rate (`event_rates`) is >= threshold, every day.

    threshold: a float, one per category [K], or "f1" for `fit_rate_thresholds`. [b, t_out, N, K] float32 0/1.
    """
    starts = _check_starts(city, starts, t_out)
    decision = _rate_decision(city, train_end, threshold)                   # [N, K]
    return np.broadcast_to(decision, (len(starts), t_out, *decision.shape)).astype(np.float32)


def _rate_decision(city: CityData, train_end: int, threshold: float | Sequence[float] | str) -> np.ndarray:
    if isinstance(threshold, str):
        if threshold != "f1":
            raise ValueError(f"threshold must be a number, one per category, or 'f1'; got {threshold!r}")
        threshold = fit_rate_thresholds(city, train_end)
    return event_rates(city, train_end) >= np.asarray(threshold, dtype=np.float64)


def run_event_baselines(city: CityData, starts, t_out: int, train_end: int,
                        categories: Sequence[str] | None = None, mask: Any = None,
                        batch_size: int = 512) -> dict[str, dict]:
    """Score every baseline on the windows `starts` against the events of steps s .. s + t_out - 1.

    Returns {name: classification_metrics dict} for
      previous_day           the indicator of step s - 1, repeated
      historical_rate        training event rate >= 0.5
      historical_rate_f1     training event rate >= the per-category threshold of `fit_rate_thresholds`; its
                             entry also holds `rate_thresholds` {category: θ}
    `categories` defaults to city.channels; `mask` ([N, K] or broadcastable to [b, t_out, N, K], True = scored),
    e.g. `st_shn_eval_mask(city, train_end)` for ST-SHN's protocol.
    """
    starts = _check_starts(city, starts, t_out, last=city.n_steps - t_out)
    if len(starts) == 0:
        raise ValueError(f"{city.name}: no windows to evaluate (starts is empty)")
    categories = list(city.channels if categories is None else categories)
    thresholds = fit_rate_thresholds(city, train_end)
    rate_half, rate_f1 = _rate_decision(city, train_end, 0.5), _rate_decision(city, train_end, thresholds)
    predictors = {
        "previous_day": lambda s: previous_day(city, s, t_out),
        "historical_rate": lambda s: np.broadcast_to(rate_half, (len(s), t_out, *rate_half.shape)),
        "historical_rate_f1": lambda s: np.broadcast_to(rate_f1, (len(s), t_out, *rate_f1.shape)),
    }
    accs = {name: EventAccumulator(categories) for name in predictors}
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        true = city.values[s[:, None] + np.arange(t_out)[None, :]]  # [b, t_out, N, K]
        for name, predict in predictors.items():
            accs[name].update(predict(s).astype(np.float32), true, mask)
    out = {name: acc.compute() for name, acc in accs.items()}
    out["historical_rate_f1"]["rate_thresholds"] = {c: float(t) for c, t in zip(categories, thresholds)}
    return out


def _check_starts(city: CityData, starts, t_out: int, first: int = 0, last: int | None = None) -> np.ndarray:
    starts = np.asarray(starts)
    if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer):
        raise ValueError(f"starts must be a 1-D integer array of window starts, got {starts.dtype} {starts.shape}")
    if t_out < 1:
        raise ValueError(f"t_out must be >= 1, got {t_out}")
    last = city.n_steps if last is None else last
    if len(starts) and (starts.min() < first or starts.max() > last):
        raise ValueError(f"{city.name}: window starts must lie in [{first}, {last}] (T={city.n_steps}, "
                         f"t_out={t_out}), got [{starts.min()}, {starts.max()}]")
    return starts.astype(np.int64)


# ---- reporting ----------------------------------------------------------------------------------------------------
def format_event_table(rows: dict[str, dict]) -> str:
    """Plain-text table: one row per name, averaged figures then each category's recall / F1."""
    first = next(iter(rows.values()))
    cats = list(first["per_category"])
    header = ["name", "Recall", "Precision", "Macro-F1", "Micro-F1", "UrbanGPT-MaF1",
              *[f"{c} R/F1" for c in cats]]
    lines = [[str(name), *(f"{m[k]:.4f}" for k in ("recall", "precision", "macro_f1", "micro_f1",
                                                      "urbangpt_macro_f1")),
              *(f"{m['per_category'][c]['recall']:.3f}/{m['per_category'][c]['f1']:.3f}" for c in cats)]
             for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])
