"""The writer (stllm.distill.writer, explain.form: written): a model of its own that writes the whole rationale from
the data sheet, numbers copied from it; trained, saved, loaded, resumed, and checked claim by claim."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList

from stllm.backbone import BackboneConfig, build_tiny_tokenizer
from stllm.cli import main
from stllm.config import ConfigError, load_config
from stllm.data.synthetic import make_city
from stllm.distill import FORECAST_SLOT
from stllm.distill.facts import compute_facts, forecast_direction, future_facts
from stllm.distill.teachers import render_rationale
from stllm.distill.writer import (SENTENCE_END, CopyNumbers, Draft, NoRepeats, Writer, consistent, data_sheet,
                                  draft_position, drafted_greedy, numbers_in, train_writer,
                                  writer_samples)
from stllm.infer import forecast
from stllm.loop import LAST
from stllm.model import STLLM

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
LLAMA = ["backbone.name=tiny-llama"]
AT = 400


@pytest.fixture(scope="module")
def city():
    return make_city(n_nodes=6, n_days=21, seed=0)


@pytest.fixture(scope="module")
def written_run(tmp_path_factory, city):
    """A tiny forecaster and a tiny writer beside it, through `stllm train` with explain.form=written."""
    out = tmp_path_factory.mktemp("writer") / "run"
    assert main(["train", "--config", TINY, "--out", str(out), "--quiet", "--set", *LLAMA, "train.max_steps=2",
                 "explain.enabled=true", "explain.n_samples=4", "explain.steps=2", "explain.batch_size=2"]) == 0
    return out


def _windows(city, n=12):
    rng = np.random.default_rng(0)
    return [(int(s), int(i)) for s, i in zip(rng.integers(200, 480, n), rng.integers(0, city.n_nodes, n))]


# ------------------------------------------------------------------------------------------------ the sheet


def sentences(text: str) -> list[str]:
    """The finished sentences of `text` as NoRepeats splits them (each up to its "." or ";"), stripped."""
    return [p.strip() for p in SENTENCE_END.split(text)[:-1] if p.strip()]


def test_every_number_of_the_teachers_rationale_is_in_the_sheet(city):
    """Copying can always write the teacher's text: its numbers (stage numbers, dates, hours, changes, percents,
    counts) are all numbers of the sheet it is written from."""
    samples = writer_samples(city, _windows(city), 12, 12)
    for x in samples:
        assert numbers_in(x.target) <= numbers_in(x.prompt), numbers_in(x.target) - numbers_in(x.prompt)
        assert x.target.rstrip().endswith(FORECAST_SLOT) and "Forecast direction:" in x.prompt


def test_sheet_states_the_direction_it_is_given_and_uses_no_future(city):
    facts = compute_facts(city, 2, AT)
    up, down = data_sheet(facts, "up"), data_sheet(facts, "down")
    assert up.replace("Forecast direction: up.", "Forecast direction: down.") == down
    future = future_facts(city, 2, AT)
    samples = writer_samples(city, [(AT, 2)], 12, 12)
    assert samples[0].prompt == data_sheet(facts, forecast_direction(facts.last_value, future.values))
    assert samples[0].target == render_rationale(facts, future.values, fill=False)
    # another future changes the direction line alone
    values = city.values.copy()
    values[AT:AT + 12, 2] = values[AT - 1, 2] + 1000.0
    other = writer_samples(dataclasses.replace(city, values=values), [(AT, 2)], 12, 12)[0].prompt
    assert other.endswith("Forecast direction: up.\nExplanation:\n")
    assert other.replace("direction: up.", "direction: X.") == up.replace("direction: up.", "direction: X.")


# ---------------------------------------------------------------------------------------------- copying


def test_consistent_reads_numbers_finished_and_unfinished():
    allowed = {"12.3", "41", "08:00", "2016"}
    prefixes = {a[:k] for a in allowed for k in range(1, len(a) + 1)}
    assert consistent("rose by 12.3 (+41%)", allowed, prefixes)
    assert consistent("rose by 12.", allowed, prefixes)            # on its way to 12.3
    assert consistent("at 08:0", allowed, prefixes)
    assert not consistent("rose by 12.4", allowed, prefixes)       # a number not in the sheet
    assert not consistent("rose by 13", allowed, prefixes)
    assert not consistent("rose by 12. The", allowed, prefixes)    # 12 alone is no number of the sheet
    assert consistent("in 2016. The", allowed, prefixes)           # a full stop after a whole number


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), numbers=st.lists(st.floats(-500, 500).map(lambda x: f"{x:.1f}"), min_size=1,
                                                     max_size=6))
def test_decoding_with_copy_numbers_writes_only_the_prompts_numbers(seed, numbers):
    """With random scores (any token may win), every finished number of the decoded text is a number of the
    prompt, whatever the tokenizer's digit tokens are (the tiny BPE has multi-digit ones)."""
    tok = build_tiny_tokenizer()
    prompt = "Trend: " + ", ".join(numbers) + ". Latest: 7 at 08:00.\nExplanation:\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    processor = CopyNumbers(tok, prompt, len(ids))
    gen = torch.Generator().manual_seed(seed)
    seq = torch.tensor([ids])
    for _ in range(60):
        scores = torch.rand(1, len(tok), generator=gen)
        digits = list(processor.numeric)
        scores[0, digits] += 1.0                      # make digits likely, so numbers get written often
        nxt = processor(seq, scores).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    text = tok.decode(seq[0, len(ids):].tolist())
    finished = [m.group() for m in re.finditer(r"\d+(?:[.:]\d+)*(?=[^\d.:]|[.:][^\d])", text)
                if m.start() > 0 and text[m.start() - 1] != "\n"]     # a stage's number at a line start is free
    allowed = numbers_in(prompt)
    assert finished and all(n in allowed for n in finished), (text, allowed)


def test_no_repeats_rules_out_only_the_token_that_would_repeat_a_sentence_or_a_long_run():
    tok = build_tiny_tokenizer()
    prompt = tok("Facts.\nExplanation:", add_special_tokens=False)["input_ids"]
    guard = NoRepeats(tok, len(prompt), longest=8)
    period = tok(".", add_special_tokens=False)["input_ids"]
    assert len(period) == 1

    def ruled_out(ids: list[int]) -> set[int]:
        scores = guard(torch.tensor([prompt + ids]), torch.zeros(1, len(tok)))
        return set(torch.nonzero(scores[0] < 0).flatten().tolist())

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    assert sentences("It is 1.0 at 03:00. It is 2.0; it is") == ["It is 1.0 at 03:00.", "It is 2.0;"]
    assert ruled_out(ids(" It is 1.0 at 03:00. The latest is 5.0. It is 1.0 at 03:00")) == set(guard.enders["."])
    assert ruled_out(ids(" It is 1.0 at 03:00. It is 1.0 at 04:00")) == set()        # another sentence
    assert ruled_out(ids(" It is 1.0 at 03:00. It is 1")) == set()                    # "1." may be "1.0"
    run = list(range(100, 110))                     # ten tokens, then their first seven again: the eighth is out
    assert ruled_out(run + run[:7]) == {run[7]} and ruled_out(run + run[:6]) == set()
    copying = NoRepeats(tok, len(run), longest=8)   # the sheet holds the run: copying it once is no repeat
    assert not (copying(torch.tensor([run + run[:7]]), torch.zeros(1, len(tok))) < 0).any()


@pytest.mark.slow
@pytest.mark.parametrize("name, notes", [("beijing-air", None), ("nyc-taxi", "NYC_Events/events_nyc_2019_2020.csv")])
def test_teachers_rationales_on_real_data_never_repeat_a_sentence_and_copy_every_number(data_root, name, notes):
    """What the writer learns to write from real data passes its decoding rules: no sentence and no run of 32
    tokens twice (NoRepeats), every number one of its sheet's (CopyNumbers); 60 training windows per channel."""
    from stllm.data import load
    from stllm.data.notes import with_notes
    from stllm.data.prepared import PreparedCity
    from stllm.distill.student import pick_windows
    from stllm.backbone import build_base_model
    city = with_notes(load(name, root=data_root), str(data_root / notes) if notes else None)
    cfg = load_config(TINY)
    _, tok = build_base_model(BackboneConfig(name="smollm2-135m", n_layers=1))     # SmolLM2's tokens
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    for c in range(city.n_channels):
        for x in writer_samples(city, pick_windows(prep, 60, seed=c, channel=c), prep.t_in, prep.t_out, channel=c):
            said = sentences(x.target + " ")
            assert len(said) == len(set(said)), [s for s in said if said.count(s) > 1]
            ids = tok(x.target, add_special_tokens=False)["input_ids"]
            runs = [tuple(ids[j:j + 32]) for j in range(len(ids) - 31)]
            assert len(runs) == len(set(runs))
            assert numbers_in(x.target) <= numbers_in(x.prompt), numbers_in(x.target) - numbers_in(x.prompt)


# ------------------------------------------------------------------------------------------ drafted decoding


def test_draft_position_goes_on_after_the_written_tail():
    draft = [1, 2, 3, 4, 1, 2, 5, 6]
    assert draft_position(draft, [], 0) == 0                              # nothing written: from the start
    assert draft_position(draft, [9, 3, 4], 0) == 4                      # the longest tail found: [3, 4]
    assert draft_position(draft, [1, 2], 0) == 2 and draft_position(draft, [1, 2], 5) == 6   # nearest ahead
    assert draft_position(draft, [7, 2, 5], 0) == 7
    assert draft_position(draft, [7, 8], 3) is None                      # the last token is nowhere in it


@pytest.fixture(scope="module")
def tiny_writer():
    """A tiny LLaMA writer whose LoRA is random (not zero), so its greedy text is its own and varied."""
    torch.manual_seed(3)
    writer = Writer.build(BackboneConfig(name="tiny-llama", n_layers=None), 0).eval()
    with torch.no_grad():
        for name, p in writer.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return writer


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_drafted_decoding_writes_the_same_tokens_as_plain_greedy(tiny_writer, data):
    """Whatever the draft (the text itself, with tokens changed, dropped or added, another text, none), drafted
    decoding writes exactly the tokens one-token-at-a-time greedy decoding writes, numbers copied or not; a draft
    equal to the text takes a pass per 32 tokens, not a pass per token."""
    tok, lm = tiny_writer.tokenizer, tiny_writer.lm
    prompt = tok("Trend: down, change -12.5, from 40.0 to 27.5.\nLatest: 27.5 at 08:00.\nExplanation:",
                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    copy = data.draw(st.booleans(), label="copy_numbers")
    processors = LogitsProcessorList([CopyNumbers(tok, tok.decode(prompt[0]), prompt.shape[1])] if copy else [])
    common = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=60, do_sample=False,
                  logits_processor=processors, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        plain = lm.generate(**common)
    ids = plain[0, prompt.shape[1]:].tolist()
    edits = data.draw(st.lists(st.tuples(st.sampled_from(["change", "drop", "add"]), st.integers(0, 10**6),
                                         st.integers(0, len(tok) - 1)), max_size=6), label="edits")
    draft_ids = list(ids)
    for kind, where, token in edits:
        k = where % (len(draft_ids) + 1)
        if kind == "add" or not draft_ids:
            draft_ids.insert(k, token)
        elif kind == "change":
            draft_ids[min(k, len(draft_ids) - 1)] = token
        else:
            del draft_ids[min(k, len(draft_ids) - 1)]
    other = data.draw(st.sampled_from([None, "", "1. Question: What will it be, and why?"]), label="other text")
    draft = Draft(draft_ids if other is None else tok(other, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        drafted = lm.generate(**common, custom_generate=drafted_greedy, draft=draft)
    assert drafted.tolist() == plain.tolist()
    if not edits and other is None:
        assert draft.passes <= -(-len(ids) // 32) + 1 and draft.accepted >= len(ids) - draft.passes


# ----------------------------------------------------------------------------------------------- the model


def test_writer_learns_saves_loads_and_resumes(tmp_path, city):
    cfg = load_config(TINY, LLAMA + ["train.num_threads=1"])
    samples = writer_samples(city, _windows(city, 4), 12, 12)
    torch.manual_seed(0)
    writer = Writer.build(cfg.backbone, 0).eval()          # eval: no dropout, so no draw from the RNG
    with torch.no_grad():
        before = writer.loss(samples[:2])[0].item()
    whole = train_writer(writer, samples, cfg.train, tmp_path / "whole", batch_size=2, steps=4, lr=1e-2,
                         progress=False)
    with torch.no_grad():
        assert whole["steps"] == 4 and writer.loss(samples[:2])[0].item() < before
    logged = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(np.isfinite(r["lm"]) for r in logged)
    writer.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7, 8]])
    for merge in (False, True):                      # the LoRA as saved, or folded into the weights
        again = Writer.from_pretrained(tmp_path / "saved", merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(again.lm(input_ids=ids).logits, writer.eval().lm(input_ids=ids).logits)
    # two steps, then resumed to four from LAST: the same weights as four at once
    torch.manual_seed(0)
    cut = Writer.build(cfg.backbone, 0)
    train_writer(cut, samples, cfg.train, tmp_path / "cut", batch_size=2, steps=2, lr=1e-2, progress=False)
    assert (tmp_path / "cut" / LAST).is_file()
    torch.manual_seed(0)
    resumed = Writer.build(cfg.backbone, 0)
    out = train_writer(resumed, samples, cfg.train, tmp_path / "cut", batch_size=2, steps=4, lr=1e-2,
                       resume=True, progress=False)
    assert out["steps"] == 4
    for k, v in resumed.trainable_state_dict().items():
        torch.testing.assert_close(v, writer.trainable_state_dict()[k])


def test_writer_depth_is_its_own(city):
    cfg = BackboneConfig(name="tiny-llama", n_layers=1)
    assert Writer.build(cfg, 0).n_layers == 2 and Writer.build(cfg, 1).n_layers == 1
    with pytest.raises(ValueError, match="lora_r"):
        Writer.build(BackboneConfig(name="tiny-llama", lora_r=0), 0)


def test_config_refuses_unknown_forms():
    with pytest.raises(ConfigError, match="explain.form"):
        load_config(TINY, ["explain.form=program"])
    with pytest.raises(ConfigError, match="explain.writer_layers"):
        load_config(TINY, ["explain.writer_layers=-1"])


# ------------------------------------------------------------------------------------------- explaining


def test_recipe_writes_a_run_whose_writer_explains(written_run, city):
    out = written_run
    assert (out / "writer" / "writer.json").is_file() and (out / "writer" / "adapter").is_dir()
    assert (out / "model.safetensors").is_file() and (out / "forecaster" / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["explain"]["form"] == "written" and metrics["explain"]["steps"] == 2
    model = STLLM.from_pretrained(out)
    r = model.explain(city, 1, AT, mode="generated", max_new_tokens=24)
    assert r["generation"]["form"] == "written" and r["generation"]["new_tokens"] <= 24
    assert r["generation"]["drafted"] and r["generation"]["draft_passes"] >= 1      # explain.draft: on by default
    plain = model.explain(city, 1, AT, mode="generated", max_new_tokens=24, draft=False)
    assert not plain["generation"]["drafted"] and plain["explanation"] == r["explanation"]
    model.cfg.explain.draft, model.cfg.explain.copy_numbers = False, False   # the run's config, when not passed
    free = model.explain(city, 1, AT, mode="generated", max_new_tokens=24)["generation"]
    assert not free["drafted"] and not free["copy_numbers"]
    _, pred, _ = next(forecast(model, model.prepare(city), np.array([AT])))
    np.testing.assert_allclose(r["forecast"], pred[0, :, 1, 0], rtol=1e-6)
    assert r["numbers_consistent"] is True            # the head's numbers, written by the program
    # the forecasts it explains are the forecaster's: the writer trained nothing of it
    forecaster = STLLM.from_pretrained(out / "forecaster")
    _, fpred, _ = next(forecast(forecaster, forecaster.prepare(city), np.array([AT])))
    np.testing.assert_allclose(pred, fpred, rtol=1e-6)


def _explained_with(model, city, monkeypatch, text: str) -> dict:
    """generated mode, the writer's text replaced by `text`."""
    writer = model.load_writer()
    monkeypatch.setattr(writer, "write", lambda prompt, *a, **k: (text, {"form": "written", "new_tokens": 1,
                                                                         "seconds": 0.0, "tokens_per_s": 0.0}))
    return model.explain(city, 1, AT, mode="generated")


def test_every_claim_but_the_forecast_numbers_is_the_models(written_run, city, monkeypatch):
    model = STLLM.from_pretrained(written_run)
    facts = compute_facts(city, 1, AT)
    _, pred, _ = next(forecast(model, model.prepare(city), np.array([AT])))
    text = render_rationale(facts, pred[0, :, 1, 0], fill=False)        # what a perfect writer writes
    r = _explained_with(model, city, monkeypatch, text)
    mine = r["by_writer"]["model"]
    assert mine["checked"] >= 10 and mine["hold_share"] == 1.0 and mine["unparsed"] == 0
    program = [c for c in r["claims"] if c["by"] == "program"]
    assert program and all(c["kind"].startswith("forecast") for c in program)   # the numbers alone


def test_a_planted_wrong_fact_fails_that_claim_alone(written_run, city, monkeypatch):
    model = STLLM.from_pretrained(written_run)
    facts = compute_facts(city, 1, AT)
    _, pred, _ = next(forecast(model, model.prepare(city), np.array([AT])))
    text = render_rationale(facts, pred[0, :, 1, 0], fill=False)
    right = f"The latest reading is {facts.last_value:.1f}"
    assert right in text
    wrong = text.replace(right, f"The latest reading is {facts.last_value + 7:.1f}")
    r = _explained_with(model, city, monkeypatch, wrong)
    failed = [c for c in r["claims"] if c["holds"] is False]
    assert len(failed) == 1 and failed[0]["by"] == "model" and f"{facts.last_value + 7:.1f}" in failed[0]["text"]
    garbled = text.replace(right, "The latest reading is 12.5 or so, maybe 3.25%")
    r = _explained_with(model, city, monkeypatch, garbled)
    assert r["by_writer"]["model"]["unparsed"] >= 1                    # counted, never dropped


def test_cli_explain_json_says_who_wrote_each_claim(written_run, city, capsys):
    at = str(city.timestamps[AT])[:16]
    assert main(["explain", "--run", str(written_run), "--node", "S01", "--at", at,     # generated: the default
                 "--json", "--max-new-tokens", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["generation"]["form"] == "written" and r["generation"]["new_tokens"] <= 8
    assert r["numbers_consistent"] is True and {"model", "program"} == set(r["by_writer"])
    assert all(c["by"] in ("model", "program") and c["holds"] in (True, False, None) for c in r["claims"])


def test_report_page_shows_the_writers_explanations_claim_by_claim(written_run, city, tmp_path, monkeypatch):
    """`stllm report` on a run with a writer explains in generated mode by default, each claim marked with its
    check and its writer."""
    model = STLLM.from_pretrained(written_run)
    writer = model.load_writer()
    written = {}

    def write(prompt, *a, **k):                        # a writer that gets the latest reading wrong
        written["sheet"] = prompt
        return "1. Question: x.\n3. Recent data: The latest reading is 9999.5 at 08:00.", {
            "form": "written", "new_tokens": 1, "seconds": 0.0, "tokens_per_s": 0.0}
    monkeypatch.setattr(writer, "write", write)
    monkeypatch.setattr(STLLM, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(written_run), "--data", "synthetic", "--nodes", "S01", "--explain", "1",
                 "--out", str(out)]) == 0
    page = out.read_text()
    assert "Forecast direction:" in written["sheet"]                  # the writer was asked
    assert "mode generated" in page
    assert "<mark class=failed data-by=model" in page and "9999.5" in page   # its wrong claim, marked as its own


def test_an_encoder_only_forecaster_gets_a_gpt2_writer(tmp_path, city):
    """The writer is a model of its own: the encoder-only ablation (no language model in its forecasts) can have
    one, here on the tiny GPT-2 (Conv1D layers), and explain in generated mode with it."""
    out = tmp_path / "enc"
    assert main(["train", "--config", TINY, "--out", str(out), "--quiet", "--set", "model.use_llm=false",
                 "train.max_steps=2", "explain.enabled=true", "explain.n_samples=2", "explain.steps=1"]) == 0
    model = STLLM.from_pretrained(out)
    assert model.backbone is None and model.load_writer() is not None
    r = model.explain(city, 0, AT, mode="generated", max_new_tokens=6)
    assert r["generation"]["form"] == "written" and r["numbers_consistent"] is True
    assert json.loads((out / "writer" / "writer.json").read_text())["backbone"]["name"] == "tiny-gpt2"


def test_writer_training_resumes_from_the_cli_and_refuses_other_shapes(tmp_path, capsys):
    out = tmp_path / "w"
    base = ["train", "--config", TINY, "--out", str(out), "--quiet", "--set", *LLAMA, "train.max_steps=2",
            "explain.enabled=true", "explain.n_samples=4", "explain.batch_size=1"]
    assert main(base + ["explain.steps=2"]) == 0
    assert main(base + ["explain.steps=2"]) == 2                           # a run is there: no silent overwrite
    assert "pass --resume" in capsys.readouterr().err
    assert main(base + ["explain.writer_layers=1", "explain.steps=3", "--resume"]) == 2
    assert "explain.writer_layers" in capsys.readouterr().err            # named, and nothing was touched
    assert len((out / "writer" / "log.jsonl").read_text().splitlines()) == 2
    assert main(base + ["explain.steps=3", "--resume"]) == 0               # a larger budget continues it
    logged = [json.loads(x)["step"] for x in (out / "writer" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert json.loads((out / "metrics.json").read_text())["explain"]["steps"] == 3
