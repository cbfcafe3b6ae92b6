"""LM gain on real data: what the language-model side adds to a trained encoder, with notes and node texts.

    python benchmarks/lm_gain.py --data nyc-bike-60min --notes events.csv --out gain.json \
        [--steps 1500 --stage2-steps 300] [--zero-shot-to bayarea-bike] [--runs DIR] [--set KEY=VALUE ...]

--data names a config in configs/ (its data.name is the dataset); --notes a notes CSV (stllm.data.notes). Every
variant gets its budget in optimizer steps (train.max_minutes=0, train.encoder_first_minutes=0; early stopping kept):
  encoder_only   the config with model.use_llm=false model.notes=none, `--steps` steps
  stllm          from encoder_only's run (train.init_from, train.freeze=[encoder,skip]): model.notes=text
                 model.node_text=true, `--stage2-steps` steps; the encoder and its read-out are shared, so any
                 difference to encoder_only is the language-model side
  no_text        the same stage with model.notes=none model.node_text=false, `--stage2-steps` steps
  shuffled_text  stllm's run evaluated with the notes moved to wrong nodes and times (stllm.data.notes.shuffled:
                 each note keeps its text and duration, starts at another time at least a week away, on a random
                 other node set of the same size; `all` stays all) and the node texts permuted among the nodes
  encoder_flags  from encoder_only's run, model.use_llm=false model.notes=flags, `--stage2-steps` steps: the flag
                 effect (each note as a flag of its kind) trains, and the read-out's bias with it
                 (train.freeze=[encoder,head.lin.weight]; see variant_overrides); encoder_flags_no_notes, the same
                 run without notes, shows what the bias alone changed
Masked MAE (targets 0 or NaN ignored) on the test split: `overall` over every forecast entry; `event_hours` over the
entries (window, step, node) inside a note whose span is at most --event-hours (48 h), at that note's nodes (true
notes, also for shuffled_text). --zero-shot-to evaluates every variant on another dataset (no notes there; its own
scaler fitted on its training part), overall only. Runs that finished are reused, so an interrupted benchmark
continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("stllm", "no_text", "shuffled_text", "encoder_only", "encoder_flags")
CONTROLS = ("encoder_flags_no_notes",)   # encoder_flags' run without any note: its read-out bias alone
RUN_OF = {"shuffled_text": "stllm", "encoder_flags_no_notes": "encoder_flags"}   # variants evaluated on another's run
ONLY_STEPS = ["train.max_minutes=0", "train.encoder_first_minutes=0", "train.encoder_first_steps=0"]


def variant_overrides(encoder_run: Path, steps: int, stage2_steps: int, eval_every: int) -> dict[str, list[str]]:
    """The overrides of each trained variant (shuffled_text is stllm's run, evaluated otherwise)."""
    stage2 = [f"train.init_from={encoder_run}", f"train.max_steps={stage2_steps}", f"train.eval_every={eval_every}"]
    return {
        "encoder_only": ["model.use_llm=false", "model.notes=none", f"train.max_steps={steps}"],
        "stllm": stage2 + ["train.freeze=[encoder,skip]", "model.notes=text", "model.node_text=true"],
        "no_text": stage2 + ["train.freeze=[encoder,skip]", "model.notes=none", "model.node_text=false"],
        # not [encoder,head]: with only the note effect trainable, a batch that meets no note has a loss without
        # gradient and train() stops (backward of a constant); the read-out's bias (t_out * C numbers) keeps every
        # loss differentiable, and encoder_flags_no_notes shows what that bias alone changed
        "encoder_flags": stage2 + ["train.freeze=[encoder,head.lin.weight]", "model.use_llm=false",
                                   "model.notes=flags"],
    }


def noted_city(data_cfg, notes: str | None):
    """The config's dataset with the notes attached before any node selection (notes name zones of the full city;
    select_nodes then moves them and drops the ones about none of the kept nodes)."""
    from stllm.data.notes import with_notes
    from stllm.data.fit import load_city
    city = with_notes(load_city(replace(data_cfg, max_nodes=0)), notes)
    if data_cfg.max_nodes and data_cfg.max_nodes < city.n_nodes:
        city = city.select_nodes(list(range(data_cfg.max_nodes)))
    return city


def train_variant(config: Path, out: Path, city, overrides: list[str], progress: bool) -> dict:
    """Train one run (or reuse a finished one, continue an interrupted one); its budget and time as a dict."""
    from stllm import checkpoint
    from stllm.config import load_config
    from stllm.train import BEST, LAST, train
    cfg = load_config(config, overrides)
    t0 = time.time()
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        metrics = train(cfg, out, city=city, progress=progress, resume=(out / LAST).exists())
    t = metrics["training"]
    return {"steps": t["steps"], "best_step": checkpoint.load(out / BEST)[1]["step"] if (out / BEST).exists() else None,
            "stopped_by": t["stopped_by"], "train_wall_s": t["wall_s"], "windows_per_s": t["windows_per_s"],
            "wall_s_this_call": round(time.time() - t0, 1), "overrides": overrides}


def short_note_cover(city, prep, max_hours: float) -> np.ndarray:
    """[T', N] bool: the steps and nodes inside a note of `city` whose span (end - start) is at most max_hours."""
    from stllm.data.notes import coverage
    notes = city.notes
    if notes is None or not len(notes):
        return np.zeros((len(prep.timestamps), prep.n_nodes), dtype=bool)
    short = notes[(notes["end"] - notes["start"]) <= np.timedelta64(int(max_hours * 3600), "s")]
    _, _, cover = coverage(short, prep.timestamps, city.n_nodes)                      # [T', N, J]
    return cover.any(2)


def errors_of(model, prep, events: np.ndarray | None, split: str = "test", batch_size: int = 32) -> dict:
    """Masked MAE of `model` on `prep`'s split: overall, and inside `events` ([T', N] bool) when given."""
    from stllm.infer import masked_mae_where
    starts = prep.splits[split]
    steps = starts[:, None] + np.arange(prep.t_out)                                      # [b, t_out]
    selections = {"overall": np.ones((len(starts), prep.t_out, prep.n_nodes), bool)}
    if events is not None:
        selections["event_hours"] = events[steps]                                        # [b, t_out, N]
    out = {}
    for part, (mae, n) in masked_mae_where(model, prep, starts, selections, batch_size).items():
        out[part], out[f"n_{part}"] = mae, n
    return out


def permuted(texts: list[str], seed: int) -> list[str]:
    """The node texts moved among the nodes (a random permutation, re-drawn until no node keeps its own text
    when there are two or more)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    while len(texts) > 1 and (order == np.arange(len(texts))).any():
        order = rng.permutation(len(texts))
    return [texts[i] for i in order]


def evaluate_variants(runs: Path, city, max_hours: float, seed: int) -> dict:
    """{variant: errors} on the city's test split (shuffled_text: stllm's run on shuffled notes and node texts)."""
    from stllm.data.notes import shuffled
    from stllm.model import STLLM
    result = {}
    for name in VARIANTS + CONTROLS:
        t0 = time.time()
        model = STLLM.from_pretrained(runs / RUN_OF.get(name, name))
        if name == "encoder_flags_no_notes":
            prep = model.prepare(replace(city, notes=None))
        elif name == "shuffled_text":
            moved = None if city.notes is None else shuffled(city.notes, city, seed=seed)
            prep = model.prepare(replace(city, notes=moved))
            prep.node_texts = permuted(prep.node_texts, seed)
        else:
            prep = model.prepare(city)
        events = short_note_cover(city, prep, max_hours)                                 # the true notes' hours
        result[name] = errors_of(model, prep, events) | {"eval_s": round(time.time() - t0, 1)}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    return result


def zero_shot(runs: Path, data_cfg, target: str, seed: int) -> dict:
    """{variant: errors} of every run on another dataset's test split (no notes there; overall only)."""
    from stllm.data.fit import fit_to_run, load_city
    from stllm.model import STLLM
    city = load_city(replace(data_cfg, name=target, options={}, channels=[], notes=""))
    result = {}
    for name in VARIANTS:
        t0 = time.time()
        model = STLLM.from_pretrained(runs / RUN_OF.get(name, name))
        prep = model.prepare(fit_to_run(city, model.meta))
        if name == "shuffled_text":   # no notes to shuffle there: only the node texts move
            prep.node_texts = permuted(prep.node_texts, seed)
        result[name] = errors_of(model, prep, None) | {"eval_s": round(time.time() - t0, 1)}
        print(f"zero-shot {target} {name}: {json.dumps(result[name])}", flush=True)
    return {"dataset": target, "n_nodes": city.n_nodes, "overall": {k: v["overall"] for k, v in result.items()},
            "details": result}


def run(args) -> dict:
    from stllm.config import load_config
    config = ROOT / "configs" / f"{args.data}.yaml"
    if not config.is_file():
        raise SystemExit(f"--data {args.data}: no config {config}; choose one of "
                         f"{sorted(p.stem for p in (ROOT / 'configs').glob('*.yaml'))}")
    runs = Path(args.runs)
    base = [*ONLY_STEPS, f"train.seed={args.seed}", *args.set]
    cfg = load_config(config, base)
    city = noted_city(cfg.data, args.notes)
    plan = variant_overrides(runs / "encoder_only", args.steps, args.stage2_steps, args.eval_every)
    training = {}
    for name in ("encoder_only", "stllm", "no_text", "encoder_flags"):
        print(f"training {name} ...", flush=True)
        training[name] = train_variant(config, runs / name, city, base + plan[name], args.progress)
        print(f"{name}: {json.dumps(training[name])}", flush=True)
    errors = evaluate_variants(runs, city, args.event_hours, args.seed)
    result = {"dataset": city.name, "config": args.data, "notes": args.notes,
              "n_notes": 0 if city.notes is None else len(city.notes), "n_nodes": city.n_nodes,
              "overall": {k: v["overall"] for k, v in errors.items()},
              "event_hours": {k: v.get("event_hours") for k, v in errors.items()},
              "n_entries": {"overall": errors["stllm"]["n_overall"],
                            "event_hours": errors["stllm"].get("n_event_hours", 0)},
              "budget": {"steps": args.steps, "stage2_steps": args.stage2_steps}, "training": training,
              "evaluation": errors}
    if args.zero_shot_to:
        result["zero_shot"] = zero_shot(runs, cfg.data, args.zero_shot_to, args.seed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a config in configs/ (e.g. nyc-bike-60min)")
    parser.add_argument("--notes", help="notes CSV for the dataset (start,end,zones,kind,text)")
    parser.add_argument("--zero-shot-to", help="also evaluate every variant zero-shot on this dataset")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "lm_gain"), help="where the runs go")
    parser.add_argument("--steps", type=int, default=1500, help="encoder_only's optimizer steps")
    parser.add_argument("--stage2-steps", type=int, default=300, help="optimizer steps of every variant started "
                        "from encoder_only (stllm, no_text, encoder_flags)")
    parser.add_argument("--eval-every", type=int, default=100, help="validation interval of those variants")
    parser.add_argument("--event-hours", type=float, default=48.0, help="notes at most this long count as events")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    t0 = time.time()
    result = run(args)
    result["command"] = "python benchmarks/lm_gain.py " + shlex.join(sys.argv[1:])
    result["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("overall", "event_hours", "n_entries")}, indent=1))


if __name__ == "__main__":
    main()
