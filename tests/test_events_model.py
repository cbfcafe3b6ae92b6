"""Event classification through the whole model: train, evaluate against the event baselines, transfer."""
import numpy as np
import pandas as pd
import pytest

from stllm.data.city import CityData
from stllm.model import STLLM
from stllm.train import train


def event_city(n_rows: int, n_cols: int, days: int, seed: int, name: str) -> CityData:
    """Daily event counts on a grid: hot cells, a weekly rhythm, and bursts that linger a few days."""
    rng = np.random.default_rng(seed)
    n = n_rows * n_cols
    base = rng.gamma(0.6, 0.8, size=(n, 2))                              # some cells almost never see events
    weekly = 1 + 0.5 * np.sin(2 * np.pi * np.arange(days) / 7)[:, None, None]
    burst = np.zeros((days, n, 2))
    for _ in range(days // 3):
        d, c = rng.integers(0, days - 3), rng.integers(0, n)
        burst[d:d + 3, c] += 2.0
    counts = rng.poisson(base[None] * weekly + burst).astype(np.float32)
    r, c = np.divmod(np.arange(n), n_cols)
    nodes = pd.DataFrame({"id": [f"r{i}c{j}" for i, j in zip(r, c)], "lat": 40 + 0.01 * r, "lon": -74 + 0.01 * c})
    return CityData(name, counts, pd.date_range("2020-01-01", periods=days, freq="D"), "1D",
                    ["burglary", "robbery"], ["events", "events"], nodes, city=name, domain="crime",
                    split_at=(int(days * 0.7), int(days * 0.8)))


@pytest.fixture(scope="module")
def events_run(tmp_path_factory):
    from pathlib import Path

    from stllm.config import load_config
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "tiny.yaml", ["model.task=events", "data.t_in=14", "data.t_out=1",
                      "data.periods=[week]", "encoder.patch_len=7", "train.max_steps=40", "train.eval_every=20",
                      "train.lr=0.01"])
    out = tmp_path_factory.mktemp("events") / "run"
    metrics = train(cfg, out, city=event_city(4, 4, 200, 0, "grid-a"), progress=False)
    return out, metrics


def test_events_train_and_report_f1_next_to_baselines(events_run):
    out, metrics = events_run
    assert {"recall", "macro_f1", "per_category"} <= set(metrics)
    assert set(metrics["baselines"]) >= {"previous_day", "historical_rate"}
    # the dataset's given split was used: test windows run from its test_start (day 160) to the end
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["n_windows"] == 200 - 160


def test_events_transfer_to_a_city_with_other_categories_and_size(events_run):
    out, _ = events_run
    model = STLLM.from_pretrained(out)
    other = event_city(3, 5, 150, 7, "grid-b")
    other.channels = ["theft", "battery"]
    from stllm.data.fit import fit_to_run
    other = fit_to_run(other, model.meta, ["theft=0", "battery=1"])
    m = model.evaluate(other, "test")
    assert m["zero_shot"] and m["source_dataset"] == model.meta.dataset
    assert m["n_nodes"] == 15 and 0 <= m["macro_f1"] <= 1
    assert list(m["per_category"]) == ["theft", "battery"]                  # labelled with the target's categories
    assert all(c["scored"] == 15 * m["n_windows"] for c in m["per_category"].values())  # every cell is scored
