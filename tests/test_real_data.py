"""Built-in datasets from $STLLM_DATA_ROOT (skipped without it; failing instead when CI=true)."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from stllm.data import load
from stllm.data.loaders._common import read_edges
from stllm.data.loaders.standard import read_adj_pkl
from stllm.data.safe_pickle import safe_load

pytestmark = pytest.mark.slow


def assert_coordinates(data, lat: tuple[float, float], lon: tuple[float, float]) -> None:
    assert data.has_coordinates
    assert data.nodes["lat"].between(*lat).all(), data.nodes["lat"].describe()
    assert data.nodes["lon"].between(*lon).all(), data.nodes["lon"].describe()


MANHATTAN = (40.68, 40.88), (-74.05, -73.90)


@pytest.mark.parametrize("name, shape", [("nyc-bike", (17544, 69, 2)), ("nyc-taxi", (17544, 69, 2)),
                                         ("nyc-bike-30min", (35088, 69, 2)), ("nyc-taxi-30min", (35088, 69, 2))])
def test_nyc(data_root, name, shape):
    d = load(name, root=data_root)
    assert d.values.shape == shape and not np.isnan(d.values).any()
    assert_coordinates(d, *MANHATTAN)
    assert d.adjacency.sum() == 332 and np.array_equal(d.adjacency, d.adjacency.T)
    assert pd.Timestamp(d.timestamps[-1]) in (pd.Timestamp("2020-12-31 23:00"), pd.Timestamp("2020-12-31 23:30"))
    assert d.nodes["name"].iloc[0] == "Alphabet City"
    # spring-forward hour is an all-zero row, as documented
    assert d.values[d.time_index("2019-03-10 02:00")].sum() == 0


def test_nyc_bike_resolutions_agree(data_root):
    hourly, half = load("nyc-bike", root=data_root), load("nyc-bike-30min", root=data_root)
    summed = half.values.reshape(-1, 2, 69, 2).sum(axis=1)      # [T60, 2 half-hours, N, C] -> [T60, N, C]
    assert np.array_equal(summed, hourly.values)
    assert hourly.channels == ["departures", "arrivals"]


def test_beijing(data_root):
    d = load("beijing-air", root=data_root)
    assert d.values.shape == (35064, 12, 6) and d.exog.shape == (35064, 12, 6)
    assert d.nodes["id"].tolist()[:2] == ["Aotizhongxin", "Changping"]
    assert_coordinates(d, (39.8, 40.4), (116.1, 116.7))
    assert 0.01 < np.isnan(d.values[..., 0]).mean() < 0.03          # PM2.5: 2.08 % NA per SOURCE.md
    wind = d.exog[..., d.exog_names.index("wind_dir_deg")]
    assert set(np.unique(wind[np.isfinite(wind)])) <= {22.5 * k for k in range(16)}
    assert 0 < np.isnan(wind).mean() < 0.01
    pm25 = load("beijing-air", root=data_root, channels=["PM2.5"])
    assert pm25.channels == ["PM2.5"] and np.array_equal(pm25.values[..., 0], d.values[..., 0], equal_nan=True)


def test_bayarea(data_root):
    d = load("bayarea-bike", root=data_root)
    assert d.values.shape == (8760, 70, 2) and d.values[..., 0].sum() == 326339
    assert_coordinates(d, (37.32, 37.81), (-122.42, -121.87))
    sf = load("bayarea-bike-sf", root=data_root)
    assert sf.values.shape == (8760, 35, 2) and (sf.nodes["landmark"] == "San Francisco").all()
    assert_coordinates(sf, (37.771, 37.805), (-122.419, -122.388))


def test_los_loop(data_root):
    d = load("los-loop", root=data_root)
    assert d.values.shape == (2016, 207, 1) and d.interval == pd.Timedelta("5min")
    assert d.values[0, :5, 0].tolist() == [64.375, 67.625, 67.125, 61.5, 66.875]
    assert_coordinates(d, (34.04, 34.23), (-118.54, -118.18))
    assert np.allclose(d.adjacency, d.adjacency.T) and (np.diag(d.adjacency) == 1).all()
    ids = (data_root / "METR-LA" / "graph_sensor_ids.txt").read_text().strip().split(",")
    assert d.nodes["id"].tolist() == ids


@pytest.mark.parametrize("folder, pkl, n", [("METR-LA", "adj_mx.pkl", 207), ("PEMS-BAY", "adj_mx_bay.pkl", 325)])
def test_dcrnn_adjacency_pickles(data_root, folder, pkl, n):
    ids, id_to_ind, adj = safe_load(data_root / folder / pkl)
    assert len(ids) == n and adj.shape == (n, n) and adj.dtype == np.float32
    assert np.array_equal(read_adj_pkl(data_root / folder / pkl, ids), adj)


def test_pems_bay_distances(data_root):
    ids = pd.read_csv(data_root / "PEMS-BAY" / "graph_sensor_locations_bay.csv", header=None, dtype=str)[0].tolist()
    _, dist = read_edges(data_root / "PEMS-BAY" / "distances_bay_2017.csv.gz", ids)
    assert dist.shape == (325, 325) and np.isfinite(dist).sum() == 8358


# PEMS03: 547 rows, one a self-loop (314013 -> 314013); PEMS08: 295 rows, 18 repeat a pair
@pytest.mark.parametrize("name, n, links", [("PEMS03", 358, 546), ("PEMS04", 307, 340), ("PEMS08", 170, 277)])
def test_pems_edge_lists(data_root, name, n, links):
    txt = data_root / name / f"{name}.txt"
    ids = txt.read_text().split() if txt.exists() else [str(i) for i in range(n)]
    adjacency, distances = read_edges(data_root / name / f"{name}.csv", ids)
    assert adjacency.shape == (n, n) and adjacency.sum() == links and not np.diag(adjacency).any()
    assert np.isfinite(distances).sum() == n + links


@pytest.mark.parametrize("city, shape, days", [("NYC", (16, 16), (608, 30, 92)), ("CHI", (14, 12), (609, 30, 92))])
def test_crime_pickles(data_root, city, shape, days):
    for split, n_days in zip(("trn", "val", "tst"), days):
        array = safe_load(data_root / "NYC_CHI_Crime" / f"{city}_crime" / f"{split}.pkl.gz")
        assert array.shape == (*shape, n_days, 4) and array.dtype == np.float64 and array.min() == 0
