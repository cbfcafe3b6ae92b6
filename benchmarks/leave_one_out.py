"""Leave one city out: pretrain the general recipe (configs/general.yaml) on every other series, forecast the held-out
city zero-shot, and compare with its naive forecasts, a run trained on it (full-shot) and one trained on one other
city (single-source). Called by `benchmarks/zero_shot.py --leave-out NAME` and `--all`.

Each held-out city is measured on one channel (HELD_OUT); the pretraining drops every series of that dataset.
stllm and encoder_only come from one run: its second stage holds the encoder, read-out and floor still
(train.stage2_freeze), so with the language model off it is exactly its first stage, the encoder-only ablation
trained for the same steps on the same windows. Zero-shot means no training on the held-out city: its scaler and
its hour-of-week profile (data.profile) are fitted on its own training split, inputs that precede every test window.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "general.yaml"
# held-out name -> (dataset, the channel its row is measured on)
HELD_OUT = {"nyc-bike": ("nyc-bike", "departures"), "nyc-taxi": ("nyc-taxi", "pickups"),
            "bayarea-bike": ("bayarea-bike", "departures"), "beijing-air": ("beijing-air", "PM2.5"),
            "melbourne-pedestrian": ("melbourne-pedestrian", "pedestrians"), "los-loop": ("los-loop", "speed")}
BASELINES = ("last", "same_time_yesterday", "same_time_last_week", "historical_average", "last_4_weeks")


def series(recipe: dict) -> list[dict]:
    """The recipe's training series: its data section's dataset, then each of data.sources."""
    data = recipe["data"]
    main = {k: data[k] for k in ("name", "options", "channels") if k in data}
    return [main] + list(data.get("sources") or [])


def with_series(recipe: dict, chosen: list[dict]) -> dict:
    """The recipe trained on `chosen` series: the first as the data section's dataset, the rest as sources."""
    out = json.loads(json.dumps(recipe))
    for key in ("options", "channels"):
        out["data"].pop(key, None)
    out["data"].update(chosen[0])
    out["data"]["sources"] = chosen[1:]
    return out


def single_source(name: str) -> dict:
    """The one other city of the single-source row: NYC bike departures (Bay Area departures for NYC bike)."""
    return {"name": "bayarea-bike", "channels": ["departures"]} if name == "nyc-bike" else \
        {"name": "nyc-bike", "channels": ["departures"]}


def label(one: dict) -> str:
    """A series as rows and folders name it: nyc-bike/departures, melbourne-pedestrian, synthetic-15min."""
    return (one.get("options") or {}).get("name", one["name"]) + \
        ("/" + ",".join(one["channels"]) if one.get("channels") else "")


def run_folders(runs: Path, name: str, steps: int, stage2_steps: int, changes: list[str] = ()) -> dict[str, Path]:
    """Where a row's three runs go; another budget trains into other folders. The single-source run depends only on
    its series and the budget, so held-out cities that share it (all but NYC bike) share one run. `changes` (the
    --set overrides of the pretraining) name their own general run; full-shot and single-source stay shared."""
    budget = f"steps{steps}+{stage2_steps}"
    general = "general" + "".join("+" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", c) for c in changes)
    return {"general": runs / name / budget / general, "full_shot": runs / name / budget / "full_shot",
            "single_source": runs / "single_source" / label(single_source(name)).replace("/", "_") / budget}


def train(recipe: dict, out: Path, steps: int, stage2_steps: int, threads: int) -> None:
    """`stllm train` on `recipe` with a budget in steps (resumes a run that stopped before its end)."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = json.loads(json.dumps(recipe))
    recipe["train"].update(encoder_first_steps=steps, max_steps=steps + stage2_steps, max_minutes=0,
                           num_threads=threads, test_sources=False)   # the row tests the held-out city only
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if (out / "metrics.json").exists():
        return
    cmd = [sys.executable, "-m", "stllm.cli", "train", "--config", str(config), "--out", str(out), "--quiet"]
    if (out / "checkpoints" / "last.safetensors").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def scores(run: Path, name: str) -> dict:
    """Masked MAE of the run on the held-out channel's test split: with its language model and without it (the
    encoder-only stage), and the target's baselines."""
    from stllm.model import STLLM
    from stllm.data import load
    dataset, channel = HELD_OUT[name]
    city = load(dataset).select_channels([channel])
    model = STLLM.from_pretrained(run)
    with_lm = model.evaluate(city)
    model.llm_active = False
    try:
        encoder = model.evaluate(city)
    finally:
        model.llm_active = True
    return {"stllm": with_lm["mae"], "encoder_only": encoder["mae"],
            "baselines": {k: with_lm["baselines"].get(k, {}).get("mae") for k in BASELINES},
            "zero_shot": with_lm["zero_shot"]}


def changed(recipe: dict, changes: list[str]) -> dict:
    """The recipe with KEY=VALUE overrides (section.key=yaml value), e.g. encoder.series_features=true."""
    out = json.loads(json.dumps(recipe))
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key.count(".") != 1:
            raise SystemExit(f"--set {change!r}: expected section.key=value, e.g. encoder.series_features=true")
        section, field = key.split(".")
        out.setdefault(section, {})[field] = yaml.safe_load(value)
    return out


def leave_out(name: str, runs: Path, steps: int, stage2_steps: int, threads: int, changes: list[str] = ()) -> dict:
    """One row: {"city", "channel", "zero_shot": {stllm, encoder_only}, "baselines", "full_shot", "single_source",
    "encoder_only_full_shot", ...}."""
    if name not in HELD_OUT:
        raise SystemExit(f"--leave-out {name!r}: choose one of {sorted(HELD_OUT)}")
    recipe = yaml.safe_load(RECIPE.read_text())
    dataset, channel = HELD_OUT[name]
    # the pretraining's first series (whose test split the run reports in its own metrics.json) is a synthetic
    # city: small, so the run's own test costs little; the row itself tests the held-out city
    rest = sorted((s for s in series(recipe) if s["name"] != dataset), key=lambda s: s["name"] != "synthetic")
    own = {"name": dataset, "channels": [channel]}
    t0 = time.time()
    folders = run_folders(runs, name, steps, stage2_steps, changes)
    train(with_series(changed(recipe, changes), rest), folders["general"], steps, stage2_steps, threads)
    train(with_series(recipe, [own]), folders["full_shot"], steps, stage2_steps, threads)
    train(with_series(recipe, [single_source(name)]), folders["single_source"], steps, stage2_steps, threads)
    zero, full, single = (scores(folders[r], name) for r in ("general", "full_shot", "single_source"))
    assert zero["zero_shot"] and single["zero_shot"] and not full["zero_shot"]
    return {"city": name, "channel": channel, "zero_shot": {"stllm": zero["stllm"], "encoder_only": zero["encoder_only"]},
            "baselines": zero["baselines"], "full_shot": full["stllm"], "full_shot_encoder_only": full["encoder_only"],
            "single_source": single["stllm"], "single_source_encoder_only": single["encoder_only"],
            "pretrained_on": [label(s) for s in rest], "recipe_changes": list(changes),
            "budget": {"encoder_steps": steps, "stage2_steps": stage2_steps}, "wall_s": round(time.time() - t0, 1)}


def table(rows: list[dict]) -> str:
    """One markdown row per held-out city; the best naive forecast and the ratios the goals name."""
    head = ("| held-out city (channel) | stllm zero-shot | encoder-only zero-shot | best naive | historical average "
            "| last 4 weeks | full-shot | single-source | zero-shot / best naive | zero-shot / full-shot |\n"
            + "|---" * 10 + "|")
    lines = [head]
    for r in rows:
        naive = [r["baselines"][k] for k in ("last", "same_time_yesterday", "same_time_last_week")
                 if r["baselines"][k] is not None]
        best = min(naive) if naive else None
        z = r["zero_shot"]["stllm"]
        show = lambda v: "n/a" if v is None else f"{v:.3f}"
        lines.append(f"| {r['city']} ({r['channel']}) | {show(z)} | {show(r['zero_shot']['encoder_only'])} | "
                     f"{show(best)} | {show(r['baselines']['historical_average'])} | "
                     f"{show(r['baselines'].get('last_4_weeks'))} | {show(r['full_shot'])} | "
                     f"{show(r['single_source'])} | {show(z / best if best else None)} | "
                     f"{show(z / r['full_shot'])} |")
    return "\n".join(lines)
