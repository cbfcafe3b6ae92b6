"""Windows, chronological splits, scalers and calendar features.

A window is identified by its start `s`, the index of the first target step:
history = values[s - t_in : s], target = values[s : s + t_out].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError


def window_starts(n_steps: int, t_in: int, t_out: int) -> np.ndarray:
    """Every start s with a full history and a full horizon."""
    starts = np.arange(t_in, n_steps - t_out + 1)
    if len(starts) == 0:
        raise DataError(f"{n_steps} time steps are too few: a window needs t_in + t_out = {t_in + t_out} "
                        f"({t_in} + {t_out}); use a longer series or smaller t_in/t_out")
    return starts


def no_windows(split: str, bounds: tuple[int, int], n_steps: int, t_in: int, t_out: int) -> str:
    """Why `split` ("train", "val", "test") of split_starts has no windows, naming its length and the window's."""
    lo, hi = {"train": (0, bounds[0]), "val": (bounds[0], bounds[1]), "test": (bounds[1], n_steps)}[split]
    need = f"a window needs t_in + t_out = {t_in + t_out} ({t_in} + {t_out})"
    if split == "train":
        return f"the train split has {hi} steps; {need}: use a longer split or smaller t_in/t_out"
    if hi - lo >= t_out:                       # long enough for the targets, but not for a history before them
        return (f"the {split} split has {hi - lo} steps, and the data up to its end {hi}; {need}: use a longer "
                "series or smaller t_in/t_out")
    return (f"the {split} split has {hi - lo} steps; {need}, and its t_out targets must lie inside the split (the "
            "history may reach back before it): use a longer split or smaller t_out")


def split_bounds(n_steps: int, fractions=(0.7, 0.1, 0.2)) -> tuple[int, int]:
    """(train_end, test_start): the time axis is cut at floor(0.7 T) and floor(0.8 T) for 7:1:2."""
    floor = lambda x: int(round(x, 6))  if abs(x - round(x)) < 1e-6 else int(x)  # 0.7 + 0.1 is 0.7999...
    return floor(fractions[0] * n_steps), floor((fractions[0] + fractions[1]) * n_steps)


def split_starts(n_steps: int, t_in: int, t_out: int, fractions=(0.7, 0.1, 0.2), bounds=None) -> dict[str, np.ndarray]:
    """Chronological split of the time axis; a window belongs to the part that holds all its targets.

    train: s in [t_in, train_end - t_out], val: [train_end, test_start - t_out], test: [test_start, T - t_out].
    Histories may reach back into the previous part (they are inputs, not targets). This is the protocol
    that reproduces the baseline figures of REFERENCE.md exactly.
    """
    window_starts(n_steps, t_in, t_out)  # raises when the series is too short
    train_end, test_start = bounds if bounds else split_bounds(n_steps, fractions)
    last = n_steps - t_out
    part = lambda lo, hi: np.arange(max(lo, t_in), min(hi, last) + 1)
    return {"train": part(t_in, train_end - t_out), "val": part(train_end, test_start - t_out),
            "test": part(test_start, last)}


@dataclass
class Scaler:
    """z-score per channel (shape [1, C]) or per node and channel (shape [N, C])."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, per_node: bool = False) -> "Scaler":
        """values: [T, N, C] with NaN for missing."""
        axis = 0 if per_node else (0, 1)
        with np.errstate(all="ignore"), _quiet():
            mean = np.nanmean(values, axis=axis, keepdims=False)
            std = np.nanstd(values, axis=axis, keepdims=False)
        mean = np.atleast_2d(np.nan_to_num(mean, nan=0.0)).astype(np.float32)
        std = np.atleast_2d(np.nan_to_num(std, nan=1.0)).astype(np.float32)
        std[std < 1e-6] = 1.0
        return cls(mean, std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse(self, x):
        """Works for numpy arrays and torch tensors shaped [..., N or 1, C]."""
        mean, std = self.mean, self.std
        if not isinstance(x, np.ndarray):
            import torch
            mean, std = torch.as_tensor(mean, device=x.device), torch.as_tensor(std, device=x.device)
        return x * std + mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def time_features(timestamps: np.ndarray) -> np.ndarray:
    """[T, 4]: sin/cos of time of day and of day of week."""
    ts = pd.DatetimeIndex(timestamps)
    day_frac = (ts.hour * 3600 + ts.minute * 60 + ts.second).to_numpy() / 86400.0
    week_frac = (ts.day_of_week.to_numpy() + day_frac) / 7.0
    return np.stack([np.sin(2 * np.pi * day_frac), np.cos(2 * np.pi * day_frac),
                     np.sin(2 * np.pi * week_frac), np.cos(2 * np.pi * week_frac)], axis=1).astype(np.float32)


def period_lags(city: CityData, periods: list[str], t_out: int = 0) -> list[int]:
    """Lag in steps for each period name ('day', 'week'). A lag shorter than the horizon t_out is refused: the
    window a period earlier would then overlap the targets it is meant to precede."""
    days = {"day": 1, "week": 7}
    lags = []
    for p in periods:
        lag = pd.Timedelta(days=days[p]) / city.interval
        if lag != int(lag):
            raise DataError(f"{city.name}: interval {city.interval} does not divide one {p}")
        if lag < t_out:
            raise DataError(f"{city.name}: one {p} is {int(lag)} steps of {city.interval}, fewer than the horizon "
                            f"data.t_out={t_out}, so the window one {p} earlier would overlap the targets; drop "
                            f"{p!r} from data.periods or forecast fewer steps")
        lags.append(int(lag))
    return lags


WIND_SPEED, WIND_DIR = "wind_speed", "wind_dir_deg"


def exog_features(city: CityData, fit_end: int) -> tuple[np.ndarray, list[str]]:
    """[T, N or 1, E'] scaled exogenous features: wind direction as sin/cos, the rest z-scored on steps < fit_end."""
    if city.exog is None:
        return np.zeros((city.n_steps, 1, 0), np.float32), []
    cols, names = [], []
    for i, name in enumerate(city.exog_names):
        e = city.exog[:, :, i].astype(np.float32)
        if name == WIND_DIR:
            rad = np.deg2rad(e)
            cols += [np.sin(rad), np.cos(rad)]
            names += [f"{name}_sin", f"{name}_cos"]
        else:
            with _quiet():
                mean, std = np.nanmean(e[:fit_end]), np.nanstd(e[:fit_end])
            std = std if np.isfinite(std) and std > 1e-6 else 1.0
            cols.append((e - np.nan_to_num(mean)) / std)
            names.append(name)
    return np.nan_to_num(np.stack(cols, axis=-1)).astype(np.float32), names
