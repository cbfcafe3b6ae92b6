"""`safe_load`: read a pickle that may only hold builtin containers, scalars and numpy arrays.

Benchmark graphs (DCRNN's `adj_mx.pkl`), tensors (STHSL's crime `*.pkl`) and UCTB datasets (a dict of lists and
numpy arrays, zipped: Melbourne pedestrians) ship as pickles. A plain
`pickle.load` runs whatever callable the file names, so every global the file asks for is checked against
an allow-list first; anything else raises `DataError` naming the file and the global.
"""
from __future__ import annotations

import gzip
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from stllm.data.city import DataError

# (module, name) pairs a pickle may reference. Python-2 pickles name builtins `__builtin__`.
_BUILTIN_NAMES = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "complex", "bool"}
_NUMPY_NAMES = {  # numpy's own array/scalar reconstruction helpers, under numpy 1.x and 2.x module paths
    ("multiarray", "_reconstruct"), ("multiarray", "scalar"),
    ("_multiarray_umath", "_reconstruct"), ("_multiarray_umath", "scalar"),
    ("numeric", "_frombuffer"),
}


def _allowed(module: str, name: str) -> Any | None:
    """The object for an allowed global, else None."""
    if module in ("builtins", "__builtin__") and name in _BUILTIN_NAMES:
        return getattr(__import__("builtins"), name)
    if (module, name) == ("_codecs", "encode"):   # how protocol-2 pickles from Python 3 store bytes
        return __import__("_codecs").encode
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(importlib.import_module("numpy"), name)
    for prefix in ("numpy._core.", "numpy.core."):
        if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY_NAMES:
            return _numpy_global(module[len(prefix):], name)
    return None


def _numpy_global(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; importing numpy.core.* there only warns, so try _core first
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {submodule}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python-2 str holding numpy buffers
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            raise DataError(f"{self.path}: pickle refers to forbidden global {module}.{name}; "
                            "only builtin containers, scalars and numpy arrays are allowed")
        return obj


def safe_load(path: str | Path) -> Any:
    """Unpickle `path` (plain or gzip) allowing only builtins and numpy arrays; Python-2 pickles work too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pickle file not found")
    return safe_loads(path.read_bytes(), path)


def safe_loads(raw: bytes, source: str | Path) -> Any:
    """`safe_load` of pickle bytes already in memory (e.g. a zip member); `source` names them in errors."""
    path = Path(source)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from e
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled files raise many different types
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
