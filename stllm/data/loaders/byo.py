""""Bring your own city": plain CSV files -> CityData. The format is documented in docs/data_formats.md.

values.csv    wide: timestamp, <sensor id>, <sensor id>, ...          (one channel)
              long: timestamp, sensor, value[, more channel columns]  (one channel per extra column)
sensors.csv   id[, lat, lon, name, description]
adjacency.csv / distances.csv (needed where coordinates are unknown), either
              a square matrix whose header row holds the sensor ids (an optional first id column is ignored), or
              an edge list with header from, to[, weight | distance].
Timestamps are naive local clock times (tz-aware ones keep their wall-clock time); the interval is inferred
and the series is put on the full regular grid, with NaN for missing steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import edge_index, edges_to_matrices, read_csv

TIME, SENSOR = "timestamp", "sensor"


def load_byo(values: str | Path, sensors: str | Path | None = None, adjacency: str | Path | None = None,
             distances: str | Path | None = None, name: str | None = None, interval: str | None = None,
             units: Sequence[str] | None = None, channel: str = "value", city: str = "", domain: str = "",
             holidays: str = "") -> CityData:
    """A city from CSV files. `values` is the values CSV or a folder holding values.csv, sensors.csv and
    optionally adjacency.csv / distances.csv. Sensors default to `sensors.csv` next to the values file.

    channel: channel name for a wide file; units: one per channel (default ""); interval: e.g. "15min"
    (default: the smallest step between timestamps); holidays: the public-holiday calendar prompts may name
    ("US", or "" for none; see stllm.data.calendar).
    """
    values = Path(values)
    folder = values if values.is_dir() else values.parent
    if values.is_dir():
        values = _find(folder, "values", required=True)
        adjacency = adjacency or _find(folder, "adjacency", required=False)
        distances = distances or _find(folder, "distances", required=False)
    sensors = Path(sensors) if sensors else _find(folder, "sensors", required=True)
    array, grid, step, ids, channels = _read_values(values, channel, interval)      # array [T, N, C]
    nodes = _read_sensors(sensors, ids)
    node_ids = nodes["id"].tolist()                                                # sensors.csv order
    position = {i: k for k, i in enumerate(ids)}
    adj = None if adjacency is None else _read_graph(Path(adjacency), node_ids, "adjacency")
    dist = None if distances is None else _read_graph(Path(distances), node_ids, "distances")
    if adj is None and dist is None and not np.isfinite(nodes[["lat", "lon"]].to_numpy(float)).all():
        raise DataError(f"{sensors}: lat/lon missing for some sensors and no adjacency or distances given; "
                        "add lat, lon columns or pass adjacency= / distances= (a matrix or edge-list CSV)")
    stem = values.name.removesuffix(".gz").removesuffix(".csv")
    return CityData(name=name or (folder.name if stem == "values" else stem),
                    values=array[:, [position[i] for i in node_ids]], timestamps=grid, interval=step, channels=channels,
                    units=list(units) if units is not None else [""] * len(channels),
                    nodes=nodes, city=city, domain=domain, adjacency=adj, distances=dist, holidays=holidays)


def _read_values(path: Path, channel: str, interval: str | None
                 ) -> tuple[np.ndarray, np.ndarray, pd.Timedelta, list[str], list[str]]:
    """values CSV -> (array [T, N, C] on the full grid, grid [T], interval, sensor ids, channel names)."""
    df = read_csv(path, "values CSV (timestamp column + one column per sensor, or timestamp, sensor, value)",
                  dtype={SENSOR: str})
    if TIME not in df.columns:
        raise DataError(f"{path}: values CSV needs a {TIME!r} column; has {list(df.columns)}")
    table, ids, channels = _long(df, path) if SENSOR in df.columns else _wide(df, path, channel)
    grid, step = _grid(table.index.get_level_values(TIME), path, interval)
    return _to_array(table, grid, ids, channels), grid, step, ids, channels


def _find(folder: Path, stem: str, required: bool) -> Path | None:
    for suffix in (".csv", ".csv.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    if required:
        raise DataError(f"{folder}: no {stem}.csv found; the bring-your-own format needs values.csv and sensors.csv "
                        "(see docs/data_formats.md), or pass its path")
    return None


def _long(df: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Long table -> (frame indexed by (timestamp, sensor) with one column per channel, sensor ids, channels)."""
    channels = [c for c in df.columns if c not in (TIME, SENSOR)]
    if not channels:
        raise DataError(f"{path}: long values CSV needs at least one value column after {TIME}, {SENSOR}")
    df = df.assign(**{TIME: _parse_time(df[TIME], path), SENSOR: df[SENSOR].astype(str).str.strip()})
    dup = df.duplicated([TIME, SENSOR])
    if dup.any():
        row = df[dup].iloc[0]
        raise DataError(f"{path}: {int(dup.sum())} duplicate (timestamp, sensor) rows, e.g. {row[TIME]}, {row[SENSOR]}")
    table = df.set_index([TIME, SENSOR])[channels].apply(lambda col: _numeric(col, path))
    return table, list(dict.fromkeys(df[SENSOR])), [str(c) for c in channels]


def _wide(df: pd.DataFrame, path: Path, channel: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Wide table -> the same (timestamp, sensor)-indexed frame with one channel."""
    ids = [str(c).strip() for c in df.columns if c != TIME]
    if not ids:
        raise DataError(f"{path}: wide values CSV has no sensor columns besides {TIME!r}")
    time = _parse_time(df[TIME], path)
    if time.duplicated().any():
        raise DataError(f"{path}: duplicate timestamps, e.g. {time[time.duplicated()].iloc[0]}")
    wide = df.drop(columns=TIME).apply(lambda col: _numeric(col, path))
    wide.columns = ids
    long = wide.assign(**{TIME: time}).melt(id_vars=TIME, var_name=SENSOR, value_name=channel)
    return long.set_index([TIME, SENSOR]), ids, [channel]


def _parse_time(col: pd.Series, path: Path) -> pd.Series:
    try:
        time = pd.to_datetime(col)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: could not parse the {TIME!r} column as dates ({e})") from e
    if time.isna().any():
        raise DataError(f"{path}: {int(time.isna().sum())} empty timestamps")
    return time.dt.tz_localize(None) if time.dt.tz is not None else time   # keep wall-clock time


def _numeric(col: pd.Series, path: Path) -> pd.Series:
    out = pd.to_numeric(col, errors="coerce")
    bad = out.isna() & col.notna()
    if bad.any():
        raise DataError(f"{path}: column {col.name!r} has non-numeric values, e.g. {col[bad].iloc[0]!r}")
    return out.astype(np.float32)


def _grid(time: pd.Index, path: Path, interval: str | None) -> tuple[np.ndarray, pd.Timedelta]:
    """The full regular grid [T] covering `time`, and its step."""
    t = np.unique(time.to_numpy(dtype="datetime64[ns]"))
    if len(t) < 2:
        raise DataError(f"{path}: need at least 2 distinct timestamps, found {len(t)}")
    step = pd.Timedelta(interval) if interval else pd.Timedelta(np.diff(t).min())
    offsets = (t - t[0]).astype(np.int64)
    off_grid = offsets % step.value != 0
    if off_grid.any():
        raise DataError(f"{path}: timestamps are irregular: {pd.Timestamp(t[off_grid][0])} is not on the "
                        f"{step} grid starting {pd.Timestamp(t[0])}; resample first or pass interval=")
    return pd.date_range(t[0], t[-1], freq=step).to_numpy(), step


def _to_array(table: pd.DataFrame, grid: np.ndarray, ids: list[str], channels: list[str]) -> np.ndarray:
    """(timestamp, sensor)-indexed frame -> [T, N, C] float32 on the grid, NaN where absent."""
    out = np.full((len(grid), len(ids), len(channels)), np.nan, dtype=np.float32)
    ti = np.searchsorted(grid, table.index.get_level_values(TIME).to_numpy(dtype="datetime64[ns]"))
    ni = pd.Index(ids).get_indexer(table.index.get_level_values(SENSOR))
    out[ti, ni] = table.to_numpy(np.float32)
    return out


def _read_sensors(path: Path, ids: list[str]) -> pd.DataFrame:
    """Rows of sensors.csv for the sensors in the values file, in sensors.csv order."""
    df = read_csv(path, "sensors CSV (id[, lat, lon, name, description])", dtype={"id": str})
    df = df.rename(columns={"latitude": "lat", "longitude": "lon", "lng": "lon"})
    if "id" not in df.columns:
        raise DataError(f"{path}: sensors CSV needs an 'id' column; has {list(df.columns)}")
    df["id"] = df["id"].astype(str).str.strip()
    if df["id"].duplicated().any():
        raise DataError(f"{path}: duplicate sensor ids {df['id'][df['id'].duplicated()].tolist()[:5]}")
    missing = [i for i in ids if i not in set(df["id"])]
    if missing:
        raise DataError(f"{path}: {len(missing)} sensors in the values file are not listed, e.g. {missing[:5]}")
    for col in ("lat", "lon"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    return df[df["id"].isin(ids)].reset_index(drop=True)


def _read_graph(path: Path, ids: list[str], kind: str) -> np.ndarray:
    """[N, N] adjacency or distances in `ids` order from a matrix CSV or a from,to[,w] edge list."""
    df = read_csv(path, f"{kind} CSV (square matrix with sensor-id header, or from,to,weight edge list)", dtype=str)
    if [str(c).strip().lower() for c in df.columns[:2]] == ["from", "to"]:
        return _graph_from_edges(df, ids, path, kind)
    first = str(df.columns[0])
    if first in ("", "id", SENSOR) or first.startswith("Unnamed"):
        df = df.iloc[:, 1:]                             # an id column alongside the header
    header = [str(c).strip() for c in df.columns]
    if df.shape[0] != df.shape[1]:
        raise DataError(f"{path}: {kind} matrix has shape {df.shape}, expected a square matrix")
    missing = [i for i in ids if i not in header]
    if missing:
        raise DataError(f"{path}: {kind} matrix header lacks sensors {missing[:5]}; "
                        "the header row must hold the sensor ids")
    m = df.apply(lambda col: _numeric(col, path)).to_numpy(np.float64)
    order = [header.index(i) for i in ids]
    return m[np.ix_(order, order)]


def _graph_from_edges(df: pd.DataFrame, ids: list[str], path: Path, kind: str) -> np.ndarray:
    if kind == "distances":
        return edges_to_matrices(df, ids, path)[1]
    i, j, weight = edge_index(df, ids, path)
    adjacency = np.zeros((len(ids), len(ids)))
    adjacency[i, j] = 1.0 if weight is None else weight   # directed as listed: list both ways if undirected
    return adjacency
