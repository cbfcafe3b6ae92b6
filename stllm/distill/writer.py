"""The writer: a language model that writes the whole rationale itself, facts and numbers included.

What it reads: the data sheet (`data_sheet`, in prompts/sheet.txt), the facts of one window computed from the data
as terse lines of numbers with their up / down / flat labels ("Trend: 230.0 to 150.0, change -80.0, -35%, down"),
ending with the direction of the forecast it explains ("Forecast direction: down", the regression head's at explain
time, the true future's in training). What it writes: the five-stage rationale in the analytic teacher's words
(`render_rationale`), every sentence of it: which facts to state and how ("fell by 80.0 trips (-35%), from 230.0 to
150.0"), the relations ("higher than at the same hour yesterday"), which factors push which way, how they balance,
and the conclusion. The checker tests each of its claims like any other text, and all of them are the model's
("by": "model"); only the forecast numbers are the program's: the writer writes FORECAST_SLOT ("{forecast}") and
the program puts the regression head's numbers there (`stllm.explain`).

Numbers are copied, not computed (`explain.copy_numbers`, default on): while the writer writes a number, the
decoding lets it pick only digits that continue a number of its prompt (`CopyNumbers`, a transformers
LogitsProcessor). Which number goes where, and every word around it, stays the model's choice, so a number put in
the wrong place is a failed claim like any other. It repeats neither a sentence nor a long run of its own text
(`NoRepeats`).

Decoding is greedy and checked against a draft (`explain.draft`, default on; `drafted_greedy`): the analytic
teacher's text for the same facts, 32 tokens read per forward pass, each kept only while it is the writer's own
greedy choice. The text is the one token-by-token decoding writes (tested); it takes ~5x less time on CPU.

The writer is its own causal language model: the run's backbone cut to `explain.writer_layers` blocks (0: all of
them, for SmolLM2-135M its 30) with a LoRA adapter of its own, saved in `<run>/writer/` (writer.json and peft's
adapter/) and loaded only when an explanation is generated (`Writer.from_pretrained`). The forecaster is not
touched. It is trained (`train_writer`) with cross-entropy on the rationale tokens (the sheet's tokens labelled
-100), stepping through `stllm.loop.Loop` like every training in stllm.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

from stllm import checkpoint
from stllm.data.city import CityData
from stllm.distill.facts import NOTE_DURING, Facts, compute_facts, forecast_direction, future_facts, note_quote
from stllm.distill.teachers import (FORECAST_SLOT, fmt, fmt_pct, fmt_signed, history_text, horizon_text,
                                    render_rationale)
from stllm.prompts import PromptTemplate

WRITER_DIR = "writer"          # the writer's folder inside a run
WRITER_META = "writer.json"    # its backbone config (BackboneConfig fields, n_layers = its depth)
ADAPTER = "adapter"            # its LoRA, as peft writes it
DRAFT_TOKENS = 32              # draft tokens a pass of drafted decoding checks (16: ~1.4x the time on NYC taxi)


# ---------------------------------------------------------------------------------------------- the sheet


def _pct(p: float | None) -> str:
    return "" if p is None else f", {fmt_pct(p)}"


def sheet_lines(facts: Facts, direction: str | None) -> list[str]:
    """The facts of one window as the writer reads them: numbers with their labels, in the order the rationale
    states them (lines and the items of each line), and the direction of the forecast it explains."""
    cal, unit = facts.calendar, facts.unit or "no unit"
    lines = [f"Sensor: {facts.node_name}. Channel: {facts.channel} ({unit}).",
             f"Forecast: the next {horizon_text(facts)}, from {cal.target_start} to {cal.target_end}, {cal.weekday}, "
             f"{'weekend' if cal.is_weekend else 'weekday'}.",
             f"History: the last {history_text(facts)}."]
    for w in facts.weather:
        u = f" {w.unit}" if w.unit else ""
        effect = "" if w.effect is None else f", effect {fmt_signed(w.effect)}"
        lines.append(f"Weather: {w.label} {w.direction}, change {fmt_signed(w.change)}{u}, from {fmt(w.first)} to "
                     f"{fmt(w.last)}{u}{effect}.")
    if facts.wind is not None:
        lines.append(f"Wind: {'steady' if facts.wind.steady else 'turned'}, from {facts.wind.first} to "
                     f"{facts.wind.last}.")
    if not facts.weather and facts.wind is None:
        lines.append("Weather: not recorded.")
    for n in facts.notes:
        effect = "" if n.effect is None else f", effect {fmt_signed(n.effect)}"
        lines.append(f'Note: {n.kind}, during {NOTE_DURING[n.during]}, "{note_quote(n.text)}"{effect}.')
    tr = facts.trend
    lines.append("Trend: too few readings." if tr is None else
                 f"Trend: {tr.direction}, change {fmt_signed(tr.change)}{_pct(tr.percent)}, from {fmt(tr.first)} "
                 f"to {fmt(tr.last)}.")
    if facts.last_value is not None:
        lines.append(f"Latest: {fmt(facts.last_value)} at {facts.last_time[-5:]}.")
    for p in (facts.yesterday, facts.last_week):
        if p is None:
            continue
        parts = []
        if p.reference is not None and p.diff is not None:
            parts.append(f"{p.relation}, difference {fmt_signed(p.diff)}{_pct(p.percent)}, same hour "
                         f"{fmt(p.reference)}")
        if p.ahead_mean is not None and p.ahead_relation is not None:
            parts.append(f"same hours ahead {fmt(p.ahead_mean)}, {p.ahead_relation}")
        if parts:
            lines.append(f"{p.label[:1].upper()}{p.label[1:]}: {'; '.join(parts)}.")
    nb = facts.neighbours
    if nb is not None and nb.mean_change is not None:
        lines.append(f"Nearest: {len(nb.names)} ({', '.join(nb.names)}), {nb.direction}, mean change "
                     f"{fmt_signed(nb.mean_change)}{_pct(nb.mean_percent)}.")
    lines.append(f"Forecast direction: {direction or 'unknown'}.")
    return lines


def data_sheet(facts: Facts, direction: str | None, template: str = "sheet") -> str:
    """The writer's prompt (prompts/sheet.txt with `sheet_lines`)."""
    return PromptTemplate.load(template).render(facts="\n".join(sheet_lines(facts, direction)))


@dataclass
class WriterSample:
    prompt: str       # the data sheet, with the true future's direction
    target: str       # the analytic teacher's rationale, FORECAST_SLOT kept


def writer_samples(city: CityData, pairs: list[tuple[int, int]], t_in: int, t_out: int, channel: int = 0,
                   effects=None, note_effects=None) -> list[WriterSample]:
    """The writer's training pairs for (start, node) windows: the sheet and the rationale, both concluding in the
    true future's direction. note_effects(node, start) -> {kind: effect} (what a forecaster's notes did; None: no
    note is a factor)."""
    out = []
    for s, i in pairs:
        moved = note_effects(i, s) if note_effects is not None else None
        facts = compute_facts(city, i, s, t_in=t_in, t_out=t_out, effects=effects, channel=channel,
                              note_effects=moved)
        future = future_facts(city, i, s, t_out=t_out, t_in=t_in, channel=channel)
        direction = forecast_direction(facts.last_value, future.values)
        out.append(WriterSample(data_sheet(facts, direction), render_rationale(facts, future.values, fill=False)))
    return out


# ------------------------------------------------------------------------------------- copying numbers

NUMBER = re.compile(r"\d+(?:[.:]\d+)*")           # 12, 12.3, 08:00 (a sign is a word the model chooses)
OPEN_NUMBER = re.compile(r"\d+(?:[.:]\d+)*[.:]?$")
LEADING_NUMBER = re.compile(r"^\d+(?:[.:]\d+)*[.:]?")


def numbers_in(text: str) -> set[str]:
    return set(NUMBER.findall(text))


def consistent(text: str, allowed: set[str], prefixes: set[str]) -> bool:
    """Whether every number in `text` is one of `allowed`, the one at its end (perhaps followed by "." or ":",
    which may be a decimal point or punctuation) one of them or on its way to one (`prefixes`)."""
    for m in NUMBER.finditer(text):
        rest = text[m.end():]
        if not rest:
            if m.group() not in prefixes:
                return False
        elif rest in (".", ":"):
            if m.group() + rest not in prefixes and m.group() not in allowed:
                return False
        elif m.group() not in allowed:
            return False
    return True


def number_tokens(tokenizer) -> tuple[dict[int, str], dict[int, str]]:
    """The tokens that hold a digit, and those (without one) that start with "." or ":", each with its text."""
    vocab = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    numeric = {i: t for i, t in vocab.items() if any(ch.isdigit() for ch in t)}
    return numeric, {i: t for i, t in vocab.items() if t[:1] in ".:" and i not in numeric}


class CopyNumbers(LogitsProcessor):
    """Decoding in which every number the model writes is a number of `source` (the sheet's facts): at each step,
    tokens that would make a number that is not in it (or not on its way to one) are ruled out, and while a number
    is unfinished only tokens that go on with it may come. A number at the start of a line (a stage's) is free.
    Everything else is the model's choice."""

    def __init__(self, tokenizer, source: str, prompt_len: int, index: tuple[dict, dict] | None = None):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.allowed = numbers_in(source)
        self.prefixes = {a[:k] for a in self.allowed for k in range(1, len(a) + 1)}
        self.numeric, self.dotted = index if index is not None else number_tokens(tokenizer)
        self.either = {**self.numeric, **self.dotted}      # the tokens that may go on with an open number

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for r in range(input_ids.shape[0]):
            new = input_ids[r, self.prompt_len:]
            tail = self.tokenizer.decode(new[-12:].tolist())
            m = OPEN_NUMBER.search(tail)
            start = tail[m.start():] if m else ""
            whole = len(new) <= 12                  # the tail is all the model has written
            if (not m and (tail.endswith("\n") or not tail)) or \
                    (m and (tail[:m.start()].endswith("\n") or (m.start() == 0 and whole))):
                # a stage's number at the start of a line ("4. Factors:") is free; what follows it is not
                ok = lambda t: consistent(LEADING_NUMBER.sub("", start + t, count=1),  # noqa: E731
                                          self.allowed, self.prefixes)
                scores[r, [i for i, t in self.either.items() if not ok(t)]] = -math.inf
                continue
            ok = lambda t: consistent(start + t, self.allowed, self.prefixes)  # noqa: E731
            banned = [i for i, t in self.numeric.items() if not ok(t)]
            if start and not (start.rstrip(".:") in self.allowed):       # unfinished: only what goes on with it
                keep = [i for i, t in self.either.items() if ok(t)]
                row = torch.full_like(scores[r], -math.inf)
                row[keep] = scores[r, keep]
                scores[r] = row
                continue
            banned += [i for i, t in self.dotted.items() if not ok(t)]
            scores[r, banned] = -math.inf
        return scores


SENTENCE_END = re.compile(r"(?<=[.;])\s+|\n")     # a sentence (or clause) ends at "." or ";" before a space


def sentence_enders(tokenizer) -> dict[str, list[int]]:
    """The tokens that end a sentence, by their text without trailing space (".": [".", ".\n", ...], ";": ...)."""
    enders: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i]).rstrip()
        if t and t[-1] in ".;":
            enders.setdefault(t, []).append(i)
    return enders


class NoRepeats(LogitsProcessor):
    """Decoding in which the writer repeats neither a sentence nor a run of `longest` tokens of its own text: the
    token that would finish a sentence equal to one already written (its "." or ";"), or that would end the
    second copy of a `longest`-token run, is ruled out. The teacher's rationales do neither (tested on real data),
    and a writer that starts a loop ("It is 1.0 at 03:00. It is 1.0 at 03:00. ...", or the same with commas) has
    to write something else instead of looping to the token bound.
    Only the written text counts: copying a long line of the sheet is not a repeat."""

    def __init__(self, tokenizer, prompt_len: int, enders: dict[str, list[int]] | None = None, longest: int = 32):
        self.tokenizer, self.prompt_len, self.longest = tokenizer, prompt_len, longest
        self.enders = enders if enders is not None else sentence_enders(tokenizer)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for r in range(input_ids.shape[0]):
            new = input_ids[r, self.prompt_len:].tolist()
            parts = SENTENCE_END.split(self.tokenizer.decode(new))
            written, current = {p.strip() for p in parts[:-1]}, parts[-1].lstrip()
            banned = [i for s in written if s.startswith(current) and len(s) > len(current)
                      for i in self.enders.get(s[len(current):], [])]
            n = self.longest
            if len(new) >= n:
                tail = new[len(new) - n + 1:]
                banned += [new[j + n - 1] for j in range(len(new) - n + 1) if new[j:j + n - 1] == tail]
            scores[r, banned] = -math.inf
        return scores


# ------------------------------------------------------------------------------------- drafted decoding


@dataclass
class Draft:
    """A text the writer's greedy decoding is checked against (`drafted_greedy`), and what checking it did."""
    ids: list[int]            # the draft's tokens
    tokens: int = DRAFT_TOKENS  # draft tokens checked per forward pass
    passes: int = 0           # forward passes after the prompt's
    accepted: int = 0         # draft tokens that were the writer's own choice


def draft_position(draft: list[int], written: list[int], near: int, longest: int = 4) -> int | None:
    """Where the draft goes on after `written`: 0 before anything is written, else just past the last `longest`
    (or fewer) written tokens where they occur in the draft (the occurrence nearest to `near`, at or after it
    preferred); None when not even the last token occurs in it."""
    if not written:
        return 0
    for n in range(min(longest, len(written)), 0, -1):
        tail = written[-n:]
        ends = [j + n for j in range(len(draft) - n + 1) if draft[j:j + n] == tail]
        if ends:
            return min(ends, key=lambda e: (e < near, abs(e - near)))
    return None


def drafted_greedy(model, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList, stopping_criteria,
                   generation_config, draft: Draft, **model_kwargs) -> torch.LongTensor:
    """Greedy decoding that checks a draft instead of guessing one token per pass (speculative decoding with a
    text for the draft; a `custom_generate` for transformers' `generate`). Each forward pass reads the last
    written token and the next `draft.tokens` tokens of the draft; the model's own greedy choice (after
    `logits_processor`) at each position is kept while it equals the draft's token, and its choice at the first
    difference ends the pass. Every token is the model's choice from the text before it, so the text is the same
    as one-token-at-a-time greedy decoding (tests/test_writer.py); a good draft only makes it take fewer passes.
    Batch size 1."""
    from transformers import DynamicCache
    if input_ids.shape[0] != 1:
        raise ValueError(f"drafted decoding writes one text at a time; got a batch of {input_ids.shape[0]}")
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:                          # the prompt but its last token, which each pass reads
        model(input_ids=input_ids[:, :-1], cache=cache, use_cache=True)
    seq, start, at = input_ids, input_ids.shape[1], 0
    while True:
        found = draft_position(draft.ids, seq[0, start:].tolist(), at)
        at = at if found is None else found
        guess = [] if found is None else draft.ids[found:found + draft.tokens]
        x = torch.cat([seq[:, -1:], torch.tensor([guess], dtype=seq.dtype, device=seq.device)], dim=1)
        logits = model(input_ids=x, cache=cache, use_cache=True).logits[0].float()
        draft.passes += 1
        for j in range(len(guess) + 1):
            scores = logits_processor(seq, logits[j:j + 1])
            token = scores.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
            if stopping_criteria(seq, scores).all():
                return seq
            if j == len(guess) or token.item() != guess[j]:
                break
            draft.accepted += 1
        unread = cache.get_seq_length() - (seq.shape[1] - 1)   # draft tokens after the first difference
        if unread > 0:
            cache.crop(-unread)


# ---------------------------------------------------------------------------------------------- the model


class Writer(torch.nn.Module):
    """A causal language model with its own LoRA adapter that writes rationales from data sheets."""

    def __init__(self, lm, tokenizer, backbone):
        super().__init__()
        self.lm, self.tokenizer, self.backbone_cfg = lm, tokenizer, backbone
        self._number_tokens = None                   # number_tokens(tokenizer), on first use
        self._enders = None                          # sentence_enders(tokenizer), on first use

    @classmethod
    def build(cls, backbone, layers: int = 0) -> "Writer":
        """The backbone `backbone` (a BackboneConfig) cut to `layers` blocks (0: all), with a fresh LoRA."""
        from stllm.backbone import build_backbone
        cfg = dataclasses.replace(backbone, n_layers=layers or None)
        if cfg.lora_r <= 0:
            raise ValueError("the writer trains a LoRA adapter: backbone.lora_r must be > 0")
        lm, tokenizer = build_backbone(cfg)
        return cls(lm, tokenizer, cfg)

    @classmethod
    def from_pretrained(cls, folder: str | Path, merge: bool = True) -> "Writer":
        """A writer `save_pretrained` wrote (folder: writer.json and adapter/), in eval mode. merge=True folds the
        LoRA into the weights (peft's merge_and_unload): the same text, ~12% faster on CPU, no more training."""
        from peft import PeftModel

        from stllm.backbone import BackboneConfig, build_base_model
        folder = Path(folder)
        meta = checkpoint.read_json(folder / WRITER_META, folder)
        try:
            cfg = BackboneConfig(**meta["backbone"])
        except (KeyError, TypeError, ValueError) as err:
            raise checkpoint.DamagedRun(f"{folder / WRITER_META} is damaged ({err}); train the writer again") from err
        base, tokenizer = build_base_model(cfg)
        with warnings.catch_warnings():      # peft 0.21 calls a transformers method deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            lm = PeftModel.from_pretrained(base, str(folder / ADAPTER))
        return cls(lm.merge_and_unload() if merge else lm, tokenizer, cfg).eval()

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with checkpoint.replacing(folder / ADAPTER) as tmp:
            self.lm.save_pretrained(str(tmp))
        meta = {"backbone": dataclasses.asdict(self.backbone_cfg), **(extra or {})}
        checkpoint.atomic_write_text(folder / WRITER_META, json.dumps(meta, indent=1))

    @property
    def n_layers(self) -> int:
        from stllm.backbone import n_layers
        return n_layers(self.lm)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    raise ValueError(f"{source}: {name} is not a weight of this writer")
                own[name].copy_(value)

    # ---- training ----
    def encode(self, samples: list[WriterSample]) -> dict[str, torch.Tensor]:
        """Sheet + rationale + EOS per sample, right-padded; labels -100 on the sheet and the padding."""
        tok = self.tokenizer
        rows = []
        for x in samples:
            p = tok(x.prompt, add_special_tokens=False)["input_ids"]
            t = tok(x.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((p + t, [-100] * len(p) + t))
        width = max(len(ids) for ids, _ in rows)
        pad = tok.pad_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        device = next(self.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def loss(self, samples: list[WriterSample]) -> tuple[torch.Tensor, dict]:
        out = self.lm(**self.encode(samples))
        return out.loss, {"lm": out.loss.item()}

    # ---- writing ----
    @torch.inference_mode()
    def write(self, prompt: str, max_new_tokens: int = 480, copy_numbers: bool = True,
              numbers_from: str | None = None, draft: str | None = None,
              draft_tokens: int = DRAFT_TOKENS) -> tuple[str, dict]:
        """Greedy text after `prompt`, up to and with FORECAST_SLOT (or EOS, or max_new_tokens), with the KV cache;
        no sentence or long run of tokens twice (`NoRepeats`); with copy_numbers every number it writes is one of
        `numbers_from` (default: the prompt; `explain` passes the sheet's facts, without the instruction line).
        With a `draft` (`explain` passes the analytic teacher's text for the same facts) decoding checks
        `draft_tokens` of it per pass (`drafted_greedy`): the same text, in fewer passes. Returns (text, generation
        counts and timing)."""
        tok = self.tokenizer
        device = next(self.parameters()).device
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if copy_numbers and self._number_tokens is None:
            self._number_tokens = number_tokens(tok)
        source = prompt if numbers_from is None else numbers_from
        if self._enders is None:
            self._enders = sentence_enders(tok)
        processors = LogitsProcessorList([NoRepeats(tok, ids.shape[1], self._enders)] +
                                         ([CopyNumbers(tok, source, ids.shape[1], self._number_tokens)]
                                          if copy_numbers else []))
        stop = StoppingCriteriaList([StopStringCriteria(tok, [FORECAST_SLOT])])
        checked = Draft(tok(draft, add_special_tokens=False)["input_ids"], draft_tokens) if draft else None
        t0 = time.perf_counter()
        out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, logits_processor=processors, stopping_criteria=stop,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               **({"custom_generate": drafted_greedy, "draft": checked} if checked else {}))
        seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        if FORECAST_SLOT in text:
            text = text[:text.index(FORECAST_SLOT) + len(FORECAST_SLOT)]
            stopped = "forecast_slot"
        else:
            stopped = "eos" if new and new[-1] == tok.eos_token_id else "max_new_tokens"
        drafting = {"draft_passes": checked.passes, "draft_accepted": checked.accepted} if checked else {}
        return text, {"form": "written", "writer_layers": self.n_layers, "copy_numbers": copy_numbers,
                      "drafted": checked is not None, **drafting,
                      "new_tokens": len(new), "filled_tokens": 0, "prompt_tokens": int(ids.shape[1]),
                      "seconds": round(seconds, 3), "tokens_per_s": round(len(new) / max(seconds, 1e-9), 2),
                      "stopped_by": stopped}


def train_writer(writer: Writer, samples: list[WriterSample], train_cfg, out: str | Path,
                 batch_size: int = 1, steps: int = 0, minutes: float = 0.0, lr: float = 2e-3,
                 resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune the writer's LoRA on `samples` with AdamW at `lr` through the text stages' loop
    (`stllm.distill.student.fit_samples`: `batch_size` samples per micro-batch, `steps` optimizer steps (0: one
    pass) or `minutes`, each step logged to out/log.jsonl and checkpointed to out's LAST, so `resume` continues it
    exactly). Returns {"steps", "wall_s", "stopped_by", "last_loss"}."""
    from stllm.distill.student import fit_samples
    from stllm.loop import make_accelerator
    optimizer = torch.optim.AdamW([p for p in writer.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    _, state, parts = fit_samples(make_accelerator(train_cfg), writer, optimizer, train_cfg, samples, batch_size,
                                  steps, minutes, lambda raw: raw.loss, Path(out), resume, progress)
    writer.eval()
    return {"steps": state.step, "wall_s": round(state.elapsed_s, 2), "stopped_by": state.stopped_by,
            "last_loss": parts.get("lm")}


def train_writer_run(cfg, out: str | Path, forecaster: str | Path, city: CityData | None = None,
                     resume: bool = False, progress: bool = True) -> dict:
    """The explain recipe's writer stage (explain.form: written): the run in `out` becomes the forecaster run
    `forecaster` (its files, copied unless it is `out` itself) plus `writer/`, trained on the analytic teacher's
    rationales of explain.n_samples training windows of the config's dataset, shared among its channels (note
    effects from the forecaster, weather effects from the training part). Returns the forecaster's metrics with an
    "explain" entry."""
    import shutil

    from stllm.data.fit import load_city
    from stllm.distill.facts import estimate_effects
    from stllm.distill.student import pick_windows
    from stllm.explain import note_effects
    from stllm.model import STLLM
    ex, out, forecaster = cfg.explain, Path(out), Path(forecaster)
    model = STLLM.from_pretrained(forecaster)
    if out.resolve() != forecaster.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for item in forecaster.iterdir():        # the forecaster's files; its checkpoints stay with it
            if item.is_dir() and item.name not in (WRITER_DIR, "checkpoints"):
                shutil.copytree(item, out / item.name, dirs_exist_ok=True)
            elif item.is_file():
                shutil.copy2(item, out / item.name)
    city = city if city is not None else load_city(cfg.data)
    prep = model.prepare(city)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    effects = estimate_effects(city, prep.train_end, prep.t_in, prep.t_out) if city.exog is not None else {}
    reads_notes = getattr(model, "notes", None) is not None
    t0, samples, n_channels = time.time(), [], city.n_channels
    for c in range(n_channels):                  # every channel its share: a writer explains any of them
        pairs = pick_windows(prep, -(-ex.n_samples // n_channels), cfg.train.seed + c, channel=c)
        moved = (lambda i, s, c=c: note_effects(model, prep, i, s, c)) if reads_notes else None
        samples += writer_samples(city, pairs, prep.t_in, prep.t_out, channel=c, effects=effects, note_effects=moved)
    samples_s = round(time.time() - t0, 2)
    writer = Writer.build(cfg.backbone, ex.writer_layers)
    folder = out / WRITER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.yaml")             # what `stllm train --resume` compares a new config with
    fit = train_writer(writer, samples, cfg.train, folder, batch_size=ex.batch_size, steps=ex.steps,
                       minutes=ex.minutes, lr=ex.lora_lr or 2e-3, resume=resume, progress=progress)
    info = {"form": "written", "writer_layers": writer.n_layers, "n_samples": len(samples),
            "samples_s": samples_s, **fit}
    writer.save_pretrained(folder, {"training": info})
    metrics = checkpoint.read_json(forecaster / "metrics.json", forecaster) if (forecaster / "metrics.json").is_file() \
        else {}
    metrics["explain"] = {**info, "forecaster": str(forecaster)}
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
