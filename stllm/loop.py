"""The one training loop. Fine-tuning (`stllm.train`), its language-model stage, few-shot runs, the explaining student
(`stllm.distill.student`) and test-time adaptation (`stllm.adapt`) all step through `Loop.run`: accelerate's gradient
accumulation and mixed precision, clipping, the weight average, validation, atomic checkpoints with exact resume,
the budget (steps, minutes, epochs, early stopping) and a progress bar. What differs between them is what they
hand it: the model and optimizer, their batches, a loss function, and (fine-tuning only) a validation.

Batching is not torch.utils.data.DataLoader's: a batch is `PreparedCity.batch(starts)`, one indexing of tensors that
are already in memory, so neither per-sample `__getitem__` calls nor worker processes would gain anything; a batch
holds the windows of one city (cities differ in node count); a resumed run must continue with exactly the batch it
stopped before, in the order a seed fixed (skipping into a DataLoader's epoch re-draws it); and under
`accelerate launch` every process takes its share of each global batch (train.batch_size is the global batch), not
whole batches of its own as a prepared DataLoader would. A batch source here is a function from the epoch number to
that epoch's micro-batches, in order; the loop groups them by train.grad_accum into optimizer steps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from stllm import checkpoint
from stllm.config import ConfigError, TrainConfig

LAST, BEST = "checkpoints/last.safetensors", "checkpoints/best.safetensors"
LOG = "log.jsonl"

Batches = Callable[[int], Sequence[Any]]                           # epoch -> its micro-batches, in order
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]   # micro-batch -> (loss, named parts to log)
Validate = Callable[[float | None], tuple[float, dict]]           # train loss -> (selection error, log fields)


@dataclass
class TrainState:
    """Where a run is: the loop's counters, as LAST's metadata holds them (`to_dict`, `from_dict`)."""

    step: int = 0                    # optimizer steps taken
    epoch: int = 0                   # epochs completed
    epoch_step: int = 0              # optimizer steps taken in the current epoch
    best_val: float = math.inf       # lowest selection error so far
    bad_evals: int = 0               # validations in a row without improvement
    elapsed_s: float = 0.0           # wall time of training, validations included
    step_s: float = 0.0              # time in optimizer steps alone
    windows: int = 0                 # training windows (samples) read
    stage: int = 2                   # 1: two-stage training's encoder-only stage; 2: the language model on
    stage1: dict | None = None       # where stage 1 ended: steps, windows, best_val_error, elapsed_s, stopped_by
    lr_scale: float = 1.0            # factor on the learning rates after decays
    stopped_by: str | None = None    # max_steps | max_minutes | early_stopping | epochs
    done: bool = False               # no more steps to take

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        """The state a checkpoint's metadata holds; keys an older checkpoint lacks (the student's held only step and
        elapsed_s) take their defaults, and keys that are not counters (e.g. grad_scaler) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def make_accelerator(train: TrainConfig | None = None, **kwargs) -> Accelerator:
    """An Accelerator with train.grad_accum and train.mixed_precision (none and "no" without a config), on the GPU
    when there is one; kwargs go to Accelerator (e.g. device_placement=False). fp16 needs a CUDA GPU: accelerate
    would run it on a CPU as plain fp32 without a word, so it is refused here."""
    accum, precision = (train.grad_accum, train.mixed_precision) if train is not None else (1, "no")
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU and this machine has none; use bf16 (which "
                          "CPUs run) or no")
    options = dict(cpu=not cuda, gradient_accumulation_steps=accum, mixed_precision=precision,
                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], **kwargs)
    try:   # (the data-driven graph idles when a city has wind, so DDP must allow unused parameters)
        return Accelerator(**options)
    except ValueError as err:
        # accelerate keeps the precision in a process-wide singleton; one process that trains runs one after
        # another (tests, notebooks, the student after its forecaster) may change it between them
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**options)


def freeze(model: torch.nn.Module, hold: Sequence[str] = (), train: Callable[[str], bool] | None = None,
           key: str = "train.freeze") -> None:
    """Choose which parameters train. train: a predicate on parameter names; each parameter trains exactly when it
    holds (the rest is held still). hold: name prefixes (e.g. "encoder", "skip") of parts held still, the rest as
    it is; a prefix that names no part outside the backbone raises ValueError naming `key` and the parts."""
    params = dict(model.named_parameters())
    if train is not None:
        for name, p in params.items():
            p.requires_grad_(bool(train(name)))
    for prefix in hold:
        hit = [p for n, p in params.items() if n == prefix or n.startswith(prefix + ".")]
        if not hit or prefix.startswith("backbone"):
            parts = sorted({n.split(".")[0] for n in params} - {"backbone"})
            raise ValueError(f"{key}: {prefix!r} names no trainable part of this model; parts: {parts}")
        for p in hit:
            p.requires_grad_(False)


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
        self.avg = {n: v.to(self.avg[n].device, self.avg[n].dtype) for n, v in avg.items()}   # the model's device
        self.n = int(tensors["ema_n"])


class Loop:
    """Steps a model through its batches under a budget, validating and checkpointing as it goes.

    model, optimizer: as `accelerator.prepare` returned them (the loop steps `model`; validation and checkpoints
    use the unwrapped model). train: the TrainConfig whose grad_clip, epochs, max_steps, max_minutes, patience,
    lr_decay and lr_decay_after apply (the student and adaptation pass their own). batches(epoch): the epoch's
    micro-batches (anything with a len(): its windows or samples); loss(micro-batch) -> (loss, parts), the loss
    on the scaled axis and named floats that the log averages. validate(train loss) -> (selection error, more log
    fields): early stopping minimises it and BEST keeps its best weights (None: no validation). out: the run
    folder for LAST, BEST and log.jsonl (None: nothing is written). dropout=False keeps the model in eval mode
    while it trains (test-time adaptation)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train: TrainConfig, batches: Batches, loss: LossFn, validate: Validate | None = None,
                 ema: WeightAverage | None = None, out: str | Path | None = None,
                 on_step: Callable[[int], None] | None = None, progress: bool = False, dropout: bool = True):
        self.accelerator, self.model, self.optimizer, self.train = accelerator, model, optimizer, train
        self.batches, self.loss, self.validate, self.ema = batches, loss, validate, ema
        self.out = None if out is None else Path(out)
        self.on_step, self.progress, self.dropout = on_step, progress, dropout
        self.raw = accelerator.unwrap_model(model)
        self.main = accelerator.is_main_process
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]   # lr_scale multiplies these
        self.t_start = time.time()
        self.log = None                  # log.jsonl, once `open_log` opened it
        self.loss_sum, self.loss_n, self.parts = 0.0, 0, {}   # since the last validation
        self.last_parts: dict[str, float] = {}                # the last step's

    # ---- the loop ----------------------------------------------------------------------------------------------
    def start(self, state: TrainState) -> None:
        """Set the clock and the learning rates to where `state` is (a resumed run goes on from its checkpoint)."""
        self.t_start = time.time() - state.elapsed_s
        self.set_lr(state.lr_scale)

    def run(self, state: TrainState, every: int = 0, stage_end: Callable[[TrainState], str | None] | None = None
            ) -> str | None:
        """Step until the budget is spent (then state.done and state.stopped_by are set) or, with `stage_end`, until
        the stage is over; validate every `every` optimizer steps (0: at each epoch's end) and whenever it stops.

        stage_end(state) -> why the stage is over after the step just taken, or None; in a stage with an end, early
        stopping ends the stage (why = "early_stopping"), not the run. Returns why the stage ended, else None."""
        t = self.train
        while not state.done and state.epoch < t.epochs:
            groups = self.groups(state.epoch)
            bar = tqdm(range(state.epoch_step, len(groups)), disable=not (self.progress and self.main), leave=False,
                       desc=f"epoch {state.epoch + 1}/{t.epochs}")
            if self.dropout:
                self.model.train()
            for i in bar:
                loss = self.step(groups[i], state)
                state.epoch_step = i + 1
                bar.set_postfix(loss=f"{loss:.4f}", best_val_error=f"{state.best_val:.3f}")
                if self.on_step is not None:
                    self.on_step(state.step)
                out_of_time = self.past(t.max_minutes)
                out_of_steps = bool(t.max_steps) and state.step >= t.max_steps
                ended = stage_end(state) if stage_end is not None else None
                epoch_end = i + 1 == len(groups)
                if not ((every and state.step % every == 0) or out_of_time or out_of_steps or ended or epoch_end):
                    continue
                if epoch_end:
                    state.epoch, state.epoch_step = state.epoch + 1, 0
                self.evaluate(state)
                patience_spent = state.bad_evals >= t.patience
                if stage_end is not None:
                    ended = ended or ("early_stopping" if patience_spent else None)
                if out_of_time or out_of_steps or (patience_spent and stage_end is None):
                    self.stop(state, "max_steps" if out_of_steps else "max_minutes" if out_of_time
                              else "early_stopping")
                if ended or state.done:
                    bar.close()
                    return ended
            bar.close()
        state.stopped_by = state.stopped_by or "epochs"
        state.done = True
        return None

    def groups(self, epoch: int) -> list[list]:
        """The epoch's optimizer steps: its micro-batches in groups of train.grad_accum (the last may be shorter)."""
        batches, k = list(self.batches(epoch)), self.train.grad_accum
        if not batches:
            raise ValueError(f"epoch {epoch} has no batches to train on")
        return [batches[i:i + k] for i in range(0, len(batches), k)]

    def step(self, group: list, state: TrainState) -> float:
        """One optimizer step over the micro-batches of `group` (their mean loss); returns that loss."""
        t_step = time.time()
        accelerator = self.accelerator
        # one accumulation cycle per step: the gradient is the mean over the group's batches, also when the last
        # group of an epoch is short, and accelerate syncs processes at the group's last batch
        accelerator.gradient_accumulation_steps, accelerator.step = len(group), 0
        losses, parts = [], {}
        for batch in group:
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    loss, more = self.loss(batch)
                if not loss.requires_grad:
                    # Only parts that this batch does not reach are trainable (e.g. the note effect alone, and no
                    # note meets these windows): a zero gradient, so every process's step count stays in line.
                    loss = loss + sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                accelerator.backward(loss)
            losses.append(loss.item())
            for name, value in more.items():
                parts[name] = parts.get(name, 0.0) + value / len(group)
        if self.train.grad_clip:
            accelerator.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw)
        state.step += 1
        state.windows += sum(len(batch) for batch in group)
        state.step_s += time.time() - t_step
        loss = losses[0] if len(losses) == 1 else float(np.mean(losses))
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.last_parts = parts
        return loss

    def evaluate(self, state: TrainState) -> None:
        """Validate (the weight average swapped in), keep the best weights in BEST, count validations without
        improvement (decaying the learning rates after train.lr_decay_after of them), log and write LAST."""
        t = self.train
        if self.dropout:
            self.model.eval()
        train_loss = self.loss_sum / self.loss_n if self.loss_n else None
        val, fields = None, {}
        if self.validate is not None:
            with self.ema.swapped_in(self.raw) if self.ema is not None else nullcontext():
                val, fields = self.validate(train_loss)
                improved = val < state.best_val
                if improved and self.main and self.out is not None:
                    checkpoint.atomic_save(self.raw.trainable_state_dict(), self.out / BEST,
                                           {"step": state.step, "val_error": val})
        state.elapsed_s = time.time() - self.t_start
        if val is not None and improved:
            state.best_val, state.bad_evals = val, 0
        elif val is not None:
            state.bad_evals += 1
            if t.lr_decay and state.bad_evals % t.lr_decay_after == 0:
                state.lr_scale *= t.lr_decay
                self.set_lr(state.lr_scale)
        if self.main and self.out is not None:   # every process validated (same windows, weights): all stop alike
            record = {"step": state.step, "epoch": state.epoch, "train_loss": train_loss,
                      **{k: v / self.loss_n for k, v in self.parts.items()}}
            if val is not None:
                record |= {"val_error": val, "best_val_error": state.best_val}
            record |= {"elapsed_s": round(state.elapsed_s, 2),
                       "windows_per_s": round(state.windows / max(state.step_s, 1e-9), 2),
                       "lr_scale": state.lr_scale, **fields}
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            self.save(state)
        self.loss_sum, self.loss_n, self.parts = 0.0, 0, {}
        if self.dropout:
            self.model.train()

    def stop(self, state: TrainState, reason: str) -> None:
        state.done, state.stopped_by = True, reason
        if reason == "max_minutes":
            self.accelerator.print(f"train.max_minutes={self.train.max_minutes} reached after {state.step} steps: "
                                   f"training stops")
        self.save(state)

    # ---- what it keeps -----------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> None:
        """LAST: weights, optimizer moments, RNG, the weight average and the state (main process, with a folder)."""
        if not (self.main and self.out is not None):
            return
        tensors = checkpoint.training_state(self.raw, self.optimizer)
        if self.ema is not None:
            tensors |= self.ema.state()
        meta = state.to_dict()
        if self.accelerator.scaler is not None:   # fp16's loss scale
            meta["grad_scaler"] = self.accelerator.scaler.state_dict()
        checkpoint.atomic_save(tensors, self.out / LAST, meta)

    def restore(self, path: str | Path) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The state LAST at `path` holds, with the weights, optimizer moments and RNG put back; returns the file's
        tensors too (for the weight average, which a caller builds once it knows what trains)."""
        tensors, saved = checkpoint.load(path)
        checkpoint.restore_training_state(tensors, self.raw, self.optimizer)
        if self.accelerator.scaler is not None and "grad_scaler" in saved:
            self.accelerator.scaler.load_state_dict(saved["grad_scaler"])
        return TrainState.from_dict(saved), tensors

    def open_log(self, step: int) -> None:
        """Open log.jsonl to append, after dropping its records past `step` (-1: all; a resumed run writes them
        again) and a half-written last line."""
        path = self.out / LOG
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            keep = [line for line in lines if line.endswith("\n") and _log_step(line) <= step]
            if keep != lines:
                checkpoint.atomic_write_text(path, "".join(keep))
        self.log = path.open("a")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    # ---- clocks and rates --------------------------------------------------------------------------------------
    def set_lr(self, scale: float) -> None:
        """Each parameter group's starting learning rate times `scale`."""
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * scale

    def past(self, minutes: float) -> bool:
        """Whether training has run longer than `minutes` (never when 0), on every process when on any (clocks
        differ; processes must stop at the same step). Every process must call it at the same points."""
        return self.agree(bool(minutes) and time.time() - self.t_start > 60 * minutes)

    def agree(self, flag: bool) -> bool:
        """True on every process when it is true on any."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device),
                                            "max").item())


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
