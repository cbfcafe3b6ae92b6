"""The explaining student: chain-of-thought distillation with the joint loss.

Samples are (window start, node) pairs from the training split. A teacher (the analytic one by default) writes
each one's five-stage rationale knowing the true future; the target text keeps FORECAST_SLOT as the literal
"{forecast}", so the student learns to write the slot and never digits of its own forecast (the program fills the
slot with the regression head's numbers, see `stllm.explain`). With explain.fact_slots (default) the analytic
teacher also writes its computed facts as fact slots: the program's text for each slot is part of the training
sequence as context (labelled -100), so the student learns to call for a fact and to word what follows from it,
exactly as `stllm.distill.node_layout.generate_with_facts` runs it at explain time. The input is the node-layout
prompt (prompts/node.txt) with the node's ST-tokens and <ST_PRE> query spliced in (`stllm.distill.node_layout`).

Joint loss (per step, on a batch of samples):
    regression at <ST_PRE> of the node layout, through the model's head (masked MAE on the scaled axis, as
    `stllm.train.masked_loss`)
  + explain.lm_weight   * cross-entropy on the rationale tokens only (prompt tokens labelled -100)

What it trains (explain.own_adapter, default true): a second LoRA adapter of its own, started as a copy of the
forecaster's, and nothing else. The node layout runs with that adapter (`node_layout.explain_adapter`), the city
layout with the forecaster's, so the forecasts the student explains are exactly the forecaster's. With
own_adapter=false it trains the forecaster's LoRA, encoder, projector, <ST_PRE> query and head, and adds
  + explain.city_weight * the city-layout regression loss on the same windows,
to keep the city layout's forecasts trained (measured on Beijing: not enough, test MAE 26.66 -> 30.48).
AdamW as `stllm.train.make_optimizer`, LoRA at explain.lora_lr.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stllm.backbone import base_model
from stllm.config import Config
from stllm.data.city import CityData
from stllm.data.prepared import PreparedCity, batch_to
from stllm.data.fit import resolve_node, resolve_time
from stllm.distill.dataset import distill, load_rationales, save_rationales
from stllm.distill.node_layout import explain_adapter, lm_loss, node_forward, node_inputs, slot_vectors
from stllm.distill.facts import Facts, effects_to_dict, estimate_effects
from stllm.distill.teachers import AnalyticTeacher, HFChatTeacher, OpenAITeacher, Teacher, fill_facts
from stllm.loop import LAST, Loop, TrainState, freeze, make_accelerator
from stllm.model import EXPLAIN_ADAPTER, run_weights
from stllm.train import build_model, make_optimizer, masked_loss, peak_rss_mb

EFFECTS = "effects.json"     # the weather effects the rationales use (stllm.distill.facts.effects_to_dict)


@dataclass
class StudentSample:
    start: int          # window start: index of the first target step
    node: int           # node position
    prompt: str         # node-layout prompt with <ST_HIS> / <ST_PRE>
    rationale: str      # the teacher's rationale, FORECAST_SLOT (and any fact slots) kept as text
    target: list        # what the student is trained on: [(text, written_by_program)] (teachers.fill_facts with
                        # keep_slots: it writes the slot names, the program the text after each)


def pick_windows(prep: PreparedCity, n_samples: int, seed: int = 0, channel: int = 0) -> list[tuple[int, int]]:
    """n_samples (start, node) pairs from the training split, each with an observed last input and future."""
    rng = np.random.default_rng(seed)
    starts, out, tries = prep.splits["train"], [], 0
    values = prep.city.values[..., channel]
    while len(out) < n_samples and tries < 50 * n_samples:
        tries += 1
        s, i = int(rng.choice(starts)), int(rng.integers(prep.n_nodes))
        if (s, i) not in out and np.isfinite(values[s - 1, i]) and np.isfinite(values[s:s + prep.t_out, i]).any():
            out.append((s, i))
    if not out:
        raise ValueError(f"{prep.city.name}: no training window with observed data to write rationales for")
    return out


def make_teacher(name: str, url: str = "", key_env: str = "OPENAI_API_KEY",
                 trust_remote_code: bool = False, fact_slots: bool = False) -> Teacher:
    """"analytic", "hf:<local model folder>" (a chat model through transformers) or "openai:<model name>" (an
    OpenAI-compatible server at `url`, API key from the environment variable `key_env`). fact_slots: the analytic
    teacher writes its facts as fact slots (stllm.distill.teachers)."""
    if name == "analytic":
        return AnalyticTeacher(fact_slots=fact_slots)
    if name.startswith("openai:"):
        if not url:
            raise ValueError(f"teacher {name!r} needs the server's URL (explain.teacher_url)")
        return OpenAITeacher(url, model=name[len("openai:"):], api_key_env=key_env)
    if not name.startswith("hf:"):
        raise ValueError(f"unknown teacher {name!r}: expected analytic, hf:<model folder> or openai:<model name>")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = name[3:]
    return HFChatTeacher(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code),
                         AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code), name=name)


def teacher_from_config(ex) -> Teacher:
    """The teacher an `explain:` config section names."""
    return make_teacher(ex.teacher, ex.teacher_url, ex.teacher_key_env, ex.teacher_trust_remote_code, ex.fact_slots)


def write_rationales(cfg: Config, out_dir: str | Path, city: CityData | None = None) -> dict:
    """`stllm distill`: the teacher's rationales for explain.n_samples (window, sensor) pairs of the training
    split, as a `datasets` dataset and JSONL in out_dir (see stllm.distill.dataset), plus the weather effects
    they use (effects.json). Returns a summary (also written as summary.json)."""
    from stllm.data.fit import load_city
    out = Path(out_dir)
    city = city if city is not None else load_city(cfg.data)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    teacher = teacher_from_config(cfg.explain)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    effects = write_effects(prep, out)
    pairs = pick_windows(prep, cfg.explain.n_samples, cfg.train.seed)
    _, ds = make_samples(city, prep, pairs, teacher, effects=effects)
    save_rationales(ds, out)
    summary = {"dataset": city.name, "teacher": teacher.name, "n_rationales": len(ds),
               "seconds": round(time.time() - t0, 2), "columns": list(ds.column_names), "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_effects(prep: PreparedCity, folder: str | Path) -> dict:
    """The weather effects the teacher's rationales use, estimated on the prepared city's training part ({} for a
    city without weather), written to folder/effects.json as a record of the rationales' inputs. Returns them.
    `stllm explain` does not read the file: it estimates the same effects from the data (stllm.explain)."""
    effects = estimate_effects(prep.city, prep.train_end, prep.t_in, prep.t_out) if prep.city.exog is not None else {}
    (Path(folder) / EFFECTS).write_text(json.dumps(effects_to_dict(effects), indent=1))
    return effects


def make_samples(city: CityData, prep: PreparedCity, pairs: list[tuple[int, int]], teacher: Teacher,
                 channel: int = 0, effects=None):
    """The teacher's rationales for `pairs` as (samples, the `datasets.Dataset` of stllm.distill)."""
    ds = distill(city, teacher, [(i, s) for s, i in pairs], t_in=prep.t_in, t_out=prep.t_out, channel=channel,
                 effects=effects)
    return [to_sample(s, i, row) for (s, i), row in zip(pairs, ds)], ds


def read_samples(city: CityData, prep: PreparedCity, folder: str | Path):
    """The rationales `stllm distill` wrote to `folder` (its `datasets` dataset, `datasets.load_from_disk`), row
    for row, as (samples, that dataset): each row's node id and first target step locate its window."""
    ds = load_rationales(folder)
    return [to_sample(resolve_time(city, row["start"], prep.t_in), resolve_node(city, row["node"]), row)
            for row in ds], ds


def to_sample(start: int, node: int, row: dict) -> StudentSample:
    """One rationale row as a StudentSample; its fact slots become the program's text, which the student reads
    and does not write."""
    facts = Facts.from_dict(json.loads(row["facts"]))
    target = fill_facts(row["rationale"], facts, row["target"], keep_slots=True)
    return StudentSample(start, node, row["prompt"], row["rationale"], target)


def joint_loss(model, prep: PreparedCity, samples: list[StudentSample], lm_weight: float = 0.5,
               city_weight: float = 1.0, kind: str = "mae", mask_zeros: bool = True) -> tuple[torch.Tensor, dict]:
    """The joint loss on a batch of samples, and its parts {"regression", "lm", "city"} as floats."""
    batch, rows, inputs = _student_inputs(model, prep, samples, mask_zeros)
    with explain_adapter(model):                 # the student's own adapter, when it has one
        hidden, y_node = node_forward(model, inputs)                             # y_node [B, t_out, 1, C]
    w, n = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    target = batch["y"][w, :, n][:, :, None]                                     # [B, t_out, 1, C]
    mask = batch["y_mask"][w, :, n][:, :, None]
    reg = masked_loss(y_node, target, mask, kind)
    lm = lm_loss(model, hidden, inputs.labels)
    loss = reg + lm_weight * lm
    parts = {"regression": reg.item(), "lm": lm.item()}
    if city_weight and not model.has_explain_adapter:   # with its own adapter the student cannot move the city layout
        city = masked_loss(model(batch), batch["y"], batch["y_mask"], kind)
        loss = loss + city_weight * city
        parts["city"] = city.item()
    return loss, parts


def _student_inputs(model, prep: PreparedCity, samples: list[StudentSample], mask_zeros: bool = True):
    """(city batch of the samples' windows, rows [(window in batch, node)], NodeInputs with the targets)."""
    device = next(model.parameters()).device
    starts = sorted({x.start for x in samples})
    batch = batch_to(prep.batch(np.array(starts), mask_zeros), device)
    his, pre, base = slot_vectors(model, batch)                                  # [b, N, m, d], [b, N, d], ...
    rows = [(starts.index(x.start), x.node) for x in samples]
    inputs = node_inputs(model, his, pre, rows, [x.prompt for x in samples], [x.target for x in samples],
                         base=base)
    return batch, rows, inputs


@torch.no_grad()
def push_accuracy(model, prep: PreparedCity, samples: list[StudentSample], batch_size: int = 4) -> dict:
    """Teacher-forced: with the teacher's rationale as context up to each "which pushes", how often the student
    ranks the teacher's word ("up" or "down") above the other. It tells a student that has not learned which
    way a factor pushes (about 0.5) from one that has, without generating. Returns {"correct", "total", "share"}."""
    tok = model.tokenizer
    words = {w: tok(f" {w}", add_special_tokens=False)["input_ids"] for w in ("up", "down")}
    cue = tok(" pushes", add_special_tokens=False)["input_ids"]
    k = next(j for j, (a, b) in enumerate(zip(words["up"], words["down"])) if a != b)   # where the words part
    head = base_model(model.backbone).get_output_embeddings()
    correct = total = 0
    for lo in range(0, len(samples), batch_size):
        _, _, inputs = _student_inputs(model, prep, samples[lo:lo + batch_size])
        with explain_adapter(model):
            hidden, _ = node_forward(model, inputs)                              # [B, L, d_llm]
        for r, row in enumerate(inputs.labels.tolist()):
            for p in range(len(cue), len(row)):
                said = [w for w, ids in words.items() if row[p:p + len(ids)] == ids]
                if said and row[p - len(cue):p] == cue:
                    logits = head(hidden[r, p + k - 1])                          # predicts token p + k
                    says_up = bool(logits[words["up"][k]] > logits[words["down"][k]])
                    correct += int(says_up == (said[0] == "up"))
                    total += 1
    return {"correct": correct, "total": total, "share": correct / total if total else None}


def train_student(cfg: Config, out_dir: str | Path, resume: bool = False, city: CityData | None = None,
                  progress: bool = True) -> dict:
    """The explain recipe. explain.form=written: the forecaster (stage 1 below, or train.init_from), then the writer
    (`stllm.distill.writer.train_writer_run`). explain.form=slots: write rationales with the teacher, fine-tune the
    student with the joint loss, save the run like `stllm.train.train` does (plus effects.json and rationales/),
    evaluate on the test split. Returns metrics.
    With explain.rationales (a folder `stllm distill` wrote) the student learns exactly those rows instead.

    The student steps through `stllm.loop.Loop` like every training: explain.batch_size samples per batch, each
    epoch's samples in the order of a permutation drawn from train.seed + epoch, explain.steps optimizer steps (one
    pass when 0) or explain.minutes, train.grad_accum and train.mixed_precision as in fine-tuning; no validation.
    Each step is logged to log.jsonl (its loss and the loss's parts) and checkpointed to LAST, so --resume
    continues it exactly. One process only: the node layout calls the model's parts, not its forward. The
    student learns rationales of the data section's dataset; data.sources reach only its forecaster stage."""
    from stllm.data.fit import load_city
    from stllm.infer import evaluate_with_baselines
    from stllm.distill.writer import WRITER_DIR, train_writer_run
    out, written = Path(out_dir), cfg.explain.form == "written"
    if ((out / LAST).exists() or (out / WRITER_DIR / LAST).exists()) and not resume:
        raise FileExistsError(f"{out} holds a run; pass --resume to continue it or choose another --out")
    if cfg.model.task != "forecast":
        raise ValueError(f"explain.enabled needs model.task=forecast, got {cfg.model.task!r}")
    if not cfg.model.use_llm and not written:
        raise ValueError("explain.enabled needs a language model (model.use_llm=true): the student writes text")
    accelerator = make_accelerator(cfg.train)
    if accelerator.num_processes > 1:
        raise ValueError("the explaining student trains on one process; run `stllm train` without accelerate launch")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    city = city if city is not None else load_city(cfg.data)
    ex, init_from, forecaster = cfg.explain, cfg.train.init_from, None
    if ex.forecaster and not init_from:  # stage 1: the city-layout forecaster, as `stllm train` trains it
        from stllm.train import train
        stage1 = dataclasses.replace(cfg, explain=dataclasses.replace(ex, enabled=False))
        init_from = out / "forecaster"
        if not (init_from / "metrics.json").is_file():              # on --resume a finished stage 1 is kept
            train(stage1, init_from, resume=resume and (init_from / LAST).exists(), city=city, progress=progress)
        forecaster = json.loads((init_from / "metrics.json").read_text())
    if written:      # explain.form: written, the writer model (stllm.distill.writer) beside the forecaster
        if not init_from:
            raise ValueError("explain.form=written needs a forecaster: explain.forecaster=true or train.init_from")
        return train_writer_run(cfg, out, init_from, city=city, resume=resume, progress=progress)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model, optimizer = student_model(cfg, prep, init_from)
    cfg.save(out / "config.yaml")

    effects = write_effects(prep, out)
    given = getattr(ex, "rationales", "")        # a folder `stllm distill` wrote: its rows, as they are
    if given:
        samples, ds = read_samples(city, prep, given)
    else:
        pairs = pick_windows(prep, ex.n_samples, cfg.train.seed)
        samples, ds = make_samples(city, prep, pairs, teacher_from_config(ex), effects=effects)
    save_rationales(ds, out / "rationales")

    raw, state, parts = fit_student(cfg, accelerator, model, optimizer, prep, samples, out, resume, progress)
    raw.eval()
    raw.save_pretrained(out)                      # with the meta build_model attached
    metrics = evaluate_with_baselines(raw, prep, "test", batch_size=cfg.train.batch_size)
    metrics["training"] = {"steps": state.step, "wall_s": round(state.elapsed_s, 2),
                           "peak_rss_mb": peak_rss_mb(), "student": True}
    metrics["explain"] = {"teacher": ex.teacher, "n_samples": len(samples), "lm_weight": ex.lm_weight,
                          "own_adapter": ex.own_adapter,
                          "city_weight": None if ex.own_adapter else ex.city_weight,
                          "last_step_losses": parts or None,
                          "init_from": str(init_from) if init_from else None,
                          "forecaster_test_mae": None if forecaster is None else forecaster["mae"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def student_model(cfg: Config, prep: PreparedCity, init_from: str | Path | None
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(the student's model, its AdamW): built as `stllm.train` builds it, from the forecaster's weights when there
    is one (its LoRA from adapter/); with explain.own_adapter only its own adapter trains, else everything that
    trains in fine-tuning. LoRA learns at explain.lora_lr."""
    ex = cfg.explain
    model = build_model(cfg, prep)
    if init_from:
        source = Path(init_from) / "model.safetensors"
        model.load_trainable_state_dict(run_weights(init_from, model), str(source))
    if ex.own_adapter:
        model.add_explain_adapter()
        freeze(model, train=lambda name: "lora_" in name and f".{EXPLAIN_ADAPTER}." in name)
    optimizer = make_optimizer(model, dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, lora_lr=ex.lora_lr or cfg.train.lora_lr)))
    return model, optimizer


def fit_student(cfg: Config, accelerator, model, optimizer, prep: PreparedCity, samples: list[StudentSample],
                out: Path, resume: bool, progress: bool) -> tuple[torch.nn.Module, TrainState, dict[str, float]]:
    """Step the student through the loop with the joint loss for explain.steps steps (one pass over the samples
    when 0) or explain.minutes, logging and checkpointing every step; from LAST on resume. Returns (the trained
    model, unwrapped; its TrainState; the last step's loss parts)."""
    ex = cfg.explain

    def loss_of(raw):
        def loss(chunk: list[StudentSample]) -> tuple[torch.Tensor, dict]:
            return joint_loss(raw, prep, chunk, ex.lm_weight, ex.city_weight, cfg.train.loss, cfg.train.mask_zeros)
        return loss
    return fit_samples(accelerator, model, optimizer, cfg.train, samples, ex.batch_size, ex.steps, ex.minutes,
                       loss_of, out, resume, progress)


def fit_samples(accelerator, model, optimizer, train, samples: list, batch_size: int, steps: int, minutes: float,
                loss_of, out: Path, resume: bool, progress: bool) -> tuple[torch.nn.Module, TrainState, dict]:
    """The loop of the text stages (the slot student, the writer): `samples` in batches of batch_size
    (`sample_batches`), `steps` optimizer steps (one pass when 0) or `minutes`, train's grad_accum, clipping and
    mixed precision; every step logged to out/log.jsonl and checkpointed to out's LAST, from which `resume`
    continues (a larger `steps` or `minutes` goes on). loss_of(unwrapped model) -> the loss of a batch. Returns
    (the trained model, unwrapped; its TrainState; the last step's loss parts)."""
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    per_epoch = math.ceil(math.ceil(len(samples) / batch_size) / train.grad_accum)   # optimizer steps
    total = steps or per_epoch
    budget = dataclasses.replace(train, max_steps=total, max_minutes=minutes, epochs=math.ceil(total / per_epoch))
    loop = Loop(accelerator, model, optimizer, budget, sample_batches(samples, batch_size, train.seed), loss_of(raw),
                out=out, progress=progress)
    state = TrainState()
    if resume and (out / LAST).exists():
        state, _ = loop.restore(out / LAST)
        state.done = state.step >= total          # a larger budget continues it
    loop.start(state)
    out.mkdir(parents=True, exist_ok=True)
    loop.open_log(state.step if resume else -1)
    loop.run(state, every=1)
    loop.close()
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False), state, loop.last_parts   # autocast off again


def sample_batches(samples: list[StudentSample], batch_size: int, seed: int):
    """The student's batches of each epoch: its samples in the order of a permutation drawn from seed + epoch, cut
    into batches of batch_size (every sample once per epoch)."""
    def batches(epoch: int) -> list[list[StudentSample]]:
        order = np.random.default_rng(seed + epoch).permutation(len(samples))
        return [[samples[j] for j in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    return batches
