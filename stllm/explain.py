"""Explained forecasts: one sensor at one time -> the regression head's forecast, an explanation, and its check.

`at` is the timestamp of the FIRST FORECAST STEP (the window start of `stllm.distill.facts`): the history is the
t_in steps before it, the forecast covers [at, at + t_out steps). The latest possible `at` is one step after the
data ends (a forecast into the unknown future, with no truth).

The forecast numbers are always the regression head's, from the city layout (`stllm.infer.forecast`, the same
numbers `stllm predict` writes). The explanation's text comes from one of two modes:
- "analytic": the five-stage rationale rendered from facts computed from the data, concluding in the head's
  direction (`render_rationale`); no text is generated. Works for every run.
- "generated": the run's language model (backbone + LoRA) writes the rationale greedily from the node-layout
  prompt (prompts/node.txt with the node's ST-tokens and <ST_PRE> query), with the KV cache; the program writes
  each fact slot the model names (`stllm.distill.node_layout.generate_with_facts`).
Either way the program writes the head's numbers into the FORECAST_SLOT (`_join`); bracketed number
lists the language model wrote itself are replaced by the slot first, so no sampled forecast digit survives.
Then `check_explanation` tests every checkable claim against the data and says who wrote it: "program" for text
inside what the program wrote (analytic mode: all of it; generated mode: the opening stages, filled fact slots,
the forecast numbers), "model" for the words the language model chose.

Weather effects (`estimate_effects`) are computed here, at explain time, from the given city's training part (the
steps before its train split ends, split as the run's config splits data), which needs no more than the data
explaining needs anyway: on the run's own dataset they are the effects of its training data, elsewhere the other
city's own. Runs store none (training does not call this module); pass `effects=` to reuse them across calls.

`STLLM.explain(city, node, at, **options)` is the usual way in; `stllm explain` (stllm/cli.py) wraps that.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData
from stllm.data.fit import resolve_node, resolve_time
from stllm.data.prepared import PreparedCity, batch_to
from stllm.distill.checker import check_explanation
from stllm.distill.writer import data_sheet, sheet_lines
from stllm.distill.facts import compute_facts, estimate_effects, forecast_direction, note_kind, time_text
from stllm.distill.teachers import (FACT_SLOT, FORECAST_SLOT, fact_text, format_forecast, horizon_text,
                                    opening_segments, render_node_prompt, render_rationale, stage4_slot_names)

MODES = ("analytic", "generated")
WRITER_MAX_NEW_TOKENS = 768   # a writer's whole rationale: ~360 tokens on NYC taxi, ~450 on Beijing, more with notes
_SAMPLED_LIST = re.compile(r"\[[^\[\]]*\d[^\[\]]*\]")   # a bracketed list with digits: a forecast the LM wrote


def explain(model, city: CityData | PreparedCity, node, at, mode: str = "analytic", channel: str | int = 0,
            effects: dict | None = None, max_new_tokens: int | None = None, writer=None,
            copy_numbers: bool | None = None, draft: bool | None = None) -> dict:
    """Forecast and explain node `node` (id, name or position) for the window whose first forecast step is `at`
    (timestamp or step index). `city`: the data, or `model.prepare(city)` to prepare it once across calls;
    `effects`: weather effects (default: estimated from the city's training part, see above). A run's writer
    writes with `copy_numbers` and `draft` (`Writer.write`; None: the run's explain.copy_numbers / explain.draft).

    Returns a JSON-ready dict: mode, dataset, node, node_name, channel, unit, at, timestamps [t_out], forecast
    [t_out] (original scale), truth [t_out] (None where unknown), history_timestamps / history [t_in], explanation,
    claims (`claim_rows`: who wrote each, its text, whether it holds), by_writer ({"model": `tally`, "program":
    `tally`}), faithfulness (checked data claims of both writers), model_claims and model_faithfulness (the
    model's checked claims of every kind and the share that hold), numbers_consistent, forecast_consistent,
    summary, and in generated mode `generation` (new tokens, seconds, tokens per second) and, when the text holds
    no checkable claim, `warning`.
    """
    from stllm.infer import forecast
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(model.cfg.model, "task", "forecast") != "forecast":
        raise ValueError(f"explain covers forecasts of values; this run has model.task={model.cfg.model.task!r}")
    if mode == "generated" and writer is None:
        writer = model.load_writer() if hasattr(model, "load_writer") else None
    if mode == "generated" and writer is None and getattr(model, "backbone", None) is None:
        raise ValueError("this run has neither a writer (<run>/writer, explain.form: written) nor a language model "
                         "(model.use_llm=false, the encoder-only ablation): only mode 'analytic' can explain its "
                         "forecasts")
    prep = model.prepare(city)
    city = prep.city
    t_in, t_out = prep.t_in, prep.t_out
    i, s = resolve_node(city, node), resolve_time(city, at, t_in)
    c = city.channel_index(channel)
    if effects is None:
        effects = estimate_effects(city, prep.train_end, t_in, t_out) if prep.train_end > t_in + t_out else {}

    _, pred, true = next(forecast(model, prep, np.array([s])))       # [1, t_out, N, C] each, original scale
    values = [float(v) for v in pred[0, :, i, c]]
    truth = [float(v) if np.isfinite(v) else None for v in true[0, :, i, c]]
    moved = note_effects(model, prep, i, s, c)
    facts = compute_facts(city, i, s, t_in=t_in, t_out=t_out, effects=effects, channel=c, note_effects=moved)

    generation, ex = None, getattr(model.cfg, "explain", None)
    if mode == "analytic":                                            # the head's direction, the slot kept
        segments = [(render_rationale(facts, values, fill=False), True)]
    elif writer is not None:                                          # the writer writes every word
        direction = forecast_direction(facts.last_value, values)
        copy_numbers = getattr(ex, "copy_numbers", True) if copy_numbers is None else copy_numbers
        draft = getattr(ex, "draft", True) if draft is None else draft
        text, generation = writer.write(data_sheet(facts, direction), max_new_tokens or WRITER_MAX_NEW_TOKENS,
                                        copy_numbers, numbers_from="\n".join(sheet_lines(facts, direction)),
                                        draft=render_rationale(facts, values, fill=False) if draft else None)
        text = _SAMPLED_LIST.sub(FORECAST_SLOT, text)
        segments = [(text, False)]
        if FORECAST_SLOT not in text:
            segments.append((f"\nForecast for the next {horizon_text(facts)} ({facts.unit or 'no unit'}): "
                             f"{FORECAST_SLOT}", True))
    else:                                                             # the slot student of the run's own LM
        direction = forecast_direction(facts.last_value, values)

        def fill(name: str, written: str) -> str | None:
            return fact_text(facts, name, direction, written)

        opening = (opening_segments(facts) if ex is not None and ex.enabled and ex.fact_slots
                   and ex.teacher == "analytic" else [])
        bound = max_new_tokens or getattr(ex, "max_new_tokens", 256)
        segments, generation = generate_rationale(model, prep, i, s, render_node_prompt(facts), bound, fill,
                                                  opening, stage4_slot_names(facts) if opening else None)
        generation["form"] = "slots"
        segments = [(t if by_program else _SAMPLED_LIST.sub(FORECAST_SLOT, t), by_program)
                    for t, by_program in segments]
        if not any(FORECAST_SLOT in t for t, _ in segments):
            segments.append((f"\nForecast for the next {horizon_text(facts)} ({facts.unit or 'no unit'}): "
                             f"{FORECAST_SLOT}", True))
    text, program_spans = _join(segments, format_forecast(values))   # the head's numbers, written by the program
    report = check_explanation(text, city, i, s, forecast=values, t_in=t_in, t_out=t_out, channel=c,
                               effects=effects, program=program_spans, note_effects=moved)
    claims = claim_rows(report)
    mine = tally(claims, "model")
    step = lambda k: time_text(pd.Timestamp(city.timestamps[0]) + k * city.interval)  # noqa: E731
    out = {"mode": mode, "dataset": city.name, "node": facts.node_id, "node_name": facts.node_name,
           "channel": city.channels[c], "unit": city.units[c], "at": step(s),
           "timestamps": [step(s + k) for k in range(t_out)], "forecast": values, "truth": truth,
           "history_timestamps": [step(s - t_in + k) for k in range(t_in)], "history": facts.history,
           "explanation": text, "claims": claims, "by_writer": {"model": mine, "program": tally(claims, "program")},
           "faithfulness": report.faithfulness,
           "model_claims": mine["checked"], "model_faithfulness": mine["hold_share"],
           "numbers_consistent": report.numbers_consistent, "forecast_consistent": report.forecast_consistent,
           "summary": report.summary()}
    if generation is not None:
        out["generation"] = generation
        if report.faithfulness is None:   # nothing in the text can be checked: say so instead of passing it off
            out["warning"] = ("the generated text states no fact the checker can test (only the forecast numbers "
                              "the program wrote): the run's language model has not learned to explain; "
                              "train the student longer (configs/*explain*.yaml) or use mode 'analytic'")
    return out


def note_effects(model, prep: PreparedCity, i: int, s: int, c: int) -> dict[str, float]:
    """What the notes that hold at node i in window s did to the model's forecast, by kind: {kind: the forecast
    with every note minus the forecast without the notes of that kind, mean over the forecast steps, in the
    channel's unit}. Empty for a run that does not read notes (model.notes=none) and for a window without notes."""
    import torch
    if getattr(model, "notes", None) is None or not model.llm_active:
        return {}
    batch = prep.batch(np.array([s]))
    kinds, cover = [note_kind(k) for k in batch.get("note_kinds") or []], batch["note_cover"]   # [J], [1, T, N, J]
    here = list(dict.fromkeys(kinds[j] for j in range(len(kinds)) if bool(cover[0, :, i, j].any())))
    if not here:
        return {}
    device = next(model.parameters()).device
    std = float(np.asarray(prep.scaler.std)[min(i, prep.scaler.std.shape[0] - 1), c])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(batch_to(batch, device))[0, :, i, c].float().cpu()
            out = {}
            for kind in here:
                keep = [j for j in range(len(kinds)) if kinds[j] != kind]
                without = {**batch, "note_texts": [batch["note_texts"][j] for j in keep],
                           "note_kinds": [batch["note_kinds"][j] for j in keep], "note_cover": cover[..., keep]}
                rest = model(batch_to(without, device))[0, :, i, c].float().cpu()
                out[kind] = float((full - rest).mean()) * std
    finally:
        model.train(was_training)
    return out


def claim_rows(report) -> list[dict]:
    """Every claim the checker found, in text order: who wrote it ("by": "model" | "program"), its text, and
    "holds": true | false | null, null for a clause of a checkable shape it could not parse ("verdict":
    "unparsed") and for a claim the data cannot settle ("verdict": "unchecked")."""
    verdicts = [(x, "holds" if x.holds else "fails") for x in report.claims]
    verdicts += [(x, "unchecked") for x in report.unchecked] + [(x, "unparsed") for x in report.unparsed]
    return [{"by": x.by, "text": x.text, "holds": x.holds, "verdict": verdict, "kind": x.kind,
             "quantity": x.quantity, "stated": x.stated, "actual": x.actual}
            for x, verdict in sorted(verdicts, key=lambda pair: pair[0].span)]


def tally(claims: list[dict], by: str) -> dict:
    """The claims written by `by`: checked (holds true or false), how many hold and their share, unparsed, and the
    share of the checkable ones (checked + unparsed) left unparsed."""
    mine = [c for c in claims if c["by"] == by]
    checked = [c["holds"] for c in mine if c["holds"] is not None]
    unparsed = sum(c["verdict"] == "unparsed" for c in mine)
    share = lambda k, n: k / n if n else None  # noqa: E731
    return {"checked": len(checked), "hold": sum(checked), "hold_share": share(sum(checked), len(checked)),
            "unparsed": unparsed, "unparsed_share": share(unparsed, len(checked) + unparsed)}


def generate_rationale(model, prep, node: int, start: int, prompt: str, max_new_tokens: int = 256,
                       fill=lambda name, written: None,
                       opening: list[tuple[str, bool]] = (),
                       allowed: dict[str, str] | None = None) -> tuple[list[tuple[str, bool]], dict]:
    """Greedy rationale from the node-layout prompt of (node, start); the encoder runs on the whole city batch.
    `fill(slot name, text so far)` writes the fact slots the model writes (`generate_with_facts`). `opening`:
    training segments (`opening_segments`: stages 1-3) the program feeds after the prompt, tokenized as training
    did, before the model writes; they are the program's text in the result. `allowed`: the slot names the model
    may write after it (`stage4_slot_names`: this window's factors, {conclusion}, {forecast}). Returns the segments
    [(text, written_by_program)] and generation counts and timing."""
    import torch

    from stllm.distill.node_layout import explain_adapter, generate_with_facts, node_inputs, slot_vectors
    device = next(model.parameters()).device
    batch = batch_to(prep.batch(np.array([start])), device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), explain_adapter(model):
        his, pre, base = slot_vectors(model, batch)                   # [1, N, m, d_llm], [1, N, d_llm], ...
        inputs = node_inputs(model, his, pre, [(0, node)], [prompt], [list(opening)] if opening else None,
                             base=base)
        if opening:                                                   # drop the EOS that ends a training target
            inputs = dataclasses.replace(inputs, embeds=inputs.embeds[:, :-1],
                                         attention_mask=inputs.attention_mask[:, :-1], labels=None)
        segments, counts = generate_with_facts(model, inputs, fill, max_new_tokens, allowed)
        shown = [(FACT_SLOT.sub("", t) if not by_program else t, True) for t, by_program in opening]
        segments = [(t, p) for t, p in shown if t] + segments
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return segments, {**counts, "prompt_tokens": int(inputs.embeds.shape[1]), "seconds": round(seconds, 3),
                      "tokens_per_s": round(counts["new_tokens"] / max(seconds, 1e-9), 2)}


def _join(segments: list[tuple[str, bool]], forecast_text: str) -> tuple[str, list[tuple[int, int]]]:
    """The explanation from its segments, FORECAST_SLOT written as `forecast_text`, stripped; and the (start, end)
    spans the program wrote (its segments and the forecast numbers)."""
    pieces = []
    for text, by_program in segments:
        parts = text.split(FORECAST_SLOT)
        for k, part in enumerate(parts):
            pieces += [(forecast_text, True)] if k else []
            pieces.append((part, by_program))
    text, spans = "", []
    for piece, by_program in pieces:
        if by_program:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    lead = len(text) - len(text.lstrip())
    return text.strip(), [(a - lead, b - lead) for a, b in spans]


# -------------------------------------------------------------------------------------------- presenting


def format_explanation(result: dict) -> str:
    """The forecast per step, the explanation and the check summary, as `stllm explain` prints them."""
    unit = f" ({result['unit']})" if result["unit"] else ""
    who = result["node_name"] + ("" if result["node"] == result["node_name"] else f" [{result['node']}]")
    lines = [f"{who}, {result['channel']}{unit}: forecast from {result['at']} "
             f"(mode {result['mode']})", f"{'step':>4}  {'time':16}  {'forecast':>10}  {'truth':>10}"]
    for k, (t, f, y) in enumerate(zip(result["timestamps"], result["forecast"], result["truth"]), 1):
        lines.append(f"{k:>4}  {t:16}  {f:>10.2f}  {'' if y is None else f'{y:.2f}':>10}")
    lines += ["", result["explanation"], "", result["summary"]]
    if "warning" in result:
        lines.append(f"warning: {result['warning']}")
    if "generation" in result:
        g = result["generation"]
        own = result["by_writer"]["model"]
        lines.append(f"claims in the model's own words: {own['checked']}"
                     + ("" if own["hold_share"] is None else f", {own['hold_share']:.2f} of them hold")
                     + f"; {own['unparsed']} not parsed")
        lines.append(f"generated {g['new_tokens']} tokens in {g['seconds']:.2f} s ({g['tokens_per_s']:.1f} tokens/s), "
                     f"{g.get('filled_tokens', 0)} more written by the program")
    return "\n".join(lines)


def plot_explanation(result: dict, path: str | Path) -> Path:
    """History, forecast and (where known) truth of one explained window, as a PNG (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = lambda xs: [np.nan if x is None else x for x in xs]  # noqa: E731
    ht, ft = pd.to_datetime(result["history_timestamps"]), pd.to_datetime(result["timestamps"])
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(ht, nan(result["history"]), color="black", marker=".", lw=1.2, label="history")
    ax.plot(ft, result["forecast"], color="tab:blue", marker=".", lw=1.5, label="forecast (regression head)")
    if any(y is not None for y in result["truth"]):
        ax.plot(ft, nan(result["truth"]), color="gray", ls="--", marker=".", lw=1, label="truth")
    ax.axvline(ft[0], color="tab:blue", alpha=0.3, lw=1)
    faith = result["faithfulness"]
    ax.set_title(f"{result['node_name']}: {result['channel']} from {result['at']} ({result['mode']}, "
                 f"faithfulness {'n/a' if faith is None else f'{faith:.2f}'})", fontsize=10)
    ax.set_ylabel(f"{result['channel']} ({result['unit']})" if result["unit"] else result["channel"])
    ax.legend(fontsize=8, loc="best")
    from stllm.plots import save_figure
    return save_figure(fig, path)
