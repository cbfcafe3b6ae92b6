"""Predict and evaluate with a model: batching over windows, inverse scaling, metrics next to the baselines."""
from __future__ import annotations

import numpy as np
import torch

from stllm.data.city import CityData, DataError
from stllm.data.prepared import PreparedCity
from stllm.data.windows import Scaler
from stllm.events import EventAccumulator
from stllm.metrics import MetricAccumulator


def load_city(data_cfg) -> CityData:
    """The dataset a DataConfig names, with its notes (data.notes) and its channel and node selections applied."""
    from stllm.data import load
    from stllm.data.notes import with_notes
    city = load(data_cfg.name, **(data_cfg.options or {}))
    if data_cfg.channels:
        city = city.select_channels(data_cfg.channels)
    city = with_notes(city, data_cfg.notes or None)          # notes name nodes: attach them before any selection
    if data_cfg.max_nodes and data_cfg.max_nodes < city.n_nodes:
        city = city.select_nodes(list(range(data_cfg.max_nodes)))
    return city


def fit_to_run(city: CityData, meta: dict, channels: list[str] | None = None, resample: str | None = None) -> CityData:
    """Make another city's data fit a run: same interval (or resampled on request) and the run's channels.

    channels: ["TARGET=RUN", ...]: the data's channel TARGET feeds the run's channel RUN (names or positions);
    every run channel must be fed. Without a mapping, channel names must match the run's (in any order).
    """
    import pandas as pd
    run_interval = pd.Timedelta(meta["interval"])
    if city.interval != run_interval:
        if not resample:
            raise DataError(f"{city.name}: one step is {city.interval}, the run was trained on {run_interval}; "
                            f"pass --resample sum (counts) or mean (levels) to aggregate, or use matching data")
        city = city.resample(run_interval, resample)
    run_channels = list(meta["channels"])
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
    raise DataError(f"{city.name}: channels {city.channels} do not match the run's {run_channels}; map them, "
                    f"e.g. --channels {city.channels[0]}=0")


def run_meta(prep: PreparedCity, cfg) -> dict:
    """What a run must remember about its training data to be used without it."""
    city = prep.city
    return {"dataset": city.name, "city": city.city, "domain": city.domain, "n_nodes": city.n_nodes,
            "n_channels": city.n_channels, "channels": city.channels, "units": city.units,
            "n_exog": prep.n_exog, "exog_names": prep.exog_names,
            "interval": str(city.interval), "scaler": prep.scaler.to_dict(),
            "train_end": str(city.timestamps[prep.train_end - 1]) if prep.train_end else None}


def prepare(model, meta: dict, city: CityData) -> PreparedCity:
    """Prepare a city for a trained run: the run's own scaler on its own dataset, a fresh one elsewhere.

    On another city (zero-shot), the scaler is fitted on that city's training part only, i.e. on inputs
    that precede every evaluated window; its future values are never seen.
    """
    cfg = model.cfg
    if city.n_channels != meta["n_channels"]:
        raise DataError(f"{city.name}: has {city.n_channels} channel(s) {city.channels}, the run was trained on "
                        f"{meta['n_channels']} {meta['channels']}; select or map channels first")
    same = city.name == meta["dataset"] and city.n_nodes == meta["n_nodes"]
    scaler = Scaler.from_dict(meta["scaler"]) if same else None
    prep = PreparedCity(city, cfg.data, cfg.encoder, scaler=scaler)
    if prep.exog_names != meta["exog_names"]:
        prep.exog = _align_exog(prep, meta["exog_names"])
        prep.exog_names = list(meta["exog_names"])
    return prep


def _align_exog(prep: PreparedCity, names: list[str]) -> torch.Tensor:
    """Reorder exogenous features to the run's names; ones this city lacks are zeros (their mean)."""
    have = {n: i for i, n in enumerate(prep.exog_names)}
    t, n = prep.exog.shape[:2]
    cols = [prep.exog[..., have[name]] if name in have else torch.zeros(t, n) for name in names]
    return torch.stack(cols, -1) if cols else torch.zeros(t, n, 0)


@torch.inference_mode()
def forecast(model, prep: PreparedCity, starts: np.ndarray, batch_size: int = 16):
    """Yield (starts, prediction [b, t_out, N, C] original scale, truth [b, t_out, N, C]) batch by batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prep.batch(chunk).items()}
        out = model(batch).float().cpu()
        pred = torch.sigmoid(out) if _is_events(model) else prep.scaler.inverse(out)  # probabilities or values
        yield chunk, pred.numpy(), batch["y_raw"].cpu().numpy()
    model.train(was_training)


def _is_events(model) -> bool:
    return model.cfg.model.task == "events"


def selection_error(metrics: dict) -> float:
    """The number early stopping minimises: masked MAE, or 1 - macro-F1 for event classification."""
    return 1.0 - metrics["macro_f1"] if "macro_f1" in metrics else metrics["mae"]


def evaluate(model, prep: PreparedCity, starts: np.ndarray, batch_size: int = 16) -> dict:
    """Masked and unmasked metrics on the original scale over the given windows (event metrics for events)."""
    acc = EventAccumulator(prep.city.channels) if _is_events(model) else MetricAccumulator()
    for _, pred, true in forecast(model, prep, starts, batch_size):
        acc.update(pred, true)
    return acc.compute()


def evaluate_with_baselines(model, prep: PreparedCity, split: str = "test", batch_size: int = 16) -> dict:
    """The metrics JSON of `stllm evaluate`: the model and the four baselines on one split."""
    from stllm.baselines import run_baselines
    from stllm.events import run_event_baselines
    if split not in prep.splits:
        raise ValueError(f"--split must be one of {list(prep.splits)}, got {split!r}")
    starts = prep.splits[split]
    if len(starts) == 0:
        raise DataError(f"{prep.city.name}: the {split} split has no windows")
    result = evaluate(model, prep, starts, batch_size)
    return {"dataset": prep.city.name, "split": split, "n_windows": int(len(starts)), "n_nodes": prep.city.n_nodes,
            **result, "baselines": (run_event_baselines if _is_events(model) else run_baselines)(
                prep.city, starts, prep.t_out, prep.train_end)}


def predict(model, city: CityData, meta: dict, split: str = "test", last: bool = False, batch_size: int = 16) -> dict:
    """Forecasts on the original scale for every window of a split, or (last=True) the one after the data ends.

    Returns {"starts": [b], "timestamps": [b, t_out] datetime64, "prediction": [b, t_out, N, C],
             "truth": [b, t_out, N, C] (NaN where unknown), "node_ids", "channels"}.
    """
    prep = prepare(model, meta, city)
    starts = np.array([city.n_steps]) if last else prep.splits[split]
    preds, truths = [], []
    for _, pred, true in forecast(model, prep, starts, batch_size):
        preds.append(pred)
        truths.append(true)
    times = prep.timestamps[starts[:, None] + np.arange(prep.t_out)]
    return {"starts": starts, "timestamps": times, "prediction": np.concatenate(preds),
            "truth": np.concatenate(truths), "node_ids": city.nodes["id"].tolist(), "channels": city.channels}
