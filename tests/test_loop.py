"""The one training loop (`stllm.loop`): its state and checkpoint format, gradient accumulation, mixed precision, the
freeze helper, and the explaining student and test-time adaptation stepping through it."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stllm import checkpoint
from stllm.config import ConfigError, TrainConfig, load_config
from stllm.loop import LAST, Loop, TrainState, freeze, make_accelerator
from stllm.train import train
from run_results import log_of, numbers

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
ENCODER_ONLY = ["model.use_llm=false", "train.eval_every=1", "train.num_threads=1"]
# LAST's metadata as train() wrote it before the loop had a typed state: a dict of these 13 keys
OLD_STATE = {"step": 6, "epoch": 0, "epoch_step": 6, "best_val": 1.5, "bad_evals": 1, "elapsed_s": 3.2, "step_s": 2.0,
             "windows": 48, "done": False, "stage": 2, "stage1": None, "lr_scale": 0.5, "stopped_by": None}


class Interrupt(Exception):
    pass


def cut_at(cfg, out: Path, step: int, **kwargs) -> None:
    """Train into `out` and stop it (as a crash would) right after optimizer step `step`."""
    def stop(at):
        if at == step:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, out, progress=False, on_step=stop, **kwargs)


# ---- the state ---------------------------------------------------------------------------------------------------
def test_train_state_round_trips_and_reads_the_checkpoints_written_before_it():
    assert TrainState.from_dict(OLD_STATE).to_dict() == OLD_STATE                   # the same 13 keys, same values
    fresh = TrainState.from_dict(json.loads(json.dumps(TrainState().to_dict())))   # inf survives safetensors' JSON
    assert fresh == TrainState() and fresh.best_val == math.inf
    student = TrainState.from_dict({"step": 3, "elapsed_s": 1.5})       # the student's checkpoints held just these
    assert (student.step, student.elapsed_s, student.epoch, student.lr_scale) == (3, 1.5, 0, 1.0)
    assert TrainState.from_dict({**OLD_STATE, "grad_scaler": {"scale": 2.0}}).step == 6   # not a counter: left out


def test_a_checkpoint_from_before_a_state_key_existed_resumes_to_the_same_run(tmp_path):
    cfg = load_config(TINY, [*ENCODER_ONLY, "train.max_steps=4", "train.lr_decay=0"])
    whole = train(cfg, tmp_path / "whole", progress=False)
    cut_at(cfg, tmp_path / "cut", 3)
    tensors, saved = checkpoint.load(tmp_path / "cut" / LAST)
    assert saved["step"] == 2
    old = {k: v for k, v in saved.items() if k not in ("lr_scale", "stopped_by", "stage1")}   # an older train()'s
    checkpoint.atomic_save(tensors, tmp_path / "cut" / LAST, old)
    assert numbers(train(cfg, tmp_path / "cut", resume=True, progress=False)) == numbers(whole)
    assert numbers(log_of(tmp_path / "cut")) == numbers(log_of(tmp_path / "whole"))


# ---- gradient accumulation ---------------------------------------------------------------------------------------
def _linear_run(batches: list[torch.Tensor], grad_accum: int) -> tuple[torch.nn.Linear, TrainState]:
    """A linear layer stepped by SGD through the Loop over `batches` (one epoch), loss mean((w x + b)^2)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    budget = TrainConfig(grad_accum=grad_accum, epochs=1, grad_clip=0.0, lr_decay=0.0)
    accelerator = make_accelerator(budget)
    model, optimizer = accelerator.prepare(model, optimizer)
    loop = Loop(accelerator, model, optimizer, budget, lambda epoch: batches,
                lambda x: (model(x).pow(2).mean(), {"size": float(len(x))}))
    state = TrainState()
    loop.run(state)
    return model, state


def _sgd(batches_per_step: list[list[torch.Tensor]]) -> torch.nn.Linear:
    """The same layer stepped by hand: each step's gradient is the mean over its batches' gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    for group in batches_per_step:
        model.zero_grad()
        (sum(model(x).pow(2).mean() for x in group) / len(group)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return model


def test_gradient_accumulation_steps_once_per_group_with_the_mean_gradient_also_for_a_short_last_group():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, generator=g) for n in (4, 4, 2)]
    for k, groups in ((1, [[b] for b in batches]), (2, [batches[:2], batches[2:]]), (3, [batches])):
        model, state = _linear_run(batches, k)
        assert state.step == len(groups) and state.windows == 10 and state.stopped_by == "epochs"
        expected = _sgd(groups)
        for mine, theirs in zip(model.parameters(), expected.parameters()):
            torch.testing.assert_close(mine, theirs)


def test_a_run_with_gradient_accumulation_reads_k_batches_per_step_and_resumes_exactly(tmp_path):
    cfg = load_config(TINY, [*ENCODER_ONLY, "train.grad_accum=2", "train.max_steps=3", "train.ema=0.5"])
    whole = train(cfg, tmp_path / "whole", progress=False)
    assert whole["training"]["steps"] == 3 and whole["training"]["windows"] == 3 * 2 * cfg.train.batch_size
    one = train(load_config(TINY, [*ENCODER_ONLY, "train.max_steps=3"]), tmp_path / "one", progress=False)
    assert one["training"]["windows"] == 3 * cfg.train.batch_size
    cut_at(cfg, tmp_path / "cut", 2)
    assert numbers(train(cfg, tmp_path / "cut", resume=True, progress=False)) == numbers(whole)
    assert numbers(log_of(tmp_path / "cut")) == numbers(log_of(tmp_path / "whole"))


# ---- mixed precision ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a CUDA GPU")
def test_fp16_without_a_gpu_is_refused_naming_the_key_and_what_works():
    with pytest.raises(ConfigError, match=r"train.mixed_precision=fp16 needs a CUDA GPU.*use bf16"):
        make_accelerator(TrainConfig(mixed_precision="fp16"))


@pytest.mark.parametrize("precision", ["bf16", "no"])   # bf16, then no again in the same process
def test_the_loss_runs_under_the_configured_autocast(precision):
    seen = []
    model = torch.nn.Linear(3, 1)
    budget = TrainConfig(mixed_precision=precision, epochs=1, max_steps=1)
    accelerator = make_accelerator(budget)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def loss(x):
        device = accelerator.device.type
        seen.append(torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device))
        return model(x).float().pow(2).mean(), {}
    Loop(accelerator, model, optimizer, budget, lambda epoch: [torch.ones(2, 3)], loss).run(TrainState())
    assert seen == [torch.bfloat16 if precision == "bf16" else False]


def test_a_bf16_run_trains_on_the_cpu_and_reports_what_the_saved_model_gives(tmp_path, tiny_city):
    from stllm.model import STLLM
    metrics = train(load_config(TINY, [*ENCODER_ONLY, "train.max_steps=2", "train.mixed_precision=bf16"]),
                    tmp_path / "run", city=tiny_city, progress=False)
    assert metrics["training"]["steps"] == 2 and np.isfinite(metrics["mae"])
    assert all(np.isfinite(r["train_loss"]) for r in log_of(tmp_path / "run"))
    assert STLLM.from_pretrained(tmp_path / "run").evaluate(tiny_city)["mae"] == pytest.approx(metrics["mae"],
                                                                                               rel=1e-9)


# ---- one freeze helper -------------------------------------------------------------------------------------------
def test_freeze_holds_named_parts_or_trains_exactly_what_a_predicate_names(tiny_city):
    from stllm.data.prepared import PreparedCity
    from stllm.train import build_model
    cfg = load_config(TINY, ["model.use_llm=false"])
    model = build_model(cfg, PreparedCity(tiny_city, cfg.data, cfg.encoder))
    freeze(model, hold=["encoder"])
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and not any(n.startswith("encoder.") for n in trains)
    assert trains == {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    freeze(model, train=lambda name: name.startswith("head."))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.lin.weight", "head.lin.bias"}
    with pytest.raises(ValueError, match=r"train.stage2_freeze: 'encodr' names no trainable part.*'encoder'"):
        freeze(model, hold=["encodr"], key="train.stage2_freeze")


# ---- the student and test-time adaptation step through the same loop -----------------------------------------
def test_test_time_adaptation_steps_through_the_loop(tmp_path, tiny_city, monkeypatch):
    from stllm.adapt import adapt
    from stllm.model import STLLM
    train(load_config(TINY, [*ENCODER_ONLY, "train.max_steps=1"]), tmp_path / "run", city=tiny_city, progress=False)
    model = STLLM.from_pretrained(tmp_path / "run")
    prep = model.prepare(tiny_city)
    steps, step = [], Loop.step
    monkeypatch.setattr(Loop, "step", lambda self, group, state: steps.append(len(group)) or step(self, group, state))
    adapted = adapt(model, prep, before=int(prep.splits["test"][0]), steps=3)
    assert steps == [1, 1, 1] and not adapted.training


def test_the_student_uses_each_sample_once_per_epoch():
    from stllm.distill.student import sample_batches
    batches = sample_batches(list("abcde"), batch_size=2, seed=0)
    for epoch in range(3):
        assert [len(b) for b in batches(epoch)] == [2, 2, 1]
        assert sorted(x for b in batches(epoch) for x in b) == list("abcde")
    assert batches(0) != batches(1) and batches(1) == sample_batches(list("abcde"), 2, 0)(1)


def test_the_student_resumes_mid_run_to_the_same_run(tmp_path, tiny_city, monkeypatch):
    """Interrupted after its second step of three (the third in a new epoch), the student resumed from LAST ends
    with the uninterrupted student's log and metrics."""
    from stllm.distill import student
    cfg = load_config(TINY, ["backbone.name=tiny-llama", "explain.enabled=true", "explain.form=slots", "explain.forecaster=false",
                             "explain.n_samples=4", "explain.batch_size=2", "explain.steps=3", "train.num_threads=1"])
    whole = student.train_student(cfg, tmp_path / "whole", city=tiny_city, progress=False)
    assert [r["step"] for r in log_of(tmp_path / "whole")] == [1, 2, 3]
    assert all(np.isfinite(r["lm"]) and np.isfinite(r["train_loss"]) for r in log_of(tmp_path / "whole"))
    calls, joint_loss = [], student.joint_loss

    def third_call_crashes(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return joint_loss(*args)
    monkeypatch.setattr(student, "joint_loss", third_call_crashes)
    with pytest.raises(Interrupt):
        student.train_student(cfg, tmp_path / "cut", city=tiny_city, progress=False)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "cut" / LAST)[1]["step"] == 2
    resumed = student.train_student(cfg, tmp_path / "cut", resume=True, city=tiny_city, progress=False)
    assert numbers(log_of(tmp_path / "cut")) == numbers(log_of(tmp_path / "whole"))
    assert {k: v for k, v in numbers(resumed).items() if "init_from" not in k} == \
        {k: v for k, v in numbers(whole).items() if "init_from" not in k}
