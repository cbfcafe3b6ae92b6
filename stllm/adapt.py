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

from stllm.config import TrainConfig
from stllm.data.prepared import PreparedCity, batch_to
from stllm.loop import Loop, TrainState, freeze, make_accelerator


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
    It steps through `stllm.loop.Loop` in eval mode (no dropout noise; LayerNorm behaves the same in both modes),
    with Adam on the adaptable parameters alone, `steps` batches of `batch_size` windows drawn at random (without
    repeats within a batch) from a generator seeded with `seed`; no clipping, validation or files.
    """
    from stllm.train import masked_loss
    starts = np.arange(prep.t_in, before - prep.t_out + 1)
    if len(starts) == 0:
        raise ValueError(f"{prep.city.name}: no input history before step {before} to adapt on")
    adapted = copy.deepcopy(model)
    params = adaptable_parameters(adapted)
    freeze(adapted, train=lambda name: name in {n for n, _ in params})
    optimizer = torch.optim.Adam([p for _, p in params], lr=lr)
    rng = np.random.default_rng(seed)
    draws = [rng.choice(starts, size=min(batch_size, len(starts)), replace=False) for _ in range(steps)]

    def loss(windows: np.ndarray) -> tuple[torch.Tensor, dict]:
        batch = batch_to(prep.batch(windows), next(adapted.parameters()).device)
        return masked_loss(adapted(batch), batch["y"], batch["y_mask"]), {}
    budget = TrainConfig(epochs=1, max_steps=steps, grad_clip=0.0, lr_decay=0.0)
    loop = Loop(make_accelerator(device_placement=False), adapted, optimizer, budget, lambda epoch: draws, loss,
                dropout=False)
    adapted.eval()
    if steps:
        loop.run(TrainState())
    return adapted
