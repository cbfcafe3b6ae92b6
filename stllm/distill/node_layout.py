"""The node layout: one sequence per (window, node) for explanations.

The node's text context (prompts/node.txt, rendered by `stllm.distill.render_node_prompt`) with its ST-tokens at
<ST_HIS> and its forecast query at <ST_PRE>, then room for the rationale. It reuses the modules of the city layout
(`STLLM.encoder`, `projector`, `pre_query`, `pre_proj`, `head`) on the whole-city batch, so a node's ST-tokens
have seen its neighbours through the encoder's graph convolution exactly as in the city layout.

Used by `stllm.explain` (greedy generation with the KV cache, fact slots filled as they come) and
`stllm.distill.student` (the joint loss).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stllm.backbone import base_model
from stllm.prompts import ST_HIS, ST_PRE, PromptError, split_slots


@dataclass
class NodeInputs:
    """A right-padded batch of node-layout sequences.

    embeds:          [B, L, d_llm] token embeddings with the slot vectors written in
    attention_mask:  [B, L] 1 on real tokens, 0 on padding
    labels:          [B, L] rationale token ids (targets), -100 on prompt and padding
    his_pos:         [B, m] positions of the <ST_HIS> tokens
    pre_pos:         [B] position of the <ST_PRE> token
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    his_pos: torch.Tensor
    pre_pos: torch.Tensor
    base: torch.Tensor | None = None   # [B, t_out, 1, C] encoder read-out added to the head's forecast


@contextmanager
def explain_adapter(model):
    """Run the backbone with the run's explain adapter (explain.own_adapter) inside the block, the forecaster's
    after it; requires_grad flags are as before. Does nothing for a run without one."""
    from stllm.model import EXPLAIN_ADAPTER
    if not model.has_explain_adapter:
        yield
        return
    backbone = model.backbone
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    backbone.set_adapter(EXPLAIN_ADAPTER)            # peft also flips requires_grad: restored below
    try:
        yield
    finally:
        backbone.set_adapter("default")
        for p, flag in flags:
            p.requires_grad_(flag)


def slot_vectors(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The vectors STLLM.forward puts into the slots, for every node of a city batch:
    his [b, N, m, d_llm] (projected ST-tokens), pre [b, N, d_llm] (the <ST_PRE> query), and the encoder's own
    read-out [b, t_out, N, C] that the head's output is added to (None without model.encoder_skip).
    Runs with data.window_norm or model.floor are refused: their forecast also passes through the window's scale
    and the naive floor (STLLM.forward), which this per-node path does not apply yet."""
    if model.cfg.data.window_norm or model.cfg.model.floor:
        raise ValueError("the explaining student and generated explanations do not support data.window_norm or "
                         "model.floor yet (their forecasts would differ from the model's); train the run without "
                         "them, or use explain.mode=analytic")
    if not model.cfg.model.lm_layout:
        raise ValueError("this run's language model reads only notes (model.lm_layout=false), never the sensors' "
                         "tokens, so it cannot explain a sensor's forecast from them; use explain.mode=analytic")
    tokens = model.encoder(batch)                                       # [b, N, k, d_enc]
    his = model.projector(tokens)                                       # [b, N, m, d_llm]
    pre = model.pre_query + model.pre_proj(tokens.mean(2))             # [b, N, d_llm]
    base = model.skip(tokens) if model.skip is not None else None       # [b, t_out, N, C]
    return his, pre, base


def tokenize_prompt(tokenizer, text: str, n_tokens: int) -> tuple[list[int], list[int], int]:
    """A node-layout prompt -> (ids with pad ids at the slots, <ST_HIS> positions [n_tokens], <ST_PRE> position)."""
    if text.count(ST_HIS) != 1 or text.count(ST_PRE) != 1:
        raise PromptError(f"a node-layout prompt needs exactly one {ST_HIS} and one {ST_PRE}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])   # BOS where the tokenizer adds one
    his_pos, pre_pos = [], -1
    for piece in split_slots(text):
        if piece == ST_HIS:
            his_pos = list(range(len(ids), len(ids) + n_tokens))
            ids += [pad] * n_tokens
        elif piece == ST_PRE:
            pre_pos = len(ids)
            ids.append(pad)
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids, his_pos, pre_pos


def target_ids(tokenizer, target: str | list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a target text and EOS. A target given as segments [(text, written_by_program)]
    (`stllm.distill.teachers.fill_facts`) is tokenized segment by segment, as `generate_with_facts` feeds it;
    the program's segments are context, labelled -100."""
    segments = [(target, False)] if isinstance(target, str) else target
    ids, labels = [], []
    for text, by_program in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += [-100] * len(piece) if by_program else piece
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def node_inputs(model, his: torch.Tensor, pre: torch.Tensor, rows: list[tuple[int, int]], prompts: list[str],
                targets: list | None = None, base: torch.Tensor | None = None) -> NodeInputs:
    """Sequences for `rows` [(window index into his/pre, node position)]: prompt, then (when given) the target
    and EOS, which alone are labelled (a target is a text, or segments whose program-written parts are not, see
    `target_ids`). his [b, N, m, d_llm], pre [b, N, d_llm], base [b, t_out, N, C] or None, from `slot_vectors`."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    m = his.shape[2]
    seqs, labels, his_pos, pre_pos = [], [], [], []
    for k, prompt in enumerate(prompts):
        ids, hp, pp = tokenize_prompt(tok, prompt, m)
        lab = [-100] * len(ids)
        if targets is not None:
            tgt, tgt_labels = target_ids(tok, targets[k])
            ids, lab = ids + tgt, lab + tgt_labels
        seqs.append(ids)
        labels.append(lab)
        his_pos.append(hp)
        pre_pos.append(pp)
    length = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (length - len(s)) for s in seqs])                  # [B, L]
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])        # [B, L]
    lab = torch.tensor([x + [-100] * (length - len(x)) for x in labels])               # [B, L]
    device = his.device
    emb = model.backbone.get_input_embeddings()(ids.to(device)).clone()                # [B, L, d_llm]
    his_pos_t, pre_pos_t = torch.tensor(his_pos, device=device), torch.tensor(pre_pos, device=device)
    w = torch.tensor([r[0] for r in rows], device=device)
    n = torch.tensor([r[1] for r in rows], device=device)
    batch_idx = torch.arange(len(rows), device=device)
    emb[batch_idx[:, None], his_pos_t] = his[w, n].to(emb.dtype)                        # [B, m, d_llm]
    emb[batch_idx, pre_pos_t] = pre[w, n].to(emb.dtype)                                 # [B, d_llm]
    node_base = None if base is None else base[w, :, n][:, :, None]                     # [B, t_out, 1, C]
    return NodeInputs(emb, mask.to(device), lab.to(device), his_pos_t, pre_pos_t, node_base)


def node_forward(model, inputs: NodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone (LoRA included) on node-layout sequences.
    Returns (hidden [B, L, d_llm], head forecast [B, t_out, 1, C] on the scaled axis, read at the slots)."""
    decoder = base_model(model.backbone).base_model                    # the transformer body, no LM head
    hidden = decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                     use_cache=False).last_hidden_state                 # [B, L, d_llm]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h_his = hidden[rows[:, None], inputs.his_pos].float()               # [B, m, d_llm]
    h_pre = hidden[rows, inputs.pre_pos].float()                        # [B, d_llm]
    forecast = model.head(h_his[:, None], h_pre[:, None])              # [B, t_out, 1, C]
    return hidden, forecast if inputs.base is None else forecast + inputs.base


def lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token on labelled (rationale) positions only; logits only where needed."""
    keep = labels[:, 1:] != -100                                        # [B, L-1]
    if not keep.any():
        return hidden.sum() * 0.0
    h = hidden[:, :-1][keep]                                            # [M, d_llm]
    logits = base_model(model.backbone).get_output_embeddings()(h)     # [M, vocab]
    return F.cross_entropy(logits.float(), labels[:, 1:][keep])


def _slot_ok(text: str, allowed: dict[str, str]) -> bool:
    """Whether the slot names in `text` (the text since the last slot) stay within `allowed` {name: the text that
    must come right before its brace ("" for any)}: no brace opened inside another, the last one a prefix of an
    allowed name or closing one."""
    i = text.rfind("{")
    if i < 0:
        return True
    if text.rfind("}", 0, i) < text.rfind("{", 0, i):                # a brace opened inside an open one
        return False
    inside, before = text[i + 1:], text[:i]
    if "}" in inside:
        name = inside.split("}", 1)[0]
        return name in allowed and before.endswith(allowed[name])
    return any(name.startswith(inside) and before.endswith(need) for name, need in allowed.items())


def _next_token(logits: torch.Tensor, tok, text_of, allowed: dict[str, str] | None, top: int = 64) -> int:
    """Greedy choice; with `allowed`, the best-ranked token that keeps every slot name the model writes within
    `allowed` (`text_of(token)`: the text since the last slot with that token added): the first `top`, then all."""
    best = int(logits.argmax())
    if allowed is None or _slot_ok(text_of(best), allowed):
        return best
    for k in (min(top, logits.shape[-1]), logits.shape[-1]):
        for cand in torch.topk(logits, k).indices.tolist():
            if cand != tok.eos_token_id and _slot_ok(text_of(cand), allowed):
                return cand
    return best


@torch.inference_mode()
def generate_with_facts(model, inputs: NodeInputs, fill, max_new_tokens: int = 200,
                        allowed: dict[str, str] | None = None) -> tuple[list[tuple[str, bool]], dict]:
    """Greedy continuation of one node-layout prompt (B = 1) with the KV cache, filling fact slots as they come:
    as soon as the text the model wrote since the last slot holds a fact slot ("{recent}"; FACT_SLOT of
    `stllm.distill.teachers`), `fill(name, written)` gives the slot's text (`written`: the rationale so far, the
    program's text included), which is fed to the model as context (as in training, see `target_ids`) and
    generation goes on after it. `fill` returns None for a name it does not know; the slot then stays in the
    text as written. `allowed`: the slot names the model may write (e.g. the factors this window has), each with
    the text that must come right before it; inside a brace it then takes the best-ranked token that keeps the
    name within them (`_next_token`).

    Returns (segments [(text, written_by_program)] without the slot names and EOS, counts {"new_tokens": tokens
    the model chose, "filled_tokens": tokens the program wrote, "stopped_by": "eos" | "max_new_tokens" |
    "context"}); "context": the model's positions ran out (`context_limit`), a prompt that fills them already is a
    ValueError."""
    from stllm.distill.teachers import FACT_SLOT
    tok, backbone = model.tokenizer, model.backbone
    if inputs.embeds.shape[0] != 1:
        raise ValueError(f"generate_with_facts takes one sequence, got a batch of {inputs.embeds.shape[0]}")
    limit, length = context_limit(backbone), inputs.embeds.shape[1]
    if limit is not None and length >= limit:
        raise ValueError(f"the explanation prompt is {length} tokens, but the language model reads at most {limit} "
                         f"positions (its config's max_position_embeddings / n_positions): use a backbone with a "
                         f"longer context, or a run with a shorter data.t_in")
    out = backbone(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=True)
    segments, written, carry, n_new, n_filled = [], [], "", 0, 0
    stopped_by, cache_name = "eos", _cache_name(backbone)
    while n_new < max_new_tokens:
        nxt = _next_token(out.logits[0, -1], tok,
                          lambda t: carry + tok.decode(written + [t], skip_special_tokens=True), allowed)
        if nxt == tok.eos_token_id:
            break
        written.append(nxt)
        n_new += 1
        feed = [nxt]
        text = carry + tok.decode(written, skip_special_tokens=True)
        m = FACT_SLOT.search(text)
        if m is not None:
            fact = fill(m.group(1), "".join(t for t, _ in segments) + text[:m.start()])
            if fact is None:                                         # not a slot `fill` knows: kept as written
                segments.append((text[:m.end()], False))
            else:
                segments += [(text[:m.start()], False), (fact, True)]
                fact_ids = tok(fact, add_special_tokens=False)["input_ids"] if fact else []
                feed += fact_ids
                n_filled += len(fact_ids)
            carry, written = text[m.end():], []                      # rare: the slot's token ran past the brace
        if limit is not None and length + len(feed) > limit:        # no position left for what comes next
            stopped_by = "context"
            break
        length += len(feed)
        out = backbone(input_ids=torch.tensor([feed], device=inputs.embeds.device), use_cache=True,
                       **{cache_name: _cache_of(out)})
    segments.append((carry + tok.decode(written, skip_special_tokens=True), False))
    merged = []                                                      # one segment per run of the same writer
    for t, p in segments:
        if merged and merged[-1][1] == p:
            merged[-1] = (merged[-1][0] + t, p)
        elif t:
            merged.append((t, p))
    if stopped_by == "eos" and n_new >= max_new_tokens:
        stopped_by = "max_new_tokens"
    return merged, {"new_tokens": n_new, "filled_tokens": n_filled, "stopped_by": stopped_by}


def _cache_name(backbone) -> str:
    """The name the model's forward takes its KV cache under: `cache` (transformers from about 5.20 on, where
    `past_key_values` is deprecated) or `past_key_values` (earlier 5.x)."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return "cache" if "cache" in inspect.signature(getattr(base, "forward", base)).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache a forward returned (`cache`, or `past_key_values` in earlier 5.x)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def context_limit(backbone) -> int | None:
    """The most positions the language model reads (GPT-2's n_positions, a LLaMA's max_position_embeddings), or
    None when its config names none. Past it, learned position embeddings have no row (an IndexError deep inside
    the model) and rotary ones were never trained."""
    config = getattr(backbone, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
