"""Read a DataFrame saved by `pandas.DataFrame.to_hdf` in the default 'fixed' layout, with h5py only.

pandas needs PyTables for this; the layout is simple enough to read directly:
    /<key>            group, attrs pandas_type=b"frame", nblocks
    /<key>/axis0      column labels (bytes strings or ints), attr kind
    /<key>/axis1      index; datetimes are int64 with attr kind=b"datetime64" (ns) or b"datetime64[us]"
    /<key>/block{i}_items, block{i}_values   one block per dtype; values stored [rows, items] when the
                                             attr transposed is set (every pandas since 0.x), else [items, rows]
"""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from stllm.data.city import DataError


def read_fixed_frame(path: str | Path, key: str | None = None) -> pd.DataFrame:
    """The DataFrame under `key` (default: the only frame in the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a pandas HDF5 file (DataFrame.to_hdf, fixed format)")
    try:
        with h5py.File(path, "r") as f:
            group = _frame_group(f, key, path)
            return _read_group(group, path)
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable pandas HDF5 frame ({type(e).__name__}: {e})") from e


def _frame_group(f: h5py.File, key: str | None, path: Path) -> h5py.Group:
    frames = [k for k, g in f.items() if isinstance(g, h5py.Group) and _attr(g, "pandas_type") == "frame"]
    tables = [k for k, g in f.items() if isinstance(g, h5py.Group) and _attr(g, "pandas_type") == "frame_table"]
    if key is not None:
        if key in tables:
            raise DataError(f"{path}: frame {key!r} is in pandas 'table' format; only the 'fixed' format is supported")
        if key not in frames:
            raise DataError(f"{path}: no pandas frame under key {key!r}; frames: {frames}")
        return f[key]
    if len(frames) != 1:
        hint = " (pandas 'table' format is not supported)" if tables else ""
        raise DataError(f"{path}: expected exactly one pandas 'fixed' frame, found {frames}{hint}; pass key=")
    return f[frames[0]]


def _read_group(g: h5py.Group, path: Path) -> pd.DataFrame:
    columns = _read_index(g["axis0"])
    index = _read_index(g["axis1"])
    out = np.full((len(index), len(columns)), np.nan)
    pos = {c: k for k, c in enumerate(columns)}
    for b in range(int(g.attrs.get("nblocks", 1))):
        items = _read_index(g[f"block{b}_items"])
        values = np.asarray(g[f"block{b}_values"][()])
        if values.shape == (len(items), len(index)) and values.shape != (len(index), len(items)):
            values = values.T   # very old files without the transposed flag
        if values.shape != (len(index), len(items)):
            raise DataError(f"{path}: block{b}_values has shape {values.shape}, "
                            f"expected ({len(index)}, {len(items)}) from axis1 and block{b}_items")
        out[:, [pos[i] for i in items]] = values
    return pd.DataFrame(out, index=index, columns=columns)


def _read_index(ds: h5py.Dataset) -> pd.Index:
    data = ds[()]
    kind = _attr(ds, "kind")
    if kind.startswith("datetime64"):
        unit = re.search(r"\[(\w+)\]", kind)
        return pd.DatetimeIndex(np.asarray(data, dtype=np.int64).view(f"datetime64[{unit.group(1) if unit else 'ns'}]"))
    if data.dtype.kind == "S":
        return pd.Index([x.decode("utf-8") for x in data])
    return pd.Index(data)


def _attr(obj: h5py.HLObject, name: str) -> str:
    value = obj.attrs.get(name, b"")
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)
