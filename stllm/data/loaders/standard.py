"""The field's standard benchmark formats: PEMS0x (ASTGCN/STSGCN .npz) and METR-LA / PEMS-BAY (DCRNN .h5).

PEMS0x:  PEMS04.npz (key `data` [T, N, C]) + PEMS04.csv edge list `from,to,cost` (node indices, or station ids
         listed one per line in PEMS03.txt). No time axis in the file: starts are conventional, 5-min steps.
DCRNN:   metr-la.h5 (pandas DataFrame written by `to_hdf`, index = timestamps, columns = sensor ids, speed in mph,
         0 = missing; read with `pandas.read_hdf`, i.e. PyTables)
         + adj_mx.pkl (Python-2 pickle of [sensor_ids, sensor_id_to_ind, adj_mx]) + graph_sensor_locations.csv,
         optionally distances_*.csv (from, to, road distance).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import (check_shape, nodes_with_coordinates, read_edges, read_locations,
                                        read_npz, time_axis)
from stllm.data.safe_pickle import safe_load

PEMS_START = {"PEMS03": "2018-09-01", "PEMS04": "2018-01-01", "PEMS07": "2017-05-01", "PEMS08": "2016-07-01"}
PEMS_CITY = {"PEMS03": "Sacramento (Caltrans District 3)", "PEMS04": "San Francisco Bay Area (Caltrans District 4)",
             "PEMS07": "Los Angeles (Caltrans District 7)", "PEMS08": "San Bernardino (Caltrans District 8)"}
PEMS_CHANNELS = {1: (["flow"], ["vehicles/5min"]),
                 3: (["flow", "occupancy", "speed"], ["vehicles/5min", "fraction", "mph"])}
DCRNN_CITY = {"metr-la": "Los Angeles", "pems-bay": "San Francisco Bay Area (San Jose)"}


def load_pems(path: str | Path, edges: str | Path | None = None, ids: str | Path | None = None,
              start: str | None = None) -> CityData:
    """PEMS0x flow data [T, N, C] (C = 1: flow; C = 3: flow, occupancy, speed), 5-min steps.

    edges: edge CSV (default `<stem>.csv`, else `distance.csv`, next to the npz) -> distances [N, N]
           (inf where no link; directed as listed) and 0/1 adjacency.
    ids:   station-id list, one per line (default `<stem>.txt` if present, as for PEMS03); else ids are 0..N-1.
    start: first timestamp; defaults to the conventional start for PEMS03/04/07/08.
    """
    path = Path(path)
    name = path.stem.upper()
    values = check_shape(read_npz(path, "data", "[T, N, C] traffic tensor"), (None, None, None), path, "data")
    n, c = values.shape[1], values.shape[2]
    ids_path = Path(ids) if ids else path.with_suffix(".txt")
    node_ids = _read_ids(ids_path, n) if ids or ids_path.is_file() else [str(i) for i in range(n)]
    start = start or PEMS_START.get(name)
    if start is None:
        raise DataError(f"{path}: unknown PEMS dataset {name!r}; pass start= (first timestamp) to load it")
    channels, units = PEMS_CHANNELS.get(c, ([f"ch{k}" for k in range(c)], [""] * c))
    adjacency, distances = read_edges(_edge_file(path, edges), node_ids)
    nodes = pd.DataFrame({"id": node_ids, "description": [f"PeMS detector {i}" for i in node_ids]})
    return CityData(name=name.lower(), values=values, timestamps=time_axis(start, len(values), "5min"),
                    interval=pd.Timedelta("5min"), channels=list(channels), units=list(units), nodes=nodes,
                    city=PEMS_CITY.get(name, ""), domain="traffic flow", adjacency=adjacency, distances=distances,
                    holidays="US")


def _edge_file(npz: Path, edges: str | Path | None) -> Path:
    if edges:
        return Path(edges)
    for candidate in (npz.with_suffix(".csv"), npz.parent / "distance.csv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{npz}: no edge list found next to it (looked for {npz.with_suffix('.csv').name}, "
                    "distance.csv); pass edges=")


def _read_ids(path: Path, n: int) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected station ids, one per line")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(ids) != n:
        raise DataError(f"{path}: {len(ids)} station ids, but the data has {n} nodes")
    return ids


def load_dcrnn(path: str | Path, adj_pkl: str | Path | None = None, locations: str | Path | None = None,
               distances: str | Path | None = None, key: str | None = None, zero_as_missing: bool = True) -> CityData:
    """METR-LA / PEMS-BAY speeds [T, N, 1] in mph, zeros -> NaN (the DCRNN convention for missing).

    adj_pkl:   DCRNN adjacency pickle (default: the one `adj_mx*.pkl` next to the .h5), read with safe_load.
    locations: sensor coordinates (default: the one `graph_sensor_locations*.csv` next to the .h5).
    distances: optional road-distance edge list `from, to, distance` (default: `distances*.csv(.gz)` next to it).
    """
    path = Path(path)
    frame = read_hdf_frame(path, key)
    ids = [str(c) for c in frame.columns]
    values = frame.to_numpy(np.float32, copy=True)[:, :, None]    # [T, N, 1]
    if zero_as_missing:
        values[values == 0] = np.nan
    name = path.stem.lower()
    interval = _regular_interval(frame.index, path)
    loc_path = Path(locations) if locations else _sibling(path, "graph_sensor_locations*.csv", required=True)
    nodes = nodes_with_coordinates(ids, read_locations(loc_path), loc_path)
    nodes["description"] = [f"highway loop detector {i}" for i in ids]
    adj_path = Path(adj_pkl) if adj_pkl else _sibling(path, "adj_mx*.pkl", required=True)
    dist_path = Path(distances) if distances else _sibling(path, "distances*.csv*", required=False)
    return CityData(name=name, values=values, timestamps=frame.index.to_numpy(), interval=interval,
                    channels=["speed"], units=["mph"], nodes=nodes, city=DCRNN_CITY.get(name, ""),
                    domain="traffic speed", holidays="US", adjacency=read_adj_pkl(adj_path, ids),
                    distances=None if dist_path is None else read_edges(dist_path, ids)[1])


def read_hdf_frame(path: Path, key: str | None = None) -> pd.DataFrame:
    """The DataFrame `DataFrame.to_hdf` wrote to `path` under `key` (default: the only one in the file), fixed or
    table format, from any pandas version (DCRNN's files come from pandas 0.x), read by `pandas.read_hdf`."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a pandas HDF5 file (DataFrame.to_hdf)")
    try:
        frame = pd.read_hdf(path, key)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:    # PyTables' HDF5ExtError: RuntimeError
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise DataError(f"{path}: not a readable pandas HDF5 frame ({type(e).__name__}: {last})") from e
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: holds a {type(frame).__name__} under {key or 'its only key'}, expected a DataFrame")
    return frame


def read_adj_pkl(path: Path, ids: list[str]) -> np.ndarray:
    """DCRNN `adj_mx.pkl` -> [N, N] float32 in the order of `ids`."""
    obj = safe_load(path)
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3 and isinstance(obj[1], dict)):
        raise DataError(f"{path}: expected a pickled [sensor_ids, sensor_id_to_ind, adj_mx], got {type(obj).__name__}")
    _, id_to_ind, adj = obj
    adj = np.asarray(adj, dtype=np.float32)
    check_shape(adj, (len(id_to_ind), len(id_to_ind)), path, "adj_mx")
    to_ind = {str(k): int(v) for k, v in id_to_ind.items()}
    missing = [i for i in ids if i not in to_ind]
    if missing:
        raise DataError(f"{path}: adjacency has no row for sensors {missing[:5]}")
    order = [to_ind[i] for i in ids]
    return adj[np.ix_(order, order)]


def _sibling(path: Path, pattern: str, required: bool) -> Path | None:
    found = sorted(path.parent.glob(pattern))
    if len(found) == 1:
        return found[0]
    if not required and not found:
        return None
    raise DataError(f"{path.parent}: expected one file matching {pattern!r} next to {path.name}, "
                    f"found {[p.name for p in found]}; pass it explicitly")


def _regular_interval(index: pd.Index, path: Path) -> pd.Timedelta:
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 2:
        raise DataError(f"{path}: frame index must be at least 2 timestamps")
    steps = np.unique(np.diff(index.to_numpy()))
    if len(steps) != 1 or steps[0] <= np.timedelta64(0):
        raise DataError(f"{path}: timestamps are not evenly spaced (steps {steps[:5]})")
    return pd.Timedelta(steps[0])
