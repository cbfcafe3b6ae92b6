"""End to end with tiny random backbones: train -> save -> load -> evaluate, what changes, resume."""
import json

import numpy as np
import pytest
import torch

from stllm.data.prepared import PreparedCity
from stllm.infer import evaluate
from stllm.model import STLLM, run_weights
from stllm.train import build_model, masked_loss, train


@pytest.mark.parametrize("backbone", ["tiny-gpt2", "tiny-llama"])
def test_train_save_load_evaluate(tmp_path, tiny_city, tiny_config, backbone):
    cfg = tiny_config([f"backbone.name={backbone}"])
    torch.manual_seed(0)
    untrained = build_model(cfg, PreparedCity(tiny_city, cfg.data, cfg.encoder))
    metrics = train(cfg, tmp_path / "run", city=tiny_city, progress=False)

    for name in ("config.yaml", "model.safetensors", "meta.json", "metrics.json", "log.jsonl", "prompt.txt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/best.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_error"]) for r in log)
    assert np.isfinite(metrics["mae"]) and set(metrics["baselines"]) == {
        "last", "same_time_yesterday", "same_time_last_week", "historical_average", "last_4_weeks"}

    assert not (tmp_path / "run" / "effects.json").exists()         # training leaves explaining to explain time
    model = STLLM.from_pretrained(tmp_path / "run")                  # needs no training data
    prep = model.prepare(tiny_city)
    starts = prep.splits["test"][:8]
    reloaded = evaluate(model, prep, starts)["mae"]
    batch = prep.batch(starts)
    with torch.no_grad():
        before = untrained.eval()(batch)
        after = model(batch)
    assert not torch.allclose(before, after, atol=1e-4)              # training changed the predictions
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["n_windows"] == len(prep.splits["test"])
    full = evaluate(model, prep, prep.splits["test"])["mae"]
    assert full == pytest.approx(stored["mae"], rel=1e-5)            # the reloaded run gives the same figures
    assert np.isfinite(reloaded)


@pytest.mark.parametrize("backbone", ["tiny-gpt2", "tiny-llama"])
def test_only_trainable_parts_change(tiny_city, tiny_config, backbone):
    cfg = tiny_config([f"backbone.name={backbone}", "train.lr=0.01", "train.lora_lr=0.01"])
    torch.manual_seed(0)
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all(n.split(".")[0] in ("encoder", "projector", "pre_query", "pre_proj", "head", "skip", "notes")
               or "lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    used = set()
    for i in range(3):
        batch = prep.batch(prep.splits["train"][i * 4:(i + 1) * 4])
        loss = masked_loss(model(batch), batch["y"], batch["y_mask"])
        loss.backward()
        used |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    # The data-driven graph is idle here (the synthetic city has wind), and so is the note effect (this city has no
    # notes: tests/test_notes.py trains it); everything else must be in use.
    assert trainable - used == {n for n in trainable if ".data_graph." in n or n.startswith("notes.")}
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if name in used:
            assert moved, f"{name} is trainable but did not change"
        elif name not in trainable:
            assert not moved, f"frozen {name} changed"
        else:
            assert not moved, f"{name} got no gradient but changed"


class Interrupt(Exception):
    pass


def interrupt(cfg, out, city, at_step: int) -> None:
    """Train into `out` and stop it as a crash would, after optimizer step `at_step` (before its validation)."""
    def stop(step):
        if step == at_step:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, out, city=city, progress=False, on_step=stop)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, tiny_city, tiny_config, ema):
    from stllm.checkpoint import load
    cfg = tiny_config(["train.max_steps=8", "train.eval_every=2", "encoder.dropout=0.2", f"train.ema={ema}"])
    train(cfg, tmp_path / "whole", city=tiny_city, progress=False)

    interrupt(cfg, tmp_path / "cut", tiny_city, at_step=5)
    assert not (tmp_path / "cut" / "model.safetensors").exists()      # the run did not finish
    assert load(tmp_path / "cut" / "checkpoints/last.safetensors")[1]["step"] == 4
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "cut", city=tiny_city, progress=False)
    train(cfg, tmp_path / "cut", city=tiny_city, progress=False, resume=True)

    whole, whole_state = load(tmp_path / "whole" / "checkpoints/last.safetensors")
    cut, cut_state = load(tmp_path / "cut" / "checkpoints/last.safetensors")
    assert whole_state["step"] == cut_state["step"] == 8
    assert set(whole) == set(cut)
    assert any(k.startswith("ema.") for k in whole) == bool(ema)      # the weight average is resumed too
    for key in whole:
        assert torch.allclose(whole[key].float(), cut[key].float(), atol=1e-6), key


def test_encoder_only_ablation_has_no_backbone(tmp_path, tiny_city, tiny_config):
    cfg = tiny_config(["model.use_llm=false"])
    metrics = train(cfg, tmp_path / "enc", city=tiny_city, progress=False)
    model = STLLM.from_pretrained(tmp_path / "enc")
    assert model.backbone is None and np.isfinite(metrics["mae"])
    assert not (tmp_path / "enc" / "adapter").exists()


def untrained(cfg, city) -> tuple[STLLM, dict]:
    """A seeded untrained model in eval mode and a batch of three test windows."""
    torch.manual_seed(0)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    return build_model(cfg, prep).eval(), prep.batch(prep.splits["test"][:3])


@pytest.mark.parametrize("backbone", ["tiny-gpt2", "tiny-llama"])
def test_node_groups_give_the_same_result_as_one_sequence(tiny_city, tiny_config, backbone):
    """Big cities are cut into groups of nodes per sequence; each node's output must not change."""
    model, batch = untrained(tiny_config([f"backbone.name={backbone}", "model.nodes_per_sequence=0"]), tiny_city)
    with torch.no_grad():
        whole = model(batch)
        model.cfg.model.nodes_per_sequence = 4                       # 6 nodes -> groups of 4 and 2
        grouped = model(batch)
    assert torch.allclose(whole, grouped, atol=1e-5)
    assert not torch.allclose(whole, torch.zeros_like(whole))


@pytest.mark.parametrize("backbone", ["tiny-gpt2", "tiny-llama"])
def test_cross_node_lets_a_node_read_the_others_in_any_order(tiny_city, tiny_config, backbone):
    """model.cross_node: a node's language-model output depends on the other nodes' tokens, not on their order;
    without it, it depends on its own tokens only."""
    torch.manual_seed(1)
    for cross in (False, True):
        model, _ = untrained(tiny_config([f"backbone.name={backbone}", f"model.cross_node={cross}"]), tiny_city)
        d = model.backbone.get_input_embeddings().weight.shape[1]
        his, pre = torch.randn(1, 4, model.cfg.model.tokens_per_node, d), torch.randn(1, 4, d)
        other = his.clone()
        other[:, 3] += torch.randn_like(other[:, 3])                   # change node 3 only
        flip = torch.tensor([0, 3, 2, 1])                              # node 0 stays first, the others reversed
        with torch.no_grad():
            h = model._run_backbone(his, pre, {})[1]                 # [1, 4, d] at the <ST_PRE> slots
            h_other = model._run_backbone(other, pre, {})[1]
            h_flip = model._run_backbone(his[:, flip], pre[:, flip], {})[1]
        assert torch.allclose(h[:, flip], h_flip, atol=1e-5)          # the order of the nodes does not matter
        assert torch.allclose(h[:, 3], h_other[:, 3]) is False        # its own tokens always count
        assert torch.allclose(h[:, 0], h_other[:, 0], atol=1e-6) is not cross


def test_warm_start_loads_the_encoder_of_an_encoder_only_run(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    train(tiny_config(["model.use_llm=false", "train.max_steps=2"]), tmp_path / "enc", city=tiny_city, progress=False)
    source = load(tmp_path / "enc" / "model.safetensors")[0]
    cfg = tiny_config([f"train.init_from={tmp_path / 'enc'}", "train.max_steps=1", "train.lr=1e-12",
                       "train.lora_lr=1e-12"])
    train(cfg, tmp_path / "warm", city=tiny_city, progress=False)
    warm = load(tmp_path / "warm" / "model.safetensors")[0]
    encoder = [k for k in source if k.startswith("encoder.")]
    assert encoder and all(torch.allclose(source[k], warm[k], atol=1e-6) for k in encoder)
    assert "head.lin.weight" in source and "head.lin.weight" not in warm
    for name in ("weight", "bias"):            # the ablation's linear head became the skip read-out
        assert torch.allclose(source[f"head.lin.{name}"], warm[f"skip.lin.{name}"], atol=1e-6)


def test_skip_read_out_makes_the_untrained_model_the_encoder_only_forecast(tiny_city, tiny_config):
    model, batch = untrained(tiny_config(), tiny_city)
    with torch.no_grad():
        full = model(batch)
        encoder_only = model.skip(model.encoder(batch))
        model.llm_active = False
        bypassed = model(batch)
    torch.testing.assert_close(full, encoder_only)     # the head's correction starts at exactly zero
    torch.testing.assert_close(bypassed, encoder_only)
    assert not torch.allclose(full, torch.zeros_like(full))


def test_two_stage_training_trains_the_encoder_first_then_everything(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    # stage 1 never ends (60 minutes): the language-model side gets no update at all
    m1 = train(tiny_config(["train.encoder_first_minutes=60", "train.max_steps=3", "train.eval_every=1"]),
               tmp_path / "one", city=tiny_city, progress=False)
    w1 = run_weights(tmp_path / "one", STLLM.from_pretrained(tmp_path / "one"))
    lora_b = [k for k in w1 if "lora_B" in k]
    assert lora_b and all(w1[k].abs().max() == 0 for k in lora_b)      # peft starts lora_B at zero
    assert w1["head.w3.weight"].abs().max() == 0
    assert m1["training"]["encoder_stage"] is None
    # stage 1 ends after its first step: then the language model trains too
    m2 = train(tiny_config(["train.encoder_first_minutes=1e-9", "train.max_steps=3", "train.eval_every=1",
                            "train.patience=10"]), tmp_path / "two", city=tiny_city, progress=False)
    w2 = load(tmp_path / "two" / "checkpoints/last.safetensors")[0]
    assert m2["training"]["encoder_stage"]["steps"] == 1
    assert any(w2[f"model.{k}"].abs().max() > 0 for k in lora_b)
    assert w2["model.head.w3.weight"].abs().max() > 0


def test_the_encoder_stage_follows_the_encoder_only_ablation_step_for_step(tmp_path, tiny_city, tiny_config):
    """Same seed, same data order: stage 1 of stllm is the ablation, so the language model refines the ablation."""
    from stllm.checkpoint import load
    steps = ["train.max_steps=4", "train.eval_every=2", "train.patience=10"]
    ablation = train(tiny_config(["model.use_llm=false", *steps]), tmp_path / "ablation", city=tiny_city,
                     progress=False)
    two_stage = train(tiny_config(["train.encoder_first_minutes=60", *steps]), tmp_path / "stllm", city=tiny_city,
                      progress=False)
    a = load(tmp_path / "ablation" / "model.safetensors")[0]
    s = load(tmp_path / "stllm" / "model.safetensors")[0]
    encoder = [k for k in a if k.startswith("encoder.")]
    assert encoder and all(torch.equal(a[k], s[k]) for k in encoder)
    for name in ("weight", "bias"):                    # the ablation's head is stllm's skip read-out
        assert torch.equal(a[f"head.lin.{name}"], s[f"skip.lin.{name}"])
    assert two_stage["mae"] == pytest.approx(ablation["mae"], rel=1e-6)   # and the LM correction is still zero


def test_stage_two_validates_on_its_own_schedule_and_reports_the_encoder_stage_on_test(tmp_path, tiny_city,
                                                                                       tiny_config):
    ablation = train(tiny_config(["model.use_llm=false", "train.max_steps=1"]), tmp_path / "ablation",
                     city=tiny_city, progress=False)
    cfg = tiny_config(["train.encoder_first_minutes=1e-9", "train.max_steps=5", "train.eval_every=1",
                       "train.stage2_eval_every=2", "train.patience=10", "train.lora_lr=0.01"])
    metrics = train(cfg, tmp_path / "stllm", city=tiny_city, progress=False)
    log = [json.loads(line) for line in (tmp_path / "stllm" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 4, 5]      # stage 1 ends at step 1, then every 2nd step and the end
    encoder_stage = metrics["training"]["encoder_stage"]
    assert encoder_stage["steps"] == 1
    # the encoder stage's test figure is the forecast without the language model: the one-step ablation's
    assert encoder_stage["test"]["mae"] == pytest.approx(ablation["mae"], rel=1e-6)
    assert metrics["mae"] != pytest.approx(ablation["mae"], rel=1e-3), \
        "stage 2 kept no correction, so the figure with and without the language model is one: the test says nothing"


def test_two_stage_training_needs_the_skip_read_out(tmp_path, tiny_city, tiny_config):
    cfg = tiny_config(["train.encoder_first_minutes=5", "model.encoder_skip=false"])
    with pytest.raises(ValueError, match="encoder_skip"):
        train(cfg, tmp_path / "run", city=tiny_city, progress=False)


def test_freeze_holds_parts_still_and_the_run_still_loads(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    train(tiny_config(["train.max_steps=2"]), tmp_path / "src", city=tiny_city, progress=False)
    cfg = tiny_config([f"train.init_from={tmp_path / 'src'}", "train.freeze=[encoder,skip]", "train.max_steps=3",
                       "train.lr=0.01", "train.lora_lr=0.01", "train.eval_every=1", "train.patience=10"])
    train(cfg, tmp_path / "llm_side", city=tiny_city, progress=False)
    src = run_weights(tmp_path / "src", STLLM.from_pretrained(tmp_path / "src"))
    new = load(tmp_path / "llm_side" / "checkpoints/last.safetensors")[0]
    assert set(src) == {k[len("model."):] for k in new if k.startswith("model.")}   # frozen parts are saved too
    for name, value in src.items():
        moved = not torch.equal(value, new[f"model.{name}"])
        # frozen parts still, the rest trained (the note effect too, but this city has no notes to train it on)
        assert moved != name.startswith(("encoder.", "skip.", "notes.")), name
    model = STLLM.from_pretrained(tmp_path / "llm_side")
    assert model.skip is not None


def test_freeze_names_must_exist(tmp_path, tiny_city, tiny_config):
    with pytest.raises(ValueError, match="train.freeze: 'encodr'.*'encoder'"):
        train(tiny_config(["train.freeze=[encodr]"]), tmp_path / "run", city=tiny_city, progress=False)


def _stage2_weights(tmp_path, tiny_city, tiny_config, name: str, extra: list[str]) -> tuple[dict, dict]:
    """Weights when stage 2 begins (step 1) and after two stage-2 steps, interrupted and resumed in between."""
    from stllm.checkpoint import load
    cfg = tiny_config(["train.encoder_first_minutes=1e-9", "train.max_steps=3", "train.eval_every=1",
                       "train.patience=10", "train.lr=0.01", "train.lora_lr=0.01", *extra])
    interrupt(cfg, tmp_path / name, tiny_city, at_step=2)
    at_switch, state = load(tmp_path / name / "checkpoints/last.safetensors")
    assert state["stage"] == 2 and state["step"] == 1
    train(cfg, tmp_path / name, city=tiny_city, progress=False, resume=True)
    return at_switch, load(tmp_path / name / "checkpoints/last.safetensors")[0]


def test_stage_two_holds_the_encoder_still_also_after_resuming(tmp_path, tiny_city, tiny_config):
    at_switch, end = _stage2_weights(tmp_path, tiny_city, tiny_config, "default", [])
    frozen = [k for k in end if k.startswith(("model.encoder.", "model.skip."))]
    lora = [k for k in end if "lora_" in k]
    assert frozen and all(torch.equal(at_switch[k], end[k]) for k in frozen)      # stage 2 left them alone
    assert any(not torch.equal(at_switch[k], end[k]) for k in lora)                # and trained the LM side
    at_switch, end = _stage2_weights(tmp_path, tiny_city, tiny_config, "all", ["train.stage2_freeze=[]"])
    assert any(not torch.equal(at_switch[k], end[k]) for k in frozen)              # [] trains everything


def test_a_run_started_from_weights_keeps_them_when_training_only_hurts(tmp_path, tiny_city, tiny_config):
    """Few-shot: the starting weights are validated before the first step, so early stopping can keep them."""
    from stllm.checkpoint import load
    train(tiny_config(["train.max_steps=2"]), tmp_path / "src", city=tiny_city, progress=False)
    cfg = tiny_config([f"train.init_from={tmp_path / 'src'}", "train.max_steps=2", "train.eval_every=1",
                       "train.lr=1000", "train.lora_lr=1000", "train.grad_clip=0"])
    train(cfg, tmp_path / "few", city=tiny_city, progress=False)
    log = [json.loads(line) for line in (tmp_path / "few" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["train_loss"] is None
    assert load(tmp_path / "few" / "checkpoints/best.safetensors")[1]["step"] == 0
    src, few = load(tmp_path / "src" / "model.safetensors")[0], load(tmp_path / "few" / "model.safetensors")[0]
    assert all(torch.equal(src[k], few[k]) for k in src)


def test_learning_rates_decay_after_validations_without_improvement(tmp_path, tiny_city, tiny_config):
    """lr_scale halves after every second validation in a row that does not improve; improvement resets the count."""
    cfg = tiny_config(["train.max_steps=12", "train.eval_every=1", "train.patience=100", "train.lr=0.5",
                       "train.lr_decay=0.5", "train.lr_decay_after=2", "model.use_llm=false"])
    train(cfg, tmp_path / "run", city=tiny_city, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    best, bad, scale = float("inf"), 0, 1.0
    for record in log:
        if record["val_error"] < best:
            best, bad = record["val_error"], 0
        else:
            bad += 1
            scale *= 0.5 if bad % 2 == 0 else 1.0
        assert record["lr_scale"] == scale, record
    assert scale < 1.0, "the run never decayed: the test says nothing"


def test_resume_keeps_the_decayed_learning_rate(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    cfg = tiny_config(["train.max_steps=12", "train.eval_every=1", "train.patience=100", "train.lr=0.5",
                       "train.lr_decay=0.5", "train.lr_decay_after=1", "model.use_llm=false"])
    train(cfg, tmp_path / "whole", city=tiny_city, progress=False)
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    decayed = [r["step"] for r in log if r["lr_scale"] < 1.0]
    assert decayed and decayed[0] < 11, "the run never decayed before its last steps: the test says nothing"
    interrupt(cfg, tmp_path / "cut", tiny_city, at_step=decayed[0] + 1)   # cut after the first decayed checkpoint
    assert load(tmp_path / "cut" / "checkpoints/last.safetensors")[1]["lr_scale"] < 1.0
    train(cfg, tmp_path / "cut", city=tiny_city, progress=False, resume=True)
    whole, cut = (load(tmp_path / name / "checkpoints/last.safetensors") for name in ("whole", "cut"))
    assert whole[1]["lr_scale"] == cut[1]["lr_scale"]
    for key in whole[0]:
        assert torch.allclose(whole[0][key].float(), cut[0][key].float(), atol=1e-6), key


def test_a_run_saved_before_the_token_mix_existed_still_loads(tmp_path, tiny_city, tiny_config):
    import yaml
    out = tmp_path / "old"
    train(tiny_config(["encoder.mix_hidden=0", "train.max_steps=1", "model.use_llm=false"]), out, city=tiny_city,
          progress=False)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["encoder"]["mix_hidden"]                                 # as written before the key existed
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    model = STLLM.from_pretrained(out)
    assert model.encoder.mix is None and model.cfg.encoder.mix_hidden == 0


def test_stage_two_starts_from_the_best_encoder_not_the_last(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    cfg = tiny_config(["train.encoder_first_minutes=60", "train.patience=2", "train.eval_every=1",
                       "train.max_steps=12", "train.lr=0.3", "train.lr_decay=0"])
    out = tmp_path / "run"
    log = out / "log.jsonl"

    def stop_after_the_switch(step):
        if log.exists() and len(log.read_text().splitlines()) >= 1:
            state = load(out / "checkpoints/last.safetensors")[1]
            if state["stage"] == 2:
                raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, out, city=tiny_city, progress=False, on_step=stop_after_the_switch)
    at_switch, state = load(out / "checkpoints/last.safetensors")
    best, best_meta = load(out / "checkpoints/best.safetensors")
    assert best_meta["step"] < state["stage1"]["steps"], "the last stage-1 step was the best: the test says nothing"
    for key in best:
        if key.startswith(("encoder.", "skip.")):
            assert torch.equal(at_switch["model." + key], best[key]), key


def test_weight_average_follows_its_formula_and_gives_the_raw_weights_back():
    from stllm.train import WeightAverage
    layer = torch.nn.Linear(2, 1)
    w0 = layer.weight.detach().clone()
    ema = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)                                   # decay ramps up: min(0.5, (1 + 1) / (10 + 1)) = 2/11
    expected = w0 + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.avg["weight"], expected)
    with ema.swapped_in(layer):
        assert torch.allclose(layer.weight, expected)
    assert torch.allclose(layer.weight, w0 + 1.0)      # training goes on from the raw weights
    for _ in range(20):
        ema.update(layer)                               # the ramp is capped at `decay`: the gap halves each step
    assert torch.allclose(ema.avg["weight"], w0 + 1.0, atol=1e-3)


def test_with_a_weight_average_the_saved_model_is_the_average(tmp_path, tiny_city, tiny_config):
    from stllm.checkpoint import load
    cfg = tiny_config(["train.max_steps=1", "train.eval_every=1", "train.ema=0.5", "model.use_llm=false",
                       "train.lr=0.05"])
    train(cfg, tmp_path / "run", city=tiny_city, progress=False)    # one step, one validation: the best
    last = load(tmp_path / "run" / "checkpoints/last.safetensors")[0]
    saved = load(tmp_path / "run" / "model.safetensors")[0]
    assert saved and all(torch.equal(v, last["ema." + k]) for k, v in saved.items())   # the average was saved,
    assert any(not torch.equal(v, last["model." + k]) for k, v in saved.items())       # not the raw weights
    with pytest.raises(Exception, match="train.ema"):
        tiny_config(["train.ema=1.0"])


@pytest.mark.parametrize("backbone", ["tiny-gpt2", "tiny-llama"])
def test_the_calendar_text_reaches_the_forecast_and_its_padding_does_not(tiny_city, tiny_config, backbone):
    """model.prompt=city_calendar: each window's calendar text (<WHEN>) changes its forecast; padding a shorter
    text to the batch's longest changes nothing (padding is masked and skipped in the position ids)."""
    cfg = tiny_config([f"backbone.name={backbone}", "model.prompt=city_calendar"])
    model, batch = untrained(cfg, tiny_city)
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    torch.nn.init.normal_(model.head.w3.weight)          # the head's output layer starts at zero: wake it up
    texts = ["Forecast from Monday 1 June 2020, 08:00.",
             "Forecast from Monday 1 June 2020, 08:00. Holiday in the forecast: Christmas Day. One day earlier: "
             "no holiday. One week earlier: no holiday.", "Forecast."]
    starts = batch["starts"]
    with torch.no_grad():
        together = model({**batch, "window_text": texts})
        alone = [model({**prep.batch(starts[i:i + 1]), "window_text": [texts[i]]}) for i in range(3)]
        two_texts = model({**prep.batch(starts[[0, 0]]), "window_text": texts[:2]})
    for i in range(3):
        assert torch.allclose(together[i:i + 1], alone[i], atol=1e-5), i
    assert not torch.allclose(two_texts[0], two_texts[1], atol=1e-4)   # same data, other calendar: other forecast
    with pytest.raises(ValueError, match="window_text"):
        model({**batch, "window_text": texts[:2]})
    with pytest.raises(ValueError, match="<WHEN> slot: the batch needs 'window_text'"):
        model({k: v for k, v in batch.items() if k != "window_text"})
