"""Graph convolution on static and dynamic graphs, gated fusion, and the data-driven dynamic graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GraphConv(nn.Module):
    """H = LeakyReLU(A X W). A: [N, N] or [b, N, N]; X: [b, N, k, d] -> [b, N, k, d]."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        eq = "nm,bmkd->bnkd" if adj.dim() == 2 else "bnm,bmkd->bnkd"
        return F.leaky_relu(torch.einsum(eq, adj, self.lin(x)), 0.1)


class GraphFusion(nn.Module):
    """Z = sigmoid(H_st W1 + H_dy W2); H = (Z * H_st W1 + (1 - Z) * H_dy W2) W_bar."""

    def __init__(self, d: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(d))
        self.w_bar = nn.Linear(d, d)

    def forward(self, h_static: torch.Tensor, h_dynamic: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(h_static), self.w2(h_dynamic)
        z = torch.sigmoid(a + b + self.bias)
        return self.w_bar(z * a + (1 - z) * b)


class DataGraph(nn.Module):
    """Data-driven dynamic graph from the current window: softmax of scaled dot products of node summaries.

    x: [b, N, k, d] -> A [b, N, N], rows sum to 1. No node-indexed parameters.
    """

    def __init__(self, d: int, d_key: int = 32):
        super().__init__()
        self.q, self.k = nn.Linear(d, d_key), nn.Linear(d, d_key)
        self.scale = d_key ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(2)                                                    # [b, N, d]
        logits = torch.einsum("bnd,bmd->bnm", self.q(s), self.k(s)) * self.scale
        return torch.softmax(logits, dim=-1)


class SpatialBlock(nn.Module):
    """Static and dynamic graph convolutions fused by a gate, added to the input (residual)."""

    def __init__(self, d: int, use_static: bool, dynamic: str, dropout: float = 0.0):
        super().__init__()
        self.static = GraphConv(d) if use_static else None
        self.dynamic = GraphConv(d) if dynamic != "none" else None
        self.data_graph = DataGraph(d) if dynamic in ("auto", "data") else None
        self.fusion = GraphFusion(d) if (self.static is not None and self.dynamic is not None) else None
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, static_adj: torch.Tensor | None, dynamic_adj: torch.Tensor | None) -> torch.Tensor:
        h_st = self.static(x, static_adj) if self.static is not None and static_adj is not None else None
        h_dy = None
        if self.dynamic is not None:
            if dynamic_adj is None and self.data_graph is not None:
                dynamic_adj = self.data_graph(x)
            if dynamic_adj is not None:
                h_dy = self.dynamic(x, dynamic_adj)
        if h_st is not None and h_dy is not None and self.fusion is not None:
            h = self.fusion(h_st, h_dy)
        else:
            h = h_st if h_st is not None else h_dy
        return x if h is None else self.norm(x + self.dropout(h))
