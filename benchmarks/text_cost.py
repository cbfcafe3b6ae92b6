"""What text costs: time per training step and per predicted window with text on vs off, side by side.

    STLLM_DATA_ROOT=../shared/data python benchmarks/text_cost.py --data nyc-bike-60min \
        --notes ../shared/data/NYC_Events/events_nyc_2019_2020.csv --out text_cost.json

"on" = the config's model with the city's notes read by the language model (model.notes=text) and every node's
name and description added to its ST-tokens (model.node_text=true); "off" = the same model without text. Both are
built from the same seed and timed in alternation (on, off, on, off, ...) on the same windows (chosen where notes
are active), so the machine's load falls on both alike; the figures are medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def build(config: str, overrides: list[str], city):
    from stllm.config import load_config
    from stllm.data.prepared import PreparedCity
    from stllm.train import build_model, make_optimizer
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep)
    return model, prep, make_optimizer(model, cfg)


def step_time(model, prep, optimizer, starts: np.ndarray) -> float:
    """Seconds for one optimizer step on these windows (batch cut included, as in training)."""
    model.train()
    t0 = time.perf_counter()
    batch = prep.batch(starts)
    loss = (model(batch) - batch["y"]).abs().mul(batch["y_mask"]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def window_time(model, prep, starts: np.ndarray) -> float:
    """Seconds per predicted window (a batch of windows, divided by its size)."""
    model.eval()
    t0 = time.perf_counter()
    model(prep.batch(starts))
    return (time.perf_counter() - t0) / len(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nyc-bike-60min", help="config name in configs/ (its dataset)")
    parser.add_argument("--notes", required=True, help="notes CSV for the dataset")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (medians reported)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    from stllm.config import load_config
    from stllm.data.notes import with_notes
    from stllm.data.fit import load_city
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / f"{args.data}.yaml")
    city = with_notes(load_city(cfg.data), args.notes)
    variants = {"on": (["model.notes=text", "model.node_text=true"], city),
                "off": (["model.notes=none", "model.node_text=false"], replace(city, notes=None))}
    built = {}
    for name, (overrides, c) in variants.items():
        torch.manual_seed(0)
        built[name] = build(args.data, overrides, c)
    prep = built["on"][1]
    # windows whose horizon meets a note, so "on" pays for reading notes in every timed batch
    busy = [s for s in prep.splits["train"] if prep.note_cover[s - prep.t_in:s + prep.t_out].any()]
    rng = np.random.default_rng(0)
    steps: dict[str, list[float]] = {"on": [], "off": []}
    windows: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.repeats + 1):                           # round 0 warms up (and fills the text caches)
        starts = rng.choice(busy, size=args.batch_size, replace=False)
        for name in ("on", "off") if r % 2 else ("off", "on"):
            model, p, opt = built[name]
            s, w = step_time(model, p, opt, starts), window_time(model, p, starts)
            if r:
                steps[name].append(s)
                windows[name].append(w)
    result = {name: {"step_s": statistics.median(steps[name]), "window_s": statistics.median(windows[name])}
              for name in ("on", "off")}
    result["ratio"] = {"step": result["on"]["step_s"] / result["off"]["step_s"],
                       "window": result["on"]["window_s"] / result["off"]["window_s"]}
    result["n_notes"] = len(city.notes)
    result["command"] = "python benchmarks/text_cost.py " + shlex.join(sys.argv[1:])
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
