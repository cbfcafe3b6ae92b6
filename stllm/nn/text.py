"""Text the encoder cannot read: notes (dated text about places) and node names, read by the language model.

Routing is the program's job, reading is the language model's (DESIGN.md, "Text the encoder cannot read"):
`PreparedCity` says which note holds at which step and node (`note_cover`); the language model reads each note once
(`TextReader`: mean-pooled hidden states of the frozen backbone, adapters off, cached by text), and `NoteEffect`
turns what it read into a change of the forecast at exactly the nodes and steps the note covers.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

N_KIND_BUCKETS = 64   # the flags control: a note's kind hashed into one of this many one-hot buckets


class TextReader:
    """Pooled hidden states of texts, computed once per text by the frozen backbone (LoRA adapters off, so the
    states never change during training and the cache stays valid). Not a module: it holds no weights."""

    def __init__(self, backbone, tokenizer):
        self.backbone, self.tokenizer = backbone, tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[J] texts -> [J, d_llm] float32 states (layer-normalised mean over the text's tokens)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for text in todo:
            self.cache[text] = self._read(text)
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0, 0)

    def _read(self, text: str) -> torch.Tensor:
        from stllm.backbone import base_model
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        body = base_model(self.backbone)
        device = next(body.parameters()).device
        with _adapters_off(self.backbone), torch.inference_mode(False):
            hidden = body.base_model(input_ids=ids.to(device), use_cache=False).last_hidden_state[0]   # [L, d_llm]
        state = hidden.float().mean(0)
        # Pooled states of causal LMs have a few huge dimensions; normalising keeps every text on one scale.
        return F.layer_norm(state, state.shape).cpu()


class _adapters_off:
    """Context manager: the backbone's LoRA adapters disabled (peft), or nothing for a plain model."""

    def __init__(self, backbone):
        self.ctx = backbone.disable_adapter() if hasattr(backbone, "disable_adapter") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def kind_flags(kinds: list[str]) -> torch.Tensor:
    """[J] kinds -> [J, N_KIND_BUCKETS] one-hot flags (a stable hash of the lower-cased kind): the same facts a
    note's kind gives, as features, without reading any words."""
    out = torch.zeros(len(kinds), N_KIND_BUCKETS)
    for j, kind in enumerate(kinds):
        out[j, zlib.crc32(kind.strip().lower().encode()) % N_KIND_BUCKETS] = 1.0
    return out


class NoteEffect(nn.Module):
    """Notes -> a change of the forecast where and when they hold.

    Each note's vector (its pooled text state, or its kind flags) is projected to `d`; per node and forecast step
    the vectors of the notes that hold there are summed, and so are those that held during the history; an MLP
    turns both into a multiplicative gate g and an additive term a per channel:

        y = y_base + g * (y_base + level) + a        (scaled axis; y_base + level is the raw forecast / std)

    so "twice the usual flow" is one number g = 1 whatever the node's scale. The last layer starts at zero:
    untrained, the effect is exactly nothing.
    """

    def __init__(self, d_in: int, d: int, t_in: int, n_channels: int):
        super().__init__()
        self.t_in, self.n_channels = t_in, n_channels
        self.proj = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))
        # No biases: where no note holds, the input is zero and so is the effect (GELU(0) = 0).
        self.mlp = nn.Sequential(nn.Linear(2 * d, d, bias=False), nn.GELU(), nn.Linear(d, 2 * n_channels, bias=False))
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, y: torch.Tensor, vectors: torch.Tensor, cover: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """y [b, t_out, N, C] scaled forecast; vectors [J, d_in]; cover [b, t_in + t_out, N, J]; level [N|1, C]."""
        if vectors.shape[0] == 0:
            return y
        v = self.proj(vectors.to(y.device, y.dtype))                       # [J, d]
        cover = cover.to(y.device, y.dtype)
        fut = torch.einsum("btnj,jd->btnd", cover[:, self.t_in:], v)     # [b, t_out, N, d]
        his = torch.einsum("bnj,jd->bnd", cover[:, :self.t_in].mean(1), v)  # [b, N, d]
        h = torch.cat([fut, his[:, None].expand_as(fut)], -1)            # [b, t_out, N, 2d]
        gate, add = self.mlp(h).split(self.n_channels, -1)               # [b, t_out, N, C] each
        return y + gate * (y + level.to(y.device, y.dtype)) + add
