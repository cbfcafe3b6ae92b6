"""One explicit training loop (accelerate): AdamW, masked loss, clipping, early stopping, atomic checkpoints, resume."""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from stllm import checkpoint
from stllm.config import Config, ConfigError
from stllm.data.city import CityData
from stllm.data.fit import RunMeta, load_city
from stllm.data.prepared import PreparedCity, batch_to
from stllm.infer import evaluate, evaluate_with_baselines, selection_error
from stllm.nn.classification import event_loss
from stllm.model import STLLM, WEIGHTS, run_weights

LAST, BEST = "checkpoints/last.safetensors", "checkpoints/best.safetensors"
# What `resume` may change in a run's config: the budgets that decide how long training goes on (train.patience is
# early stopping's), and settings of this machine (threads, the converted-backbone cache) that change neither
# what the run trains, on which data, nor the shapes it builds.
RESUME_MAY_CHANGE = ("train.epochs", "train.max_steps", "train.max_minutes", "train.patience", "train.num_threads",
                     "backbone.cache_dir")


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mae") -> torch.Tensor:
    """Mean over observed (mask = 1) entries; pred/target/mask [b, t_out, N, C] on the scaled axis."""
    err = pred - target
    per = err.abs() if kind == "mae" else torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def build_model(cfg: Config, prep: PreparedCity) -> STLLM:
    """The model `cfg` describes, sized by the prepared city and carrying its `RunMeta` (what `save_pretrained`
    writes beside the weights, so the run can be used without its data)."""
    backbone = tokenizer = None
    if cfg.model.use_llm:
        from stllm.backbone import build_backbone
        backbone, tokenizer = build_backbone(cfg.backbone)
    model = STLLM(cfg, prep.city.n_channels, prep.n_exog, backbone, tokenizer)
    model.meta = RunMeta.from_prepared(prep)
    return model


def freeze(model: STLLM, prefixes: list[str]) -> None:
    """Hold the parameters whose names start with one of `prefixes` (e.g. "encoder", "skip") still."""
    params = dict(model.named_parameters())
    for prefix in prefixes:
        hit = [p for n, p in params.items() if n == prefix or n.startswith(prefix + ".")]
        if not hit or prefix.startswith("backbone"):
            parts = sorted({n.split(".")[0] for n in params} - {"backbone"})
            raise ValueError(f"train.freeze: {prefix!r} names no trainable part of this model; parts: {parts}")
        for p in hit:
            p.requires_grad_(False)


def make_optimizer(model: STLLM, cfg: Config) -> torch.optim.AdamW:
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if lora:
        groups.append({"params": lora, "lr": cfg.train.lora_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


class WeightAverage:
    """Exponential moving average of the trainable weights (train.ema). Validation and the best checkpoint use the
    average (`swapped_in`); the raw weights go on training. The decay ramps up over the first steps, (1 + n) /
    (10 + n) until it reaches `decay`, so the average does not drag the initial weights along."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start again from the model's current trainable weights (e.g. when a new stage trains other parts)."""
        self.avg = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.n = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.n += 1
        decay = min(self.decay, (1 + self.n) / (10 + self.n))
        for name, p in model.named_parameters():
            if name in self.avg:
                self.avg[name].lerp_(p.detach(), 1 - decay)

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The average in the model's parameters for the duration of the block, the raw weights back after it."""
        params = dict(model.named_parameters())
        raw = {n: params[n].detach().clone() for n in self.avg}
        with torch.no_grad():
            for n, v in self.avg.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in raw.items():
                    params[n].copy_(v)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": v for n, v in self.avg.items()} | {"ema_n": torch.tensor(self.n)}

    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        avg = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if set(avg) != set(self.avg):
            raise ValueError(f"{source}: its weight average (train.ema) does not cover this model's trainable "
                             f"weights; was it written with another train.ema or model?")
        self.avg, self.n = avg, int(tensors["ema_n"])


def train(cfg: Config, out_dir: str | Path, resume: bool = False, city: CityData | None = None,
          progress: bool = True, on_step=None) -> dict:
    """Train a run into out_dir and evaluate it on the test split. Returns metrics.json's content.

    resume=True continues the run in out_dir from its last checkpoint, or from scratch when it stopped before its
    first one. The config must equal the run's config.yaml except for RESUME_MAY_CHANGE; that is checked before any
    file is touched (`check_resume`), so a refused resume leaves the folder as it was. A finished run (metrics.json
    written) continues when the new budget leaves room (a larger train.max_steps, epochs, max_minutes or patience)
    and is returned untouched when it does not. A continued run is not bit-identical to one given the larger
    budget from the start: it validated at its old stop. The run folder is created only once the config and the
    data have been checked (data loaded, PreparedCity and model built).
    on_step(step) is called after each optimizer step (tests use it to interrupt a run).
    Under `accelerate launch` with several processes, each process takes its share of every batch
    (train.batch_size is the global batch) and only the main process writes files.
    """
    out = Path(out_dir)
    if not resume and ((out / LAST).exists() or (out / WEIGHTS).exists()):
        raise FileExistsError(f"{out} holds a run; pass --resume to continue it or choose another --out")
    changed = check_resume(cfg, out) if resume else []
    two_stage = cfg.model.use_llm and (cfg.train.encoder_first_minutes > 0 or cfg.train.encoder_first_steps > 0)
    if two_stage and not cfg.model.encoder_skip:
        raise ValueError("train.encoder_first_minutes and train.encoder_first_steps need model.encoder_skip=true: "
                         "the first stage trains the encoder through its own read-out")
    # The data-driven graph idles when a city has wind, so DDP must allow unused parameters.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    city = city if city is not None else load_city(cfg.data)
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    train_starts = prep.splits["train"][:: cfg.train.train_stride]
    if cfg.data.train_days:  # few-shot: only windows whose targets lie in the first train_days days
        train_starts = train_starts[train_starts + prep.t_out <= cfg.data.train_days * city.steps_per_day]
    if len(train_starts) == 0:
        raise ValueError(f"{city.name}: no training windows (T={city.n_steps}, split {cfg.data.split})")
    model = build_model(cfg, prep)
    if cfg.train.init_from:
        source = Path(cfg.train.init_from) / "model.safetensors"
        if not source.is_file():
            raise FileNotFoundError(f"train.init_from={cfg.train.init_from}: no model.safetensors there")
        weights = run_weights(cfg.train.init_from, model)   # LoRA from its adapter/, the rest from the file
        if model.backbone is not None and model.skip is not None and "head.lin.weight" in weights:
            # an encoder-only run: its linear head becomes the skip read-out, so training starts from its forecast
            weights = {"skip." + k[5:] if k.startswith("head.lin.") else k: v for k, v in weights.items()}
        loaded = model.load_trainable_state_dict(weights, str(source), partial=True)
        accelerator.print(f"initialised {len(loaded)} tensors from {source}")
    freeze(model, cfg.train.freeze)
    set_seed(cfg.train.seed)   # the same random stream (dropout) from step 0 whatever building the model drew
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1:
        accelerator.print(f"training on {world} processes ({accelerator.distributed_type}), "
                          f"{cfg.train.batch_size // world}+ windows per process per step")

    # stage 1 (two-stage training only): the language model is bypassed; stage 2: the language-model side
    # (train.stage2_freeze holds the encoder and its read-out still).
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "best_val": math.inf, "bad_evals": 0, "elapsed_s": 0.0,
             "step_s": 0.0, "windows": 0, "done": False,  # step_s: time in optimizer steps, validation excluded
             "stage": 1 if two_stage else 2, "stage1": None, "lr_scale": 1.0, "stopped_by": None}
    resumed = resume and (out / LAST).exists()
    if resumed:
        tensors, saved = checkpoint.load(out / LAST)
        state.update(saved)
        checkpoint.restore_training_state(tensors, raw_model, optimizer)
        accelerator.print(f"resumed {out} at step {state['step']} (epoch {state['epoch']})")
        if two_stage and state["stage"] == 2:
            freeze(raw_model, cfg.train.stage2_freeze)
        set_lr(optimizer, cfg, state.get("lr_scale", 1.0))
    elif resume:
        accelerator.print(f"{out} stopped before its first checkpoint: training it from the start")
    ema = WeightAverage(raw_model, cfg.train.ema) if cfg.train.ema else None
    if ema is not None and resumed:
        ema.load(tensors, str(out / LAST))

    def training_state() -> dict[str, torch.Tensor]:
        """What LAST holds: weights, optimizer moments, RNG and the weight average."""
        return checkpoint.training_state(raw_model, optimizer) | (ema.state() if ema is not None else {})

    val_starts = _spread(prep.splits["val"], cfg.train.val_windows)
    bs = cfg.train.batch_size
    steps_per_epoch = math.ceil(len(train_starts) / bs)
    eval_every = cfg.train.eval_every or steps_per_epoch
    stage2_every = cfg.train.stage2_eval_every or eval_every
    events = cfg.model.task == "events"
    t_start, loss_sum, loss_n = time.time() - state["elapsed_s"], 0.0, 0
    log = None   # opened once the run folder exists

    def validate_and_checkpoint() -> None:
        nonlocal loss_sum, loss_n
        with ema.swapped_in(raw_model) if ema is not None else contextlib.nullcontext():   # validate the average
            val = selection_error(evaluate(raw_model, prep, val_starts, batch_size=bs)) if len(val_starts) \
                else loss_sum / max(loss_n, 1)
            improved = val < state["best_val"]
            if improved and main:
                checkpoint.atomic_save(raw_model.trainable_state_dict(), out / BEST,
                                       {"step": state["step"], "val_error": val})
        state["elapsed_s"] = time.time() - t_start
        if improved:
            state["best_val"], state["bad_evals"] = val, 0
        else:
            state["bad_evals"] += 1
            if cfg.train.lr_decay and state["bad_evals"] % cfg.train.lr_decay_after == 0:
                state["lr_scale"] *= cfg.train.lr_decay
                set_lr(optimizer, cfg, state["lr_scale"])
        if not main:   # every process validates (same windows, same weights) so all stop together
            loss_sum, loss_n = 0.0, 0
            return
        record = {"step": state["step"], "epoch": state["epoch"], "train_loss": loss_sum / loss_n if loss_n else None,
                  "val_error": val, "best_val_error": state["best_val"], "elapsed_s": round(state["elapsed_s"], 2),
                  "windows_per_s": round(state["windows"] / max(state["step_s"], 1e-9), 2),
                  "lr_scale": state["lr_scale"]}
        log.write(json.dumps(record) + "\n")
        log.flush()
        checkpoint.atomic_save(training_state(), out / LAST, state)
        loss_sum, loss_n = 0.0, 0

    def begin_stage2(why: str) -> None:
        """End stage 1 and switch the language model on; it corrects the best encoder, not the last one."""
        _start_stage2(state, accelerator, why)
        accelerator.wait_for_everyone()
        if (out / BEST).exists():
            raw_model.load_trainable_state_dict(checkpoint.load(out / BEST)[0], str(out / BEST))
        freeze(raw_model, cfg.train.stage2_freeze)
        if ema is not None:
            ema.reset(raw_model)     # stage 2 averages its own parts, from the best stage-1 weights
        set_lr(optimizer, cfg, state["lr_scale"])
        if main:
            checkpoint.atomic_save(training_state(), out / LAST, state)

    if resumed:
        finished = (out / "metrics.json").is_file()
        if finished and stop_reason(state, cfg):
            accelerator.print(f"{out} is finished (stopped by {stop_reason(state, cfg)}) and the given budget leaves "
                              f"no room to continue: nothing to do (raise one of {', '.join(RESUME_MAY_CHANGE[:4])})")
            return json.loads((out / "metrics.json").read_text()) if main else {}
        if state["stage"] == 1 and (state["bad_evals"] >= cfg.train.patience or cfg.train.encoder_first_steps and
                                    state["step"] >= cfg.train.encoder_first_steps):
            # stopped between the validation that ended stage 1 and the switch: switch as the loop would have
            begin_stage2("early_stopping" if state["bad_evals"] >= cfg.train.patience else "encoder_first_steps")
        state["stopped_by"] = stop_reason(state, cfg)
        state["done"] = state["stopped_by"] is not None
        if finished:
            accelerator.print(f"continuing the finished run {out} from step {state['step']}")
    if changed:
        accelerator.print(f"resuming with a new budget: {', '.join(changed)}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.recover(out)   # half-written files of a crash
        if not resume or changed or not (out / "config.yaml").is_file():
            with checkpoint.replacing(out / "config.yaml") as tmp:
                cfg.save(tmp)
        _trim_log(out / "log.jsonl", state["step"] if resumed else -1)
        log = (out / "log.jsonl").open("a")

    if cfg.train.init_from and not resumed and len(val_starts):
        # a run that starts from trained weights (few-shot, warm start) is validated before its first step, so
        # early stopping keeps those weights when training on the new data only makes them worse
        model.eval()
        validate_and_checkpoint()
        model.train()
    while not state["done"] and state["epoch"] < cfg.train.epochs:
        order = np.random.default_rng(cfg.train.seed + state["epoch"]).permutation(train_starts)
        bar = tqdm(range(state["epoch_step"], steps_per_epoch), disable=not (progress and main), leave=False,
                   desc=f"epoch {state['epoch'] + 1}/{cfg.train.epochs}")
        model.train()
        for i in bar:
            raw_model.llm_active = state["stage"] == 2
            t_step = time.time()
            starts = order[i * bs:(i + 1) * bs]
            if world > 1:  # this process's share; every process needs at least one window to step together
                starts = np.resize(starts, max(len(starts), world))[rank::world]
            batch = batch_to(prep.batch(starts, cfg.train.mask_zeros and not events), accelerator.device)
            pred = model(batch)
            if events:
                loss = event_loss(pred, batch["y_raw"])
            else:
                loss = masked_loss(pred, batch["y"], batch["y_mask"], cfg.train.loss)
            if not loss.requires_grad:
                # Only parts that this batch does not reach are trainable (e.g. the note effect alone, and no note
                # meets these windows): a zero gradient, so the step and every process's step count stay in line.
                loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            accelerator.backward(loss)
            if cfg.train.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model)
            state["step"] += 1
            state["epoch_step"] = i + 1
            state["windows"] += len(starts)
            state["step_s"] += time.time() - t_step
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.set_postfix(loss=f"{loss.item():.4f}", best_val_error=f"{state['best_val']:.3f}")
            if on_step is not None:
                on_step(state["step"])
            out_of_time = _agree(accelerator, bool(cfg.train.max_minutes) and time.time() - t_start > 60 * cfg.train.max_minutes)
            out_of_steps = cfg.train.max_steps and state["step"] >= cfg.train.max_steps
            stage1_steps = state["stage"] == 1 and bool(cfg.train.encoder_first_steps) and \
                state["step"] >= cfg.train.encoder_first_steps
            stage1_minutes = state["stage"] == 1 and bool(cfg.train.encoder_first_minutes) and _agree(
                accelerator, time.time() - t_start > 60 * cfg.train.encoder_first_minutes)
            stage1_over = stage1_steps or stage1_minutes
            every = stage2_every if two_stage and state["stage"] == 2 else eval_every
            if (state["step"] % every == 0 or out_of_time or out_of_steps or stage1_over
                    or i + 1 == steps_per_epoch):
                if i + 1 == steps_per_epoch:
                    state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0
                model.eval()
                validate_and_checkpoint()
                model.train()
                if state["stage"] == 1 and (stage1_over or state["bad_evals"] >= cfg.train.patience):
                    begin_stage2("encoder_first_steps" if stage1_steps else
                                 "encoder_first_minutes" if stage1_minutes else "early_stopping")
                    if not (out_of_time or out_of_steps):
                        continue
                if state["bad_evals"] >= cfg.train.patience or out_of_time or out_of_steps:
                    state["done"] = True
                    state["stopped_by"] = "max_steps" if out_of_steps else "max_minutes" if out_of_time \
                        else "early_stopping"
                    if state["stopped_by"] == "max_minutes":
                        accelerator.print(f"train.max_minutes={cfg.train.max_minutes} reached after "
                                          f"{state['step']} steps: training stops")
                    if main:
                        checkpoint.atomic_save(training_state(), out / LAST, state)
                    break
        bar.close()
    state["stopped_by"] = state["stopped_by"] or "epochs"
    accelerator.wait_for_everyone()
    raw_model.llm_active = True   # the saved model always runs its language model (a zero correction if unused)
    if not main:
        return {}
    log.close()
    return finish(raw_model, prep, cfg, out, state)


def finish(model: STLLM, prep: PreparedCity, cfg: Config, out: Path, state: dict) -> dict:
    """Load the best weights, save the run (with the meta `build_model` attached), evaluate on the test split with
    the baselines, write metrics.json."""
    if (out / BEST).exists():
        model.load_trainable_state_dict(checkpoint.load(out / BEST)[0], str(out / BEST))
    model.eval()
    model.save_pretrained(out)
    metrics = evaluate_with_baselines(model, prep, "test", batch_size=cfg.train.batch_size)
    stage1 = state.get("stage1")
    if stage1 is not None and "encoder" in cfg.train.stage2_freeze and "skip" in cfg.train.stage2_freeze:
        # Stage 2 held the encoder and its read-out still, so without the language model this is the encoder
        # stage's forecast: what the language model added on test is the difference.
        model.llm_active = False
        try:
            test = evaluate(model, prep, prep.splits["test"], batch_size=cfg.train.batch_size)
        finally:
            model.llm_active = True
        stage1["test"] = {k: test[k] for k in ("mae", "rmse", "mape", "macro_f1", "recall") if k in test}
    metrics["training"] = {"steps": state["step"], "epochs": state["epoch"], "windows": state["windows"],
                           "wall_s": round(state["elapsed_s"], 2),  # training incl. validation passes
                           "windows_per_s": round(state["windows"] / max(state["step_s"], 1e-9), 2),  # steps only
                           "best_val_error": state["best_val"], "peak_rss_mb": peak_rss_mb(),
                           "encoder_stage": state.get("stage1"), "stopped_by": state.get("stopped_by")}
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def set_lr(optimizer: torch.optim.Optimizer, cfg: Config, scale: float) -> None:
    """The configured learning rates times `scale` (the groups of `make_optimizer`: the rest, then LoRA)."""
    for group, lr in zip(optimizer.param_groups, (cfg.train.lr, cfg.train.lora_lr)):
        group["lr"] = lr * scale


def _start_stage2(state: dict, accelerator: Accelerator, why: str) -> None:
    """End the encoder-only first stage (`why`: encoder_first_steps | encoder_first_minutes | early_stopping):
    record where it got to and switch the language model on."""
    state["stage1"] = {"steps": state["step"], "windows": state["windows"], "best_val_error": state["best_val"],
                       "elapsed_s": round(state["elapsed_s"], 2), "stopped_by": why}
    state["stage"], state["bad_evals"], state["lr_scale"] = 2, 0, 1.0   # stage 2's parts start at full rates
    reached = f" (train.{why} reached)" if why.startswith("encoder_first") else " (early stopping)"
    accelerator.print(f"stage 1 (encoder only) done at step {state['step']}{reached}, best validation error "
                      f"{state['best_val']:.4f}; switching the language model on")


def stop_reason(state: dict, cfg: Config) -> str | None:
    """The budget of cfg.train that a run's state has used up (as metrics.json's training.stopped_by), or None."""
    t = cfg.train
    if t.max_steps and state["step"] >= t.max_steps:
        return "max_steps"
    if t.max_minutes and state["elapsed_s"] > 60 * t.max_minutes:
        return "max_minutes"
    if state["stage"] == 2 and state["bad_evals"] >= t.patience:   # in stage 1 patience ends the stage, not the run
        return "early_stopping"
    if state["epoch"] >= t.epochs:
        return "epochs"
    return None


def check_resume(cfg: Config, out: Path) -> list[str]:
    """Check, reading only, that `cfg` may resume the run in `out`: the folder holds a run and its config.yaml
    equals `cfg` except for RESUME_MAY_CHANGE. Raises naming each other key that differs, with both values;
    returns the allowed changes ("train.max_steps: 6 -> 12")."""
    saved = out / "config.yaml"
    if not saved.is_file():
        what = "does not exist" if not out.exists() else "holds no run (no config.yaml)"
        raise FileNotFoundError(f"--resume: {out} {what}; drop --resume to start a new run there")
    if not (out / LAST).exists() and (out / WEIGHTS).exists():
        raise FileNotFoundError(f"--resume: {out} holds a finished run without its {LAST}, so it cannot continue; "
                                f"train into another --out")
    run, given = _flat(checkpoint.load_run_config(out)), _flat(cfg)
    differ = [k for k in given if run.get(k) != given[k]]
    refused = [f"{k}: {_show(run.get(k))} in the run, {_show(given[k])} given" for k in differ
               if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ConfigError(f"--resume: the config differs from the run's ({saved}) in {'; '.join(refused)}. A resumed "
                          f"run may change only {', '.join(RESUME_MAY_CHANGE)}; train into another --out to change "
                          f"the rest")
    return [f"{k}: {_show(run.get(k))} -> {_show(given[k])}" for k in differ]


def _flat(cfg: Config) -> dict:
    """{"section.key": value} as config.yaml holds it (through YAML, so both sides compare alike)."""
    raw = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {f"{section}.{key}": value for section, values in raw.items() for key, value in values.items()}


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (str, dict, list)) or value is None else str(value)


def _trim_log(path: Path, step: int) -> None:
    """Drop log.jsonl's records after `step` (and a half-written last line): a resumed run writes them again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.endswith("\n") and _log_step(line) <= step]
    if keep != lines:
        checkpoint.atomic_write_text(path, "".join(keep))


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (clocks differ; processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


def _spread(starts: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` evenly spaced windows (all when limit is 0)."""
    if not limit or len(starts) <= limit:
        return starts
    return starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]

