"""`load(name_or_path)`: the one entry point from a dataset name or a file to a CityData."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stllm.data.city import CityData, DataError
from stllm.data.loaders import (load_bayarea, load_beijing, load_byo, load_dcrnn, load_losloop, load_melbourne,
                                load_nyc, load_pems)
from stllm.data.loaders.crime import load_crime

ENV_ROOT = "STLLM_DATA_ROOT"


@dataclass(frozen=True)
class Builtin:
    """A named dataset: where it lives under the data root and which loader reads it."""

    path: str                                   # folder or file relative to the data root
    loader: Callable[..., CityData]             # called as loader(root / path, **options)
    options: dict[str, Any] = field(default_factory=dict)


_NYC, _BAY = "NYC_Manhattan_TaxiBike", "BayArea_BikeShare_2014"
BUILTINS: dict[str, Builtin] = {
    "nyc-bike": Builtin(_NYC, load_nyc, {"mode": "bike", "interval": "60min"}),
    "nyc-bike-60min": Builtin(_NYC, load_nyc, {"mode": "bike", "interval": "60min"}),
    "nyc-bike-30min": Builtin(_NYC, load_nyc, {"mode": "bike", "interval": "30min"}),
    "nyc-taxi": Builtin(_NYC, load_nyc, {"mode": "taxi", "interval": "60min"}),
    "nyc-taxi-60min": Builtin(_NYC, load_nyc, {"mode": "taxi", "interval": "60min"}),
    "nyc-taxi-30min": Builtin(_NYC, load_nyc, {"mode": "taxi", "interval": "30min"}),
    "beijing-air": Builtin("BeijingAirQuality", load_beijing),
    "bayarea-bike": Builtin(_BAY, load_bayarea),
    "bayarea-bike-sf": Builtin(_BAY, load_bayarea, {"sf_only": True}),
    "los-loop": Builtin("LosLoop", load_losloop),
    "melbourne-pedestrian": Builtin("Melbourne_Pedestrian", load_melbourne),
    # Daily crime counts per 3 km grid cell (ST-SHN / STHSL); their own split: loaders.crime.crime_split_bounds
    "nyc-crime": Builtin("NYC_CHI_Crime", load_crime, {"city": "nyc"}),
    "chicago-crime": Builtin("NYC_CHI_Crime", load_crime, {"city": "chicago"}),
    # Standard benchmarks whose tensors are not in the shared data folder; they load once the file is placed.
    "metr-la": Builtin("METR-LA/metr-la.h5", load_dcrnn),
    "pems-bay": Builtin("PEMS-BAY/pems-bay.h5", load_dcrnn),
    **{f"pems0{k}": Builtin(f"PEMS0{k}/PEMS0{k}.npz", load_pems) for k in (3, 4, 7, 8)},
}
SYNTHETIC = "synthetic"


def load(name_or_path: str | Path, root: str | Path | None = None, **options: Any) -> CityData:
    """A CityData from a built-in name (resolved under `root` or $STLLM_DATA_ROOT), "synthetic", or a path.

    Paths: a PEMS0x `.npz` (key `data`, edge CSV next to it), a DCRNN `.h5`, a bring-your-own values `.csv`,
    or a folder holding one of these. Options go to the loader; `sensors=` and `adjacency=` work for every
    path format (see docs/data_formats.md).
    """
    check_options(name_or_path, options)            # before any data is read: a misspelt option costs nothing
    key = str(name_or_path)
    if key == SYNTHETIC:
        from stllm.data.synthetic import make_city   # written separately; imported only when asked for
        return make_city(**options)
    if key in BUILTINS:
        entry = BUILTINS[key]
        target = data_root(root) / entry.path
        if not target.exists():
            raise DataError(f"{target}: not found; built-in dataset {key!r} expects {entry.path} under the data root")
        return entry.loader(target, **{**entry.options, **options})
    return load_path(_existing(name_or_path), **options)


def check_options(name_or_path: str | Path, options: dict[str, Any] | None) -> None:
    """DataError unless the loader that `load(name_or_path, **options)` calls takes every option (names
    checked, not values). Reads no data, so a run can check its config before it makes its folder."""
    key, options = str(name_or_path), dict(options or {})
    if key == SYNTHETIC:
        from stllm.data.synthetic import make_city
        _check(make_city, options, key, positional=0)
    elif key in BUILTINS:
        _check(BUILTINS[key].loader, {**BUILTINS[key].options, **options}, key)
    else:
        path = _existing(name_or_path)
        loader = _format_loader(path)
        _check(loader, _renamed(loader, options), str(path))


def _existing(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if not path.exists():
        if path.suffix == "" and len(path.parts) == 1:
            raise DataError(f"unknown dataset {str(name_or_path)!r}; built-in names are "
                            f"{sorted(BUILTINS) + [SYNTHETIC]}, or give a path to a file in a supported format")
        raise DataError(f"{path}: file not found")
    return path


def data_root(root: str | Path | None = None) -> Path:
    """`root`, else $STLLM_DATA_ROOT; DataError naming the variable when neither points at a folder."""
    if root is None:
        value = os.environ.get(ENV_ROOT)
        if not value:
            raise DataError(f"no data root: pass root= or set the environment variable {ENV_ROOT} "
                            "to the folder holding the datasets (e.g. shared/data)")
        root, source = Path(value), f"{ENV_ROOT}={value}"
    else:
        root, source = Path(root), "root="
    if not Path(root).is_dir():
        raise DataError(f"{root}: data root is not a folder (from {source})")
    return Path(root)


# Shared option names -> each loader's own argument name.
_RENAME = {load_dcrnn: {"sensors": "locations", "adjacency": "adj_pkl"},
           load_pems: {"sensors": "ids", "adjacency": "edges"}}


def load_path(path: str | Path, **options: Any) -> CityData:
    """Dispatch a file or folder to its loader by extension or folder contents."""
    path = Path(path)
    loader = _format_loader(path)
    options = _renamed(loader, options)
    _check(loader, options, str(path))
    if path.is_dir() and loader is not load_byo:
        path = _single(path, {load_dcrnn: "*.h5", load_pems: "*.npz"}[loader])
    return loader(path, **options)


def _format_loader(path: Path) -> Callable[..., CityData]:
    loader = _loader_for(path)
    if loader is None:
        raise DataError(f"{path}: unsupported format; expected a PEMS .npz (key 'data'), a DCRNN .h5, "
                        "a bring-your-own values .csv, or a folder holding one of these")
    return loader


def _renamed(loader: Callable[..., CityData], options: dict[str, Any]) -> dict[str, Any]:
    return {_RENAME.get(loader, {}).get(k, k): v for k, v in options.items()}


# How errors name each loader.
_LOADER_NAMES = {load_byo: "the bring-your-own CSV loader", load_pems: "the PEMS .npz loader",
                 load_dcrnn: "the DCRNN .h5 loader", load_nyc: "the NYC taxi/bike loader",
                 load_beijing: "the Beijing air-quality loader", load_bayarea: "the Bay Area bike-share loader",
                 load_losloop: "the Los-Loop loader", load_crime: "the NYC/Chicago crime loader"}


def _check(loader: Callable[..., CityData], options: dict[str, Any], where: str, positional: int = 1) -> None:
    """DataError naming the options `loader` has no parameter for; its first `positional` parameters are filled
    by the registry (the path), not by options."""
    try:
        params = list(inspect.signature(loader).parameters.values())[positional:]
    except (TypeError, ValueError):          # no readable signature: the call itself will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [str(k) for k in options if k not in accepted]
    if unknown:
        label = "the synthetic city" if loader.__name__ == "make_city" else _LOADER_NAMES.get(loader, "the loader")
        names = sorted({*accepted, *_RENAME.get(loader, {})})       # shared names (sensors=, ...) work too
        raise DataError(f"{where}: unknown option(s) {', '.join(unknown)} for {label} ({loader.__name__}); "
                        f"it accepts {', '.join(names)}")


def _loader_for(path: Path) -> Callable[..., CityData] | None:
    name = path.name.lower()
    if path.is_dir():
        if any((path / f).is_file() for f in ("values.csv", "values.csv.gz")):
            return load_byo
        if list(path.glob("*.h5")):
            return load_dcrnn
        if list(path.glob("*.npz")):
            return load_pems
        return None
    if name.endswith((".csv", ".csv.gz")):
        return load_byo
    if name.endswith((".h5", ".hdf5", ".hdf")):
        return load_dcrnn
    if name.endswith(".npz"):
        return load_pems
    return None


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataError(f"{folder}: expected one {pattern} file, found {[p.name for p in found]}; give the file path")
    return found[0]
