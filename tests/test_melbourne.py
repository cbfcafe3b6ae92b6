"""Melbourne pedestrian counts (UCTB zip of a pickled dict): a tiny file written here, and the real one."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pandas as pd
import pytest

import stllm.data
from stllm.data.city import DataError
from stllm.data.loaders.melbourne import load_melbourne
from conftest import real_data

STATIONS = [[1, "2009-03-24", -37.81349441, 144.96515323, "Bou292_T"],
            [2, "2009-03-30", -37.81380668, 144.96516718, "Bou283_T"],
            [3, "2009-03-25", -37.81101524, 144.96429485, "Swa295_T"]]


def write_uctb(path, counts: np.ndarray, stations=STATIONS, time_range=("2021-10-02", "2021-10-04"),
               payload=None) -> None:
    """A zip holding Pedestrian_Melbourne.pkl with UCTB's dict layout (protocol 3 like the real file)."""
    data = payload or {"TimeRange": list(time_range), "TimeFitness": 60,
                       "Node": {"TrafficNode": counts, "TrafficMonthlyInteraction": [], "StationInfo": stations,
                                "POI": []},
                       "Grid": {"TrafficGrid": [], "GridLatLng": [], "POI": []}, "ExternalFeature": {"Weather": []}}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Pedestrian_Melbourne.pkl", pickle.dumps(data, protocol=3))


def tiny_counts() -> np.ndarray:
    counts = np.arange(48 * 3, dtype=np.int16).reshape(48, 3) + 1
    counts[5, 1] = -1                             # a missing reading
    counts[26] = 0                                # 2021-10-03 02:00 does not exist in Melbourne (DST starts)
    return counts


def test_tiny_file_in_the_uctb_format(tmp_path):
    write_uctb(tmp_path / "Pedestrian_Melbourne.zip", tiny_counts())
    city = load_melbourne(tmp_path)                                   # the folder, as the registry passes it
    assert city.values.shape == (48, 3, 1) and city.values.dtype == np.float32
    assert city.channels == ["pedestrians"] and city.units == ["people"] and city.interval == pd.Timedelta("1h")
    assert pd.Timestamp(city.timestamps[0]) == pd.Timestamp("2021-10-02 00:00")
    assert np.isnan(city.values[5, 1, 0]) and city.values[5, 0, 0] == 16
    assert np.isnan(city.values[26]).all()                            # the skipped clock hour is not a zero
    assert not np.isnan(city.values[[25, 27]]).any()
    assert city.nodes["id"].tolist() == ["1", "2", "3"] and city.nodes["name"].tolist() == ["Bou292_T", "Bou283_T",
                                                                                          "Swa295_T"]
    assert city.nodes["lat"].tolist() == [s[2] for s in STATIONS]
    assert "installed 2009-03-24" in city.nodes["description"][0]
    assert (city.city, city.domain, city.holidays) == ("Melbourne", "pedestrian counts", "AU-VIC")


def test_sensor_names_from_a_csv_replace_the_codes(tmp_path):
    write_uctb(tmp_path / "Pedestrian_Melbourne.zip", tiny_counts())
    (tmp_path / "names.csv").write_text("id,name,description\n2,Bourke Street Mall (South),\n1,Bourke Street Mall "
                                        "(North),a pedestrian mall\n")
    city = load_melbourne(tmp_path / "Pedestrian_Melbourne.zip", sensors=tmp_path / "names.csv", holidays="AU")
    assert city.nodes["name"].tolist() == ["Bourke Street Mall (North)", "Bourke Street Mall (South)", "Swa295_T"]
    assert city.nodes["description"][0] == "a pedestrian mall" and "Bou283_T" in city.nodes["description"][1]
    assert city.holidays == "AU"
    (tmp_path / "bad.csv").write_text("id,name\n99,Nowhere\n")
    with pytest.raises(DataError, match=r"bad.csv: sensor ids \['99'\] are not in the data"):
        load_melbourne(tmp_path, sensors=tmp_path / "bad.csv")


def test_malformed_files_are_named_errors(tmp_path):
    path = tmp_path / "Pedestrian_Melbourne.zip"
    write_uctb(path, tiny_counts()[:47])
    with pytest.raises(DataError, match="is 48 steps, but Node.TrafficNode has 47 rows"):
        load_melbourne(path)
    write_uctb(path, tiny_counts(), stations=STATIONS[:2])
    with pytest.raises(DataError, match=r"one \[id, install_date, lat, lon, name\] entry per column .*\(3\); has 2"):
        load_melbourne(path)
    write_uctb(path, tiny_counts(), payload={"TimeRange": ["2021-10-02", "2021-10-04"], "Node": {}})
    with pytest.raises(DataError, match="expected a UCTB dict"):
        load_melbourne(path)
    write_uctb(path, tiny_counts(), payload={"x": pd.Timestamp("2021-01-01")})     # a global outside the allow-list
    with pytest.raises(DataError, match="Pedestrian_Melbourne.pkl: pickle refers to forbidden global pandas"):
        load_melbourne(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_melbourne(path)
    with pytest.raises(DataError, match="file not found"):
        load_melbourne(tmp_path / "elsewhere")


def test_real_melbourne_pedestrians(data_root):
    real_data("Melbourne_Pedestrian", "Pedestrian_Melbourne.zip")
    city = stllm.data.load("melbourne-pedestrian", root=data_root)
    assert city.values.shape == (16056, 55, 1) and city.interval == pd.Timedelta("1h")
    assert (pd.Timestamp(city.timestamps[0]), pd.Timestamp(city.timestamps[-1])) == (
        pd.Timestamp("2021-01-01 00:00"), pd.Timestamp("2022-10-31 23:00"))
    lat, lon = city.nodes["lat"].to_numpy(), city.nodes["lon"].to_numpy()
    assert ((lat > -37.85) & (lat < -37.78)).all() and ((lon > 144.92) & (lon < 145.0)).all()   # central Melbourne
    assert not np.isnan(city.values).all(axis=(0, 2)).any()                                   # no empty sensor
    assert 0.01 < np.isnan(city.values).mean() < 0.02                                         # -1 cells (1.4 %)
    assert np.nanmin(city.values) >= 0 and city.nodes["name"][0] == "Bou292_T"
    assert np.isnan(city.values[city.time_index("2021-10-03 02:00")]).all()                   # DST gap
    # the evening peak is busier than the small hours
    hourly = np.nanmean(city.values[:, :, 0].reshape(-1, 24, city.n_nodes), axis=(0, 2))      # [24]
    assert hourly[17] > 5 * hourly[3]
