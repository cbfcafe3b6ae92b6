"""`CityData`: the one in-memory form of every dataset. Loaders produce it; nothing downstream knows file formats."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Bad or missing input data. The message names the file or field and what was expected."""


@dataclass
class CityData:
    """A city's sensors (or regions) over time.

    values:     [T, N, C] float32, NaN where missing.
    timestamps: [T] datetime64[ns], evenly spaced by `interval`.
    nodes:      DataFrame with N rows and columns id, name, lat, lon, description (lat/lon NaN when unknown).
    adjacency:  optional [N, N] weights (1 = connected) when that is all a dataset has.
    distances:  optional [N, N] road distances (km or any unit; used instead of haversine when given).
    exog:       optional [T, N or 1, E] float32 exogenous series (weather), NaN where missing.
    holidays:   the public-holiday calendar a prompt's <WHEN> slot names ("US"; "" = none known).
    """

    name: str                                   # dataset name, e.g. "nyc-bike-60min"
    values: np.ndarray                          # [T, N, C] float32
    timestamps: np.ndarray                      # [T] datetime64[ns]
    interval: pd.Timedelta                      # spacing of timestamps
    channels: list[str]                         # C channel names
    units: list[str]                            # C units ("trips", "ug/m3", ...)
    nodes: pd.DataFrame                         # N rows: id, name, lat, lon, description
    city: str = ""                              # human name of the place, used in prompts
    domain: str = ""                            # "bike sharing", "taxi", "air quality", "traffic speed", ...
    adjacency: np.ndarray | None = None         # [N, N]
    distances: np.ndarray | None = None         # [N, N]
    exog: np.ndarray | None = None              # [T, N or 1, E]
    exog_names: list[str] = field(default_factory=list)  # E names; "wind_speed", "wind_dir_deg" drive the wind graph
    split_at: tuple | None = None               # a dataset's given (train_end, test_start); None = use fractions
    holidays: str = ""                          # public-holiday calendar for prompts: "US" or "" (none known)
    notes: pd.DataFrame | None = None           # dated text about places (stllm.data.notes): start, end, nodes
                                                # (tuple of node positions, empty = all), kind, text

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.timestamps = np.asarray(self.timestamps, dtype="datetime64[ns]")
        self.interval = pd.Timedelta(self.interval)
        self.nodes = _normalise_nodes(self.nodes, self.name)
        self.validate()

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self.values.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.values.shape[1]

    @property
    def n_channels(self) -> int:
        return self.values.shape[2]

    @property
    def steps_per_day(self) -> int:
        return int(pd.Timedelta("1D") / self.interval)

    @property
    def has_coordinates(self) -> bool:
        return bool(np.isfinite(self.nodes["lat"].to_numpy(float)).all() and np.isfinite(self.nodes["lon"].to_numpy(float)).all())

    # ---- checks ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise DataError naming the field when shapes or contents disagree."""
        v = self.values
        if v.ndim != 3:
            raise DataError(f"{self.name}: values must have shape [T, N, C], got {v.shape}")
        t, n, c = v.shape
        if t < 2 or n < 1 or c < 1:
            raise DataError(f"{self.name}: values shape {v.shape} is empty; need T >= 2, N >= 1, C >= 1")
        if self.timestamps.shape != (t,):
            raise DataError(f"{self.name}: timestamps has shape {self.timestamps.shape}, expected ({t},) to match values")
        if self.interval <= pd.Timedelta(0):
            raise DataError(f"{self.name}: interval must be positive, got {self.interval}")
        steps = np.diff(self.timestamps).astype("timedelta64[ns]")
        if len(steps) and not (steps == np.timedelta64(self.interval.value, "ns")).all():
            raise DataError(f"{self.name}: timestamps are not evenly spaced by interval {self.interval}")
        if len(self.channels) != c:
            raise DataError(f"{self.name}: {len(self.channels)} channel names for {c} channels")
        if len(self.units) != c:
            raise DataError(f"{self.name}: {len(self.units)} units for {c} channels")
        if len(self.nodes) != n:
            raise DataError(f"{self.name}: nodes table has {len(self.nodes)} rows, values have {n} nodes")
        for key in ("adjacency", "distances"):
            m = getattr(self, key)
            if m is not None and np.shape(m) != (n, n):
                raise DataError(f"{self.name}: {key} must have shape ({n}, {n}), got {np.shape(m)}")
        if self.exog is not None:
            e = self.exog
            if e.ndim != 3 or e.shape[0] != t or e.shape[1] not in (1, n):
                raise DataError(f"{self.name}: exog must have shape [T={t}, N={n} or 1, E], got {e.shape}")
            if len(self.exog_names) != e.shape[2]:
                raise DataError(f"{self.name}: {len(self.exog_names)} exog_names for {e.shape[2]} exogenous series")
        empty = np.isnan(v).all(axis=(0, 2))
        if empty.any():
            ids = self.nodes["id"].astype(str).to_numpy()[empty][:5].tolist()
            raise DataError(f"{self.name}: sensors {ids} have no observed value at all (all NaN); drop them first")
        if np.isinf(v).any():
            raise DataError(f"{self.name}: values hold {int(np.isinf(v).sum())} infinite entries; use NaN for missing")

    # ---- views -------------------------------------------------------------------------------------------------
    def slice_time(self, start: int, stop: int) -> "CityData":
        """Steps [start, stop) as a new CityData (arrays are views)."""
        exog = None if self.exog is None else self.exog[start:stop]
        return replace(self, values=self.values[start:stop], timestamps=self.timestamps[start:stop], exog=exog,
                       split_at=None)

    def select_nodes(self, index) -> "CityData":
        """A sub-city with the given node positions (ints) or node ids (strings)."""
        idx = self.node_index(index)
        pick = lambda m: None if m is None else m[np.ix_(idx, idx)]
        exog = self.exog
        if exog is not None and exog.shape[1] > 1:
            exog = exog[:, idx]
        notes = self.notes
        if notes is not None:   # node positions move; a note about none of the kept nodes is dropped
            where = {old: new for new, old in enumerate(idx)}
            moved = [tuple(sorted(where[k] for k in n if k in where)) if len(n) else () for n in notes["nodes"]]
            keep = [not len(n) or bool(m) for n, m in zip(notes["nodes"], moved)]
            notes = notes.assign(nodes=moved)[keep].reset_index(drop=True)
        return replace(self, values=self.values[:, idx], nodes=self.nodes.iloc[idx].reset_index(drop=True),
                       adjacency=pick(self.adjacency), distances=pick(self.distances), exog=exog, notes=notes)

    def select_channels(self, channels) -> "CityData":
        """Keep channels given by name or position, in the given order."""
        idx = [self.channel_index(ch) for ch in channels]
        return replace(self, values=self.values[:, :, idx], channels=[self.channels[i] for i in idx],
                       units=[self.units[i] for i in idx])

    def resample(self, interval, how: str = "sum") -> "CityData":
        """Aggregate to a coarser interval that is a whole multiple of this one; how = sum (counts) or mean (levels).

        A coarse step is NaN only when all its fine steps are missing (sum then adds the observed ones).
        """
        interval = pd.Timedelta(interval)
        factor = interval / self.interval
        if how not in ("sum", "mean"):
            raise DataError(f"{self.name}: resample how must be 'sum' or 'mean', got {how!r}")
        if factor < 1 or factor != int(factor):
            raise DataError(f"{self.name}: can only aggregate {self.interval} steps to a whole multiple of them "
                            f"({self.interval * 2}, {self.interval * 3}, ...), not {interval}; data cannot be made finer")
        k, t = int(factor), (self.n_steps // int(factor)) * int(factor)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            agg = lambda a: None if a is None else (np.nansum if how == "sum" else np.nanmean)(
                a[:t].reshape(t // k, k, *a.shape[1:]), axis=1).astype(np.float32)
            values = agg(self.values)
            values[np.isnan(self.values[:t].reshape(t // k, k, *self.values.shape[1:])).all(1)] = np.nan
            exog = None
            if self.exog is not None:
                blocks = self.exog[:t].reshape(t // k, k, *self.exog.shape[1:])        # [T', k, N|1, E]
                exog = np.nanmean(blocks, axis=1)
                if "wind_dir_deg" in self.exog_names:                               # directions: circular mean
                    rad = np.deg2rad(blocks[..., self.exog_names.index("wind_dir_deg")])
                    mean = np.rad2deg(np.arctan2(np.nanmean(np.sin(rad), 1), np.nanmean(np.cos(rad), 1))) % 360
                    exog[..., self.exog_names.index("wind_dir_deg")] = mean
        return replace(self, values=values, timestamps=self.timestamps[:t:k], interval=interval, exog=exog,
                       split_at=None)

    def channel_index(self, channel: str | int) -> int:
        if isinstance(channel, (int, np.integer)) or (isinstance(channel, str) and channel.isdigit()):
            i = int(channel)
            if not 0 <= i < self.n_channels:
                raise DataError(f"{self.name}: channel {i} out of range; channels are {self.channels}")
            return i
        if channel not in self.channels:
            raise DataError(f"{self.name}: unknown channel {channel!r}; channels are {self.channels}")
        return self.channels.index(channel)

    def node_index(self, index) -> list[int]:
        """Positions for node ids, names or positions."""
        ids = self.nodes["id"].astype(str).tolist()
        names = self.nodes["name"].astype(str).tolist()
        out = []
        for item in np.atleast_1d(np.asarray(index, dtype=object)).tolist():
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not 0 <= item < self.n_nodes:
                    raise DataError(f"{self.name}: node position {item} out of range 0..{self.n_nodes - 1}")
                out.append(int(item))
            elif str(item) in ids:
                out.append(ids.index(str(item)))
            elif str(item) in names:
                out.append(names.index(str(item)))
            else:
                raise DataError(f"{self.name}: unknown node {item!r}; ids look like {ids[:5]}")
        return out

    def time_index(self, timestamp) -> int:
        """Position of a timestamp (must be on the grid)."""
        ts = np.datetime64(pd.Timestamp(timestamp), "ns")
        pos = int(np.searchsorted(self.timestamps, ts))
        if pos >= self.n_steps or self.timestamps[pos] != ts:
            raise DataError(f"{self.name}: time {timestamp} is not in the data "
                            f"({pd.Timestamp(self.timestamps[0])} .. {pd.Timestamp(self.timestamps[-1])}, every {self.interval})")
        return pos

    def __repr__(self) -> str:
        return (f"CityData({self.name!r}, T={self.n_steps}, N={self.n_nodes}, C={self.n_channels} {self.channels}, "
                f"interval={self.interval}, {pd.Timestamp(self.timestamps[0])} .. {pd.Timestamp(self.timestamps[-1])}, "
                f"exog={self.exog_names or None})")


def _normalise_nodes(nodes, dataset: str) -> pd.DataFrame:
    """Fill the standard node columns; ids become strings."""
    if not isinstance(nodes, pd.DataFrame):
        nodes = pd.DataFrame(nodes)
    nodes = nodes.reset_index(drop=True).copy()
    if "id" not in nodes:
        raise DataError(f"{dataset}: nodes table needs an 'id' column, has {list(nodes.columns)}")
    nodes["id"] = nodes["id"].astype(str)
    if nodes["id"].duplicated().any():
        raise DataError(f"{dataset}: duplicate node ids {nodes['id'][nodes['id'].duplicated()].tolist()[:5]}")
    if "name" not in nodes:
        nodes["name"] = nodes["id"]
    nodes["name"] = nodes["name"].fillna(nodes["id"]).astype(str)
    for col in ("lat", "lon"):
        nodes[col] = pd.to_numeric(nodes[col], errors="coerce") if col in nodes else np.nan
    for col, limit in (("lat", 90), ("lon", 180)):       # WGS84 degrees; NaN = unknown
        out = (nodes[col].abs() > limit).to_numpy()
        if out.any():
            k = int(out.argmax())
            raise DataError(f"{dataset}: sensor {nodes['id'][k]!r} has {col} {nodes[col][k]}, outside "
                            f"-{limit}..{limit} degrees ({int(out.sum())} sensors out of range; lat/lon swapped?)")
    if "description" not in nodes:
        nodes["description"] = ""
    nodes["description"] = nodes["description"].fillna("").astype(str)
    return nodes
