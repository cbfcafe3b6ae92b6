"""The run folder on disk: atomic checkpoints in one safetensors file (trainable weights, optimizer state, RNG
state and loop counters), files replaced only by complete new versions (`replacing`), and reading a run's files
with errors that name the run and the damaged file (`read_weights`, `read_config`, `read_json`)."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class DamagedRun(ValueError):
    """A file of a run folder cannot be read, or does not fit the run's config. The message names both."""


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (a file or a folder) to write the new version to. When the block ends
    without error, the new version replaces `path` by os.replace, so readers see the old or the new version and
    never half of one; on error the temporary is removed and `path` is untouched. A folder is swapped by two
    renames (a crash between them leaves `<name>.old` beside a missing `<name>`)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    _remove(tmp)                       # left behind by a crash
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        _remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
        return
    with open(tmp, "rb+") as f:        # on disk before the rename: a power cut cannot leave an empty file
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def recover(folder: str | Path) -> None:
    """Tidy what a crash inside `replacing` left in `folder` and its subfolders: unfinished `<name>.tmp` versions
    are removed, and a folder caught between its two renames (`<name>.old` without `<name>`) is put back."""
    for path in sorted(Path(folder).rglob("*.old")) + sorted(Path(folder).rglob("*.tmp")):
        target = path.with_name(path.name[:-4])
        if path.suffix == ".old" and not target.exists():
            os.replace(path, target)
        elif path.exists():
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"stllm": json.dumps(metadata or {})})


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("stllm", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, json.JSONDecodeError) as err:
        raise DamagedRun(f"{path} is damaged ({_reason(err)}); restore it or delete it") from err


def read_weights(path: str | Path, run: str | Path, model=None) -> dict[str, torch.Tensor]:
    """The tensors of a run's weight file. A truncated or foreign file raises DamagedRun naming the run. With a
    `model`, they are checked against it (`check_weights`)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise DamagedRun(f"the weights of {run} are damaged ({path.name}: {_reason(err)}); "
                         f"retrain or restore it") from err
    if model is not None:
        check_weights(tensors, path, run, model)
    return tensors


def has_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a weight file holds LoRA tensors: training checkpoints do, and model.safetensors of runs saved
    before the LoRA moved to the run's peft `adapter/` folder alone."""
    return any("lora_" in name for name in tensors)


def check_weights(tensors: dict[str, torch.Tensor], path: str | Path, run: str | Path, model) -> None:
    """Check a run's weight file against `model` (an STLLM built from the run's config): tensors whose shapes
    differ from the model's raise naming the config key that explains them (`explain_shapes`), and so do
    tensors one side has and the other lacks. LoRA tensors are expected only in a file that holds some."""
    path = Path(path)
    own = {n: tuple(p.shape) for n, p in model.named_parameters()}
    wrong = {n: (own[n], tuple(v.shape)) for n, v in tensors.items() if n in own and own[n] != tuple(v.shape)}
    if wrong:
        raise DamagedRun(f"{run}: {explain_shapes(wrong, model.cfg)}; its config.yaml and {path.name} do not belong "
                         f"together: restore the one that changed, or retrain")
    lora_inside = has_lora(tensors)
    expected = {n for n, p in model.named_parameters()                # what save_pretrained writes (model._saved)
                if (p.requires_grad or not n.startswith("backbone.") or "lora_" in n)
                and (lora_inside or "lora_" not in n)}
    odd = sorted(set(tensors) - set(own)) + sorted(expected - set(tensors))
    hint = next((key for name in odd for prefix, key in NAME_KEYS if prefix in name), None)
    if odd and hint:
        raise DamagedRun(f"{run}: the weights were trained with another {hint} than config.yaml's: {path.name} "
                         f"holds {len(set(tensors) - set(own))} tensor(s) the config does not build and lacks "
                         f"{len(expected - set(tensors))} it builds (e.g. {odd[0]}); restore the config, or retrain")


# The config keys that set a size of a tensor, and the tensors (name prefixes; "lora_" anywhere) whose shape they
# set; the more specific keys first.
SIZE_KEYS = (("backbone.lora_r", ("lora_",)), ("encoder.mix_hidden", ("encoder.mix.",)),
             ("model.head_hidden", ("head.",)), ("model.tokens_per_node", ("projector.", "head.")),
             ("data.t_out", ("head.", "skip.")), ("encoder.d_enc", ("encoder.", "projector.", "pre_proj.", "skip.")))
# The config keys that decide whether tensors exist at all (name fragments).
NAME_KEYS = ((".explain.", "explain.own_adapter"), ("lora_", "backbone.lora_r"), ("encoder.mix.", "encoder.mix_hidden"),
             ("encoder.temporal.layers.", "encoder.temporal_layers"), ("skip.", "model.encoder_skip"),
             ("head.lin.", "model.use_llm"), ("projector.", "model.use_llm"))


def explain_shapes(wrong: dict[str, tuple[tuple, tuple]], cfg) -> str:
    """Which config key explains tensors of the wrong shape, {name: (model's shape, the weights' shape)}: the key
    whose value, in the config, is the size (or a factor of the size) that differs. Falls back to naming the
    first tensor and both shapes."""
    votes: dict[str, list[int]] = {}
    score: dict[str, int] = {}
    for name, (own, saved) in wrong.items():
        for key, scopes in SIZE_KEYS:
            value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            if len(own) != len(saved) or not value or not any(
                    name.startswith(s) or (s == "lora_" and s in name) for s in scopes):
                continue
            for a, b in zip(own, saved):
                if a != b and a % value == 0 and b * value % a == 0:
                    votes.setdefault(key, []).append(b * value // a)
                    score[key] = score.get(key, 0) + (2 if a == value else 1)   # the size itself beats a multiple
    if votes:
        order = [k for k, _ in SIZE_KEYS]
        key = max(score, key=lambda k: (score[k], -order.index(k)))
        implied = max(set(votes[key]), key=votes[key].count)
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        return f"{key} is {value} in the config, {implied} in the weights"
    name, (own, saved) = next(iter(wrong.items()))
    return f"{name} has shape {list(saved)} in the weights, {list(own)} in the model its config builds"


def read_config(path: str | Path, run: str | Path) -> dict:
    """A run's config.yaml as a mapping of sections; a file that does not parse raises DamagedRun naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DamagedRun(f"{path} does not parse as YAML ({_reason(err)}); restore the config of {run}") from err
    if not isinstance(raw, dict):
        raise DamagedRun(f"{path} is damaged: expected sections (data:, encoder:, ...), got {type(raw).__name__}; "
                         f"restore the config of {run}")
    return raw


def load_run_config(run: str | Path, overrides: list[str] = ()):
    """The Config a run's config.yaml describes (a damaged file raises DamagedRun naming it), with the settings
    runs saved before a key existed were trained with (`legacy_overrides`), then `overrides`."""
    from stllm.config import load_config
    path = Path(run) / "config.yaml"
    read_config(path, run)
    return load_config(path, [*legacy_overrides(path), *overrides])


def legacy_overrides(config_path: str | Path) -> list[str]:
    """Settings that runs saved before a config key existed were trained with (their config.yaml lacks the key,
    and today's default differs)."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    legacy = [] if "mix_hidden" in (raw.get("encoder") or {}) else ["encoder.mix_hidden=0"]
    if "own_adapter" not in (raw.get("explain") or {}):
        legacy.append("explain.own_adapter=false")
    if "notes" not in (raw.get("model") or {}):   # runs from before notes have no note effect to load
        legacy.append("model.notes=none")
    return legacy


def read_json(path: str | Path, run: str | Path) -> dict:
    """A run's JSON file (meta.json); a damaged one raises DamagedRun naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRun(f"{path.name} of {run} is damaged ({err}); retrain or restore it") from err


def _reason(err: Exception) -> str:
    return " ".join(str(err).removeprefix("Error while deserializing header: ").split())


def training_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Flatten weights ('model.<name>'), AdamW moments ('optim.<name>.<key>') and RNG ('rng.torch')."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optim.{names[id(p)]}.{key}"] = value
    out["rng.torch"] = torch.get_rng_state()
    return out


def restore_training_state(tensors: dict[str, torch.Tensor], model, optimizer) -> None:
    model.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, state_key = key[6:].rsplit(".", 1)
            optimizer.state[params[name]][state_key] = value.to(params[name].device)
    torch.set_rng_state(tensors["rng.torch"])
