"""Prompt templates: files in prompts/, rendered by one small class, turned into token layouts."""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

ST_HIS, ST_PRE = "<ST_HIS>", "<ST_PRE>"
NODES_OPEN, NODES_CLOSE = "<NODES>", "</NODES>"
WHEN = "<WHEN>"   # the window's calendar as text (stllm.data.calendar.window_text), one per window
PROMPTS_DIR = Path(os.environ.get("STLLM_PROMPTS", Path(__file__).resolve().parent.parent / "prompts"))


class PromptError(ValueError):
    """A template is missing, malformed, or a field is not given."""


@dataclass
class PromptTemplate:
    name: str
    text: str

    @classmethod
    def load(cls, name: str, directory: str | Path | None = None) -> "PromptTemplate":
        path = Path(directory or PROMPTS_DIR) / f"{name}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in Path(directory or PROMPTS_DIR).glob("*.txt"))
            raise PromptError(f"prompt template {name!r} not found at {path}; known templates: {known}")
        return cls(name, path.read_text())

    @property
    def fields(self) -> list[str]:
        return sorted({f for _, f, _, _ in string.Formatter().parse(self.text) if f})

    def render(self, **fields) -> str:
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise PromptError(f"prompt {self.name!r}: missing field(s) {missing}")
        return self.text.format(**fields)


@dataclass
class CityLayout:
    """Token layout of a city-layout prompt for N nodes with k ST-tokens each.

    ids:          [L] token ids; slot positions hold the pad id and are overwritten with vectors
    his_pos:      [N, k] sequence positions of each node's <ST_HIS> tokens
    pre_pos:      [N] sequence position of each node's <ST_PRE> token
    when_pos:     [W] positions reserved for the window's calendar text (the <WHEN> slot of the instruction;
                  empty without one). Each window's text fills them from the left; the rest are padding that
                  the model masks out and skips in the position ids, so the padding changes nothing.
    position_ids: [L] positions the model sees: every node block starts right after the instruction
    mask:         [L, L] bool, True where query i may attend to key j: the instruction causally, and a
                  node block causally within itself. No node sees another node in the language model
                  (the encoder's graph convolution already mixed them), so a node's output does not depend
                  on how many nodes share its sequence or in which order. With cross_node=True every token
                  of a node block may also attend to the <ST_HIS> tokens of every other node in the sequence
                  (all of them, whatever their order: a node's output depends on the set of nodes it shares
                  the sequence with, not on their order).
    """

    ids: torch.Tensor
    his_pos: torch.Tensor
    pre_pos: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    when_pos: torch.Tensor = torch.zeros(0, dtype=torch.long)


def city_layout(text: str, tokenizer, n_nodes: int, n_tokens: int, cross_node: bool = False,
                when_tokens: int = 0) -> CityLayout:
    """Tokenize a rendered city prompt once; the <NODES> block is repeated n_nodes times. cross_node: node
    blocks also see the other nodes' <ST_HIS> tokens (see CityLayout.mask). when_tokens: positions reserved
    for the <WHEN> slot, if the instruction has one."""
    if text.count(NODES_OPEN) != 1 or text.count(NODES_CLOSE) != 1:
        raise PromptError(f"a city-layout prompt needs exactly one {NODES_OPEN}...{NODES_CLOSE} block")
    head, rest = text.split(NODES_OPEN)
    block, tail = rest.split(NODES_CLOSE)
    if tail.strip():
        raise PromptError(f"a city-layout prompt must end with {NODES_CLOSE}; found text after it: {tail.strip()!r}")
    if block.count(ST_HIS) != 1 or block.count(ST_PRE) != 1:
        raise PromptError(f"the {NODES_OPEN} block must hold exactly one {ST_HIS} and one {ST_PRE}, got {block!r}")
    if WHEN in block or head.count(WHEN) > 1:
        raise PromptError(f"a city-layout prompt may hold one {WHEN} slot, in the instruction before {NODES_OPEN}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encode = lambda s, special=False: tokenizer(s, add_special_tokens=special)["input_ids"] if s else []

    # The block as segments: ("text", ids) or ("his"|"pre", n)
    segments = []
    for piece in split_slots(block):
        if piece == ST_HIS:
            segments.append(("his", n_tokens))
        elif piece == ST_PRE:
            segments.append(("pre", 1))
        else:
            segments.append(("text", encode(piece)))

    before, _, after = head.partition(WHEN)
    ids = list(encode(before, special=True))
    when_pos = []
    if WHEN in head:
        when_pos = list(range(len(ids), len(ids) + when_tokens))
        ids += [pad] * when_tokens + encode(after)
    n_head = len(ids)
    his_pos, pre_pos, block_of = [], [], [-1] * n_head
    for node in range(n_nodes):
        for kind, value in segments:
            if kind == "text":
                ids += value
                block_of += [node] * len(value)
            elif kind == "his":
                his_pos.append(list(range(len(ids), len(ids) + value)))
                ids += [pad] * value
                block_of += [node] * value
            else:
                pre_pos.append(len(ids))
                ids.append(pad)
                block_of.append(node)
    block = torch.tensor(block_of)
    block_len = (len(ids) - n_head) // max(n_nodes, 1)
    position_ids = torch.cat([torch.arange(n_head), n_head + torch.arange(block_len).repeat(n_nodes)])
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    same_block = block[:, None] == block[None, :]
    to_head = (block[None, :] == -1).expand(len(ids), -1)
    mask = causal & (same_block | to_head)
    if cross_node and his_pos:
        is_his = torch.zeros(len(ids), dtype=torch.bool)
        is_his[torch.tensor(his_pos).reshape(-1)] = True
        mask |= (block[:, None] >= 0) & is_his[None, :]          # node tokens -> every node's history tokens
    return CityLayout(torch.tensor(ids), torch.tensor(his_pos), torch.tensor(pre_pos), position_ids, mask,
                      torch.tensor(when_pos, dtype=torch.long))


def split_slots(text: str) -> list[str]:
    """'a<ST_HIS>b<ST_PRE>' -> ['a', '<ST_HIS>', 'b', '<ST_PRE>'] (empty pieces dropped)."""
    out, buf = [], text
    while buf:
        cut = min((buf.find(s), s) for s in (ST_HIS, ST_PRE) if s in buf) if any(s in buf for s in (ST_HIS, ST_PRE)) else None
        if cut is None:
            out.append(buf)
            break
        pos, slot = cut
        if pos:
            out.append(buf[:pos])
        out.append(slot)
        buf = buf[pos + len(slot):]
    return out
