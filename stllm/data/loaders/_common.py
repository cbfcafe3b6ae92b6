"""Small readers shared by the loaders. Every failure is a DataError naming the file and what was expected."""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stllm.data.city import DataError


def require(path: str | Path, what: str) -> Path:
    """`path` as a Path; DataError if it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {what}")
    return path


def read_csv(path: str | Path, what: str, **kwargs) -> pd.DataFrame:
    """pandas.read_csv (gzip by extension) with errors that name the file."""
    path = require(path, what)
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        hint = "; save it as UTF-8" if isinstance(e, UnicodeDecodeError) else ""
        raise DataError(f"{path}: could not read {what} ({type(e).__name__}: {e}){hint}") from e


def read_table(path: str | Path, what: str, unnamed_first: bool = False, **kwargs) -> pd.DataFrame:
    """read_csv for a CSV with a header row, strict about its shape.

    Every column needs a name (a nameless first column is allowed where `unnamed_first`, e.g. a matrix's row ids),
    no name may repeat, and no row may be wider than the header: pandas would otherwise invent `Unnamed: 3`,
    rename a repeat to `S1.1`, or take the first column as the index. Names come back stripped of spaces; the index
    holds each row's line number in the file (header = line 1, assuming no line breaks inside quoted cells);
    empty lines are dropped.
    """
    header = read_csv(path, what, header=None, nrows=1, dtype=str, keep_default_na=False, skip_blank_lines=False)
    names = [str(c).strip() for c in header.iloc[0]] if len(header) else []
    if not any(names):
        raise DataError(f"{path}: line 1 is empty; expected the header row of the {what}")
    seen: dict[str, int] = {}
    for k, name in enumerate(names, start=1):
        if not name and not (k == 1 and unnamed_first):
            hint = " (a trailing comma?)" if k == len(names) else ""
            raise DataError(f"{path}: column {k} of the header has an empty name{hint}; every column needs a name")
        if name in seen:
            raise DataError(f"{path}: column {k} of the header is named {name!r} like column {seen[name]}; "
                            "column names must be unique")
        seen[name] = k
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)   # a row wider than the header
        try:
            df = read_csv(path, what, header=0, names=names, index_col=False, skip_blank_lines=False, **kwargs)
        except pd.errors.ParserWarning as e:
            raise DataError(f"{path}: some rows have more fields than the {len(names)} columns of the header "
                            "(a trailing comma?)") from e
    df.index = df.index + 2
    return df[df.notna().any(axis=1)]


def read_npz(path: str | Path, key: str, what: str) -> np.ndarray:
    """One array from an .npz archive (pickles refused)."""
    path = require(path, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path}: no array {key!r} in the archive (has {z.files}); expected {what}")
            return z[key]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError for object arrays, ...
        raise DataError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); expected {what}") from e


def check_shape(array: np.ndarray, shape: Sequence[int | None], path: str | Path, what: str) -> np.ndarray:
    """Raise unless `array` has `shape` (None = any size on that axis)."""
    ok = array.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, array.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise DataError(f"{path}: {what} has shape {tuple(array.shape)}, expected {want}")
    return array


def read_matrix(path: str | Path, n: int, what: str, header: bool) -> np.ndarray:
    """A plain numeric [n, n] matrix CSV, with or without a header row."""
    df = read_csv(path, what, header=0 if header else None)
    try:
        m = df.to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {what} has non-numeric entries ({e})") from e
    return check_shape(m, (n, n), path, what)


def time_axis(start: str | pd.Timestamp, n_steps: int, interval: str | pd.Timedelta) -> np.ndarray:
    """[T] datetime64[ns]: `n_steps` steps from `start`."""
    return pd.date_range(pd.Timestamp(start), periods=n_steps, freq=pd.Timedelta(interval)).to_numpy()


def edge_index(edges: pd.DataFrame, ids: Sequence[str], path: str | Path
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Positions in `ids` of each edge's from / to node (columns 0, 1), and the numeric column 2 if present."""
    if edges.shape[1] < 2:
        raise DataError(f"{path}: edge list needs columns from, to[, cost]; has {list(edges.columns)}")
    pos = {str(i): k for k, i in enumerate(ids)}
    src, dst = (edges.iloc[:, k].astype(str).fillna("").str.strip().str.removesuffix(".0") for k in (0, 1))
    if (src == "").any() or (dst == "").any():
        raise DataError(f"{path}: edge list has {int((src == '').sum() + (dst == '').sum())} empty from/to cells")
    unknown = sorted(set(src[~src.isin(pos)]) | set(dst[~dst.isin(pos)]))
    if unknown:
        raise DataError(f"{path}: edge list names {len(unknown)} unknown nodes, e.g. {unknown[:5]}; "
                        f"known ids look like {list(ids)[:5]}")
    cost = None
    if edges.shape[1] > 2:
        cost = pd.to_numeric(edges.iloc[:, 2], errors="coerce").to_numpy(np.float64)
        if np.isnan(cost).any():
            raise DataError(f"{path}: edge list has non-numeric values in column {edges.columns[2]!r}")
    return src.map(pos).to_numpy(int), dst.map(pos).to_numpy(int), cost


def edges_to_matrices(edges: pd.DataFrame, ids: Sequence[str], path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Edge list (from, to, cost) over node `ids` -> (adjacency [N, N] 0/1, distances [N, N]).

    Edges keep their direction (row = from). Distances are 0 on the diagonal and inf where no edge is known;
    a pair listed twice keeps its smallest cost; self-loops (PEMS03 has one) are dropped.
    """
    i, j, cost = edge_index(edges, ids, path)
    if cost is None:
        raise DataError(f"{path}: edge list needs a third column with the cost (distance) of each link")
    n = len(ids)
    distances = np.full((n, n), np.inf)
    np.minimum.at(distances, (i, j), cost)
    adjacency = np.zeros((n, n), dtype=np.float32)
    adjacency[i, j] = 1.0
    np.fill_diagonal(adjacency, 0.0)
    np.fill_diagonal(distances, 0.0)
    return adjacency, distances


def read_edges(path: str | Path, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Edge-list CSV `from, to, cost` (header optional) -> (adjacency, distances) over `ids`, see edges_to_matrices."""
    df = read_csv(path, "edge list CSV (from, to, cost)", header=None, dtype=str)
    if not df.empty and not _is_number(df.iloc[0, 2] if df.shape[1] > 2 else ""):  # a header row
        df = df.iloc[1:]
    return edges_to_matrices(df, ids, path)


def read_locations(path: str | Path) -> pd.DataFrame:
    """DCRNN sensor locations -> DataFrame id, lat, lon.

    Accepts METR-LA's `index,sensor_id,latitude,longitude` (with header) and PEMS-BAY's headerless
    `sensor_id,latitude,longitude`.
    """
    what = "sensor locations CSV (sensor_id, latitude, longitude)"
    df = read_csv(path, what, header=None, dtype=str)
    if not df.empty and not _is_number(df.iloc[0, -1]):  # a header row
        df = df.iloc[1:]
    if df.shape[1] not in (3, 4):
        raise DataError(f"{path}: {what} has {df.shape[1]} columns, expected 3 or 4")
    df = df.iloc[:, -3:]
    out = pd.DataFrame({"id": df.iloc[:, 0].str.strip().str.removesuffix(".0").to_numpy(),
                        "lat": pd.to_numeric(df.iloc[:, 1], errors="coerce").to_numpy(),
                        "lon": pd.to_numeric(df.iloc[:, 2], errors="coerce").to_numpy()})
    if out[["lat", "lon"]].isna().any().any():
        raise DataError(f"{path}: {what} has non-numeric latitude/longitude entries")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def nodes_with_coordinates(ids: Sequence[str], locations: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Nodes table for `ids` in that order, coordinates looked up in `locations` (id, lat, lon)."""
    table = locations.drop_duplicates("id").set_index("id")
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise DataError(f"{path}: no coordinates for {len(missing)} sensors, e.g. {missing[:5]}")
    rows = table.loc[list(ids)]
    return pd.DataFrame({"id": list(ids), "lat": rows["lat"].to_numpy(), "lon": rows["lon"].to_numpy()})
