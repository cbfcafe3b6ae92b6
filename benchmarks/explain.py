"""Explained forecasts benchmark: faithfulness, numbers, MAE and generation speed on real data.

    STLLM_DATA_ROOT=../shared/data python benchmarks/explain.py \
        --runs beijing-pm25=runs/bench/beijing-pm25/stllm nyc-taxi-60min=runs/bench/nyc-taxi-60min/stllm \
        [--pairs 200] [--generated 12] [--max-new-tokens N] [--push-accuracy 24]

For each trained run, over `--pairs` (sensor, time) pairs drawn (seeded) from its test split, channels taken in
turn: `stllm.explain.explain` in analytic mode, reporting
- claims by who wrote them (`"by"` of each claim), apart: model-written checkable claims per explanation, the
  share that hold and the share left unparsed (clauses of a checkable shape the checker could not read, over
  checked + unparsed); program-written claims (filled fact slots, the opening stages, the forecast numbers; in
  analytic mode all of the text) per explanation and the share that hold;
- faithfulness: mean over explanations of the share of checked data claims that hold, and the share of
  explanations where every claim holds;
- numbers: the share of explanations whose stated forecast numbers equal the regression head's;
- MAE of the explained forecasts against the truth (masked: missing and zero targets ignored, as the evaluation
  does) next to the city layout's MAE on the same windows from `stllm.infer.forecast`. Explain mode reads the
  same head on the same city layout, so the two are equal by construction; the benchmark checks that they are;
- seconds per explanation (mean and median).
Then generated mode on the first `--generated` pairs: the run's writer (`<run>/writer`, explain.form: written)
writes the whole rationale from the data sheet, numbers copied from the sheet unless `--no-copy-numbers`,
decoding checked against the analytic text as a draft unless `--no-draft` (`--plain-check N` writes N of them
again without it and reports whether the texts are the same and the two decoding times side by side); a run
without a writer has its own language model write around fact slots the program fills (explain.form: slots).
Greedy, KV cache; the same figures, tokens per second (tokens the model chose) and three sample explanations with
their claims. Student runs (trained by `stllm train` with an `explain:` section) are measured the
same way; NAME is any label.
`--push-accuracy N` adds, teacher-forced on N training and N test pairs, how often the run's language model ranks
the teacher's "pushes up|down" word above the other (`stllm.distill.student.push_accuracy`; about 0.5 for a
student that has not learned which way a factor pushes).
`--notes FILE` attaches a notes CSV to the city and `--note-pairs N` adds N test pairs where a note holds at the
sensor: their explanations state the notes (and, for a run that reads notes, what they did to the forecast), and
`note_claims` reports how many note claims each such explanation holds and the share that hold.
Writes benchmarks/results/explain.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from stllm.data.fit import load_city
from stllm.distill.facts import estimate_effects
from stllm.explain import tally
from stllm.infer import forecast
from stllm.metrics import masked_mae
from stllm.model import STLLM

ROOT = Path(__file__).resolve().parent.parent


def pick_pairs(prep, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n (start, node, channel) triples from the test split whose first target step is observed."""
    rng = np.random.default_rng(seed)
    starts = prep.splits["test"]
    values = prep.city.values
    out, tries = [], 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        s, i = int(rng.choice(starts)), int(rng.integers(prep.n_nodes))
        c = len(out) % prep.city.n_channels
        if np.isfinite(values[s - 1, i, c]) and np.isfinite(values[s:s + prep.t_out, i, c]).any():
            out.append((s, i, c))
    return out


def pick_note_pairs(prep, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n (start, node, channel 0) triples from the test split where a note holds at the node during the window
    (so the explanations state notes); fewer when the test split has fewer."""
    rng = np.random.default_rng(seed + 1)
    held = prep.note_cover.any(-1).numpy()                                  # [T', N]
    candidates = [(int(s), int(i)) for s in prep.splits["test"]
                  for i in np.flatnonzero(held[s - prep.t_in:s + prep.t_out].any(0))
                  if np.isfinite(prep.city.values[s - 1, i, 0])]
    picked = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False) if candidates else []
    return [(*candidates[k], 0) for k in sorted(picked)]


def _share(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


STAGES = [f"{k}. {name}:" for k, name in enumerate(("Question", "Drivers", "Recent data", "Factors", "Conclusion"), 1)]


def well_formed(text: str) -> bool:
    """The five stages, each once and in order, the forecast line last, and no brace left over from a slot the
    program did not know (a run-off)."""
    at = [text.find(s) for s in STAGES]
    return (all(text.count(s) == 1 for s in STAGES) and at == sorted(at) and at[0] >= 0
            and "{" not in text and "}" not in text and text.rstrip().endswith("]")
            and text.count("Forecast for the next") == 1)


def by_writer(results: list[dict], by: str) -> dict:
    """The checkable claims written by `by` ("model" | "program"), over all explanations: checked claims per
    explanation and the share that hold, unparsed clauses per explanation and their share of the checkable
    (checked + unparsed)."""
    pooled = tally([c for r in results for c in r["claims"]], by)
    n = len(results)
    return {"claims_per_explanation": pooled["checked"] / n, "hold_share": pooled["hold_share"],
            "unparsed_per_explanation": pooled["unparsed"] / n, "unparsed_share": pooled["unparsed_share"]}


def summarise(results: list[dict], seconds: list[float]) -> dict:
    faith = [r["faithfulness"] for r in results if r["faithfulness"] is not None]
    data = [[c for c in r["claims"] if c["holds"] is not None and not c["kind"].startswith("forecast")]
            for r in results]                                       # checked data claims, per explanation
    failed = [(r, c) for r in results for c in r["claims"] if c["holds"] is False]
    out = {"n": len(results),
           "model": by_writer(results, "model"), "program": by_writer(results, "program"),
           "faithfulness_mean": float(np.mean(faith)) if faith else None,
           "claims_hold_share": _share([c["holds"] for claims in data for c in claims]),
           "all_claims_hold_share": float(np.mean([f == 1.0 for f in faith])) if faith else None,
           "with_checkable_claims_share": len(faith) / len(results),
           "checked_claims_per_explanation": float(np.mean([len(claims) for claims in data])),
           "failed_by_kind": dict(Counter(f"{c['by']}: {c['kind']}.{c['quantity']}" for _, c in failed).most_common()),
           "unparsed_examples": [{"by": c["by"], "text": c["text"]} for r in results for c in r["claims"]
                                 if c["verdict"] == "unparsed"][:5],
           "program_failures": [{"at": r["at"], "node": r["node"], **{k: c[k] for k in ("kind", "quantity", "text",
                                                                                         "stated", "actual")}}
                                for r, c in failed if c["by"] == "program"][:5],
           "numbers_equal_head_share": float(np.mean([r["numbers_consistent"] is True for r in results])),
           "forecast_consistent_share": float(np.mean([r["forecast_consistent"] is True for r in results])),
           "well_formed_share": float(np.mean([well_formed(r["explanation"]) for r in results])),
           "not_well_formed": [{"at": r["at"], "node": r["node"], "explanation": r["explanation"]}
                               for r in results if not well_formed(r["explanation"])][:3],
           "seconds_per_explanation": float(np.mean(seconds)),
           "seconds_per_explanation_median": float(np.median(seconds))}
    gen = [r["generation"] for r in results if "generation" in r]
    if gen:
        tokens, secs = sum(g["new_tokens"] for g in gen), sum(g["seconds"] for g in gen)
        out.update({"new_tokens_per_explanation": tokens / len(gen), "tokens_per_s": tokens / max(secs, 1e-9),
                    "filled_tokens_per_explanation": sum(g.get("filled_tokens", 0) for g in gen) / len(gen),
                    "prompt_tokens": float(np.mean([g["prompt_tokens"] for g in gen])),
                    "example": results[0]["explanation"]})
    return out


def _run_metrics(run_dir: str) -> dict:
    """What the run's own metrics.json says: test-split MAE (all windows), training budget, student settings."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():          # a run whose final test evaluation did not finish: nothing to report
        return {}
    m = json.loads(path.read_text())
    return {"test_mae": m.get("mae"), "test_windows": m.get("n_windows"), "training": m.get("training"),
            "explain": m.get("explain")}


def push_accuracies(model, prep, city, effects, n: int, seed: int = 0) -> dict:
    """Teacher-forced push accuracy (`stllm.distill.student.push_accuracy`) on n (window, node) pairs of the
    training split and n of the test split, channel 0, with the analytic teacher's rationales in the run's form."""
    from stllm.distill.student import make_samples, make_teacher, push_accuracy
    fact_slots = getattr(model.cfg.explain, "fact_slots", True)
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        pairs = [(int(rng.choice(prep.splits[split])), int(rng.integers(prep.n_nodes))) for _ in range(n)]
        samples, _ = make_samples(city, prep, pairs, make_teacher("analytic", fact_slots=fact_slots),
                                  effects=effects)
        out[split] = push_accuracy(model, prep, samples)
    return out


def bench_run(name: str, run_dir: str, n_pairs: int, n_generated: int, max_new_tokens: int | None,
              n_push: int = 0, notes: str = "", n_note_pairs: int = 0, copy_numbers: bool = True,
              draft: bool = True, plain_check: int = 0) -> dict:
    from stllm.data.notes import with_notes
    t0 = time.time()
    model = STLLM.from_pretrained(run_dir)
    city = with_notes(load_city(model.cfg.data), notes or None)
    prep = model.prepare(city)
    effects_source = "estimated from the training part (as stllm explain does), once for every pair"
    effects = estimate_effects(city, prep.train_end, prep.t_in, prep.t_out) if city.exog is not None else {}
    pairs = pick_pairs(prep, n_pairs) + (pick_note_pairs(prep, n_note_pairs) if n_note_pairs else [])
    out = {"run": str(run_dir), "dataset": city.name, "n_nodes": city.n_nodes, "channels": city.channels,
           "notes": notes, "pairs": {"random": n_pairs, "with_notes": len(pairs) - n_pairs},
           "effects": effects_source, "load_s": round(time.time() - t0, 1),
           "run_metrics": _run_metrics(run_dir)}

    results, seconds = [], []
    for s, i, c in pairs:
        t = time.perf_counter()
        results.append(model.explain(prep, i, s, channel=c, effects=effects))
        seconds.append(time.perf_counter() - t)
    out["analytic"] = summarise(results, seconds)
    if n_note_pairs:
        with_notes_part = results[n_pairs:]
        out["analytic"]["note_claims"] = {
            "per_explanation_with_notes": sum(c["kind"] == "note" or c["quantity"] == "note"
                                              for r in with_notes_part for c in r["claims"]) / max(len(with_notes_part), 1),
            "hold_share": _share([c["holds"] for r in results for c in r["claims"]
                                  if (c["kind"] == "note" or c["quantity"] == "note") and c["holds"] is not None]),
            "example": next((r["explanation"] for r in with_notes_part if "note moves" in r["explanation"]), None)}
    # the city layout's numbers for the same windows, batched as `stllm evaluate` does
    starts = np.array(sorted({s for s, _, _ in pairs}))
    by_start = {}
    for chunk, pred, true in forecast(model, prep, starts, batch_size=16):
        for k, s in enumerate(chunk):
            by_start[int(s)] = (pred[k], true[k])
    city_pred = np.stack([by_start[s][0][:, i, c] for s, i, c in pairs])               # [P, t_out]
    truth = np.stack([by_start[s][1][:, i, c] for s, i, c in pairs])
    explained = np.array([r["forecast"] for r in results])
    out["mae"] = {"explain_mode": masked_mae(explained, truth), "city_layout": masked_mae(city_pred, truth),
                  "max_abs_diff_explain_vs_city_layout": float(np.abs(explained - city_pred).max())}
    if n_push and model.backbone is not None:
        out["push_accuracy_teacher_forced"] = push_accuracies(model, prep, city, effects, n_push)
        print(f"  {name} push accuracy, teacher-forced: {out['push_accuracy_teacher_forced']}", flush=True)
    writer = model.load_writer()
    if writer is not None:
        out["writer"] = {"layers": writer.n_layers, "copy_numbers": copy_numbers, "draft": draft,
                         "training": json.loads((Path(run_dir) / "writer" / "writer.json").read_text()).get("training")}
    if n_generated and (model.backbone is not None or writer is not None):
        results, seconds = [], []
        for s, i, c in pairs[:n_generated]:
            t = time.perf_counter()
            results.append(model.explain(prep, i, s, channel=c, effects=effects, mode="generated",
                                         max_new_tokens=max_new_tokens, copy_numbers=copy_numbers, draft=draft))
            seconds.append(time.perf_counter() - t)
            print(f"  {name} generated {len(results)}/{n_generated}: {results[-1]['generation']}", flush=True)
        out["generated"] = summarise(results, seconds)
        if writer is not None and draft and plain_check:
            out["generated"]["plain_check"] = plain_versus_drafted(model, prep, effects, pairs[:plain_check],
                                                                   results, max_new_tokens, copy_numbers)
        out["generated"]["examples"] = [{k: r[k] for k in ("node_name", "at", "explanation", "claims")}
                                        for r in results[:3]]
    return out


def plain_versus_drafted(model, prep, effects, pairs, drafted: list[dict], max_new_tokens, copy_numbers) -> dict:
    """The same pairs written again one token per pass (no draft): whether each text is the drafted one, and the
    writer's decoding seconds of both, side by side (median and the median of per-pair ratios)."""
    same, plain_s, drafted_s = [], [], []
    for (s, i, c), d in zip(pairs, drafted):
        r = model.explain(prep, i, s, channel=c, effects=effects, mode="generated", max_new_tokens=max_new_tokens,
                          copy_numbers=copy_numbers, draft=False)
        same.append(r["explanation"] == d["explanation"])
        plain_s.append(r["generation"]["seconds"])
        drafted_s.append(d["generation"]["seconds"])
        print(f"  plain {len(same)}/{len(pairs)}: same text {same[-1]}, {plain_s[-1]:.1f} s vs {drafted_s[-1]:.1f} s",
              flush=True)
    return {"n": len(same), "same_text": sum(same), "decode_s_median_plain": float(np.median(plain_s)),
            "decode_s_median_drafted": float(np.median(drafted_s)),
            "speedup_median": float(np.median([p / max(d, 1e-9) for p, d in zip(plain_s, drafted_s)])),
            "different": [d["explanation"] for d, ok in zip(drafted, same) if not ok][:2]}


def table(results: dict) -> str:
    """One row per run and mode: the model's claims and the program's apart, then the numbers, MAE and speed."""
    def f(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)
    lines = ["| dataset (run) | mode | pairs | model-written claims/expl. | hold | unparsed | program-written "
             "claims/expl. | hold | numbers = head | MAE explain / city layout | s/expl. (median) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        for mode in ("analytic", "generated"):
            m = r.get(mode)
            if not m:
                continue
            model, program = m["model"], m["program"]
            mae = r.get("mae") if mode == "analytic" else None
            mae_text = "-" if not mae else f"{mae['explain_mode']:.2f} / {mae['city_layout']:.2f}"
            lines.append(f"| {key} | {mode} | {m['n']} | {model['claims_per_explanation']:.1f} | "
                         f"{f(model['hold_share'])} | {f(model['unparsed_share'])} | "
                         f"{program['claims_per_explanation']:.1f} | {f(program['hold_share'])} | "
                         f"{m['numbers_equal_head_share']:.2f} | {mae_text} | "
                         f"{m['seconds_per_explanation_median']:.2f} | {f(m.get('tokens_per_s'), '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--generated", type=int, default=12, help="pairs explained in generated mode")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="bound on generated tokens (default: explain's, 768 for a writer)")
    parser.add_argument("--no-copy-numbers", action="store_true",
                        help="a writer writes numbers freely (default: only numbers of its data sheet)")
    parser.add_argument("--no-draft", action="store_true",
                        help="a writer decodes one token per pass (default: checks the analytic text as a draft)")
    parser.add_argument("--plain-check", type=int, default=0, metavar="N",
                        help="write the first N generated pairs again without the draft: same text? how much slower?")
    parser.add_argument("--push-accuracy", type=int, default=0, metavar="N",
                        help="teacher-forced push accuracy on N training and N test pairs (student runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explain.json"))
    parser.add_argument("--note", default="", help="the conditions of this run, kept in the JSON (e.g. what else ran)")
    parser.add_argument("--notes", default="", help="a notes CSV attached to every run's city (docs/data_formats.md)")
    parser.add_argument("--note-pairs", type=int, default=0, metavar="N",
                        help="N more test pairs where a note holds at the sensor (their note claims are reported)")
    args = parser.parse_args()

    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("_machine", None)
    for item in args.runs:
        key, run_dir = item.split("=", 1)
        print(f"== {key}: {run_dir}", flush=True)
        results[key] = bench_run(key, run_dir, args.pairs, args.generated, args.max_new_tokens, args.push_accuracy,
                                 args.notes, args.note_pairs, copy_numbers=not args.no_copy_numbers,
                                 draft=not args.no_draft, plain_check=args.plain_check)
        results["_machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "platform": platform.platform(), "note": args.note}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    text = table({k: v for k, v in results.items() if not k.startswith("_")})
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
