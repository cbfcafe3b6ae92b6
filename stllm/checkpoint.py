"""Atomic checkpoints in one safetensors file: trainable weights, optimizer state, RNG state and loop counters."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"stllm": json.dumps(metadata or {})})
    os.replace(tmp, path)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("stllm", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


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
