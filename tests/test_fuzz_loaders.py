"""Property tests for the bring-your-own CSV loader: whatever the files hold, `load_byo` returns a valid CityData or
raises a DataError that names a file. Any other exception is a bug in the loader (that is what these look for)."""
from __future__ import annotations

import csv
import gzip
import io
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stllm.data import CityData, DataError
from stllm.data.loaders import load_byo

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = ["S1", "S2", "s3", "Ω4", "5"]
GOOD_SENSORS = "id,lat,lon,name\nS1,45.1,9.1,a\nS2,45.2,9.2,b\ns3,45.3,9.3,c\nΩ4,45.4,9.4,d\n5,45.5,9.5,e\n"

# ---- strategies ------------------------------------------------------------------------------------------------------
numbers = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
odd_cells = st.one_of(
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "Infinity", "NA", "null", "True", "false", "abc", " 3 ", "1e39",
                     "-1e400", "1,5", "0x10", '"', "é", "\t", "1;2", "2024-01-01", "x\ny", "\r"]),
    st.text(max_size=5))
cells = st.one_of(numbers, numbers, numbers, odd_cells)
clean_cells = st.one_of(numbers, st.just(""))
rarely = st.sampled_from([False, False, False, True])
names = st.one_of(st.sampled_from(IDS), st.sampled_from(IDS), st.sampled_from(["", " ", "timestamp", "sensor", "S1",
                                                                                  "Unnamed: 1", "ü", "value", "id"]),
                  st.text(max_size=4))
STEPS = [timedelta(minutes=1), timedelta(minutes=15), timedelta(hours=1), timedelta(days=1)]
FORMATS = ["%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%m/%d/%Y %H:%M", "%Y-%m-%d %H:%M:%S+02:00", "%Y-%m-%d"]
MUTATIONS = ["duplicate", "shuffle", "off_grid", "invalid", "tz", "gap", "empty", "date_only", "far"]


@st.composite
def timestamps(draw, n_min: int = 2, n_max: int = 10) -> list[str]:
    """Timestamps on a grid, then maybe broken: duplicated, unsorted, off-grid, unparsable, tz-aware, ..."""
    start = draw(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1))).replace(microsecond=0)
    step, fmt = draw(st.sampled_from(STEPS)), draw(st.sampled_from(FORMATS))
    stamps = [start + k * step for k in range(draw(st.integers(n_min, n_max)))]
    text = [t.strftime(fmt) for t in stamps]
    for op in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        k = draw(st.integers(0, len(text) - 1))
        if op == "duplicate":
            text.insert(k, text[k])
        elif op == "shuffle":
            text = draw(st.permutations(text))
        elif op == "off_grid":
            text[k] = (stamps[min(k, len(stamps) - 1)] + step / 2).strftime(fmt)
        elif op == "invalid":
            text[k] = draw(st.sampled_from(["", "not a date", "2024-13-45", "now", "1", "3000-01-01", "25:00"]))
        elif op == "tz":
            text[k] = text[k] + draw(st.sampled_from(["Z", "+05:30", "-01:00"]))
        elif op == "gap" and len(text) > 2:
            del text[k]
        elif op == "empty":
            text[k] = ""
        elif op == "date_only":
            text[k] = text[k][:10]
        elif op == "far":
            text[k] = (stamps[0] + timedelta(days=draw(st.sampled_from([400, 365 * 150])))).strftime(fmt)
    return text


def to_csv(header: list[str], rows: list[list[str]], quoted: bool, end: str = "\n") -> str:
    """The CSV text: written by the csv module (quoting where needed) or joined naively (may break the format)."""
    if not quoted:
        return end.join(",".join(r) for r in [header, *rows]) + end
    out = io.StringIO()
    csv.writer(out, lineterminator=end).writerows([header, *rows])
    return out.getvalue()


@st.composite
def wide_values(draw) -> str:
    clean = st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True)
    ids = draw(st.one_of(clean, clean, st.lists(names, min_size=1, max_size=4)))
    header = ["timestamp" if not draw(rarely) else draw(st.sampled_from(["time", "", "Timestamp"]))] + ids
    if draw(rarely):
        header.append(draw(st.sampled_from(["", "S1", "sensor"])))        # a trailing comma, a repeat, ...
    cell = cells if draw(st.booleans()) else clean_cells
    rows = [[t] + [draw(cell) for _ in header[1:]] for t in draw(timestamps())]
    if draw(rarely) and rows:
        rows[draw(st.integers(0, len(rows) - 1))].append(draw(cells))     # a row wider than the header
    return to_csv(header, rows, draw(st.booleans()), draw(st.sampled_from(["\n", "\r\n", "\n\n"])))


@st.composite
def long_values(draw) -> str:
    channels = draw(st.one_of(st.lists(st.sampled_from(["value", "inflow", "outflow"]), min_size=1, max_size=3,
                                       unique=True),
                              st.lists(st.sampled_from(["value", "inflow", "", "sensor"]), max_size=3)))
    header = ["timestamp", "sensor"] + channels
    if draw(st.booleans()):
        header = draw(st.permutations(header))
    cell, sensors = (cells, names) if draw(st.booleans()) else (clean_cells, st.sampled_from(IDS))
    rows = []
    for t in draw(timestamps(n_max=6)):
        for sensor in draw(st.lists(sensors, min_size=1, max_size=3)):
            rows.append([t, sensor] + [draw(cell) for _ in channels])
    rows = draw(st.permutations(rows)) if draw(st.booleans()) else rows
    return to_csv(header, rows, draw(st.booleans()))


@st.composite
def sensors_csv(draw) -> str:
    good = st.sampled_from([["id", "lat", "lon"], ["id", "latitude", "longitude", "name"], ["id", "lng", "lat"],
                            ["id", "lat", "lon", "name", "description"]])
    bad = st.sampled_from([["id", "lat", "latitude", "lon"], ["id", "name"], ["lat", "lon"], ["id", "lat", "lon", ""],
                           ["id", "lat", "lon", "description", "description"]])
    header = draw(st.one_of(good, good, bad))
    coordinate = st.one_of(st.floats(-200, 200).map(repr), st.floats(-90, 90).map(repr), st.floats(-90, 90).map(repr),
                           st.floats(-90, 90).map(repr), st.just(""), odd_cells)
    ids = draw(st.one_of(st.just(IDS), st.permutations(IDS), st.lists(st.one_of(st.sampled_from(IDS), names), max_size=6)))
    rows = [[i] + [draw(coordinate) for _ in header[1:]] for i in ids]
    return to_csv(header, rows, draw(st.booleans()))


@st.composite
def graph_csv(draw) -> str:
    """A matrix (with or without an id column, maybe reordered or short) or an edge list."""
    ids = draw(st.one_of(st.permutations(IDS), st.lists(st.one_of(st.sampled_from(IDS), names), max_size=6)))
    weight = st.one_of(st.sampled_from(["0", "1", "0.5", "2.5", "inf"]), cells)
    if draw(st.booleans()):
        header = draw(st.sampled_from([["from", "to"], ["from", "to", "weight"], ["from", "to", "distance"], ["From", " to "]]))
        pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(IDS), names), st.one_of(st.sampled_from(IDS), names)),
                              max_size=8))
        rows = [[a, b] + [draw(weight) for _ in header[2:]] for a, b in pairs]
    else:
        lead = draw(st.sampled_from([None, "", "id", "sensor"]))
        row_ids = draw(st.permutations(ids)) if draw(st.booleans()) else ids
        header = ([lead] if lead is not None else []) + list(ids)
        rows = [([r] if lead is not None else []) + [draw(weight) for _ in ids] for r in row_ids]
    return to_csv(header, rows, draw(st.booleans()))


# ---- the property ----------------------------------------------------------------------------------------------------
def loads_or_names_a_file(files: list[Path], **kwargs) -> CityData | None:
    """load_byo(**kwargs) gives a valid CityData or a DataError naming one of `files`; anything else fails the test."""
    try:
        city = load_byo(**kwargs)
    except DataError as e:
        assert any(str(f) in str(e) for f in files), f"DataError names none of the files: {e}"
        return None
    t, n, c = city.values.shape
    assert city.values.dtype == np.float32 and t >= 2 and n >= 1 and c >= 1
    assert city.timestamps.shape == (t,) and len(city.nodes) == n and len(city.channels) == len(city.units) == c
    assert city.interval > pd.Timedelta(0)
    assert (np.diff(city.timestamps) == np.timedelta64(city.interval.value, "ns")).all()
    assert not np.isinf(city.values).any() and not np.isnan(city.values).all(axis=(0, 2)).any()
    lat, lon = city.nodes["lat"].to_numpy(float), city.nodes["lon"].to_numpy(float)
    assert not (np.abs(lat) > 90).any() and not (np.abs(lon) > 180).any()
    assert city.nodes["id"].is_unique
    for m in (city.adjacency, city.distances):
        assert m is None or m.shape == (n, n)
    return city


def write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = folder / name
    data = text.encode(encoding, errors="replace")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@FUZZ
@given(values=st.one_of(wide_values(), long_values()))
def test_fuzz_values_csv(values):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, sensors = write(folder, "values.csv", values), write(folder, "sensors.csv", GOOD_SENSORS)
        loads_or_names_a_file([path, sensors], values=path)


@FUZZ
@given(sensors=sensors_csv())
def test_fuzz_sensors_csv(sensors):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        values = write(folder, "values.csv", "timestamp,S1,S2\n2024-01-01 00:00,1,2\n2024-01-01 01:00,3,\n")
        path = write(folder, "sensors.csv", sensors)
        loads_or_names_a_file([values, path], values=values, sensors=path)


@FUZZ
@given(graph=graph_csv(), kind=st.sampled_from(["adjacency", "distances"]))
def test_fuzz_graph_csv(graph, kind):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        values = write(folder, "values.csv", "timestamp,S1,S2,s3\n2024-01-01,1,2,3\n2024-01-02,3,,4\n")
        sensors = write(folder, "sensors.csv", "id,name\nS1,a\nS2,b\ns3,c\n")              # no coordinates
        path = write(folder, f"{kind}.csv", graph)
        loads_or_names_a_file([values, sensors, path], values=values, **{kind: path})


@FUZZ
@given(values=st.one_of(wide_values(), st.just("timestamp,S1\n2024-01-01 00:00,1\n2024-01-01 00:15,é\n")),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]), gz=st.booleans())
def test_fuzz_encodings(values, encoding, gz):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write(folder, "values.csv.gz" if gz else "values.csv", values, encoding)
        sensors = write(folder, "sensors.csv", GOOD_SENSORS, encoding)
        loads_or_names_a_file([path, sensors], values=path, sensors=sensors)


@FUZZ
@given(data=st.binary(max_size=200), name=st.sampled_from(["values.csv", "values.csv.gz", "sensors.csv"]),
       gz=st.booleans())
def test_fuzz_random_bytes(data, name, gz):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder, "values.csv", "timestamp,S1\n2024-01-01 00:00,1\n2024-01-01 00:15,2\n")
        write(folder, "sensors.csv", GOOD_SENSORS)
        path = folder / name
        path.write_bytes(gzip.compress(data) if gz else data)
        values = path if name.startswith("values") else folder / "values.csv"
        loads_or_names_a_file([values, folder / "sensors.csv"], values=values, sensors=folder / "sensors.csv")


def test_fuzz_strategies_reach_valid_cities():
    """The property is not vacuous: clean draws of the same shapes load."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        values = write(folder, "values.csv", "timestamp,S1,Ω4\n2024-01-01 00:00+02:00,1,2\n2024-01-01 02:00+02:00,1,\n"
                                             "2024-01-01T01:00,nan,3\n")
        write(folder, "sensors.csv", GOOD_SENSORS, "utf-8-sig")
        city = loads_or_names_a_file([values], values=values)
        assert city is not None and city.values.shape == (3, 2, 1)
