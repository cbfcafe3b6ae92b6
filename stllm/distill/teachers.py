"""Rationales: the node-layout prompt, the five-stage rationale, and the teachers that write them.

A rationale has five stages: (1) the question; (2) how the drivers evolve (weather, calendar); (3) the key facts
of the recent data; (4) each factor's push up or down; (5) the conclusion, ending with the forecast numbers.
The numbers of the forecast are never written by a language model: every rationale holds the placeholder
FORECAST_SLOT ("{forecast}"), which the program fills (the true future for distillation targets, the regression
head's numbers at inference; see `fill_forecast`).

Fact slots (`render_rationale(..., fact_slots=True)`, the student's training form): the same rationale with every
sentence or phrase that states computed numbers replaced by a named slot, e.g. "3. Recent data: {recent}". A
student learns to write the slot names and the words between them; the program writes each slot's text from the
data (`fill_facts`, at training time into the context, at generation time as soon as the slot is written, see
`stllm.distill.node_layout.generate_with_facts`). Slots: {question} (stage 1), {drivers} (stage 2), {recent}
(stage 3); in stage 4 one slot per factor: {trend} ("PM2.5 fell over the last 12 hours"), {hours:yesterday} /
{hours:last_week} (the mean of the same hours one period earlier against the latest reading), {neighbours} (their
average direction), {weather:<name>} (the change of that weather variable and its typical effect); and
{conclusion} (how the pushes stated in stage 4 balance toward the direction of the forecast being explained,
and that direction). What the student words itself: which factors it names and the way each pushes ("..., which
pushes down"); the checker tests each push against its factor like any other claim. ({effect:<name>}, the effect
alone, is still filled for students trained before {weather:...}.)

The sentences written here are the phrasings `stllm.distill.checker` knows how to find and test.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

import pandas as pd

from stllm.data.city import CityData
from stllm.distill.facts import (NOTE_DURING, Effect, Facts, FutureFacts, compute_facts, forecast_direction,
                                 future_facts, interval_text, note_quote)
from stllm.prompts import PromptTemplate

FORECAST_SLOT = "{forecast}"
FACT_SLOT = re.compile(r"\{(question|drivers|recent|conclusion|trend|neighbours|hours:(?:yesterday|last_week)"
                       r"|(?:effect|weather):[\w.\- ]+|note:[^{}\n]+)\}")
QUESTION = "What will {channel} be at {node} over the next {horizon} (from {start} to {end}), and why?"


@dataclass
class Rationale:
    """A teacher's rationale for one window. `text` holds FORECAST_SLOT where the forecast numbers go;
    `target` [t_out] is the true future (None where missing); `prompt` is the student's node-layout prompt."""
    text: str
    teacher_name: str
    facts: dict
    prompt: str
    target: list = field(default_factory=list)

    def filled(self, values=None) -> str:
        """The text with its fact slots written out and FORECAST_SLOT replaced by `values` (default: the true
        future)."""
        values = self.target if values is None else values
        text = self.text
        if FACT_SLOT.search(text):
            text = "".join(t for t, _ in fill_facts(text, Facts.from_dict(self.facts), values))
        return fill_forecast(text, values)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- numbers


def fmt(x: float) -> str:
    """One decimal, no negative zero: the precision every number of a rationale is written with."""
    out = f"{x:.1f}"
    return "0.0" if out == "-0.0" else out


def fmt_signed(x: float) -> str:
    """"+1.2", "-0.5", "0.0"."""
    out = fmt(x)
    return out if out.startswith("-") or out == "0.0" else f"+{out}"


def fmt_pct(p: float) -> str:
    out = f"{p:+.0f}%"
    return "0%" if out in ("+0%", "-0%") else out


def format_forecast(values) -> str:
    """[t_out] numbers -> "[45.1, 47.3, NA, ...]" (the form the checker reads back)."""
    return "[" + ", ".join("NA" if v is None or v != v else fmt(float(v)) for v in values) + "]"


def fill_forecast(text: str, values) -> str:
    return text.replace(FORECAST_SLOT, format_forecast(values))


def _unit(facts: Facts) -> str:
    """Unit suffix for the target's numbers; bare counts go without."""
    return "" if facts.unit in ("", "count") else f" {facts.unit}"


def _hm(ts: str) -> str:
    return ts[-5:]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


# ------------------------------------------------------------------------------------------- prompt side


def question(facts: Facts) -> str:
    return QUESTION.format(channel=facts.channel, node=facts.node_name, horizon=horizon_text(facts),
                           start=facts.calendar.target_start, end=facts.calendar.target_end)


def horizon_text(facts: Facts) -> str:
    """The forecast horizon in words, e.g. "12 hours"."""
    return interval_text(pd.Timedelta(facts.interval), facts.t_out)


def history_text(facts: Facts) -> str:
    """The history window in words, e.g. "12 hours"."""
    return interval_text(pd.Timedelta(facts.interval), facts.t_in)


def render_node_prompt(facts: Facts, template: str = "node") -> str:
    """The node-layout instruction (prompts/node.txt) for one window: context, recent numbers, <ST_HIS>,
    neighbours, weather, <ST_PRE> and the question. Uses only facts from before the window start."""
    cal = facts.calendar
    nb = facts.neighbours
    if nb is None:
        neighbours = "none"
    else:
        where = [f"{n} ({fmt(d)} km)" if nb.distance_unit == "km" else n for n, d in zip(nb.names, nb.distances)]
        change = "unknown" if nb.mean_change is None else fmt_signed(nb.mean_change)
        neighbours = f"{', '.join(where)}; mean change over these hours {change}"
    weather = [f"{w.label} {fmt(w.first)} to {fmt(w.last)} {w.unit}".rstrip() for w in facts.weather]
    if facts.wind is not None:
        weather.append(f"wind from {facts.wind.first} to {facts.wind.last}")
    return PromptTemplate.load(template).render(
        city=facts.city, domain=facts.domain or "sensor data", node_name=facts.node_name,
        description=_sentence(facts.description) if facts.description else "No description.",
        channel=facts.channel, unit=facts.unit or "no unit", interval=facts.interval, t_in=facts.t_in,
        history_start=cal.history_start, history_end=cal.history_end,
        calendar=f"{cal.weekday}, {'weekend' if cal.is_weekend else 'weekday'}",
        history=", ".join("NA" if v is None else fmt(v) for v in facts.history),
        neighbours=neighbours, weather="; ".join(weather) if weather else "not recorded", question=question(facts))


# ---------------------------------------------------------------------------------------- rationale side


def _change_clause(direction: str, change: float, first: float, last: float, unit: str,
                   pct: float | None = None) -> str:
    """"rose by 12.3 ug/m3 (+41%), from 30.2 to 42.5 ug/m3" / "fell by ..." / "held steady, from ... (+2%)"."""
    pct_text = "" if pct is None else f" ({fmt_pct(pct)})"
    span = f"from {fmt(first)} to {fmt(last)}{unit}"
    if direction == "flat":
        return f"held steady, {span}{pct_text}"
    verb = "rose" if direction == "up" else "fell"
    return f"{verb} by {fmt(abs(change))}{unit}{pct_text}, {span}"


def drivers_text(facts: Facts) -> str:
    """Stage 2: calendar, then the change of each weather variable and of the wind direction."""
    cal = facts.calendar
    parts = [f"The forecast starts on a {cal.weekday} ({'weekend' if cal.is_weekend else 'weekday'}) "
             f"at {_hm(cal.target_start)}."]
    clauses = [f"{w.label} {_change_clause(w.direction, w.change, w.first, w.last, f' {w.unit}' * bool(w.unit))}"
               for w in facts.weather]
    if facts.wind is not None:
        clauses.append(f"the wind kept blowing from the {facts.wind.last}" if facts.wind.steady
                       else f"the wind turned from {facts.wind.first} to {facts.wind.last}")
    parts.append(f"Over the last {history_text(facts)}: {'; '.join(clauses)}." if clauses
                 else "No weather data is recorded.")
    parts += [_note_sentence(facts, n) for n in facts.notes]
    return " ".join(parts)


def _note_sentence(facts: Facts, note) -> str:
    """'A parade note holds at Midtown Center during the forecast: "Thousands march up Fifth Avenue".'"""
    during = NOTE_DURING[note.during]
    return f'A {note.kind} note holds at {facts.node_name} during {during}: "{note_quote(note.text)}".'


def recent_text(facts: Facts) -> str:
    """Stage 3: trend, latest reading, same hour yesterday / last week, neighbours."""
    u, out = _unit(facts), []
    span = history_text(facts)
    tr = facts.trend
    if tr is None:
        out.append(f"There are too few readings in the last {span} to describe a trend.")
    else:
        out.append(f"Over the last {span}, {facts.channel} "
                   f"{_change_clause(tr.direction, tr.change, tr.first, tr.last, u, tr.percent)}.")
    if facts.last_value is not None:
        out.append(f"The latest reading is {fmt(facts.last_value)}{u} at {_hm(facts.last_time)}.")
    comparisons = []
    for p in (facts.yesterday, facts.last_week):
        if p is None or p.reference is None:
            continue
        when = f"at the same hour {p.label} ({fmt(p.reference)})"
        if p.relation == "same":
            comparisons.append(f"about the same as {when}")
        else:
            pct = "" if p.percent is None else f" ({fmt_pct(p.percent)})"
            comparisons.append(f"{fmt(abs(p.diff))}{u}{pct} {p.relation} than {when}")
    if comparisons:
        out.append(f"It is {' and '.join(comparisons)}.")
    nb = facts.neighbours
    if nb is not None and nb.mean_change is not None:
        pct = "" if nb.mean_percent is None else f" ({fmt_pct(nb.mean_percent)})"
        if nb.direction == "flat":
            move = f"held steady on average ({fmt_signed(nb.mean_change)})"
        else:
            move = f"{'rose' if nb.direction == 'up' else 'fell'} by {fmt(abs(nb.mean_change))}{u} on average{pct}"
        out.append(f"The {len(nb.names)} nearest sensors ({', '.join(nb.names)}) {move}.")
    return " ".join(out)


def _hours_phrase(facts: Facts, kind: str) -> str:
    """"the same hours yesterday averaged 46.9 ug/m3, above the latest reading" ("" when unknown)."""
    p = facts.yesterday if kind == "yesterday" else facts.last_week
    if p is None or p.ahead_mean is None or p.ahead_relation is None:
        return ""
    relation = {"above": "above", "below": "below"}.get(p.ahead_relation, "about the same as")
    return f"the same hours {p.label} averaged {fmt(p.ahead_mean)}{_unit(facts)}, {relation} the latest reading"


def _effect_phrase(facts: Facts, name: str) -> str:
    """"(a change of +1.1 m/s usually moves PM2.5 by -22.0 over the next 12 hours)" ("" when unknown)."""
    w = next((w for w in facts.weather if w.name == name), None)
    if w is None or w.effect is None:
        return ""
    unit = f" {w.unit}" if w.unit else ""
    return (f"(a change of {fmt_signed(w.change)}{unit} usually moves {facts.channel} by {fmt_signed(w.effect)} "
            f"over the next {horizon_text(facts)})")


def _moved(direction: str) -> str:
    """"rose" / "fell" / "held steady" for a direction up / down / flat."""
    return {"up": "rose", "down": "fell"}.get(direction, "held steady")


def _trend_phrase(facts: Facts) -> str:
    """"PM2.5 rose over the last 12 hours" ("" when there is no trend)."""
    if facts.trend is None:
        return ""
    return f"{facts.channel} {_moved(facts.trend.direction)} over the last {history_text(facts)}"


def _neighbours_phrase(facts: Facts) -> str:
    """"the nearest sensors fell on average" ("" without neighbours)."""
    nb = facts.neighbours
    if nb is None or nb.mean_change is None:
        return ""
    return f"the nearest sensors {_moved(nb.direction)} on average"


def _weather_phrase(facts: Facts, name: str) -> str:
    """"wind speed rose (a change of +1.1 m/s usually moves PM2.5 by -22.0 ...)" ("" when unknown)."""
    w = next((w for w in facts.weather if w.name == name), None)
    if w is None:
        return ""
    return f"{w.label} {_moved(w.direction)} {_effect_phrase(facts, name)}".strip()   # the direction of stage 2


def _note_phrase(facts: Facts, kind: str) -> str:
    """"the parade note moves the forecast by +12.3 trips on average" ("" when no note of that kind moved it): what
    the notes of that kind did together (`stllm.explain.note_effects`)."""
    note = next((n for n in facts.notes if n.kind == kind and n.effect is not None), None)
    if note is None:
        return ""
    return f"the {kind} note moves the forecast by {fmt_signed(note.effect)}{_unit(facts)} on average"


def _factor_phrase(facts: Facts, kind: str, name: str, slots: bool = False) -> str:
    """One factor of stage 4, its subject and direction first ("wind speed rose ..."), before the push the student
    words itself. slots=True: the fact slot the program fills with that phrase."""
    if kind in ("trend", "neighbours"):
        return f"{{{kind}}}" if slots else _trend_phrase(facts) if kind == "trend" else _neighbours_phrase(facts)
    if kind in ("yesterday", "last_week"):
        return f"{{hours:{kind}}}" if slots else _hours_phrase(facts, kind)
    if kind == "note":
        which = name[len("the "):-len(" note")]                       # the factor is named "the <kind> note"
        return f"{{note:{which}}}" if slots else _note_phrase(facts, which)
    w = next(w for w in facts.weather if w.label == name)
    return f"{{weather:{w.name}}}" if slots else _weather_phrase(facts, w.name)


def factors_text(facts: Facts, slots: bool = False) -> str:
    """Stage 4: each factor, then its push ("..., which pushes up"). slots=True: each factor is a fact slot
    ({trend}, {hours:...}, {neighbours}, {weather:...}) for the program to fill; the student writes which factors
    and their pushes."""
    items = [f"{_factor_phrase(facts, f.kind, f.name, slots)}, which pushes {f.push}" for f in facts.factors]
    return "; ".join(items) + "." if items else "No factor in the data pushes clearly up or down."


STATED_PUSH = re.compile(r"\bpushes (up|down)\b")


def balance_text(direction: str | None, pushes) -> str:
    """How the stated pushes (a set of "up" / "down") balance toward the forecast's `direction`: the first
    sentence of stage 5, written by the program from the forecast it concludes ("" for no direction)."""
    if direction in ("up", "down"):
        other = "down" if direction == "up" else "up"
        return (f"The {direction}ward pushes outweigh the {other}ward ones." if direction in pushes
                else f"The move {direction} comes from influences outside these facts.")
    return "These pushes roughly cancel out." if direction == "flat" and pushes else ""


def conclusion_text(facts: Facts, direction: str | None) -> str:
    verb = {"up": "rise", "down": "fall", "flat": "stay about level"}.get(direction)
    if verb is None:
        return f"The forecast for {facts.channel} at {facts.node_name} follows."
    return f"{facts.channel} at {facts.node_name} is expected to {verb} over the next {horizon_text(facts)}."


def _conclusion(facts: Facts, direction: str | None, pushes=None) -> str:
    """Stage 5 before the numbers: the balance of `pushes` (default: the facts' own factors) and the direction."""
    pushes = {f.push for f in facts.factors} if pushes is None else pushes
    return " ".join(t for t in (balance_text(direction, pushes), _sentence(conclusion_text(facts, direction))) if t)


def render_rationale(facts: Facts, forecast_values=None, template: str = "rationale", fill: bool = True,
                     fact_slots: bool = False) -> str:
    """The five-stage rationale (prompts/rationale.txt) for `facts`, concluding in the direction of
    `forecast_values` [t_out] (mean against the last observed value). With fill=False, or without values, the
    FORECAST_SLOT stays in the text for the program to fill. fact_slots=True: the computed facts stay fact slots
    too (the student's training form, see the module docstring); `fill_facts` turns them back into this text."""
    direction = None if forecast_values is None else forecast_direction(facts.last_value, forecast_values)
    slot = format_forecast(forecast_values) if fill and forecast_values is not None else FORECAST_SLOT
    if fact_slots:
        asked, drivers, recent, conclusion = "{question}", "{drivers}", "{recent}", "{conclusion}"
    else:
        asked, drivers, recent = question(facts), drivers_text(facts), recent_text(facts)
        conclusion = _conclusion(facts, direction)
    return PromptTemplate.load(template).render(
        question=asked, drivers=drivers, recent=recent, factors=factors_text(facts, fact_slots),
        conclusion=conclusion, horizon=horizon_text(facts), unit=facts.unit or "no unit", forecast=slot)


def fact_text(facts: Facts, slot: str, direction: str | None, written: str | None = None) -> str | None:
    """The text the program writes for one fact slot name (FACT_SLOT), "" when the data cannot say it, None for a
    name that is not a fact slot. `direction`: of the forecast being explained, and `written`: the rationale so
    far, for {conclusion}: how the pushes stated in `written` ("which pushes up") balance toward `direction`
    (without `written`: the pushes of the facts' own factors, as the teacher states them)."""
    if slot == "question":
        return question(facts)
    if slot == "drivers":
        return drivers_text(facts)
    if slot == "recent":
        return recent_text(facts)
    if slot == "conclusion":
        return _conclusion(facts, direction, None if written is None else set(STATED_PUSH.findall(written)))
    if slot == "trend":
        return _trend_phrase(facts)
    if slot == "neighbours":
        return _neighbours_phrase(facts)
    kind, _, name = slot.partition(":")
    if kind == "hours" and name in ("yesterday", "last_week"):
        return _hours_phrase(facts, name)
    if kind == "weather" and name:
        return _weather_phrase(facts, name)
    if kind == "note" and name:
        return _note_phrase(facts, name)
    if kind == "effect" and name:            # students trained before {weather:...} write "wind speed rose {effect:..}"
        return _effect_phrase(facts, name)
    return None


def fill_facts(text: str, facts: Facts, forecast_values=None, keep_slots: bool = False) -> list[tuple[str, bool]]:
    """Split a rationale with fact slots into segments [(text, written_by_program)]: the words around the slots
    (False) and each slot's text from `fact_text` (True). Joining the segments gives the plain rationale
    (render_rationale with fact_slots=False). keep_slots=True: each slot name stays at the end of the words
    before it: the student's training target, which writes the name and reads the program's text after it."""
    direction = None if forecast_values is None else forecast_direction(facts.last_value, forecast_values)
    out, pos = [], 0
    for m in FACT_SLOT.finditer(text):
        words = text[pos:m.end() if keep_slots else m.start()]
        out += [(words, False), (fact_text(facts, m.group(1), direction, text[:m.start()]) or "", True)]
        pos = m.end()
    out.append((text[pos:], False))
    return [(t, by_program) for t, by_program in out if t]


def opening_segments(facts: Facts, template: str = "rationale") -> list[tuple[str, bool]]:
    """Stages 1-3 of the slotted rationale, which hold no choice of the student (the stage headings and the
    {question}, {drivers}, {recent} slots), as the training segments of `fill_facts(..., keep_slots=True)`: at
    explain time the program feeds them before the student writes stage 4, exactly as training showed them.
    [] when the template has no "4." stage after these slots."""
    text = render_rationale(facts, template=template, fill=False, fact_slots=True)
    cut = text.find("\n4.")
    if cut < 0 or "{recent}" not in text[:cut]:
        return []
    return fill_facts(text[:cut], facts, keep_slots=True)


def stage4_slot_names(facts: Facts) -> dict[str, str]:
    """The slot names a student may write after the opening, each with the text that must come right before it:
    this window's factors (as the teacher names them; anywhere), {conclusion} (after "Conclusion: ") and
    {forecast} (after "): ", as in "... (ug/m3): {forecast}")."""
    names = {_factor_phrase(facts, f.kind, f.name, slots=True)[1:-1]: "" for f in facts.factors}
    return {**names, "conclusion": "Conclusion: ", FORECAST_SLOT[1:-1]: "): "}


class TeacherError(RuntimeError):
    """A teacher could not produce a rationale (endpoint unreachable, missing key, bad reply)."""


class Teacher:
    """Writes a rationale for a window knowing its true future (label-constrained). Subclasses implement `write`."""

    name = "teacher"

    def explain(self, city: CityData, node, start, t_in: int = 12, t_out: int = 12, channel: str | int = 0,
                effects: dict[str, dict[str, Effect]] | None = None) -> Rationale:
        facts = compute_facts(city, node, start, t_in=t_in, t_out=t_out, effects=effects, channel=channel)
        future = future_facts(city, node, start, t_out=t_out, t_in=t_in, channel=channel)
        text = self.write(facts, future).strip()
        if FORECAST_SLOT not in text:                  # the numbers must come from the program, always
            text += f"\nForecast for the next {horizon_text(facts)} ({facts.unit or 'no unit'}): {FORECAST_SLOT}"
        return Rationale(text=text, teacher_name=self.name, facts=facts.to_dict(), prompt=render_node_prompt(facts),
                         target=list(future.values))

    def write(self, facts: Facts, future: FutureFacts) -> str:
        raise NotImplementedError


class AnalyticTeacher(Teacher):
    """Deterministic: states only facts computed from the data, and concludes in the true future's direction.
    fact_slots=True: writes the facts as fact slots (the student's training form, see the module docstring)."""

    name = "analytic"

    def __init__(self, fact_slots: bool = False):
        self.fact_slots = fact_slots

    def write(self, facts: Facts, future: FutureFacts) -> str:
        return render_rationale(facts, future.values, fill=False, fact_slots=self.fact_slots)


TEACHER_SYSTEM = (
    "You explain a forecast to a city analyst. Write exactly five short numbered stages:\n"
    "1. Question: restate the question.\n"
    "2. Drivers: how the weather and the calendar evolve.\n"
    "3. Recent data: the key facts of the recent readings, the same hour yesterday and last week, and the nearest "
    "sensors.\n"
    "4. Factors: for each factor, whether it pushes the value up or down.\n"
    "5. Conclusion: the expected direction, then the placeholder {forecast}.\n"
    "Use only the facts given, with their numbers exactly as written. Never write forecast numbers: the program "
    "puts them where you write {forecast}. You are told what really happened next; make the explanation "
    "consistent with it without revealing its numbers."
)


def teacher_messages(facts: Facts, future: FutureFacts) -> list[dict[str, str]]:
    """Chat messages for a language-model teacher: the prompt (without the vector slots), the facts, the truth."""
    prompt = "\n".join(line for line in render_node_prompt(facts).splitlines() if "<ST_" not in line)
    factors = [f"{f.name}: pushes {f.push}" for f in facts.factors] or ["no factor pushes clearly up or down"]
    truth = {"up": "rose", "down": "fell", "flat": "stayed about level"}.get(future.direction, "is unknown")
    if future.direction in ("up", "down") and future.change is not None and facts.last_value:
        size = abs(future.change) / abs(facts.last_value)  # in words only: no future digit to copy
        truth += " slightly" if size < 0.15 else " clearly" if size < 0.5 else " sharply"
    user = (f"{prompt}\n\nFacts computed from the data:\n- {drivers_text(facts)}\n- {recent_text(facts)}\n"
            f"- Factors: {'; '.join(factors)}.\n\nWhat really happened next: over the next {horizon_text(facts)}, "
            f"{facts.channel} {truth} (on average, against the latest reading).")
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": user}]


class HFChatTeacher(Teacher):
    """Any local Hugging Face causal LM with a chat template (greedy unless do_sample=True)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 400, do_sample: bool = False,
                 temperature: float = 0.7, name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature
        self.name = name or f"hf:{getattr(getattr(model, 'config', None), '_name_or_path', '') or type(model).__name__}"

    def write(self, facts: Facts, future: FutureFacts) -> str:
        import torch

        messages = teacher_messages(facts, future)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:                                          # plain causal LM: a simple transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        sampling = {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device),
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      **sampling)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


class OpenAITeacher(Teacher):
    """An OpenAI-compatible `/v1/chat/completions` endpoint, through urllib (no extra dependency).

    url: the server ("http://host:8000"), its "/v1", or the full ".../chat/completions" address. The API key is
    read from the environment variable `api_key_env`; it may be unset only for a local server.
    """

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_tokens: int = 600, temperature: float = 0.0, name: str | None = None):
        self.endpoint = chat_endpoint(url)
        self.model, self.timeout, self.max_tokens, self.temperature = model, timeout, max_tokens, temperature
        self.name = name or f"openai:{model}"
        host = urllib.parse.urlsplit(self.endpoint).hostname or ""
        self.local = host in LOCAL_HOSTS
        self.api_key = os.environ.get(api_key_env) or None
        if self.api_key is None and not self.local:
            raise TeacherError(f"OpenAITeacher: the environment variable {api_key_env} is not set; it must hold the "
                               f"API key for {self.endpoint} (only a localhost server may go without one)")

    def write(self, facts: Facts, future: FutureFacts) -> str:
        return self.complete(teacher_messages(facts, future))

    def complete(self, messages: list[dict[str, str]]) -> str:
        """POST the chat messages; the reply's first choice."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        # a local server is reached directly, whatever proxy the environment names
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if self.local else \
            urllib.request.build_opener()
        try:
            with opener.open(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            raise TeacherError(f"OpenAITeacher: {self.endpoint} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TeacherError(f"OpenAITeacher: cannot reach {self.endpoint} ({reason}); is the server running "
                               "and the URL right?") from err
        except json.JSONDecodeError as err:
            raise TeacherError(f"OpenAITeacher: {self.endpoint} did not answer with JSON ({err})") from err
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise TeacherError(f"OpenAITeacher: unexpected reply from {self.endpoint}: {str(reply)[:300]}") from err


def chat_endpoint(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
