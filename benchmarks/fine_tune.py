"""Fine-tune benchmark: stllm (SmolLM2, truncated, LoRA) vs the encoder-only ablation vs four baselines.

    python benchmarks/fine_tune.py --datasets nyc-bike-60min beijing-pm25 nyc-taxi-60min

Each model trains in its own process (`stllm train`), so peak memory is per model. Both models of a dataset get
the same budget in optimizer steps: the config's `train.max_steps` (or `--steps`); `train.max_minutes` is a safety net. Writes the JSON and a markdown table
under benchmarks/results/ and prints the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"stllm (SmolLM2 + LoRA)": ("stllm", []), "encoder only (ablation)": ("encoder_only", ["model.use_llm=false"])}


def run(config: str, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "stllm.cli", "train", "--config", str(ROOT / "configs" / f"{config}.yaml"),
           "--out", str(out), "--quiet", "--set", *overrides]
    if (out / "checkpoints" / "last.safetensors").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["process_wall_s"] = round(time.time() - t0, 1)
    return metrics


def table(results: dict) -> str:
    """Forecasting rows show MAE / RMSE / MAPE; event-classification rows (nyc-crime) Macro-F1 / Recall."""
    lines = ["| dataset | model | MAE or Macro-F1 | RMSE or Recall | MAPE % | train min | windows/s | peak RSS MB "
             "| validation: encoder stage -> final | test without the LM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, rows in results.items():
        for name, m in rows.items():
            t = m.get("training")
            extra = (f"{t['wall_s'] / 60:.1f} | {t['windows_per_s']:.1f} | {t['peak_rss_mb']:.0f}" if t else "- | - | -")
            stage = (t or {}).get("encoder_stage") or {}
            test = stage.get("test") or {}
            extra += (f" | {stage['best_val_error']:.3f} -> {t['best_val_error']:.3f}" if stage
                      else f" | {t['best_val_error']:.3f}" if t else " | -")
            extra += f" | {test.get('mae', test.get('macro_f1')):.3f}" if test else " | -"
            scores = (f"{m['macro_f1']:.3f} | {m['recall']:.3f} | -" if "macro_f1" in m
                      else "n/a | n/a | n/a" if m.get("mae") is None     # a baseline the history cannot support
                      else f"{m['mae']:.2f} | {m['rmse']:.2f} | {m['mape']:.1f}")
            lines.append(f"| {dataset} | {name} | {scores} | {extra} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["nyc-bike-60min", "beijing-pm25", "nyc-taxi-60min"],
                        help="config names in configs/")
    parser.add_argument("--steps", type=int, help="override train.max_steps for both models (the budget in "
                        "optimizer steps; the configs set one)")
    parser.add_argument("--minutes", type=float, help="override train.max_minutes for both models (a safety net; the "
                        "budget of the figures before 2026-12-05)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="where the runs go")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for both models")
    parser.add_argument("--models", nargs="+", default=["encoder_only", "stllm"], choices=["encoder_only", "stllm"],
                        help="which models to train (a model already in the results keeps its row)")
    args = parser.parse_args()

    results_path = ROOT / "benchmarks" / "results" / "fine_tune.json"
    for dataset in args.datasets:
        for name, (key, extra) in MODELS.items():
            if key not in args.models:
                continue
            overrides = list(args.set) + extra + ([f"train.max_minutes={args.minutes}"] if args.minutes else []) \
                + ([f"train.max_steps={args.steps}"] if args.steps else [])
            metrics = run(dataset, Path(args.runs) / dataset / key, overrides)
            # Read the file again just before writing: another benchmark process may have added its rows.
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            rows = results.setdefault(dataset, {})
            rows[name] = metrics
            rows.update(metrics["baselines"])
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
            results_path.with_suffix(".md").write_text(table(results) + "\n")
            print(table({dataset: rows}), flush=True)


if __name__ == "__main__":
    main()
