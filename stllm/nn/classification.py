"""Event classification head (e.g. crime occurrence per cell and category) and its loss.

The head reads the same hidden states as `RegressionHead` and returns logits; `sigmoid(logits)` is the probability
that at least one event of category k happens in node n at horizon step h. Metrics: `stllm.events`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from stllm.nn.heads import RegressionHead


class ClassificationHead(RegressionHead):
    """logits = W3 [ReLU(W1 H_his), ReLU(W2 H_pre)], the regression head's structure with K categories out.

    h_his: [b, N, k, d_llm] hidden states at a node's <ST_HIS> positions; h_pre: [b, N, d_llm] at its <ST_PRE>.
    Returns logits [b, t_out, N, K].
    """

    def __init__(self, d_llm: int, n_tokens: int, t_out: int, n_categories: int, hidden: int = 256):
        super().__init__(d_llm, n_tokens, t_out, n_categories, hidden)
        self.n_categories = n_categories

    @torch.no_grad()
    def set_prior(self, rates: Sequence[float] | torch.Tensor) -> None:
        """Start the output bias at logit(rate) per category [K], so training starts from the base rates
        instead of 50 % (events are rare in some categories). The output layer's weights are left as they are."""
        p = torch.as_tensor(rates, dtype=self.w3.bias.dtype, device=self.w3.bias.device).clamp(1e-4, 1 - 1e-4)
        if p.shape != (self.n_categories,):
            raise ValueError(f"set_prior needs one rate per category ({self.n_categories}), got shape {tuple(p.shape)}")
        self.w3.bias.copy_(torch.logit(p).repeat(self.t_out))  # w3's outputs are ordered (t_out, K)


def event_loss(logits: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None = None,
               pos_weight: float | Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against "at least one event" (counts > 0), averaged over scored entries.

    logits, counts: [b, t_out, N, K] (0/1 labels work as counts). NaN counts are not scored. mask: optional,
    broadcastable to logits, True / 1 = scored (fractional values weight entries). pos_weight: a float or one per
    category [K], multiplying the loss of positive targets (torch's `pos_weight`; (1 - rate) / rate balances a
    category with event rate `rate`). A batch with nothing scored gives 0 (with a gradient), not NaN.
    """
    if logits.shape != counts.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, counts {tuple(counts.shape)}; they must match")
    counts = counts.to(logits.device)
    target = (counts > 0).to(logits.dtype)
    weight = (~torch.isnan(counts)).to(logits.dtype)
    if mask is not None:
        weight = weight * torch.as_tensor(mask, device=logits.device).to(logits.dtype)
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def positive_weight(rates: Any, max_weight: float = 100.0) -> torch.Tensor:
    """[K] `pos_weight` that balances positives and negatives: (1 - rate) / rate per category, capped."""
    r = torch.as_tensor(rates, dtype=torch.float32).clamp_min(1.0 / max_weight / 2)
    return ((1 - r) / r).clamp(max=max_weight)
