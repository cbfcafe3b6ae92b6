"""Dataclasses for every component, YAML in and out, dotted overrides (`--set train.lr=1e-4`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names it."""


@dataclass
class DataConfig:
    name: str = "synthetic"                  # built-in dataset name or a path (see docs/data_formats.md)
    options: dict = field(default_factory=dict)  # passed to the loader, e.g. {channels: [PM2.5]}
    channels: list = field(default_factory=list)  # channels to forecast (names or positions); empty = all
    t_in: int = 12                           # history steps
    t_out: int = 12                          # forecast horizon steps
    split: list = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test fractions, chronological
    split_at: list = field(default_factory=list)  # [train_end, test_start] step indices (a dataset's given split)
    periods: list = field(default_factory=lambda: ["day", "week"])  # target-aligned period context windows
    scaler: str = "channel"                  # channel: z-score per channel over all nodes | node: per node and channel
    max_nodes: int = 0                       # keep only the first k nodes (0 = all); for quick runs
    train_days: float = 0                    # few-shot: train only on windows inside the first k days (0 = all)
    holiday_features: bool = False           # the encoder also sees, per step, whether its day, and the days one
                                             # day / one week earlier (data.periods), are public holidays

    def __post_init__(self) -> None:
        if self.t_in < 1 or self.t_out < 1:
            raise ConfigError(f"data.t_in and data.t_out must be >= 1, got {self.t_in}, {self.t_out}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"data.split must be three non-negative fractions summing to 1, got {self.split}")
        bad = [p for p in self.periods if p not in ("day", "week")]
        if bad:
            raise ConfigError(f"data.periods may contain 'day' and 'week', got {bad}")
        if self.split_at and (len(self.split_at) != 2 or not 0 < self.split_at[0] <= self.split_at[1]):
            raise ConfigError(f"data.split_at must be [train_end, test_start] with 0 < train_end <= test_start, got {self.split_at}")
        if self.scaler not in ("channel", "node"):
            raise ConfigError(f"data.scaler must be 'channel' or 'node', got {self.scaler!r}")


@dataclass
class EncoderConfig:
    d_enc: int = 64                          # width of ST-tokens
    patch_len: int = 12                      # steps per patch of the recent window (t_in / patch_len tokens)
    temporal_layers: int = 3                 # gated dilated conv layers (dilation 1, 2, 4, ...)
    kernel_sizes: list = field(default_factory=lambda: [2, 3])  # kernel widths per temporal layer
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

    def __post_init__(self) -> None:
        if self.dynamic_graph not in ("auto", "wind", "data", "none"):
            raise ConfigError(f"encoder.dynamic_graph must be auto|wind|data|none, got {self.dynamic_graph!r}")
        if self.d_enc < 1 or self.patch_len < 1 or self.temporal_layers < 0 or self.mix_hidden < 0:
            raise ConfigError("encoder.d_enc and encoder.patch_len must be >= 1, encoder.temporal_layers and "
                              "encoder.mix_hidden >= 0")


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

    def __post_init__(self) -> None:
        if self.task not in ("forecast", "events"):
            raise ConfigError(f"model.task must be forecast|events, got {self.task!r}")
        if self.projector not in ("linear", "mlp"):
            raise ConfigError(f"model.projector must be linear|mlp, got {self.projector!r}")
        if self.tokens_per_node < 1:
            raise ConfigError(f"model.tokens_per_node must be >= 1, got {self.tokens_per_node}")


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
    num_threads: int = 0                     # torch threads (0 = leave torch's default)
    encoder_first_minutes: float = 0.0       # two-stage training: first train encoder + skip read-out alone (5x
                                             # faster on CPU) for at most this long or until early stopping, then
                                             # switch the language model on (0 = one stage; needs encoder_skip)
    stage2_eval_every: int = 0               # two-stage training: validate every k steps in stage 2 (0 = eval_every);
                                             # its steps are ~4x slower, so fewer steps per validation
    stage2_freeze: list = field(default_factory=lambda: ["encoder", "skip"])  # two-stage training: parts held
                                             # still in stage 2, so the language model learns a correction to a
                                             # fixed encoder forecast ([] = train everything in stage 2)
    freeze: list = field(default_factory=list)  # parts held still, by name prefix: e.g. [encoder, skip] trains
                                             # only the language-model side of a run loaded with init_from
    init_from: str = ""                      # start from this run's weights: few-shot (same model), or warm-start
                                             # the encoder from an encoder-only run (parts it has are loaded)

    def __post_init__(self) -> None:
        if self.loss not in ("mae", "huber"):
            raise ConfigError(f"train.loss must be mae|huber, got {self.loss!r}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train.batch_size must be >= 1 and train.lr > 0")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"train.ema must be in [0, 1) (0 = off, e.g. 0.999), got {self.ema}")
        if not 0 <= self.lr_decay < 1 or self.lr_decay_after < 1:
            raise ConfigError(f"train.lr_decay must be in [0, 1) and train.lr_decay_after >= 1, got "
                              f"{self.lr_decay}, {self.lr_decay_after}")


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
    mode: str = "analytic"                   # default explanation mode of the run: analytic | generated
    max_new_tokens: int = 320                # bound on generated rationale tokens

    def __post_init__(self) -> None:
        if self.mode not in ("analytic", "generated"):
            raise ConfigError(f"explain.mode must be analytic|generated, got {self.mode!r}")
        if self.teacher != "analytic" and not self.teacher.startswith(("hf:", "openai:")):
            raise ConfigError("explain.teacher must be 'analytic', 'hf:<model folder>' or 'openai:<model name>', "
                              f"got {self.teacher!r}")
        if self.teacher.startswith("openai:") and not self.teacher_url:
            raise ConfigError(f"explain.teacher={self.teacher!r} needs explain.teacher_url (the server's address)")
        if min(self.lm_weight, self.city_weight, self.steps, self.lora_lr) < 0 or \
                min(self.n_samples, self.batch_size) < 1:
            raise ConfigError("explain.lm_weight, city_weight, steps and lora_lr must be >= 0, "
                              "explain.n_samples and explain.batch_size >= 1")


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


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config; unknown sections or keys raise ConfigError naming them."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    parts = {}
    for section, values in raw.items():
        if section not in (*SECTIONS, "backbone"):
            raise ConfigError(f"{source}: unknown section {section!r}; sections are {[*SECTIONS, 'backbone']}")
        cls = _section_cls(section)
        values = values or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
                              f"known keys of {section}: {sorted(known)}")
        values = {k: _coerce(cls, k, v, source) for k, v in values.items()}
        try:
            parts[section] = cls(**values)
        except TypeError as err:
            raise ConfigError(f"{source}: section {section}: {err}") from err
    return Config(**parts)


def _coerce(cls, key: str, value, source: str):
    """Numbers written as YAML 1.1 reads them ('1e-4' is a string there) become the field's type."""
    kind = str({f.name: f.type for f in dataclasses.fields(cls)}[key])
    try:
        if kind.startswith("float") and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
    return value


def parse_overrides(overrides: list[str] | None) -> dict:
    """['train.lr=1e-4', 'data.name=nyc-bike'] -> nested dict; values parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else ""
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v or {}) for k, v in (base or {}).items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        source = str(path)
    return config_from_dict(merge(raw, parse_overrides(overrides)), source)
