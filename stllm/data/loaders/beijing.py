"""Beijing multi-site air quality (UCI): 12 stations, hourly, 2013-03-01 .. 2017-02-28, pollutants + weather.

Folder layout (`BeijingAirQuality/`):
    PRSA_Data_<Station>_20130301-20170228.csv(.gz)   No, year, month, day, hour, PM2.5 .. O3, TEMP, PRES, DEWP,
                                                     RAIN, wd, WSPM, station   ("NA" = missing)
    Beijing_AirQuality_Stations_cn.csv               KDD Cup 2018 list: tab-separated, no header,
                                                     station_id, longitude, latitude
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import read_csv

POLLUTANTS = ["PM2.5", "PM10", "SO2", "NO2", "CO", "O3"]      # all in ug/m3 (CO too)
WEATHER = {"TEMP": "temperature", "PRES": "pressure", "DEWP": "dew_point", "RAIN": "rain", "WSPM": "wind_speed"}
EXOG_NAMES = [*WEATHER.values(), "wind_dir_deg"]               # deg C, hPa, deg C, mm, m/s, degrees
# UCI station name -> id in the KDD Cup 2018 list (which spells Changping "pingchang").
STATION_IDS = {
    "Aotizhongxin": "aotizhongxin_aq", "Changping": "pingchang_aq", "Dingling": "dingling_aq",
    "Dongsi": "dongsi_aq", "Guanyuan": "guanyuan_aq", "Gucheng": "gucheng_aq", "Huairou": "huairou_aq",
    "Nongzhanguan": "nongzhanguan_aq", "Shunyi": "shunyi_aq", "Tiantan": "tiantan_aq",
    "Wanliu": "wanliu_aq", "Wanshouxigong": "wanshouxigong_aq",
}
COMPASS = ["N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW"]


def compass_to_degrees(wd: pd.Series) -> np.ndarray:
    """16-point compass strings ("NNW") -> degrees clockwise from north (N = 0, E = 90); NaN when missing."""
    table = {name: 22.5 * k for k, name in enumerate(COMPASS)}
    return wd.map(table).to_numpy(np.float64)


def load_beijing(root: str | Path, channels: Sequence[str] | None = None) -> CityData:
    """The 12 UCI stations as CityData.

    values [T=35064, 12, C] pollutant concentrations in ug/m3 (`channels` picks a subset of
    PM2.5, PM10, SO2, NO2, CO, O3; default all six, in that order), NaN where "NA".
    exog [T, 12, 6] per-station weather: temperature (deg C), pressure (hPa), dew_point (deg C), rain (mm),
    wind_speed (m/s), wind_dir_deg (direction the wind blows from, degrees clockwise from north; NaN when missing).
    Timestamps are Beijing local time (no DST).
    """
    root = Path(root)
    channels = list(channels) if channels is not None else list(POLLUTANTS)
    unknown = [c for c in channels if c not in POLLUTANTS]
    if unknown or not channels:
        raise DataError(f"beijing-air: unknown channels {unknown or channels}; choose from {POLLUTANTS}")
    coords = _read_station_coordinates(root / "Beijing_AirQuality_Stations_cn.csv")
    frames = [_read_station(_station_file(root, s), s) for s in STATION_IDS]
    time = frames[0].index
    for s, f in zip(STATION_IDS, frames):
        if not f.index.equals(time):
            raise DataError(f"{_station_file(root, s)}: hourly timestamps differ from those of Aotizhongxin")
    values = np.stack([f[channels].to_numpy(np.float32) for f in frames], axis=1)          # [T, N, C]
    exog = np.stack([np.column_stack([f[list(WEATHER)].to_numpy(np.float32),
                                      compass_to_degrees(f["wd"])]) for f in frames], axis=1)  # [T, N, 6]
    nodes = pd.DataFrame({"id": list(STATION_IDS), "name": list(STATION_IDS),
                          "lat": [coords[k][1] for k in STATION_IDS.values()],
                          "lon": [coords[k][0] for k in STATION_IDS.values()],
                          "description": [f"air-quality monitoring station {s}, Beijing" for s in STATION_IDS]})
    return CityData(name="beijing-air", values=values, timestamps=time.to_numpy(), interval=pd.Timedelta("1h"),
                    channels=channels, units=["ug/m3"] * len(channels), nodes=nodes, city="Beijing",
                    domain="air quality", exog=exog.astype(np.float32), exog_names=list(EXOG_NAMES))


def _station_file(root: Path, station: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        path = root / f"PRSA_Data_{station}_20130301-20170228{suffix}"
        if path.is_file():
            return path
    return root / f"PRSA_Data_{station}_20130301-20170228.csv.gz"  # read_csv then reports it missing


def _read_station(path: Path, station: str) -> pd.DataFrame:
    """One station file indexed by hourly timestamp."""
    cols = ["year", "month", "day", "hour", *POLLUTANTS, *WEATHER, "wd"]
    df = read_csv(path, f"UCI air-quality CSV for station {station}", usecols=lambda c: c in cols)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    time = pd.to_datetime(df[["year", "month", "day", "hour"]])
    if not (time.diff().iloc[1:] == pd.Timedelta("1h")).all():
        raise DataError(f"{path}: rows are not consecutive hours")
    return df.set_index(pd.DatetimeIndex(time, name="time"))


def _read_station_coordinates(path: Path) -> dict[str, tuple[float, float]]:
    """{KDD station id: (lon, lat)} from the headerless, tab-separated KDD Cup 2018 list."""
    df = read_csv(path, "KDD Cup 2018 station list (station_id, longitude, latitude; tab-separated, no header)",
                  sep="\t", header=None)
    if df.shape[1] != 3:
        raise DataError(f"{path}: expected 3 tab-separated columns station_id, longitude, latitude; got {df.shape[1]}")
    coords = {str(r[0]).strip(): (float(r[1]), float(r[2])) for r in df.itertuples(index=False)}
    missing = [k for k in STATION_IDS.values() if k not in coords]
    if missing:
        raise DataError(f"{path}: no coordinates for stations {missing}")
    return coords
