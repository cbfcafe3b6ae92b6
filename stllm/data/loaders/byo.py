""""Bring your own city": plain CSV files -> CityData. The format is documented in docs/data_formats.md.

values.csv    wide: timestamp, <sensor id>, <sensor id>, ...          (one channel)
              long: timestamp, sensor, value[, more channel columns]  (one channel per extra column)
sensors.csv   id[, lat, lon, name, description]
adjacency.csv / distances.csv (needed where coordinates are unknown), either
              a square matrix whose header row holds the sensor ids (an optional first id column is ignored), or
              an edge list with header from, to[, weight | distance].
Timestamps are naive local clock times (tz-aware ones keep their wall-clock time); the interval is the most
common step between them (or interval=), every row must lie on that grid, and the series is put on the full
regular grid, with NaN for missing steps. Errors name the file and, where there is one, the line.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import edge_index, edges_to_matrices, read_table

TIME, SENSOR = "timestamp", "sensor"


def load_byo(values: str | Path, sensors: str | Path | None = None, adjacency: str | Path | None = None,
             distances: str | Path | None = None, name: str | None = None, interval: str | None = None,
             units: Sequence[str] | None = None, channel: str = "value", city: str = "", domain: str = "",
             holidays: str = "") -> CityData:
    """A city from CSV files. `values` is the values CSV or a folder holding values.csv, sensors.csv and
    optionally adjacency.csv / distances.csv. Sensors default to `sensors.csv` next to the values file.

    channel: channel name for a wide file; units: one per channel (default ""); interval: e.g. "15min"
    (default: the most common step between timestamps); holidays: the public-holiday calendar prompts may name
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
    try:
        return CityData(name=name or (folder.resolve().name if stem == "values" else stem),
                        values=array[:, [position[i] for i in node_ids]], timestamps=grid, interval=step,
                        channels=channels, units=_units(units, channels),
                        nodes=nodes, city=city, domain=domain, adjacency=adj, distances=dist, holidays=holidays)
    except DataError as e:                  # e.g. a sensor with no value at all: say which file it came from
        raise DataError(f"{values}: {e}") from e


def _read_values(path: Path, channel: str, interval: str | None
                 ) -> tuple[np.ndarray, np.ndarray, pd.Timedelta, list[str], list[str]]:
    """values CSV -> (array [T, N, C] on the full grid, grid [T], interval, sensor ids, channel names)."""
    df = read_table(path, "values CSV (timestamp column + one column per sensor, or timestamp, sensor, value)",
                    dtype={TIME: str, SENSOR: str})
    if TIME not in df.columns:
        raise DataError(f"{path}: values CSV needs a {TIME!r} column; has {list(df.columns)}")
    time = _parse_time(df[TIME], path)                       # [rows] wall-clock, index = line numbers
    grid, step = _grid(time, path, interval)
    table, ids, channels = _long(df, time, path) if SENSOR in df.columns else _wide(df, time, path, channel)
    return _to_array(table, grid, ids, channels), grid, step, ids, channels


def _find(folder: Path, stem: str, required: bool) -> Path | None:
    for suffix in (".csv", ".csv.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    if required:
        raise DataError(f"{folder}: no {stem}.csv found; the bring-your-own format needs values.csv and sensors.csv "
                        "(see docs/data_formats.md), or pass its path")
    return None


def _long(df: pd.DataFrame, time: pd.Series, path: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Long table -> (frame indexed by (timestamp, sensor) with one column per channel, sensor ids, channels)."""
    channels = [c for c in df.columns if c not in (TIME, SENSOR)]
    if not channels:
        raise DataError(f"{path}: long values CSV needs at least one value column after {TIME}, {SENSOR}")
    sensor = df[SENSOR].str.strip()
    empty = sensor.isna() | (sensor == "")
    if empty.any():
        raise DataError(f"{path}: line {empty.idxmax()} has no {SENSOR} id")
    key = pd.DataFrame({TIME: time, SENSOR: sensor})
    dup = key.duplicated()
    if dup.any():
        line = dup.idxmax()
        first = key.index[(key[TIME] == time[line]) & (key[SENSOR] == sensor[line])][0]
        raise DataError(f"{path}: {int(dup.sum())} duplicate (timestamp, sensor) rows, e.g. line {line} repeats "
                        f"{_stamp(time[line])}, {sensor[line]} of line {first}")
    table = df[channels].apply(lambda col: _numeric(col, path))
    table.index = pd.MultiIndex.from_arrays([time, sensor], names=[TIME, SENSOR])
    return table, list(dict.fromkeys(sensor)), [str(c) for c in channels]


def _wide(df: pd.DataFrame, time: pd.Series, path: Path, channel: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Wide table -> the same (timestamp, sensor)-indexed frame with one channel."""
    ids = [c for c in df.columns if c != TIME]
    if not ids:
        raise DataError(f"{path}: wide values CSV has no sensor columns besides {TIME!r}")
    dup = time.duplicated()
    if dup.any():
        line = dup.idxmax()
        first = time.index[time == time[line]][0]
        raise DataError(f"{path}: duplicate timestamps: line {line} repeats {_stamp(time[line])} of line {first}")
    wide = df[ids].apply(lambda col: _numeric(col, path)).to_numpy(np.float32)      # [rows, N]
    index = pd.MultiIndex.from_arrays([np.repeat(time.to_numpy(), len(ids)), np.tile(ids, len(wide))],
                                      names=[TIME, SENSOR])
    return pd.DataFrame({channel: wide.reshape(-1)}, index=index), ids, [channel]


def _parse_time(col: pd.Series, path: Path) -> pd.Series:
    """The timestamp column (index = line numbers) as wall-clock datetime64[ns]: a UTC offset is dropped.

    The format is guessed from the first row and applied to all (fast, and no row is read in another convention);
    rows it does not fit may still be any ISO 8601 form (2024-05-01, 2024-05-01T00:15+02:00).
    """
    text = col.str.strip()
    empty = text.isna() | (text == "")
    if empty.any():
        raise DataError(f"{path}: line {empty.idxmax()} has no timestamp ({int(empty.sum())} rows without one)")
    fmt = guess_datetime_format(text.iloc[0]) if len(text) else None
    time = pd.Series(pd.NaT, index=text.index, dtype="datetime64[us]")
    if fmt and "%z" not in fmt.lower():                      # offsets may differ across rows (DST): read one by one
        time = pd.to_datetime(text, format=fmt, errors="coerce")
        time = (time.dt.tz_localize(None) if time.dt.tz is not None else time).astype("datetime64[us]")
        time[text.str.lower().isin(["now", "today"])] = pd.NaT   # pandas reads these as the current time
    retry = time.isna()
    if retry.any():
        time[retry] = pd.to_datetime(text[retry].map(_iso_wall_clock), format="ISO8601").astype("datetime64[us]")
    bad = time.isna()
    if bad.any():
        line = bad.idxmax()
        like = f" like line {text.index[0]} ({text.iloc[0]!r})" if fmt else " like 2024-05-01 00:15"
        raise DataError(f"{path}: line {line}: cannot read the timestamp {text[line]!r} as a date and time{like}")
    out = (time < pd.Timestamp.min) | (time > pd.Timestamp.max)
    if out.any():
        raise DataError(f"{path}: line {out.idxmax()}: timestamp {text[out.idxmax()]!r} is outside the years "
                        f"{pd.Timestamp.min.year + 1}..{pd.Timestamp.max.year - 1} that can be represented")
    return time.astype("datetime64[ns]")


def _iso_wall_clock(text: str) -> str | None:
    """An ISO 8601 date(-time) without its UTC offset, or None when `text` is not one."""
    try:
        return datetime.fromisoformat(text).replace(tzinfo=None).isoformat()
    except ValueError:
        return None


def _numeric(col: pd.Series, path: Path, finite: bool = True, dtype=np.float32) -> pd.Series:
    """A column as numbers (empty = NaN). DataError naming the column and line of the first cell that is text or
    true/false, or with `finite`, infinite (too large for `dtype` included)."""
    out = pd.Series(np.nan, index=col.index) if pd.api.types.is_bool_dtype(col) else pd.to_numeric(col, errors="coerce")
    bad = out.isna() & col.notna()
    if bad.any():
        raise DataError(f"{path}: column {col.name!r} has non-numeric values, e.g. line {bad.idxmax()}: "
                        f"{str(col[bad.idxmax()])!r} (leave a cell empty where the value is missing)")
    with np.errstate(over="ignore"):
        out = out.astype(dtype)
    inf = np.isinf(out)
    if finite and inf.any():
        raise DataError(f"{path}: column {col.name!r} line {inf.idxmax()}: {str(col[inf.idxmax()])!r} is not a finite "
                        f"number{'' if np.isinf(float(col[inf.idxmax()])) else ' in float32'}; leave a cell "
                        "empty where the value is missing")
    return out


def _grid(time: pd.Series, path: Path, interval: str | None) -> tuple[np.ndarray, pd.Timedelta]:
    """The full regular grid [T] covering `time` (index = line numbers), and its step.

    The step is `interval`, else the most common step between consecutive distinct timestamps (the smallest of
    equally common ones). The grid starts at the first timestamp; a row off it is an error, a step of the grid
    that no row has is a gap (NaN).
    """
    stamps = time.to_numpy(dtype="datetime64[ns]")
    t = np.unique(stamps)
    if len(t) < 2:
        raise DataError(f"{path}: need at least 2 distinct timestamps, found {len(t)}")
    if interval:
        try:
            step = pd.Timedelta(interval)
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: interval={interval!r} is not a duration like '15min' or '1h'") from e
        if step <= pd.Timedelta(0):
            raise DataError(f"{path}: interval={interval!r} must be positive")
    else:
        steps, counts = np.unique(np.diff(t), return_counts=True)
        step = pd.Timedelta(steps[counts.argmax()])
    every = f"every {_duration(step)} from {_stamp(t[0])}" + ("" if interval else " (the most common step)")
    off = (stamps - t[0]).astype(np.int64) % step.value != 0
    if off.any():
        line = time.index[off.argmax()]
        raise DataError(f"{path}: timestamps are irregular: line {line} has {_stamp(time[line])}, off the grid "
                        f"{every}" + (f"; {int(off.sum())} rows are off it" if off.sum() > 1 else "")
                        + "; fix or drop those rows, resample the file, or pass interval=")
    n_steps = int((t[-1] - t[0]).astype(np.int64) // step.value) + 1
    if n_steps > max(10 * len(t), 100_000):     # > 90 % gaps in a long series: most likely a mistyped year
        raise DataError(f"{path}: the timestamps {_stamp(t[0])} .. {_stamp(t[-1])} span {n_steps} steps {every}, "
                        f"but only {len(t)} of them have rows; check for a mistyped date")
    return t[0] + np.arange(n_steps) * np.timedelta64(step.value, "ns"), step


def _duration(step: pd.Timedelta) -> str:
    """1h, 15min, 1D: the shortest spelling pandas reads back."""
    for unit, seconds in (("D", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if step.value % (seconds * 10**9) == 0:
            return f"{step.value // (seconds * 10**9)}{unit}"
    return f"{step.value}ns"


def _stamp(t) -> str:
    """2024-05-01 00:15, with seconds only when there are any."""
    t = pd.Timestamp(t)
    return t.strftime("%Y-%m-%d %H:%M") if t == t.floor("min") else str(t)


def _to_array(table: pd.DataFrame, grid: np.ndarray, ids: list[str], channels: list[str]) -> np.ndarray:
    """(timestamp, sensor)-indexed frame -> [T, N, C] float32 on the grid, NaN where absent."""
    out = np.full((len(grid), len(ids), len(channels)), np.nan, dtype=np.float32)
    ti = np.searchsorted(grid, table.index.get_level_values(TIME).to_numpy(dtype="datetime64[ns]"))
    ni = pd.Index(ids).get_indexer(table.index.get_level_values(SENSOR))
    out[ti, ni] = table.to_numpy(np.float32)
    return out


def _read_sensors(path: Path, ids: list[str]) -> pd.DataFrame:
    """Rows of sensors.csv for the sensors in the values file, in sensors.csv order."""
    df = read_table(path, "sensors CSV (id[, lat, lon, name, description])", dtype={"id": str})
    for col, names in (("lat", ["lat", "latitude"]), ("lon", ["lon", "longitude", "lng"])):
        given = [c for c in names if c in df.columns]
        if len(given) > 1:
            raise DataError(f"{path}: columns {given} all give the {names[1]}; keep one")
        df = df.rename(columns={given[0]: col}) if given else df.assign(**{col: np.nan})
    if "id" not in df.columns:
        raise DataError(f"{path}: sensors CSV needs an 'id' column; has {list(df.columns)}")
    df["id"] = df["id"].str.strip()
    empty = df["id"].isna() | (df["id"] == "")
    if empty.any():
        raise DataError(f"{path}: line {empty.idxmax()} has no sensor id")
    if df["id"].duplicated().any():
        raise DataError(f"{path}: duplicate sensor ids {df['id'][df['id'].duplicated()].tolist()[:5]}")
    missing = [i for i in ids if i not in set(df["id"])]
    if missing:
        raise DataError(f"{path}: {len(missing)} sensors in the values file are not listed, e.g. {missing[:5]}")
    for col, limit in (("lat", 90), ("lon", 180)):
        df[col] = _numeric(df[col], path, finite=False, dtype=np.float64)
        out = df[col].abs() > limit
        if out.any():
            line = out.idxmax()
            raise DataError(f"{path}: sensor {df['id'][line]!r} (line {line}) has {col} {df[col][line]}, outside "
                            f"-{limit}..{limit} degrees (WGS84 lat, lon; swapped?)")
    return df[df["id"].isin(ids)].reset_index(drop=True)


def _read_graph(path: Path, ids: list[str], kind: str) -> np.ndarray:
    """[N, N] adjacency or distances in `ids` order from a matrix CSV or a from,to[,w] edge list."""
    df = read_table(path, f"{kind} CSV (square matrix with sensor-id header, or from,to,weight edge list)",
                    unnamed_first=True, dtype=str)
    if [c.lower() for c in df.columns[:2]] == ["from", "to"]:
        return _graph_from_edges(df, ids, path, kind)
    row_ids = None
    if df.columns[0] in ("", "id", SENSOR):
        row_ids, df = df.iloc[:, 0].str.strip().tolist(), df.iloc[:, 1:]     # an id column alongside the header
    header = list(df.columns)
    if df.shape[0] != df.shape[1]:
        raise DataError(f"{path}: {kind} matrix has shape {df.shape}, expected a square matrix")
    if row_ids is not None and set(row_ids) & set(header) and row_ids != header:
        raise DataError(f"{path}: {kind} matrix rows are labelled {row_ids[:5]}, the columns {header[:5]}; "
                        "rows must follow the order of the header")
    missing = [i for i in ids if i not in header]
    if missing:
        raise DataError(f"{path}: {kind} matrix header lacks sensors {missing[:5]}; "
                        "the header row must hold the sensor ids")
    m = df.apply(lambda col: _numeric(col, path, finite=False, dtype=np.float64)).to_numpy(np.float64)
    order = [header.index(i) for i in ids]
    return m[np.ix_(order, order)]


def _graph_from_edges(df: pd.DataFrame, ids: list[str], path: Path, kind: str) -> np.ndarray:
    if kind == "distances":
        return edges_to_matrices(df, ids, path)[1]
    i, j, weight = edge_index(df, ids, path)
    adjacency = np.zeros((len(ids), len(ids)))
    adjacency[i, j] = 1.0 if weight is None else weight   # directed as listed: list both ways if undirected
    return adjacency


def _units(units: str | Sequence[str] | None, channels: list[str]) -> list[str]:
    """One unit per channel: a single string (e.g. `--data-option units=people`) is the unit of one channel."""
    if units is None:
        return [""] * len(channels)
    return [units] if isinstance(units, str) else list(units)
