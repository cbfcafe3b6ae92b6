"""Graph construction against hand-computed values on 3-4 nodes."""
import math

import numpy as np
import pandas as pd
import pytest

from stllm.data.city import CityData, DataError
from stllm.data.graphs import (EARTH_RADIUS_KM, bearings_deg, gaussian_kernel, haversine_km, node_distances,
                               normalize, static_graph, wind_from_exog, wind_graph)

KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180  # 111.195 km: one degree of a great circle


def _city(lat=None, lon=None, n=3, adjacency=None, distances=None, exog=None, exog_names=()):
    nodes = pd.DataFrame({"id": [f"s{i}" for i in range(n)]})
    if lat is not None:
        nodes["lat"], nodes["lon"] = lat, lon
    return CityData(name="tiny", values=np.ones((4, n, 1)), timestamps=pd.date_range("2024-01-01", periods=4, freq="h"),
                    interval="1h", channels=["flow"], units=["count"], nodes=nodes, adjacency=adjacency,
                    distances=distances, exog=exog, exog_names=list(exog_names))


# ---- distances and bearings ----------------------------------------------------------------------------------
def test_haversine_known_distance():
    # Nashville BNA -> Los Angeles LAX: 2886.444 km with R = 6372.8 km (the textbook example), rescaled to our R.
    d = haversine_km([36.12, 33.94], [-86.67, -118.40])
    assert d.shape == (2, 2)
    assert d[0, 1] == pytest.approx(2886.444 * EARTH_RADIUS_KM / 6372.8, rel=1e-3)
    assert d[0, 1] == d[1, 0] and d[0, 0] == 0


def test_haversine_one_degree():
    d = haversine_km([0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    assert d[0, 1] == pytest.approx(KM_PER_DEG, rel=1e-6)      # along a meridian
    assert d[0, 2] == pytest.approx(KM_PER_DEG, rel=1e-6)      # along the equator
    assert d[1, 2] == pytest.approx(KM_PER_DEG * math.sqrt(2), rel=1e-3)


def test_bearings_cardinal():
    # node 0 at the origin; 1 north, 2 east, 3 south-west of it
    b = bearings_deg([0.0, 0.01, 0.0, -0.01], [0.0, 0.0, 0.01, -0.01])
    assert b[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert b[0, 2] == pytest.approx(90.0, abs=1e-6)
    assert b[2, 0] == pytest.approx(270.0, abs=1e-6)
    assert b[1, 0] == pytest.approx(180.0, abs=1e-6)
    assert b[0, 3] == pytest.approx(225.0, abs=1e-3)
    assert np.all(np.diag(b) == 0)


# ---- Gaussian kernel ------------------------------------------------------------------------------------------
D3 = np.array([[0.0, 1.0, 2.0],
               [1.0, 0.0, 3.0],
               [2.0, 3.0, 0.0]])


def test_gaussian_kernel_hand_values():
    a = gaussian_kernel(D3, sigma=1.0, threshold=0.1)
    expected = np.array([[0, math.exp(-0.5), math.exp(-2.0)],
                         [math.exp(-0.5), 0, 0],            # exp(-4.5) = 0.011 < 0.1 -> 0
                         [math.exp(-2.0), 0, 0]])
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    assert a.dtype == np.float32


def test_gaussian_kernel_threshold():
    a = gaussian_kernel(D3, sigma=1.0, threshold=0.2)          # exp(-2) = 0.135 now drops too
    assert a[0, 1] == pytest.approx(math.exp(-0.5)) and a[0, 2] == 0 and a[1, 2] == 0
    a0 = gaussian_kernel(D3, sigma=1.0, threshold=0.0)
    assert a0[1, 2] == pytest.approx(math.exp(-4.5))


def test_gaussian_kernel_default_sigma_is_std_of_off_diagonal():
    sigma = math.sqrt(2 / 3)   # off-diagonal values 1,2,3 twice: mean 2, variance 4/6
    a = gaussian_kernel(D3, threshold=0.0)
    assert a[0, 1] == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)
    assert a[1, 2] == pytest.approx(math.exp(-9 / (2 * sigma**2)), rel=1e-5)


def test_gaussian_kernel_unknown_distances_give_zero():
    d = D3.copy()
    d[0, 1] = np.inf
    d[2, 0] = np.nan
    a = gaussian_kernel(d, sigma=1.0, threshold=0.0)
    assert a[0, 1] == 0 and a[2, 0] == 0
    assert a[1, 0] == pytest.approx(math.exp(-0.5))          # directed: only the unknown entries vanish
    assert np.isfinite(a).all()


# ---- normalisation ---------------------------------------------------------------------------------------------
def test_normalize_path_graph():
    a = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=np.float32)
    n = normalize(a)                           # degrees of A + I: 2, 3, 2
    expected = np.array([[1 / 2, 1 / math.sqrt(6), 0],
                         [1 / math.sqrt(6), 1 / 3, 1 / math.sqrt(6)],
                         [0, 1 / math.sqrt(6), 1 / 2]])
    np.testing.assert_allclose(n, expected, rtol=1e-6)
    assert np.abs(np.linalg.eigvalsh(n)).max() <= 1 + 1e-6


def test_normalize_isolated_node_and_batch():
    a = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    with_loops = normalize(a)
    assert with_loops[2, 2] == pytest.approx(1.0) and with_loops[2, :2].sum() == 0
    np.testing.assert_allclose(with_loops[0], [0.5, 0.5, 0])
    without = normalize(a, add_self_loops=False)
    assert np.isfinite(without).all() and without[2].sum() == 0
    np.testing.assert_allclose(without[0], [0, 1, 0])
    batch = normalize(np.stack([a, 2 * a]))
    np.testing.assert_allclose(batch[0], with_loops)
    assert batch.shape == (2, 3, 3)


# ---- static graph and its fallbacks ----------------------------------------------------------------------------
def test_static_graph_from_coordinates():
    lat, lon = [0.0, 0.0, 0.0], [0.0, 0.01, 0.03]       # 1.11 km and 3.34 km apart on the equator
    city = _city(lat, lon)
    d = node_distances(city)
    assert d[0, 1] == pytest.approx(0.01 * KM_PER_DEG, rel=1e-6)
    a = static_graph(city, sigma=1.0, threshold=0.0)
    assert a[0, 1] == pytest.approx(math.exp(-(0.01 * KM_PER_DEG) ** 2 / 2), rel=1e-5)
    assert a[0, 2] == pytest.approx(math.exp(-(0.03 * KM_PER_DEG) ** 2 / 2), rel=1e-5)


def test_static_graph_prefers_road_distances():
    city = _city([0.0, 0.0, 0.0], [0.0, 1.0, 2.0], distances=D3)
    np.testing.assert_allclose(static_graph(city, sigma=1.0), gaussian_kernel(D3, sigma=1.0))


def test_static_graph_falls_back_to_adjacency():
    adj = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=float)      # directed, with a self loop
    city = _city(adjacency=adj)
    assert node_distances(city) is None
    a = static_graph(city)
    np.testing.assert_array_equal(a, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])


def test_static_graph_uses_distances_over_adjacency():
    adj = np.ones((3, 3))
    city = _city([0.0, 0.0, 0.0], [0.0, 0.01, 0.03], adjacency=adj)
    without = _city([0.0, 0.0, 0.0], [0.0, 0.01, 0.03])
    np.testing.assert_allclose(static_graph(city, sigma=1.0), static_graph(without, sigma=1.0))


def test_no_graph_information_is_an_error():
    with pytest.raises(DataError, match="no lat/lon"):
        static_graph(_city())
    with pytest.raises(DataError, match=r"\['s1'\]"):
        node_distances(_city([0.0, np.nan, 0.0], [0.0, np.nan, 1.0]))


# ---- wind graph ------------------------------------------------------------------------------------------------
# node 0 at the origin, node 1 east of it (1.112 km), node 2 north of it
LAT, LON = [0.0, 0.0, 0.01], [0.0, 0.01, 0.0]
D_EW = 0.01 * KM_PER_DEG


def _wind_inputs():
    return haversine_km(LAT, LON), bearings_deg(LAT, LON)


def test_wind_from_the_west_carries_west_to_east():
    dist, bear = _wind_inputs()
    a = wind_graph(dist, bear, wind_speed=[0.0], wind_dir_deg=[270.0], sigma0=1.0, alpha=0.2)
    assert a.shape == (1, 3, 3) and a.dtype == np.float32
    assert a[0, 0, 1] == pytest.approx(math.exp(-D_EW**2 / 2), rel=1e-5)   # west -> east, cos(0) = 1
    assert a[0, 1, 0] == 0                                                # against the wind
    assert a[0, 0, 2] == pytest.approx(0.0, abs=1e-6)                      # crosswind, cos(90) = 0
    assert np.all(np.diagonal(a, axis1=1, axis2=2) == 0)


def test_wind_speed_increases_reach_and_angle_scales():
    dist, bear = _wind_inputs()
    # step 0: calm westerly; step 1: 5 m/s westerly (reach 1 + 0.2 * 5 = 2 km); step 2: south-westerly (from 225)
    a = wind_graph(dist, bear, wind_speed=[0.0, 5.0, 0.0], wind_dir_deg=[270.0, 270.0, 225.0], sigma0=1.0, alpha=0.2)
    assert a[1, 0, 1] == pytest.approx(math.exp(-D_EW**2 / 8), rel=1e-5)
    assert a[1, 0, 1] > a[0, 0, 1]
    # blowing toward 45 degrees: both east (bearing 90) and north (bearing 0) neighbours get cos(45)
    assert a[2, 0, 1] == pytest.approx(math.exp(-D_EW**2 / 2) * math.cos(math.pi / 4), rel=1e-5)
    assert a[2, 0, 2] == pytest.approx(math.exp(-D_EW**2 / 2) * math.cos(math.pi / 4), rel=1e-4)
    assert a[2, 1, 0] == 0 and a[2, 2, 0] == 0


def test_wind_per_node_and_nan():
    dist, bear = _wind_inputs()
    speed = np.array([[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]])      # [T=2, N=3]; node 0's wind unknown at step 1
    direction = np.array([[270.0, 90.0, 270.0], [270.0, 90.0, 270.0]])
    a = wind_graph(dist, bear, speed, direction, sigma0=1.0, alpha=0.2)
    assert a[0, 0, 1] > 0 and a[0, 1, 0] > 0                      # node 1's wind blows west, back toward node 0
    assert a[1, 0].sum() == 0 and a[1, 1, 0] > 0                  # NaN wind: no edges out of node 0 at step 1
    city_wide = wind_graph(dist, bear, [np.nan, 3.0], [270.0, 270.0], sigma0=1.0)
    assert city_wide[0].sum() == 0 and city_wide[1, 0, 1] > 0
    with pytest.raises(DataError):
        wind_graph(dist, bear, np.zeros((2, 5)), np.zeros((2, 5)), sigma0=1.0)


def test_wind_from_exog():
    exog = np.zeros((4, 1, 3), dtype=np.float32)
    exog[..., 1], exog[..., 2] = 4.0, 270.0
    city = _city(LAT, LON, exog=exog, exog_names=["rain", "wind_speed", "wind_dir_deg"])
    speed, direction = wind_from_exog(city)
    assert speed.shape == (4, 1) and np.all(speed == 4) and np.all(direction == 270)
    assert wind_from_exog(_city(LAT, LON)) is None
