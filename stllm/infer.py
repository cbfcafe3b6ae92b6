"""Predict and evaluate with a model on a prepared city: batching over windows, inverse scaling, metrics next to
the baselines. Preparing data for a run (its scaler, channels, exogenous features) is `stllm.data.fit`'s."""
from __future__ import annotations

import numpy as np
import torch

from stllm.data.city import DataError
from stllm.data.prepared import PreparedCity, batch_to
from stllm.events import EventAccumulator
from stllm.metrics import MetricAccumulator, masked_error_sum


@torch.inference_mode()
def forecast(model, prep: PreparedCity, starts: np.ndarray, batch_size: int = 16):
    """Yield (starts, prediction [b, t_out, N, C] original scale, truth [b, t_out, N, C]) batch by batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        batch = batch_to(prep.batch(chunk), device)
        out = model(batch).float().cpu()
        pred = torch.sigmoid(out) if _is_events(model) else prep.scaler.inverse(out)  # probabilities or values
        if not _is_events(model) and model.cfg.model.nonnegative:
            pred = pred.clamp(min=0.0)
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
    """The metrics JSON of `stllm evaluate`: the model and the baselines (stllm.baselines.BASELINES) on one split."""
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


def masked_mae_where(model, prep: PreparedCity, starts: np.ndarray, selections: dict[str, np.ndarray],
                     batch_size: int = 32) -> dict[str, tuple[float, int]]:
    """Masked MAE on the original scale over chosen forecast entries: selections maps a name to a bool mask
    [b, t_out, N] over the windows `starts` (e.g. the entries inside an event). Returns name -> (mae, entries)."""
    sums = {name: [0.0, 0] for name in selections}
    offset = 0
    for chunk, pred, true in forecast(model, prep, starts, batch_size):
        for name, mask in selections.items():
            total, n = masked_error_sum(pred, true, mask[offset:offset + len(chunk), ..., None])
            sums[name][0] += total
            sums[name][1] += n
        offset += len(chunk)
    return {name: (total / n if n else float("nan"), n) for name, (total, n) in sums.items()}


def predict(model, prep: PreparedCity, starts: np.ndarray, nodes: list[int] | None = None,
            batch_size: int = 16) -> dict:
    """Forecasts on the original scale for the windows whose first forecast step is in `starts` ([b]), kept for
    the node positions `nodes` (all when None; the model still reads the whole city).

    Returns {"starts": [b], "timestamps": [b, t_out] datetime64, "prediction": [b, t_out, N', C],
             "truth": [b, t_out, N', C] (NaN where unknown), "node_ids" [N'], "channels" [C]}.
    """
    starts = np.asarray(starts)
    keep = slice(None) if nodes is None else list(nodes)
    preds, truths = [], []
    for _, pred, true in forecast(model, prep, starts, batch_size):
        preds.append(pred[:, :, keep])
        truths.append(true[:, :, keep])
    times = prep.timestamps[starts[:, None] + np.arange(prep.t_out)]
    ids = prep.city.nodes["id"].tolist()
    return {"starts": starts, "timestamps": times, "prediction": np.concatenate(preds),
            "truth": np.concatenate(truths), "node_ids": ids if nodes is None else [ids[i] for i in nodes],
            "channels": list(prep.city.channels)}
