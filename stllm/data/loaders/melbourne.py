"""Melbourne pedestrian counts (City of Melbourne open data, in UCTB's format): 55 sensors, hourly, 2021-01 .. 2022-10.

Files (shared/data/Melbourne_Pedestrian/SOURCE.md):
    Pedestrian_Melbourne.zip   one member Pedestrian_Melbourne.pkl: a pickled dict (builtins and numpy arrays only)
        TimeRange              ['2021-01-01', '2022-11-01'], end exclusive
        TimeFitness            60 (minutes per step)
        Node.TrafficNode       int [T, N] hourly counts, -1 = missing
        Node.StationInfo       N entries [sensor_id, install_date, latitude, longitude, sensor_name]

The pickle is read only through stllm.data.safe_pickle. Timestamps are Melbourne local clock time: the hour that
does not exist at the October DST change is an all-zero row in the file and becomes NaN here.
The file names sensors only by the counting system's short codes (`Bou292_T`, `FliS_T`); `sensors=` replaces them
with readable names from a CSV (e.g. the City of Melbourne's "Pedestrian Counting System - Sensor Locations").
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import read_table, time_axis
from stllm.data.safe_pickle import safe_loads

ZIP, MEMBER = "Pedestrian_Melbourne.zip", "Pedestrian_Melbourne.pkl"
TZ = "Australia/Melbourne"


def load_melbourne(path: str | Path, sensors: str | Path | None = None, holidays: str = "AU-VIC") -> CityData:
    """Pedestrian counts [T, N, 1] ("pedestrians", people per hour) from the UCTB zip or the folder holding it.

    Nodes: id = the City of Melbourne sensor id, name = its short code, lat/lon, a description with the install
    date. sensors: optional CSV `id, name[, description]` whose rows replace those names (ids not listed keep
    theirs). holidays: the public-holiday calendar (stllm.data.calendar); "AU-VIC" = Victoria's, which has
    Melbourne Cup Day and the AFL Grand Final Friday.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ZIP
    info = _read_uctb(path)
    counts, stations = info["counts"], info["stations"]
    values = counts.astype(np.float32)[:, :, None]                              # [T, N, 1]
    values[values < 0] = np.nan                                                 # -1 = no reading
    times = time_axis(info["start"], len(counts), info["interval"])
    values[_nonexistent(times) & (np.nan_to_num(values, nan=0.0) == 0).all(axis=(1, 2))] = np.nan
    nodes = pd.DataFrame({
        "id": [str(s[0]) for s in stations], "name": [str(s[4]) for s in stations],
        "lat": [s[2] for s in stations], "lon": [s[3] for s in stations],
        "description": [f"City of Melbourne pedestrian counting sensor {s[4]}, installed {s[1]}" for s in stations]})
    if sensors is not None:
        nodes = _named(nodes, Path(sensors))
    try:
        return CityData(name="melbourne-pedestrian", values=values, timestamps=times, interval=info["interval"],
                        channels=["pedestrians"], units=["people"], nodes=nodes, city="Melbourne",
                        domain="pedestrian counts", holidays=holidays)
    except DataError as e:
        raise DataError(f"{path}: {e}") from e


def _read_uctb(path: Path) -> dict:
    """Start, interval, counts [T, N] and station rows of a UCTB node dataset, checked against each other."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected the UCTB zip {ZIP} holding {MEMBER}")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.endswith(".pkl")]
            if len(members) != 1:
                raise DataError(f"{path}: expected one .pkl inside the zip, found {members}")
            raw = zf.read(members[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip ({type(e).__name__}: {e})") from e
    source = f"{path}:{members[0]}"
    data = safe_loads(raw, source)
    try:
        (start, end), minutes = data["TimeRange"], int(data["TimeFitness"])
        counts, stations = np.asarray(data["Node"]["TrafficNode"]), list(data["Node"]["StationInfo"])
    except (TypeError, KeyError, ValueError) as e:
        raise DataError(f"{source}: expected a UCTB dict with TimeRange [start, end], TimeFitness (minutes) and "
                        f"Node.TrafficNode / Node.StationInfo ({type(e).__name__}: {e})") from e
    interval = pd.Timedelta(minutes=minutes)
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.number):
        raise DataError(f"{source}: Node.TrafficNode must be a numeric [T, N] array, got {counts.dtype} "
                        f"{counts.shape}")
    steps = (pd.Timestamp(end) - pd.Timestamp(start)) / interval
    if steps != counts.shape[0]:
        raise DataError(f"{source}: TimeRange {start} .. {end} (end exclusive) every {minutes} min is {steps:g} "
                        f"steps, but Node.TrafficNode has {counts.shape[0]} rows")
    bad = [k for k, s in enumerate(stations) if not isinstance(s, (list, tuple)) or len(s) != 5]
    if len(stations) != counts.shape[1] or bad:
        raise DataError(f"{source}: Node.StationInfo needs one [id, install_date, lat, lon, name] entry per column "
                        f"of Node.TrafficNode ({counts.shape[1]}); has {len(stations)} entries"
                        + (f", entry {bad[0]} malformed" if bad else ""))
    return {"start": pd.Timestamp(start), "interval": interval, "counts": counts, "stations": stations}


def _nonexistent(times: np.ndarray) -> np.ndarray:
    """[T] bool: local clock times skipped by Melbourne's spring-forward DST change."""
    local = pd.DatetimeIndex(times).tz_localize(TZ, nonexistent="NaT", ambiguous="NaT")
    shifted = pd.DatetimeIndex(times).tz_localize(TZ, nonexistent="shift_forward", ambiguous="NaT")
    return np.asarray(local.isna() & shifted.notna())


def _named(nodes: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Nodes with name (and description) replaced from a CSV `id, name[, description]`."""
    table = read_table(path, "sensor names CSV (id, name[, description])", dtype=str)
    if not {"id", "name"} <= set(table.columns):
        raise DataError(f"{path}: sensor names CSV needs columns id, name; has {list(table.columns)}")
    table = table.assign(id=table["id"].str.strip()).drop_duplicates("id", keep="last").set_index("id")
    unknown = sorted(set(table.index) - set(nodes["id"]))
    if unknown:
        raise DataError(f"{path}: sensor ids {unknown[:5]} are not in the data; ids look like "
                        f"{nodes['id'].tolist()[:5]}")
    nodes = nodes.copy()
    for col in [c for c in ("name", "description") if c in table.columns]:
        given = nodes["id"].map(table[col].dropna().str.strip())
        nodes[col] = given.where(given.notna() & (given != ""), nodes[col])
    return nodes
