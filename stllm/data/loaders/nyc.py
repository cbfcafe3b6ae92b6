"""NYC Manhattan Citi Bike and yellow-taxi flows over 69 taxi zones (Deep-NYC-Taxi-Bike, 2019-2020).

Folder layout (`NYC_Manhattan_TaxiBike/`):
    60min/201901-202012-NYC{bike,taxi}-inoutflow.npz       arr_0 [T, 69, 2]
    30min/201901-202012-NYC{bike,taxi}-{inflow,outflow}.npz arr_0 [T, 69]
    zones/manhattan_zones.csv                               zone_id, graph_id, zone_name
    zones/reprojected_manhattan_data.json.gz                GeoJSON zone polygons, properties.OBJECTID
    zones/W_adj_matrix.csv                                  [69, 69] 0/1 contiguity, header row 0..68
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import check_shape, read_csv, read_matrix, read_npz, require, time_axis

# The repo's "inflow"/"outflow" mean different things per mode (SOURCE.md): named here by what they count.
CHANNELS = {"bike": ["departures", "arrivals"], "taxi": ["dropoffs", "pickups"]}
DOMAINS = {"bike": "bike sharing", "taxi": "taxi"}
START = "2019-01-01 00:00"  # the files carry no time axis; NYC local clock time
# Zones 103-105 share one name (and, in the GeoJSON, LocationID 103 — a known TLC shapefile bug; OBJECTID
# is the zone id there). Which island is which was checked from the polygon centroids.
ISLANDS = {103: "Liberty Island", 104: "Ellis Island", 105: "Governors Island"}


def load_nyc(root: str | Path, mode: str = "bike", interval: str = "60min") -> CityData:
    """Manhattan zone flows for `mode` "bike" or "taxi" at `interval` "60min" or "30min".

    values [T, 69, 2] trip counts (T = 17544 hourly or 35088 half-hourly steps from 2019-01-01 00:00).
    bike: ch0 departures = Citi Bike trips starting in the zone (binned by start time),
          ch1 arrivals = trips ending in the zone (binned by stop time).
    taxi: ch0 dropoffs = trips whose dropoff zone is the zone, ch1 pickups = trips picked up there;
          both binned by PICKUP time, only trips with both ends in the 69 zones.
    So bike ch0 and taxi ch1 are both "departures / demand".

    Caveats: the DST spring-forward hours (2019-03-10 02:00, 2020-03-08 02:00) are all-zero rows, kept as is.
    The 60-min and 30-min TAXI files come from two different processing runs: the 60-min file counts about
    4-5 % more trips per month than the 30-min one. Use one resolution on its own; never mix them
    (the bike files agree across resolutions).
    """
    if mode not in CHANNELS:
        raise DataError(f"nyc: mode must be 'bike' or 'taxi', got {mode!r}")
    if interval not in ("60min", "30min"):
        raise DataError(f"nyc: interval must be '60min' or '30min', got {interval!r}")
    root = Path(root)
    values = _read_flows(root, mode, interval)
    n = values.shape[1]
    zones = root / "zones"
    return CityData(
        name=f"nyc-{mode}-{interval}",
        values=values,
        timestamps=time_axis(START, values.shape[0], interval),
        interval=pd.Timedelta(interval),
        channels=list(CHANNELS[mode]),
        units=["trips", "trips"],
        nodes=_read_zones(zones / "manhattan_zones.csv", zones / "reprojected_manhattan_data.json.gz", n),
        city="New York (Manhattan)",
        domain=DOMAINS[mode],
        holidays="US",
        adjacency=read_matrix(zones / "W_adj_matrix.csv", n, "zone adjacency matrix", header=True),
    )


def _read_flows(root: Path, mode: str, interval: str) -> np.ndarray:
    """[T, N, 2] float32 from the 60-min in/out file or the two 30-min files."""
    prefix = f"201901-202012-NYC{mode}"
    if interval == "60min":
        path = root / "60min" / f"{prefix}-inoutflow.npz"
        return check_shape(read_npz(path, "arr_0", "[T, N, 2] trip counts"), (None, None, 2), path, "arr_0")
    parts = []
    for kind in ("inflow", "outflow"):
        path = root / "30min" / f"{prefix}-{kind}.npz"
        parts.append(check_shape(read_npz(path, "arr_0", "[T, N] trip counts"), (None, None), path, "arr_0"))
    if parts[0].shape != parts[1].shape:
        raise DataError(f"{root / '30min'}: {mode} inflow {parts[0].shape} and outflow {parts[1].shape} shapes differ")
    return np.stack(parts, axis=-1).astype(np.float32)


def _read_zones(zones_csv: Path, geojson: Path, n: int) -> pd.DataFrame:
    """Nodes ordered by graph_id: id = TLC zone id, name = zone name, lat/lon = polygon centroid."""
    zones = read_csv(zones_csv, "zone table (zone_id, graph_id, zone_name)")
    missing = {"zone_id", "graph_id", "zone_name"} - set(zones.columns)
    if missing:
        raise DataError(f"{zones_csv}: zone table lacks columns {sorted(missing)}")
    zones = zones.sort_values("graph_id").reset_index(drop=True)
    if zones["graph_id"].tolist() != list(range(n)):
        raise DataError(f"{zones_csv}: graph_id must be 0..{n - 1} to match the {n} nodes of the flow files")
    centroids = _zone_centroids(geojson)
    missing_ids = [z for z in zones["zone_id"] if int(z) not in centroids]
    if missing_ids:
        raise DataError(f"{geojson}: no polygon for zone ids {missing_ids[:5]}")
    lonlat = np.array([centroids[int(z)] for z in zones["zone_id"]])
    return pd.DataFrame({"id": zones["zone_id"].astype(str), "name": zones["zone_name"],
                         "lat": lonlat[:, 1], "lon": lonlat[:, 0],
                         "description": [f"Manhattan taxi zone {z}" + (f" ({ISLANDS[z]})" if z in ISLANDS else "")
                                         for z in zones["zone_id"]]})


def _zone_centroids(path: Path) -> dict[int, tuple[float, float]]:
    """{zone id: (lon, lat)} area-weighted centroids of (Multi)Polygon features (id = OBJECTID, else LocationID)."""
    require(path, "GeoJSON of zone polygons")
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            features = json.load(f)["features"]
        out = {}
        for feat in features:
            geom = feat["geometry"]
            polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
            props = feat["properties"]
            out[int(props.get("OBJECTID", props["LocationID"]))] = polygon_centroid(polygons)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a GeoJSON FeatureCollection of Polygon/MultiPolygon features "
                        f"with properties.OBJECTID or LocationID ({type(e).__name__}: {e})") from e


def polygon_centroid(polygons: list) -> tuple[float, float]:
    """Area-weighted centroid (x, y) of polygons given as GeoJSON rings; rings after the first are holes."""
    total, cx, cy = 0.0, 0.0, 0.0
    for rings in polygons:
        for k, ring in enumerate(rings):
            a, x, y = _ring_moments(np.asarray(ring, dtype=np.float64)[:, :2])
            sign = 1.0 if k == 0 else -1.0   # holes subtract whatever their winding
            total, cx, cy = total + sign * a, cx + sign * a * x, cy + sign * a * y
    if total <= 0:
        raise ValueError("polygon has zero area")
    return cx / total, cy / total


def _ring_moments(xy: np.ndarray) -> tuple[float, float, float]:
    """(|area|, centroid x, centroid y) of one closed ring [k, 2] by the shoelace formula."""
    x, y = xy[:, 0] - xy[0, 0], xy[:, 1] - xy[0, 1]   # shift for numerical precision
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2
    if a == 0:
        return 0.0, xy[0, 0], xy[0, 1]
    return abs(a), (((x + x1) * cross).sum() / (6 * a)) + xy[0, 0], (((y + y1) * cross).sum() / (6 * a)) + xy[0, 1]
