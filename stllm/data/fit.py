"""Data meets a trained run: what a run remembers about its training data (`RunMeta`, its meta.json), loading the
dataset a config names, fitting other data to a run, preparing it with the run's scaler, and finding nodes and
forecast times in it. Numpy and pandas only: nothing here needs the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from stllm.data.city import CityData, DataError
from stllm.data.prepared import PreparedCity
from stllm.data.windows import Scaler


@dataclass
class RunMeta:
    """What a run must remember about its training data to be used without it (meta.json)."""

    dataset: str                      # CityData.name of the training data, e.g. "nyc-bike-60min"
    n_nodes: int                      # its number of nodes
    channels: list[str]               # C channel names, in the order the model reads them
    units: list[str]                  # C units
    interval: pd.Timedelta            # one step
    scaler: Scaler                    # fitted on the training part; reused on the same dataset only
    exog_names: list[str] = field(default_factory=list)  # exogenous features the encoder reads, in order
    train_end: pd.Timestamp | None = None  # the last training step (None: no training part)
    city: str = ""                    # the place, as the training data named it
    domain: str = ""                  # "bike sharing", "air quality", ...
    sources: list[str] = field(default_factory=list)  # the other datasets it trained on (data.sources), by name
    source_intervals: list[pd.Timedelta] = field(default_factory=list)  # their steps (a run that mixed steps
                                      # forecasts at any of them: periods and profile are counted per city)

    def __post_init__(self) -> None:
        self.interval = pd.Timedelta(self.interval)
        self.source_intervals = [pd.Timedelta(i) for i in self.source_intervals]
        self.train_end = None if self.train_end is None else pd.Timestamp(self.train_end)
        if len(self.units) != len(self.channels):
            raise ValueError(f"RunMeta: {len(self.units)} units for {len(self.channels)} channels")

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_exog(self) -> int:
        return len(self.exog_names)

    @classmethod
    def from_prepared(cls, prep: PreparedCity) -> "RunMeta":
        """The meta of a run trained on `prep` (its scaler, channels, exogenous features, split)."""
        city = prep.city
        return cls(dataset=city.name, n_nodes=city.n_nodes, channels=list(city.channels), units=list(city.units),
                   interval=city.interval, scaler=prep.scaler, exog_names=list(prep.exog_names),
                   train_end=pd.Timestamp(city.timestamps[prep.train_end - 1]) if prep.train_end else None,
                   city=city.city or "", domain=city.domain or "")

    def to_dict(self) -> dict:
        """meta.json's content (n_channels and n_exog written out for readers of the file)."""
        return {"dataset": self.dataset, "city": self.city, "domain": self.domain, "n_nodes": self.n_nodes,
                "n_channels": self.n_channels, "channels": self.channels, "units": self.units,
                "n_exog": self.n_exog, "exog_names": self.exog_names, "interval": str(self.interval),
                "scaler": self.scaler.to_dict(),
                "train_end": None if self.train_end is None else str(self.train_end), "sources": self.sources,
                "source_intervals": [str(i) for i in self.source_intervals]}

    @classmethod
    def from_dict(cls, d: dict) -> "RunMeta":
        """Read meta.json's content; a missing key raises naming it."""
        missing = [k for k in ("dataset", "n_nodes", "channels", "interval", "scaler") if k not in d]
        if missing:
            raise ValueError(f"meta.json lacks {missing}")
        meta = cls(dataset=d["dataset"], n_nodes=int(d["n_nodes"]), channels=list(d["channels"]),
                   units=list(d.get("units") or [""] * len(d["channels"])), interval=d["interval"],
                   scaler=Scaler.from_dict(d["scaler"]), exog_names=list(d.get("exog_names") or []),
                   train_end=d.get("train_end"), city=d.get("city") or "", domain=d.get("domain") or "",
                   sources=list(d.get("sources") or []), source_intervals=list(d.get("source_intervals") or []))
        for key in ("n_channels", "n_exog"):
            if key in d and d[key] != getattr(meta, key):
                raise ValueError(f"meta.json: {key}={d[key]} disagrees with its names ({getattr(meta, key)})")
        return meta


def load_city(data_cfg) -> CityData:
    """The dataset a DataConfig names, resampled (data.resample), with its notes (data.notes) and its channel and
    node selections applied."""
    from stllm.config import parse_resample
    from stllm.data import load
    from stllm.data.notes import with_notes
    city = load(data_cfg.name, **(data_cfg.options or {}))
    if getattr(data_cfg, "resample", ""):
        interval, how = parse_resample(data_cfg.resample)           # checked by DataConfig
        if interval != city.interval:
            try:
                city = city.resample(interval, how)
            except DataError as err:
                raise DataError(f"data.resample={data_cfg.resample!r}: {err}") from None
    if data_cfg.channels:
        city = city.select_channels(data_cfg.channels)
    city = with_notes(city, data_cfg.notes or None)          # notes name nodes: attach them before any selection
    if data_cfg.max_nodes and data_cfg.max_nodes < city.n_nodes:
        city = city.select_nodes(list(range(data_cfg.max_nodes)))
    return city


def load_for_run(meta: RunMeta, data_cfg, data: str | None = None, channels: list[str] | None = None,
                 resample: str | None = None, notes=None, options: dict | None = None) -> CityData:
    """The data a run is used on: its own dataset as its config loads it (`data` None or the run's dataset name),
    or another one (a registered name or a path) fitted to it (`fit_to_run`); `notes`: a notes CSV to attach;
    `options`: loader options (`--data-option`), over the config's data.options on the run's own dataset."""
    from dataclasses import replace

    from stllm.data import load
    from stllm.data.notes import with_notes
    options = dict(options or {})
    if data is None or data == meta.dataset:
        city = load_city(replace(data_cfg, options={**(data_cfg.options or {}), **options}) if options else data_cfg)
    else:
        city = load(data, **options)
    return with_notes(fit_to_run(city, meta, channels, resample), notes)


def fit_to_run(city: CityData, meta: RunMeta, channels: list[str] | None = None,
               resample: str | None = None) -> CityData:
    """Make another city's data fit a run: same interval (or resampled on request) and the run's channels.

    channels: ["TARGET=RUN", ...]: the data's channel TARGET feeds the run's channel RUN (names or positions);
    every run channel must be fed. Without a mapping, channel names must match the run's (in any order), except
    that a run trained on several cities (data.sources, univariate) takes any one-channel data whatever its
    channel's name. A run that mixed steps takes data at any of them.
    """
    if city.interval != meta.interval and city.interval not in meta.source_intervals:
        factor = meta.interval / city.interval
        if not resample or factor < 1 or factor != int(factor):
            raise DataError(interval_advice(city, meta))
        city = city.resample(meta.interval, resample)
    run_channels = list(meta.channels)
    if channels:
        feed: dict[int, str] = {}
        for item in channels:
            if "=" not in item:
                raise DataError(f"--channels {item!r}: expected TARGET=RUN, e.g. departures=0")
            target, run = item.split("=", 1)
            i = int(run) if run.isdigit() else (run_channels.index(run) if run in run_channels else -1)
            if not 0 <= i < len(run_channels):
                raise DataError(f"--channels {item!r}: the run has no channel {run!r}; its channels are {run_channels}")
            city.channel_index(target)  # raises naming the data's channels
            feed[i] = target
        missing = [run_channels[i] for i in range(len(run_channels)) if i not in feed]
        if missing:
            raise DataError(f"--channels leaves the run's channel(s) {missing} without data; map every run channel")
        return city.select_channels([feed[i] for i in range(len(run_channels))])
    if sorted(city.channels) == sorted(run_channels):
        return city.select_channels(run_channels)
    if meta.sources and len(run_channels) == 1 and city.n_channels == 1:
        # one series for one series (a run trained on several cities is univariate): the data keeps its own
        # channel name, which reaches the prompt through PreparedCity's context
        return city
    raise DataError(f"{city.name}: channels {city.channels} do not match the run's {run_channels}; map them, "
                    f"e.g. --channels {city.channels[0]}=0")


def interval_advice(city: CityData, meta: RunMeta) -> str:
    """What to do when `city`'s step is not the run's: aggregate finer data (--resample), else retrain or fine-tune
    the run at the data's step (data.resample), since coarser data cannot be made finer."""
    have, want = short_interval(city.interval), short_interval(meta.interval)
    head = f"{city.name}: one step is {have}, the run was trained on {want} steps"
    factor = meta.interval / city.interval
    if factor > 1 and factor == int(factor):
        return (f"{head}; pass --resample sum (counts) or --resample mean (levels) to aggregate {int(factor)} of the "
                f"data's steps into one of the run's")
    return (f"{head}; {want} steps cannot be built from {have} ones (--resample only aggregates finer data to a whole "
            f"multiple of its step). Retrain, or fine-tune (--set train.init_from=<run>), with "
            f"--set data.resample={have}:sum (counts) or data.resample={have}:mean (levels) on training data whose "
            f"step divides {have}, so the run forecasts {have} steps")


def short_interval(interval) -> str:
    """Timedelta('1h') -> '1h', 15 minutes -> '15min', a day -> '1D': how data.resample and --set spell it."""
    seconds = int(pd.Timedelta(interval).total_seconds())
    for unit, size in (("D", 86400), ("h", 3600), ("min", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def is_own_data(city: CityData, meta: RunMeta) -> bool:
    """Whether `city` is the run's own dataset (then the run's scaler applies), not another city (zero-shot)."""
    return city.name == meta.dataset and city.n_nodes == meta.n_nodes and list(city.channels) == list(meta.channels)


def prepare(city: CityData, meta: RunMeta, cfg) -> PreparedCity:
    """Prepare a city for a trained run (`cfg`: the run's Config): the run's own scaler on its own dataset, a fresh
    one elsewhere, and the run's exogenous features in the run's order.

    On another city (zero-shot), the scaler is fitted on that city's training part only, i.e. on inputs
    that precede every evaluated window; its future values are never seen.
    """
    if city.n_channels != meta.n_channels:
        raise DataError(f"{city.name}: has {city.n_channels} channel(s) {city.channels}, the run was trained on "
                        f"{meta.n_channels} {meta.channels}; select or map channels first")
    prep = PreparedCity(city, cfg.data, cfg.encoder, scaler=meta.scaler if is_own_data(city, meta) else None)
    return fit_exog(prep, meta.exog_names)


def fit_exog(prep: PreparedCity, names: list[str]) -> PreparedCity:
    """`prep` with its exogenous features as the model reads them: `names`, in that order (`align_exog`)."""
    if prep.exog_names != list(names):
        prep.exog = align_exog(prep.exog, prep.exog_names, list(names))
        prep.exog_names = list(names)
    return prep


def align_exog(exog: torch.Tensor, have: list[str], names: list[str]) -> torch.Tensor:
    """Exogenous features [T, N|1, E] named `have`, reordered to `names`; ones missing are zeros (their mean)."""
    index = {n: i for i, n in enumerate(have)}
    t, n = exog.shape[:2]
    cols = [exog[..., index[name]] if name in index else torch.zeros(t, n) for name in names]
    return torch.stack(cols, -1) if cols else torch.zeros(t, n, 0)


# ------------------------------------------------------------------------------ where in a city


def resolve_node(city: CityData, node) -> int:
    """Node position from an id, name or position; the error lists the city's ids."""
    try:
        return city.node_index(node)[0]
    except DataError:
        if isinstance(node, str) and node.isdigit() and int(node) < city.n_nodes:
            return int(node)                                      # a position typed on the command line
        ids = city.nodes["id"].astype(str).tolist()
        shown = ", ".join(ids[:60]) + (f", ... ({len(ids)} in all)" if len(ids) > 60 else "")
        raise DataError(f"{city.name}: unknown node {node!r}; the city's node ids are: {shown}") from None


def resolve_nodes(city: CityData, nodes) -> list[int]:
    """Positions for one node or a list of them (ids, names or positions), each resolved as `resolve_node`."""
    items = [nodes] if isinstance(nodes, (str, int, np.integer)) else list(nodes)
    if not items:
        raise DataError(f"{city.name}: no nodes given")
    return [resolve_node(city, item) for item in items]


def resolve_time(city: CityData, at, t_in: int) -> int:
    """Index of the first forecast step from a timestamp (or an int index); the error names the valid range."""
    first_ok = pd.Timestamp(city.timestamps[0]) + t_in * city.interval
    last_ok = pd.Timestamp(city.timestamps[-1]) + city.interval
    span = (f"the data covers {pd.Timestamp(city.timestamps[0])} .. {pd.Timestamp(city.timestamps[-1])} every "
            f"{city.interval}; --at is the first forecast step and needs {t_in} steps of history, so it must lie in "
            f"{first_ok} .. {last_ok}")
    if isinstance(at, (int, np.integer)) and not isinstance(at, bool):
        s = int(at)
        if not t_in <= s <= city.n_steps:
            raise DataError(f"{city.name}: step {s} is outside the data: {span}")
        return s
    try:
        ts = pd.Timestamp(at)
    except (ValueError, TypeError) as err:
        raise DataError(f"{city.name}: cannot read the time {at!r} ({err}); {span}") from None
    if ts < first_ok or ts > last_ok:
        raise DataError(f"{city.name}: time {ts} is outside the data: {span}")
    offset = (ts - pd.Timestamp(city.timestamps[0])) / city.interval
    if offset != int(offset):
        raise DataError(f"{city.name}: time {ts} is not on the data's {city.interval} grid; {span}")
    return int(offset)
