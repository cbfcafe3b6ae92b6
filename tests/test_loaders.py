"""Loaders against tiny fixture files written in the real on-disk formats."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stllm.data import CityData, DataError, load
from stllm.data.loaders import load_bayarea, load_beijing, load_byo, load_dcrnn, load_losloop, load_nyc, load_pems
from stllm.data.loaders.beijing import STATION_IDS, compass_to_degrees
from stllm.data.loaders.nyc import polygon_centroid
from stllm.data.safe_pickle import safe_load


# ---- fixture writers -------------------------------------------------------------------------------------------
def square(x: float, y: float, size: float = 1.0) -> list:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def write_nyc(root: Path, t: int = 6) -> Path:
    """3 zones (ids 4, 103, 104 — 104 carries LocationID 103, as in the real GeoJSON), t hourly steps."""
    rng = np.random.default_rng(0)
    for d in ("60min", "30min", "zones"):
        (root / d).mkdir(parents=True)
    for mode in ("bike", "taxi"):
        prefix = f"201901-202012-NYC{mode}"
        np.savez_compressed(root / "60min" / f"{prefix}-inoutflow.npz", rng.poisson(5, (t, 3, 2)).astype(float))
        for kind in ("inflow", "outflow"):
            np.savez_compressed(root / "30min" / f"{prefix}-{kind}.npz", rng.poisson(3, (2 * t, 3)).astype(float))
    zones = pd.DataFrame({"zone_id": [4, 103, 104], "graph_id": [0, 1, 2],
                          "zone_name": ["Alphabet City", "Islands", "Islands"]})
    zones.to_csv(root / "zones" / "manhattan_zones.csv", index=False)
    features = [
        {"type": "Feature", "properties": {"OBJECTID": 4, "LocationID": 4},
         "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 2)]}},                    # centroid (1, 1)
        {"type": "Feature", "properties": {"OBJECTID": 103, "LocationID": 103},
         "geometry": {"type": "MultiPolygon", "coordinates": [[square(10, 10)], [square(12, 10)]]}},  # (11.5, 10.5)
        {"type": "Feature", "properties": {"OBJECTID": 104, "LocationID": 103},
         "geometry": {"type": "Polygon", "coordinates": [square(20, 20)]}},                    # (20.5, 20.5)
    ]
    with gzip.open(root / "zones" / "reprojected_manhattan_data.json.gz", "wt") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)
    adj = pd.DataFrame([[0, 1, 0], [1, 0, 1], [0, 1, 0]], columns=["0", "1", "2"])
    adj.to_csv(root / "zones" / "W_adj_matrix.csv", index=False)
    return root


def write_beijing(root: Path, t: int = 4) -> Path:
    root.mkdir(parents=True)
    rows = [f"{kdd}\t{116 + k / 100:.3f}\t{39.8 + k / 100:.3f}" for k, kdd in enumerate(STATION_IDS.values())]
    (root / "Beijing_AirQuality_Stations_cn.csv").write_text("\n".join(["otherstation_aq\t116.0\t39.0", *rows]))
    for k, station in enumerate(STATION_IDS):
        df = pd.DataFrame({"No": range(1, t + 1), "year": 2013, "month": 3, "day": 1, "hour": range(t),
                           "PM2.5": [9.0, np.nan, 10.0, 11.0][:t], "PM10": 20.0 + k, "SO2": 3.0, "NO2": 17.0,
                           "CO": 300.0, "O3": 89.0, "TEMP": -0.5, "PRES": 1024.5, "DEWP": -21.4, "RAIN": 0.0,
                           "wd": ["NNW", "E", None, "N"][:t], "WSPM": 5.7, "station": station})
        df.to_csv(root / f"PRSA_Data_{station}_20130301-20170228.csv.gz", index=False, na_rep="NA")
    return root


def write_bayarea(root: Path, t: int = 5) -> Path:
    root.mkdir(parents=True)
    flow = np.arange(t * 4 * 2, dtype=np.int32).reshape(t, 4, 2)
    time = np.arange(np.datetime64("2014-01-01T00", "h"), np.datetime64("2014-01-01T00", "h") + t)
    np.savez(root / "bayarea_bike_2014_60min.npz", flow=flow, time=time, station_id=np.array([2, 3, 39, 41], np.int32))
    pd.DataFrame({"station_id": [41, 39, 3, 2, 2],                 # CSV order differs; id 2 listed twice
                  "name": ["Clay at Battery", "Powell Street BART", "Civic", "Diridon", "Diridon"],
                  "lat": [37.795, 37.784, 37.331, 37.330, 37.330],
                  "lon": [-122.400, -122.408, -121.889, -121.902, -121.902], "dock_count": [15, 19, 15, 27, 27],
                  "landmark": ["San Francisco", "San Francisco", "San Jose", "San Jose", "San Jose"]}
                 ).to_csv(root / "stations_70.csv", index=False)
    return root


SENSORS = ["773869", "767541", "767542"]


def write_locations(path: Path, header: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"index": range(3), "sensor_id": SENSORS, "latitude": [34.15, 34.11, 34.12],
                       "longitude": [-118.31, -118.23, -118.24]})
    if header:
        df.to_csv(path, index=False)
    else:
        df.drop(columns="index").to_csv(path, index=False, header=False)


def write_dcrnn(folder: Path, fmt: str = "fixed") -> Path:
    """metr-la.h5 as DCRNN ships it: a frame written by `DataFrame.to_hdf` (key "df", the default 'fixed' format)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = pd.date_range("2012-03-01", periods=4, freq="5min")
    frame = pd.DataFrame([[60.0, 0.0, 55.0], [61.0, 50.0, 0.0], [62.0, 51.0, 54.0], [0.0, 52.0, 53.0]],
                         index=index, columns=SENSORS)
    frame.to_hdf(folder / "metr-la.h5", key="df", format=fmt)
    # the pickle lists the sensors in another order than the h5 columns: rows must be reordered
    pickled_ids = [SENSORS[2], SENSORS[0], SENSORS[1]]
    adj = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]], dtype=np.float32)
    with open(folder / "adj_mx.pkl", "wb") as f:
        pickle.dump([pickled_ids, {s: k for k, s in enumerate(pickled_ids)}, adj], f, protocol=2)
    write_locations(folder / "graph_sensor_locations.csv")
    return folder / "metr-la.h5"


# ---- NYC ---------------------------------------------------------------------------------------------------------
def test_polygon_centroid_handles_holes_and_multipolygons():
    assert polygon_centroid([[square(0, 0, 2)]]) == pytest.approx((1.0, 1.0))
    assert polygon_centroid([[square(0, 0)], [square(2, 0)]]) == pytest.approx((1.5, 0.5))
    outer, hole = square(0, 0, 4), square(1, 1)[::-1]
    expected = (16 * 2 - 1 * 1.5) / 15
    assert polygon_centroid([[outer, hole]]) == pytest.approx((expected, expected))


@pytest.mark.parametrize("mode, channels", [("bike", ["departures", "arrivals"]), ("taxi", ["dropoffs", "pickups"])])
def test_nyc_60min(tmp_path, mode, channels):
    root = write_nyc(tmp_path / "nyc")
    d = load_nyc(root, mode=mode)
    raw = np.load(root / "60min" / f"201901-202012-NYC{mode}-inoutflow.npz")["arr_0"]
    assert d.values.shape == (6, 3, 2) and np.array_equal(d.values, raw)
    assert d.channels == channels and d.units == ["trips", "trips"]
    assert d.name == f"nyc-{mode}-60min" and d.city == "New York (Manhattan)"
    assert d.domain == ("bike sharing" if mode == "bike" else "taxi")
    assert d.holidays == "US"                                  # prompts with <WHEN> name the US federal holidays
    assert pd.Timestamp(d.timestamps[0]) == pd.Timestamp("2019-01-01") and d.interval == pd.Timedelta("1h")
    assert d.nodes["id"].tolist() == ["4", "103", "104"]
    assert d.nodes[["lon", "lat"]].to_numpy() == pytest.approx(np.array([[1, 1], [11.5, 10.5], [20.5, 20.5]]))
    assert "Ellis Island" in d.nodes["description"][2]
    assert d.adjacency.shape == (3, 3) and d.adjacency[0, 1] == 1 and d.adjacency[0, 2] == 0


def test_nyc_30min_stacks_inflow_and_outflow(tmp_path):
    root = write_nyc(tmp_path / "nyc")
    d = load_nyc(root, mode="bike", interval="30min")
    inflow = np.load(root / "30min" / "201901-202012-NYCbike-inflow.npz")["arr_0"]
    outflow = np.load(root / "30min" / "201901-202012-NYCbike-outflow.npz")["arr_0"]
    assert d.values.shape == (12, 3, 2) and d.interval == pd.Timedelta("30min")
    assert np.array_equal(d.values[..., 0], inflow) and np.array_equal(d.values[..., 1], outflow)
    assert d.name == "nyc-bike-30min"


def test_nyc_errors_name_the_file(tmp_path):
    root = write_nyc(tmp_path / "nyc")
    np.savez(root / "60min" / "201901-202012-NYCbike-inoutflow.npz", np.zeros((6, 3)))
    with pytest.raises(DataError, match=r"NYCbike-inoutflow\.npz.*shape \(6, 3\).*\[\*, \*, 2\]"):
        load_nyc(root, "bike")
    (root / "60min" / "201901-202012-NYCtaxi-inoutflow.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"NYCtaxi-inoutflow\.npz.*not a readable \.npz"):
        load_nyc(root, "taxi")
    with pytest.raises(DataError, match=r"elsewhere.*NYCbike-inoutflow\.npz: file not found"):
        load_nyc(tmp_path / "elsewhere", "bike")
    with pytest.raises(DataError, match="mode"):
        load_nyc(root, "bus")


# ---- Beijing -----------------------------------------------------------------------------------------------------
def test_beijing_values_exog_and_coordinates(tmp_path):
    d = load_beijing(write_beijing(tmp_path / "bj"))
    assert d.values.shape == (4, 12, 6) and d.channels == ["PM2.5", "PM10", "SO2", "NO2", "CO", "O3"]
    assert d.units == ["ug/m3"] * 6 and d.domain == "air quality"
    assert d.holidays == ""                                    # no Chinese holiday calendar: dates only
    assert np.isnan(d.values[1, :, 0]).all() and d.values[0, 0, 0] == 9.0
    assert d.values[0, :, 1].tolist() == [20.0 + k for k in range(12)]
    assert d.exog.shape == (4, 12, 6)
    assert d.exog_names == ["temperature", "pressure", "dew_point", "rain", "wind_speed", "wind_dir_deg"]
    wind_dir = d.exog[:, 0, 5]
    assert wind_dir[[0, 1, 3]].tolist() == [337.5, 90.0, 0.0] and np.isnan(wind_dir[2])
    assert d.exog[0, 0, 4] == pytest.approx(5.7)
    changping = d.nodes.set_index("id").loc["Changping"]      # "pingchang_aq" in the KDD list
    assert (changping["lon"], changping["lat"]) == pytest.approx((116.01, 39.81))
    assert pd.Timestamp(d.timestamps[3]) == pd.Timestamp("2013-03-01 03:00")


def test_beijing_channel_subset_and_errors(tmp_path):
    root = write_beijing(tmp_path / "bj")
    assert load_beijing(root, channels=["PM2.5"]).channels == ["PM2.5"]
    with pytest.raises(DataError, match="PM1"):
        load_beijing(root, channels=["PM1"])
    (root / "PRSA_Data_Dongsi_20130301-20170228.csv.gz").unlink()
    with pytest.raises(DataError, match="PRSA_Data_Dongsi.*not found"):
        load_beijing(root)


def test_compass_to_degrees():
    out = compass_to_degrees(pd.Series(["N", "NNE", "S", "WNW", None, "CV"]))
    assert out[:4].tolist() == [0.0, 22.5, 180.0, 292.5] and np.isnan(out[4:]).all()


# ---- Bay Area ----------------------------------------------------------------------------------------------------
def test_bayarea_all_and_sf(tmp_path):
    root = write_bayarea(tmp_path / "ba")
    d = load_bayarea(root)
    assert d.values.shape == (5, 4, 2) and d.channels == ["departures", "arrivals"]
    assert d.nodes["id"].tolist() == ["2", "3", "39", "41"]          # the npz's order, not the CSV's
    assert d.nodes["lat"].tolist() == [37.330, 37.331, 37.784, 37.795]
    sf = load_bayarea(root, sf_only=True)
    assert sf.name == "bayarea-bike-sf" and sf.city == "San Francisco"
    assert sf.nodes["id"].tolist() == ["39", "41"] and np.array_equal(sf.values, d.values[:, 2:])


def test_bayarea_station_missing_from_table(tmp_path):
    root = write_bayarea(tmp_path / "ba")
    pd.read_csv(root / "stations_70.csv").query("station_id != 39").to_csv(root / "stations_70.csv", index=False)
    with pytest.raises(DataError, match=r"stations_70\.csv.*\['39'\]"):
        load_bayarea(root)


# ---- Los-loop ----------------------------------------------------------------------------------------------------
def test_losloop(tmp_path):
    root = tmp_path / "LosLoop"
    root.mkdir()
    speeds = pd.DataFrame([[64.4, 67.6, 67.1], [60.0, 61.0, 62.0], [50.0, 51.0, 52.0]], columns=SENSORS)
    speeds.to_csv(root / "los_speed.csv.gz", index=False)
    pd.DataFrame(np.eye(3)).to_csv(root / "los_adj.csv.gz", index=False, header=False)
    write_locations(tmp_path / "METR-LA" / "graph_sensor_locations.csv")
    d = load_losloop(root)
    assert d.values.shape == (3, 3, 1) and d.channels == ["speed"] and d.units == ["mph"]
    assert d.interval == pd.Timedelta("5min") and pd.Timestamp(d.timestamps[0]) == pd.Timestamp("2012-03-01")
    assert d.nodes["id"].tolist() == SENSORS and d.nodes["lat"].tolist() == [34.15, 34.11, 34.12]
    assert np.array_equal(d.adjacency, np.eye(3))
    pd.DataFrame(np.eye(2)).to_csv(root / "los_adj.csv.gz", index=False, header=False)
    with pytest.raises(DataError, match=r"los_adj\.csv\.gz.*shape \(2, 2\).*\[3, 3\]"):
        load_losloop(root)


# ---- PEMS0x --------------------------------------------------------------------------------------------------------
def test_pems04_edges_become_distances(tmp_path):
    np.savez(tmp_path / "PEMS04.npz", data=np.arange(6 * 3 * 3, dtype=float).reshape(6, 3, 3))
    (tmp_path / "PEMS04.csv").write_text("from,to,cost\n0,1,350.5\n1,2,200.0\n1,2,150.0\n")
    d = load_pems(tmp_path / "PEMS04.npz")
    assert d.values.shape == (6, 3, 3) and d.channels == ["flow", "occupancy", "speed"]
    assert pd.Timestamp(d.timestamps[0]) == pd.Timestamp("2018-01-01") and d.interval == pd.Timedelta("5min")
    assert d.distances[0, 1] == 350.5 and d.distances[1, 2] == 150.0     # duplicate pair keeps the smaller cost
    assert np.isinf(d.distances[1, 0]) and np.isinf(d.distances[0, 2]) and (np.diag(d.distances) == 0).all()
    assert d.adjacency.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert load(tmp_path / "PEMS04.npz").name == "pems04"              # dispatch by extension


def test_pems03_maps_station_ids(tmp_path):
    np.savez(tmp_path / "PEMS03.npz", data=np.ones((4, 3, 1)))
    (tmp_path / "PEMS03.txt").write_text("313344\n313349\n313438\n")
    (tmp_path / "PEMS03.csv").write_text("from,to,distance\n313344,313438,0.872\n")
    d = load_pems(tmp_path / "PEMS03.npz")
    assert d.channels == ["flow"] and d.nodes["id"].tolist() == ["313344", "313349", "313438"]
    assert d.distances[0, 2] == pytest.approx(0.872) and pd.Timestamp(d.timestamps[0]) == pd.Timestamp("2018-09-01")
    (tmp_path / "PEMS03.csv").write_text("from,to,distance\n313344,999999,0.872\n")
    with pytest.raises(DataError, match=r"PEMS03\.csv.*unknown nodes.*999999"):
        load_pems(tmp_path / "PEMS03.npz")


def test_pems_errors(tmp_path):
    np.savez(tmp_path / "PEMS99.npz", data=np.ones((4, 2, 1)))
    (tmp_path / "PEMS99.csv").write_text("from,to,cost\n0,1,1.0\n")
    with pytest.raises(DataError, match="start="):
        load_pems(tmp_path / "PEMS99.npz")
    assert pd.Timestamp(load_pems(tmp_path / "PEMS99.npz", start="2020-01-01").timestamps[0]).year == 2020
    np.savez(tmp_path / "PEMS08.npz", flow=np.ones((4, 2, 1)))
    with pytest.raises(DataError, match=r"PEMS08\.npz.*no array 'data'"):
        load_pems(tmp_path / "PEMS08.npz")


# ---- METR-LA / PEMS-BAY ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fixed", "table"])
def test_dcrnn_h5(tmp_path, fmt):
    h5 = write_dcrnn(tmp_path / "METR-LA", fmt)
    d = load_dcrnn(h5)
    assert d.name == "metr-la" and d.values.shape == (4, 3, 1) and d.interval == pd.Timedelta("5min")
    assert pd.Timestamp(d.timestamps[0]) == pd.Timestamp("2012-03-01")
    assert np.isnan(d.values[0, 1, 0]) and np.isnan(d.values[3, 0, 0]) and d.values[0, 0, 0] == 60.0   # 0 -> NaN
    assert d.nodes["id"].tolist() == SENSORS and d.nodes["lon"].tolist() == [-118.31, -118.23, -118.24]
    # adj_mx rows follow the pickle's order [s2, s0, s1]; the loader puts them in column order [s0, s1, s2]
    np.testing.assert_allclose(d.adjacency, [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]])
    assert load(h5).name == "metr-la" and load(h5.parent).n_nodes == 3      # path and folder dispatch


def test_dcrnn_with_distances_and_headerless_locations(tmp_path):
    h5 = write_dcrnn(tmp_path / "bay")
    write_locations(tmp_path / "bay" / "graph_sensor_locations.csv", header=False)
    with gzip.open(tmp_path / "bay" / "distances_bay_2017.csv.gz", "wt") as f:
        f.write(f"{SENSORS[0]},{SENSORS[1]},120.5\n{SENSORS[1]},{SENSORS[0]},130.0\n")
    d = load_dcrnn(h5)
    assert d.distances[0, 1] == 120.5 and d.distances[1, 0] == 130.0 and np.isinf(d.distances[0, 2])
    assert d.nodes["lat"].tolist() == [34.15, 34.11, 34.12]


def test_dcrnn_errors(tmp_path):
    h5 = write_dcrnn(tmp_path / "m")
    (tmp_path / "m" / "adj_mx.pkl").unlink()
    with pytest.raises(DataError, match=r"adj_mx\*\.pkl"):
        load_dcrnn(h5)
    (tmp_path / "m" / "broken.h5").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"broken\.h5.*not a readable pandas HDF5"):
        load_dcrnn(tmp_path / "m" / "broken.h5")
    with pytest.raises(DataError, match=r"missing\.h5: file not found"):
        load_dcrnn(tmp_path / "m" / "missing.h5")
    two = tmp_path / "m" / "two.h5"
    pd.DataFrame({"a": [1.0]}).to_hdf(two, key="one")
    pd.DataFrame({"a": [2.0]}).to_hdf(two, key="other")
    with pytest.raises(DataError, match=r"two\.h5: not a readable pandas HDF5 frame.*key"):
        load_dcrnn(two)
    pd.Series([1.0, 2.0]).to_hdf(tmp_path / "m" / "series.h5", key="s")
    with pytest.raises(DataError, match=r"series\.h5: holds a Series"):
        load_dcrnn(tmp_path / "m" / "series.h5")


@pytest.mark.parametrize("folder", ["METR-LA", "PEMS-BAY"])
def test_dcrnn_with_the_real_sensor_graph(folder, data_root, tmp_path):
    """The shared data ships DCRNN's sensor graphs and locations but not the speed series (over its size budget, see
    SOURCE.md): a two-day stand-in series, written by pandas with the real sensor ids as columns, loads with the real
    adjacency pickle (through the restricted unpickler), the real coordinates and the road distances."""
    import shutil
    src = data_root / folder
    for f in src.iterdir():
        if f.suffix != ".md":
            shutil.copy(f, tmp_path / f.name)
    table = pd.read_csv(next(tmp_path.glob("graph_sensor_locations*.csv")), header=None, dtype=str)
    ids = table.iloc[:, 1 if folder == "METR-LA" else 0].tolist()      # METR-LA: index,sensor_id,lat,lon + header
    ids = [i for i in ids if i.isdigit()]                              # the header row, where there is one
    index = pd.date_range("2017-01-01", periods=2 * 288, freq="5min")
    speeds = np.random.default_rng(0).uniform(20, 70, (len(index), len(ids)))
    name = "metr-la.h5" if folder == "METR-LA" else "pems-bay.h5"
    pd.DataFrame(speeds, index=index, columns=ids).to_hdf(tmp_path / name, key="df")
    city = load_dcrnn(tmp_path / name)
    assert city.values.shape == (576, len(ids), 1) and city.n_nodes in (207, 325)
    assert city.interval == pd.Timedelta("5min") and city.has_coordinates and city.adjacency is not None
    assert city.nodes["id"].astype(str).tolist() == ids


# ---- safe pickle -----------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_safe_load_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([1, _Exploit(marker)]))
    with pytest.raises(DataError, match=r"evil\.pkl.*forbidden global (posix|os|nt)\.system"):
        safe_load(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(types.SimpleNamespace(a=1)))
    with pytest.raises(DataError, match="forbidden global types.SimpleNamespace"):
        safe_load(path)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_safe_load_reads_arrays_containers_and_gzip(tmp_path, protocol):
    obj = [["a", "b"], {"a": 0, "b": 1}, np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5), (1, b"x")]
    path = tmp_path / "ok.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    out = safe_load(path)
    assert out[0] == ["a", "b"] and out[1] == {"a": 0, "b": 1} and out[3] == 2.5 and out[4] == (1, b"x")
    assert np.array_equal(out[2], obj[2]) and out[2].dtype == np.float32


def test_safe_load_python2_pickle(tmp_path):
    # protocol-0 pickle as Python 2 writes it: __builtin__ names, a str holding raw bytes
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"(lp0\nS'773869'\np1\na(dp2\nS'773869'\np3\nI0\nsa.")
    assert safe_load(path) == ["773869", {"773869": 0}]


def test_safe_load_corrupt_and_missing(tmp_path):
    path = tmp_path / "trunc.pkl"
    path.write_bytes(pickle.dumps(list(range(100)))[:20])
    with pytest.raises(DataError, match=r"trunc\.pkl.*not a readable pickle"):
        safe_load(path)
    with pytest.raises(DataError, match=r"nope\.pkl.*not found"):
        safe_load(tmp_path / "nope.pkl")


# ---- bring your own city ---------------------------------------------------------------------------------------------
def write_sensors(path: Path, coords: bool = True) -> None:
    df = pd.DataFrame({"id": ["s2", "s1", "s3"], "name": ["Second", "First", "Unused"]})
    if coords:
        df["lat"], df["lon"] = [45.1, 45.0, 45.2], [9.1, 9.0, 9.2]
    df.to_csv(path, index=False)


def test_byo_wide_reindexes_gaps(tmp_path):
    (tmp_path / "values.csv").write_text(
        "timestamp,s1,s2\n2024-01-01 00:00,1,10\n2024-01-01 00:15,2,\n2024-01-01 00:45,4,40\n")
    write_sensors(tmp_path / "sensors.csv")
    d = load_byo(tmp_path / "values.csv", city="Milan", units=["people"])
    assert d.values.shape == (4, 2, 1) and d.interval == pd.Timedelta("15min")
    assert d.nodes["id"].tolist() == ["s2", "s1"]        # sensors.csv order; unused sensors dropped
    assert d.values[:, 1, 0].tolist()[:2] == [1, 2] and np.isnan(d.values[2]).all()   # 00:30 missing
    assert np.isnan(d.values[1, 0, 0]) and d.values[3, 0, 0] == 40
    assert d.channels == ["value"] and d.units == ["people"] and d.city == "Milan" and d.name == tmp_path.name
    assert d.holidays == "" and load_byo(tmp_path / "values.csv", holidays="US").holidays == "US"


def test_byo_long_with_several_channels(tmp_path):
    (tmp_path / "flows.csv").write_text(
        "timestamp,sensor,inflow,outflow\n"
        "2024-01-01T00:00,s1,1,2\n2024-01-01T00:00,s2,3,4\n2024-01-01T01:00,s1,5,6\n2024-01-01T03:00,s2,7,\n")
    write_sensors(tmp_path / "sensors.csv")
    d = load(tmp_path / "flows.csv")                      # dispatch by extension; sensors.csv found alongside
    assert d.name == "flows" and d.channels == ["inflow", "outflow"] and d.values.shape == (4, 2, 2)
    s1 = d.node_index(["s1"])[0]
    assert d.values[0, s1].tolist() == [1, 2] and d.values[1, s1].tolist() == [5, 6]
    assert np.isnan(d.values[2]).all() and np.isnan(d.values[3, d.node_index(["s2"])[0], 1])


def test_byo_adjacency_instead_of_coordinates(tmp_path):
    (tmp_path / "values.csv").write_text("timestamp,sensor,value\n2024-01-01,s1,1\n2024-01-02,s2,2\n")
    write_sensors(tmp_path / "sensors.csv", coords=False)
    with pytest.raises(DataError, match=r"sensors\.csv.*lat/lon.*adjacency="):
        load(tmp_path)
    # matrix in another order than sensors.csv, with an id column
    (tmp_path / "adjacency.csv").write_text("id,s1,s2\ns1,0,1\ns2,0.5,0\n")
    d = load(tmp_path)                                    # folder dispatch picks up adjacency.csv
    assert not d.has_coordinates and d.interval == pd.Timedelta("1D")
    assert d.nodes["id"].tolist() == ["s2", "s1"] and d.adjacency.tolist() == [[0, 0.5], [1, 0]]
    (tmp_path / "edges.csv").write_text("from,to\ns1,s2\n")
    assert load(tmp_path, adjacency=tmp_path / "edges.csv").adjacency.tolist() == [[0, 0], [1, 0]]
    (tmp_path / "dist.csv").write_text("from,to,distance\ns1,s2,3.5\ns2,s1,3.5\n")
    (tmp_path / "adjacency.csv").unlink()
    d = load(tmp_path, distances=tmp_path / "dist.csv")
    assert d.adjacency is None and d.distances.tolist() == [[0, 3.5], [3.5, 0]]


GOOD_VALUES = "timestamp,s1,s2\n2024-01-01 00:00,1,2\n2024-01-01 00:10,1,2\n"


@pytest.mark.parametrize("values, match", [
    ("timestamp,s1,s2\n2024-01-01 00:00,1,2\n2024-01-01 00:10,1,2\n2024-01-01 00:25,1,2\n",
     r"values\.csv.*irregular"),
    ("timestamp,s1,s9\n2024-01-01 00:00,1,2\n2024-01-01 00:10,1,2\n", r"sensors\.csv.*not listed.*s9"),
    ("time,s1\n2024-01-01 00:00,1\n", r"values\.csv.*'timestamp'"),
    ("timestamp,s1,s2\n2024-01-01 00:00,1,abc\n2024-01-01 00:10,1,2\n", r"values\.csv.*'s2'.*non-numeric"),
])
def test_byo_errors_name_the_file(tmp_path, values, match):
    write_sensors(tmp_path / "sensors.csv")
    (tmp_path / "values.csv").write_text(values)
    with pytest.raises(DataError, match=match):
        load_byo(tmp_path / "values.csv")


def test_byo_errors_name_the_other_files(tmp_path):
    write_sensors(tmp_path / "sensors.csv")
    (tmp_path / "values.csv").write_text(GOOD_VALUES)
    (tmp_path / "adj.csv").write_text("s1,s2\n0,1\n")
    with pytest.raises(DataError, match=r"adj\.csv.*adjacency matrix has shape \(1, 2\)"):
        load_byo(tmp_path / "values.csv", adjacency=tmp_path / "adj.csv")
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        load_byo(tmp_path / "values.csv", sensors=tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no values\.csv"):
        load_byo(tmp_path / "empty")


# ---- registry --------------------------------------------------------------------------------------------------------
def test_load_builtin_from_root_and_env(tmp_path, monkeypatch):
    write_bayarea(tmp_path / "BayArea_BikeShare_2014")
    assert load("bayarea-bike-sf", root=tmp_path).n_nodes == 2
    monkeypatch.setenv("STLLM_DATA_ROOT", str(tmp_path))
    assert load("bayarea-bike").n_nodes == 4
    with pytest.raises(DataError, match=r"LosLoop.*los-loop"):
        load("los-loop")
    monkeypatch.setenv("STLLM_DATA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="absent.*STLLM_DATA_ROOT"):
        load("bayarea-bike")
    monkeypatch.delenv("STLLM_DATA_ROOT")
    with pytest.raises(DataError, match="STLLM_DATA_ROOT"):
        load("nyc-bike")


def test_load_unknown_name_and_format(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nyc-bus'.*nyc-bike"):
        load("nyc-bus")
    (tmp_path / "data.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.parquet: unsupported format"):
        load(tmp_path / "data.parquet")
    with pytest.raises(DataError, match=r"nothing\.csv: file not found"):
        load(tmp_path / "nothing.csv")


def test_load_synthetic_dispatches_lazily(monkeypatch):
    fake = types.ModuleType("stllm.data.synthetic")
    fake.make_city = lambda **kw: ("made", kw)
    monkeypatch.setitem(sys.modules, "stllm.data.synthetic", fake)
    assert load("synthetic", n_nodes=5) == ("made", {"n_nodes": 5})


def test_loaders_return_citydata(tmp_path):
    assert isinstance(load_nyc(write_nyc(tmp_path / "nyc")), CityData)
