"""Bad input data is an error that says where and what was expected, never a silently different dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stllm.config import load_config
from stllm.data import CityData, DataError, load
from stllm.data.loaders import load_byo
from stllm.data.prepared import PreparedCity
from stllm.data.windows import window_starts


def write_city(folder: Path, hours: list[str], sensors: str = "id,lat,lon\nS1,45.1,9.1\nS2,45.2,9.2\n") -> Path:
    """values.csv (wide, S1 and S2, one row per hh:mm on 2020-01-01) and sensors.csv in `folder`."""
    rows = "".join(f"2020-01-01 {h},{k},{10 * k}\n" for k, h in enumerate(hours))
    (folder / "values.csv").write_text("timestamp,S1,S2\n" + rows)
    (folder / "sensors.csv").write_text(sensors)
    return folder / "values.csv"


HOURLY = [f"{h:02d}:00" for h in range(8)]


# ---- 1. the interval is the most common step; rows off its grid are errors -------------------------------------------
def test_off_grid_row_is_an_error_naming_line_timestamp_and_grid(tmp_path):
    values = write_city(tmp_path, HOURLY[:6] + ["05:30"] + HOURLY[6:])        # 05:30 is line 8 (header = line 1)
    with pytest.raises(DataError, match=r"values\.csv.*line 8 has 2020-01-01 05:30.*every 1h from 2020-01-01 00:00"):
        load_byo(values)


def test_interval_is_the_most_common_step_not_the_smallest(tmp_path):
    values = write_city(tmp_path, ["00:00", "01:00", "03:00", "05:00", "07:00"])     # steps 1h, 2h, 2h, 2h
    with pytest.raises(DataError, match=r"values\.csv.*line 3 has 2020-01-01 01:00.*every 2h from 2020-01-01 00:00"):
        load_byo(values)
    city = load_byo(values, interval="1h")                                          # explicit: 1h, gaps are NaN
    assert city.interval == pd.Timedelta("1h") and city.n_steps == 8
    assert city.values[[0, 1, 3, 5, 7], 0, 0].tolist() == [0, 1, 2, 3, 4] and np.isnan(city.values[[2, 4, 6]]).all()


def test_explicit_interval_and_gaps_still_load_as_nan(tmp_path):
    values = write_city(tmp_path, [h for h in HOURLY if h != "03:00"])
    for interval in (None, "1h"):
        city = load_byo(values, interval=interval)
        assert city.interval == pd.Timedelta("1h") and city.n_steps == 8
        assert np.isnan(city.values[3]).all() and city.values[4, 0, 0] == 3
    with pytest.raises(DataError, match=r"values\.csv.*interval='two hours' is not a duration"):
        load_byo(values, interval="two hours")


# ---- 2. coordinates within range -------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, what", [("S2,145,9.2", r"lat 145\.0, outside -90\.\.90"),
                                       ("S2,45.2,-200", r"lon -200\.0, outside -180\.\.180")])
def test_coordinates_out_of_range_name_file_sensor_and_value(tmp_path, row, what):
    values = write_city(tmp_path, HOURLY, sensors=f"id,lat,lon\nS1,45.1,9.1\n{row}\n")
    with pytest.raises(DataError, match=rf"sensors\.csv: sensor 'S2' \(line 3\) has {what}"):
        load_byo(values)


def test_citydata_checks_coordinates_for_every_loader():
    nodes = pd.DataFrame({"id": ["a", "b"], "lat": [45.0, 145.0], "lon": [9.0, 9.0]})
    with pytest.raises(DataError, match=r"mine: sensor 'b' has lat 145\.0, outside -90\.\.90"):
        CityData(name="mine", values=np.ones((3, 2, 1)), timestamps=pd.date_range("2024-01-01", periods=3, freq="h"),
                 interval="1h", channels=["v"], units=[""], nodes=nodes)


# ---- 3. every column named once --------------------------------------------------------------------------------------
def test_trailing_comma_is_an_empty_column_name(tmp_path):
    values = write_city(tmp_path, HOURLY)
    values.write_text(values.read_text().replace("\n", ",\n"))
    with pytest.raises(DataError, match=r"values\.csv: column 4 of the header has an empty name \(a trailing comma\?\)"):
        load_byo(values)


def test_duplicate_column_names(tmp_path):
    values = write_city(tmp_path, HOURLY)
    values.write_text(values.read_text().replace("timestamp,S1,S2", "timestamp,S1,S1"))
    with pytest.raises(DataError, match=r"values\.csv: column 3 of the header is named 'S1' like column 2"):
        load_byo(values)


def test_rows_wider_than_the_header(tmp_path):
    values = write_city(tmp_path, HOURLY)
    values.write_text(values.read_text().replace("timestamp,S1,S2", "timestamp,S1"))  # pandas took col 1 as index
    with pytest.raises(DataError, match=r"values\.csv: some rows have more fields than the 2 columns of the header"):
        load_byo(values)


def test_sensors_and_graph_column_names(tmp_path):
    values = write_city(tmp_path, HOURLY, sensors="id,lat,lat\nS1,45.1,45.1\nS2,45.2,45.2\n")
    with pytest.raises(DataError, match=r"sensors\.csv: column 3 of the header is named 'lat' like column 2"):
        load_byo(values)
    (tmp_path / "sensors.csv").write_text("id,name,\nS1,a,\nS2,b,\n")
    with pytest.raises(DataError, match=r"sensors\.csv: column 3 of the header has an empty name \(a trailing comma"):
        load_byo(values)
    (tmp_path / "sensors.csv").write_text("id,name\nS1,a\nS2,b\n")
    adjacency = tmp_path / "adjacency.csv"
    adjacency.write_text(",S1,,S2\nS1,0,1\nS2,1,0\n")                      # a nameless first column is allowed
    with pytest.raises(DataError, match=r"adjacency\.csv: column 3 of the header has an empty name; every column"):
        load_byo(values, adjacency=adjacency)
    adjacency.write_text("S1,S1\n0,1\n1,0\n")
    with pytest.raises(DataError, match=r"adjacency\.csv: column 2 of the header is named 'S1' like column 1"):
        load_byo(values, adjacency=adjacency)
    adjacency.write_text(",S1,S2\nS2,0,1\nS1,0.5,0\n")                      # rows in another order than the header
    with pytest.raises(DataError, match=r"adjacency\.csv: adjacency matrix rows are labelled \['S2', 'S1'\]"):
        load_byo(values, adjacency=adjacency)
    adjacency.write_text(",S1,S2\nS1,0,1\nS2,0.5,0\n")
    assert load_byo(values, adjacency=adjacency).adjacency.tolist() == [[0, 1], [0.5, 0]]


# ---- cells the loader used to read as something else -----------------------------------------------------------------
def test_cells_that_are_not_numbers_or_not_finite(tmp_path):
    values = write_city(tmp_path, HOURLY)
    text = values.read_text()
    for cell, what in [("True", r"non-numeric values, e.g. line 5: 'True'"), ("inf", r"line 5: 'inf' is not a finite"),
                       ("1e39", r"line 5: '1e\+39' is not a finite number in float32")]:
        values.write_text(text.replace("03:00,3,30", f"03:00,{cell},30"))
        with pytest.raises(DataError, match=rf"values\.csv: column 'S1'.*{what}"):
            load_byo(values)
    (tmp_path / "sensors.csv").write_text("id,lat,lon\nS1,north,9.1\nS2,45.2,9.2\n")
    values.write_text(text)
    with pytest.raises(DataError, match=r"sensors\.csv: column 'lat' has non-numeric values, e.g. line 2: 'north'"):
        load_byo(values)


def test_timestamps_pandas_would_misread(tmp_path):
    values = write_city(tmp_path, HOURLY)
    text = values.read_text()
    for stamp, what in [("now", r"line 5: cannot read the timestamp 'now'"),
                        ("2262-05-01 00:00", r"line 5: timestamp '2262-05-01 00:00' is outside the years"),
                        ("2120-01-01 03:00", r"span \d+ steps every 1h.*check for a mistyped date")]:
        values.write_text(text.replace("2020-01-01 03:00", stamp))
        with pytest.raises(DataError, match=rf"values\.csv: .*{what}"):
            load_byo(values)
    values.write_text(text.replace(" 02:00", " 02:00+01:00").replace(" 03:00", " 03:00+02:00"))  # DST: wall clock kept
    assert load_byo(values).n_steps == 8


def test_long_form_lines_in_errors(tmp_path):
    (tmp_path / "sensors.csv").write_text("id\nS1\nS2\n")
    (tmp_path / "adjacency.csv").write_text("from,to\nS1,S2\n")
    values = tmp_path / "values.csv"
    values.write_text("timestamp,sensor,value\n2020-01-01 00:00,S1,1\n2020-01-01 01:00,,2\n")
    with pytest.raises(DataError, match=r"values\.csv: line 3 has no sensor id"):
        load(tmp_path)
    values.write_text("timestamp,sensor,value\n2020-01-01 00:00,S1,1\n2020-01-01 01:00,S2,2\n2020-01-01 00:00,S1,3\n")
    with pytest.raises(DataError, match=r"values\.csv: 1 duplicate .* line 4 repeats 2020-01-01 00:00, S1 of line 2"):
        load(tmp_path)


def test_citydata_errors_from_a_loader_name_the_file(tmp_path):
    values = write_city(tmp_path, HOURLY)
    values.write_text("timestamp,S1,S2\n2020-01-01 00:00,1,\n2020-01-01 01:00,2,\n")
    with pytest.raises(DataError, match=r"values\.csv: .*sensors \['S2'\] have no observed value"):
        load_byo(values)


# ---- 4. a split too short for one window names both lengths ----------------------------------------------------------
def test_short_splits_name_their_length_and_the_window(tiny_city):
    cfg = load_config()
    city = tiny_city.slice_time(0, 60)
    cfg.data.split_at = [15, 50]
    with pytest.raises(DataError, match=r"no training windows to fit a scaler on: the train split has 15 steps; "
                                        r"a window needs t_in \+ t_out = 24 \(12 \+ 12\): use a longer split"):
        PreparedCity(city, cfg.data, cfg.encoder)
    cfg.data.split_at = [40, 45]
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    assert len(prep.starts("train")) and len(prep.starts("test"))
    with pytest.raises(DataError, match=r"the val split has 5 steps; a window needs t_in \+ t_out = 24 \(12 \+ 12\)"):
        prep.starts("val")
    with pytest.raises(DataError, match=r"20 time steps are too few: a window needs t_in \+ t_out = 24 \(12 \+ 12\)"):
        window_starts(20, 12, 12)
