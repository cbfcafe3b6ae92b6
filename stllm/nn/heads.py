"""Projector (encoder width -> language model width) and the output heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """A node's k encoder tokens -> m language-model tokens, a linear layer or a 2-layer MLP.

    [b, N, k, d_enc] -> [b, N, m, d_llm]
    """

    def __init__(self, d_enc: int, d_llm: int, kind: str = "mlp", n_in: int = 1, n_out: int = 1):
        super().__init__()
        self.n_out, self.d_llm = n_out, d_llm
        d_in, d_out = n_in * d_enc, n_out * d_llm
        if kind == "linear":
            self.net = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, d_llm), nn.GELU(), nn.Linear(d_llm, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        return self.net(x.reshape(b, n, -1)).reshape(b, n, self.n_out, self.d_llm)


class RegressionHead(nn.Module):
    """Y = W3 [ReLU(W1 H_his), ReLU(W2 H_pre)].

    h_his: [b, N, k, d_llm] hidden states at a node's <ST_HIS> positions; h_pre: [b, N, d_llm] at its <ST_PRE>.
    Returns [b, t_out, N, C]. Hidden states are layer-normalised first: a language model's residual stream has
    a scale of its own that the head should not have to learn around.
    """

    def __init__(self, d_llm: int, n_tokens: int, t_out: int, n_channels: int, hidden: int = 256):
        super().__init__()
        self.t_out, self.n_channels = t_out, n_channels
        self.norm_his, self.norm_pre = nn.LayerNorm(d_llm), nn.LayerNorm(d_llm)
        self.w1 = nn.Linear(n_tokens * d_llm, hidden)
        self.w2 = nn.Linear(d_llm, hidden)
        self.w3 = nn.Linear(2 * hidden, t_out * n_channels)

    def forward(self, h_his: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        b, n = h_pre.shape[:2]
        a = F.relu(self.w1(self.norm_his(h_his).reshape(b, n, -1)))    # [b, N, hidden]
        p = F.relu(self.w2(self.norm_pre(h_pre)))                      # [b, N, hidden]
        y = self.w3(torch.cat([a, p], dim=-1))                          # [b, N, t_out*C]
        return y.reshape(b, n, self.t_out, self.n_channels).permute(0, 2, 1, 3)  # [b, t_out, N, C]


class LinearHead(nn.Module):
    """The encoder-only ablation's head: one linear map from a node's tokens to its forecast.

    tokens: [b, N, k, d_enc] -> [b, t_out, N, C]
    """

    def __init__(self, d_enc: int, n_tokens: int, t_out: int, n_channels: int):
        super().__init__()
        self.t_out, self.n_channels = t_out, n_channels
        self.lin = nn.Linear(n_tokens * d_enc, t_out * n_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape[:2]
        y = self.lin(tokens.reshape(b, n, -1))                          # [b, N, t_out*C]
        return y.reshape(b, n, self.t_out, self.n_channels).permute(0, 2, 1, 3)
