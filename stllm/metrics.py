"""Forecast metrics on the original scale: masked and unmasked MAE, RMSE, MAPE, per horizon step and averaged.

Conventions (DESIGN.md, REFERENCE.md):
- Arrays are `[b, t_out, n, c]` (any array with the horizon on axis 1 works: every other axis is pooled).
  Torch tensors are accepted and converted to numpy.
- *Masked* metrics ignore targets that are NaN or equal to `null_value` (0 by default, as in the field's benchmarks:
  STAEformer, BasicTS, DCRNN's `masked_mae`). "Equal" means `|true - null_value| < NULL_ATOL` (1e-4), so a
  float32 round-trip of an integer count of 0 still counts as null. `null_value=None` (or NaN) masks only NaN.
- *Unmasked* metrics ignore only NaN targets (a target can't be scored when it doesn't exist). Zeros count.
- MAPE is a percentage. Its denominator can't be (near) zero, so every MAPE, masked or not, leaves out targets with
  `|true| < NULL_ATOL`. Hence unmasked MAPE equals masked MAPE whenever `null_value == 0`; it only differs for
  another `null_value`. The unmasked figure the field reports is MAE/RMSE; MAPE is kept for completeness.
- NaN *predictions* at a scored target are not hidden: they make the metric NaN, so a broken model shows.

Averaging over the horizon. The headline `mae`, `rmse`, `mape` of `evaluate_forecast` pool every scored target of
every horizon step (sum of errors / number of scored targets), as STAEformer's and BasicTS's test loops do; this is
what "averaged over the 12 steps" means in REFERENCE.md: its baseline table is reproduced to the printed decimals
only this way (e.g. NYC taxi "last value": pooled 26.405 -> 26.41, mean of per-step MAEs 26.404 -> 26.40; Beijing
31.081 vs 31.103). The per-step figures are in `per_horizon`, and their equal-weight mean in `step_mean`. The two
averages agree for MAE and MAPE when every step has the same number of scored targets; for RMSE the mean of
per-step RMSEs is <= the pooled RMSE (Jensen).
"""
from __future__ import annotations

from typing import Any

import numpy as np

NULL_ATOL = 1e-4  # |true - null_value| below this counts as "equal to null_value"; also MAPE's zero-denominator guard


def to_numpy(x: Any) -> np.ndarray:
    """numpy float64 view of an array or a torch tensor (bf16/fp16 tensors are upcast first)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def _null_mask(true: np.ndarray, null_value: float | None) -> np.ndarray:
    """True where a target is scored: not NaN and not equal to null_value."""
    valid = ~np.isnan(true)
    if null_value is not None and not np.isnan(null_value):
        valid &= ~(np.abs(true - null_value) < NULL_ATOL)
    return valid


def _mean_where(x: np.ndarray, valid: np.ndarray) -> float:
    n = int(valid.sum())
    return float(np.where(valid, x, 0.0).sum() / n) if n else float("nan")


def _pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, true = to_numpy(pred), to_numpy(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred has shape {pred.shape}, true has shape {true.shape}; they must match")
    return pred, true


def masked_error_sum(pred: Any, true: Any, where: Any = None, null_value: float | None = 0.0) -> tuple[float, int]:
    """(sum of |pred - true|, count) over scored targets (not NaN, not null_value) inside `where` (a bool mask that
    broadcasts to true's shape; None = all): masked MAE pooled over batches and over chosen entries (e.g. the
    forecasts inside an event) is the sum of the sums over the sum of the counts."""
    pred, true = _pair(pred, true)
    valid = _null_mask(true, null_value)
    if where is not None:
        valid &= np.broadcast_to(np.asarray(where, dtype=bool), true.shape)
    return float(np.where(valid, np.abs(pred - true), 0.0).sum()), int(valid.sum())


# ---- single metrics (pooled over every element) -------------------------------------------------------------------
def masked_mae(pred: Any, true: Any, null_value: float | None = 0.0) -> float:
    """Mean |pred - true| over targets that are not NaN and not null_value."""
    pred, true = _pair(pred, true)
    return _mean_where(np.abs(pred - true), _null_mask(true, null_value))


def masked_rmse(pred: Any, true: Any, null_value: float | None = 0.0) -> float:
    """sqrt(mean (pred - true)^2) over targets that are not NaN and not null_value."""
    pred, true = _pair(pred, true)
    return float(np.sqrt(_mean_where((pred - true) ** 2, _null_mask(true, null_value))))


def masked_mape(pred: Any, true: Any, null_value: float | None = 0.0) -> float:
    """Mean |pred - true| / |true| in percent over targets that are not NaN, not null_value and not ~0."""
    pred, true = _pair(pred, true)
    valid = _null_mask(true, null_value) & _null_mask(true, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ape = np.abs(pred - true) / np.abs(true)
    return 100.0 * _mean_where(ape, valid)


def mae(pred: Any, true: Any) -> float:
    """Unmasked MAE: only NaN targets are ignored."""
    return masked_mae(pred, true, null_value=None)


def rmse(pred: Any, true: Any) -> float:
    """Unmasked RMSE: only NaN targets are ignored."""
    return masked_rmse(pred, true, null_value=None)


def mape(pred: Any, true: Any) -> float:
    """Unmasked MAPE (percent): NaN targets and targets with |true| < 1e-4 (undefined ratio) are ignored."""
    return masked_mape(pred, true, null_value=None)


# ---- streaming evaluation -----------------------------------------------------------------------------------------
class MetricAccumulator:
    """Accumulates error sums per horizon step over batches, so a large test set never sits in memory.

    acc = MetricAccumulator(); for pred, true in batches: acc.update(pred, true); acc.compute() -> dict
    (see `evaluate_forecast` for the keys). pred/true: [b, t_out, ...] with the horizon on axis 1.
    """

    _STATS = ("n", "ae", "se", "n_ape", "ape")

    def __init__(self, null_value: float | None = 0.0) -> None:
        self.null_value = null_value
        self.t_out: int | None = None
        self.n_windows = 0
        self._masked: dict[str, np.ndarray] = {}
        self._unmasked: dict[str, np.ndarray] = {}

    def update(self, pred: Any, true: Any) -> None:
        pred, true = _pair(pred, true)
        if pred.ndim < 2:
            raise ValueError(f"pred/true need shape [b, t_out, ...], got {pred.shape}")
        if self.t_out is None:
            self.t_out = pred.shape[1]
            self._masked = {k: np.zeros(self.t_out) for k in self._STATS}
            self._unmasked = {k: np.zeros(self.t_out) for k in self._STATS}
        elif pred.shape[1] != self.t_out:
            raise ValueError(f"horizon changed between batches: {self.t_out} then {pred.shape[1]}")
        self.n_windows += pred.shape[0]
        axes = tuple(i for i in range(pred.ndim) if i != 1)  # pool everything but the horizon
        err = pred - true
        with np.errstate(divide="ignore", invalid="ignore"):
            ape = np.abs(err) / np.abs(true)
        nonzero = _null_mask(true, 0.0)
        for sums, null_value in ((self._masked, self.null_value), (self._unmasked, None)):
            valid = _null_mask(true, null_value)
            valid_ape = valid & nonzero
            sums["n"] += valid.sum(axis=axes)
            sums["ae"] += np.where(valid, np.abs(err), 0.0).sum(axis=axes)
            sums["se"] += np.where(valid, err ** 2, 0.0).sum(axis=axes)
            sums["n_ape"] += valid_ape.sum(axis=axes)
            sums["ape"] += np.where(valid_ape, ape, 0.0).sum(axis=axes)

    def compute(self) -> dict:
        """Metrics dict of plain Python floats; keys as in `evaluate_forecast`."""
        if self.t_out is None:
            raise ValueError("MetricAccumulator.compute() called before any update()")
        per_step = _per_step(self._masked)
        pooled = lambda sums: _per_step({k: v.sum(keepdims=True) for k, v in sums.items()}, scalar=True)
        return {
            **pooled(self._masked),
            "per_horizon": {k: [float(x) for x in v] for k, v in per_step.items()},
            "unmasked": pooled(self._unmasked),
            "step_mean": {"mae": _mean_steps(per_step["mae"], self._masked["n"]),
                          "rmse": _mean_steps(per_step["rmse"], self._masked["n"]),
                          "mape": _mean_steps(per_step["mape"], self._masked["n_ape"])},
            "n_windows": int(self.n_windows),
        }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (no scored target)."""
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _per_step(s: dict[str, np.ndarray], scalar: bool = False) -> dict:
    out = {"mae": _ratio(s["ae"], s["n"]), "rmse": np.sqrt(_ratio(s["se"], s["n"])),
           "mape": 100.0 * _ratio(s["ape"], s["n_ape"])}
    return {k: float(v[0]) for k, v in out.items()} if scalar else out


def _mean_steps(x: np.ndarray, n: np.ndarray) -> float:
    """Equal-weight mean over the horizon steps that have a scored target (NaN if none has).

    Steps without a scored target are skipped; a NaN from NaN predictions is not skipped and makes the mean NaN."""
    has = n > 0
    return float(x[has].mean()) if has.any() else float("nan")


def evaluate_forecast(pred: Any, true: Any, null_value: float | None = 0.0) -> dict:
    """Metrics of pred vs true, both [b, t_out, n, c] on the original scale.

    Returns plain Python floats (json.dumps works; an undefined metric is NaN):
      mae, rmse, mape      masked, pooled over all horizon steps (the headline figures, the field's convention)
      per_horizon          {"mae": [t_out floats], "rmse": [...], "mape": [...]}, masked, one value per step
      unmasked             {"mae", "rmse", "mape"}, only NaN targets ignored, pooled over all steps
      step_mean            {"mae", "rmse", "mape"}, masked, equal-weight mean of the per_horizon values
      n_windows            int, number of windows b
    """
    acc = MetricAccumulator(null_value=null_value)
    acc.update(pred, true)
    return acc.compute()


# ---- reporting ----------------------------------------------------------------------------------------------------
def format_table(rows: dict[str, dict]) -> str:
    """Plain-text comparison table: one row per name, masked MAE/RMSE/MAPE and unmasked MAE/RMSE.

    A metric that is None prints as "n/a"; a row with a "missing" reason (a baseline the history cannot support,
    stllm.baselines) gets that reason in a note under the table.
    """
    header = ("name", "MAE", "RMSE", "MAPE%", "MAE unmasked", "RMSE unmasked")
    cell = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines = [[str(name), cell(m["mae"]), cell(m["rmse"]), cell(m["mape"]),
              cell((m.get("unmasked") or {}).get("mae", float("nan"))),
              cell((m.get("unmasked") or {}).get("rmse", float("nan")))] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [list(header), *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    out.append("MAE/RMSE/MAPE masked (targets equal to 0 or missing ignored), pooled over all horizon steps.")
    out += [f"{name}: n/a, {m['missing']}" for name, m in rows.items() if m.get("missing")]
    return "\n".join(out)
