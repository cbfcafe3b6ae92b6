"""The explanation checker (stllm.distill.checker): claims found in text and tested against the data."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from stllm.data.city import CityData
from stllm.data.synthetic import make_city
from stllm.distill import AnalyticTeacher, Facts, check_explanation, compute_facts
from stllm.distill.checker import _NUM
from stllm.distill.facts import Effect

START = 7 * 24 + 20          # Monday 2024-03-11 20:00; history 08:00..19:00 that day


def falling_city() -> CityData:
    """Dongsi falls through the day while its neighbours rise; the wind drops and turns from ESE to WNW.

    Window START: Dongsi 190 -> 157 (-33, -17%), same hour yesterday 155 (about the same), last week 143
    (+14 higher); neighbours +11 and +22 (mean +16.5); temperature 8.4 -> 6.2; pressure 1014 -> 1019.5;
    wind speed 3.4 -> 1.2 m/s; wind 120 (ESE) -> 285 (WNW) degrees.
    """
    t = np.arange(9 * 24)
    hour, day = t % 24, t // 24
    values = np.stack([200 - 3 * hour + 2 * day, 40 + hour, 30 + 2 * hour], axis=1)[:, :, None].astype(np.float32)
    exog = np.stack([10 - 0.2 * hour, 1010 + 0.5 * hour, 5 - 0.2 * hour, (15 * hour) % 360],
                    axis=-1)[:, None, :].astype(np.float32)
    nodes = pd.DataFrame({"id": ["dongsi", "tiantan", "guanyuan"], "name": ["Dongsi", "Tiantan", "Guanyuan"],
                          "lat": [39.929, 39.886, 39.929], "lon": [116.417, 116.407, 116.339]})
    return CityData(name="falling", values=values, timestamps=pd.date_range("2024-03-04", periods=len(t), freq="1h"),
                    interval="1h", channels=["PM2.5"], units=["ug/m3"], nodes=nodes, city="Beijing",
                    domain="air quality", exog=exog,
                    exog_names=["temperature", "pressure", "wind_speed", "wind_dir_deg"])


@pytest.fixture(scope="module")
def city() -> CityData:
    return falling_city()


@pytest.fixture(scope="module")
def synth():
    """A synthetic city with weather, and strong made-up weather effects so that effect claims get written."""
    c = make_city(n_nodes=10, n_days=21, seed=1)
    effects = {"flow": {"temperature": Effect("temperature", "flow", 6.0, 0.4, 1000),
                        "rain": Effect("rain", "flow", -15.0, -0.4, 1000),
                        "wind_speed": Effect("wind_speed", "flow", -9.0, -0.3, 1000)}}
    return c, effects


def _windows(city, step: int = 29):
    return [(node, s) for node in range(city.n_nodes) for s in range(7 * 24 + 12, city.n_steps - 12, step)]


def _expected_kinds(f: Facts, target: list) -> set[str]:
    """The claim kinds an analytic rationale of these facts (and this true future) must contain."""
    kinds = {"trend", "last_value", "calendar", "forecast_numbers"}
    kinds |= {"forecast_direction"} if any(v is not None for v in target) else set()
    kinds |= {"weather"} if f.weather else set()
    kinds |= {"wind_direction"} if f.wind else set()
    kinds |= {"neighbours"} if f.neighbours and f.neighbours.mean_change is not None else set()
    kinds |= {"vs_yesterday"} if f.yesterday and f.yesterday.reference is not None else set()
    kinds |= {"vs_last_week"} if f.last_week and f.last_week.reference is not None else set()
    kinds |= {"period_mean"} if any(x.kind in ("yesterday", "last_week") for x in f.factors) else set()
    kinds |= {"effect"} if any(x.kind == "weather" for x in f.factors) else set()
    kinds |= {"push"} if f.factors else set()
    return kinds


def test_every_analytic_claim_is_found_and_holds(synth):
    city, effects = synth
    teacher, kinds_seen = AnalyticTeacher(), set()
    for node, s in _windows(city):
        r = teacher.explain(city, node, s, effects=effects)
        text = r.filled()
        report = check_explanation(text, city, node, s, forecast=r.target, effects=effects)
        assert report.claims and not report.unchecked and not report.unparsed, text
        assert report.faithfulness == 1.0, report.summary() + "\n" + text
        assert report.numbers_consistent and report.forecast_consistent
        kinds = {c.kind for c in report.claims}
        assert _expected_kinds(Facts.from_dict(r.facts), r.target) <= kinds, text
        kinds_seen |= kinds
        # every number written with a decimal point or a % (outside the forecast list) lies in a checked claim
        spans = [c.span for c in report.claims]
        listed = text.rindex("[")
        for m in re.finditer(_NUM, text[:listed]):
            if "." in m.group(0) or text[m.end():m.end() + 1] == "%":
                assert any(a <= m.start() < b for a, b in spans), f"{m.group(0)} at {m.start()} unchecked in\n{text}"
    assert kinds_seen == {"trend", "last_value", "vs_yesterday", "vs_last_week", "period_mean", "neighbours",
                          "weather", "wind_direction", "calendar", "effect", "push", "forecast_numbers",
                          "forecast_direction"}


def _first_window(city, effects, want):
    for node, s in _windows(city, step=17):
        r = AnalyticTeacher().explain(city, node, s, effects=effects)
        if want(r.filled()):
            return node, s, r
    raise AssertionError("no window with the wanted phrasing")


@pytest.mark.parametrize("name, edit, kind", [
    ("flip the trend", lambda t: re.sub(r"(Over the last 12 hours, flow )rose", r"\1fell", t, count=1), "trend"),
    ("change a number", lambda t: re.sub(r"(The latest reading is )(\d+\.\d)",
                                         lambda m: m.group(1) + f"{float(m.group(2)) * 1.5 + 3:.1f}", t), "last_value"),
    ("wrong wind direction", lambda t: re.sub(r"the wind turned from (\w+) to (\w+)",
                                              lambda m: f"the wind turned from {m.group(1)} to {_opposite(m.group(2))}",
                                              t), "wind_direction"),
    ("wrong weather change", lambda t: re.sub(r"temperature fell by", "temperature rose by", t, count=1), "weather"),
    ("wrong comparison", lambda t: t.replace("lower than at the same hour yesterday",
                                             "higher than at the same hour yesterday", 1), "vs_yesterday"),
    ("neighbours", lambda t: re.sub(r"(nearest sensors \([^)]*\)) rose", r"\1 fell", t, count=1), "neighbours"),
    ("wrong push", lambda t: re.sub(r"(reading, which pushes )(up|down)",
                                    lambda m: m.group(1) + {"up": "down", "down": "up"}[m.group(2)], t, count=1), "push"),
])
def test_a_wrong_claim_is_caught(synth, name, edit, kind):
    city, effects = synth
    node, s, r = _first_window(city, effects, lambda t: edit(t) != t)
    wrong = edit(r.filled())
    report = check_explanation(wrong, city, node, s, forecast=r.target, effects=effects)
    assert report.faithfulness < 1.0, wrong
    assert kind in {c.kind for c in report.failed}, report.summary()


def _opposite(name: str) -> str:
    from stllm.distill.facts import COMPASS16
    return COMPASS16[(COMPASS16.index(name) + 8) % 16]


def test_forecast_numbers_other_than_the_heads_are_flagged(synth):
    city, effects = synth
    node, s, r = _first_window(city, effects, lambda t: "expected to rise" in t)
    head = [v if v is not None else 0.0 for v in r.target]
    ok = check_explanation(r.filled(head), city, node, s, forecast=head)
    assert ok.numbers_consistent and ok.forecast_consistent and ok.faithfulness == 1.0
    off = [v + 0.3 for v in head]                                    # not equal within rounding
    bad = check_explanation(r.filled(off), city, node, s, forecast=head)
    assert bad.numbers_consistent is False and bad.faithfulness == 1.0
    short = check_explanation(r.filled(head[:-1]), city, node, s, forecast=head)
    assert short.numbers_consistent is False
    single = r.filled(head) + " The forecast is expected to peak at 9999.5 later on."
    assert check_explanation(single, city, node, s, forecast=head).numbers_consistent is False
    falling = [0.0] * len(head)                                       # the head says "fall", the text "rise"
    mixed = check_explanation(r.filled(falling), city, node, s, forecast=falling)
    assert mixed.numbers_consistent and mixed.forecast_consistent is False
    assert check_explanation(r.filled(head), city, node, s).numbers_consistent is None   # no forecast given


@pytest.mark.parametrize("sentence, kind, quantity, holds", [
    ("PM2.5 at Dongsi fell 17% over the day.", "trend", "percent", True),
    ("PM2.5 fell by 33.0 ug/m3, from 190 to 157.", "trend", "change", True),
    ("PM2.5 fell by 33.0 ug/m3, from 190 to 157.", "trend", "from", True),
    ("PM2.5 rose by 12.3.", "trend", "direction", False),
    ("PM2.5 rose by 12.3.", "trend", "change", False),
    ("Readings have decreased since this morning.", "trend", "direction", True),
    ("Concentrations increased.", "trend", "direction", False),
    ("PM2.5 held steady.", "trend", "direction", False),
    ("The latest reading is 157 ug/m3.", "last_value", "value", True),
    ("The last value was 140.", "last_value", "value", False),
    ("That is about the same as yesterday.", "vs_yesterday", "relation", True),
    ("PM2.5 is higher than the same hour yesterday.", "vs_yesterday", "relation", True),
    ("It is 14 higher than a week ago.", "vs_last_week", "diff", True),
    ("It is lower than at the same hour last week (143).", "vs_last_week", "relation", False),
    ("It is lower than at the same hour last week (143).", "vs_last_week", "reference", True),
    ("Neighbouring stations rose.", "neighbours", "direction", True),
    ("The nearby sensors fell by 16.5 on average.", "neighbours", "direction", False),
    ("The nearest stations climbed 16.5 on average.", "neighbours", "change", True),
    ("Wind speed decreased from 3.4 to 1.2 m/s.", "weather", "wind_speed.to", True),
    ("Wind speed increased from 1.2 to 3.4 m/s.", "weather", "wind_speed.direction", False),
    ("Wind speed increased from 1.2 to 3.4 m/s.", "weather", "wind_speed.from", False),
    ("Temperatures dropped overnight from 8.4 to 6.2 °C.", "weather", "temperature.from", True),
    ("Winds were strong but eased, from 3.4 to 1.2 m/s.", "weather", "wind_speed.to", True),
    ("It climbed from 190 to 200 in the morning and then fell to 157.", "trend", "from", True),
    ("It climbed from 190 to 200 in the morning and then fell to 157.", "trend", "to", True),
    ("The temperature dropped by 2.2 °C while pressure rose 5.5 hPa.", "weather", "temperature.change", True),
    ("The temperature dropped by 2.2 °C while pressure rose 5.5 hPa.", "weather", "pressure.change", True),
    ("Despite the falling wind, PM2.5 went down.", "weather", "wind_speed.direction", True),
    ("Despite the falling wind, PM2.5 went down.", "trend", "direction", True),
    ("The wind turned westerly.", "wind_direction", "to", True),
    ("The wind turned northerly.", "wind_direction", "to", False),
    ("The wind veered from the east-southeast to the west-northwest.", "wind_direction", "from", True),
    ("A northeasterly wind is blowing.", "wind_direction", "to", False),
    ("It is Monday evening.", "calendar", "weekday", True),
    ("The forecast is for a Saturday.", "calendar", "weekday", False),
    ("The recent drop in PM2.5 should continue.", "trend", "direction", True),
    ("The downward trend means PM2.5 is expected to fall.", "trend", "direction", True),
    ("The upward trend means PM2.5 is expected to rise.", "trend", "direction", False),
    ("The rise in pressure helps.", "weather", "pressure.direction", True),
    ("A 2 m/s rise in wind speed usually lowers PM2.5 by about 20.", "effect", "wind_speed", True),
    ("A 2 m/s rise in wind speed usually lowers PM2.5 by about 5.", "effect", "wind_speed", False),
    ("The nearest sensors rose, which pushes it up.", "push", "neighbours", True),
    ("The nearest sensors rose on average, which pushes down.", "push", "neighbours", False),
    ("PM2.5 fell over the last 12 hours, which pushes up.", "push", "trend", False),
    ("PM2.5 is expected to fall.", "forecast_direction", "direction", True),
    ("PM2.5 will likely rise.", "forecast_direction", "direction", False),
    ("The downward pushes outweigh the upward ones.", "forecast_direction", "direction", True),
    ("The upward pushes outweigh the downward ones.", "forecast_direction", "direction", False),
    ("These pushes roughly cancel out.", "forecast_direction", "direction", False),
    ("The move down comes from influences outside these facts.", "forecast_direction", "direction", True),
    ("We expect PM2.5 to average about 133.", "forecast_numbers", "value", True),
    ("We expect PM2.5 to average about 150.", "forecast_numbers", "value", False),
    ("PM2.5 should fall to 105 by morning.", "forecast_numbers", "value", True),
    ("Forecast: [160, 155, 150, 145, 140, 135, 130, 125, 120, 115, 110, 105].", "forecast_numbers", "values", True),
])
def test_free_form_phrasings(city, sentence, kind, quantity, holds):
    effects = {"PM2.5": {"wind_speed": Effect("wind_speed", "PM2.5", slope=-10.0, corr=-0.4, n=500)}}
    forecast = [160, 155, 150, 145, 140, 135, 130, 125, 120, 115, 110, 105]      # mean 132.5, falling
    report = check_explanation(sentence, city, "Dongsi", START, forecast=forecast, effects=effects)
    found = [c for c in report.claims if (c.kind, c.quantity) == (kind, quantity)]
    assert found, f"no {kind}.{quantity} claim in {sentence!r}: {[(c.kind, c.quantity) for c in report.claims]}"
    assert found[0].holds is holds, found[0]


def test_a_path_is_checked_by_its_ends_only(city):
    report = check_explanation("PM2.5 climbed from 190 to 200 and then fell to 157.", city, "Dongsi", START)
    assert [(c.quantity, c.stated, c.holds) for c in report.claims] == [("from", 190.0, True), ("to", 157.0, True)]


def test_claims_the_data_cannot_settle_are_unchecked(city):
    text = ("A change of +1.0 m/s in wind speed usually moves PM2.5 by -10.0. Humidity rose by 5%. "
            "Forecast: [1.0, 2.0, 3.0].")
    report = check_explanation(text, city, "Dongsi", START)          # no effects, no forecast, no humidity data
    assert {c.kind for c in report.unchecked} == {"effect", "weather", "forecast_numbers"}
    assert report.claims == [] and report.faithfulness is None and report.numbers_consistent is None


def test_checker_recomputes_the_truth_from_the_data(city):
    """The same text is judged by the data it is checked against, not by anything it came with."""
    text = "Over the last 12 hours, PM2.5 fell by 33.0 ug/m3 (-17%), from 190.0 to 157.0 ug/m3."
    assert check_explanation(text, city, "Dongsi", START).faithfulness == 1.0
    other = falling_city()
    other.values[:START, 0] *= -1.0                                  # now it rose from -190 to -157
    report = check_explanation(text, other, "Dongsi", START)
    assert report.faithfulness == 0.0 and len(report.failed) == 5
    assert compute_facts(other, 0, START).trend.direction == "up"


def numbered_city(ids: list[str]) -> CityData:
    """falling_city with numeric sensor ids as ids and names."""
    city = falling_city()
    city.nodes["id"] = city.nodes["name"] = ids
    return city


@pytest.mark.parametrize("ids", [["773869", "767541", "767542"],         # METR-LA's
                                 ["19", "20", "8"]])                       # PEMS-like, and hours of the window
def test_numeric_node_ids_are_not_numbers_in_an_analytic_rationale(ids):
    city = numbered_city(ids)
    r = AnalyticTeacher().explain(city, ids[0], START)
    assert f"at {ids[0]} over the next 12 hours" in r.filled()               # the question names the sensor
    report = check_explanation(r.filled(), city, ids[0], START, forecast=r.target)
    assert report.numbers_consistent is True and report.faithfulness == 1.0, report.summary()
    assert [c.kind for c in report.claims if c.kind == "forecast_numbers"] == ["forecast_numbers"]   # the list alone
    plain = AnalyticTeacher().explain(falling_city(), 0, START)
    named = check_explanation(plain.filled(), falling_city(), 0, START, forecast=plain.target)
    assert len(report.claims) == len(named.claims) and not report.unparsed   # the same claims as with named nodes


def test_numeric_node_ids_are_not_numbers_in_free_text():
    city = numbered_city(["773869", "767541", "767542"])
    forecast = [150.0] * 12
    text = ("We expect PM2.5 at 773869 to fall, as at sensor 773869 yesterday. It should stay near the nearest "
            "sensors (767541, 767542). Node 767541 fell.")
    report = check_explanation(text, city, "773869", START, forecast=forecast)
    assert not [c for c in report.claims + report.unchecked if "7" in str(c.stated)], report.claims
    assert report.numbers_consistent is True
    # a value that is not a node still counts, next to a node that is one
    report = check_explanation("PM2.5 at 773869 is expected to average about 9999.0.", city, "773869", START,
                               forecast=forecast)
    assert [(c.kind, c.stated, c.holds) for c in report.claims] == [("forecast_numbers", 9999.0, False)]


def test_claims_say_who_wrote_them_and_unparsed_clauses_are_counted(city):
    program = "PM2.5 fell by 33.0 ug/m3."
    text = program + " The latest reading is 157. Yesterday at this hour it rose by 12.5; which pushes up."
    report = check_explanation(text, city, "Dongsi", START, program=[(0, len(program))])
    assert {(c.kind, c.quantity, c.by) for c in report.claims} == {
        ("trend", "direction", "program"), ("trend", "change", "program"), ("last_value", "value", "model")}
    assert all(c.holds for c in report.claims)
    assert [(c.kind, c.text, c.stated, c.holds, c.by) for c in report.unparsed] == [
        ("unparsed", "Yesterday at this hour it rose by 12.5", "rose", None, "model"),
        ("unparsed", "pushes up.", "pushes up", None, "model")]
    assert report.faithfulness == 1.0 and "2 clause(s) not parsed" in report.summary()
