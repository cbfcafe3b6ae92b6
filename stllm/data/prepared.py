"""`PreparedCity`: a CityData turned into scaled tensors, graphs and splits, ready to cut batches from."""
from __future__ import annotations

import re
import zlib

import numpy as np
import pandas as pd
import torch

from stllm.data import graphs
from stllm.data.city import CityData, DataError
from stllm.data.calendar import holiday_flags, holiday_names, window_text
from stllm.data.notes import coverage, short_notes
from stllm.data.windows import (WIND_DIR, WIND_SPEED, Scaler, exog_features, no_windows, period_lags,
                                split_bounds, split_starts, time_features)


class PreparedCity:
    """Everything a model needs from one city, computed once.

    scaler: pass the run's scaler to reuse it; None fits one on this city's training part
    (for zero-shot, `fit_on="inputs"` fits on every step before the test split's first target).
    """

    def __init__(self, city: CityData, data_cfg, enc_cfg, scaler: Scaler | None = None):
        self.city, self.cfg = city, data_cfg
        self.t_in, self.t_out = data_cfg.t_in, data_cfg.t_out
        # The config's explicit split, else the dataset's own given split, else the fractions (7:1:2).
        bounds = data_cfg.split_at or city.split_at or split_bounds(city.n_steps, data_cfg.split)
        if bounds[1] > city.n_steps:
            raise DataError(f"{city.name}: data.split_at {list(bounds)} lies beyond its {city.n_steps} steps")
        try:
            self.splits = split_starts(city.n_steps, self.t_in, self.t_out, bounds=bounds)
        except DataError as e:
            raise DataError(f"{city.name}: {e}") from e
        self.bounds = (int(bounds[0]), int(bounds[1]))                     # (train_end, test_start)
        self.train_end = int(bounds[0])
        if scaler is None:
            self.starts("train", why="no training windows to fit a scaler on")
            scaler = Scaler.fit(city.values[: self.train_end], per_node=data_cfg.scaler == "node")
        elif scaler.mean.shape[0] not in (1, city.n_nodes):
            raise DataError(f"{city.name}: the run's per-node scaler has {scaler.mean.shape[0]} nodes, this city "
                            f"{city.n_nodes}; per-node scalers cannot move to another city (use data.scaler=channel)")
        if scaler.mean.shape[1] != city.n_channels:
            raise DataError(f"{city.name}: the scaler has {scaler.mean.shape[1]} channels, the data {city.n_channels}")
        self.scaler = scaler
        self.lags = period_lags(city, data_cfg.periods, self.t_out)
        self.context = prompt_fields(city)
        self.periods = list(data_cfg.periods)
        self.holidays = holiday_names(city.holidays, city.timestamps, city.name) if city.holidays else None

        # Arrays get t_out extra steps after the data (NaN, unobserved) so that the last window, which
        # forecasts beyond the end of the data, can be cut like any other: T' = T + t_out.
        values = np.concatenate([city.values, np.full((self.t_out, *city.values.shape[1:]), np.nan, np.float32)])
        observed = np.isfinite(values)
        self.x = torch.from_numpy(np.where(observed, scaler.transform(values), 0.0).astype(np.float32))  # [T', N, C]
        self.mask = torch.from_numpy(observed.astype(np.float32))                                       # [T', N, C]
        self.raw = torch.from_numpy(values)                                                              # [T', N, C], NaN kept
        self.timestamps = city.timestamps[0] + np.arange(len(values)) * np.timedelta64(city.interval.value, "ns")
        tf = time_features(self.timestamps)                                                              # [T', 4]
        if data_cfg.holiday_features:
            if self.holidays is None:   # e.g. a run trained with holidays used zero-shot on a city without a calendar
                import warnings
                warnings.warn(f"{city.name}: data.holiday_features is on but this city has no holiday calendar "
                              "(CityData.holidays is empty), so no holidays are known and every holiday flag is 0; "
                              "give the city a calendar with the loader option holidays=XX (a country code such as "
                              "'US', 'AU', 'IT', or 'AU-VIC')", stacklevel=2)
            tf = np.concatenate([tf, holiday_flags(self.timestamps, self.holidays or {}, self.periods)], axis=1)
        self.tf = torch.from_numpy(tf)                                                   # [T', 4 (+1+P holiday)]
        self.profile = self._profile() if data_cfg.profile else None   # ([T', N, C] values, [T', N, C] mask)
        # [R, t_out, N, C]: each naive reference's relative error on the training part (model.floor_city_fit)
        self.reference_fit = self._reference_fit() if (self.lags or self.profile is not None) else None
        exog, self.exog_names = exog_features(city, max(self.train_end, 1))
        self.exog = torch.from_numpy(exog)                                                               # [T, N|1, E]
        # Notes routed once to the steps and nodes they concern; a batch takes the ones its windows meet.
        notes = short_notes(city.notes, data_cfg.notes_max_hours)
        self.note_texts, self.note_kinds, cover = coverage(notes, self.timestamps, city.n_nodes)
        self.note_cover = torch.from_numpy(cover)                                              # [T', N, J] bool
        self.node_texts = node_texts(city)
        self.level = torch.from_numpy(scaler.mean / scaler.std)   # [N|1, C]: raw value 0 sits at -level (scaled)
        self.static_adj = self._static_graph(enc_cfg) if enc_cfg.static_graph else None                     # [N, N]
        self.series = torch.from_numpy(series_features(city))                                  # [C, SERIES_FEATURES]
        self._wind = self._wind_setup(enc_cfg)

    @property
    def n_nodes(self) -> int:
        return self.city.n_nodes

    def starts(self, split: str, why: str = "") -> np.ndarray:
        """Window starts of `split` ("train", "val", "test"); DataError naming the split's length and t_in + t_out
        when it has none (`why`: what needed them)."""
        starts = self.splits[split]
        if len(starts) == 0:
            reason = no_windows(split, self.bounds, self.city.n_steps, self.t_in, self.t_out)
            raise DataError(f"{self.city.name}: {why + ': ' if why else ''}{reason}")
        return starts

    @property
    def n_exog(self) -> int:
        return self.exog.shape[-1]

    @property
    def has_wind(self) -> bool:
        return self._wind is not None

    def _static_graph(self, enc_cfg) -> torch.Tensor:
        adj = graphs.static_graph(self.city, sigma=enc_cfg.graph_sigma or None, threshold=enc_cfg.graph_threshold)
        return torch.from_numpy(graphs.normalize(adj).astype(np.float32))

    def _wind_setup(self, enc_cfg):
        wind = None if enc_cfg.dynamic_graph in ("data", "none") else graphs.wind_from_exog(self.city)
        if wind is None:
            if enc_cfg.dynamic_graph == "wind":
                raise DataError(f"{self.city.name}: encoder.dynamic_graph=wind needs exog {WIND_SPEED} and {WIND_DIR}")
            return None
        if not self.city.has_coordinates:
            return None
        lat, lon = self.city.nodes["lat"].to_numpy(float), self.city.nodes["lon"].to_numpy(float)
        dist = graphs.node_distances(self.city)
        sigma0 = enc_cfg.wind_sigma0 or graphs.default_sigma(dist)
        speed, direction = wind                                   # [T, N|1] each
        return dict(dist=dist, bearings=graphs.bearings_deg(lat, lon), speed=speed, direction=direction,
                    sigma0=sigma0, alpha=enc_cfg.wind_alpha)

    def wind_adjacency(self, starts: np.ndarray) -> torch.Tensor:
        """[b, N, N] row-normalised wind graph from the wind at each window's last history step."""
        w = self._wind
        speed, direction = w["speed"][starts - 1], w["direction"][starts - 1]  # [b, N|1]
        if speed.shape[1] == 1:
            speed, direction = speed[:, 0], direction[:, 0]
        adj = graphs.wind_graph(w["dist"], w["bearings"], speed, direction, w["sigma0"], w["alpha"])  # [b, N, N]
        adj = adj + np.eye(self.n_nodes, dtype=adj.dtype)[None]
        return torch.from_numpy((adj / adj.sum(-1, keepdims=True)).astype(np.float32))

    def batch(self, starts: np.ndarray, mask_zeros: bool = True) -> dict:
        """Cut windows starting at `starts` ([b]). Shapes in comments."""
        starts = np.asarray(starts)
        hist = torch.from_numpy(starts[:, None] + np.arange(-self.t_in, 0))   # [b, t_in]
        fut = torch.from_numpy(starts[:, None] + np.arange(self.t_out))       # [b, t_out]
        if (hist < 0).any() or (starts > self.city.n_steps).any():
            raise DataError(f"{self.city.name}: window starts must lie in [{self.t_in}, {self.city.n_steps}]")
        out = {
            "starts": starts,
            "x": self.x[hist], "x_mask": self.mask[hist],                     # [b, t_in, N, C]
            "tf_in": self.tf[hist], "tf_out": self.tf[fut],                   # [b, t, 4]
            "exog": self.exog[hist],                                          # [b, t_in, N|1, E]
            "y": self.x[fut], "y_raw": self.raw[fut],                         # [b, t_out, N, C]
        }
        y_mask = self.mask[fut]
        if mask_zeros:
            y_mask = y_mask * (self.raw[fut].nan_to_num(0.0).abs() > 1e-4)
        out["y_mask"] = y_mask
        if self.lags or self.profile is not None:
            out["periods"], out["period_mask"] = self._references(fut)               # [b, P, t_out, N, C]
            out["periods_hist"], out["periods_hist_mask"] = self._references(hist)   # [b, P, t_in, N, C]
            out["reference_fit"] = self.reference_fit                                 # [R, t_out, N, C], static
        out["context"] = self.context                                        # prompt fields for this city
        out["window_text"] = [window_text(self.timestamps[s:s + self.t_out], self.holidays, self.periods)
                              for s in starts]                                # [b] calendar sentences (<WHEN>)
        out.update(self._notes(torch.cat([hist, fut], 1)))
        out["level"] = self.level
        out["node_texts"] = self.node_texts                                   # [N] names and descriptions
        out["static_adj"] = self.static_adj
        out["series"] = self.series
        out["dynamic_adj"] = self.wind_adjacency(starts) if self.has_wind else None
        return out


    def _references(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The period references at `steps` [b, t] (the value a day / a week before each step, in `periods` order,
        then the hour-of-week profile with data.profile) and their masks: [b, P, t, N, C] each. At the target steps
        they are the period windows the encoder reads; at the history steps, what each reference would have said
        about the history, which model.floor_fit weighs them by."""
        refs, masks = [], []
        for lag in self.lags:
            idx = steps - lag
            valid = (idx >= 0).float()[:, :, None, None]
            idx = idx.clamp(min=0)
            refs.append(self.x[idx] * valid)
            masks.append(self.mask[idx] * valid)
        if self.profile is not None:                                          # the hour-of-week average
            refs.append(self.profile[0][steps])
            masks.append(self.profile[1][steps])
        return torch.stack(refs, 1), torch.stack(masks, 1)

    def _reference_fit(self) -> torch.Tensor:
        """[R, t_out, N, C]: how well each naive reference of the floor (the last value, then the period references,
        in `_references` order) forecast each node's training part: its mean absolute error there at each horizon
        step, divided by the node's mean absolute deviation from its own mean (so 1.0 is as good as that mean, and
        every city is on one scale). Only the training part is read, as for the profile, so for zero-shot it comes
        from the target's own inputs. A reference the training part never checks gets the largest error of any."""
        end = max(self.train_end, 1)
        x, m = self.x[:end], self.mask[:end]                                     # [T, N, C]
        mean = (x * m).sum(0) / m.sum(0).clamp(min=1.0)
        spread = ((x - mean).abs() * m).sum(0) / m.sum(0).clamp(min=1.0)         # [N, C]

        def err(pred, pm, lag):                                                  # pred aligned with x[lag:]
            w = m[lag:] * pm
            e = ((x[lag:] - pred).abs() * w).sum(0) / w.sum(0).clamp(min=1.0)
            return torch.where(w.sum(0) > 0, e, torch.full_like(e, float("nan")))

        rows = [torch.stack([err(x[:end - h], m[:end - h], h) if h < end else torch.full_like(mean, float("nan"))
                             for h in range(1, self.t_out + 1)])]                # last value: [t_out, N, C]
        for lag in self.lags:
            one = err(x[:end - lag], m[:end - lag], lag) if lag < end else torch.full_like(mean, float("nan"))
            rows.append(one.expand(self.t_out, -1, -1))
        if self.profile is not None:
            rows.append(err(self.profile[0][:end], self.profile[1][:end], 0).expand(self.t_out, -1, -1))
        fit = torch.stack(rows) / spread.clamp(min=1e-6)                        # [R, t_out, N, C]
        worst = fit.nan_to_num(0.0).amax(0, keepdim=True)
        return torch.where(fit.isnan(), worst, fit).contiguous()

    def _profile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each node's mean (scaled) at every hour of the week over the training part, laid out over all T' steps:
        (values [T', N, C], mask [T', N, C]; mask 0 where the training part never observed that hour). Only the
        training part is read, so for zero-shot it comes from the target's own inputs. A training step's own value
        is left out of its average (leave one out): otherwise a training target would be part of its own reference,
        a third of it in a city with three training weeks, and the model would learn to trust the profile more than
        it deserves on test windows, whose targets are never in it."""
        week = pd.Timedelta(days=7) / self.city.interval
        if week != int(week):
            raise DataError(f"{self.city.name}: data.profile needs an interval that divides a week, got {self.city.interval}")
        week, steps = int(week), len(self.x)
        if self.cfg.profile_weeks:
            return self._recent_profile(week, self.cfg.profile_weeks)
        slot = np.arange(steps) % week                                           # [T'] hour of the week
        seen = self.mask[: self.train_end].numpy()                               # [T_train, N, C]
        total = np.zeros((week, *seen.shape[1:]), np.float64)
        count = np.zeros_like(total)
        np.add.at(total, slot[: self.train_end], self.x[: self.train_end].numpy() * seen)
        np.add.at(count, slot[: self.train_end], seen)
        total, count = total[slot], count[slot]                                 # [T', N, C] per step
        own = self.train_end
        total[:own] -= self.x[:own].numpy() * seen                               # leave each training step out
        count[:own] -= seen
        mean = np.where(count > 0.5, total / np.maximum(count, 1), 0.0).astype(np.float32)
        return torch.from_numpy(mean), torch.from_numpy((count > 0.5).astype(np.float32))

    def _recent_profile(self, week: int, weeks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """data.profile_weeks: each step's mean over the same step 1..`weeks` weeks before it (the observed ones;
        mask 0 where none is), on the scaled axis: (values [T', N, C], mask [T', N, C]). Causal, so it reads no
        target, and it needs no training part: it follows a city whose level drifts."""
        total, count = torch.zeros_like(self.x), torch.zeros_like(self.x)
        for k in range(1, weeks + 1):
            lag = k * week
            if lag >= len(self.x):
                break
            total[lag:] += self.x[:-lag] * self.mask[:-lag]
            count[lag:] += self.mask[:-lag]
        mean = torch.where(count > 0.5, total / count.clamp(min=1.0), torch.zeros_like(total))
        return mean, (count > 0.5).float()

    def _notes(self, steps: torch.Tensor) -> dict:
        """The notes the windows meet: texts [J], kinds [J] and cover [b, t_in + t_out, N, J] (1 where note j holds
        at that step of the window and names that node). J = 0 when the windows meet none."""
        cover = self.note_cover[steps]                                       # [b, t_in + t_out, N, J_all]
        used = cover.flatten(0, 2).any(0).nonzero().flatten().tolist()       # notes that meet these windows
        return {"note_texts": [self.note_texts[j] for j in used], "note_kinds": [self.note_kinds[j] for j in used],
                "note_cover": cover[..., used].float()}


def batch_to(batch: dict, device) -> dict:
    """A batch of `PreparedCity.batch` with its tensors on `device` (the rest as it is)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def node_texts(city: CityData) -> list[str]:
    """What the language model reads about each node: its name, and its description when there is one."""
    return [f"{name}: {desc}" if desc else str(name)
            for name, desc in zip(city.nodes["name"].astype(str), city.nodes["description"].astype(str))]


SERIES_WORD_BUCKETS = 16
SERIES_FEATURES = 1 + SERIES_WORD_BUCKETS


def series_features(city: CityData) -> np.ndarray:
    """[C, SERIES_FEATURES] what each channel is, as numbers the encoder can read (encoder.series_features): the
    log of the interval in hours (5 min -2.5, 1 h 0, 1 day 3.2), then the words of the channel's name, its unit and
    the city's domain hashed into SERIES_WORD_BUCKETS signed buckets (crc32, so the same words give the same
    numbers in every process), scaled to unit length. Node-free and city-size-free, so a new city gets them too."""
    hours = np.log(city.interval / pd.Timedelta(hours=1))
    out = np.zeros((city.n_channels, SERIES_FEATURES), np.float32)
    for c, (name, unit) in enumerate(zip(city.channels, city.units)):
        out[c, 0] = hours
        for word in re.findall(r"[a-z0-9.]+", f"{name} {unit} {city.domain}".lower()):
            h = zlib.crc32(word.encode())
            out[c, 1 + h % SERIES_WORD_BUCKETS] += 1.0 if (h >> 16) & 1 else -1.0
        norm = np.linalg.norm(out[c, 1:])
        if norm > 0:
            out[c, 1:] /= norm
    return out


def prompt_fields(city: CityData) -> dict:
    """Prompt fields that describe a city (see prompts/README.md)."""
    return {"city": city.city or city.name, "domain": city.domain or "sensor data",
            "channels": ", ".join(f"{c} ({u})" if u else c for c, u in zip(city.channels, city.units)),
            "interval": _interval_text(city.interval)}


def _interval_text(interval) -> str:
    minutes = int(interval.total_seconds() // 60)
    if minutes % 1440 == 0:
        return f"{minutes // 1440} day" + ("s" if minutes > 1440 else "")
    if minutes % 60 == 0:
        return f"{minutes // 60} hour" + ("s" if minutes > 60 else "")
    return f"{minutes} minutes"
