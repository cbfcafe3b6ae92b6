"""Gated dilated temporal convolutions (WaveNet style), shared across nodes.

A causal dilated convolution over a short window is written as a matmul over shifted copies of the input
(taps): for our shapes (thousands of 12-step series) mkldnn's conv1d backward dominated a profiled training
step on this CPU, and the matmul form is exactly equal (tests/test_encoder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_taps(x: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
    """[B, t, d] -> [B, t, kernel*d]: at step t, the inputs at t-(kernel-1)*dilation, ..., t-dilation, t (zeros before 0)."""
    pad = (kernel - 1) * dilation
    xp = F.pad(x, (0, 0, pad, 0))                                      # [B, pad + t, d]
    t = x.shape[1]
    return torch.cat([xp[:, j * dilation: j * dilation + t] for j in range(kernel)], dim=-1)


class GatedTemporalConv(nn.Module):
    """One layer: for each kernel width, tanh(conv_f(x)) * sigmoid(conv_g(x)), causal and dilated; widths summed.

    x: [B, t, d] -> (residual output [B, t, d], skip [B, t, d])
    """

    def __init__(self, d: int, kernel_sizes: list[int], dilation: int, dropout: float = 0.0):
        super().__init__()
        self.kernel_sizes, self.dilation = list(kernel_sizes), dilation
        self.convs = nn.ModuleList(nn.Linear(k * d, 2 * d) for k in self.kernel_sizes)  # filter and gate together
        self.out = nn.Linear(d, d)
        self.skip = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = 0
        for k, conv in zip(self.kernel_sizes, self.convs):
            f, g = conv(causal_taps(x, k, self.dilation)).chunk(2, dim=-1)  # [B, t, d] each
            h = h + torch.tanh(f) * torch.sigmoid(g)
        h = self.dropout(h)
        return x + self.out(h), self.skip(h)


class TemporalEncoder(nn.Module):
    """Stack of gated layers with dilation 1, 2, 4, ...; the sum of skips plus the last residual, normalised.

    x: [B, t, d] -> [B, t, d]
    """

    def __init__(self, d: int, n_layers: int, kernel_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(GatedTemporalConv(d, kernel_sizes, 2 ** i, dropout) for i in range(n_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = 0
        for layer in self.layers:
            x, s = layer(x)
            skips = skips + s
        return self.norm(x + skips)
