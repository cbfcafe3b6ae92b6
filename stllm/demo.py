"""`stllm demo`: the main job on the embedded default, a synthetic city with events in notes, with the offline SmolLM2.

The city (stllm.data.probe) is synthetic: sensors with daily and weekly rhythms, weather, incidents spreading
between neighbours, and events (a street festival, a market, a storm, a closure) that exist only as notes. An event
that starts inside a forecast's horizon cannot be seen in the numbers; the language model reads its note and moves
the forecast of the sensors and hours it names, by what the words imply. That is why stllm beats its encoder-only
ablation here, and why this demo says nothing about real cities (docs/benchmarks.md does).

The budget is fixed in optimizer steps and everything is seeded, so the table is the same on any machine of this
kind whatever else it is running; a wall-clock cap stays only as a safety net, and the output says when it fired.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from stllm.config import load_config
from stllm.data.probe import event_mask, make_probe_city
from stllm.metrics import format_table, masked_error_sum
from stllm.model import STLLM
from stllm.plots import plot_forecasts

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MODELS = {"stllm (SmolLM2 + LoRA)": [], "encoder only": ["model.use_llm=false", "model.notes=none"]}


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, progress: bool = True,
             overrides: list[str] | None = None) -> dict:
    """Build the city, train stllm and the encoder-only ablation with the same budget in optimizer steps (the
    config's train.max_steps unless `steps` is given), evaluate both next to the baselines, print the table and
    plot forecasts for four sensors. Returns the table's rows."""
    out = Path(out)
    city = make_probe_city(n_nodes=24, n_days=56, seed=0)
    print(f"city: {city}, {len(city.notes)} notes")
    budget = list(overrides or []) + ([f"train.max_steps={steps}"] if steps else [])
    rows, runs = {}, {}
    for label, extra in MODELS.items():
        run_dir = out / ("stllm" if not extra else "encoder_only")
        cfg = load_config(DEMO_CONFIG, budget + extra)
        print(f"\n== training {label} for at most {cfg.train.max_steps} steps -> {run_dir}")
        t0 = time.time()
        from stllm.train import train
        metrics = train(cfg, run_dir, city=city, progress=progress, resume=(run_dir / "checkpoints").exists())
        t = metrics["training"]
        print(f"   {t['steps']} steps in {time.time() - t0:.0f} s (stopped by {t.get('stopped_by', '?')})")
        if t.get("stopped_by") == "max_minutes":
            print(f"   note: the safety cap train.max_minutes={cfg.train.max_minutes} fired before the step budget; "
                  "this table is not the reproducible one")
        rows[label], runs[label] = metrics, run_dir
    rows.update(metrics["baselines"])
    print("\nTest split of the synthetic city (masked, original scale):")
    print(format_table(rows))
    results = {label: STLLM.from_pretrained(run_dir).predict(city, split="test") for label, run_dir in runs.items()}
    events = {label: _event_error(result, city) for label, result in results.items()}
    print("\nOn the test forecasts inside an event (sensor and hour named by a note): "
          + ", ".join(f"{k} MAE {v:.2f}" for k, v in events.items()))
    # odd sensors: where the test events (and their paraphrased notes) fall
    plot = plot_forecasts(results["stllm (SmolLM2 + LoRA)"], out / "forecast.png", nodes=[1, 3, 5, 7],
                          title="Synthetic city: stllm forecasts on the test split")
    print(f"\nplot: {plot}")
    summary = {k: {m: v[m] for m in ("mae", "rmse", "mape")} for k, v in rows.items()}
    summary["event_hours_mae"] = events
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return rows


def _event_error(result: dict, city) -> float:
    """Masked MAE of one model's test forecasts (a predict result) on the entries that lie inside an event."""
    inside = event_mask(city, result["starts"], result["prediction"].shape[1])[..., None]   # [b, t_out, N, 1]
    total, n = masked_error_sum(result["prediction"], result["truth"], inside)
    return total / n
