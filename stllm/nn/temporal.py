"""Gated dilated temporal convolutions (WaveNet style), shared across nodes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedTemporalConv(nn.Module):
    """One layer: for each kernel width, tanh(conv_f(x)) * sigmoid(conv_g(x)), causal, dilated; widths summed.

    x: [B, d, t] -> (residual output [B, d, t], skip [B, d, t])
    """

    def __init__(self, d: int, kernel_sizes: list[int], dilation: int, dropout: float = 0.0):
        super().__init__()
        self.kernel_sizes, self.dilation = list(kernel_sizes), dilation
        self.filters = nn.ModuleList(nn.Conv1d(d, d, k, dilation=dilation) for k in self.kernel_sizes)
        self.gates = nn.ModuleList(nn.Conv1d(d, d, k, dilation=dilation) for k in self.kernel_sizes)
        self.out = nn.Conv1d(d, d, 1)
        self.skip = nn.Conv1d(d, d, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = 0
        for k, conv_f, conv_g in zip(self.kernel_sizes, self.filters, self.gates):
            xp = F.pad(x, ((k - 1) * self.dilation, 0))  # causal: output t sees inputs <= t
            h = h + torch.tanh(conv_f(xp)) * torch.sigmoid(conv_g(xp))
        h = self.dropout(h)
        return x + self.out(h), self.skip(h)


class TemporalEncoder(nn.Module):
    """Stack of gated layers with dilation 1, 2, 4, ...; returns the sum of skips plus the last residual.

    x: [B, t, d] -> [B, t, d]
    """

    def __init__(self, d: int, n_layers: int, kernel_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(GatedTemporalConv(d, kernel_sizes, 2 ** i, dropout) for i in range(n_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # [B, d, t]
        skips = 0
        for layer in self.layers:
            h, s = layer(h)
            skips = skips + s
        return self.norm((h + skips).transpose(1, 2))  # [B, t, d]
