"""The text probe: a synthetic city whose events exist only in notes.

Each event starts at a random hour at one to three named sensors and multiplies their values by the amount its
kind and words imply (a street festival 2.5x, a market 1.6x, a storm 0.5x, a closure 0.2x) for 3 to 8 hours. Nothing
in the numbers announces it: an event that starts inside a forecast's horizon can only be foreseen by reading
its note. Events of the training and validation parts fall on half of the sensors and use one set of phrasings;
test events fall on the other half, at other times, in paraphrases the model never read (new kinds and sentences).
So the probe asks the one thing only language can answer: what does this note mean for these numbers?
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from stllm.data.city import CityData
from stllm.data.notes import notes_frame
from stllm.data.synthetic import make_city
from stllm.data.windows import split_bounds

# (factor, phrasings of the training and validation parts, paraphrases of the test part): (kind, sentence)
EVENTS = [
    (2.5, [("festival", "A street festival with music and food stalls draws large crowds"),
           ("concert", "A free open-air concert brings a huge audience"),
           ("parade", "A parade with thousands of spectators passes through")],
          [("fair", "A block party with live bands fills the streets with people"),
           ("marathon", "A city marathon brings runners and cheering crowds")]),
    (1.6, [("market", "A weekly farmers market attracts extra shoppers"),
           ("exhibition", "A small art exhibition opens and draws some visitors")],
          [("sale", "A popular shop holds a sale and brings a few more customers")]),
    (0.5, [("storm", "A heavy thunderstorm keeps many people indoors"),
           ("snow", "Snowfall makes travel slow and fewer people go out")],
          [("rain", "A downpour with strong winds discourages trips")]),
    (0.2, [("closure", "The street is closed to all traffic for construction work"),
           ("outage", "A power failure shuts the station down completely")],
          [("shutdown", "Roads are blocked off and the area is sealed for repairs"),
           ("evacuation", "Police evacuate the area after a gas leak")]),
]


def make_probe_city(n_nodes: int = 16, n_days: int = 42, seed: int = 0, every_hours: float = 8.0,
                    split: tuple = (0.7, 0.1, 0.2), paraphrase_test: bool = True) -> CityData:
    """The synthetic city (stllm.data.synthetic) with events in notes; deterministic given `seed`.

    every_hours: mean time between event starts (somewhere in the city); split: the fractions whose test part
    gets the paraphrased events on the other half of the sensors (paraphrase_test=False: same phrasings there,
    for a quick test with a random tiny language model that cannot know synonyms).
    """
    city = make_city(n_nodes=n_nodes, n_days=n_days, seed=seed)
    rng = np.random.default_rng(seed + 1)
    values = city.values.copy()
    test_start = split_bounds(city.n_steps, list(split))[1]
    halves = (np.arange(0, n_nodes, 2), np.arange(1, n_nodes, 2))     # training/validation sensors, test sensors
    rows, t = [], int(rng.integers(12, 24))
    while t < city.n_steps - 1:
        test = t >= test_start
        factor, seen, paraphrases = EVENTS[rng.integers(len(EVENTS))]
        kind, text = _pick(rng, paraphrases if test and paraphrase_test else seen)
        nodes = rng.choice(halves[int(test)], size=int(rng.integers(1, 4)), replace=False)
        stop = min(t + int(rng.integers(3, 9)), city.n_steps)
        values[t:stop, nodes] *= factor
        rows.append({"start": city.timestamps[t], "end": city.timestamps[stop - 1],
                     "zones": ";".join(city.nodes["name"].iloc[sorted(nodes)]), "kind": kind, "text": text})
        t = stop + int(rng.exponential(every_hours)) + 1
    probe = replace(city, name="text-probe", values=values)
    return replace(probe, notes=notes_frame(pd.DataFrame(rows), probe, source="text probe"))


def _pick(rng: np.random.Generator, options: list[tuple[str, str]]) -> tuple[str, str]:
    return options[int(rng.integers(len(options)))]


def event_mask(city: CityData, starts: np.ndarray, t_out: int) -> np.ndarray:
    """[b, t_out, N] bool: the forecast entries of windows `starts` that lie inside a note's span at its nodes."""
    from stllm.data.notes import coverage
    _, _, cover = coverage(city.notes, city.timestamps, city.n_nodes)          # [T, N, J]
    active = cover.any(-1)                                                   # [T, N]
    active = np.concatenate([active, np.zeros((t_out, city.n_nodes), bool)])  # windows may reach past the end
    return active[np.asarray(starts)[:, None] + np.arange(t_out)]
