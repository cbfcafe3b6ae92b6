"""Where a forecaster errs: windows whose forecast days hold a public holiday, windows whose period context
(one day / one week earlier) does, and the rest. Masked MAE on the original scale for each group.

    python benchmarks/holiday_errors.py --runs ablation=runs/bench5/nyc-taxi-60min/encoder_only \
        calendar=runs/bench8/nyc-taxi-60min/stllm --splits val test

The holidays are the city's calendar (`CityData.holidays`, "US" for the NYC data). Writes
benchmarks/results/holidays.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stllm.data.calendar import holiday_group, holiday_names
from stllm.data.fit import load_city
from stllm.infer import forecast
from stllm.metrics import masked_error_sum
from stllm.model import STLLM

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("holiday", "after_holiday", "other")   # stllm.data.calendar.holiday_group


def errors_by_group(run: Path, splits: list[str]) -> dict:
    model = STLLM.from_pretrained(run)
    city = load_city(model.cfg.data)
    if not city.holidays:
        raise SystemExit(f"{run}: its dataset {city.name} has no holiday calendar (CityData.holidays is empty)")
    prep = model.prepare(city)
    holidays = holiday_names(city.holidays, city.timestamps, city.name)
    out = {}
    for split in splits:
        err = {g: 0.0 for g in GROUPS}
        count = {g: 0 for g in GROUPS}
        windows = {g: 0 for g in GROUPS}
        for starts, pred, true in forecast(model, prep, prep.splits[split], batch_size=64):
            for s, p, t in zip(starts, pred, true):
                group = holiday_group(prep.timestamps[s:s + prep.t_out], holidays, prep.periods)
                total, n = masked_error_sum(p, t)                         # masked as in the benchmark metrics
                err[group] += total
                count[group] += n
                windows[group] += 1
        total = sum(err.values())
        out[split] = {g: {"windows": windows[g], "mae": err[g] / max(count[g], 1), "share_of_error": err[g] / total}
                      for g in GROUPS}
        out[split]["all"] = {"windows": sum(windows.values()), "mae": total / max(sum(count.values()), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR ...")
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "holidays.json"))
    args = parser.parse_args()
    results = {}
    for item in args.runs:
        name, _, run = item.partition("=")
        if not run:
            raise SystemExit(f"--runs: expected NAME=RUN_DIR, got {item!r}")
        results[name] = errors_by_group(Path(run), args.splits)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| run | split | " + " | ".join(f"{g} MAE (windows)" for g in (*GROUPS, "all")) + " |")
    print("|---|---|" + "---|" * (len(GROUPS) + 1))
    for name, by_split in results.items():
        for split, groups in by_split.items():
            cells = [f"{groups[g]['mae']:.2f} ({groups[g]['windows']})" for g in (*GROUPS, "all")]
            print(f"| {name} | {split} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
