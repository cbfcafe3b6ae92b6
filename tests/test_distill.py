"""Facts, templates, teachers and rationale datasets (stllm.distill)."""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stllm.data.city import CityData
from stllm.data.synthetic import make_city
from stllm.distill import (FORECAST_SLOT, AnalyticTeacher, Facts, HFChatTeacher, OpenAITeacher, Rationale,
                           TeacherError, compute_facts, distill, estimate_effects, future_facts, load_rationales,
                           render_node_prompt, render_rationale, save_rationales)
from stllm.distill.facts import Effect
from stllm.distill.teachers import fact_text, fill_facts

START = 7 * 24 + 20          # 2024-03-11 20:00, a Monday: the history is 08:00..19:00 that day


def hand_city() -> CityData:
    """3 stations, 9 days hourly; values and weather follow simple formulas, so every fact can be worked out."""
    t = np.arange(9 * 24)
    hour, day = t % 24, t // 24
    values = np.empty((len(t), 3, 1), np.float32)
    values[:, 0, 0] = 50 + 2 * hour + 3 * day             # rises through the day, a little more each day
    values[:, 1, 0] = 80 - hour                            # falls through the day
    values[:, 2, 0] = 60 - 0.5 * hour
    values[177, 0, 0] = np.nan                             # a missing reading inside the window (09:00)
    exog = np.stack([5 + 0.5 * hour, np.zeros(len(t)), 2 + 0.1 * hour, (180 + 10 * hour) % 360],
                    axis=-1)[:, None, :].astype(np.float32)
    nodes = pd.DataFrame({"id": ["dongsi", "tiantan", "guanyuan"], "name": ["Dongsi", "Tiantan", "Guanyuan"],
                          "lat": [39.929, 39.886, 39.929], "lon": [116.417, 116.407, 116.339],
                          "description": ["urban air-quality station", "", "urban station, west"]})
    return CityData(name="hand", values=values, timestamps=pd.date_range("2024-03-04", periods=len(t), freq="1h"),
                    interval="1h", channels=["PM2.5"], units=["ug/m3"], nodes=nodes, city="Beijing",
                    domain="air quality", exog=exog, exog_names=["temperature", "rain", "wind_speed", "wind_dir_deg"])


WIND_EFFECT = {"PM2.5": {"wind_speed": Effect("wind_speed", "PM2.5", slope=-20.0, corr=-0.4, n=500)}}
FORECAST = [110.0, 112.5, 115.0, 117.25, None, 120, 121, 122, 123, 124, 125, 126]

GOLDEN_NODE = (
    "Beijing (air quality). Sensor: Dongsi. Urban air-quality station.\n"
    "Channel: PM2.5 (ug/m3), one reading every 1 hour.\n"
    "Last 12 readings, 2024-03-11 08:00 to 2024-03-11 19:00 (Monday, weekday): "
    "87.0, NA, 91.0, 93.0, 95.0, 97.0, 99.0, 101.0, 103.0, 105.0, 107.0, 109.0\n"
    "Encoded history: <ST_HIS>\n"
    "Nearest sensors: Tiantan (4.9 km), Guanyuan (6.7 km); mean change over these hours -8.2\n"
    "Weather over the same hours: temperature 9.0 to 14.5 °C; rain 0.0 to 0.0 mm; wind speed 2.8 to 3.9 m/s; "
    "wind from W to N\n"
    "Forecast slot: <ST_PRE>\n"
    "Question: What will PM2.5 be at Dongsi over the next 12 hours (from 2024-03-11 20:00 to 2024-03-12 07:00), "
    "and why?\n"
)

GOLDEN_RATIONALE = (
    "1. Question: What will PM2.5 be at Dongsi over the next 12 hours (from 2024-03-11 20:00 to 2024-03-12 07:00), "
    "and why?\n"
    "2. Drivers: The forecast starts on a Monday (weekday) at 20:00. Over the last 12 hours: temperature rose by "
    "5.5 °C, from 9.0 to 14.5 °C; rain held steady, from 0.0 to 0.0 mm; wind speed rose by 1.1 m/s, from 2.8 to "
    "3.9 m/s; the wind turned from W to N.\n"
    "3. Recent data: Over the last 12 hours, PM2.5 rose by 22.0 ug/m3 (+25%), from 87.0 to 109.0 ug/m3. The latest "
    "reading is 109.0 ug/m3 at 19:00. It is about the same as at the same hour yesterday (106.0) and 21.0 ug/m3 "
    "(+24%) higher than at the same hour last week (88.0). The 2 nearest sensors (Tiantan, Guanyuan) fell by 8.2 "
    "ug/m3 on average (-13%).\n"
    "4. Factors: PM2.5 rose over the last 12 hours, which pushes up; the same hours yesterday averaged 89.0 ug/m3, "
    "below the latest reading, which pushes down; the same hours last week averaged 71.0 ug/m3, below the latest "
    "reading, which pushes down; the nearest sensors fell on average, which pushes down; wind speed rose (a change "
    "of +1.1 m/s usually moves PM2.5 by -22.0 over the next 12 hours), which pushes down.\n"
    "5. Conclusion: The upward pushes outweigh the downward ones. PM2.5 at Dongsi is expected to rise over the next "
    "12 hours. Forecast for the next 12 hours "
    "(ug/m3): [110.0, 112.5, 115.0, 117.2, NA, 120.0, 121.0, 122.0, 123.0, 124.0, 125.0, 126.0]\n"
)


@pytest.fixture(scope="module")
def city() -> CityData:
    return hand_city()


@pytest.fixture(scope="module")
def synth() -> CityData:
    return make_city(n_nodes=8, n_days=21, seed=3)


# ------------------------------------------------------------------------------------------------- facts


def test_facts_match_hand_computed_values(city):
    f = compute_facts(city, "Dongsi", START, effects=WIND_EFFECT)
    # history 08:00..19:00 on day 7: 50 + 2h + 21, with 09:00 missing
    assert f.history[1] is None and f.history[0] == 87.0 and f.last_value == 109.0
    assert (f.trend.first, f.trend.last, f.trend.change, f.trend.direction) == (87.0, 109.0, 22.0, "up")
    assert f.trend.percent == pytest.approx(100 * 22 / 87)
    # same hour (19:00) yesterday: 50 + 38 + 18 = 106 (+2.8%: within the 5% "same" band); last week: 88
    assert (f.yesterday.reference, f.yesterday.relation) == (106.0, "same")
    assert (f.last_week.reference, f.last_week.diff, f.last_week.relation) == (88.0, 21.0, "higher")
    # the target hours one day earlier: 20:00..23:00 of day 6 and 00:00..07:00 of day 7
    day_before = [50 + 2 * h + 18 for h in range(20, 24)] + [50 + 2 * h + 21 for h in range(8)]
    assert f.yesterday.ahead_mean == pytest.approx(np.mean(day_before)) and f.yesterday.ahead_relation == "below"
    # neighbours by distance: Tiantan (~4.9 km) then Guanyuan (~6.7 km); changes -11 and -5.5
    assert f.neighbours.ids == ["tiantan", "guanyuan"] and f.neighbours.distances[0] < f.neighbours.distances[1]
    assert f.neighbours.mean_change == pytest.approx(-8.25) and f.neighbours.direction == "down"
    w = {x.name: x for x in f.weather}
    assert (w["temperature"].first, w["temperature"].last, w["temperature"].direction) == (9.0, 14.5, "up")
    assert w["rain"].direction == "flat" and w["wind_speed"].change == pytest.approx(1.1)
    assert w["wind_speed"].effect == pytest.approx(-22.0, rel=1e-5) and w["temperature"].effect is None
    assert (f.wind.first, f.wind.last, f.wind.turn_deg) == ("W", "N", pytest.approx(110.0))
    assert (f.calendar.weekday, f.calendar.is_weekend, f.calendar.hour) == ("Monday", False, 20)
    assert [(x.kind, x.push) for x in f.factors] == [("trend", "up"), ("yesterday", "down"), ("last_week", "down"),
                                                     ("neighbours", "down"), ("weather", "down")]


def test_facts_read_only_the_past_and_future_facts_the_future(city):
    before = compute_facts(city, 0, START).to_dict()
    changed = hand_city()
    changed.values[START:] = 999.0
    changed.exog[START:] = -5.0
    assert compute_facts(changed, 0, START).to_dict() == before
    fut = future_facts(changed, 0, START)
    assert fut.values == [999.0] * 12 and fut.direction == "up" and fut.last_observed == 109.0
    truth = future_facts(city, 0, START)
    assert truth.values == [50 + 2 * h + 21 for h in range(20, 24)] + [50 + 2 * h + 24 for h in range(8)]


def test_facts_accept_ids_timestamps_and_the_step_after_the_data(city):
    a = compute_facts(city, "dongsi", pd.Timestamp("2024-03-11 20:00"))
    assert a.to_dict() == compute_facts(city, 0, START).to_dict()
    end = compute_facts(city, "Tiantan", city.n_steps)          # a forecast past the end of the data
    assert end.start == "2024-03-13 00:00" and end.calendar.target_end == "2024-03-13 11:00"


def test_facts_round_trip_through_json(city):
    f = compute_facts(city, 0, START, effects=WIND_EFFECT)
    d = json.loads(json.dumps(f.to_dict()))
    assert Facts.from_dict(d).to_dict() == d


def test_estimate_effects_finds_a_planted_effect_from_the_training_part_only():
    rng = np.random.default_rng(0)
    t, n, lag = 24 * 40, 4, 12
    wind = np.cumsum(rng.normal(0, 0.3, t))                              # a random walk
    values = np.empty((t, n, 1), np.float32)
    values[:, :, 0] = 100 - 5 * np.roll(wind, lag)[:, None] + rng.normal(0, 0.5, (t, n))  # follows wind 12 h late
    exog = np.stack([wind, rng.normal(0, 1, t)], axis=-1)[:, None, :].astype(np.float32)
    city = CityData(name="planted", values=values, timestamps=pd.date_range("2024-01-01", periods=t, freq="1h"),
                    interval="1h", channels=["pm"], units=["ug/m3"], nodes=pd.DataFrame({"id": list("abcd")}),
                    exog=exog, exog_names=["wind_speed", "noise"])
    train_end = 24 * 28
    eff = estimate_effects(city, train_end)["pm"]
    assert eff["wind_speed"].slope < -1 and eff["wind_speed"].corr < -0.3 and eff["wind_speed"].usable
    assert abs(eff["noise"].corr) < 0.1
    city.values[train_end:] = rng.normal(0, 100, city.values[train_end:].shape)   # the test part is not read
    assert estimate_effects(city, train_end)["pm"]["wind_speed"] == eff["wind_speed"]


# --------------------------------------------------------------------------------------------- templates


def test_node_prompt_golden(city):
    assert render_node_prompt(compute_facts(city, "Dongsi", START)) == GOLDEN_NODE


def test_rationale_golden(city):
    facts = compute_facts(city, "Dongsi", START, effects=WIND_EFFECT)
    assert render_rationale(facts, FORECAST) == GOLDEN_RATIONALE
    slot = render_rationale(facts, FORECAST, fill=False)
    assert slot.count(FORECAST_SLOT) == 1 and "110.0" not in slot
    assert slot.replace(FORECAST_SLOT, "X") == GOLDEN_RATIONALE.split("(ug/m3): ")[0] + "(ug/m3): X\n"


def test_rationale_follows_the_forecast_direction(city):
    facts = compute_facts(city, "Dongsi", START)
    down = render_rationale(facts, [90.0] * 12)
    assert "expected to fall" in down and "PM2.5 rose over the last 12 hours, which pushes up; " in down
    assert "The downward pushes outweigh the upward ones." in down
    assert "expected to stay about level" in render_rationale(facts, [109.5] * 12)
    assert FORECAST_SLOT in render_rationale(facts)                    # no numbers yet: the slot stays


GOLDEN_SLOTTED_FACTORS = (
    "4. Factors: {trend}, which pushes up; {hours:yesterday}, which pushes down; {hours:last_week}, which pushes "
    "down; {neighbours}, which pushes down; {weather:wind_speed}, which pushes down.\n")


def test_fact_slots_give_back_the_plain_rationale(city):
    facts = compute_facts(city, "Dongsi", START, effects=WIND_EFFECT)
    slotted = render_rationale(facts, FORECAST, fill=False, fact_slots=True)
    assert slotted.startswith("1. Question: {question}\n2. Drivers: {drivers}\n3. Recent data: {recent}\n"
                              + GOLDEN_SLOTTED_FACTORS + "5. Conclusion: {conclusion} Forecast")
    segments = fill_facts(slotted, facts, FORECAST)
    assert "".join(t for t, _ in segments) == render_rationale(facts, FORECAST, fill=False)
    words = "".join(t for t, by_program in segments if not by_program)
    assert not re.search(r"\d\.\d", words.replace("PM2.5", "")) and "{" not in words.replace(FORECAST_SLOT, "")
    assert [t for t, by_program in segments if by_program][-1] == \
        "The upward pushes outweigh the downward ones. PM2.5 at Dongsi is expected to rise over the next 12 hours."
    assert "expected to fall" in "".join(t for t, _ in fill_facts(slotted, facts, [90.0] * 12))
    assert fact_text(facts, "effect:no_such_weather", "up") == "" and fact_text(facts, "colour", "up") is None
    assert fact_text(facts, "weather:no_such_weather", "up") == ""
    # {conclusion} balances the pushes stated before it (the student's, at generation) toward the forecast
    assert fact_text(facts, "conclusion", "down", "4. Factors: {trend}, which pushes up.").startswith(
        "The move down comes from influences outside these facts. PM2.5 at Dongsi is expected to fall")
    assert fact_text(facts, "conclusion", "down", "... which pushes up; ... which pushes down.").startswith(
        "The downward pushes outweigh the upward ones.")
    effect = fact_text(facts, "effect:wind_speed", "up")
    assert fact_text(facts, "weather:wind_speed", "up") == f"wind speed rose {effect}"
    assert fact_text(facts, "weather:rain", "up") == "rain held steady"    # 0.0 -> 0.0 mm, no effect known
    plain = AnalyticTeacher().explain(city, "Dongsi", START, effects=WIND_EFFECT)
    slots = AnalyticTeacher(fact_slots=True).explain(city, "Dongsi", START, effects=WIND_EFFECT)
    assert slots.text != plain.text and slots.filled() == plain.filled()     # the true future falls
    assert "expected to rise" in slots.filled(FORECAST)   # {conclusion} follows the numbers it is filled with


# ---------------------------------------------------------------------------------------------- teachers


def test_analytic_teacher_states_the_true_direction_and_keeps_the_slot(synth):
    teacher = AnalyticTeacher()
    seen = set()
    for node in range(0, 8, 3):
        for s in range(24 * 8, synth.n_steps - 12, 41):
            r = teacher.explain(synth, node, s)
            fut = future_facts(synth, node, s)
            assert isinstance(r, Rationale) and r.teacher_name == "analytic"
            assert r.text.count(FORECAST_SLOT) == 1 and r.target == fut.values
            assert r.prompt == render_node_prompt(Facts.from_dict(r.facts))
            verb = {"up": "rise", "down": "fall", "flat": "stay about level"}[fut.direction]
            assert f"is expected to {verb} over the next 12 hours." in r.text
            assert r.filled().endswith(
                "[" + ", ".join("NA" if v is None else f"{v:.1f}" for v in fut.values) + "]")
            seen.add(fut.direction)
    assert {"up", "down"} <= seen


STUB_REPLY = "1. Question: ... 5. Conclusion: flow should rise."


class _Stub(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible server: records each request, answers with STUB_REPLY (or HTTP 500)."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.startswith("/broken"):
            self.send_error(500, "model exploded")
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": STUB_REPLY}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_openai_teacher_against_a_local_stub(stub_server, city, monkeypatch):
    monkeypatch.setenv("STLLM_TEST_KEY", "secret")
    url = f"http://127.0.0.1:{stub_server.server_address[1]}"
    teacher = OpenAITeacher(url, model="stub-model", api_key_env="STLLM_TEST_KEY", timeout=10)
    r = teacher.explain(city, "Dongsi", START)
    (req,) = stub_server.requests
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer secret"
    body = req["body"]
    assert body["model"] == "stub-model" and [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "PM2.5 rose by 22.0 ug/m3 (+25%)" in user and "<ST_" not in user
    # the truth (mean 92.0 next, from 109.0) reaches the teacher in words only
    assert "over the next 12 hours, PM2.5 fell clearly" in user and "92" not in user
    assert r.teacher_name == "openai:stub-model" and r.text.startswith(STUB_REPLY)
    assert r.text.endswith(FORECAST_SLOT)                         # the reply had no slot: the program adds one
    assert r.target == future_facts(city, "Dongsi", START).values and r.prompt == GOLDEN_NODE


def test_openai_teacher_errors_name_the_url(stub_server, monkeypatch):
    monkeypatch.delenv("STLLM_TEST_KEY", raising=False)
    with pytest.raises(TeacherError, match=r"STLLM_TEST_KEY.*api\.example\.com"):
        OpenAITeacher("https://api.example.com/v1", "m", api_key_env="STLLM_TEST_KEY")
    local = f"http://127.0.0.1:{stub_server.server_address[1]}"
    with pytest.raises(TeacherError, match=r"HTTP 500"):          # localhost needs no key
        OpenAITeacher(local + "/broken", "m", api_key_env="STLLM_TEST_KEY").complete([])
    with socket.socket() as sock:                                 # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TeacherError, match=rf"cannot reach http://127\.0\.0\.1:{port}/v1/chat/completions"):
        OpenAITeacher(f"http://127.0.0.1:{port}", "m", api_key_env="STLLM_TEST_KEY", timeout=5).complete([])


def test_hf_chat_teacher_plumbing_with_tiny_llama(city):
    from stllm.backbone import BackboneConfig, build_backbone

    model, tokenizer = build_backbone(BackboneConfig(name="tiny-llama", lora_r=0))
    teacher = HFChatTeacher(model, tokenizer, max_new_tokens=6)
    r = teacher.explain(city, "Dongsi", START)
    assert r.teacher_name.startswith("hf:") and r.text.endswith(FORECAST_SLOT)
    generated = r.text.split("\nForecast for the next")[0]
    assert 0 < len(tokenizer(generated, add_special_tokens=False)["input_ids"]) <= 12   # random weights: gibberish
    assert r.facts["node_id"] == "dongsi" and len(r.target) == 12


# ----------------------------------------------------------------------------------------------- dataset


def test_distill_dataset_round_trip(city, tmp_path):
    samples = [("dongsi", START), ("Tiantan", START - 5), (2, pd.Timestamp("2024-03-11 09:00"))]
    ds = distill(city, AnalyticTeacher(), samples, effects=WIND_EFFECT)
    assert ds.column_names == ["prompt", "rationale", "target", "teacher", "facts", "node", "start"]
    assert ds["node"] == ["dongsi", "tiantan", "guanyuan"]
    assert ds["start"] == ["2024-03-11 20:00", "2024-03-11 15:00", "2024-03-11 09:00"]
    assert ds[0]["prompt"] == GOLDEN_NODE and ds[0]["teacher"] == "analytic"
    assert ds[0]["rationale"].replace(FORECAST_SLOT, "X").startswith(GOLDEN_RATIONALE[:200])
    assert ds[0]["target"] == future_facts(city, 0, START).values
    out = save_rationales(ds, tmp_path / "rationales")
    assert (out / "dataset" / "dataset_info.json").is_file()
    lines = (out / "rationales.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["node"] == "tiantan"
    back = load_rationales(out)
    assert back.to_list() == ds.to_list()
    facts = Facts.from_dict(json.loads(back[0]["facts"]))
    assert facts.trend.change == 22.0 and facts.weather[2].effect == pytest.approx(-22.0, rel=1e-5)
    shutil.rmtree(out / "dataset")                             # no dataset folder: the JSONL is read instead
    assert load_rationales(out).to_list() == ds.to_list()
    with pytest.raises(FileNotFoundError, match="save_rationales"):
        load_rationales(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ stllm distill

TINY_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def test_distill_command_writes_checkable_rationales(tmp_path, capsys):
    from stllm.cli import main
    from stllm.data.synthetic import make_city
    out = tmp_path / "rationales"
    assert main(["distill", "--config", TINY_CONFIG, "--out", str(out), "--set", "explain.n_samples=5"]) == 0
    assert "5 rationales by the analytic teacher" in capsys.readouterr().out
    ds = load_rationales(out)
    assert len(ds) == 5 and set(ds["teacher"]) == {"analytic"}
    assert ds.column_names == ["prompt", "rationale", "target", "teacher", "facts", "node", "start"]
    assert (out / "rationales.jsonl").read_text().count("\n") == 5 and (out / "effects.json").is_file()
    from stllm.distill import check_explanation
    from stllm.distill.facts import effects_from_dict
    city = make_city(n_nodes=6, n_days=21, seed=0)             # tiny.yaml's city
    effects = effects_from_dict(json.loads((out / "effects.json").read_text()))
    for row in ds:                                              # every claim the teacher wrote holds on the data
        assert "{recent}" in row["rationale"]                   # explain.fact_slots (default): written by the program
        text = "".join(t for t, _ in fill_facts(row["rationale"], Facts.from_dict(json.loads(row["facts"])),
                                                row["target"]))
        report = check_explanation(text, city, row["node"], pd.Timestamp(row["start"]), effects=effects)
        assert report.claims and report.faithfulness == 1.0


def test_distill_command_with_an_openai_compatible_teacher(stub_server, tmp_path):
    from stllm.cli import main
    url = f"http://127.0.0.1:{stub_server.server_address[1]}/v1"
    out = tmp_path / "r"
    assert main(["distill", "--config", TINY_CONFIG, "--out", str(out), "--set", "explain.n_samples=2",
                 "explain.teacher=openai:stub-model", f"explain.teacher_url={url}"]) == 0
    ds = load_rationales(out)
    assert ds["teacher"] == ["openai:stub-model"] * 2 and len(stub_server.requests) == 2
    assert all(r.startswith(STUB_REPLY) for r in ds["rationale"])


def test_distill_command_errors(tmp_path, capsys):
    from stllm.cli import main
    assert main(["distill", "--config", TINY_CONFIG, "--out", str(tmp_path / "r"),
                 "--set", "explain.teacher=openai:m"]) == 2
    assert "explain.teacher_url" in capsys.readouterr().err
    assert main(["distill", "--config", TINY_CONFIG, "--out", str(tmp_path / "r"),
                 "--set", "explain.teacher=gpt-4"]) == 2
    assert "hf:<model folder>" in capsys.readouterr().err


def test_slot_names_a_student_may_write_are_kept_within_the_windows_factors():
    from types import SimpleNamespace

    import torch

    from stllm.distill.node_layout import _next_token, _slot_ok
    allowed = {"trend": "", "neighbours": "", "conclusion": "Conclusion: ", "forecast": ""}
    assert _slot_ok("which pushes up; {tre", allowed) and _slot_ok("no slot here", allowed)
    assert _slot_ok("{trend}", allowed) and _slot_ok("{trend}, which", allowed)
    assert not _slot_ok("{dri", allowed) and not _slot_ok("{drivers}", allowed)
    assert not _slot_ok("{weather:wind_speed}", allowed)
    assert not _slot_ok("{tre {neighbours}", allowed)                 # no slot opened inside another
    assert _slot_ok(".\n5. Conclusion: {conclusion}", allowed) and not _slot_ok("4. Factors: {conclusion}", allowed)
    texts = {0: "; {drivers}", 1: "; {neighbours}", 2: "; {trend}", 3: "; {dri"}
    tok = SimpleNamespace(eos_token_id=99)
    logits = torch.tensor([5.0, 1.0, 3.0, 4.0])                     # the best two open a slot not allowed
    assert _next_token(logits, tok, texts.get, allowed) == 2
    assert _next_token(logits, tok, texts.get, None) == 0           # unconstrained: plain greedy
    assert _next_token(logits, tok, texts.get, allowed, top=1) == 2  # beyond the first `top`: all tokens


def test_stage4_slot_names_are_the_teachers_factor_slots(city):
    from stllm.distill.teachers import stage4_slot_names
    facts = compute_facts(city, "Dongsi", START, effects=WIND_EFFECT)
    slotted = render_rationale(facts, fact_slots=True, fill=False)
    stage4 = slotted[slotted.index("4. Factors:"):slotted.index("5. Conclusion:")]
    named = set(re.findall(r"\{([^}]+)\}", stage4))
    assert named and named | {"conclusion", "forecast"} == set(stage4_slot_names(facts))
