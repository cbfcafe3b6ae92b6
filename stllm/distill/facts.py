"""Facts about one forecast window, computed from the data alone: the material of every explanation.

A window is (node i, start s) as in `stllm.data.windows`: s is the index of the first target step, the
history is steps [s - t_in, s) and the target steps are [s, s + t_out). `compute_facts` reads only the
history and older steps (s may equal T: a forecast past the end of the data); `future_facts` reads the
target steps, for label-constrained teachers; `estimate_effects` reads steps before `train_end` only.

Conventions shared by the teachers and the checker:
- first / last: the first and last *observed* (non-NaN) values of the history window.
- direction of a change: "up" or "down" when |change| > FLAT_TOL * max(|first|, |last|), else "flat";
  weather uses absolute tolerances (WEATHER_FLAT, in the variable's units; FLAT_TOL relative for others);
  the wind direction counts as steady when it turned by at most WIND_STEADY_DEG.
- percent changes are relative to |first| (or |reference|) and None when that is below 1e-6.
- "same hour yesterday / last week": the step of the last observed value minus one day / one week of steps.
- "ahead" means: the mean of the target steps one day / one week earlier (needs t_out <= one day of steps).
- forecast direction: the forecast's mean against the last observed value, with the FLAT_TOL rule.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.graphs import node_distances

FLAT_TOL = 0.05                       # relative size of a change below which it counts as "flat"
WEATHER_FLAT = {"temperature": 0.5, "dew_point": 0.5, "pressure": 0.5, "rain": 0.1, "wind_speed": 0.3,
                "humidity": 2.0}      # absolute "flat" tolerances, in each variable's units
WIND_STEADY_DEG = 22.5                # a turn of at most this many degrees keeps the wind "steady"
N_NEIGHBOURS = 3                      # how many nearest nodes the neighbour summary averages
MIN_EFFECT_CORR = 0.05                # |correlation| below which an estimated weather effect is not used
MIN_EFFECT_SAMPLES = 50               # fewest (window, node) pairs behind a usable effect
WIND_DIR = "wind_dir_deg"
WEATHER_UNITS = {"temperature": "°C", "dew_point": "°C", "pressure": "hPa", "rain": "mm", "wind_speed": "m/s",
                 "humidity": "%"}
WEATHER_LABELS = {"pressure": "air pressure", "dew_point": "dew point", "wind_speed": "wind speed"}
COMPASS16 = ["N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Trend:
    """The node's change over the history window."""
    first: float
    last: float
    first_time: str
    last_time: str
    change: float                # last - first
    percent: float | None        # change / |first| * 100
    direction: str               # up | down | flat


@dataclass
class Period:
    """The last observed value against one period earlier, and what the target hours did one period earlier."""
    label: str                   # "yesterday" | "last week"
    reference: float | None      # value at the same step one period before the last observed value
    diff: float | None           # last value - reference
    percent: float | None        # diff / |reference| * 100
    relation: str | None         # higher | lower | same
    ahead_mean: float | None     # mean of the target steps one period earlier
    ahead_relation: str | None   # above | below | same, ahead_mean against the last observed value


@dataclass
class Neighbours:
    """The k nearest nodes and their mean change over the same window."""
    ids: list[str]
    names: list[str]
    distances: list[float]
    distance_unit: str           # "km" from coordinates, "" for road distances of unknown unit
    mean_change: float | None
    mean_percent: float | None
    direction: str | None
    n_up: int
    n_down: int


@dataclass
class WeatherChange:
    """One exogenous variable over the history window (wind direction excluded)."""
    name: str
    label: str
    unit: str
    first: float
    last: float
    change: float
    direction: str
    effect: float | None = None  # typical change of the target's next-t_out mean for this change (see Effect)


@dataclass
class WindDirection:
    first_deg: float
    last_deg: float
    first: str                   # 16-point compass names, where the wind comes from
    last: str
    turn_deg: float              # signed, clockwise positive, in (-180, 180]
    steady: bool


@dataclass
class Calendar:
    history_start: str
    history_end: str
    target_start: str
    target_end: str
    weekday: str                 # of the first target step
    is_weekend: bool
    hour: int


@dataclass
class NoteFact:
    """A note (dated text about places, `CityData.notes`) that holds at this node during the window."""
    kind: str
    text: str
    start: str                   # the note's own span
    end: str
    during: str                  # where it holds in this window: "forecast", "history" or "both"
    effect: float | None = None  # what the notes of its kind did to this forecast: the model's forecast with every
                                 # note minus the same without the notes of this kind, mean over the forecast steps,
                                 # in the channel's unit (None: not known, e.g. a run that does not read notes)


@dataclass
class Factor:
    """One reason for the target to move: which way it pushes and, when estimated, by how much."""
    name: str                    # "recent trend", "same hours yesterday", "neighbours", "wind speed", ...
    kind: str                    # trend | yesterday | last_week | neighbours | weather | note
    push: str                    # up | down
    size: float | None = None


@dataclass
class Effect:
    """Least-squares slope of the target's next-t_out mean change on a weather variable's change over t_in steps,
    pooled over nodes and training windows. `slope` is in target units per unit of the variable."""
    variable: str
    channel: str
    slope: float
    corr: float
    n: int

    @property
    def usable(self) -> bool:
        return self.n >= MIN_EFFECT_SAMPLES and abs(self.corr) >= MIN_EFFECT_CORR and math.isfinite(self.slope)


@dataclass
class Facts:
    """Everything an explanation may state about one (node, start), from data before `start` only."""
    city: str
    domain: str
    node_index: int
    node_id: str
    node_name: str
    description: str
    channel: str
    unit: str
    interval: str                # e.g. "1 hour"
    t_in: int
    t_out: int
    start_index: int
    start: str                   # timestamp of the first target step
    history: list[float | None]  # [t_in] values, None where missing
    last_value: float | None
    last_time: str | None
    trend: Trend | None
    yesterday: Period | None
    last_week: Period | None
    neighbours: Neighbours | None
    weather: list[WeatherChange]
    wind: WindDirection | None
    calendar: Calendar
    factors: list[Factor] = field(default_factory=list)
    notes: list[NoteFact] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (NaN -> None)."""
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Facts":
        d = dict(d)
        sub = {"trend": Trend, "yesterday": Period, "last_week": Period, "neighbours": Neighbours,
               "wind": WindDirection, "calendar": Calendar}
        for key, kind in sub.items():
            d[key] = None if d.get(key) is None else kind(**d[key])
        d["weather"] = [WeatherChange(**w) for w in d.get("weather", [])]
        d["factors"] = [Factor(**f) for f in d.get("factors", [])]
        d["notes"] = [NoteFact(**n) for n in d.get("notes", [])]
        return cls(**d)


@dataclass
class FutureFacts:
    """What the target steps really did (for label-constrained teachers only)."""
    values: list[float | None]   # [t_out], None where missing
    mean: float | None
    first: float | None
    last: float | None
    min: float | None
    max: float | None
    last_observed: float | None  # the last observed input value the direction is measured from
    change: float | None         # mean - last_observed
    direction: str | None

    def to_dict(self) -> dict:
        return _clean(asdict(self))


# ------------------------------------------------------------------------------------------------ helpers


def change_direction(first: float, last: float, tol: float | None = None) -> str:
    """"up" / "down" / "flat": flat when |last - first| <= tol (default FLAT_TOL * max(|first|, |last|))."""
    tol = FLAT_TOL * max(abs(first), abs(last)) if tol is None else tol
    change = last - first
    return "flat" if abs(change) <= tol else ("up" if change > 0 else "down")


def forecast_direction(last_value: float | None, values) -> str | None:
    """Direction of a forecast: the mean of `values` [t_out] against the last observed value (FLAT_TOL rule)."""
    vals = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    if last_value is None or not np.isfinite(vals).any():
        return None
    return change_direction(float(last_value), float(np.nanmean(vals)))


def percent(change: float, base: float) -> float | None:
    return None if abs(base) < 1e-6 else 100.0 * change / abs(base)


def compass(deg: float) -> str:
    """16-point compass name of a direction in degrees (0 = N, 90 = E)."""
    return COMPASS16[int(((deg % 360.0) + 11.25) // 22.5) % 16]


def angle_diff(a: float, b: float) -> float:
    """Signed smallest turn from a to b in degrees, clockwise positive, in [-180, 180)."""
    return ((b - a + 180.0) % 360.0) - 180.0


def weather_label(name: str) -> str:
    return WEATHER_LABELS.get(name, name.replace("_", " "))


def weather_flat_tol(name: str, first: float, last: float) -> float:
    return WEATHER_FLAT.get(name, FLAT_TOL * max(abs(first), abs(last)))


def interval_text(interval: pd.Timedelta, n: int = 1) -> str:
    """n steps of `interval` in words: "1 hour", "12 hours", "60 minutes"."""
    total = pd.Timedelta(interval) * n
    for unit, size in (("day", pd.Timedelta("1D")), ("hour", pd.Timedelta("1h")), ("minute", pd.Timedelta("1min"))):
        if total % size == pd.Timedelta(0):
            k = int(total / size)
            return f"{k} {unit}{'' if k == 1 else 's'}"
    return f"{int(total.total_seconds())} seconds"


def step_time(city: CityData, index: int) -> pd.Timestamp:
    """Timestamp of step `index`, also past the end of the data."""
    return pd.Timestamp(city.timestamps[0]) + index * city.interval


def time_text(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%d %H:%M")


def resolve_window(city: CityData, node, start, t_in: int, t_out: int) -> tuple[int, int]:
    """(node position, start index) from a node id/name/position and a start index or timestamp."""
    i = city.node_index(node)[0]
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool):
        s = int(start)
    else:
        offset = (pd.Timestamp(start) - pd.Timestamp(city.timestamps[0])) / city.interval
        if offset != int(offset):
            raise DataError(f"{city.name}: start {start} is not on the {city.interval} grid of the data")
        s = int(offset)
    if not t_in <= s <= city.n_steps:
        raise DataError(f"{city.name}: window start {s} needs {t_in} history steps before it and must be at most "
                        f"T={city.n_steps} (history = steps [s - t_in, s))")
    return i, s


def _observed(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isfinite(x))


def _clean(obj):
    """Recursively: numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _opt(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# ----------------------------------------------------------------------------------------------- facts


def compute_facts(city: CityData, node, start, t_in: int = 12, t_out: int = 12,
                  effects: dict[str, dict[str, Effect]] | None = None, channel: str | int = 0,
                  k_neighbours: int = N_NEIGHBOURS, note_effects: dict[str, float] | None = None) -> Facts:
    """Facts for node `node` (id, name or position) and window start `start` (index or timestamp of the first
    target step), from `city.values[:start]` and `city.exog[:start]` only, and the city's notes that hold at the
    node during the window (a note is known in advance: a parade is announced). `effects` comes from
    `estimate_effects` and adds the typical effect of each weather change; `note_effects` ({note kind: effect},
    from `stllm.explain.note_effects`) what the notes of each kind did to the model's forecast."""
    i, s = resolve_window(city, node, start, t_in, t_out)
    c = city.channel_index(channel)
    hist = city.values[s - t_in:s, i, c].astype(np.float64)                    # [t_in]
    seen = _observed(hist)
    last_idx = s - t_in + int(seen[-1]) if len(seen) else None
    last_value = float(hist[seen[-1]]) if len(seen) else None
    channel_name = city.channels[c]
    weather = _weather(city, i, s, t_in)
    if effects:
        for w in weather:
            eff = effects.get(channel_name, {}).get(w.name)
            if eff is not None and eff.usable and w.direction != "flat":
                w.effect = eff.slope * w.change
    facts = Facts(
        city=city.city or city.name, domain=city.domain, node_index=i, node_id=str(city.nodes["id"].iloc[i]),
        node_name=str(city.nodes["name"].iloc[i]), description=str(city.nodes["description"].iloc[i]),
        channel=channel_name, unit=city.units[c], interval=interval_text(city.interval), t_in=t_in, t_out=t_out,
        start_index=s, start=time_text(step_time(city, s)),
        history=[_opt(v) for v in hist], last_value=last_value,
        last_time=None if last_idx is None else time_text(step_time(city, last_idx)),
        trend=_trend(city, hist, s - t_in),
        yesterday=_period(city, i, c, s, t_out, last_idx, last_value, city.steps_per_day, "yesterday"),
        last_week=_period(city, i, c, s, t_out, last_idx, last_value, 7 * city.steps_per_day, "last week"),
        neighbours=_neighbours(city, i, c, s, t_in, k_neighbours),
        weather=weather, wind=_wind(city, i, s, t_in), calendar=_calendar(city, s, t_in, t_out),
        notes=_notes(city, i, s, t_in, t_out, note_effects or {}))
    facts.factors = _factors(facts)
    return facts


def _trend(city: CityData, hist: np.ndarray, offset: int) -> Trend | None:
    seen = _observed(hist)
    if len(seen) < 2:
        return None
    a, b = float(hist[seen[0]]), float(hist[seen[-1]])
    return Trend(first=a, last=b, first_time=time_text(step_time(city, offset + int(seen[0]))),
                 last_time=time_text(step_time(city, offset + int(seen[-1]))), change=b - a,
                 percent=percent(b - a, a), direction=change_direction(a, b))


def _period(city: CityData, i: int, c: int, s: int, t_out: int, last_idx: int | None, last_value: float | None,
            lag: int, label: str) -> Period | None:
    if last_idx is None or s - lag < 0:
        return None
    ref = ref_diff = ref_pct = relation = None
    if last_idx - lag >= 0 and np.isfinite(city.values[last_idx - lag, i, c]):
        ref = float(city.values[last_idx - lag, i, c])
        ref_diff, ref_pct = last_value - ref, percent(last_value - ref, ref)
        relation = {"up": "higher", "down": "lower", "flat": "same"}[change_direction(ref, last_value)]
    ahead = ahead_rel = None
    if t_out <= lag:                                   # the target steps one period earlier are all in the past
        window = city.values[s - lag:s - lag + t_out, i, c]
        if np.isfinite(window).sum() * 2 >= t_out:
            ahead = float(np.nanmean(window))
            ahead_rel = {"up": "above", "down": "below", "flat": "same"}[change_direction(last_value, ahead)]
    if ref is None and ahead is None:
        return None
    return Period(label, ref, ref_diff, ref_pct, relation, ahead, ahead_rel)


def nearest_nodes(city: CityData, i: int, k: int) -> tuple[list[int], list[float], str]:
    """The k nodes nearest to node i: (positions, distances, unit), by distance or, without any, by adjacency."""
    if city.n_nodes < 2 or k < 1:
        return [], [], ""
    dist = node_distances(city)
    if dist is None:                                   # adjacency only: strongest links first
        w = np.nan_to_num(np.asarray(city.adjacency, dtype=np.float64)[i])
        w[i] = 0.0
        order = [j for j in np.argsort(-w, kind="stable") if w[j] > 0][:k]
        return [int(j) for j in order], [float("nan")] * len(order), ""
    d = np.asarray(dist[i], dtype=np.float64).copy()
    d[i] = np.inf
    order = [int(j) for j in np.argsort(d, kind="stable") if np.isfinite(d[j])][:k]
    unit = "" if city.distances is not None else "km"
    return order, [float(d[j]) for j in order], unit


def _neighbours(city: CityData, i: int, c: int, s: int, t_in: int, k: int) -> Neighbours | None:
    idx, dist, unit = nearest_nodes(city, i, k)
    if not idx:
        return None
    changes, pcts, scales = [], [], []
    for j in idx:
        x = city.values[s - t_in:s, j, c].astype(np.float64)
        seen = _observed(x)
        if len(seen) >= 2:
            a, b = float(x[seen[0]]), float(x[seen[-1]])
            changes.append(b - a)
            scales.append(max(abs(a), abs(b)))
            p = percent(b - a, a)
            if p is not None:
                pcts.append(p)
    mean = float(np.mean(changes)) if changes else None
    direction = None
    if mean is not None:
        direction = change_direction(0.0, mean, tol=FLAT_TOL * float(np.mean(scales)))
    return Neighbours(ids=[str(city.nodes["id"].iloc[j]) for j in idx],
                      names=[str(city.nodes["name"].iloc[j]) for j in idx], distances=dist, distance_unit=unit,
                      mean_change=mean, mean_percent=float(np.mean(pcts)) if pcts else None, direction=direction,
                      n_up=sum(ch > 0 for ch in changes), n_down=sum(ch < 0 for ch in changes))


def _exog_column(city: CityData, i: int, e: int, lo: int, hi: int) -> np.ndarray:
    col = 0 if city.exog.shape[1] == 1 else i
    return city.exog[lo:hi, col, e].astype(np.float64)


def _weather(city: CityData, i: int, s: int, t_in: int) -> list[WeatherChange]:
    out = []
    if city.exog is None:
        return out
    for e, name in enumerate(city.exog_names):
        if name == WIND_DIR:
            continue
        x = _exog_column(city, i, e, s - t_in, s)
        seen = _observed(x)
        if len(seen) < 2:
            continue
        a, b = float(x[seen[0]]), float(x[seen[-1]])
        out.append(WeatherChange(name=name, label=weather_label(name), unit=WEATHER_UNITS.get(name, ""), first=a,
                                 last=b, change=b - a,
                                 direction=change_direction(a, b, weather_flat_tol(name, a, b))))
    return out


def _wind(city: CityData, i: int, s: int, t_in: int) -> WindDirection | None:
    if city.exog is None or WIND_DIR not in city.exog_names:
        return None
    x = _exog_column(city, i, city.exog_names.index(WIND_DIR), s - t_in, s)
    seen = _observed(x)
    if len(seen) < 2:
        return None
    a, b = float(x[seen[0]]) % 360.0, float(x[seen[-1]]) % 360.0
    turn = angle_diff(a, b)
    return WindDirection(a, b, compass(a), compass(b), turn, abs(turn) <= WIND_STEADY_DEG)


def _calendar(city: CityData, s: int, t_in: int, t_out: int) -> Calendar:
    first = step_time(city, s)
    return Calendar(history_start=time_text(step_time(city, s - t_in)), history_end=time_text(step_time(city, s - 1)),
                    target_start=time_text(first), target_end=time_text(step_time(city, s + t_out - 1)),
                    weekday=WEEKDAYS[first.day_of_week], is_weekend=bool(first.day_of_week >= 5), hour=int(first.hour))


def _notes(city: CityData, i: int, s: int, t_in: int, t_out: int, effects: dict[str, float]) -> list[NoteFact]:
    """The notes that name node i (or all nodes) and hold at a step of [s - t_in, s + t_out), tested on the steps'
    timestamps as the model's routing does (`stllm.data.notes.coverage`)."""
    if city.notes is None or not len(city.notes):
        return []
    times = np.array([step_time(city, k) for k in range(s - t_in, s + t_out)], dtype="datetime64[ns]")
    out = []
    for note in city.notes.itertuples(index=False):
        if len(note.nodes) and i not in note.nodes:
            continue
        held = (times >= np.datetime64(note.start, "ns")) & (times <= np.datetime64(note.end, "ns"))
        meets = [bool(held[:t_in].any()), bool(held[t_in:].any())]
        if not any(meets):
            continue
        during = "both" if all(meets) else "history" if meets[0] else "forecast"
        kind = note_kind(note.kind)
        out.append(NoteFact(kind, note.text, time_text(note.start), time_text(note.end), during, effects.get(kind)))
    return out


NOTE_DURING = {"forecast": "the forecast", "history": "the last hours", "both": "the last hours and the forecast"}
"""How explanations word where a note holds in the window (NoteFact.during); the checker reads the same words."""


def note_kind(kind: str) -> str:
    """A note's kind as explanations name it ("note" for a note without one)."""
    return " ".join(str(kind).split()) or "note"


def note_quote(text: str) -> str:
    """A note's words as an explanation quotes them: one line, no double quote inside, no final full stop."""
    return " ".join(str(text).split()).rstrip(".").replace('"', "'")


def _factors(f: Facts) -> list[Factor]:
    """Each fact that argues for a move of the target, with its direction (flat facts argue for nothing)."""
    out = []
    if f.trend is not None and f.trend.direction != "flat":
        out.append(Factor("recent trend", "trend", f.trend.direction, f.trend.change))
    for period, kind in ((f.yesterday, "yesterday"), (f.last_week, "last_week")):
        if period is not None and period.ahead_relation in ("above", "below"):
            out.append(Factor(f"same hours {period.label}", kind, "up" if period.ahead_relation == "above" else "down",
                              period.ahead_mean - f.last_value))
    if f.neighbours is not None and f.neighbours.direction in ("up", "down"):
        out.append(Factor("neighbours", "neighbours", f.neighbours.direction, f.neighbours.mean_change))
    level = abs(f.last_value) if f.last_value is not None else 0.0
    for w in f.weather:                                # an effect below the "flat" tolerance moves nothing
        if w.effect is not None and abs(w.effect) > FLAT_TOL * level:
            out.append(Factor(w.label, "weather", "up" if w.effect > 0 else "down", w.effect))
    for kind in dict.fromkeys(n.kind for n in f.notes):    # the notes of one kind the model read, if they moved it
        effect = next(n.effect for n in f.notes if n.kind == kind)
        if effect is not None and abs(effect) > FLAT_TOL * level:
            out.append(Factor(f"the {kind} note", "note", "up" if effect > 0 else "down", effect))
    return out


# ---------------------------------------------------------------------------------------------- future


def future_facts(city: CityData, node, start, t_out: int = 12, t_in: int = 12, channel: str | int = 0) -> FutureFacts:
    """What the target steps [start, start + t_out) did; direction against the last observed input value."""
    i, s = resolve_window(city, node, start, t_in, t_out)
    if s + t_out > city.n_steps:
        raise DataError(f"{city.name}: the future of window start {s} (+{t_out} steps) is past the end of the data")
    c = city.channel_index(channel)
    fut = city.values[s:s + t_out, i, c].astype(np.float64)                     # [t_out]
    hist = city.values[s - t_in:s, i, c]
    seen_h = _observed(hist)
    last_obs = float(hist[seen_h[-1]]) if len(seen_h) else None
    seen = _observed(fut)
    if not len(seen):
        return FutureFacts([None] * t_out, None, None, None, None, None, last_obs, None, None)
    mean = float(np.nanmean(fut))
    return FutureFacts(values=[_opt(v) for v in fut], mean=mean, first=float(fut[seen[0]]), last=float(fut[seen[-1]]),
                       min=float(np.nanmin(fut)), max=float(np.nanmax(fut)), last_observed=last_obs,
                       change=None if last_obs is None else mean - last_obs,
                       direction=forecast_direction(last_obs, fut))


# --------------------------------------------------------------------------------------------- effects


def estimate_effects(city: CityData, train_end: int, t_in: int = 12, t_out: int = 12,
                     max_windows: int = 4000) -> dict[str, dict[str, Effect]]:
    """Typical effect of each weather variable on each channel, from steps before `train_end` only.

    For windows s (targets inside [0, train_end)), per node: y = mean(values[s:s+t_out]) - values[s-1] and
    x = exog[s-1] - exog[s-t_in]; slope = cov(x, y) / var(x), pooled over nodes and windows (at most
    `max_windows` evenly spaced), with x and y centred within each hour of day of s: the daily cycle moves both
    (mornings warm up and get busy), and the slope should not merely restate it. Wind direction (circular) is
    skipped. Returns {channel: {variable: Effect}}.
    """
    if city.exog is None:
        return {}
    starts = np.arange(t_in, min(train_end, city.n_steps) - t_out + 1)
    if len(starts) == 0:
        raise DataError(f"{city.name}: train_end={train_end} leaves no window of {t_in} + {t_out} steps")
    if len(starts) > max_windows:
        starts = np.unique(np.linspace(starts[0], starts[-1], max_windows).round().astype(int))
    v = city.values.astype(np.float64)
    with warnings.catch_warnings():                    # all-NaN windows give NaN, dropped in _slope
        warnings.simplefilter("ignore", RuntimeWarning)
        ahead = np.nanmean(np.stack([v[starts + k] for k in range(t_out)]), axis=0)    # [S, N, C]
    y = ahead - v[starts - 1]                                                           # [S, N, C]
    hour = np.broadcast_to((starts % city.steps_per_day)[:, None], y.shape[:2]).ravel()  # [S * N]
    out: dict[str, dict[str, Effect]] = {ch: {} for ch in city.channels}
    for e, name in enumerate(city.exog_names):
        if name == WIND_DIR:
            continue
        w = city.exog[:, :, e].astype(np.float64)                                       # [T, N or 1]
        dx = np.broadcast_to(w[starts - 1] - w[starts - t_in], y.shape[:2])           # [S, N]
        for c, ch in enumerate(city.channels):
            out[ch][name] = _slope(dx.ravel(), y[:, :, c].ravel(), hour, name, ch)
    return out


def _slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str, channel: str) -> Effect:
    """Pooled within-group least-squares slope of y on x ([M] each; pairs with NaN dropped)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[ok], y[ok], groups[ok]
    for g in np.unique(groups):                        # centre within each group
        m = groups == g
        x[m] -= x[m].mean()
        y[m] -= y[m].mean()
    sxx, syy, sxy = float((x * x).sum()), float((y * y).sum()), float((x * y).sum())
    if len(x) < 3 or sxx < 1e-12 or syy < 1e-12:
        return Effect(name, channel, 0.0, 0.0, int(len(x)))
    return Effect(name, channel, sxy / sxx, float(sxy / np.sqrt(sxx * syy)), int(len(x)))


def effects_to_dict(effects: dict[str, dict[str, Effect]]) -> dict:
    return {ch: {name: asdict(e) for name, e in per.items()} for ch, per in effects.items()}


def effects_from_dict(d: dict) -> dict[str, dict[str, Effect]]:
    return {ch: {name: Effect(**e) for name, e in per.items()} for ch, per in d.items()}
