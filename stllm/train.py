"""Fine-tuning: a run trained on one city, or on several mixed in one loop (data.sources), then evaluated on the test
split. The steps (accumulation, mixed precision, clipping, the weight average, validation, checkpoints and resume)
are `stllm.loop.Loop`'s; this module says what it steps through: the data, the model, its loss and validation,
and the two stages of two-stage training."""
from __future__ import annotations

import dataclasses
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import yaml
from accelerate.utils import set_seed

from stllm import checkpoint
from stllm.config import Config, ConfigError
from stllm.data.city import CityData, DataError
from stllm.data.fit import RunMeta, fit_exog, load_city
from stllm.data.prepared import PreparedCity, batch_to
from stllm.infer import evaluate, evaluate_with_baselines, selection_error
from stllm.loop import (BEST, LAST, Batches, LossFn, Loop, TrainState, Validate, WeightAverage, freeze,
                        make_accelerator)
from stllm.nn.classification import event_loss
from stllm.model import STLLM, WEIGHTS, run_weights

# What `resume` may change in a run's config: the budgets that decide how long training goes on (train.patience is
# early stopping's), and settings of this machine (threads, the converted-backbone cache) that change neither
# what the run trains, on which data, nor the shapes it builds.
RESUME_MAY_CHANGE = ("train.epochs", "train.max_steps", "train.max_minutes", "train.patience", "train.num_threads",
                     "backbone.cache_dir", "train.test_sources", "explain.steps", "explain.minutes",
                     "explain.copy_numbers", "explain.draft")


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mae") -> torch.Tensor:
    """Mean over observed (mask = 1) entries; pred/target/mask [b, t_out, N, C] on the scaled axis."""
    err = pred - target
    per = err.abs() if kind == "mae" else torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def build_model(cfg: Config, prep: PreparedCity, sources: list[str] = (), intervals: list = ()) -> STLLM:
    """The model `cfg` describes, sized by the prepared (main) city and carrying its `RunMeta` (what
    `save_pretrained` writes beside the weights, so the run can be used without its data); `sources`: the names of
    the other datasets it trains on (data.sources), `intervals` their steps."""
    backbone = tokenizer = None
    if cfg.model.use_llm:
        from stllm.backbone import build_backbone
        backbone, tokenizer = build_backbone(cfg.backbone)
    model = STLLM(cfg, prep.city.n_channels, prep.n_exog, backbone, tokenizer)
    model.meta = RunMeta.from_prepared(prep)
    model.meta.sources = list(sources)
    model.meta.source_intervals = [pd.Timedelta(i) for i in intervals]
    return model


def make_optimizer(model: STLLM, cfg: Config) -> torch.optim.AdamW:
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if lora:
        groups.append({"params": lora, "lr": cfg.train.lora_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, city: CityData | None = None,
          progress: bool = True, on_step=None) -> dict:
    """Train a run into out_dir and evaluate it on the test split. Returns metrics.json's content.

    Data: the data section's dataset (or `city`, given in code), plus each dataset of data.sources. A source is a
    mapping of the data keys that differ from the data section (name, options, channels, resample, max_nodes,
    notes, split, split_at); it is loaded as the data section with those keys replaced (the others, such as t_in,
    t_out, periods, scaler and train_days, hold for every city), and prepared with its own scaler, fitted on its
    own training part. Every source needs the main dataset's number of channels (else a
    ConfigError naming the source); its exogenous features are matched to the main dataset's by name (missing ones
    are zeros). Each batch holds windows of one city; an epoch uses every city's training windows once, its
    batches interleaved in an order fixed by train.seed. Validation takes train.val_windows windows of each city;
    with several cities early stopping minimises the mean over cities of each one's validation error divided by
    its scaler's std (averaged over channels), so a city of large counts does not outweigh the others, and
    log.jsonl records each city's own error (val_errors). metrics.json reports the main dataset as a one-city run
    does, plus "sources": each source's test metrics with the baselines; meta.json is the main dataset's, with the
    sources' names.

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
    changed = check_run_folder(cfg, out, resume)
    two_stage = uses_two_stages(cfg)
    accelerator = make_accelerator(cfg.train)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)

    cities = load_cities(cfg, city)
    names = city_names(cities)
    train_starts = [training_windows(prep, cfg) for prep in cities]
    val_starts = [_spread(prep.splits["val"], cfg.train.val_windows) for prep in cities]

    model = build_model(cfg, cities[0], sources=names[1:], intervals=[c.city.interval for c in cities[1:]])
    if cfg.train.init_from:
        load_init_weights(model, cfg.train.init_from, accelerator.print)
    freeze(model, cfg.train.freeze)
    set_seed(cfg.train.seed)   # the same random stream (dropout) from step 0 whatever building the model drew
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        accelerator.print(f"training on {accelerator.num_processes} processes ({accelerator.distributed_type}), "
                          f"{cfg.train.batch_size // accelerator.num_processes}+ windows per process per step")
    loop = Loop(accelerator, model, optimizer, cfg.train,
                batches=epoch_batches(train_starts, cfg.train.batch_size, cfg.train.seed),
                loss=window_loss(model, cities, cfg, accelerator),
                validate=validation(raw_model, cities, names, val_starts, cfg),
                out=out, on_step=on_step, progress=progress)

    resumed = resume and (out / LAST).exists()
    if resumed:
        state = restore_run(loop, cfg, out, two_stage)
    else:
        if resume:
            accelerator.print(f"{out} stopped before its first checkpoint: training it from the start")
        state = TrainState(stage=1 if two_stage else 2)
        loop.ema = WeightAverage(raw_model, cfg.train.ema) if cfg.train.ema else None
    loop.start(state)
    if resumed:
        finished = (out / "metrics.json").is_file()
        if finished and stop_reason(state, cfg):
            accelerator.print(f"{out} is finished (stopped by {stop_reason(state, cfg)}) and the given budget leaves "
                              f"no room to continue: nothing to do (raise one of {', '.join(RESUME_MAY_CHANGE[:4])})")
            return json.loads((out / "metrics.json").read_text()) if accelerator.is_main_process else {}
        state.stopped_by = stop_reason(state, cfg)
        state.done = state.stopped_by is not None
        if finished:
            accelerator.print(f"continuing the finished run {out} from step {state.step}")
    if changed:
        accelerator.print(f"resuming with a new budget: {', '.join(changed)}")
    if accelerator.is_main_process:
        open_run_folder(cfg, out, loop, state.step if resumed else -1, write_config=not resume or bool(changed))

    if cfg.train.init_from and not resumed and any(len(s) for s in val_starts):
        # a run that starts from trained weights (few-shot, warm start) is validated before its first step, so
        # early stopping keeps those weights when training on the new data only makes them worse
        loop.evaluate(state)
    # stage 1 (two-stage training only): the language model is bypassed; stage 2: the language-model side
    # (train.stage2_freeze holds the encoder and its read-out still).
    if state.stage == 1:
        raw_model.llm_active = False
        why = stage_one_ended(state, cfg) or loop.run(state, cfg.train.eval_every, stage_end=stage_one_end(cfg, loop))
        if why:
            begin_stage_two(loop, state, cfg, out, why)
    raw_model.llm_active = True   # the saved model always runs its language model (a zero correction if unused)
    if not state.done:
        loop.run(state, (cfg.train.stage2_eval_every if two_stage else 0) or cfg.train.eval_every)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    loop.close()
    # the test figures are the saved model's as `stllm evaluate` computes them: without mixed precision's autocast
    return finish(accelerator.unwrap_model(model, keep_fp32_wrapper=False), cities, names, cfg, out, state)


def check_run_folder(cfg: Config, out: Path, resume: bool) -> list[str]:
    """Refuse, reading only, a new run into a folder that holds one, and a resume the run's config does not allow
    (`check_resume`); returns the budget changes a resume makes."""
    if not resume and ((out / LAST).exists() or (out / WEIGHTS).exists()):
        raise FileExistsError(f"{out} holds a run; pass --resume to continue it or choose another --out")
    return check_resume(cfg, out) if resume else []


def uses_two_stages(cfg: Config) -> bool:
    """Whether the run trains the encoder alone first (train.encoder_first_minutes or _steps)."""
    two_stage = cfg.model.use_llm and (cfg.train.encoder_first_minutes > 0 or cfg.train.encoder_first_steps > 0)
    if two_stage and not cfg.model.encoder_skip:
        raise ValueError("train.encoder_first_minutes and train.encoder_first_steps need model.encoder_skip=true: "
                         "the first stage trains the encoder through its own read-out")
    return two_stage


# ---- the data: the main city and data.sources ------------------------------------------------------------------
def load_cities(cfg: Config, city: CityData | None = None) -> list[PreparedCity]:
    """The main dataset (`city`, else the data section's) and then each of data.sources, each prepared with its own
    scaler (fitted on its own training part); a source of another dataset does not inherit the data section's
    options, channels, notes, split_at, resample or max_nodes; the sources' exogenous features follow the main dataset's names
    (zeros where a source lacks one). A source whose channel count differs from the main dataset's raises a
    ConfigError naming it; so does one whose data cannot be loaded or prepared."""
    main = PreparedCity(city if city is not None else load_city(cfg.data), cfg.data, cfg.encoder)
    cities = [main]
    for i, keys in enumerate(cfg.data.sources):
        where = f"data.sources[{i}] ({keys['name']})"
        try:
            # Keys that describe one dataset (its loader options, channels, notes, split) carry over from the data
            # section only to a source of the same dataset; another dataset starts from its own defaults.
            own = {} if keys["name"] == cfg.data.name else \
                {"options": {}, "channels": [], "notes": "", "split_at": [], "resample": "", "max_nodes": 0}
            data_cfg = dataclasses.replace(cfg.data, **{**own, **keys}, sources=[])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        try:
            source = load_city(data_cfg)
            if source.n_channels != main.city.n_channels:
                raise ConfigError(
                    f"{where}: {source.n_channels} channel(s) {list(source.channels)}, the main dataset "
                    f"{main.city.name} has {main.city.n_channels} {list(main.city.channels)}; every source needs the "
                    f"same number of channels: choose them with the source's channels key")
            prep = PreparedCity(source, data_cfg, cfg.encoder)
        except (DataError, FileNotFoundError) as err:
            raise DataError(f"{where}: {err}") from err
        cities.append(fit_exog(prep, main.exog_names))
    return cities


def city_names(cities: list[PreparedCity]) -> list[str]:
    """Each city's name (in metrics.json's and meta.json's sources, log.jsonl's val_errors). A dataset that is
    there twice is told apart by its channels ("nyc-bike:arrivals"), else by its place in data.sources."""
    names: list[str] = []
    channels: dict[str, set[str]] = {}      # the channels each dataset name was seen with
    for i, prep in enumerate(cities):
        name, chans = prep.city.name, "+".join(prep.city.channels)
        if name in channels:
            name = f"{name}:{chans}" if chans not in channels[name] else name
        if name in names:
            name = f"{prep.city.name} (data.sources[{i - 1}])"
        channels.setdefault(prep.city.name, set()).add(chans)
        names.append(name)
    return names


def training_windows(prep: PreparedCity, cfg: Config) -> np.ndarray:
    """The city's training window starts: every train.train_stride-th, and with data.train_days (few-shot) only
    those whose targets lie in its first train_days days."""
    starts = prep.splits["train"][:: cfg.train.train_stride]
    if cfg.data.train_days:
        starts = starts[starts + prep.t_out <= cfg.data.train_days * prep.city.steps_per_day]
    if len(starts) == 0:
        raise ValueError(f"{prep.city.name}: no training windows (T={prep.city.n_steps}, split {cfg.data.split})")
    return starts


@dataclass
class Windows:
    """One batch: window starts in one city (`city`: its position in the run's cities)."""

    city: int
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def epoch_batches(train_starts: list[np.ndarray], batch_size: int, seed: int) -> Batches:
    """The batches of each epoch: each city's windows in the order of a permutation drawn from seed + epoch, cut
    into batches of batch_size; with several cities, their batches then interleaved by a permutation of the same
    generator. Every window is used once per epoch, and the order depends on the seed and epoch alone (a resumed
    run rebuilds it)."""
    def batches(epoch: int) -> list[Windows]:
        rng = np.random.default_rng(seed + epoch)
        out = []
        for c, starts in enumerate(train_starts):
            order = rng.permutation(starts)
            out += [Windows(c, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        if len(train_starts) > 1:
            out = [out[j] for j in rng.permutation(len(out))]
        return out
    return batches


def window_loss(model: torch.nn.Module, cities: list[PreparedCity], cfg: Config, accelerator) -> LossFn:
    """The training loss of a batch of windows: masked MAE (or Huber) on the scaled axis, or the event loss. Under
    several processes each takes its share of the batch; every process needs at least one window to step
    together."""
    events = cfg.model.task == "events"
    rank, world = accelerator.process_index, accelerator.num_processes

    def loss(batch: Windows) -> tuple[torch.Tensor, dict]:
        starts = batch.starts
        if world > 1:
            starts = np.resize(starts, max(len(starts), world))[rank::world]
        data = batch_to(cities[batch.city].batch(starts, cfg.train.mask_zeros and not events), accelerator.device)
        pred = model(data)
        if events:
            return event_loss(pred, data["y_raw"]), {}
        return masked_loss(pred, data["y"], data["y_mask"], cfg.train.loss), {}
    return loss


def validation(model: STLLM, cities: list[PreparedCity], names: list[str], val_starts: list[np.ndarray],
               cfg: Config) -> Validate:
    """The selection error early stopping minimises: on one city its validation error (`selection_error`); on
    several the mean over cities of each one's error divided by `error_scale` (also logged per city as
    val_errors). Without validation windows it is the training loss since the last validation."""
    def validate(train_loss: float | None) -> tuple[float, dict]:
        errors = {name: selection_error(evaluate(model, prep, starts, batch_size=cfg.train.batch_size))
                  for name, prep, starts in zip(names, cities, val_starts) if len(starts)}
        if not errors:
            return (train_loss if train_loss is not None else 0.0), {}
        if len(cities) == 1:
            return errors[names[0]], {}
        scale = {name: error_scale(prep, cfg) for name, prep in zip(names, cities)}
        return float(np.mean([errors[name] / scale[name] for name in errors])), {"val_errors": errors}
    return validate


def error_scale(prep: PreparedCity, cfg: Config) -> float:
    """What a city's validation error is divided by when several cities are averaged: its scaler's std averaged
    over channels (and nodes, for a per-node scaler); 1 for event classification, whose error has no scale."""
    return 1.0 if cfg.model.task == "events" else float(np.mean(prep.scaler.std))


# ---- the model -------------------------------------------------------------------------------------------------
def load_init_weights(model: STLLM, run: str, say: Callable[[str], None] = print) -> None:
    """train.init_from: the parts of `run`'s weights this model has (LoRA from its adapter/, the rest from its
    model.safetensors); an encoder-only run's linear head becomes the skip read-out."""
    source = Path(run) / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"train.init_from={run}: no model.safetensors there")
    weights = run_weights(run, model)
    if model.backbone is not None and model.skip is not None and "head.lin.weight" in weights:
        # an encoder-only run: its linear head becomes the skip read-out, so training starts from its forecast
        weights = {"skip." + k[5:] if k.startswith("head.lin.") else k: v for k, v in weights.items()}
    loaded = model.load_trainable_state_dict(weights, str(source), partial=True)
    say(f"initialised {len(loaded)} tensors from {source}")


# ---- the run folder and the stages -----------------------------------------------------------------------------
def open_run_folder(cfg: Config, out: Path, loop: Loop, log_step: int, write_config: bool) -> None:
    """Create the run folder (main process), tidy what a crash left, write config.yaml (a new run, a changed budget,
    or a folder without one) and open log.jsonl after its records up to `log_step`."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.recover(out)   # half-written files of a crash
    if write_config or not (out / "config.yaml").is_file():
        with checkpoint.replacing(out / "config.yaml") as tmp:
            cfg.save(tmp)
    loop.open_log(log_step)


def restore_run(loop: Loop, cfg: Config, out: Path, two_stage: bool) -> TrainState:
    """Resume from LAST: its state, weights, optimizer moments, RNG and weight average, with stage 2's parts held
    still again when it stopped in stage 2."""
    state, tensors = loop.restore(out / LAST)
    loop.accelerator.print(f"resumed {out} at step {state.step} (epoch {state.epoch})")
    if two_stage and state.stage == 2:
        freeze(loop.raw, cfg.train.stage2_freeze, key="train.stage2_freeze")
    if cfg.train.ema:   # built once it is known what trains
        loop.ema = WeightAverage(loop.raw, cfg.train.ema)
        loop.ema.load(tensors, str(out / LAST))
    return state


def stage_one_end(cfg: Config, loop: Loop) -> Callable[[TrainState], str | None]:
    """When the encoder-only stage is over: train.encoder_first_steps steps, or train.encoder_first_minutes."""
    t = cfg.train

    def over(state: TrainState) -> str | None:
        if t.encoder_first_steps and state.step >= t.encoder_first_steps:
            return "encoder_first_steps"
        if t.encoder_first_minutes and loop.past(t.encoder_first_minutes):
            return "encoder_first_minutes"
        return None
    return over


def stage_one_ended(state: TrainState, cfg: Config) -> str | None:
    """Why stage 1 is already over when a resumed run starts (it stopped between the validation that ended the stage
    and the switch), or None."""
    if state.bad_evals >= cfg.train.patience:
        return "early_stopping"
    if cfg.train.encoder_first_steps and state.step >= cfg.train.encoder_first_steps:
        return "encoder_first_steps"
    return None


def begin_stage_two(loop: Loop, state: TrainState, cfg: Config, out: Path, why: str) -> None:
    """End the encoder-only first stage (`why`: encoder_first_steps | encoder_first_minutes | early_stopping),
    record where it got to and switch the language model on; it corrects the best encoder, not the last one."""
    state.stage1 = {"steps": state.step, "windows": state.windows, "best_val_error": state.best_val,
                    "elapsed_s": round(state.elapsed_s, 2), "stopped_by": why}
    state.stage, state.bad_evals, state.lr_scale = 2, 0, 1.0   # stage 2's parts start at full rates
    reached = f" (train.{why} reached)" if why.startswith("encoder_first") else " (early stopping)"
    loop.accelerator.print(f"stage 1 (encoder only) done at step {state.step}{reached}, best validation error "
                           f"{state.best_val:.4f}; switching the language model on")
    loop.accelerator.wait_for_everyone()
    if (out / BEST).exists():
        loop.raw.load_trainable_state_dict(checkpoint.load(out / BEST)[0], str(out / BEST))
    freeze(loop.raw, cfg.train.stage2_freeze, key="train.stage2_freeze")
    if loop.ema is not None:
        loop.ema.reset(loop.raw)     # stage 2 averages its own parts, from the best stage-1 weights
    loop.set_lr(state.lr_scale)
    loop.save(state)


def finish(model: STLLM, cities: list[PreparedCity], names: list[str], cfg: Config, out: Path,
           state: TrainState) -> dict:
    """Load the best weights, save the run (with the meta `build_model` attached), evaluate on the test split of
    the main city with the baselines (and of each source, under "sources"), write metrics.json."""
    prep = cities[0]
    if (out / BEST).exists():
        model.load_trainable_state_dict(checkpoint.load(out / BEST)[0], str(out / BEST))
    model.eval()
    model.save_pretrained(out)
    metrics = evaluate_with_baselines(model, prep, "test", batch_size=cfg.train.batch_size)
    stage1 = state.stage1
    if stage1 is not None and "encoder" in cfg.train.stage2_freeze and "skip" in cfg.train.stage2_freeze:
        # Stage 2 held the encoder and its read-out still, so without the language model this is the encoder
        # stage's forecast: what the language model added on test is the difference.
        model.llm_active = False
        try:
            test = evaluate(model, prep, prep.splits["test"], batch_size=cfg.train.batch_size)
        finally:
            model.llm_active = True
        stage1["test"] = {k: test[k] for k in ("mae", "rmse", "mape", "macro_f1", "recall") if k in test}
    metrics["training"] = {"steps": state.step, "epochs": state.epoch, "windows": state.windows,
                           "wall_s": round(state.elapsed_s, 2),  # training incl. validation passes
                           "windows_per_s": round(state.windows / max(state.step_s, 1e-9), 2),  # steps only
                           "best_val_error": state.best_val, "peak_rss_mb": peak_rss_mb(),
                           "encoder_stage": stage1, "stopped_by": state.stopped_by}
    if len(cities) > 1 and cfg.train.test_sources:   # a source without test windows (e.g. all of it given to training) has no metrics
        metrics["sources"] = {name: evaluate_with_baselines(model, source, "test", batch_size=cfg.train.batch_size)
                              if len(source.splits["test"]) else None for name, source in zip(names[1:], cities[1:])}
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def stop_reason(state: TrainState, cfg: Config) -> str | None:
    """The budget of cfg.train that a run's state has used up (as metrics.json's training.stopped_by), or None."""
    t = cfg.train
    if t.max_steps and state.step >= t.max_steps:
        return "max_steps"
    if t.max_minutes and state.elapsed_s > 60 * t.max_minutes:
        return "max_minutes"
    if state.stage == 2 and state.bad_evals >= t.patience:   # in stage 1 patience ends the stage, not the run
        return "early_stopping"
    if state.epoch >= t.epochs:
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _spread(starts: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` evenly spaced windows (all when limit is 0)."""
    if not limit or len(starts) <= limit:
        return starts
    return starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]

