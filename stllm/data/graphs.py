"""Graph construction in numpy: distances, the static Gaussian-kernel graph, normalisation, the wind graph.

The torch graph layers live in `stllm.nn`; this module only builds the matrices they consume. Every graph is
`[N, N]` (or `[T, N, N]` for the wind graph) with `A[i, j]` the weight of the edge i -> j (i is the source).
The data-driven dynamic graph (similarity of node embeddings) is computed inside the encoder, not here.
"""
from __future__ import annotations

import numpy as np

from stllm.data.city import CityData, DataError

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)


def haversine_km(lat, lon) -> np.ndarray:
    """Great-circle distances in km between all pairs of points. lat, lon: [N] degrees -> [N, N]."""
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    dphi = phi[None, :] - phi[:, None]
    dlam = lam[None, :] - lam[:, None]
    h = np.sin(dphi / 2) ** 2 + np.cos(phi[:, None]) * np.cos(phi[None, :]) * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def bearings_deg(lat, lon) -> np.ndarray:
    """Initial bearing from point i to point j, degrees clockwise from north in [0, 360). [N] -> [N, N].

    The diagonal (and any pair of identical points) is 0: the bearing is undefined there.
    """
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    dlam = lam[None, :] - lam[:, None]
    y = np.sin(dlam) * np.cos(phi[None, :])
    x = np.cos(phi[:, None]) * np.sin(phi[None, :]) - np.sin(phi[:, None]) * np.cos(phi[None, :]) * np.cos(dlam)
    out = np.degrees(np.arctan2(y, x)) % 360.0
    np.fill_diagonal(out, 0.0)
    return out


def node_distances(city: CityData) -> np.ndarray | None:
    """Pairwise distances [N, N] (float64), or None when the city only has a plain adjacency.

    Order of preference: the dataset's road distances (`city.distances`, kept as given: inf/NaN where
    unknown; the diagonal is set to 0), then haversine km from the sensors' coordinates. A city with neither
    but with `city.adjacency` returns None, and the caller uses the adjacency itself (see `static_graph`).
    """
    if city.distances is not None:
        dist = np.array(city.distances, dtype=np.float64)
        np.fill_diagonal(dist, 0.0)
        return dist
    lat = city.nodes["lat"].to_numpy(float)
    lon = city.nodes["lon"].to_numpy(float)
    if city.has_coordinates:
        return haversine_km(lat, lon)
    if city.adjacency is not None:
        return None
    missing = ~(np.isfinite(lat) & np.isfinite(lon))
    if missing.all():
        raise DataError(f"{city.name}: no graph can be built: the sensors have no lat/lon, and the dataset has "
                        "neither road distances nor an adjacency matrix; give lat/lon in the sensors table")
    ids = city.nodes["id"].to_numpy()[missing][:5].tolist()
    raise DataError(f"{city.name}: sensors {ids} (of {int(missing.sum())} in all) have no lat/lon and there are no "
                    "road distances or adjacency; give coordinates for every sensor, or drop those sensors")


def gaussian_kernel(dist: np.ndarray, sigma: float | None = None, threshold: float = 0.1) -> np.ndarray:
    """Thresholded Gaussian kernel `A_ij = exp(-d_ij^2 / 2 sigma^2)` for i != j; 0 on the diagonal. [N, N] float32.

    sigma defaults to the std of the finite off-diagonal distances (their mean if that std is 0, e.g. for
    two nodes). Weights below `threshold` become 0; inf/NaN distances (unknown) give 0.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise DataError(f"distances must be a square [N, N] matrix, got shape {dist.shape}")
    if sigma is None:
        sigma = default_sigma(dist)
    if not sigma > 0:
        raise DataError(f"gaussian_kernel: sigma must be positive, got {sigma}")
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.exp(-np.square(dist) / (2.0 * sigma**2))
    a[~np.isfinite(a)] = 0.0
    np.fill_diagonal(a, 0.0)
    a[a < threshold] = 0.0
    return a.astype(np.float32)


def default_sigma(dist: np.ndarray) -> float:
    """Std of the finite off-diagonal distances (their mean if the std is 0; 1.0 if there are none)."""
    dist = np.asarray(dist, dtype=np.float64)
    off = dist[~np.eye(dist.shape[0], dtype=bool)]
    off = off[np.isfinite(off)]
    if off.size == 0:
        return 1.0
    sigma = float(off.std())
    if sigma > 0:
        return sigma
    return float(off.mean()) if off.mean() > 0 else 1.0


def static_graph(city: CityData, sigma: float | None = None, threshold: float = 0.1) -> np.ndarray:
    """The city's static graph [N, N] float32.

    The Gaussian kernel on `node_distances(city)` when distances are known (road distances first, then
    coordinates). Only a city with neither gets its plain adjacency, symmetrised (max of A and A^T), NaN -> 0,
    zero diagonal. So a city with both coordinates and an adjacency uses the distances: the kernel is defined
    for every city with coordinates, including new cities seen zero-shot, which keeps graphs comparable.
    """
    dist = node_distances(city)
    if dist is not None:
        return gaussian_kernel(dist, sigma=sigma, threshold=threshold)
    adj = np.nan_to_num(np.asarray(city.adjacency, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    adj = np.maximum(adj, adj.T)
    np.fill_diagonal(adj, 0.0)
    return adj.astype(np.float32)


def normalize(a: np.ndarray, add_self_loops: bool = True) -> np.ndarray:
    """Symmetric normalisation `D^-1/2 (A + I) D^-1/2`, D the row sums of A + I. [..., N, N] -> same shape.

    Works on a batch of graphs (e.g. the wind graph [T, N, N]). Nodes with zero degree (isolated, without
    self loops) get an all-zero row and column instead of a division by zero.
    """
    a = np.asarray(a)
    a = a.astype(np.float32) if a.dtype.kind != "f" else a
    if add_self_loops:
        a = a + np.eye(a.shape[-1], dtype=a.dtype)
    deg = a.sum(axis=-1)
    with np.errstate(divide="ignore"):
        d = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0).astype(a.dtype)
    return d[..., :, None] * a * d[..., None, :]


def wind_graph(dist: np.ndarray, bearings: np.ndarray, wind_speed, wind_dir_deg,
               sigma0: float | None = None, alpha: float = 1.0) -> np.ndarray:
    """Wind-driven transport graph [T, N, N] float32.

    `A_t,ij = exp(-d_ij^2 / 2 (sigma0 + alpha v_t)^2) * max(cos(dphi_t,ij), 0)`, zero diagonal.

    Convention: `wind_dir_deg` is meteorological, the direction the wind comes FROM (270 = westerly wind,
    blowing toward the east). Pollution (or anything carried by the wind) moves from i to j when the wind
    blows from i toward j, so dphi is the angle between the direction the wind blows TOWARD
    (`wind_dir_deg + 180`) and the bearing from i to j (`bearings[i, j]`, see `bearings_deg`). Pairs the wind
    blows away from (cos < 0) get 0; stronger wind widens the kernel (reach grows by alpha per unit speed,
    in the units of `dist`, e.g. km per m/s).

    dist, bearings: [N, N]. wind_speed, wind_dir_deg: a scalar (T = 1), [T] or [T, 1] city-wide, or [T, N]
    per node, in which case the source node i's wind is used for the edges i -> j. NaN wind gives zero weights
    (for that step, or that source node); inf/NaN distances give 0. sigma0 defaults to `default_sigma(dist)`.
    Memory is T * N * N floats: pass only the steps you need.
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = dist.shape[0]
    if dist.shape != (n, n) or np.shape(bearings) != (n, n):
        raise DataError(f"wind_graph: dist and bearings must both be [N, N], got {dist.shape} and {np.shape(bearings)}")
    speed = _wind_series(wind_speed, n, "wind_speed")        # [T, N or 1, 1]
    toward = _wind_series(wind_dir_deg, n, "wind_dir_deg") + 180.0
    if speed.shape[0] != toward.shape[0]:
        raise DataError(f"wind_graph: wind_speed has {speed.shape[0]} steps, wind_dir_deg has {toward.shape[0]}")
    if sigma0 is None:
        sigma0 = default_sigma(dist)
    if not sigma0 > 0 or alpha < 0:
        raise DataError(f"wind_graph: need sigma0 > 0 and alpha >= 0, got sigma0={sigma0}, alpha={alpha}")
    reach = sigma0 + alpha * np.maximum(speed, 0.0)           # [T, N or 1, 1]; NaN stays NaN
    bear = np.asarray(bearings, dtype=np.float64)[None]      # [1, N, N]
    with np.errstate(invalid="ignore", over="ignore"):
        kernel = np.exp(-np.square(dist)[None] / (2.0 * reach**2))      # [T, N, N]
        align = np.maximum(np.cos(np.radians(toward - bear)), 0.0)      # [T, N, N]
        a = kernel * align
    a[~np.isfinite(a)] = 0.0
    a[:, np.arange(n), np.arange(n)] = 0.0
    return a.astype(np.float32)


def _wind_series(x, n: int, name: str) -> np.ndarray:
    """Scalar, [T], [T, 1] or [T, N] -> [T, N or 1, 1] float64 (source node on axis 1)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] not in (1, n):
        raise DataError(f"wind_graph: {name} must be a scalar, [T], [T, 1] or [T, N={n}], got shape {np.shape(x)}")
    return x[:, :, None]


def wind_from_exog(city: CityData) -> tuple[np.ndarray, np.ndarray] | None:
    """(wind_speed, wind_dir_deg), each [T, N or 1], from the city's exog; None when either is absent."""
    names = list(city.exog_names)
    if city.exog is None or "wind_speed" not in names or "wind_dir_deg" not in names:
        return None
    return city.exog[:, :, names.index("wind_speed")], city.exog[:, :, names.index("wind_dir_deg")]
