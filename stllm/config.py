"""Dataclasses for every component, YAML in and out, dotted overrides (`--set train.lr=1e-4`).

What is checked; every failure is a ConfigError naming the source (the file, "defaults" or "--set"), the dotted
key, the value given and what is expected:
- the file is a mapping of known sections, each section a mapping (or empty) of known keys;
- every value has its field's annotated type (`check_value`): bool exactly YAML true/false; int an integer or an
  integer string; float a finite number or a number string such as '1e-4'; str, list and dict as written; list
  items as annotated (`list[int]`);
- per-field ranges and choices in LIMITS (e.g. train.batch_size >= 1, encoder.dropout in [0, 1), data.scaler
  channel|node); backbone.* ranges in BackboneConfig.__post_init__;
- cross-field rules in each section's `__post_init__` (e.g. explain.teacher openai:... needs teacher_url).
Dataset options (data.options) are checked against the loader by `stllm.data.registry.check_options`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names it."""


@dataclass
class DataConfig:
    name: str = "synthetic"                  # built-in dataset name or a path (see docs/data_formats.md)
    options: dict = field(default_factory=dict)  # passed to the loader, e.g. {channels: [PM2.5]}
    channels: list[str | int] = field(default_factory=list)  # channels to forecast (names or positions); empty = all
    t_in: int = 12                           # history steps
    t_out: int = 12                          # forecast horizon steps
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test fractions, chronological
    split_at: list[int] = field(default_factory=list)  # [train_end, test_start] step indices (a dataset's given split)
    periods: list[str] = field(default_factory=lambda: ["day", "week"])  # target-aligned period context windows
    scaler: str = "channel"                  # channel: z-score per channel over all nodes | node: per node and channel
    max_nodes: int = 0                       # keep only the first k nodes (0 = all); for quick runs
    train_days: float = 0                    # few-shot: train only on windows inside the first k days (0 = all)
    notes: str = ""                          # notes CSV (start,end,zones,kind,text): dated text about places
                                             # (docs/data_formats.md); "" = none
    notes_max_hours: float = 0.0             # the model reads only notes that last at most this long (0 = all):
                                             # a months-long order is a regime the history already shows, and the
                                             # size of its effect in one year need not hold in the next
    profile: bool = False                    # the encoder also sees each node's average at the target steps' hour
                                             # of the week over the training part (the historical-average forecast,
                                             # denoised over every training week) as one more period token
    profile_weeks: int = 0                   # 0: the profile is the training part's average (above) | K > 0: the
                                             # same step's mean over the K weeks before it (causal, from any part of
                                             # the data), which follows a city whose level drifts away from its
                                             # training part (NYC taxi in 2020)
    holiday_features: bool = False           # the encoder also sees, per step, whether its day, and the days one
                                             # day / one week earlier (data.periods), are public holidays
    resample: str = ""                       # aggregate the loaded data to a coarser step before anything else:
                                             # "<interval>:<sum|mean>", e.g. "1h:sum" (counts) or "1h:mean" (levels);
                                             # "" = off. Train at another city's interval to use the run there
    window_norm: bool = False                # per-window normalisation (RevIN): the model reads each window's history,
                                             # period windows and profile relative to that node and channel's mean
                                             # and spread over all of them, and its forecast is scaled back; scale
                                             # comes from the window itself (x10 the values -> x10 the forecast)
    sources: list[dict] = field(default_factory=list)  # more datasets to train on in the same loop, each a mapping
                                             # of the data keys that differ from this section (name, options,
                                             # channels, resample, max_nodes, notes, split, split_at); every source
                                             # needs the same number of channels. [] = this section's dataset only

    def __post_init__(self) -> None:
        check_fields(self)
        if self.profile_weeks and not self.profile:
            raise ConfigError(f"data.profile_weeks={self.profile_weeks} says how the profile is averaged; it needs "
                              f"data.profile=true")
        for i, source in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not isinstance(source, dict):
                raise ConfigError(f"{where} must be a mapping such as {{name: nyc-taxi, channels: [pickups]}}, got "
                                  f"{_show(source)}")
            unknown = sorted(set(source) - SOURCE_KEYS)
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a source takes "
                                  f"{', '.join(sorted(SOURCE_KEYS))}")
            if not isinstance(source.get("name"), str) or not source["name"].strip():
                raise ConfigError(f"{where} needs a name (a built-in dataset or a path), got {_show(source)}")


@dataclass
class EncoderConfig:
    d_enc: int = 64                          # width of ST-tokens
    patch_len: int = 12                      # steps per patch of the recent window (t_in / patch_len tokens)
    temporal_layers: int = 3                 # gated dilated conv layers (dilation 1, 2, 4, ...)
    kernel_sizes: list[int] = field(default_factory=lambda: [2, 3])  # kernel widths per temporal layer
    static_graph: bool = True                # Gaussian-kernel (or adjacency) graph convolution
    dynamic_graph: str = "auto"              # auto: wind where wind is known, else data | wind | data | none
    graph_sigma: float = 0.0                 # kernel width in km; 0 = std of distances
    graph_threshold: float = 0.1             # kernel weights below this are dropped
    wind_sigma0: float = 0.0                 # wind graph base width in km; 0 = graph sigma
    wind_alpha: float = 1.0                  # km of reach per m/s of wind
    dropout: float = 0.1                     # dropout in the encoder
    mix_hidden: int = 256                    # width of the MLP that mixes a node's tokens (recent patches, day,
                                             # week) after the graph convolution (0 = off: tokens meet only in the
                                             # head). NYC bike, encoder only, 11 min: test MAE 9.81 without, 9.33 with
    series_features: bool = False            # every token also gets a projection of what the series is: log of the
                                             # interval in hours and the channel's name, unit and the city's domain
                                             # as hashed words (stllm.data.prepared.series_features); for training
                                             # on many cities, where series of different kinds meet one encoder

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ModelConfig:
    task: str = "forecast"                   # forecast: regression of values | events: per-channel event classification
    use_llm: bool = True                     # false = encoder-only ablation: the same encoder with a linear head
    prompt: str = "city"                     # template name in prompts/ (prompts/<name>.txt)
    projector: str = "mlp"                   # linear | mlp
    tokens_per_node: int = 1                 # <ST_HIS> tokens per node in the prompt (the k encoder tokens are
                                             # projected into this many; fewer tokens = shorter sequences)
    nodes_per_sequence: int = 256            # cut big cities into groups of this many nodes per sequence (0 = all)
    cross_node: bool = False                 # let each node's tokens in the language model attend to the other
                                             # nodes' <ST_HIS> tokens of its sequence (false: each node alone)
    head_hidden: int = 256                   # width of W1 and W2 in the regression head
    encoder_skip: bool = True                # add the encoder's linear read-out to the head's output, so the
                                             # language model learns a correction (false = the head alone)
    notes: str = "text"                      # how the model reads a city's notes (dated text about places):
                                             # text: the language model reads each note, its pooled state moves the
                                             # forecast of the nodes and steps the note covers (needs use_llm) |
                                             # flags: the control, each note only as a flag of its kind | none
    note_hidden: int = 64                    # width of the note effect (notes: text or flags)
    node_text: bool = False                  # add each node's name and description, read once by the language
                                             # model, to its ST-tokens (a static cache per city)
    floor: bool = False                      # forecast relative to the naive references the history supports (last
                                             # value, same time a day and a week earlier): a learned per-step mix of
                                             # them plus the model's correction, so a new city's own rhythm is the start
    floor_fit: bool = False                  # with model.floor: each window weighs the references by how well each
                                             # would have forecast its own history (stllm.nn.floor), so a city whose
                                             # hour-of-week average fits best leans on it, one with a steady level on
                                             # the last value
    floor_city_fit: bool = False             # with model.floor: each node also weighs the references by how well
                                             # each forecast its city's training part (relative error, computed once
                                             # per city from its own inputs, as the profile is), so on a new city the
                                             # mix leans on the reference that city's history shows to work best
    nonnegative: bool = False                # forecasts below 0 are raised to 0 on the original scale (counts,
                                             # concentrations and speeds cannot be negative); in every forecast
                                             # stllm.infer.forecast returns, so metrics, predict and explain agree
    lm_layout: bool = True                   # the language model also reads the city layout (each node's ST-tokens
                                             # in the prompt) and corrects the encoder's read-out | false: it reads
                                             # only text (model.notes=text), and outside the notes' nodes and hours
                                             # the forecast is the encoder's read-out, unchanged
    lm_where: str = "everywhere"             # where the language model's correction of the city layout applies:
                                             # everywhere | notes: only at the nodes whose window (history or
                                             # horizon) meets a note; at the others the forecast is the encoder's
                                             # read-out exactly, so the language model changes only what text is about

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.lm_layout and self.use_llm:
            if self.task != "forecast" or self.notes != "text":
                raise ConfigError(f"model.lm_layout=false leaves the language model only the notes to read; set "
                                  f"model.task=forecast and model.notes=text (got {self.task}, {self.notes})")
            if self.node_text:
                raise ConfigError("model.node_text reaches the forecast through the city layout; it needs "
                                  "model.lm_layout=true")
            if not self.encoder_skip:
                raise ConfigError("model.lm_layout=false forecasts with the encoder's read-out; it needs "
                                  "model.encoder_skip=true")
        if self.lm_where == "notes" and self.use_llm and (self.notes == "none" or not self.lm_layout
                                                          or not self.encoder_skip):
            raise ConfigError(f"model.lm_where=notes applies the language model's correction only where a note is: "
                              f"it needs model.notes=text or flags, model.lm_layout=true and model.encoder_skip=true "
                              f"(got {self.notes}, {self.lm_layout}, {self.encoder_skip})")
        if self.floor_fit and not self.floor:
            raise ConfigError("model.floor_fit weighs the references of the naive floor; it needs model.floor=true")
        if self.floor_city_fit and not self.floor:
            raise ConfigError("model.floor_city_fit weighs the references of the naive floor; it needs "
                              "model.floor=true")


@dataclass
class TrainConfig:
    lr: float = 1e-3                         # AdamW learning rate for encoder, projector and head
    lora_lr: float = 2e-4                    # AdamW learning rate for LoRA weights
    weight_decay: float = 1e-4               # AdamW weight decay
    batch_size: int = 16                     # windows per step
    epochs: int = 20                         # upper bound on passes over the training windows
    max_minutes: float = 0.0                 # stop training after this wall time (0 = no limit)
    max_steps: int = 0                       # stop after this many optimizer steps (0 = no limit)
    train_stride: int = 1                    # use every k-th training window (1 = all)
    eval_every: int = 0                      # validate every k steps (0 = once per epoch)
    val_windows: int = 0                     # validate on at most this many evenly spaced windows (0 = all)
    patience: int = 5                        # early stopping: validations without improvement
    lr_decay: float = 0.5                    # multiply the learning rates by this after every lr_decay_after
    lr_decay_after: int = 2                  # validations in a row without improvement (lr_decay 0 = constant
                                             # rates). NYC bike, encoder only: test MAE 9.33 constant, 9.11 decayed
    loss: str = "mae"                        # mae | huber (masked, on scaled values)
    mask_zeros: bool = True                  # ignore zero targets in the loss, as the evaluation does
    grad_clip: float = 5.0                   # max gradient norm (0 = off)
    ema: float = 0.0                         # keep an exponential moving average of the trainable weights with
                                             # this decay (e.g. 0.999); validation, the best checkpoint and the
                                             # saved model use the average (0 = off)
    seed: int = 0                            # seeds python, numpy, torch and the data order
    test_sources: bool = True                # with data.sources: also test on each source's test split (metrics.json
                                             # "sources"); false = the main dataset only (each source's test costs
                                             # as much as the main one's)
    grad_accum: int = 1                      # optimizer step every k batches (gradient accumulation; the effective
                                             # batch is batch_size * grad_accum)
    mixed_precision: str = "no"              # no | bf16 | fp16: accelerate's mixed precision (where the device has it)
    num_threads: int = 0                     # torch threads (0 = leave torch's default)
    encoder_first_minutes: float = 0.0       # two-stage training: first train encoder + skip read-out alone (5x
                                             # faster on CPU) for at most this long or until early stopping, then
                                             # switch the language model on (0 = one stage; needs encoder_skip)
    encoder_first_steps: int = 0             # two-stage training by optimizer steps instead of minutes (reproducible
                                             # on any machine): stage 1 ends after this many steps or early stopping
    stage2_eval_every: int = 0               # two-stage training: validate every k steps in stage 2 (0 = eval_every);
                                             # its steps are ~4x slower, so fewer steps per validation
    stage2_freeze: list[str] = field(default_factory=lambda: ["encoder", "skip"])  # two-stage training: parts held
                                             # still in stage 2, so the language model learns a correction to a
                                             # fixed encoder forecast ([] = train everything in stage 2)
    freeze: list[str] = field(default_factory=list)  # parts held still, by name prefix: e.g. [encoder, skip] trains
                                             # only the language-model side of a run loaded with init_from
    init_from: str = ""                      # start from this run's weights: few-shot (same model), or warm-start
                                             # the encoder from an encoder-only run (parts it has are loaded)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ExplainConfig:
    enabled: bool = False                    # true: `stllm train` trains the explaining student (stllm.distill.student)
    lm_weight: float = 0.5                   # weight of the rationale LM cross-entropy in the joint loss
    own_adapter: bool = True                 # the student trains its own LoRA adapter (a copy of the forecaster's)
                                             # and nothing else, so the forecasts it explains stay the forecaster's.
                                             # false: it trains the forecaster's adapter, encoder, projector and head
                                             # (Beijing recipe: test MAE 26.66 -> 30.48 after 177 student steps)
    city_weight: float = 1.0                 # own_adapter=false only: weight of the city-layout regression loss
    n_samples: int = 256                     # (window, node) training samples the teacher writes rationales for
    rationales: str = ""                     # a folder `stllm distill` wrote: the student learns its rows (read back
                                             # with datasets.load_from_disk) instead of asking the teacher again
    batch_size: int = 4                      # node-layout samples per step (long sequences: keep it small on CPU)
    steps: int = 0                           # student optimizer steps (0 = one pass over the samples)
    minutes: float = 0.0                     # stop the student stage after this wall time (0 = no limit)
    lora_lr: float = 0.002                   # student-stage LoRA learning rate (0 = train.lora_lr). Text needs more
                                             # LoRA movement than regression: on Beijing 2e-4 left the LM loss at 12.5
                                             # nats after 40 steps, 2e-3 reached 3.2 after 100 (same test MAE)
    forecaster: bool = True                  # first train the city-layout forecaster (stllm.train, section train)
                                             # into <out>/forecaster, unless train.init_from names a run to start from
    teacher: str = "analytic"                # analytic (deterministic, from computed facts) | hf:<model folder>
                                             # (a local chat model) | openai:<model name> (an OpenAI-compatible
                                             # server at teacher_url, key from $teacher_key_env)
    teacher_url: str = ""                    # openai teacher: server URL, e.g. http://localhost:8000/v1
    teacher_key_env: str = "OPENAI_API_KEY"  # openai teacher: environment variable holding the API key
    teacher_trust_remote_code: bool = False  # hf teacher: allow the model folder's own code (off by default)
    fact_slots: bool = True                  # the analytic teacher writes computed facts as fact slots ({recent},
                                             # {drivers}, ...) that the program fills; the student writes the
                                             # words around them (stllm.distill.teachers). false: plain text, so the
                                             # student must write every number itself
    form: str = "written"                    # what the recipe trains to generate explanations: written (a writer
                                             # model writes the whole rationale from a data sheet, numbers copied
                                             # from it; stllm.distill.writer) | slots (the student writes the words
                                             # around fact slots the program fills; stllm.distill.student)
    writer_layers: int = 0                   # written: blocks of the backbone the writer keeps (0 = all: on NYC taxi
                                             # SmolLM2's 30 learned to copy the sheet in ~60 steps, 8 did not in
                                             # 1,000; docs/explain.md "Written by the model")
    copy_numbers: bool = True                # written: numbers the writer writes are numbers of its data sheet
    draft: bool = True                       # written: decoding checks the analytic text as a draft, 32 tokens a
                                             # pass: the writer's own greedy text, in ~5x less time on CPU
    mode: str = "analytic"                   # default explanation mode of the run: analytic | generated
    max_new_tokens: int = 320                # bound on generated rationale tokens

    def __post_init__(self) -> None:
        check_fields(self)
        if self.teacher.startswith("openai:") and not self.teacher_url:
            raise ConfigError(f"explain.teacher={self.teacher!r} needs explain.teacher_url (the server's address)")


def _backbone_config_cls():
    from stllm.backbone import BackboneConfig  # the backbone module owns its own config
    return BackboneConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    backbone: Any = field(default_factory=lambda: _backbone_config_cls()())
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "encoder": EncoderConfig, "model": ModelConfig, "train": TrainConfig, "explain": ExplainConfig}


def _section_cls(name: str):
    return _backbone_config_cls() if name == "backbone" else SECTIONS[name]


# ---- checks ----------------------------------------------------------------------------------------------------------
Limit = tuple[str, Callable[[Any], bool]]   # (what is expected, test of a value that already has the field's type)


def _at_least(low: int) -> Limit:
    return f">= {low}", lambda v: v >= low


def _one_of(*choices: str) -> Limit:
    return "one of " + "|".join(choices), lambda v: v in choices


_POSITIVE: Limit = ("> 0", lambda v: v > 0)
_FRACTION: Limit = ("in [0, 1)", lambda v: 0 <= v < 1)
_NAME: Limit = ("a non-empty string", lambda v: v.strip() != "")

SOURCE_KEYS = {"name", "options", "channels", "resample", "max_nodes", "notes", "split", "split_at"}

# Ranges and choices by dotted key, beyond the annotated type. Every int and float field needs one
# (tests/test_config_validation.py sets each to -1); backbone.* live in BackboneConfig.__post_init__.
LIMITS: dict[str, Limit] = {
    "data.name": _NAME,
    "data.options": ("a mapping of option names (strings) to values", lambda v: all(isinstance(k, str) for k in v)),
    "data.t_in": _at_least(1), "data.t_out": _at_least(1),
    "data.split": ("three fractions >= 0 summing to 1 (train, val, test)",
                   lambda v: len(v) == 3 and min(v) >= 0 and abs(sum(v) - 1) <= 1e-6),
    "data.split_at": ("[] or [train_end, test_start] with 0 < train_end <= test_start",
                      lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1])),
    "data.periods": ("a list of day and/or week", lambda v: all(p in ("day", "week") for p in v)),
    "data.scaler": _one_of("channel", "node"),
    "data.max_nodes": _at_least(0), "data.profile_weeks": _at_least(0), "data.notes_max_hours": _at_least(0),
    "data.train_days": _at_least(0),
    "data.resample": ("'' or '<interval>:sum' / '<interval>:mean' with a positive interval, e.g. '1h:sum'",
                      lambda v: v == "" or parse_resample(v) is not None),
    "encoder.d_enc": _at_least(1), "encoder.patch_len": _at_least(1), "encoder.temporal_layers": _at_least(0),
    "encoder.kernel_sizes": ("a non-empty list of integers >= 1", lambda v: len(v) > 0 and min(v) >= 1),
    "encoder.dynamic_graph": _one_of("auto", "wind", "data", "none"),
    "encoder.graph_sigma": _at_least(0), "encoder.graph_threshold": _at_least(0),
    "encoder.wind_sigma0": _at_least(0), "encoder.wind_alpha": _at_least(0),
    "encoder.dropout": _FRACTION, "encoder.mix_hidden": _at_least(0),
    "model.task": _one_of("forecast", "events"), "model.prompt": _NAME, "model.projector": _one_of("linear", "mlp"),
    "model.tokens_per_node": _at_least(1), "model.nodes_per_sequence": _at_least(0), "model.head_hidden": _at_least(1),
    "model.notes": _one_of("text", "flags", "none"), "model.lm_where": _one_of("everywhere", "notes"),
    "model.note_hidden": _at_least(1),
    "train.lr": _POSITIVE, "train.lora_lr": _at_least(0), "train.weight_decay": _at_least(0),
    "train.batch_size": _at_least(1), "train.epochs": _at_least(1), "train.max_minutes": _at_least(0),
    "train.max_steps": _at_least(0), "train.train_stride": _at_least(1), "train.eval_every": _at_least(0),
    "train.val_windows": _at_least(0), "train.patience": _at_least(1), "train.lr_decay": _FRACTION,
    "train.lr_decay_after": _at_least(1), "train.loss": _one_of("mae", "huber"), "train.grad_clip": _at_least(0),
    "train.ema": _FRACTION, "train.seed": ("in [0, 2**32) (numpy's seed range)", lambda v: 0 <= v < 2**32),
    "train.grad_accum": _at_least(1), "train.mixed_precision": _one_of("no", "bf16", "fp16"),
    "train.num_threads": _at_least(0), "train.encoder_first_minutes": _at_least(0),
    "train.encoder_first_steps": _at_least(0), "train.stage2_eval_every": _at_least(0),
    "explain.lm_weight": _at_least(0), "explain.city_weight": _at_least(0), "explain.n_samples": _at_least(1),
    "explain.rationales": ("'' or a folder written by stllm distill", lambda v: v == "" or v.strip() != ""),
    "explain.batch_size": _at_least(1), "explain.steps": _at_least(0), "explain.minutes": _at_least(0),
    "explain.lora_lr": _at_least(0), "explain.mode": _one_of("analytic", "generated"),
    "explain.form": _one_of("written", "slots"), "explain.writer_layers": _at_least(0),
    "explain.teacher": ("analytic, hf:<model folder> or openai:<model name>",
                        lambda v: v == "analytic" or v.startswith(("hf:", "openai:"))),
    "explain.max_new_tokens": _at_least(1),
}


def parse_resample(text: str) -> tuple[Any, str] | None:
    """'1h:sum' -> (Timedelta('1h'), 'sum'); None when it is not '<positive interval>:<sum|mean>'."""
    import pandas as pd
    interval, _, how = text.rpartition(":")
    try:
        step = pd.Timedelta(interval.strip())
    except (ValueError, TypeError):
        return None
    return (step, how.strip()) if how.strip() in ("sum", "mean") and step > pd.Timedelta(0) else None


def check_fields(section: Any) -> None:
    """Check every field of a section dataclass and store it converted ('1e-4' -> 0.0001); each __post_init__
    calls this first, so configs built in code are checked as YAML ones are."""
    for f in dataclasses.fields(section):
        setattr(section, f.name, check_value(type(section), f.name, getattr(section, f.name)))


def check_value(cls: type, name: str, value: Any) -> Any:
    """`value` for field `name` of section class `cls`, converted to the field's annotated type and within
    LIMITS; else a ConfigError naming the dotted key, the value and what is expected."""
    key = f"{cls.__name__.removesuffix('Config').lower()}.{name}"      # BackboneConfig -> backbone.<name>
    kind = next(str(f.type) for f in dataclasses.fields(cls) if f.name == name)  # a string (future annotations)
    try:
        ok, converted = _convert(value, kind)
    except RecursionError:                   # a YAML list that holds itself: &a [*a]
        ok, converted = False, None
    if not ok:
        raise ConfigError(f"{key} must be {_describe(kind)}, got {_show(value)}")
    expects, test = LIMITS.get(key, ("", None))
    if test is not None and converted is not None and not test(converted):
        raise ConfigError(f"{key} must be {expects}, got {_show(value)}")
    return converted


def _convert(value: Any, kind: str) -> tuple[bool, Any]:
    """(True, value as the annotation `kind`) or (False, None); e.g. ('1e-4', 'float') -> (True, 0.0001)."""
    for option in _alternatives(kind):
        ok, converted = _convert_one(value, option)
        if ok:
            return True, converted
    return False, None


def _convert_one(value: Any, kind: str) -> tuple[bool, Any]:
    if kind == "Any":
        return True, value
    if kind == "None":
        return value is None, None
    if kind.startswith("list"):
        if not isinstance(value, list):
            return False, None
        items = [_convert(v, kind[5:-1] or "Any") for v in value]   # 'list[int]' -> 'int'; 'list' -> any items
        return all(ok for ok, _ in items), [v for _, v in items]
    if kind in ("bool", "str", "dict"):
        return isinstance(value, {"bool": bool, "str": str, "dict": dict}[kind]), value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False, None                   # a bool is an int to Python, but `batch_size: true` is a mistake
    try:
        if kind == "int" and not isinstance(value, float):
            return True, int(value)
        if kind == "float":
            number = float(value)            # YAML 1.1 reads 1e-4 (no dot) as a string
            return math.isfinite(number), number
    except (ValueError, OverflowError):
        pass
    return False, None


def _alternatives(kind: str) -> list[str]:
    """'str | list[str | int]' -> ['str', 'list[str | int]']: split at the '|' outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(kind):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(kind[start:i].strip())
            start = i + 1
    return parts + [kind[start:].strip()]


_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number (e.g. 0.5 or 1e-4)",
          "str": "a string", "list": "a list", "dict": "a mapping", "None": "null", "Any": "any value"}
_PLURAL = {"bool": "true/false", "int": "integers", "float": "finite numbers", "str": "strings", "list": "lists",
           "dict": "mappings", "None": "nulls", "Any": "any values"}


def _describe(kind: str, plural: bool = False) -> str:
    """'int | None' -> 'an integer or null'; 'list[str]' -> 'a list of strings'."""
    words = []
    for option in _alternatives(kind):
        if option.startswith("list["):
            words.append(("lists" if plural else "a list") + " of " + _describe(option[5:-1], plural=True))
        else:
            words.append((_PLURAL if plural else _WORDS).get(option, option))
    return " or ".join(words)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."   # a whole pasted list helps nobody


# ---- loading ---------------------------------------------------------------------------------------------------------
def _sections(raw: Any, source: str) -> dict[str, dict]:
    """`raw` as {section: {key: value}} after checking its shape and names; values are checked when built."""
    if raw is None:                          # an empty file
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data:, model:, train:, ...), got "
                          f"{type(raw).__name__} {_show(raw)}")
    names = [*SECTIONS, "backbone"]
    out = {}
    for section, values in raw.items():
        if section not in names:
            raise ConfigError(f"{source}: unknown section {section!r}; sections are {names}")
        values = {} if values is None else values            # `train:` with nothing under it
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping of keys to values "
                              f"({section}: {{key: value}}), got {_show(values)}")
        known = sorted(f.name for f in dataclasses.fields(_section_cls(section)))
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                              f"known keys of {section}: {known}")
        out[section] = dict(values)
    return out


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build a Config from {section: {key: value}}; a wrong section, key or value raises ConfigError."""
    parts = {}
    for section, values in _sections(raw, source).items():
        try:
            parts[section] = _section_cls(section)(**values)
        except ValueError as err:            # the checks name the key and value; add where it came from
            raise ConfigError(f"{source}: {err}") from err
    return Config(**parts)


def parse_overrides(overrides: list[str] | None) -> dict:
    """['train.lr=1e-4', 'data.name=nyc-bike'] -> nested dict; values parsed as YAML scalars/lists.

    Only the split at the first '=' and '.' is ours; every value goes through PyYAML, so `--set` reads exactly
    what a config file would. A config library (OmegaConf, Hydra) would add a dependency and its own syntax
    (interpolation, `+key=`) for no case our configs have; the checks that matter are in check_value."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = _parse_yaml(value, f"--set {item!r}") if value != "" else ""
    return nested


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except Exception as err:                 # PyYAML also raises ValueError/KeyError/... ('2024-13-01', '!!int x')
        raise ConfigError(f"{source}: not valid YAML: {err}") from err


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v or {}) for k, v in (base or {}).items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides."""
    raw, source = None, "defaults"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = _parse_yaml(path.read_text(), source)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a UTF-8 text file: {err}") from err
    base, extra = _sections(raw, source), _sections(parse_overrides(overrides), "--set")
    for section, values in extra.items():    # checked alone first, so a bad value is blamed on --set
        for name, value in values.items():
            try:
                check_value(_section_cls(section), name, value)
            except ConfigError as err:
                raise ConfigError(f"--set: {err}") from err
    return config_from_dict(merge(base, extra), source + (" with --set" if extra else ""))
