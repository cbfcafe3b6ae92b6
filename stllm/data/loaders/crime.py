"""NYC and Chicago crime (the ST-SHN / STHSL benchmark): daily event counts per 3 km grid cell, 4 offence categories.

Files (shared/data/NYC_CHI_Crime/SOURCE.md), per city folder `NYC_crime/` or `CHI_crime/`:
    trn.pkl(.gz), val.pkl(.gz), tst.pkl(.gz)   each ONE pickled float64 array (rows, cols, days, 4) of counts;
                                               consecutive calendar periods (NYC 608 / 30 / 92 days from 2014-01-01,
                                               Chicago 609 / 30 / 92 days from 2016-01-01)
    NYC_Crime.zip / CHI_Crime.zip              the raw event list (CSV with latitude, longitude); optional

Grid rule of the original preprocessing (checked here: binning NYC_Crime.csv this way reproduces the three NYC
tensors exactly): over the events' bounding box, `row = int((lat - min_lat) * 111 / 3)`,
`col = int((lon - min_lon) * 84 / 3)`; row 0 is the southern edge, col 0 the western edge, and STHSL numbers regions
`row * cols + col` (the node order here). Cell centres are therefore `min_lat + (row + 0.5) * 3 / 111`,
`min_lon + (col + 0.5) * 3 / 84`: approximate (a degree is not exactly 111 / 84 km), good enough for a
distance-based graph and for prompts.

The split files are concatenated in time; `crime_split_bounds` gives the cut points, so a trainer can use the
benchmark's own split instead of 7:1:2.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError
from stllm.data.loaders._common import time_axis
from stllm.data.safe_pickle import safe_load

SPLITS = ("trn", "val", "tst")
LAT_CELL_DEG = 3 / 111  # cell height in degrees (3 km at 111 km per degree), as in the original binning
LON_CELL_DEG = 3 / 84   # cell width in degrees (3 km at 84 km per degree of longitude, about right at 40-42 N)


@dataclass(frozen=True)
class CrimeCity:
    """One city of the benchmark: where its files are and what its axes mean."""

    folder: str                      # sub-folder of the dataset root
    name: str                        # CityData.name
    city: str                        # human name, used in prompts
    start: str                       # calendar date of day 0 of trn
    categories: tuple[str, ...]      # axis -1 of the tensors, in order (matched to the raw CSV's per-offence totals)
    raw_zip: str                     # raw event list
    latlon_columns: tuple[int, int]  # positions of latitude and longitude in the raw CSV
    # South-west corner (min latitude, min longitude) of the raw events, read from the zip with
    # `crime_grid_origin`; used only when the zip is absent. Equal to the values in SOURCE.md.
    origin: tuple[float, float]


CITIES = {
    "nyc": CrimeCity("NYC_crime", "nyc-crime", "New York", "2014-01-01",
                     ("burglary", "grand larceny", "robbery", "felony assault"),
                     "NYC_Crime.zip", (5, 6), (40.5002159760001, -74.253109964)),
    "chicago": CrimeCity("CHI_crime", "chicago-crime", "Chicago", "2016-01-01",
                         ("theft", "battery", "assault", "criminal damage"),
                         "CHI_Crime.zip", (2, 3), (41.644604096, -87.927881741)),
}
_ALIASES = {"nyc": "nyc", "ny": "nyc", "new york": "nyc", "new york city": "nyc",
            "chicago": "chicago", "chi": "chicago"}


def load_crime(root: str | Path, city: str = "nyc") -> CityData:
    """Counts [T, rows*cols, 4] (float32, events per day) for city "nyc" or "chicago".

    `root` is the dataset folder (holding NYC_crime/ and CHI_crime/) or one city's folder. Nodes are grid cells,
    ids "r{row}c{col}" in STHSL's order (row-major, row 0 south), with approximate cell-centre coordinates.
    """
    spec, folder, parts = _read_splits(root, city)
    grid = parts[0]                                             # (rows, cols, days, K)
    rows, cols = grid.shape[:2]
    counts = np.concatenate(parts, axis=2)                      # (rows, cols, T, K)
    values = counts.reshape(rows * cols, counts.shape[2], -1).transpose(1, 0, 2)  # [T, N, K]
    min_lat, min_lon = crime_grid_origin(folder, city, shape=(rows, cols))
    r, c = np.divmod(np.arange(rows * cols), cols)
    nodes = pd.DataFrame({"id": [f"r{i}c{j}" for i, j in zip(r, c)],
                          "lat": min_lat + (r + 0.5) * LAT_CELL_DEG,
                          "lon": min_lon + (c + 0.5) * LON_CELL_DEG,
                          "description": [f"grid cell row {i}, col {j}" for i, j in zip(r, c)]})
    k = len(spec.categories)
    return CityData(name=spec.name, values=values, timestamps=time_axis(spec.start, values.shape[0], "1D"),
                    interval=pd.Timedelta("1D"), channels=list(spec.categories), units=["events"] * k,
                    nodes=nodes, city=spec.city, domain="crime", holidays="US",
                    split_at=(parts[0].shape[2], parts[0].shape[2] + parts[1].shape[2]))


def crime_split_bounds(root: str | Path, city: str = "nyc") -> tuple[int, int]:
    """(train_end, test_start) on the time axis of `load_crime(root, city)`: the benchmark's own trn/val/tst cut.

    Same meaning as `stllm.data.windows.split_bounds`: train = [0, train_end), val = [train_end, test_start),
    test = [test_start, T). NYC: (608, 638) of 730; Chicago: (609, 639) of 731.
    """
    _, _, (trn, val, _) = _read_splits(root, city)
    return trn.shape[2], trn.shape[2] + val.shape[2]


def crime_grid_origin(folder: str | Path, city: str = "nyc", shape: tuple[int, int] | None = None
                      ) -> tuple[float, float]:
    """(min latitude, min longitude) of the raw events in `<folder>/<raw zip>`; the stored corner without the zip.

    With `shape=(rows, cols)` the zip's bounding box must produce exactly that grid, else DataError (a raw event
    list that does not belong to the tensors). Reading the ~15-19 MB CSV takes about 0.1 s.
    """
    spec = _spec(city)
    path = Path(folder) / spec.raw_zip
    if not path.is_file():
        return spec.origin
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(".csv")]
            if len(members) != 1:
                raise DataError(f"{path}: expected one .csv inside the zip, found {members}")
            with zf.open(members[0]) as f:
                # header=None: NYC's header row and Chicago's headerless first event are read alike; the
                # header's text becomes NaN below
                df = pd.read_csv(f, header=None, usecols=list(spec.latlon_columns), dtype=str)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: could not read the raw event list ({type(e).__name__}: {e})") from e
    lat, lon = (pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64) for col in spec.latlon_columns)
    ok = np.isfinite(lat) & np.isfinite(lon)
    if not ok.any():
        raise DataError(f"{path}: no numeric latitude/longitude in columns {spec.latlon_columns} of the raw CSV")
    lat, lon = lat[ok], lon[ok]
    if shape is not None:
        got = (int((lat.max() - lat.min()) / LAT_CELL_DEG) + 1, int((lon.max() - lon.min()) / LON_CELL_DEG) + 1)
        if got != tuple(shape):
            raise DataError(f"{path}: the events' bounding box gives a {got[0]}x{got[1]} grid of 3 km cells, "
                            f"but the count tensors are {shape[0]}x{shape[1]}; the zip does not belong to them")
    return float(lat.min()), float(lon.min())


# ---- helpers ------------------------------------------------------------------------------------------------------
def _spec(city: str) -> CrimeCity:
    key = _ALIASES.get(str(city).strip().lower())
    if key is None:
        raise DataError(f"unknown crime city {city!r}; use one of {sorted(CITIES)}")
    return CITIES[key]


def _city_folder(root: str | Path, spec: CrimeCity) -> Path:
    """`root` itself when it holds the split files, else `root/<spec.folder>`."""
    root = Path(root)
    for folder in (root, root / spec.folder):
        if any((folder / f"trn.pkl{ext}").is_file() for ext in (".gz", "")):
            return folder
    raise DataError(f"{root}: no trn.pkl(.gz) here or in {root / spec.folder}; expected the ST-SHN/STHSL crime "
                    "files trn/val/tst.pkl(.gz)")


def _read_splits(root: str | Path, city: str) -> tuple[CrimeCity, Path, list[np.ndarray]]:
    """The city's spec, folder and its trn, val, tst count arrays (rows, cols, days, K), checked."""
    spec = _spec(city)
    folder = _city_folder(root, spec)
    parts = [_read_split(folder, split, len(spec.categories)) for split in SPLITS]
    shapes = [p.shape for p in parts]
    if len({s[:2] for s in shapes}) != 1:
        raise DataError(f"{folder}: trn/val/tst grids differ: {[s[:2] for s in shapes]}")
    return spec, folder, parts


def _read_split(folder: Path, split: str, k: int) -> np.ndarray:
    path = folder / f"{split}.pkl.gz"
    if not path.is_file():
        path = folder / f"{split}.pkl"
    array = safe_load(path)  # DataError naming the file when it is missing or not a plain numpy pickle
    if not isinstance(array, np.ndarray) or array.ndim != 4 or array.shape[3] != k or 0 in array.shape:
        got = array.shape if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{path}: expected one array (rows, cols, days, {k}) of event counts, got {got}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise DataError(f"{path}: event counts must be finite and >= 0")
    return array
