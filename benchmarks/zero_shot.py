"""Zero-shot transfer benchmark: a run trained on one city, evaluated on another it never saw.

    python benchmarks/zero_shot.py --source runs/bench/nyc-bike-60min --target bayarea-bike-sf
    python benchmarks/zero_shot.py --source runs/bench/nyc-taxi-60min --target nyc-bike --channels arrivals=0 departures=1

--source is a folder holding `stllm/` and `encoder_only/` runs (what benchmarks/fine_tune.py writes).
Rows (choose with --rows): zero_shot, zero_shot_tta, encoder_zero_shot, full_shot, few_shot_1d, few_shot_7d,
few_shot_30d, plus the baselines last value and same time yesterday, all on the target's test split.
Note: "same time yesterday" reads the target 24 steps back, more history than the model's 12-step window.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_ROWS = ["zero_shot", "zero_shot_tta", "encoder_zero_shot", "full_shot", "few_shot_1d", "few_shot_7d", "few_shot_30d"]


def evaluate(run: Path, target: str, channels: list[str], extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "stllm.cli", "evaluate", "--run", str(run), "--data", target, "--out", str(out), *extra]
    if channels:
        cmd += ["--channels", *channels]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    m = json.loads(out.read_text())
    m["eval_wall_s"] = round(time.time() - t0, 1)
    return m


def train(config: Path, out: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "stllm.cli", "train", "--config", str(config), "--out", str(out), "--quiet",
           "--set", *overrides]
    if (out / "checkpoints" / "last.safetensors").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder with stllm/ and encoder_only/ runs")
    parser.add_argument("--target", required=True, help="target dataset name or path")
    parser.add_argument("--channels", nargs="*", default=[], help="TARGET=RUN channel mapping")
    parser.add_argument("--rows", nargs="*", default=ALL_ROWS, choices=ALL_ROWS)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of full- and few-shot runs")
    parser.add_argument("--adapt-steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "runs" / "zero_shot"))
    args = parser.parse_args()

    source, out = Path(args.source), Path(args.out) / f"{Path(args.source).name}-to-{args.target}"
    out.mkdir(parents=True, exist_ok=True)
    stllm_run = source / "stllm"
    cfg_file = stllm_run / "config.yaml"
    rows: dict[str, dict] = {}
    target_data = [f"data.name={args.target}", "data.options={}", "data.channels=[]"]
    for row in args.rows:
        if row == "zero_shot":
            rows[row] = evaluate(stllm_run, args.target, args.channels, [], out / f"{row}.json")
        elif row == "zero_shot_tta":
            rows[row] = evaluate(stllm_run, args.target, args.channels, ["--adapt-steps", str(args.adapt_steps)],
                                 out / f"{row}.json")
        elif row == "encoder_zero_shot":
            rows[row] = evaluate(source / "encoder_only", args.target, args.channels, [], out / f"{row}.json")
        else:
            days = {"full_shot": 0, "few_shot_1d": 1, "few_shot_7d": 7, "few_shot_30d": 30}[row]
            overrides = target_data + [f"train.max_minutes={args.minutes}", f"data.train_days={days}"]
            if days:
                overrides.append(f"train.init_from={stllm_run}")
            if args.channels:
                print(f"note: {row} trains on the target's own channels; --channels applies to zero-shot rows only")
            train(cfg_file, out / row, overrides)
            rows[row] = json.loads((out / row / "metrics.json").read_text())
    base = next(iter(rows.values()))["baselines"]
    rows["last value"] = base["last"]
    rows["same time yesterday (uses 24 steps of history)"] = base["same_time_yesterday"]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.source} -> {args.target} (test split)\n")
    print("| row | MAE | RMSE | MAPE % |\n|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['mae']:.3f} | {m['rmse']:.3f} | {m['mape']:.1f} |")


if __name__ == "__main__":
    main()
