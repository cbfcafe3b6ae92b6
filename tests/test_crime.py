"""The crime loader (ST-SHN / STHSL layout) on fixture pickles written here, and on the real files when present."""
from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import real_data
from stllm.data import DataError, load
from stllm.data.loaders.crime import (CITIES, LAT_CELL_DEG, LON_CELL_DEG, crime_grid_origin, crime_split_bounds,
                                      load_crime)

ROWS, COLS, DAYS = 3, 2, (5, 2, 3)  # fixture grid and trn / val / tst lengths


# ---- fixture writers -------------------------------------------------------------------------------------------
def write_split(path: Path, array: np.ndarray) -> None:
    """One pickled float64 array, gzip-compressed when the name ends in .gz (as in shared/data)."""
    raw = pickle.dumps(np.asarray(array, dtype=np.float64), protocol=3)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_city(root: Path, folder: str = "NYC_crime", ext: str = ".pkl.gz", seed: int = 0) -> list[np.ndarray]:
    """trn/val/tst count tensors (ROWS, COLS, days, 4) under root/folder; returns them."""
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    parts = [rng.poisson(0.7, (ROWS, COLS, d, 4)).astype(np.float64) for d in DAYS]
    for split, part in zip(("trn", "val", "tst"), parts):
        write_split(root / folder / f"{split}{ext}", part)
    return parts


def write_nyc_zip(folder: Path, lat: np.ndarray, lon: np.ndarray) -> None:
    """NYC_Crime.zip holding NYC_Crime.csv in the raw layout (header; latitude, longitude in columns 5, 6)."""
    df = pd.DataFrame({"Occurrence Date": "01/01/2014 12:00:00 AM", "Day of Week": "Wednesday",
                       "Offense": "ROBBERY", "Sector": "", "Precinct": 1, "Latitude": lat, "Longitude": lon})
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    with zipfile.ZipFile(folder / "NYC_Crime.zip", "w") as zf:
        zf.writestr("NYC_Crime.csv", buf.getvalue())


# ---- fixture tests ---------------------------------------------------------------------------------------------
def test_load_crime_layout(tmp_path):
    parts = write_city(tmp_path)
    city = load_crime(tmp_path, "nyc")
    t = sum(DAYS)
    assert city.values.shape == (t, ROWS * COLS, 4) and city.values.dtype == np.float32
    full = np.concatenate(parts, axis=2)
    for r in range(ROWS):
        for c in range(COLS):   # STHSL's region id: row * cols + col
            np.testing.assert_array_equal(city.values[:, r * COLS + c, :], full[r, c])
    assert city.nodes["id"].tolist() == [f"r{r}c{c}" for r in range(ROWS) for c in range(COLS)]
    assert city.nodes["description"][3] == "grid cell row 1, col 1"
    assert city.channels == ["burglary", "grand larceny", "robbery", "felony assault"]
    assert city.units == ["events"] * 4
    assert (city.name, city.city, city.domain) == ("nyc-crime", "New York", "crime")
    assert city.interval == pd.Timedelta("1D")
    assert pd.Timestamp(city.timestamps[0]) == pd.Timestamp("2014-01-01")
    assert pd.Timestamp(city.timestamps[-1]) == pd.Timestamp("2014-01-10")
    # no zip: the stored south-west corner; centres half a cell in
    lat0, lon0 = CITIES["nyc"].origin
    assert city.nodes["lat"][3] == pytest.approx(lat0 + 1.5 * 3 / 111)
    assert city.nodes["lon"][3] == pytest.approx(lon0 + 1.5 * 3 / 84)
    assert crime_split_bounds(tmp_path, "nyc") == (5, 7)


def test_city_names_and_roots(tmp_path):
    write_city(tmp_path, "CHI_crime", ext=".pkl", seed=1)   # plain .pkl, as in the ST-SHN repository
    a = load_crime(tmp_path, "Chicago")
    b = load_crime(tmp_path / "CHI_crime", "chi")            # the city folder itself works too
    np.testing.assert_array_equal(a.values, b.values)
    assert a.channels == ["theft", "battery", "assault", "criminal damage"]
    assert (a.name, a.city) == ("chicago-crime", "Chicago")
    assert pd.Timestamp(a.timestamps[0]) == pd.Timestamp("2016-01-01")
    with pytest.raises(DataError, match="unknown crime city"):
        load_crime(tmp_path, "boston")
    with pytest.raises(DataError, match="no trn.pkl"):
        load_crime(tmp_path, "nyc")


def test_registry_names(tmp_path):
    write_city(tmp_path / "NYC_CHI_Crime")
    write_city(tmp_path / "NYC_CHI_Crime", "CHI_crime", seed=1)
    nyc, chi = load("nyc-crime", root=tmp_path), load("chicago-crime", root=tmp_path)
    assert nyc.name == "nyc-crime" and chi.name == "chicago-crime"
    assert not np.array_equal(nyc.values, chi.values)


def test_grid_origin_from_raw_zip(tmp_path):
    write_city(tmp_path)
    folder = tmp_path / "NYC_crime"
    lat0, lon0 = 40.6, -74.1
    # events spanning exactly a 3 x 2 grid of 3 km cells
    lat = np.array([lat0, lat0 + 2.5 * LAT_CELL_DEG, lat0 + LAT_CELL_DEG])
    lon = np.array([lon0 + LON_CELL_DEG, lon0, lon0 + 1.5 * LON_CELL_DEG])
    write_nyc_zip(folder, lat, lon)
    assert crime_grid_origin(folder, "nyc", shape=(ROWS, COLS)) == pytest.approx((lat0, lon0))
    city = load_crime(tmp_path, "nyc")
    assert city.nodes["lat"][0] == pytest.approx(lat0 + 0.5 * LAT_CELL_DEG)
    assert city.nodes["lon"][0] == pytest.approx(lon0 + 0.5 * LON_CELL_DEG)
    # a raw event list whose bounding box makes another grid does not belong to these tensors
    write_nyc_zip(folder, np.array([lat0, lat0 + 0.1, lat0 + 0.2]), lon)
    with pytest.raises(DataError, match="does not belong"):
        load_crime(tmp_path, "nyc")


def test_bad_files(tmp_path):
    folder = tmp_path / "NYC_crime"
    write_city(tmp_path)
    write_split(folder / "val.pkl.gz", np.zeros((ROWS, COLS, 4)))          # 3-D
    with pytest.raises(DataError, match="val.pkl.gz.*rows, cols, days, 4"):
        load_crime(tmp_path)
    write_split(folder / "val.pkl.gz", np.zeros((ROWS + 1, COLS, 2, 4)))   # another grid
    with pytest.raises(DataError, match="grids differ"):
        load_crime(tmp_path)
    write_split(folder / "val.pkl.gz", -np.ones((ROWS, COLS, 2, 4)))
    with pytest.raises(DataError, match=">= 0"):
        load_crime(tmp_path)
    (folder / "val.pkl.gz").write_bytes(gzip.compress(pickle.dumps(pd.Timestamp("2014-01-01"))))
    with pytest.raises(DataError, match="forbidden global"):
        load_crime(tmp_path)
    (folder / "val.pkl.gz").unlink()
    with pytest.raises(DataError, match="val.pkl"):
        load_crime(tmp_path)


# ---- real data -------------------------------------------------------------------------------------------------
# Per-category totals over trn + val + tst and the split lengths, from shared/data/NYC_CHI_Crime/SOURCE.md.
REAL = {
    "nyc": dict(grid=(16, 16), t=730, start="2014-01-01", end="2015-12-31", bounds=(608, 638),
                totals=[26514 + 1368 + 3917, 71557 + 3741 + 10601, 27341 + 1519 + 4593, 33795 + 1798 + 4836],
                names=["burglary", "grand larceny", "robbery", "felony assault"], empty_cells=129),
    "chicago": dict(grid=(14, 12), t=731, start="2016-01-01", end="2017-12-31", bounds=(609, 639),
                    totals=[102991 + 5452 + 16187, 83491 + 4389 + 11509, 31763 + 1783 + 4426, 50570 + 2411 + 6904],
                    names=["theft", "battery", "assault", "criminal damage"], empty_cells=74),
}


@pytest.mark.parametrize("name", ["nyc", "chicago"])
def test_real_crime(name):
    root = real_data("NYC_CHI_Crime")
    ref = REAL[name]
    city = load(f"{name}-crime", root=root.parent)
    rows, cols = ref["grid"]
    assert city.values.shape == (ref["t"], rows * cols, 4)
    assert city.channels == ref["names"]
    assert pd.Timestamp(city.timestamps[0]) == pd.Timestamp(ref["start"])
    assert pd.Timestamp(city.timestamps[-1]) == pd.Timestamp(ref["end"])
    np.testing.assert_array_equal(city.values.sum(axis=(0, 1)), ref["totals"])
    assert int((city.values.sum(axis=(0, 2)) == 0).sum()) == ref["empty_cells"]
    assert crime_split_bounds(root, name) == ref["bounds"]
    # the calendar split: trn ends on Aug 31, val on Sep 30 of the second year
    train_end, test_start = ref["bounds"]
    assert pd.Timestamp(city.timestamps[train_end]).strftime("%m-%d") == "09-01"
    assert pd.Timestamp(city.timestamps[test_start]).strftime("%m-%d") == "10-01"
    # the stored corner (used without the zip) is what the raw event list gives
    spec = CITIES[name]
    assert crime_grid_origin(root / spec.folder, name, shape=(rows, cols)) == spec.origin
    lat0, lon0 = spec.origin
    assert city.nodes["lat"].min() == pytest.approx(lat0 + 0.5 * LAT_CELL_DEG)
    assert city.nodes["lon"].max() == pytest.approx(lon0 + (cols - 0.5) * LON_CELL_DEG)
