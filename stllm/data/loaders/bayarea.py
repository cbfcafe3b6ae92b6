"""Bay Area Bike Share 2014: hourly station departures/arrivals, 70 stations (35 in San Francisco).

Folder layout (`BayArea_BikeShare_2014/`):
    bayarea_bike_2014_60min.npz   flow int32 [8760, 70, 2], time datetime64[h] [8760], station_id [70], ...
    stations_70.csv               station_id, name, lat, lon, dock_count, landmark (city)
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import check_shape, read_csv, read_npz

SF = "San Francisco"


def load_bayarea(root: str | Path, sf_only: bool = False) -> CityData:
    """Hourly trip counts [T=8760, 70 (35 with `sf_only`), 2] for 2014, America/Los_Angeles local clock time.

    ch0 departures = trips starting at the station (by local start hour), ch1 arrivals = trips ending there
    (by local end hour) — the same meaning as the NYC Citi Bike channels. `sf_only` keeps the stations whose
    landmark is "San Francisco"; the South-Bay stations are nearly empty.
    DST: 2014-03-09 02:00 is an all-zero row and 2014-11-02 01:00 holds two real hours (kept as is).
    """
    root = Path(root)
    npz = root / "bayarea_bike_2014_60min.npz"
    flow = read_npz(npz, "flow", "[T, N, 2] hourly station departures/arrivals")
    check_shape(flow, (None, None, 2), npz, "flow")
    time = read_npz(npz, "time", "[T] hourly timestamps").astype("datetime64[ns]")
    station_ids = [str(s) for s in read_npz(npz, "station_id", "[N] station ids in node order")]
    check_shape(time, (flow.shape[0],), npz, "time")
    if len(station_ids) != flow.shape[1]:
        raise DataError(f"{npz}: {len(station_ids)} station ids for {flow.shape[1]} stations in flow")
    nodes = _read_stations(root / "stations_70.csv", station_ids)
    data = CityData(
        name="bayarea-bike", values=flow.astype(np.float32), timestamps=time, interval=pd.Timedelta("1h"),
        channels=["departures", "arrivals"], units=["trips", "trips"], nodes=nodes,
        city="San Francisco Bay Area", domain="bike sharing", holidays="US",
    )
    if not sf_only:
        return data
    sf = data.select_nodes(np.flatnonzero(nodes["landmark"] == SF).tolist())
    return replace(sf, name="bayarea-bike-sf", city=SF)


def _read_stations(path: Path, station_ids: list[str]) -> pd.DataFrame:
    """Nodes in the npz's station order, with name, lat/lon, landmark (city) and a description."""
    df = read_csv(path, "station table (station_id, name, lat, lon, dock_count, landmark)")
    missing = {"station_id", "name", "lat", "lon", "dock_count", "landmark"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: station table lacks columns {sorted(missing)}")
    df = df.assign(id=df["station_id"].astype(str)).drop_duplicates("id").set_index("id")
    absent = [s for s in station_ids if s not in df.index]
    if absent:
        raise DataError(f"{path}: station ids {absent[:5]} of the flow file have no row here")
    df = df.loc[station_ids].reset_index()
    df["description"] = [f"bike-share station in {c}, {d} docks" for c, d in zip(df["landmark"], df["dock_count"])]
    return df[["id", "name", "lat", "lon", "description", "landmark"]]
