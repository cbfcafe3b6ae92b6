"""A synthetic city: the embedded default for `stllm demo` and for tests.

The values are counts (think bike or pedestrian flows) built in log space as

    log mean[t, i] = log base_i + log profile_i(time of day, weekday/weekend)   daily and weekly rhythm
                     + z[t, i]                                                  slow latent, pulled toward neighbours
                     + s[t, i]                                                  incidents spreading along the graph
                     + weather effect_i(t)                                      rain, temperature, wind

and observed through multiplicative log-normal noise and Poisson counting noise, with missing values and
short outages. The neighbourhood is the symmetrised k-nearest-neighbour graph of the sensors' positions, so
generation stays sparse and vectorised over nodes: 2000 sensors x 60 days of hourly data take about a second.

What a model can learn here and a per-node naive baseline cannot: the latent `z` drifts away from last
week's pattern but persists for hours (recent history helps) and moves the way the neighbours moved an hour
earlier; incidents start at one sensor and reach its neighbours an hour or two later and theirs after as
long again, more strongly downwind (the graph and the wind help); rain and temperature move every sensor at
once (the exogenous series help). Rates are calibrated for hourly data; other intervals keep the daily and
weekly rhythm, the weather and the incident delays in hours.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.signal import lfilter
from scipy.spatial import cKDTree

from stllm.data.city import CityData, DataError

CENTER = (45.46, 9.19)      # lat, lon of the (fictional) city centre
BOX_KM = 10.0               # sensors are spread over a BOX_KM x BOX_KM square
KM_PER_DEG_LAT = 111.195
PLACES = ["Riverside", "Old Town", "Central Station", "University", "Market Square", "City Park", "Harbour",
          "Stadium", "Hospital", "Business Park", "Hillside", "Museum Quarter", "Cathedral", "Lakeside",
          "Mill Lane", "Bridge Street", "Tech Campus", "Exhibition Centre", "Canal Walk", "Botanic Garden",
          "North Gate", "South Quay", "Arena", "Library", "Town Hall", "Ferry Terminal", "Zoo", "Castle Hill",
          "Theatre District", "Airport Road"]
# Daily rhythm components: (peak hour, width in hours, weekend multiplier, weekend peak shift in hours)
COMPONENTS = {"morning": (8.0, 1.2, 0.25, 1.5), "evening": (17.5, 1.6, 0.45, 0.5), "midday": (13.5, 3.0, 1.6, 1.0)}
KINDS = {"morning": ("a residential area", "busiest on weekday mornings"),
         "evening": ("an office district", "busiest on weekday evenings"),
         "midday": ("a leisure and shopping area", "busiest around midday and at weekends")}
EXOG_NAMES = ["temperature", "rain", "wind_speed", "wind_dir_deg"]


def make_city(n_nodes: int = 24, n_days: int = 56, interval: str = "1h", n_channels: int = 1, seed: int = 0,
              missing_rate: float = 0.02, noise: float = 0.05, start: str = "2024-01-01", name: str = "synthetic",
              with_weather: bool = True) -> CityData:
    """A synthetic city of `n_nodes` sensors over `n_days` days, deterministic given `seed`.

    values [T, N, C] counts with NaNs (about `missing_rate` of the (step, sensor) pairs, including a few
    outages); C = 1 ("flow") or 2 ("inflow", "outflow", correlated); exog [T, 1, 4] temperature (deg C),
    rain (mm/h), wind_speed (m/s), wind_dir_deg (meteorological: where the wind comes from).
    `noise` is the std of the multiplicative log-normal noise (Poisson noise comes on top).
    `with_weather=False` drops the exogenous series but not their effect: the same seed gives the same values,
    as in a real city whose weather was not recorded.
    """
    interval = pd.Timedelta(interval)
    if n_nodes < 1 or n_days < 1 or n_channels < 1:
        raise DataError(f"make_city: need n_nodes, n_days, n_channels >= 1, got {n_nodes}, {n_days}, {n_channels}")
    if interval <= pd.Timedelta(0) or pd.Timedelta("1D") % interval != pd.Timedelta(0):
        raise DataError(f"make_city: interval must divide one day evenly, got {interval}")
    if not 0 <= missing_rate < 0.5:
        raise DataError(f"make_city: missing_rate must be in [0, 0.5), got {missing_rate}")
    rng = np.random.default_rng(seed)
    dt = interval / pd.Timedelta("1h")                              # hours per step
    n_steps = n_days * int(pd.Timedelta("1D") / interval)
    timestamps = pd.date_range(start, periods=n_steps, freq=interval)
    hour = np.asarray(timestamps.hour + timestamps.minute / 60, dtype=np.float32)          # [T]
    weekend = np.asarray(timestamps.day_of_week >= 5)                          # [T]

    x, y = rng.uniform(-BOX_KM / 2, BOX_KM / 2, size=(2, n_nodes))
    graph = _knn_graph(x, y, k=min(4, n_nodes - 1))
    weather = _weather(rng, hour, dt)
    log_profile, kinds = _daily_profiles(rng, n_nodes, hour, weekend)             # [T, N]
    base = np.exp(rng.normal(np.log(80.0), 0.7, size=n_nodes)).astype(np.float32)  # node scales differ ~10x
    log_mean = log_profile + np.log(base)[None]
    log_mean += _weather_effect(rng, weather, n_nodes)
    log_mean += _latent(rng, graph["W"], n_steps, dt)
    log_mean += _incidents(rng, graph, n_steps, dt, weather["wind_dir_deg"])

    values = _observe(rng, log_mean, n_channels, noise)                           # [T, N, C]
    _knock_out(rng, values, missing_rate)

    lat = CENTER[0] + y / KM_PER_DEG_LAT
    lon = CENTER[1] + x / (KM_PER_DEG_LAT * np.cos(np.radians(CENTER[0])))
    channels = ["flow"] if n_channels == 1 else ["inflow", "outflow"] if n_channels == 2 else \
        [f"flow{k}" for k in range(n_channels)]
    exog = np.stack([weather[k] for k in EXOG_NAMES], axis=-1)[:, None, :].astype(np.float32) if with_weather else None
    return CityData(name=name, values=values, timestamps=timestamps.to_numpy(), interval=interval,
                    channels=channels, units=["count"] * n_channels, nodes=_node_table(lat, lon, kinds),
                    city="Synthetic City", domain="synthetic mobility", exog=exog,
                    exog_names=list(EXOG_NAMES) if with_weather else [])


def _knn_graph(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    """Symmetrised k-nearest-neighbour graph: row-normalised sparse W [N, N] and its edge list with bearings."""
    n = len(x)
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {"W": sparse.csr_matrix((n, n), dtype=np.float32), "indptr": np.zeros(n + 1, np.int64),
                "dst": empty, "bearing": np.zeros(0)}
    pts = np.stack([x, y], axis=1)
    dist, idx = cKDTree(pts).query(pts, k=k + 1)                # first hit is the node itself
    rows = np.repeat(np.arange(n), k)
    cols, d = idx[:, 1:].ravel(), dist[:, 1:].ravel()
    scale = np.median(d) + 1e-9
    w = sparse.coo_matrix((np.exp(-(d / scale) ** 2 / 2), (rows, cols)), shape=(n, n)).tocsr()
    w = w.maximum(w.T).tocsr()                                   # symmetrise: i~j if either is among the other's k
    w.sort_indices()
    deg = np.asarray(w.sum(axis=1)).ravel()
    row_norm = sparse.diags(1.0 / deg) @ w
    src = np.repeat(np.arange(n), np.diff(w.indptr))
    bearing = np.degrees(np.arctan2(x[w.indices] - x[src], y[w.indices] - y[src])) % 360  # clockwise from north
    return {"W": row_norm.astype(np.float32).tocsr(), "indptr": w.indptr, "dst": w.indices, "bearing": bearing}


def _weather(rng: np.random.Generator, hour: np.ndarray, dt: float) -> dict[str, np.ndarray]:
    """City-wide weather [T] each: temperature, rain episodes, wind speed and (meteorological) direction."""
    t = len(hour)
    drift = _ar1(rng, t, persistence=0.995 ** dt, std=3.0)
    temperature = 11.0 + drift + 4.0 * np.cos(2 * np.pi * (hour - 15.0) / 24)     # warmest at 15:00
    # rain: episodes start about every 2.5 days and last a few hours, intensity varies within an episode
    starts = rng.random(t) < dt / 60.0
    length = np.maximum(1, np.round(rng.lognormal(np.log(4.0), 0.5, size=t) / dt)).astype(int)
    scale = rng.gamma(2.0, 0.8, size=t)                       # mm/h, one draw per episode
    episode = np.zeros(t)
    for s in np.flatnonzero(starts):
        episode[s:s + length[s]] = scale[s]
    rain = episode * np.exp(_ar1(rng, t, persistence=0.8 ** dt, std=0.5))
    gusty = 1 + 0.2 * np.cos(2 * np.pi * (hour - 14) / 24)                       # windiest in the afternoon
    wind_speed = 3.5 * np.exp(_ar1(rng, t, persistence=0.97 ** dt, std=0.4)) * gusty
    direction = np.empty(t)
    direction[0] = rng.uniform(0, 360)
    kicks = rng.normal(0, 12.0 * np.sqrt(dt), size=t)
    for i in range(1, t):                                     # a random walk pulled toward a westerly (270)
        pull = ((270.0 - direction[i - 1] + 180) % 360) - 180
        direction[i] = direction[i - 1] + 0.02 * dt * pull + kicks[i]
    return {"temperature": temperature, "rain": rain, "wind_speed": wind_speed, "wind_dir_deg": direction % 360}


def _ar1(rng: np.random.Generator, t: int, persistence: float, std: float, n: int | None = None) -> np.ndarray:
    """Stationary AR(1) paths along time with the given marginal std: [T], or [T, n] independent ones."""
    shape = (t,) if n is None else (t, n)
    shocks = rng.standard_normal(size=shape) * (std * np.sqrt(1 - persistence**2))
    shocks[0] = rng.standard_normal(size=shape[1:]) * std
    return lfilter([1.0], [1.0, -persistence], shocks, axis=0)


def _daily_profiles(rng: np.random.Generator, n: int, hour: np.ndarray,
                    weekend: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Log of each node's daily rhythm [T, N] (a node-specific mix of morning, evening and midday peaks)."""
    mix = rng.dirichlet([0.7, 0.7, 0.7], size=n).astype(np.float32)   # [N, 3]
    jitter = rng.normal(0, 0.4, size=(n, 3)).astype(np.float32)       # node-specific peak times
    profile = np.full((len(hour), n), 0.2, dtype=np.float32)          # night floor
    for c, (peak, width, wk_mult, wk_shift) in enumerate(COMPONENTS.values()):
        centre = peak + jitter[:, c][None] + np.where(weekend, wk_shift, 0.0)[:, None]   # [T, N]
        bump = np.exp(-0.5 * ((hour[:, None] - centre) / width) ** 2)
        profile += mix[:, c][None] * np.where(weekend, wk_mult, 1.0)[:, None].astype(np.float32) * bump
    kinds = [list(COMPONENTS)[c] for c in mix.argmax(axis=1)]
    return np.log(profile / profile.mean(axis=0, keepdims=True) + 1e-3), kinds


def _weather_effect(rng: np.random.Generator, weather: dict, n: int) -> np.ndarray:
    """Log-multiplier [T, N]: rain lowers values (node-specific sensitivity), warmth raises them, gales lower them."""
    rain_sens = rng.uniform(0.4, 0.9, size=n).astype(np.float32)
    city = 0.03 * (weather["temperature"] - 11.0) - 0.06 * np.maximum(weather["wind_speed"] - 6.0, 0.0)
    return (city[:, None] - np.log1p(weather["rain"])[:, None] * rain_sens[None]).astype(np.float32)


def _latent(rng: np.random.Generator, w: sparse.csr_matrix, t: int, dt: float, slow_std: float = 0.12,
            slow_hours: float = 36.0, wave_std: float = 0.2, reversion: float = 0.3, pull: float = 0.05,
            follow: float = 0.9) -> np.ndarray:
    """Latent log-multiplier [T, N]: a slow AR(1) per node plus a spatial process u that spills along the graph,

        u_t = u_{t-1} + follow * W (u_{t-1} - u_{t-2}) + pull * (W u_{t-1} - u_{t-1}) - reversion * u_{t-1} + shock,

    i.e. each node moves the way its neighbours moved one step earlier and is pulled toward their recent values
    (W row-normalised; reversion and pull are per hour, follow per step). Each part is rescaled to its std.
    """
    n = w.shape[0]
    reversion, pull = reversion * min(dt, 1.0), pull * min(dt, 1.0)
    slow = _ar1(rng, t, persistence=np.exp(-dt / slow_hours), std=slow_std, n=n)
    shocks = rng.standard_normal(size=(t, n), dtype=np.float32)
    u = np.zeros((t, n), dtype=np.float32)
    u[0] = shocks[0]
    step = np.zeros(n, dtype=np.float32)                       # u_{t-1} - u_{t-2}
    for i in range(1, t):
        prev = u[i - 1]
        step = w @ (follow * step + pull * prev) - (pull + reversion) * prev + shocks[i]
        u[i] = prev + step
    return (slow + u * (wave_std / (u.std() + 1e-12))).astype(np.float32)


def _incidents(rng: np.random.Generator, graph: dict, t: int, dt: float, wind_from: np.ndarray,
               rate_per_node_day: float = 0.15, decay_per_hour: float = 0.85, spread: float = 0.8,
               max_delay: int = 2) -> np.ndarray:
    """Incidents [T, N] (log-multiplier): each starts at one node and reaches its neighbours 1..max_delay hours
    later, and theirs after as long again, weaker with each hop and strongest downwind; each then fades out."""
    n = len(graph["indptr"]) - 1
    steps_per_hour = max(1, int(round(1 / dt)))
    n_events = rng.poisson(rate_per_node_day * n * t * dt / 24)
    node = rng.integers(0, n, size=n_events)
    start = rng.integers(0, t, size=n_events)
    size = np.where(rng.random(n_events) < 0.6, -1.0, 1.0) * rng.uniform(0.2, 0.8, size=n_events)
    toward = (wind_from[start] + 180.0) % 360
    impulses = np.zeros((t, n), dtype=np.float32)
    ev, at, amp, when = np.arange(n_events), node, size, start
    for hop in range(3):
        keep = when < t
        np.add.at(impulses, (when[keep], at[keep]), amp[keep])
        if hop == 2:
            break
        ev, nxt, edge = _edges_from(graph, ev, at)
        align = np.maximum(np.cos(np.radians(toward[ev] - graph["bearing"][edge])), 0.0)
        amp = amp[nxt] * spread * (0.2 + 0.8 * align)
        when = when[nxt] + rng.integers(1, max_delay + 1, size=len(edge)) * steps_per_hour
        at = graph["dst"][edge]
        back = at == node[ev]                                  # do not spread back to the epicentre
        ev, at, amp, when = ev[~back], at[~back], amp[~back], when[~back]
    return lfilter([1.0], [1.0, -decay_per_hour ** dt], impulses, axis=0).astype(np.float32)


def _edges_from(graph: dict, ev: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges out of nodes `at` (one per event in `ev`): (event, position in the input, edge index)."""
    first, counts = graph["indptr"][at], np.diff(graph["indptr"])[at]
    pos = np.repeat(np.arange(len(at)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return ev[pos], pos, first[pos] + offset


def _observe(rng: np.random.Generator, log_mean: np.ndarray, n_channels: int, noise: float) -> np.ndarray:
    """Counts [T, N, C]: log-normal then Poisson noise; channel k sees the mean k steps late and a node ratio."""
    t, n = log_mean.shape
    out = np.empty((t, n, n_channels), dtype=np.float32)
    for k in range(n_channels):
        lagged = np.concatenate([np.repeat(log_mean[:1], k, axis=0), log_mean[:t - k]]) if k else log_mean
        ratio = rng.uniform(0.8, 1.2, size=n).astype(np.float32) if k else np.ones(n, np.float32)
        jitter = noise * rng.standard_normal(size=(t, n), dtype=np.float32) - noise**2 / 2
        lam = np.exp(lagged + np.log(ratio)[None] + jitter)
        out[:, :, k] = rng.poisson(lam)
    return out


def _knock_out(rng: np.random.Generator, values: np.ndarray, rate: float) -> None:
    """NaN about `rate` of the (step, sensor) pairs, in place: a quarter in outages of 6-36 steps, the rest at random."""
    t, n, _ = values.shape
    if rate <= 0:
        return
    n_outages = max(1, int(round(0.25 * rate * t * n / 21)))
    lost = 0
    for node, begin, length in zip(rng.integers(0, n, n_outages), rng.integers(0, t, n_outages),
                                   rng.integers(6, 37, n_outages)):
        lost += min(length, t - begin)
        values[begin:begin + length, node] = np.nan
    rest = max(0.0, rate - lost / (t * n))
    values[rng.random((t, n)) < rest] = np.nan


def _node_table(lat: np.ndarray, lon: np.ndarray, kinds: list[str]) -> pd.DataFrame:
    """ids S00.., names "S00 Riverside", and a one-line description per sensor."""
    n = len(lat)
    width = max(2, len(str(n - 1)))
    ids = [f"S{i:0{width}d}" for i in range(n)]
    places = [PLACES[i % len(PLACES)] + (f" {i // len(PLACES) + 1}" if i >= len(PLACES) else "") for i in range(n)]
    desc = [f"Counter in {KINDS[k][0]} near {p}; {KINDS[k][1]}." for k, p in zip(kinds, places)]
    return pd.DataFrame({"id": ids, "name": [f"{i} {p}" for i, p in zip(ids, places)], "lat": lat, "lon": lon,
                         "description": desc})
