"""Los-loop (T-GCN): METR-LA loop-detector speeds, 207 sensors, 5-min, one week from 2012-03-01.

Files:
    LosLoop/los_speed.csv(.gz)               header = METR-LA sensor ids; 2016 rows of speed (mph)
    LosLoop/los_adj.csv(.gz)                 no header; [207, 207] symmetric weighted adjacency
    METR-LA/graph_sensor_locations.csv       index, sensor_id, latitude, longitude
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import (nodes_with_coordinates, read_csv, read_locations, read_matrix,
                                        time_axis)

START = "2012-03-01 00:00"  # per the T-GCN paper; checked: the network-mean minimum falls at 17:30


def load_losloop(root: str | Path, locations: str | Path | None = None) -> CityData:
    """Speeds [T=2016, 207, 1] in mph with the symmetrised DCRNN adjacency and METR-LA coordinates.

    `locations` defaults to `<root>/../METR-LA/graph_sensor_locations.csv`. The T-GCN authors already
    filled missing readings (no zeros remain), so nothing is marked missing.
    """
    root = Path(root)
    speed_path = _first_existing(root, "los_speed")
    df = read_csv(speed_path, "speed table (header = sensor ids, one row per 5-min step)")
    ids = [str(c).strip().removesuffix(".0") for c in df.columns]
    try:
        values = df.to_numpy(np.float32)[:, :, None]   # [T, N, 1]
    except ValueError as e:
        raise DataError(f"{speed_path}: speed table has non-numeric entries ({e})") from e
    locations = Path(locations) if locations else root.parent / "METR-LA" / "graph_sensor_locations.csv"
    nodes = nodes_with_coordinates(ids, read_locations(locations), locations)
    nodes["description"] = [f"highway loop detector {i}, Los Angeles County" for i in ids]
    adj_path = _first_existing(root, "los_adj")
    return CityData(
        name="los-loop", values=values, timestamps=time_axis(START, len(df), "5min"),
        interval=pd.Timedelta("5min"), channels=["speed"], units=["mph"], nodes=nodes,
        city="Los Angeles", domain="traffic speed", holidays="US",
        adjacency=read_matrix(adj_path, len(ids), "adjacency matrix (no header)", header=False),
    )


def _first_existing(root: Path, stem: str) -> Path:
    """`<stem>.csv.gz` or `<stem>.csv` under root (the .gz path when neither exists, for the error)."""
    plain = root / f"{stem}.csv"
    return plain if plain.is_file() and not (root / f"{stem}.csv.gz").is_file() else root / f"{stem}.csv.gz"
