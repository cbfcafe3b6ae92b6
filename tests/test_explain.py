"""Explained forecasts (stllm.explain, `stllm explain`) and the explaining student (stllm.distill.student)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import stllm.explain as explain_module
from stllm.cli import main
from stllm.config import load_config
from stllm.data.city import DataError
from stllm.data.synthetic import make_city
from stllm.distill import FORECAST_SLOT, check_explanation, compute_facts, format_forecast
from stllm.distill.node_layout import target_ids
from stllm.distill.student import joint_loss, make_samples, make_teacher, pick_windows, train_student
from stllm.data.fit import resolve_time
from stllm.explain import explain, format_explanation
from stllm.infer import forecast
from stllm.model import STLLM
from stllm.train import build_model, make_optimizer, train

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
LLAMA = ["backbone.name=tiny-llama"]
AT = 400                     # a window in the middle of the 21-day city (history 388..399)


def _city():
    return make_city(n_nodes=6, n_days=21, seed=0)           # the city configs/tiny.yaml names


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (2-layer random LLaMA + LoRA), loaded back from its folder."""
    out = tmp_path_factory.mktemp("explain") / "run"
    train(load_config(TINY, LLAMA + ["train.max_steps=3"]), out, city=_city(), progress=False)
    return out, STLLM.from_pretrained(out)


@pytest.fixture(scope="module")
def city():
    return _city()


def _stated_forecast(text: str) -> list[float]:
    """The numbers of the last bracketed list in the text."""
    body = re.findall(r"\[([^\]]*)\]", text)[-1]
    return [float(x) for x in body.split(",")]


# ------------------------------------------------------------------------------------------------ explain


def test_forecast_is_the_heads_output_for_that_window(run, city):
    _, model = run
    at = pd.Timestamp(city.timestamps[AT])
    r = explain(model, city, "S03", at)
    _, pred, true = next(forecast(model, model.prepare(city), np.array([AT])))
    i = city.node_index("S03")[0]
    np.testing.assert_allclose(r["forecast"], pred[0, :, i, 0], rtol=1e-6)
    assert r["at"] == at.strftime("%Y-%m-%d %H:%M") and len(r["timestamps"]) == 12
    assert r["timestamps"][0] == r["at"] and r["history_timestamps"][-1] == \
        (at - city.interval).strftime("%Y-%m-%d %H:%M")
    truth = [None if not np.isfinite(v) else v for v in true[0, :, i, 0]]
    assert r["truth"] == pytest.approx(truth)
    # an int step index is the same window; `at` is the first forecast step
    assert explain(model, city, 3, AT)["forecast"] == r["forecast"]


def test_analytic_numbers_are_the_heads_and_claims_hold(run, city):
    _, model = run
    prep = model.prepare(city)
    for node, s in [(0, AT), (2, 250), (5, 480), (1, 300)]:
        r = explain(model, prep, node, s)                            # prepared once for all four
        assert r["mode"] == "analytic"
        assert format_forecast(r["forecast"]) in r["explanation"]
        assert _stated_forecast(r["explanation"]) == pytest.approx(r["forecast"], abs=0.05 + 1e-9)
        assert r["numbers_consistent"] is True and r["forecast_consistent"] is True
        assert r["faithfulness"] == 1.0
        assert all(c["verdict"] in ("holds", "unchecked") for c in r["claims"]) and r["claims"]


def test_generated_mode_inserts_the_heads_numbers(run, city):
    _, model = run
    r = explain(model, city, "S01", AT, mode="generated", max_new_tokens=24)
    assert r["mode"] == "generated" and r["generation"]["new_tokens"] <= 24
    assert r["generation"]["tokens_per_s"] > 0
    assert _stated_forecast(r["explanation"]) == pytest.approx(r["forecast"], abs=0.05 + 1e-9)
    assert r["numbers_consistent"] is True
    analytic = explain(model, city, "S01", AT)
    assert r["forecast"] == analytic["forecast"]                  # same head, same window


def test_generated_mode_on_gpt2_stops_before_its_learned_positions_end(tmp_path, city):
    """GPT-2's positions are a learned table: past its last row the model raised an IndexError inside transformers.
    With a table just longer than the prompt, generation now stops there and says so."""
    out = tmp_path / "gpt2"
    train(load_config(TINY, ["backbone.name=tiny-gpt2", "train.max_steps=2"]), out, city=city, progress=False)
    model = STLLM.from_pretrained(out)
    r = explain(model, city, "S01", AT, mode="generated", max_new_tokens=16)
    assert r["generation"]["stopped_by"] in ("eos", "max_new_tokens") and r["numbers_consistent"] is True
    limit = r["generation"]["prompt_tokens"] + 3
    gpt2 = model.backbone.get_base_model().transformer
    gpt2.wpe = torch.nn.Embedding(limit, gpt2.wpe.embedding_dim)           # a shorter table, as a smaller model has
    gpt2.config.n_positions = limit
    r = explain(model, city, "S01", AT, mode="generated", max_new_tokens=50)
    assert r["generation"]["stopped_by"] == "context" and r["generation"]["new_tokens"] == 4


def test_generation_stops_where_the_models_positions_end(run, city, monkeypatch):
    """A prompt that fills the model's context is a clear error; one that leaves a few positions gets that many
    tokens and says why it stopped."""
    _, model = run
    prompt = explain(model, city, "S01", AT, mode="generated", max_new_tokens=1)["generation"]["prompt_tokens"]
    config = model.backbone.config
    monkeypatch.setattr(config, "max_position_embeddings", prompt + 5)
    r = explain(model, city, "S01", AT, mode="generated", max_new_tokens=50)
    # five free positions: five tokens fed back, and a sixth read from the last one's logits
    assert r["generation"]["stopped_by"] == "context" and r["generation"]["new_tokens"] == 6
    assert r["numbers_consistent"] is True                        # the head's numbers are still written in
    monkeypatch.setattr(config, "max_position_embeddings", prompt)
    with pytest.raises(ValueError, match=f"prompt is {prompt} tokens.*at most {prompt} positions"):
        explain(model, city, "S01", AT, mode="generated")


def test_sampled_forecast_digits_never_survive(run, city, monkeypatch):
    """A language model that writes its own numbers: the program replaces them with the head's."""
    _, model = run
    fake = lambda *a, **k: ([("It will rise. Forecast: [1.0, 2.0, 3.0]; the end.", False)],  # noqa: E731
                            {"new_tokens": 9, "seconds": 0.1, "tokens_per_s": 90.0})
    monkeypatch.setattr(explain_module, "generate_rationale", fake)
    r = explain(model, city, 0, AT, mode="generated")
    assert "[1.0, 2.0, 3.0]" not in r["explanation"]
    assert _stated_forecast(r["explanation"]) == pytest.approx(r["forecast"], abs=0.05 + 1e-9)
    assert r["numbers_consistent"] is True
    assert r["faithfulness"] is None and "no fact the checker can test" in r["warning"]
    assert "warning: " in format_explanation(r)


class _ScriptedBackbone:
    """Stands in for a language model: call k puts the largest logit on script[k] (then EOS), whatever it is fed;
    records the token ids fed to it after the prompt."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        self.script, self.vocab, self.fed = script + [eos], vocab, []

    def __call__(self, input_ids=None, inputs_embeds=None, past_key_values=None, **_):
        if input_ids is not None:
            self.fed.append(input_ids[0].tolist())
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, -1, self.script[min(len(self.fed), len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_generation_fills_fact_slots_as_they_are_written(run):
    from stllm.distill.node_layout import NodeInputs, generate_with_facts
    tok = run[1].tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first, second = ids("3. Recent data: {recent}"), ids("\n4. Factors: {hours:yesterday}; flow rose.")
    backbone = _ScriptedBackbone(first + second, len(tok), tok.eos_token_id)
    inputs = NodeInputs(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3), None, None)
    facts, asked = {"recent": "Flow rose by 5.0."}, []          # {hours:yesterday}: unknown here, stays as written

    def fill(name, written):
        asked.append((name, written))
        return facts.get(name)

    segments, counts = generate_with_facts(SimpleNamespace(tokenizer=tok, backbone=backbone), inputs, fill)
    assert asked == [("recent", "3. Recent data: "),                # each slot sees the text written before it
                     ("hours:yesterday", "3. Recent data: Flow rose by 5.0.\n4. Factors: ")]
    assert segments == [("3. Recent data: ", False), ("Flow rose by 5.0.", True),
                        ("\n4. Factors: {hours:yesterday}; flow rose.", False)]
    assert counts == {"new_tokens": len(first + second), "filled_tokens": len(ids("Flow rose by 5.0.")),
                      "stopped_by": "eos"}
    # the program's text is fed right after the slot's last token, as in training (target_ids)
    assert backbone.fed[len(first) - 1] == [first[-1]] + ids("Flow rose by 5.0.")
    assert [x for feed in backbone.fed for x in feed] == first + ids("Flow rose by 5.0.") + second


def _generated(model, city, monkeypatch, written: str) -> dict:
    """explain in generated mode where the program fills {recent} and the model writes `written` after it."""
    def fake(model, prep, node, start, prompt, max_new_tokens, fill, opening=(), allowed=None):
        return ([("3. Recent data: ", False), (fill("recent", "3. Recent data: "), True), (written, False)],
                {"new_tokens": 20, "filled_tokens": 60, "seconds": 0.1, "tokens_per_s": 200.0})

    monkeypatch.setattr(explain_module, "generate_rationale", fake)
    return explain(model, city, 0, AT, mode="generated")


def test_generated_claims_say_who_wrote_them(run, city, monkeypatch):
    """The program's fact text is checked like the rest; the claims in the model's own words are counted apart."""
    _, model = run
    rising = compute_facts(city, 0, AT).trend.direction == "up"
    right, wrong = ("flow rose recently", "flow fell recently")[::1 if rising else -1]
    r = _generated(model, city, monkeypatch, f"\n4. Factors: Pushing one way: {right}. Pushing the other: {wrong}.")
    assert "The latest reading is" in r["explanation"] and "{recent}" not in r["explanation"]
    assert {c["by"] for c in r["claims"]} == {"program", "model"}
    own = [c for c in r["claims"] if c["by"] == "model" and c["holds"] is not None]
    assert r["model_claims"] == len(own) == 2 and r["model_faithfulness"] == 0.5
    assert [c["text"] for c in own if c["holds"] is False] == [wrong.split()[1]]
    program = [c for c in r["claims"] if c["by"] == "program"]
    assert all(c["holds"] is True for c in program) and any(c["kind"] == "last_value" for c in program)
    assert r["by_writer"]["program"]["checked"] == len(program) and r["by_writer"]["program"]["hold_share"] == 1.0
    assert 0.5 < r["faithfulness"] < 1.0 and r["numbers_consistent"] is True


def test_a_planted_wrong_model_fact_fails_that_claim_alone(run, city, monkeypatch):
    _, model = run
    facts = compute_facts(city, 0, AT)
    planted = f"{facts.last_value * 2 + 50:.1f}"
    r = _generated(model, city, monkeypatch, f"\n4. Factors: The latest reading is {planted}, which matters.")
    failed = [c for c in r["claims"] if c["holds"] is False]
    assert [(c["by"], c["kind"], c["stated"]) for c in failed] == [("model", "last_value", float(planted))]
    assert planted in failed[0]["text"]
    assert r["by_writer"]["model"] == {"checked": 1, "hold": 0, "hold_share": 0.0, "unparsed": 0,
                                       "unparsed_share": 0.0}
    assert all(c["holds"] is True for c in r["claims"] if c["by"] == "program")   # the same value, right, in {recent}


def test_an_unparsed_checkable_sentence_is_null_and_counted(run, city, monkeypatch):
    _, model = run
    r = _generated(model, city, monkeypatch, "\n4. Factors: Yesterday at this hour flow rose by 12.5.")
    unparsed = [c for c in r["claims"] if c["verdict"] == "unparsed"]
    assert [(c["by"], c["holds"], c["text"]) for c in unparsed] == [
        ("model", None, "Yesterday at this hour flow rose by 12.5.")]
    assert r["by_writer"]["model"]["unparsed"] == 1 and r["by_writer"]["model"]["unparsed_share"] == 1.0
    assert r["by_writer"]["program"]["unparsed"] == 0
    assert "1 clause(s) not parsed" in r["summary"] and "1 not parsed" in format_explanation(r)


def test_analytic_claims_are_all_the_programs(run, city):
    _, model = run
    r = explain(model, city, 1, AT)
    assert r["claims"] and {c["by"] for c in r["claims"]} == {"program"}
    assert r["by_writer"]["model"] == {"checked": 0, "hold": 0, "hold_share": None, "unparsed": 0,
                                       "unparsed_share": None}
    assert r["by_writer"]["program"]["unparsed"] == 0 and r["model_claims"] == 0


def test_a_wrong_claim_is_caught(run, city):
    _, model = run
    r = explain(model, city, 2, AT)
    m = re.search(r"The latest reading is ([\d.]+)", r["explanation"])
    wrong = r["explanation"].replace(m.group(0), f"The latest reading is {float(m.group(1)) * 3 + 50:.1f}")
    report = check_explanation(wrong, city, 2, AT, forecast=r["forecast"])
    assert report.faithfulness < 1.0
    assert [(c.kind, c.quantity) for c in report.failed] == [("last_value", "value")]
    other = [v + 10 for v in r["forecast"]]                      # numbers that are not the head's
    report = check_explanation(r["explanation"], city, 2, AT, forecast=other)
    assert report.numbers_consistent is False


def test_bad_inputs_give_clear_errors(run, city):
    _, model = run
    with pytest.raises(DataError, match=r"unknown node 'S99'.*S00, S01, S02, S03, S04, S05"):
        explain(model, city, "S99", AT)
    with pytest.raises(DataError, match=r"outside the data.*2024-01-01 12:00:00 \.\. 2024-01-22 00:00:00"):
        explain(model, city, 0, "2030-01-01 00:00")
    with pytest.raises(DataError, match="outside the data"):
        explain(model, city, 0, pd.Timestamp(city.timestamps[3]))   # not enough history
    with pytest.raises(DataError, match="grid"):
        explain(model, city, 0, "2024-01-10 10:30")
    with pytest.raises(ValueError, match="mode must be one of"):
        explain(model, city, 0, AT, mode="poetry")
    # one step after the data ends is a forecast into the unknown: no truth
    r = explain(model, city, 0, city.n_steps)
    assert r["truth"] == [None] * 12 and r["numbers_consistent"] is True
    assert resolve_time(city, city.timestamps[AT], 12) == AT


def test_encoder_only_run_explains_analytically_only(tmp_path, city):
    out = tmp_path / "enc"
    train(load_config(TINY, ["model.use_llm=false", "train.max_steps=2"]), out, city=city, progress=False)
    model = STLLM.from_pretrained(out)
    assert explain(model, city, 0, AT)["faithfulness"] == 1.0
    with pytest.raises(ValueError, match="neither a writer.*nor a language model.*only mode 'analytic'"):
        explain(model, city, 0, AT, mode="generated")


# ----------------------------------------------------------------------------------------------------- cli


def test_cli_json_and_plot(run, city, tmp_path, capsys):
    out, _ = run
    at = str(pd.Timestamp(city.timestamps[AT]))
    png = tmp_path / "e.png"
    assert main(["explain", "--run", str(out), "--node", "S02", "--at", at, "--json", "--plot", str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"forecast", "timestamps", "explanation", "claims", "faithfulness", "numbers_consistent", "truth",
            "mode", "history"} <= set(r)
    assert r["mode"] == "analytic" and r["faithfulness"] == 1.0 and len(r["forecast"]) == 12
    assert r["claims"] and all(c["by"] == "program" and c["holds"] in (True, None) and c["text"] for c in r["claims"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["explain", "--run", str(out), "--node", "S02", "--at", at, "--mode", "generated",
                 "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "mode generated" in text and "forecast numbers consistent: True" in text and "tokens/s" in text
    assert "claims in the model's own words: " in text


def test_cli_errors(run, capsys):
    out, _ = run
    assert main(["explain", "--run", str(out), "--node", "nowhere", "--at", "2024-01-10 10:00"]) == 2
    err = capsys.readouterr().err
    assert "unknown node 'nowhere'" in err and "S00" in err
    assert main(["explain", "--run", str(out), "--node", "S00", "--at", "1999-01-01"]) == 2
    assert "outside the data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- student


@pytest.mark.parametrize("fact_slots", [False, True])
def test_node_layout_places_slots_and_labels_only_the_rationale(run, city, fact_slots):
    from stllm.distill.node_layout import node_inputs, slot_vectors
    _, model = run
    prep = model.prepare(city)
    samples, _ = make_samples(city, prep, [(AT, 1), (AT + 5, 4)], make_teacher("analytic", fact_slots=fact_slots))
    batch = prep.batch(np.array([AT, AT + 5]))
    with torch.no_grad():
        his, pre, base = slot_vectors(model, batch)                             # [2, N, m, d], [2, N, d], ...
        inputs = node_inputs(model, his, pre, [(0, 1), (1, 4)], [x.prompt for x in samples],
                             [x.target for x in samples], base=base)
    for k, (w, n) in enumerate([(0, 1), (1, 4)]):
        torch.testing.assert_close(inputs.embeds[k, inputs.his_pos[k]], his[w, n])
        torch.testing.assert_close(inputs.embeds[k, inputs.pre_pos[k]], pre[w, n])
        torch.testing.assert_close(inputs.base[k, :, 0], base[w, :, n])            # the node's encoder read-out
        labelled = inputs.labels[k][inputs.labels[k] != -100].tolist()
        assert labelled[-1] == model.tokenizer.eos_token_id
        # only the rationale is learned; with fact slots, the slot names but not the text the program writes for them
        written = "".join(t for t, by_program in samples[k].target if not by_program)
        assert written == samples[k].rationale
        assert model.tokenizer.decode(labelled[:-1]) == written
        if fact_slots:                                          # the program's text for {recent} is context, not a target
            ids, labels = target_ids(model.tokenizer, samples[k].target)
            assert "{recent}" in written and "The latest reading is" not in written
            assert "The latest reading is" in model.tokenizer.decode([i for i, x in zip(ids, labels) if x == -100])
            assert [x for x in labels if x != -100] == labelled
        assert inputs.labels[k, : inputs.pre_pos[k] + 1].eq(-100).all()
        n_real = int(inputs.attention_mask[k].sum())
        assert inputs.labels[k, n_real:].eq(-100).all()                           # padding is not learned


def test_joint_loss_decreases_on_a_tiny_model(city):
    torch.manual_seed(0)
    cfg = load_config(TINY, LLAMA + ["train.lr=0.003", "train.lora_lr=0.01"])
    from stllm.data.prepared import PreparedCity
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep)
    samples, _ = make_samples(city, prep, pick_windows(prep, 4), make_teacher("analytic"))
    assert all("{forecast}" in x.rationale and "<ST_HIS>" in x.prompt for x in samples)
    opt = make_optimizer(model, cfg)
    model.train()
    history = []
    for _ in range(12):
        loss, parts = joint_loss(model, prep, samples, lm_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({**parts, "total": loss.item()})
    # a random tiny LM starts near the uniform ln(384) = 5.95 nats and its frozen, tied LM head keeps logits small,
    # so the rationale loss falls slowly there; it must still fall, together with both regression terms
    assert history[-1]["total"] < 0.92 * history[0]["total"]
    assert history[-1]["lm"] < history[0]["lm"] - 0.03
    assert history[-1]["regression"] < history[0]["regression"]
    assert history[-1]["city"] < history[0]["city"]


def test_push_accuracy_reads_each_push_the_teacher_states(city, monkeypatch):
    """A student that always says "up" is right exactly on the teacher's upward pushes, one that always says
    "down" on the others."""
    import re
    from types import SimpleNamespace

    from stllm.data.prepared import PreparedCity
    from stllm.distill import student
    torch.manual_seed(0)
    cfg = load_config(TINY, LLAMA)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    samples, _ = make_samples(city, prep, pick_windows(prep, 6), make_teacher("analytic"))
    stated = re.findall(r"pushes (up|down)", " ".join(x.rationale for x in samples))
    assert stated.count("up") and stated.count("down")                       # both kinds occur in this fixture
    tok = model.tokenizer
    up, down = (tok(f" {w}", add_special_tokens=False)["input_ids"] for w in ("up", "down"))
    k = next(j for j, (a, b) in enumerate(zip(up, down)) if a != b)
    for favoured in ("up", "down"):
        def logits(h, favoured=favoured):
            out = torch.zeros(len(tok))
            out[(up if favoured == "up" else down)[k]] = 1.0
            return out
        fake = SimpleNamespace(get_output_embeddings=lambda: logits)
        monkeypatch.setattr(student, "base_model", lambda backbone: fake)
        acc = student.push_accuracy(model, prep, samples)
        assert acc["total"] == len(stated)
        assert acc["correct"] == stated.count(favoured)


def test_train_student_writes_a_run_that_explains(tmp_path, city, monkeypatch):
    out = tmp_path / "student"
    cfg = load_config(TINY, LLAMA + ["train.max_steps=3", "explain.enabled=true", "explain.form=slots", "explain.n_samples=6",
                                     "explain.steps=3"])
    metrics = train_student(cfg, out, city=city, progress=False)
    for name in ("config.yaml", "model.safetensors", "meta.json", "metrics.json", "log.jsonl", "effects.json",
                 "adapter", "rationales", "forecaster/model.safetensors", "forecaster/metrics.json"):
        assert (out / name).exists(), name
    assert metrics["explain"]["forecaster_test_mae"] == json.loads((out / "forecaster/metrics.json").read_text())["mae"]
    assert metrics["training"]["steps"] == 3 and np.isfinite(metrics["mae"])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(np.isfinite(x["lm"]) for x in logged)
    model = STLLM.from_pretrained(out)
    from stllm.distill.facts import effects_from_dict, effects_to_dict, estimate_effects
    saved = json.loads((out / "effects.json").read_text())          # the effects the rationales used ...
    here = estimate_effects(city, model.prepare(city).train_end)      # ... are the ones explain estimates
    assert model.cfg.explain.enabled and json.dumps(effects_to_dict(here)) == json.dumps(saved)
    effects = effects_from_dict(saved)
    from stllm.distill import node_layout
    seen, generate = [], node_layout.generate_with_facts

    def spy(model, inputs, fill, max_new_tokens=200, allowed=None):
        seen.append(allowed)
        return generate(model, inputs, fill, max_new_tokens, allowed)
    monkeypatch.setattr(node_layout, "generate_with_facts", spy)
    r = model.explain(city, 1, AT, mode="generated", max_new_tokens=16)   # the same effects, estimated here
    _, pred, _ = next(forecast(model, model.prepare(city), np.array([AT])))
    np.testing.assert_allclose(r["forecast"], pred[0, :, 1, 0], rtol=1e-6)
    assert _stated_forecast(r["explanation"]) == pytest.approx(r["forecast"], abs=0.05 + 1e-9)
    # stages 1-3 hold no choice of the student: the program feeds them as training showed them, then it writes
    from stllm.distill.facts import compute_facts
    from stllm.distill.teachers import fact_text
    facts = compute_facts(city, 1, AT, effects=effects)
    opening = (f"1. Question: {fact_text(facts, 'question', None)}\n2. Drivers: {fact_text(facts, 'drivers', None)}"
               f"\n3. Recent data: {fact_text(facts, 'recent', None)}")
    assert r["explanation"].startswith(opening) and r["generation"]["new_tokens"] == 16
    assert all(c["by"] == "program" for c in r["claims"] if c["text"] in opening)
    from stllm.distill.teachers import stage4_slot_names          # stage 4 may name only this window's factors
    assert seen == [stage4_slot_names(facts)]

    # the student trained its own adapter only: the forecasts it explains are exactly the forecaster's
    forecaster = STLLM.from_pretrained(out / "forecaster")
    _, fpred, _ = next(forecast(forecaster, forecaster.prepare(city), np.array([AT])))
    np.testing.assert_allclose(pred, fpred, rtol=1e-6)
    assert metrics["mae"] == pytest.approx(metrics["explain"]["forecaster_test_mae"], rel=1e-6)
    lora = {k: v for k, v in model.trainable_state_dict().items() if "lora_" in k}
    student = {k: v for k, v in lora.items() if ".explain." in k}
    assert student and any(not torch.equal(v, lora[k.replace(".explain.", ".default.")]) for k, v in student.items())
    from stllm.distill.node_layout import explain_adapter
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        outside = model.backbone(input_ids=ids).logits
        with explain_adapter(model):
            inside = model.backbone(input_ids=ids).logits
    assert not torch.allclose(outside, inside)                # the node layout runs the student's adapter
    assert model.backbone.active_adapter == "default"


def test_student_without_its_own_adapter_trains_the_forecaster(tmp_path, city):
    out = tmp_path / "shared"
    cfg = load_config(TINY, LLAMA + ["train.max_steps=3", "explain.enabled=true", "explain.form=slots", "explain.n_samples=6",
                                     "explain.steps=3", "explain.own_adapter=false"])
    metrics = train_student(cfg, out, city=city, progress=False)
    assert metrics["mae"] != pytest.approx(metrics["explain"]["forecaster_test_mae"], rel=1e-6)
    model = STLLM.from_pretrained(out)
    assert set(model.backbone.peft_config) == {"default"}


def test_stllm_train_dispatches_to_the_student(tmp_path, capsys):
    out = tmp_path / "cli-student"
    assert main(["train", "--config", TINY, "--out", str(out), "--quiet", "--set", "backbone.name=tiny-llama",
                 "train.max_steps=2", "explain.enabled=true", "explain.form=slots", "explain.n_samples=4"]) == 0
    assert (out / "rationales").is_dir() and (out / "effects.json").is_file()
    assert "historical_average" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ notebook


@pytest.mark.slow
def test_explain_notebook_runs_end_to_end():
    from conftest import real_data
    from test_notebooks import run_notebook
    real_data("BeijingAirQuality")
    nb = run_notebook("explain.ipynb", {"STLLM_EXPLAIN_STEPS": "8", "STLLM_EXPLAIN_TOKENS": "16"})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "faithfulness 1.00" in text and "FAILS last_value.value" in text and "mode generated" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2


# ------------------------------------------------------------------------------------------------ notes


def test_a_note_the_model_reads_is_stated_as_a_fact_and_a_factor_and_checked(city):
    """A note at the node: stage 2 says it holds (its words quoted, never read as claims), stage 4 names what it did
    to the forecast (the model with the note minus without it) and its push; planted wrong note claims fail."""
    from stllm.data.notes import with_notes
    from stllm.data.prepared import PreparedCity
    from stllm.explain import note_effects
    noted = with_notes(city, [{"start": "2024-01-17 12:00", "end": "2024-01-17 18:00", "zones": "S02",
                               "kind": "fair", "text": "A street fair; crowds rose by 913.5 percent"}])
    cfg = load_config(TINY, LLAMA + ["model.notes=text"])
    model = build_model(cfg, PreparedCity(noted, cfg.data, cfg.encoder)).eval()
    torch.nn.init.normal_(model.notes.mlp[-1].weight, std=0.5)            # an effect, as training would give
    at = noted.time_index("2024-01-17 10:00")
    r = explain(model, noted, "S02", at)
    moved = note_effects(model, model.prepare(noted), 2, at, 0)
    (effect,) = moved.values()
    assert abs(effect) > 0.1
    text = r["explanation"]
    assert 'A fair note holds at S02 Central Station during the forecast: "A street fair' in text
    push = "up" if effect > 0 else "down"
    assert f"the fair note moves the forecast by {effect:+.1f} on average, which pushes {push}" in text
    notes = [c for c in r["claims"] if c["kind"] == "note" or c["quantity"] == "note"]
    assert [(c["kind"], c["quantity"]) for c in notes] == [("note", "holds"), ("note", "effect"), ("push", "note")]
    assert all(c["holds"] for c in r["claims"] if c["verdict"] != "unchecked") and r["faithfulness"] == 1.0
    assert not any("913.5" in c["text"] for c in r["claims"])    # the quoted words are not claims
    # planted wrong: another size, the other push, a note that is not there
    wrong = (text.replace(f"{effect:+.1f} on average", f"{effect + 25:+.1f} on average")
             .replace(f"which pushes {push}.", f"which pushes {'down' if push == 'up' else 'up'}.")
             .replace("A fair note holds at S02 Central Station during the forecast",
                      "A parade note holds at S02 Central Station during the forecast"))
    report = check_explanation(wrong, noted, "S02", at, forecast=r["forecast"], note_effects=moved)
    failed = sorted((c.kind, c.quantity) for c in report.failed)
    assert failed == [("note", "effect"), ("note", "holds"), ("push", "note")]
    # a window the note does not reach says nothing of it
    far = explain(model, noted, "S02", at - 48)
    assert "fair note" not in far["explanation"]
    # other wordings: read by the kinds the window has, at the sensor it names; any other quote is read as text
    holds = lambda t: [(c.quantity, c.holds) for c in check_explanation(  # noqa: E731
        t, noted, "S02", at, note_effects=moved).claims if c.kind == "note"]
    assert holds("In the morning a fair note holds at S02 Central Station during the forecast.") == [("holds", True)]
    assert holds("A fair note holds at S05 Harbour during the forecast.") == [("holds", False)]
    assert holds("A fair note holds during the last hours.") == [("holds", False)]   # it starts in the forecast
    quoted = check_explanation('The latest reading is "999.0" at 09:00.', noted, "S02", at, note_effects=moved)
    assert quoted.claims or quoted.unparsed                                      # not hidden like a note's words


def test_notes_of_one_kind_are_one_factor_and_flags_runs_explain_too(city):
    """Two notes of one kind at the sensor: one factor, the size of both together. An encoder-only run that sees
    notes as flags (model.use_llm=false, model.notes=flags) explains the same way."""
    from stllm.data.notes import with_notes
    from stllm.data.prepared import PreparedCity
    from stllm.explain import note_effects
    rows = [{"start": "2024-01-17 12:00", "end": "2024-01-17 14:00", "zones": "S02", "kind": "fair", "text": "A fair"},
            {"start": "2024-01-17 15:00", "end": "2024-01-17 18:00", "zones": "all", "kind": "fair", "text": "Another"}]
    noted = with_notes(city, rows)
    cfg = load_config(TINY, ["model.use_llm=false", "model.notes=flags"])
    model = build_model(cfg, PreparedCity(noted, cfg.data, cfg.encoder)).eval()
    torch.nn.init.normal_(model.notes.mlp[-1].weight, std=0.5)
    at = noted.time_index("2024-01-17 10:00")
    moved = note_effects(model, model.prepare(noted), 2, at, 0)
    assert list(moved) == ["fair"] and abs(moved["fair"]) > 0.1
    r = explain(model, noted, "S02", at)
    assert r["explanation"].count("A fair note holds at S02") == 2
    assert r["explanation"].count("the fair note moves the forecast by") == 1
    assert f"{moved['fair']:+.1f} on average" in r["explanation"] and r["faithfulness"] == 1.0
