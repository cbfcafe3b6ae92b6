"""Test-time adaptation for zero-shot use: a few self-supervised steps on the target city's input history.

Masked reconstruction: a segment of the target's *input* history (before any window that is evaluated) is
cut into a visible part and a masked tail of t_out steps; the model reconstructs the masked tail from the
visible part. No target labels are used: the tail is input data that precedes every evaluated window.
Only normalisation parameters are adapted (the LayerNorms of the encoder and of the head), which re-centre
and re-scale features for the new city without moving what the model learned (as TENT does).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from stllm.data.prepared import PreparedCity


def adaptable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that are safe to adapt: LayerNorm weights and biases outside the language model."""
    out = []
    for name, module in model.named_modules():
        if name.startswith("backbone"):
            continue
        if isinstance(module, torch.nn.LayerNorm):
            out += [(f"{name}.{p}", param) for p, param in module.named_parameters()]
    return out


def adapt(model, prep: PreparedCity, before: int, steps: int = 20, batch_size: int = 8, lr: float = 1e-3,
          seed: int = 0):
    """A copy of `model` adapted on windows whose reconstructed tail ends before step `before`.

    before: the first step that must stay unseen (e.g. the first target of the evaluated split).
    """
    from stllm.train import masked_loss
    starts = np.arange(prep.t_in, before - prep.t_out + 1)
    if len(starts) == 0:
        raise ValueError(f"{prep.city.name}: no input history before step {before} to adapt on")
    adapted = copy.deepcopy(model)
    for p in adapted.parameters():
        p.requires_grad_(False)
    params = [p for _, p in adaptable_parameters(adapted)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    adapted.eval()  # no dropout noise; LayerNorm behaves the same in both modes
    for _ in range(steps):
        batch = prep.batch(rng.choice(starts, size=min(batch_size, len(starts)), replace=False))
        loss = masked_loss(adapted(batch), batch["y"], batch["y_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapted.eval()
