"""`stllm demo`: the main job on the embedded default, a synthetic city, with the offline SmolLM2."""
from __future__ import annotations

import json
import time
from pathlib import Path

from stllm.config import load_config
from stllm.data.synthetic import make_city
from stllm.metrics import format_table

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(out: str | Path = "runs/demo", minutes: float = 3.0, progress: bool = True) -> dict:
    """Build a synthetic city, train stllm (SmolLM2, truncated, LoRA) and the encoder-only ablation with the same
    time budget, evaluate both next to the baselines, print the table and plot forecasts for four sensors."""
    out = Path(out)
    city = make_city()
    print(f"city: {city}")
    overrides = [f"train.max_minutes={minutes}"]
    rows, results = {}, {}
    for label, extra in (("stllm (SmolLM2 + LoRA)", []), ("encoder only", ["model.use_llm=false"])):
        run_dir = out / ("stllm" if not extra else "encoder_only")
        cfg = load_config(DEMO_CONFIG if DEMO_CONFIG.is_file() else None, overrides + extra)
        print(f"\n== training {label} for at most {minutes} min -> {run_dir}")
        t0 = time.time()
        from stllm.train import train
        metrics = train(cfg, run_dir, city=city, progress=progress, resume=(run_dir / "checkpoints").exists())
        print(f"   {metrics['training']['steps']} steps in {time.time() - t0:.0f} s")
        rows[label] = metrics
        results[label] = run_dir
    rows.update(metrics["baselines"])
    print("\nTest split of the synthetic city (masked, original scale):")
    print(format_table(rows))
    plot = _plot(results["stllm (SmolLM2 + LoRA)"], city, out / "forecast.png")
    print(f"\nplot: {plot}")
    (out / "summary.json").write_text(json.dumps({k: {m: v[m] for m in ("mae", "rmse", "mape")} for k, v in rows.items()}, indent=1))
    return rows


def _plot(run_dir: Path, city, path: Path) -> Path:
    from stllm.model import STLLM
    from stllm.plots import plot_forecasts
    model, meta = STLLM.from_pretrained(run_dir)
    result = model.predict(city, meta=meta, split="test")
    return plot_forecasts(result, path, nodes=[0, 1, 2, 3], title="Synthetic city: stllm forecasts on the test split")
