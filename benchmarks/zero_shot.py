"""Zero-shot transfer benchmark: a run trained on one city, evaluated on another it never saw.

    python benchmarks/zero_shot.py --source runs/bench/nyc-bike-60min --target bayarea-bike-sf
    python benchmarks/zero_shot.py --source runs/bench/nyc-taxi-60min --target nyc-bike --channels arrivals=0 departures=1 \
        --full-shot-run runs/bench/nyc-bike-60min/stllm
    python benchmarks/zero_shot.py --source runs/bench/nyc-crime --target chicago-crime --rows zero_shot full_shot \
        --channels "criminal damage=0" theft=1 battery=2 assault=3

Leave one city out (benchmarks/leave_one_out.py): pretrain configs/general.yaml on every series but NAME's, then
zero-shot on NAME, beside NAME's baselines, a run trained on NAME (full-shot) and one on another city (single-source):

    python benchmarks/zero_shot.py --leave-out melbourne-pedestrian --steps 1500 --stage2-steps 300 --out m.json
    python benchmarks/zero_shot.py --all --steps 1500 --stage2-steps 300 --out all.json

--source is a folder holding `stllm/` and `encoder_only/` runs (what benchmarks/fine_tune.py writes).
Rows (choose with --rows): zero_shot, zero_shot_tta, encoder_zero_shot, full_shot, few_shot_1d, few_shot_7d,
few_shot_30d, plus the baselines last value and same time yesterday, all on the target's test split.
Note: "same time yesterday" reads the target 24 steps back, more history than the model's 12-step window.
"""
from __future__ import annotations

import argparse
import importlib.util
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


def ordered_target_channels(channels: list[str]) -> list[str]:
    """["arrivals=0", "departures=1"] -> the target's channel names in the run's channel order."""
    pairs = sorted((int(item.split("=", 1)[1]), item.split("=", 1)[0]) for item in channels)
    return [name for _, name in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="folder with stllm/ and encoder_only/ runs")
    parser.add_argument("--target", help="target dataset name or path")
    parser.add_argument("--leave-out", help="held-out city: pretrain configs/general.yaml on every other series and "
                        "evaluate zero-shot on it (benchmarks/leave_one_out.py); --out is then a JSON file")
    parser.add_argument("--all", action="store_true", help="--leave-out for every city, one table")
    parser.add_argument("--stage2-steps", type=int, default=300, help="--leave-out: language-model-stage steps")
    parser.add_argument("--threads", type=int, default=1, help="--leave-out: torch threads per training run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "leave_out"), help="--leave-out: where runs go")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="--leave-out: overrides of the pretraining recipe only (its own run folder; the full-shot "
                             "and single-source runs stay shared), e.g. encoder.series_features=true")
    parser.add_argument("--channels", nargs="*", default=[], help="TARGET=RUN channel mapping (RUN as a position)")
    parser.add_argument("--rows", nargs="*", default=ALL_ROWS, choices=ALL_ROWS)
    parser.add_argument("--steps", type=int, help="training budget of full- and few-shot runs in optimizer steps "
                        "(full-shot: half of them encoder-only first); reproducible on any machine")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock cap of full- and few-shot runs: the "
                        "budget when --steps is not given (the figures before 2026-12-05), else only a safety net")
    parser.add_argument("--adapt-steps", type=int, default=20)
    parser.add_argument("--full-shot-run", help="an existing run trained on the target (e.g. the fine-tune "
                        "benchmark's) to evaluate as the full-shot row instead of training one")
    parser.add_argument("--out", default=str(ROOT / "runs" / "zero_shot"))
    args = parser.parse_args()
    if args.leave_out or args.all:
        return leave_one_out_main(args)
    if args.set:
        parser.error("--set changes the pretraining recipe of --leave-out / --all only")
    if not (args.source and args.target):
        parser.error("--source and --target are needed (or --leave-out NAME / --all)")

    source = Path(args.source)
    name = f"{source.name}-to-{Path(args.target).name}"
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    stllm_run = source / "stllm"
    cfg_file = stllm_run / "config.yaml"
    rows: dict[str, dict] = {}
    # Trained rows read the target's channels in the order the source run uses them (few-shot starts from it).
    target_channels = ordered_target_channels(args.channels) if args.channels else []
    target_data = [f"data.name={args.target}", "data.options={}", f"data.channels=[{','.join(target_channels)}]"]
    for row in args.rows:
        if row == "zero_shot":
            rows[row] = evaluate(stllm_run, args.target, args.channels, [], out / f"{row}.json")
        elif row == "zero_shot_tta":
            rows[row] = evaluate(stllm_run, args.target, args.channels, ["--adapt-steps", str(args.adapt_steps)],
                                 out / f"{row}.json")
        elif row == "encoder_zero_shot":
            rows[row] = evaluate(source / "encoder_only", args.target, args.channels, [], out / f"{row}.json")
        elif row == "full_shot" and args.full_shot_run:
            rows[row] = evaluate(Path(args.full_shot_run), args.target, [], [], out / f"{row}.json")
        else:
            days = {"full_shot": 0, "few_shot_1d": 1, "few_shot_7d": 7, "few_shot_30d": 30}[row]
            overrides = target_data + [f"train.max_minutes={args.minutes}", f"data.train_days={days}"] + \
                ([f"train.max_steps={args.steps}"] if args.steps else [])
            if days:   # few-shot continues the source run: both stages are behind it
                overrides += [f"train.init_from={stllm_run}", "train.encoder_first_minutes=0",
                              "train.encoder_first_steps=0"]
            else:      # full-shot trains from scratch with the source recipe's two stages, half the budget each
                overrides += [f"train.encoder_first_steps={args.steps // 2}", "train.encoder_first_minutes=0"] \
                    if args.steps else [f"train.encoder_first_minutes={args.minutes / 2}"]
            train(cfg_file, out / row, overrides)
            rows[row] = json.loads((out / row / "metrics.json").read_text())
    results = ROOT / "benchmarks" / "results"
    previous = results / f"zero_shot_{name}.json"
    if previous.exists():   # rows measured by an earlier call (e.g. --rows few_shot_7d) are kept unless re-run
        rows = {**{k: v for k, v in json.loads(previous.read_text()).items() if k in ALL_ROWS}, **rows}
        rows = {k: rows[k] for k in ALL_ROWS if k in rows}
    base = next(iter(rows.values()))["baselines"]
    events = "macro_f1" in base.get("previous_day", {})
    if events:
        rows["previous day"] = base["previous_day"]
        rows["historical rate"] = base["historical_rate"]
        if "historical_rate_f1" in base:
            rows["historical rate, F1-tuned threshold"] = base["historical_rate_f1"]
        header, cols = "| row | Macro-F1 | Recall |\n|---|---|---|", ("macro_f1", "recall")
    else:
        rows["last value"] = base["last"]
        rows["same time yesterday (uses 24 steps of history)"] = base["same_time_yesterday"]
        header, cols = "| row | MAE | RMSE | MAPE % |\n|---|---|---|---|", ("mae", "rmse", "mape")
    lines = [f"{args.source} -> {args.target} (test split)", "", header]
    for row_name, m in rows.items():
        # a baseline the target's history cannot support is missing (None, with its reason), never a number
        lines.append(f"| {row_name} | " + " | ".join("n/a" if m.get(c) is None else f"{m[c]:.3f}" for c in cols)
                     + " |" + (f" ({m['missing']})" if m.get("missing") else ""))
    table = "\n".join(lines)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"zero_shot_{name}.json").write_text(json.dumps(rows, indent=1))
    (results / f"zero_shot_{name}.md").write_text(table + "\n")
    print("\n" + table)


def leave_one_out_main(args) -> None:
    """--leave-out NAME (one row, written to --out as JSON) or --all (every city; the JSON list and a table)."""
    # loaded from its file, not by putting benchmarks/ on sys.path (no benchmark may shadow a package name; a
    # benchmarks/holidays.py once hid the `holidays` package that Melbourne's calendar, AU-VIC, needs)
    spec = importlib.util.spec_from_file_location("leave_one_out", ROOT / "benchmarks" / "leave_one_out.py")
    loo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loo)
    steps = args.steps or 1500
    names = sorted(loo.HELD_OUT) if args.all else [args.leave_out]
    rows = []
    for name in names:
        row = loo.leave_out(name, Path(args.runs), steps, args.stage2_steps, args.threads, args.set)
        row["command"] = " ".join(["python", "benchmarks/zero_shot.py", *sys.argv[1:]])
        rows.append(row)
        print(loo.table([row]), flush=True)
    out = Path(args.out if args.out.endswith(".json") else Path(args.out) / "leave_out.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows[0] if len(rows) == 1 and not args.all else rows, indent=1))
    print("\n" + loo.table(rows))


if __name__ == "__main__":
    main()
