"""Check an explanation against the data: find its checkable claims in free text and test each one.

`check_explanation` splits the text into sentences and clauses and finds claims with regular expressions tied to
the phrasings of `stllm.distill.teachers` and to common free-form ones. Each claim is tested against facts
recomputed from the data (`compute_facts`), never against numbers the text or a teacher supplied; stated
forecast numbers are tested against the forecast given (the regression head's numbers).

Claim kinds (Claim.kind, with Claim.quantity naming what is tested):
  trend               the node's change over the history window: direction | change | percent | from | to | level
                      ("PM2.5 rose by 12.3 (+41%), from 30.2 to 42.5", "fell 20%", "held steady", "the recent rise",
                      "the downward trend")
  last_value          "the latest reading is 42.5"
  vs_yesterday,       the last observed value against the same hour one day / one week earlier:
  vs_last_week        relation | diff | percent | reference ("10.1 higher than at the same hour yesterday (32.4)")
  period_mean         mean of the target hours one day / week earlier: mean | relation
                      ("the same hours yesterday averaged 46.9, above the latest reading")
  neighbours          mean change of the nearest nodes: direction | change | percent ("the nearest sensors rose by 4.2")
  weather             "<variable>.<quantity>" with the trend quantities ("wind speed rose from 1.2 to 3.4 m/s",
                      "the fall in temperature")
  wind_direction      from | to | steady (compass names or words: "the wind turned northerly", "from SW to NW")
  calendar            weekday | day_type ("on a Tuesday", "(weekend)")
  effect              typical effect of a weather change, needs `effects` ("a change of +1.2 m/s usually moves
                      PM2.5 by -3.4"; "a 2 m/s rise in wind speed usually lowers PM2.5 by about 5")
  note                holds ("A parade note holds at Midtown Center during the forecast": a note of that kind names
                      the node then; the note's quoted words are not read) | effect ("the parade note moves the
                      forecast by +12.3": what the note did to the model's forecast, needs `note_effects`; a note
                      that is not there fails)
  push                a factor's push on the forecast, stated after it in the same ';'-item ("wind speed rose (a
                      change of +1.1 m/s usually moves PM2.5 by -22.0 ...), which pushes down"): quantity names the
                      factor (effect.<variable> | period_mean.<period> | neighbours | trend | note); it holds when the
                      push is the factor's own (the sign of the effect, above / below the latest reading, the
                      direction of the neighbours or of the trend); a weather change without an effect is unchecked
  forecast_numbers    a bracketed list or a single number stated as the forecast: values | value
  forecast_direction  "is expected to rise": the forecast's mean against the last observed value; so is how the
                      pushes balance ("the upward pushes outweigh the downward ones" states a rise, "these pushes
                      roughly cancel out" a level forecast, "the move down comes from influences outside ..." a fall)

Who wrote a claim (Claim.by): "program" when its text lies wholly inside a span the program wrote (`program=`:
filled fact slots, the forecast numbers), else "model". Unparsed (Report.unparsed, holds None): a clause with a
checkable shape -- a number written with a decimal point or a percent sign, a past change ("rose", "fell",
"held steady") or a push ("pushes up") -- in which no claim was found there; counted, never dropped. Node ids are
not numbers: a numeric id or name of the city's nodes that names a node ("at 773869", "sensor 773869", a list
"(773869, 767541)") is hidden from the number patterns, so a question "What will speed be at 773869 ...?" states
no forecast value.

Numbers hold when |stated - actual| <= half a unit of the stated last digit + tolerance * |actual|; forecast
numbers get no relative tolerance (they must equal the head's numbers up to rounding). Directions hold by sign
("rose" needs a positive change), "held steady" by the FLAT_TOL rule of `stllm.distill.facts`, compass names
within WIND_TOL_DEG. Claims about things the data cannot settle (a missing value, no forecast or effects given)
are reported as unchecked and left out of `faithfulness`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from stllm.data.city import CityData
from stllm.distill.facts import (COMPASS16, NOTE_DURING, WEEKDAYS, WIND_STEADY_DEG, Effect, Facts, angle_diff,
                                 compute_facts, forecast_direction, note_quote, percent, resolve_window, step_time)

WIND_TOL_DEG = 33.75          # a compass name holds within half a 16-point sector plus one more sector
DEFAULT_TOLERANCE = 0.05      # relative slack on stated data numbers (beyond rounding)

# ---------------------------------------------------------------------------------------------- patterns

_NUM = r"(?<![\w.:/])(?<!\d-)[+\-−]?\d+(?:,\d{3})*(?:\.\d+)?(?![\w:/]|\.\d|-\d)"


def _num(name: str) -> str:
    return rf"(?P<{name}>{_NUM})"


_UNITS = r"(?:µg/m³|μg/m³|µg/m3|μg/m3|ug/m3|ug/m³|mg/m3|km/h|m/s|mph|hPa|mm/h|mm|°C|deg\s?C|degrees\s?C|°|" \
         r"degrees|veh/h|vehicles|trips|counts?|km|%)"
_UNIT = rf"(?:\s*{_UNITS}(?![\w/]))?"
_ABOUT = r"(?:(?:about|around|roughly|approximately|nearly|some|almost)\s+|~\s*)?"
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
_BOUNDARY = re.compile(r"[;:](?=\s)|\s(?:while|whereas|but|although|though|and|as|which|because|so)\s|\s-\s|\s—\s")

_UP = r"rose|risen|increased|climbed|grew|grown|jumped|went\s+up|gone\s+up|picked\s+up|strengthened|warmed|" \
      r"rising|increasing|climbing|growing|jumping|picking\s+up|strengthening|warming"
_DOWN = r"fell|fallen|dropped|decreased|declined|eased|sank|sunk|dipped|went\s+down|gone\s+down|weakened|cooled|" \
        r"slowed|falling|dropping|decreasing|declining|easing|sinking|dipping|weakening|cooling|slowing"
_STEADY = r"(?:flat|stable|steady|level|unchanged|constant|(?:about|roughly|much)\s+the\s+same)"
_FLAT = rf"held\s+(?:steady|flat|level|stable)|(?:stayed|remained|was|were|kept|been)\s+{_STEADY}|" \
        r"barely\s+changed|hardly\s+changed|changed\s+little|little\s+changed|did\s+not\s+change|didn't\s+change"
_BUP = r"rise|increase|climb|grow|go\s+up|pick\s+up"
_BDOWN = r"fall|drop|decrease|decline|ease|go\s+down"
_BFLAT = rf"(?:stay|remain|hold)\s+{_ABOUT}{_STEADY}|hold\s+steady|level\s+off"
_VERB = re.compile(rf"\b(?:(?P<up>{_UP})|(?P<down>{_DOWN})|(?P<flat>{_FLAT})|(?P<bup>{_BUP})|(?P<bdown>{_BDOWN})|"
                   rf"(?P<bflat>{_BFLAT}))\b", re.I)
_FUTURE = re.compile(r"(?:\b(?:will|would|should|could|may|might|shall)\b|\b(?:expected|likely|set|going|forecast|"
                     r"predicted|projected|poised|bound|about)\s+to\b)(?:\s+\w+){0,2}\s*$", re.I)
_FORECAST_SUBJECT = re.compile(r"\b(?:forecast|prediction|outlook|projection)s?\b", re.I)
_GENERIC = re.compile(r"\b(?:usually|typically|normally|generally|often|tends?\s+to)\b", re.I)
_PERIOD_WORDS = re.compile(r"\b(?:yesterday|last\s+week|(?:a|one)\s+(?:day|week)\s+(?:earlier|before|ago)|"
                           r"previous\s+(?:day|week))\b", re.I)
_NEIGHBOUR = re.compile(r"\b(?:neighbou?r(?:s|ing|hood)?|nearby|nearest|surrounding|adjacent|other\s+(?:sensors|"
                        r"stations))\b", re.I)
_TARGET_WORDS = r"values?|readings?|levels?|concentrations?|counts?|it|this\s+sensor|the\s+sensor|the\s+station"
_WEATHER_WORDS = {"temperature": r"(?:air\s+)?temperatures?|temps?", "dew_point": r"dew[\s-]?points?",
                  "pressure": r"(?:air\s+|barometric\s+|atmospheric\s+)?pressure",
                  "rain": r"rain(?:fall)?|precipitation", "wind_speed": r"wind\s+speeds?|winds?",
                  "humidity": r"(?:relative\s+)?humidity"}
_WIND_DIRECTION_SUBJECT = re.compile(r"\bwind\s+direction\b", re.I)
_NODE_WORDS = r"at|sensors?|nodes?|stations?|detectors?|sites?|zones?|regions?|counters?|locations?"

_PERIODS = r"yesterday|(?:a|one)\s+day\s+(?:earlier|before|ago)|the\s+previous\s+day|the\s+day\s+before|" \
           r"last\s+week|(?:a|one)\s+week\s+(?:earlier|before|ago)|the\s+previous\s+week"
_WHEN = rf"(?:(?:at|on|in|for|with)\s+)?(?:the\s+)?(?:(?:same\s+(?:hour|time)|value|reading|level)\s+)?" \
        rf"(?:(?:of|on|at)\s+)?(?P<per>{_PERIODS})(?:'s)?(?:\s+\w+)?(?:\s*\((?P<ref>{_NUM})[^)]*\))?"
_COMPARE = re.compile(
    rf"(?:{_num('diff')}(?P<dpct>\s*%)?{_UNIT}\s*(?:\(\s*{_num('pct')}\s*%\s*\)\s*)?)?"
    rf"(?:(?P<cmp>higher|lower|greater|smaller)\s+than|(?P<cmp3>above|below)|(?P<cmp2>up|down)\s+(?:on|from)|"
    rf"(?P<same>(?:about|roughly|nearly|almost|much)\s+the\s+same\s+as|similar\s+to|in\s+line\s+with|close\s+to))"
    rf"\s+{_WHEN}", re.I)
_AHEAD = re.compile(rf"\baverag(?:ed|es|e\s+of|ing)\s+{_ABOUT}{_num('mean')}{_UNIT}"
                    rf"(?:,?\s+(?P<rel>above|below|higher\s+than|lower\s+than|close\s+to|about\s+the\s+same\s+as|"
                    rf"in\s+line\s+with)\s+the\s+(?:latest|last|current|most\s+recent)\s+(?:reading|value|level))?",
                    re.I)
_AHEAD_CONTEXT = re.compile(r"\bsame\s+(?:\d+\s+)?(?:hours?|period|time\s+window|window)\b|"
                            r"\b(?:following|next)\s+\d+\s+\w+", re.I)
_LAST = re.compile(rf"\b(?:latest|last|most\s+recent|current)\s+(?:reading|value|observation|measurement|level)\s+"
                   rf"(?:(?:is|was|of|at|stands\s+at|stood\s+at|=|:)\s*)?{_ABOUT}{_num('v')}", re.I)
_WEEKDAY = re.compile(r"\b(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)\b")
_DAYTYPE = re.compile(r"(?:\b(?:a|the|this)\s+|\()(?P<t>weekend|weekday)\b", re.I)
_RECENT = re.compile(r"\brecent\s+(?P<noun>rise|increase|climb|jump|upturn|fall|drop|decline|decrease|dip|downturn)"
                     r"\b(?!\s+(?:in|of|at)\b)", re.I)
_TREND = re.compile(r"\b(?P<adj>upward|downward|rising|falling|increasing|decreasing|declining)\s+trend\b"
                    r"(?!\s+(?:in|of)\b)", re.I)             # "the downward trend means ...": the series' own
_NOUN_UP = {"rise", "increase", "climb", "jump", "upturn"}
_ADJ_UP = {"rising", "increasing", "climbing", "growing", "strengthening", "warming"}
_ADJ = re.compile(r"\b(?P<adj>rising|increasing|climbing|growing|strengthening|warming|falling|dropping|decreasing|"
                  r"declining|easing|weakening|cooling|slowing)\s+(?P<what>[\w .-]{1,40})", re.I)
_BALANCE = re.compile(r"\bthe (?P<up>up|down)wards? (?:pushes|factors|influences) outweigh\b"
                      r"|\bthe move (?P<move>up|down) comes from\b|\bpushes roughly cancel(?: each other)? out\b", re.I)
_PUSH = re.compile(r"\b(?:push(?:es|ing)?|drives?|driving)\s+(?:[\w.]+\s+){0,2}?(?P<p>up|down)(?:wards?)?\b", re.I)
_NOTE_DURING = {words: during for during, words in NOTE_DURING.items()}   # "the forecast" -> "forecast"
_NOTE_HOLDS = re.compile(r"\b(?:a|an|the)\s+(?P<kind>[^.;\"]{1,60}?)\s+note\s+holds\s+"
                         r"(?:at\s+(?P<where>[^;\"]{1,80}?)\s+)?during\s+(?P<during>the\s+last\s+hours\s+and\s+"
                         r"the\s+forecast|the\s+forecast|the\s+last\s+hours)", re.I)
_NOTE_EFFECT = re.compile(rf"\b(?:a|an|the)\s+(?P<kind>[^.;\"]{{1,60}}?)\s+notes?\s+moves?\s+the\s+forecast\s+by\s+"
                          rf"{_num('eff')}{_UNIT}", re.I)
_QUOTED = re.compile(r'"[^"\n]*"')
_FORECAST_CONTEXT = re.compile(r"\b(?:forecast|predict\w*|expect\w*|outlook|projection|next\s+\d+)", re.I)
_LIST = re.compile(r"\[(?P<body>[^\]]*)\]")
_SINGLE = re.compile(rf"\b(?:forecasts?|expect(?:s|ed)?|predict(?:s|ed)?|project(?:s|ed)?|will|should|likely)\b"
                     rf"(?:[^.;:\[\]]|\.(?=\d)){{0,40}}?\b(?P<how>be|reach|average|averaging|peak\s+at|"
                     rf"bottom\s+out\s+at|stay\s+(?:at|near|around)|hover\s+(?:around|near)|rise\s+to|fall\s+to|drop\s+to|climb\s+to|"
                     rf"ease\s+to|of|at|around|about|near)\s+{_ABOUT}{_num('v')}", re.I)
_EFFECT = re.compile(
    rf"(?:(?:a|an)\s+{_num('amt')}{_UNIT}\s+(?P<adir>rise|increase|fall|drop|decrease|change)\s+in\s+"
    rf"(?:the\s+)?(?P<var1>[a-z][a-z ]*?)\s+|(?:a|an)\s+(?P<adir2>rise|increase|fall|drop|decrease|change)\s+of\s+"
    rf"{_num('amt2')}{_UNIT}\s+(?:in\s+(?:the\s+)?(?P<var2>[a-z][a-z ]*?)\s+)?)?"
    rf"(?:usually|typically|normally|generally|often|tends\s+to)\s+(?P<verb>moves?|shifts?|changes?|lowers?|"
    rf"raises?|reduces?|increases?|decreases?|cuts?|lifts?|pushes|brings?)\s+(?:\S+\s+){{0,4}}?by\s+{_ABOUT}"
    rf"{_num('eff')}", re.I)
_EFFECT_NEG = {"lower", "reduce", "decrease", "cut"}
_EFFECT_POS = {"raise", "increase", "lift"}

# compass: 16-point abbreviations (upper case only) and words (north-easterly, west, ...)
_DIR_NAMES = {"N": "north", "E": "east", "S": "south", "W": "west"}
_DIR_DEG = {"".join(_DIR_NAMES[ch] for ch in name): 22.5 * k for k, name in enumerate(COMPASS16)}
_DIR = r"(?:(?i:(?:north|south|east|west)(?:[\s-]?(?:north|south|east|west)){0,2}(?:erly|ern)?)|" \
       r"(?:NNE|NE|ENE|ESE|SE|SSE|SSW|SW|WSW|WNW|NW|NNW|N|E|S|W))"
_WIND_FROM_TO = re.compile(rf"\b(?i:from)\s+(?:the\s+)?(?P<a>{_DIR})\s+to\s+(?:the\s+)?(?P<b>{_DIR})\b")
_WIND_STATE = re.compile(
    rf"(?i:\b(?:turned|shifted|veered|backed|swung|switched|moved|changed|came\s+round|became|is\s+now|was\s+now|"
    rf"blowing\s+from|blew\s+from|blows\s+from|comes?\s+from|came\s+from|coming\s+from|"
    rf"(?:winds?\s+)(?:was|were|is|are|stayed|remained|kept))\s+(?:round\s+)?(?:to\s+)?(?:(?:the|a|an)\s+)?)"
    rf"(?P<b>{_DIR})\b|\b(?P<adj>{_DIR})\s+(?i:winds?)\b")


def _float(text: str) -> float:
    return float(text.replace("−", "-").replace(",", ""))


def _half_unit(text: str) -> float:
    """Half a unit of the last written digit: "12.3" -> 0.05, "12" -> 0.5."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** -decimals + 1e-9


def _close(stated: float, stated_text: str, actual: float | None, tolerance: float) -> bool | None:
    if actual is None or not np.isfinite(actual):
        return None
    return abs(stated - actual) <= _half_unit(stated_text) + tolerance * abs(actual)


def _direction_holds(direction: str, change: float | None, is_flat: bool | None) -> bool | None:
    if change is None:
        return None
    if direction == "up":
        return change > 0
    if direction == "down":
        return change < 0
    return bool(is_flat)


def _dir_degrees(text: str) -> float | None:
    if text.isupper():
        return _DIR_DEG.get("".join(_DIR_NAMES[ch] for ch in text))
    word = re.sub(r"[\s-]", "", text.lower())
    word = re.sub(r"(?:erly|ern)$", "", word)
    return _DIR_DEG.get(word)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Claim:
    kind: str                    # see the module docstring
    quantity: str                # what is tested: direction, change, from, to, ...
    text: str                    # the text span the claim was read from
    span: tuple[int, int]        # its (start, end) offsets in the explanation
    stated: float | str
    actual: float | str | None
    holds: bool | None           # None: found but not checkable here (or, kind "unparsed", not parsed)
    by: str = "model"            # who wrote its text: "model" or "program"


@dataclass
class Report:
    claims: list[Claim] = field(default_factory=list)       # checked claims
    unchecked: list[Claim] = field(default_factory=list)    # found, but the data (or inputs) cannot settle them
    unparsed: list[Claim] = field(default_factory=list)     # clauses of a checkable shape in which no claim was found
    faithfulness: float | None = None                       # fraction of checked data claims that hold
    numbers_consistent: bool | None = None                  # stated forecast numbers == forecast (None: no forecast)
    forecast_consistent: bool | None = None                 # ... and the stated forecast direction matches too

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if not c.holds]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        data = [c for c in self.claims if not c.kind.startswith("forecast")]
        head = f"{sum(c.holds for c in data)}/{len(data)} data claims hold"
        if self.faithfulness is not None:
            head += f" (faithfulness {self.faithfulness:.2f})"
        lines = [head + f"; forecast numbers consistent: {self.numbers_consistent}"
                 + (f"; {len(self.unparsed)} clause(s) not parsed" if self.unparsed else "")]
        lines += [f"  FAILS {c.kind}.{c.quantity}: {c.text!r} states {c.stated}, data {c.actual}" for c in self.failed]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ checker


def check_explanation(text: str, city: CityData, node, start, forecast=None, tolerance: float = DEFAULT_TOLERANCE,
                      t_in: int = 12, t_out: int = 12, channel: str | int = 0,
                      effects: dict[str, dict[str, Effect]] | None = None,
                      program: Sequence[tuple[int, int]] = (), note_effects: dict[str, float] | None = None) -> Report:
    """Find and test the checkable claims of `text`, an explanation of node `node` (id, name or position) for
    the window starting at `start` (index or timestamp of the first target step). `forecast` [t_out]: the
    numbers the explanation must state (the regression head's); `effects`: from `estimate_effects`, to test
    effect claims; `program`: the (start, end) spans of `text` the program wrote (the rest is the model's);
    `note_effects`: what each note did to the model's forecast (`stllm.explain.note_effects`), to test note claims.
    A quoted text (a note's own words) is a citation, not a claim: nothing inside double quotes is read."""
    truth = compute_facts(city, node, start, t_in=t_in, t_out=t_out, effects=effects, channel=channel,
                          note_effects=note_effects)
    _, s = resolve_window(city, node, start, t_in, t_out)
    fc = None if forecast is None else np.asarray([np.nan if v is None else v for v in forecast], dtype=np.float64)
    ctx = _Context(text, city, truth, s, fc, tolerance, effects, program)
    for m_start, sentence in _sentences(_hide_quotes(_hide_node_ids(text, city), truth)):
        ctx.sentence(m_start, sentence)
    checked = [c for c in ctx.found if c.holds is not None]
    data = [c for c in checked if not c.kind.startswith("forecast")]
    numbers = [c for c in checked if c.kind == "forecast_numbers"]
    report = Report(claims=checked, unchecked=[c for c in ctx.found if c.holds is None], unparsed=ctx.unparsed)
    report.faithfulness = sum(c.holds for c in data) / len(data) if data else None
    if fc is not None:
        report.numbers_consistent = all(c.holds for c in numbers)
        report.forecast_consistent = all(c.holds for c in checked if c.kind.startswith("forecast"))
    return report


def _hide_node_ids(text: str, city: CityData) -> str:
    """`text` with each numeric node id or name that names a node -- after "at", "sensor", "node", "station", ...,
    or in a parenthesised list of them -- overwritten by '#' (same length: offsets stay), so no number pattern
    reads a node as a value."""
    names = {str(x) for col in ("id", "name") if col in city.nodes for x in city.nodes[col]}
    numeric = sorted((x for x in names if x.isdigit()), key=len, reverse=True)
    if not numeric:
        return text
    ids = "|".join(numeric)
    after_word = re.compile(rf"\b(?:{_NODE_WORDS})\s+(?:#\s*|no\.\s*|id\s+)?(?P<id>{ids})(?![\w/:-]|[.,]\d)"
                            rf"(?!\s*{_UNITS}(?![\w/]))", re.I)
    listed = re.compile(rf"\((?:\s*(?:{ids})\s*,)*\s*(?:{ids})\s*\)")
    chars = list(text)
    for m in after_word.finditer(text):
        chars[m.start("id"):m.end("id")] = "#" * len(m.group("id"))
    for m in listed.finditer(text):
        chars[m.start():m.end()] = re.sub(r"\d", "#", m.group(0))
    return "".join(chars)


def _note_kind(written: str, known: set[str]) -> str:
    """The kind a note claim names: the longest tail of the words before "note" that is a kind of this window's
    notes ("in the morning a fair" -> "fair"), else its last word."""
    words = written.lower().split()
    return next((" ".join(words[k:]) for k in range(len(words)) if " ".join(words[k:]) in known), words[-1])


def _hide_quotes(text: str, truth: Facts) -> str:
    """`text` with each quoted note (a note's own words, as `note_quote` writes them, between double quotes)
    overwritten by '_' (same length: offsets stay). Any other quoted text is read like the rest."""
    quotes = {note_quote(n.text) for n in truth.notes}
    return _QUOTED.sub(lambda m: '"' + "_" * (len(m.group(0)) - 2) + '"' if m.group(0)[1:-1] in quotes
                       else m.group(0), text)


def _sentences(text: str):
    pos = 0
    for m in _SENT.finditer(text):
        if m.start() > pos:
            yield pos, text[pos:m.start()]
        pos = m.end()
    if pos < len(text):
        yield pos, text[pos:]


class _Context:
    """The recomputed truth for one window plus the vocabulary to find claims about it; collects claims."""

    def __init__(self, text: str, city: CityData, truth: Facts, s: int, forecast: np.ndarray | None,
                 tolerance: float, effects, program: Sequence[tuple[int, int]] = ()):
        self.text, self.city, self.truth, self.s, self.forecast = text, city, truth, s, forecast
        self.tol, self.effects, self.program = tolerance, effects, list(program)
        self.found: list[Claim] = []
        self.unparsed: list[Claim] = []
        self.weather = {w.name: w for w in truth.weather}
        names = sorted(set(_WEATHER_WORDS) | (set(city.exog_names) - {"wind_dir_deg"}))
        self.weather_re = {n: re.compile(rf"\b(?:{_WEATHER_WORDS.get(n, re.escape(n).replace('_', r'[_ ]'))})\b",
                                         re.I) for n in names}
        target = [re.escape(truth.channel), re.escape(truth.node_name), re.escape(truth.node_id), _TARGET_WORDS]
        self.target_re = re.compile(r"(?<![\w.])(?:" + "|".join(target) + r")(?![\w])", re.I)

    # ---- helpers
    def add(self, kind: str, quantity: str, offset: int, span: tuple[int, int], stated, actual, holds) -> None:
        a, b = offset + span[0], offset + span[1]
        self.found.append(Claim(kind, quantity, self.text[a:b], (a, b), stated, actual, holds, self.writer(a, b)))

    def writer(self, a: int, b: int) -> str:
        """"program" when the program wrote all of text[a:b], else "model"."""
        return "program" if any(lo <= a and b <= hi for lo, hi in self.program) else "model"

    def number(self, kind: str, quantity: str, offset: int, span, text: str, stated: float, actual) -> None:
        actual = None if actual is None or not np.isfinite(actual) else float(actual)
        self.add(kind, quantity, offset, span, stated, actual, _close(stated, text, actual, self.tol))

    def weather_var(self, text: str) -> tuple[str | None, int]:
        """The weather variable mentioned last in `text`, and where."""
        best, where = None, -1
        for name, rx in self.weather_re.items():
            for m in rx.finditer(text):
                if m.start() > where:
                    best, where = name, m.start()
        return best, where

    # ---- one sentence
    def sentence(self, off: int, sent: str) -> None:
        first = len(self.found)
        self.forecast_numbers(off, sent)
        self.comparisons(off, sent)
        self.last_value(off, sent)
        self.calendar(off, sent)
        self.notes(off, sent)
        if re.search(r"\bwinds?\b", sent, re.I):
            self.wind(off, sent)
        clauses = _clauses(sent)
        for c_off, clause in clauses:
            self.ahead(off + c_off, clause)
            self.effect(off + c_off, clause)
            self.nouns(off + c_off, clause)
        self.verbs(off, sent, clauses)
        self.pushes(off, sent, self.found[first:])
        for m in _BALANCE.finditer(sent):
            self.forecast_direction(off, m.span(), (m.group("up") or m.group("move") or "flat").lower())
        self.not_parsed(off, clauses, [c.span for c in self.found[first:]])

    def notes(self, off: int, sent: str) -> None:
        """"A parade note holds at Midtown Center during the forecast" (a note of that kind names this node, and
        holds then: "the forecast" and "the last hours" also hold for a note that covers both) and "the parade note
        moves the forecast by +12.3" (what the notes of that kind did to the model's forecast; a note that is not
        there fails)."""
        known = {n.kind.lower() for n in self.truth.notes}
        node = {self.truth.node_name.lower(), self.truth.node_id.lower()}
        for m in _NOTE_HOLDS.finditer(sent):
            kind = _note_kind(m.group("kind"), known)
            during = _NOTE_DURING[re.sub(r"\s+", " ", m.group("during").lower())]
            spans = [n.during for n in self.truth.notes if n.kind.lower() == kind]
            where = (m.group("where") or "").strip().lower()
            here = not where or where in node
            self.add("note", "holds", off, m.span(), f"{kind} at {where or 'this sensor'}: {during}",
                     ", ".join(spans) or "no such note",
                     here and any(d == during or d == "both" for d in spans))
        for m in _NOTE_EFFECT.finditer(sent):
            kind, stated = _note_kind(m.group("kind"), known), _float(m.group("eff"))
            effects = [n.effect for n in self.truth.notes if n.kind.lower() == kind]
            if not effects:
                self.add("note", "effect", off, m.span(), stated, "no such note", False)
            elif effects[0] is None:
                self.add("note", "effect", off, m.span(), stated, None, None)
            else:
                self.number("note", "effect", off, m.span(), m.group("eff"), stated, effects[0])

    def not_parsed(self, off: int, clauses, covered: list[tuple[int, int]]) -> None:
        """One "unparsed" entry per clause with a checkable shape (`_marks`) outside every claim found."""
        for c_off, clause in clauses:
            loose = [(off + c_off + a, off + c_off + b) for a, b in _marks(clause)
                     if not any(lo <= off + c_off + a < hi for lo, hi in covered)]
            if loose:
                a = off + c_off + len(clause) - len(clause.lstrip())
                b = off + c_off + len(clause.rstrip())
                x, y = loose[0]
                self.unparsed.append(Claim("unparsed", "", self.text[a:b], (a, b), self.text[x:y], None, None,
                                           self.writer(x, y)))

    def pushes(self, off: int, sent: str, found: list[Claim]) -> None:
        """"<factor>, which pushes up|down": tested against the factor claimed in the same ';'-item before it."""
        for m in _PUSH.finditer(sent):
            item_start = off + sent.rfind(";", 0, m.start()) + 1
            item = [c for c in found if item_start <= c.span[0] and c.span[1] <= off + m.start()]
            stated = m.group("p").lower()
            by_kind = {c.kind + "." + c.quantity.split(".")[-1]: c for c in item}
            if note := next((c for c in item if c.kind == "note" and c.quantity == "effect"), None):
                what = "note"
                actual = None if not isinstance(note.actual, float) else "up" if note.actual > 0 else "down" \
                    if note.actual < 0 else "flat"
            elif effect := next((c for c in item if c.kind == "effect"), None):
                what = f"effect.{effect.quantity}"
                actual = None if effect.actual is None else "up" if effect.actual > 0 else "down" \
                    if effect.actual < 0 else "flat"
            elif period := by_kind.get("period_mean.relation"):
                what = f"period_mean.{period.quantity.split('.')[0]}"
                actual = {"above": "up", "below": "down", "same": "flat"}.get(period.actual)
            elif "neighbours.direction" in by_kind:
                what = "neighbours"
                actual = None if self.truth.neighbours is None else self.truth.neighbours.direction
            elif "trend.direction" in by_kind:
                what, actual = "trend", None if self.truth.trend is None else self.truth.trend.direction
            elif item:                                   # a weather change alone: its push is not in the data
                what, actual = item[-1].kind, None
            else:
                continue
            self.add("push", what, off, m.span(), stated, actual, None if actual is None else stated == actual)

    def forecast_numbers(self, off: int, sent: str) -> None:
        lists = _LIST.finditer(sent) if _FORECAST_CONTEXT.search(sent) else ()
        for m in lists:
            items = [x.strip() for x in m.group("body").split(",")]
            nums = [re.fullmatch(_NUM, x) for x in items]
            if len(items) < 2 or not all(n or x.upper() in ("NA", "N/A", "") for n, x in zip(nums, items)):
                continue
            holds, actual = None, None
            if self.forecast is not None:
                actual = "[" + ", ".join("NA" if not np.isfinite(v) else f"{v:g}" for v in self.forecast) + "]"
                holds = len(items) == len(self.forecast) and all(
                    n is None or (np.isfinite(v) and abs(_float(x) - v) <= _half_unit(x))
                    for n, x, v in zip(nums, items, self.forecast))
            self.add("forecast_numbers", "values", off, m.span(), m.group(0), actual, holds)
        for m in _SINGLE.finditer(sent):
            v, holds, actual = _float(m.group("v")), None, None
            if self.forecast is not None and np.isfinite(self.forecast).any():
                f = self.forecast[np.isfinite(self.forecast)]
                how = m.group("how").lower()
                pool, actual = ([f.mean()], f"mean {f.mean():.2f}") if how.startswith("averag") else \
                    ([f.max()], f"max {f.max():g}") if how.startswith("peak") else \
                    ([f.min()], f"min {f.min():g}") if how.startswith("bottom") else \
                    ([*f, f.mean(), f.min(), f.max()], f"a forecast value, or mean {f.mean():.2f}")
                holds = any(abs(v - p) <= _half_unit(m.group("v")) for p in pool)
            self.add("forecast_numbers", "value", off, m.span(), v, actual, holds)

    def comparisons(self, off: int, sent: str) -> None:
        for m in _COMPARE.finditer(sent):
            per = m.group("per").lower()
            week = "week" in per
            period = self.truth.last_week if week else self.truth.yesterday
            kind = "vs_last_week" if week else "vs_yesterday"
            ok = period is not None and period.reference is not None
            cmp = (m.group("cmp") or m.group("cmp2") or m.group("cmp3") or "").lower()
            rel = "same" if m.group("same") else ("higher" if cmp in ("higher", "above", "greater", "up") else "lower")
            diff = period.diff if ok else None
            flat = period.relation == "same" if ok else None
            self.add(kind, "relation", off, m.span(), rel, period.relation if ok else None,
                     _direction_holds({"higher": "up", "lower": "down", "same": "flat"}[rel], diff, flat))
            sign = -1.0 if rel == "lower" else 1.0
            if m.group("diff"):
                x = m.group("diff")
                stated = _float(x) if x[0] in "+-−" else sign * abs(_float(x))
                q, actual = ("percent", period.percent if ok else None) if m.group("dpct") else \
                    ("diff", diff)
                self.number(kind, q, off, m.span(), x, stated, actual)
            if m.group("pct"):
                x = m.group("pct")
                stated = _float(x) if x[0] in "+-−" else sign * abs(_float(x))
                self.number(kind, "percent", off, m.span(), x, stated, period.percent if ok else None)
            if m.group("ref"):
                self.number(kind, "reference", off, m.span(), m.group("ref"), _float(m.group("ref")),
                            period.reference if ok else None)

    def last_value(self, off: int, sent: str) -> None:
        for m in _LAST.finditer(sent):
            self.number("last_value", "value", off, m.span(), m.group("v"), _float(m.group("v")),
                        self.truth.last_value)

    def calendar(self, off: int, sent: str) -> None:
        if _PERIOD_WORDS.search(sent):
            return                                     # days named here are the past ones compared with
        steps = [step_time(self.city, k) for k in range(self.s - 1, self.s + self.truth.t_out)]
        days = {WEEKDAYS[t.day_of_week] for t in steps}
        for m in _WEEKDAY.finditer(sent):
            self.add("calendar", "weekday", off, m.span(), m.group(1), self.truth.calendar.weekday,
                     m.group(1) in days)
        for m in _DAYTYPE.finditer(sent):
            kind = m.group("t").lower()
            types = {"weekend" if t.day_of_week >= 5 else "weekday" for t in steps[1:]}
            actual = "weekend" if self.truth.calendar.is_weekend else "weekday"
            self.add("calendar", "day_type", off, m.span(), kind, actual, kind in types)

    def wind(self, off: int, sent: str) -> None:
        w = self.truth.wind
        taken: list[tuple[int, int]] = []

        def test(which: str, name: str, span) -> None:
            deg = _dir_degrees(name)
            if deg is None:
                return
            actual = None if w is None else (w.first_deg if which == "from" else w.last_deg)
            holds = None if actual is None else abs(angle_diff(deg, actual)) <= WIND_TOL_DEG
            self.add("wind_direction", which, off, span, name,
                     None if w is None else (w.first if which == "from" else w.last), holds)

        for m in _WIND_FROM_TO.finditer(sent):
            test("from", m.group("a"), m.span())
            test("to", m.group("b"), m.span())
            taken.append(m.span())
        for m in _WIND_STATE.finditer(sent):
            if any(a <= m.start() < b for a, b in taken):
                continue
            test("to", m.group("b") or m.group("adj"), m.span())

    def ahead(self, off: int, clause: str) -> None:
        if not _AHEAD_CONTEXT.search(clause):
            return
        for m in _AHEAD.finditer(clause):
            pers = list(_PERIOD_WORDS.finditer(clause))
            if not pers:
                return
            per = min(pers, key=lambda p: abs(p.start() - m.start())).group(0).lower()
            period = self.truth.last_week if "week" in per else self.truth.yesterday
            label = "last_week" if "week" in per else "yesterday"
            mean = None if period is None else period.ahead_mean
            self.number("period_mean", f"{label}.mean", off, m.span(), m.group("mean"), _float(m.group("mean")), mean)
            if m.group("rel"):
                rel = m.group("rel").lower()
                stated = "above" if rel in ("above", "higher than") else "below" if rel in ("below", "lower than") \
                    else "same"
                actual = None if mean is None else period.ahead_relation
                holds = None if actual is None else _direction_holds(
                    {"above": "up", "below": "down", "same": "flat"}[stated], mean - self.truth.last_value,
                    actual == "same")
                self.add("period_mean", f"{label}.relation", off, m.span(), stated, actual, holds)

    def effect(self, off: int, clause: str) -> None:
        for m in _EFFECT.finditer(clause):
            named = m.group("var1") or m.group("var2")
            var, _ = self.weather_var(named) if named else self.weather_var(clause[:m.start()])
            eff = None if self.effects is None or var is None else \
                self.effects.get(self.truth.channel, {}).get(var)
            amount_text = m.group("amt") or m.group("amt2")
            word = (m.group("adir") or m.group("adir2") or "change").lower()
            w = self.weather.get(var)
            if amount_text:
                amount = _float(amount_text)
                if word != "change" or amount_text[0] not in "+-−":
                    amount = abs(amount) * (-1.0 if word in ("fall", "drop", "decrease") else 1.0)
                if w is not None and abs(amount - w.change) <= _half_unit(amount_text):
                    amount = w.change                  # the observed change, written rounded
            else:
                amount = None if w is None else w.change
            verb = m.group("verb").lower().rstrip("s")
            stated = _float(m.group("eff"))
            if verb in _EFFECT_NEG:
                stated = -abs(stated)
            elif verb in _EFFECT_POS:
                stated = abs(stated)
            actual = None if eff is None or amount is None else eff.slope * amount
            self.number("effect", var or "unknown", off, m.span(), m.group("eff"), stated, actual)

    def nouns(self, off: int, clause: str) -> None:
        tr = self.truth.trend
        for m in [*_RECENT.finditer(clause), *_TREND.finditer(clause)]:
            word = (m.group("noun") if "noun" in m.groupdict() else m.group("adj")).lower()
            d = "up" if word in _NOUN_UP | _ADJ_UP | {"upward"} else "down"
            self.add("trend", "direction", off, m.span(), d, None if tr is None else tr.direction,
                     None if tr is None else _direction_holds(d, tr.change, tr.direction == "flat"))
        noun = re.compile(r"\b(?P<noun>rise|increase|climb|jump|upturn|fall|drop|decline|decrease|dip|downturn)\s+"
                          r"(?:in|of|at)\s+(?:the\s+)?(?P<what>[\w .-]{1,40})", re.I)
        for m in [*noun.finditer(clause), *_ADJ.finditer(clause)]:
            word = (m.group("noun") if "noun" in m.groupdict() else m.group("adj")).lower()
            d = "up" if word in _NOUN_UP | _ADJ_UP else "down"
            who, length = self.named_subject(m.group("what"))
            if who is not None:
                self.subject_claims(off, who, d, (m.start(), m.start("what") + length), [])

    def named_subject(self, text: str) -> tuple[str | None, int]:
        """The subject `text` starts with ("neighbours", a weather variable, "target") and its length."""
        m = _NEIGHBOUR.match(text)
        if m:
            return "neighbours", m.end()
        if _WIND_DIRECTION_SUBJECT.match(text):
            return None, 0
        for name, rx in self.weather_re.items():
            m = rx.match(text)
            if m:
                return name, m.end()
        m = self.target_re.match(text)
        return ("target", m.end()) if m else (None, 0)

    # ---- verbs: "<subject> rose by X (+Y%), from A to B"
    def verbs(self, off: int, sent: str, clauses) -> None:
        bounds = [c_off for c_off, _ in clauses] + [len(sent)]
        matches = list(_VERB.finditer(sent))
        said = []                                      # (subject, direction, span, tail pieces) in order
        for k, m in enumerate(matches):
            lo = max([b for b in bounds if b <= m.start()] + [matches[k - 1].end() if k else 0])
            nxt = matches[k + 1].start() if k + 1 < len(matches) else len(sent)
            hi = min([b for b in bounds if b > m.end()] + [nxt])
            subject, tail = sent[lo:m.start()], sent[m.end():hi]
            kind = m.lastgroup
            d = {"up": "up", "bup": "up", "down": "down", "bdown": "down"}.get(kind, "flat")
            if _FUTURE.search(subject) or _FORECAST_SUBJECT.search(subject):
                self.forecast_direction(off, m.span(), d)
                continue
            if kind.startswith("b") or _GENERIC.search(subject):
                continue
            if m.group(0).lower().endswith("ing") and sent[m.end():m.end() + 1].isspace() \
                    and self.named_subject(sent[m.end():].lstrip())[0] is not None:
                continue                               # "the falling wind": an adjective, read by `nouns`
            who = self.subject(subject)
            if who == "":                              # "winds were light but picked up": named earlier
                who = self.subject(sent[:m.start()]) or "target"
            if who is None:
                continue
            said.append((who, d, m.span(), [(q, (m.start(), m.end() + e), x) for q, e, x in _parse_tail(tail)]))
        for who in dict.fromkeys(w for w, *_ in said):
            mine = [x for x in said if x[0] == who]
            if {"up", "down"} <= {d for _, d, _, _ in mine}:
                # a path ("climbed from 302 to 494, then eased to 363"): only its ends are the window's
                _, _, span0, pieces0 = mine[0]
                _, _, span1, pieces1 = mine[-1]
                self.subject_claims(off, who, None, span0, [p for p in pieces0 if p[0] == "from"])
                self.subject_claims(off, who, None, span1, [p for p in pieces1 if p[0] in ("to", "level")])
            else:
                for _, d, span, pieces in mine:
                    self.subject_claims(off, who, d, span, pieces)

    def subject(self, text: str) -> str | None:
        """"target", "neighbours", "wind_dir", a weather variable, None (past periods: not checkable) or ""
        (nothing named: the sentence's previous subject)."""
        if _WIND_DIRECTION_SUBJECT.search(text):
            return "wind_dir"
        if _NEIGHBOUR.search(text):
            return "neighbours"
        if _PERIOD_WORDS.search(text):
            return None
        var, where = self.weather_var(text)
        last_target = max((m.start() for m in self.target_re.finditer(text)), default=-1)
        if var is None and last_target < 0:
            return ""
        return var if var is not None and where > last_target else "target"

    def subject_claims(self, off: int, who: str, d: str | None, span, pieces) -> None:
        """Direction (unless None) and numbers stated about one subject, each tested against the recomputed truth."""
        t = self.truth
        if who == "wind_dir":
            if d == "flat":
                self.add("wind_direction", "steady", off, span, "steady", None if t.wind is None else t.wind.turn_deg,
                         None if t.wind is None else abs(t.wind.turn_deg) <= WIND_STEADY_DEG)
            return
        if who == "target":
            kind, tr = "trend", t.trend
            change, flat = (None, None) if tr is None else (tr.change, tr.direction == "flat")
            actual = {} if tr is None else {"change": tr.change, "percent": tr.percent, "from": tr.first,
                                            "to": tr.last, "level": tr.last}
            label = "{}"
        elif who == "neighbours":
            kind, nb = "neighbours", t.neighbours
            change = None if nb is None else nb.mean_change
            flat = None if nb is None else nb.direction == "flat"
            actual = {} if nb is None else {"change": nb.mean_change, "percent": nb.mean_percent}
            label = "{}"
        else:
            kind, w = "weather", self.weather.get(who)
            change, flat = (None, None) if w is None else (w.change, w.direction == "flat")
            actual = {} if w is None else {"change": w.change, "percent": percent(w.change, w.first),
                                           "from": w.first, "to": w.last, "level": w.last}
            label = who + ".{}"
        if d is not None:
            self.add(kind, label.format("direction"), off, span, d, change, _direction_holds(d, change, flat))
        sign = {"up": 1.0, "down": -1.0}.get(d)
        for quantity, piece_span, x in pieces:
            stated = _float(x)
            if quantity in ("change", "percent") and sign is not None and x[0] not in "+-−":
                stated = sign * abs(stated)
            self.number(kind, label.format(quantity), off, piece_span, x, stated, actual.get(quantity))

    def forecast_direction(self, off: int, span, d: str) -> None:
        actual = None if self.forecast is None else forecast_direction(self.truth.last_value, self.forecast)
        self.add("forecast_direction", "direction", off, span, d, actual, None if actual is None else d == actual)


def _marks(clause: str) -> list[tuple[int, int]]:
    """Spans of what makes a clause checkable: a number with a decimal point or a percent sign, a past change verb
    ("rose", "fell", "held steady"), a push ("pushes up")."""
    numbers = [m.span() for m in re.finditer(_NUM, clause)
               if "." in m.group(0) or clause[m.end():].lstrip().startswith("%")]
    verbs = [m.span() for m in _VERB.finditer(clause) if m.lastgroup in ("up", "down", "flat")]
    return sorted(numbers + verbs + [m.span() for m in _PUSH.finditer(clause)])


def _clauses(sent: str) -> list[tuple[int, str]]:
    """(offset, clause) pieces of a sentence, cut at ";", ":", "while", "and", ..."""
    out, pos = [], 0
    for m in _BOUNDARY.finditer(sent):
        out.append((pos, sent[pos:m.start()]))
        pos = m.end()
    out.append((pos, sent[pos:]))
    return out


_TAIL = [  # anchored pieces after a change verb: (quantity or None, pattern); quantities read the group "x"/"y"
    ("change", re.compile(rf"^\s*,?\s*by\s+{_ABOUT}(?P<x>{_NUM})(?P<pct>\s*%)?{_UNIT}")),
    ("paren", re.compile(rf"^\s*,?\s*\(\s*(?:by\s+)?(?P<x>{_NUM})(?P<pct>\s*%)?{_UNIT}\s*\)")),
    ("fromto", re.compile(rf"^\s*,?\s*from\s+{_ABOUT}(?P<x>{_NUM}){_UNIT}(?:\s+(?:at|on)\s+[\d:]+)?\s+to\s+{_ABOUT}"
                          rf"(?P<y>{_NUM}){_UNIT}(?:\s+(?:at|on)\s+[\d:]+)?")),
    ("from", re.compile(rf"^\s*,?\s*from\s+{_ABOUT}(?P<x>{_NUM}){_UNIT}")),
    ("to", re.compile(rf"^\s*,?\s*to\s+{_ABOUT}(?P<x>{_NUM}){_UNIT}")),
    ("level", re.compile(rf"^\s*,?\s*(?:at|around|near)\s+{_ABOUT}(?P<x>{_NUM}){_UNIT}")),
    (None, re.compile(r"^\s*,?\s*(?:on\s+average|on\s+the\s+whole|overall|in\s+total|sharply|slightly|steadily|"
                      r"gradually|strongly|markedly|somewhat|a\s+little|a\s+lot|quickly|slowly|overnight|recently|"
                      r"today|this\s+(?:morning|afternoon|evening)|(?:over|in|during)\s+the\s+(?:last|past)"
                      r"(?:\s+\d+)?\s+(?:hours?|minutes?|days?|half\s+day))\b")),
]
_BARE = re.compile(rf"^\s*{_ABOUT}(?P<x>{_NUM})(?P<pct>\s*%)?{_UNIT}")


def _parse_tail(tail: str) -> list[tuple[str, int, str]]:
    """Numbers stated right after a change verb: [(quantity, end offset in tail, number text)]."""
    out, pos = [], 0
    m = _BARE.match(tail)
    if m:
        out.append(("percent" if m.group("pct") else "change", m.end(), m.group("x")))
        pos = m.end()
    while True:
        for quantity, rx in _TAIL:
            m = rx.match(tail[pos:])
            if m:
                break
        else:
            return out
        end = pos + m.end()
        if quantity in ("change", "paren"):
            out.append(("percent" if m.group("pct") else "change", end, m.group("x")))
        elif quantity == "fromto":
            out += [("from", end, m.group("x")), ("to", end, m.group("y"))]
        elif quantity is not None:
            out.append((quantity, end, m.group("x")))
        pos = end
