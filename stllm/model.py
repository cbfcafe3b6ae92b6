"""STLLM: encoder -> projector -> prompt -> backbone -> head; the object users hold (predict, evaluate, explain),
and saving/loading runs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from stllm import checkpoint
from stllm.config import Config
from stllm.data.city import CityData
from stllm.data.fit import RunMeta, is_own_data, prepare, resolve_nodes, resolve_time
from stllm.data.prepared import PreparedCity
from stllm.nn.encoder import STEncoder
from stllm.nn.floor import NaiveFloor, normalized, window_stats
from stllm.nn.classification import ClassificationHead
from stllm.nn.heads import LinearHead, Projector, RegressionHead
from stllm.nn.text import N_KIND_BUCKETS, NoteEffect, TextReader, kind_flags
from stllm.prompts import WHEN, PromptTemplate, city_layout

WEIGHTS = "model.safetensors"
META = "meta.json"
PROMPT = "prompt.txt"
EXPLAIN_ADAPTER = "explain"   # the student's LoRA adapter (explain.own_adapter); the forecaster's is "default"
ADAPTER = "adapter"           # the run's LoRA adapters, as peft saves them (PeftModel.save_pretrained)


class STLLM(nn.Module):
    """The forecaster. The backbone (or None for the encoder-only ablation) is built elsewhere and injected.

    forward(batch) -> [b, t_out, N, C] forecasts on the scaled axis (model.task=forecast), or event logits per
    channel (model.task=events).

    A trained model carries what it needs to be used on data: its config (`cfg`), tokenizer and backbone, and in
    `meta` (a `stllm.data.fit.RunMeta`) its training data's scaler, channels, units, interval, dataset name, node
    count, exogenous features and training end. `STLLM.from_pretrained(run)` loads one; `predict`, `evaluate` and
    `explain` take a CityData (or `model.prepare(city)` to prepare it once for several calls). Training attaches
    `meta` (`stllm.train.build_model`) before `save_pretrained`.
    """

    meta: RunMeta | None = None   # set by training or from_pretrained; saving needs it

    def __init__(self, cfg: Config, n_channels: int, n_exog: int, backbone=None, tokenizer=None,
                 prompt: PromptTemplate | None = None):
        super().__init__()
        self.cfg, self.n_channels, self.n_exog = cfg, n_channels, n_exog
        # The encoder and its linear read-out start from the seed alone, whatever was built before them (a
        # backbone's LoRA init draws random numbers too): stllm's encoder stage then starts exactly where the
        # encoder-only ablation starts, and with the same data order follows the same path.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.encoder = STEncoder(cfg.encoder, cfg.data, n_channels, n_exog)
            k, d_enc, t_out = self.encoder.n_tokens, cfg.encoder.d_enc, cfg.data.t_out
            readout = LinearHead(d_enc, k, t_out, n_channels)
        # Notes (dated text about places): read by the language model (model.notes=text), or, as the control,
        # seen only as flags of their kind (flags); forecasts only.
        reads_notes = cfg.model.task == "forecast" and (cfg.model.notes == "flags" or
                                                         (cfg.model.notes == "text" and cfg.model.use_llm))
        self.reader = None
        # The floor (stllm.nn.floor): scale from each window (data.window_norm), a start from the naive forecasts
        # (model.floor); the read-out then learns a correction to that start, from zero.
        if (cfg.data.window_norm or cfg.model.floor) and cfg.model.task != "forecast":
            raise ValueError("data.window_norm and model.floor need model.task=forecast (event logits have no scale)")
        self.floor = NaiveFloor(t_out, 1 + len(cfg.data.periods) + int(cfg.data.profile),
                                fit=cfg.model.floor_fit, city_fit=cfg.model.floor_city_fit) if cfg.model.floor else None
        if self.floor is not None:
            nn.init.zeros_(readout.lin.weight)
            nn.init.zeros_(readout.lin.bias)
        self.llm_active = True   # False: forward uses only the encoder read-out (training's first stage)
        if not cfg.model.use_llm:   # for events the linear head's outputs are logits
            self.backbone = None
            self.head = readout
            self.notes = NoteEffect(N_KIND_BUCKETS, cfg.model.note_hidden, cfg.data.t_in, n_channels) \
                if reads_notes else None
            return
        if backbone is None or tokenizer is None:
            raise ValueError("model.use_llm=true needs a backbone and its tokenizer (see stllm.backbone.build_backbone)")
        from stllm.backbone import hidden_size
        d_llm = hidden_size(backbone)
        self.backbone, self.tokenizer = backbone, tokenizer
        self.prompt = prompt or PromptTemplate.load(cfg.model.prompt)
        m = cfg.model.tokens_per_node
        self.projector = Projector(d_enc, d_llm, cfg.model.projector, n_in=k, n_out=m)
        self.pre_query = nn.Parameter(torch.zeros(d_llm))   # the learned <ST_PRE> query
        self.pre_proj = nn.Linear(d_enc, d_llm)              # plus the node's own summary, so slots differ by node
        head = ClassificationHead if cfg.model.task == "events" else RegressionHead
        self.head = head(d_llm, m, t_out, n_channels, cfg.model.head_hidden)
        # The encoder's own linear read-out, added to the language model's: the backbone then refines a forecast
        # instead of having to rebuild one. Its output layer starts at zero, so at step 0 the model is exactly the
        # encoder-only ablation plus a zero correction (see model.encoder_skip and train.encoder_first_minutes).
        self.skip = readout if cfg.model.encoder_skip else None
        if self.skip is not None:
            nn.init.zeros_(self.head.w3.weight)
            nn.init.zeros_(self.head.w3.bias)
        self.reader = TextReader(backbone, tokenizer)        # pooled text states, cached per text
        d_note = d_llm if cfg.model.notes == "text" else N_KIND_BUCKETS
        self.notes = NoteEffect(d_note, cfg.model.note_hidden, cfg.data.t_in, n_channels) if reads_notes else None
        # Node names and descriptions, read once per city, added to each node's ST-tokens (model.node_text).
        self.node_proj = nn.Linear(d_llm, d_enc) if cfg.model.node_text else None
        if self.node_proj is not None:
            nn.init.zeros_(self.node_proj.weight)
            nn.init.zeros_(self.node_proj.bias)
        self._layouts: dict = {}

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        stats = window_stats(batch) if self.cfg.data.window_norm else None
        if stats is not None:
            batch = normalized(batch, *stats)
        y = self._forecast(batch)                                      # [b, t_out, N, C]
        if self.floor is not None:
            y = y + self.floor(batch)
        if stats is not None:
            y = stats[0] + stats[1] * y                                 # back to the scaled axis
        if self.backbone is not None and not self.llm_active:
            return y                  # training's first stage: the encoder alone, as the encoder-only ablation
        return self._read_notes(y, batch)

    def _forecast(self, batch: dict) -> torch.Tensor:
        """The model's own forecast [b, t_out, N, C] on the axis its inputs are on (before the floor, notes)."""
        tokens = self.encoder(batch)                                    # [b, N, k, d_enc]
        if self.backbone is None:
            return self.head(tokens)
        base = self.skip(tokens) if self.skip is not None else 0.0     # [b, t_out, N, C]
        if not self.cfg.model.lm_layout:                                # the language model reads only the notes
            return base
        if not self.llm_active:
            if self.skip is None:
                raise ValueError("llm_active=False needs model.encoder_skip=true (there is no other read-out)")
            return base
        gate = self._noted_nodes(batch, tokens) if self.cfg.model.lm_where == "notes" else None      # [b, N]
        if gate is not None and not gate.any():
            return base                                                 # no note in these windows: nothing to read
        if self.node_proj is not None:
            tokens = tokens + self.node_proj(self._node_states(batch, tokens))[None, :, None, :]
        b, n = tokens.shape[:2]
        his = self.projector(tokens)                                    # [b, N, m, d_llm]
        pre = self.pre_query + self.pre_proj(tokens.mean(2))           # [b, N, d_llm]
        group = self.cfg.model.nodes_per_sequence or n
        h_his, h_pre = [], []
        # Nodes are cut into groups of at most `group` per sequence so the sequence length stays bounded; the
        # layout's mask makes every node independent of the others, so grouping does not change the result
        # (with model.cross_node a node sees the other nodes of its group).
        when = self._window_ids(batch.get("window_text"), b)                  # ([b, W], [b]) or None
        for lo in range(0, n, group):
            hi = min(lo + group, n)
            a, p = self._run_backbone(his[:, lo:hi], pre[:, lo:hi], batch.get("context") or {}, when)
            h_his.append(a)
            h_pre.append(p)
        correction = self.head(torch.cat(h_his, 1), torch.cat(h_pre, 1))   # [b, t_out, N, C]
        if gate is not None:
            correction = correction * gate[:, None, :, None].to(correction.dtype)
        return base + correction

    @staticmethod
    def _noted_nodes(batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """[b, N] bool: the nodes whose window (history or horizon) meets a note (model.lm_where=notes)."""
        cover = batch.get("note_cover")                                 # [b, t_in + t_out, N, J]
        if cover is None or cover.shape[-1] == 0:
            return torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return (cover > 0).any(-1).any(1).to(tokens.device)

    def _read_notes(self, y: torch.Tensor, batch: dict) -> torch.Tensor:
        """The forecast y [b, t_out, N, C] moved by the notes the windows meet (unchanged without notes)."""
        if self.notes is None or not batch.get("note_texts"):
            return y
        if self.cfg.model.notes == "text":
            vectors = self.reader(batch["note_texts"])                     # [J, d_llm]
        else:
            vectors = kind_flags(batch["note_kinds"])                      # [J, N_KIND_BUCKETS]
        return self.notes(y, vectors, batch["note_cover"], batch["level"])

    def _node_states(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """[N, d_llm]: each node's name and description as the language model reads them (cached per text)."""
        texts = batch.get("node_texts")
        if texts is None or len(texts) != tokens.shape[1]:
            raise ValueError("model.node_text needs batch['node_texts'], one text per node (PreparedCity.batch)")
        return self.reader(list(texts)).to(tokens.device, tokens.dtype)

    def _run_backbone(self, his: torch.Tensor, pre: torch.Tensor, context: dict,
                      when: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """his [b, g, m, d_llm], pre [b, g, d_llm] -> hidden states at those slots, same shapes. when: each
        window's calendar text as padded token ids [b, W] and lengths [b], for a prompt with a <WHEN> slot."""
        b, g, m, _ = his.shape
        layout = self.layout(g, context, 0 if when is None else when[0].shape[1])
        device = his.device
        from stllm.backbone import decoder_body
        decoder = decoder_body(self.backbone)
        embed = decoder.get_input_embeddings()
        emb = embed(layout.ids.to(device)).unsqueeze(0).expand(b, -1, -1).clone()   # [b, L, d_llm]
        emb[:, layout.his_pos.reshape(-1)] = his.reshape(b, g * m, -1).to(emb.dtype)
        emb[:, layout.pre_pos] = pre.to(emb.dtype)
        mask = layout.mask.to(device)[None, None].expand(b, 1, -1, -1)  # [b, 1, L, L]
        positions = layout.position_ids.to(device)[None].expand(b, -1)  # [b, L]
        if len(layout.when_pos):
            ids, lengths = when[0].to(device), when[1].to(device)
            slot = layout.when_pos.to(device)
            emb[:, slot] = embed(ids).to(emb.dtype)
            padding = torch.arange(len(slot), device=device)[None] >= lengths[:, None]         # [b, W]
            keep = torch.ones(b, emb.shape[1], dtype=torch.bool, device=device)
            keep[:, slot] = ~padding
            mask = mask & keep[:, None, None, :]          # nobody attends to padding
            later = torch.arange(emb.shape[1], device=device) > slot[-1]
            positions = positions - later[None] * (len(slot) - lengths)[:, None]   # text then continues at once
        hidden = decoder(inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                         use_cache=False).last_hidden_state              # [b, L, d_llm]
        return hidden[:, layout.his_pos].float(), hidden[:, layout.pre_pos].float()

    def layout(self, n_nodes: int, context: dict, when_tokens: int = 0):
        """Token layout for a city of n_nodes, tokenized once per (text, n_nodes, room for <WHEN> text)."""
        fields = {**default_context(self.cfg), **context, "n_nodes": n_nodes}
        text = self.prompt.render(**{f: fields.get(f, "") for f in self.prompt.fields})
        key = (text, n_nodes, when_tokens)
        if key not in self._layouts:   # cached tensors must be usable by training too: no inference tensors
            with torch.inference_mode(False):
                self._layouts[key] = city_layout(text, self.tokenizer, n_nodes, self.cfg.model.tokens_per_node,
                                                 self.cfg.model.cross_node, when_tokens)
        return self._layouts[key]

    def _window_ids(self, texts: list[str] | None, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The windows' calendar texts as token ids [b, W] (W = the longest, padded) and lengths [b]; None when
        the prompt has no <WHEN> slot."""
        if WHEN not in self.prompt.text:
            return None
        if texts is None:
            raise ValueError(f"prompt {self.prompt.name!r} has a {WHEN} slot: the batch needs 'window_text', one "
                             "calendar text per window (PreparedCity.batch writes it)")
        if len(texts) != b:
            raise ValueError(f"batch['window_text'] has {len(texts)} texts for {b} windows")
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(b, width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, torch.tensor([len(r) for r in rows])

    # ---- parameters and saving ------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that training can change: encoder, projector, heads, LoRA (also when `train.freeze` held
        some of them still in this run). The frozen backbone is not saved."""
        return {name: p.detach().cpu().contiguous() for name, p in self.named_parameters() if _saved(name, p)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint",
                                  partial: bool = False) -> list[str]:
        """Copy weights in. partial=True loads the tensors both sides have (e.g. the encoder of an encoder-only
        run) and ignores the rest; shapes must still match. Returns the names loaded."""
        own = dict(self.named_parameters())
        if partial:
            state = {k: v for k, v in state.items() if k in own}
            if not state:
                raise ValueError(f"{source}: no weight of it belongs to this model")
        unknown = sorted(set(state) - set(own))
        missing = sorted(name for name, p in own.items() if _saved(name, p) and name not in state)
        if unknown or (missing and not partial):
            raise ValueError(f"{source}: weights do not fit this model; unknown: {unknown[:5]}, missing: {missing[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}")
                own[name].copy_(value.to(own[name].dtype))
        return sorted(state)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.yaml, model.safetensors (trainable weights but LoRA), adapter/ (the LoRA adapters as peft
        writes them: `peft.PeftModel.from_pretrained(stllm.backbone.build_base_model(cfg.backbone)[0], run /
        "adapter")` opens it), meta.json (`self.meta`), prompt.txt. Each replaces its old version only once
        complete (written beside it, then renamed)."""
        if self.meta is None:
            raise ValueError("this model carries no RunMeta (model.meta): build it with stllm.train.build_model, "
                             "or set model.meta = RunMeta.from_prepared(prep), before saving")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with checkpoint.replacing(directory / "config.yaml") as tmp:
            self.cfg.save(tmp)
        with checkpoint.replacing(directory / WEIGHTS) as tmp:   # the LoRA weights live in ADAPTER alone
            save_file({k: v for k, v in self.trainable_state_dict().items() if "lora_" not in k}, str(tmp))
        checkpoint.atomic_write_text(directory / META, json.dumps(self.meta.to_dict(), indent=1))
        if self.backbone is not None:
            checkpoint.atomic_write_text(directory / PROMPT, self.prompt.text)
            if hasattr(self.backbone, "peft_config"):   # "default" at the top, EXPLAIN_ADAPTER in a sub-folder
                with checkpoint.replacing(directory / ADAPTER) as tmp:
                    self.backbone.save_pretrained(str(tmp))

    @classmethod
    def from_pretrained(cls, directory: str | Path, quantize: str | None = None,
                        dtype: str | None = None) -> "STLLM":
        """Rebuild a run from its folder alone (no training data needed), in eval mode, carrying its config,
        meta, tokenizer and backbone. quantize: "none" | "int8" | "nf4" and dtype: the backbone's (default: the
        run's config); the adapter trained unquantized loads onto a quantized backbone."""
        directory = Path(directory)
        for name in ("config.yaml", WEIGHTS, META):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a stllm run: {name} is missing")
        cfg = checkpoint.load_run_config(directory)       # one that does not parse: an error naming it
        overrides = {k: v for k, v in (("quantize", quantize), ("dtype", dtype)) if v is not None}
        if overrides:
            cfg.backbone = dataclasses.replace(cfg.backbone, **overrides)
        raw = checkpoint.read_json(directory / META, directory)
        try:
            meta = RunMeta.from_dict(raw)
        except (ValueError, TypeError, KeyError) as err:
            raise checkpoint.DamagedRun(f"{META} of {directory} is damaged ({err}); retrain or restore it") from err
        weights = checkpoint.read_weights(directory / WEIGHTS, directory)          # a damaged file: a named error
        # Legacy: runs saved before the LoRA moved to ADAPTER alone keep it inside model.safetensors (their
        # adapter/ may be missing or stale); they load as before, the LoRA from the file.
        legacy = checkpoint.has_lora(weights)
        backbone = tokenizer = prompt = None
        if cfg.model.use_llm:
            from stllm.backbone import build_backbone, build_base_model, load_adapters
            if not legacy and cfg.backbone.lora_r > 0:
                check_adapter(directory, cfg)
                base, tokenizer = build_base_model(cfg.backbone)
                backbone = load_adapters(base, directory / ADAPTER, cfg.backbone)
            else:
                if not legacy:
                    check_no_adapter(directory, cfg)
                backbone, tokenizer = build_backbone(cfg.backbone)
            prompt = PromptTemplate(cfg.model.prompt, (directory / PROMPT).read_text())
        model = cls(cfg, meta.n_channels, meta.n_exog, backbone, tokenizer, prompt)
        model.meta = meta
        if cfg.explain.enabled and cfg.explain.own_adapter:
            model.add_explain_adapter()              # already there when loaded from ADAPTER
        checkpoint.check_weights(weights, directory / WEIGHTS, directory, model)  # misfit: errors naming the key
        if not legacy:                               # the LoRA peft loaded, and the rest from the file
            weights = {**{k: v for k, v in model.trainable_state_dict().items() if "lora_" in k}, **weights}
        model.load_trainable_state_dict(weights, str(directory / WEIGHTS))
        model.run_dir = directory
        model.eval()
        return model

    def load_writer(self):
        """The run's writer (`stllm.distill.writer`, <run>/writer/, explain.form: written), loaded on first use and
        kept; None when the run has none (a model built in code, or a run without a writer)."""
        if getattr(self, "_writer", None) is None:
            folder = getattr(self, "run_dir", None)
            if folder is None or not (Path(folder) / "writer" / "writer.json").is_file():
                return None
            from stllm.distill.writer import Writer
            device = next(self.parameters()).device
            self.__dict__["_writer"] = Writer.from_pretrained(Path(folder) / "writer").to(device)   # not a submodule
        return self._writer

    def to_device(self, device: str | torch.device) -> "STLLM":
        """Move the model to a device; a quantized backbone stays where bitsandbytes placed it (it cannot move)."""
        quantized = self.backbone is not None and self.cfg.backbone.quantize != "none"
        for name, child in self.named_children():
            if not (quantized and name == "backbone"):
                child.to(device)
        for name, p in self.named_parameters(recurse=False):
            p.data = p.data.to(device)
        return self

    @property
    def has_explain_adapter(self) -> bool:
        return self.backbone is not None and EXPLAIN_ADAPTER in getattr(self.backbone, "peft_config", {})

    def add_explain_adapter(self) -> None:
        """A second LoRA adapter, EXPLAIN_ADAPTER, for the node layout (explanations), started as a copy of the
        forecaster's ("default"). The city layout keeps using the forecaster's adapter, so training the explaining
        student cannot change the forecasts it explains. `stllm.distill.node_layout.explain_adapter` switches."""
        import copy
        if self.backbone is None or not hasattr(self.backbone, "peft_config"):
            raise ValueError("explain.own_adapter needs a LoRA backbone (model.use_llm=true, backbone.lora_r > 0); "
                             "set explain.own_adapter=false to train the forecaster's own adapter instead")
        if self.has_explain_adapter:
            return
        self.backbone.add_adapter(EXPLAIN_ADAPTER, copy.deepcopy(self.backbone.peft_config["default"]))
        params = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if "lora_" in name and ".default." in name:
                    params[name.replace(".default.", f".{EXPLAIN_ADAPTER}.")].copy_(p)

    def merge_lora(self) -> "STLLM":
        """Fold the LoRA weights into the backbone (faster inference, same outputs). Not for quantized backbones."""
        if self.backbone is None or not hasattr(self.backbone, "merge_and_unload"):
            raise ValueError("this model has no LoRA adapter to merge")
        if self.has_explain_adapter:
            raise ValueError("this run has a second adapter for explanations; merging one would break the other")
        if self.cfg.backbone.quantize != "none":
            raise ValueError(f"cannot merge LoRA into a {self.cfg.backbone.quantize} backbone; "
                             "load the run with quantize=none to merge")
        self.backbone = self.backbone.merge_and_unload()
        return self

    # ---- use ---------------------------------------------------------------------------------------------------
    def prepare(self, city: CityData) -> PreparedCity:
        """The city as this run reads it: the run's scaler on its own dataset, a fresh one (fitted on the city's
        training part) elsewhere, the run's exogenous features. The city must have the run's channels and interval
        (`stllm.data.fit.fit_to_run` maps another city's)."""
        if isinstance(city, PreparedCity):
            return city
        if self.meta is None:
            raise ValueError("this model carries no RunMeta (model.meta); load a run with STLLM.from_pretrained")
        return prepare(city, self.meta, self.cfg)

    def predict(self, city: CityData | PreparedCity, at=None, nodes=None, split: str = "test", last: bool = False,
                batch_size: int = 16) -> dict:
        """Forecasts on the original scale. Which windows: the one whose first forecast step is `at` (a timestamp
        or a step index), else with last=True the one after the data ends, else every window of `split`.
        nodes: ids, names or positions (one or a list) to keep; all by default (the model reads the whole city).

        Returns {"starts": [b], "timestamps": [b, t_out] datetime64, "prediction": [b, t_out, N', C],
                 "truth": [b, t_out, N', C] (NaN where unknown), "node_ids": [N'], "channels": [C]}.
        """
        from stllm.infer import predict
        prep = self.prepare(city)
        if at is not None and last:
            raise ValueError("predict: give `at` or last=True, not both")
        if at is not None:
            starts = np.array([resolve_time(prep.city, at, prep.t_in)])
        elif last:
            starts = np.array([prep.city.n_steps])
        else:
            if split not in prep.splits:
                raise ValueError(f"split must be one of {list(prep.splits)}, got {split!r}")
            starts = prep.starts(split, why="predict")
        keep = None if nodes is None else resolve_nodes(prep.city, nodes)
        return predict(self, prep, starts, keep, batch_size)

    def evaluate(self, city: CityData | PreparedCity, split: str = "test", batch_size: int = 16) -> dict:
        """The metrics JSON of `stllm evaluate`: this model and the baselines on one split of `city` (masked and
        unmasked MAE, RMSE, MAPE per horizon; event metrics for model.task=events), with `zero_shot` (the city is
        not the run's own dataset) and `source_dataset`."""
        from stllm.infer import evaluate_with_baselines
        prep = self.prepare(city)
        metrics = evaluate_with_baselines(self, prep, split, batch_size)
        return {**metrics, "zero_shot": not is_own_data(prep.city, self.meta), "source_dataset": self.meta.dataset}

    def explain(self, city: CityData | PreparedCity, node, at, **options) -> dict:
        """Forecast node `node` (id, name or position) for the window whose first forecast step is `at` and explain
        it, checked against the data. options: mode ("analytic" | "generated"), channel, effects,
        max_new_tokens; see `stllm.explain.explain` for them and the result."""
        from stllm.explain import explain
        return explain(self, city, node, at, **options)


def run_weights(run: str | Path, model: STLLM) -> dict[str, torch.Tensor]:
    """A saved run's trainable weights under `model`'s names (e.g. to start training from it): model.safetensors,
    plus the LoRA of each adapter `model` has, read with peft from the run's ADAPTER folder (runs saved before
    the LoRA moved there hold it in model.safetensors; then the file alone)."""
    from peft.utils import load_peft_weights
    run = Path(run)
    weights = checkpoint.read_weights(run / WEIGHTS, run)
    if checkpoint.has_lora(weights) or not hasattr(model.backbone, "peft_config"):
        return weights
    for adapter in model.backbone.peft_config:
        folder = run / ADAPTER if adapter == "default" else run / ADAPTER / adapter
        if not (folder / "adapter_config.json").is_file():
            continue
        saved = load_peft_weights(str(folder))   # named as peft saves them: without the adapter's name
        for name, _ in model.named_parameters():
            key = name.removeprefix("backbone.").replace(f".{adapter}.", ".")
            if "lora_" in name and f".{adapter}." in name and key in saved:
                weights[name] = saved[key]
    return weights


def check_adapter(run: Path, cfg: Config) -> None:
    """The run's ADAPTER folder exists and fits its config (the LoRA rank, the explain adapter), else DamagedRun."""
    folder = run / ADAPTER
    if not (folder / "adapter_config.json").is_file():
        raise checkpoint.DamagedRun(f"{run}: {ADAPTER}/adapter_config.json is missing, and the run's LoRA weights live "
                                    f"there (backbone.lora_r={cfg.backbone.lora_r}); restore it, or retrain")
    rank = checkpoint.read_json(folder / "adapter_config.json", run).get("r")
    if rank != cfg.backbone.lora_r:
        raise checkpoint.DamagedRun(f"{run}: backbone.lora_r is {cfg.backbone.lora_r} in the config, {rank} in the "
                                    f"weights; its config.yaml and {ADAPTER}/ do not belong together: restore the one "
                                    f"that changed, or retrain")
    wants = cfg.explain.enabled and cfg.explain.own_adapter
    if wants != (folder / EXPLAIN_ADAPTER / "adapter_config.json").is_file():
        raise checkpoint.DamagedRun(f"{run}: the weights were trained with another explain.own_adapter than "
                                    f"config.yaml's ({ADAPTER}/{EXPLAIN_ADAPTER}/ is {'missing' if wants else 'there'}); "
                                    f"restore the config, or retrain")


def check_no_adapter(run: Path, cfg: Config) -> None:
    """A run whose config builds no LoRA (backbone.lora_r=0) must not have trained one."""
    if cfg.model.use_llm and (run / ADAPTER / "adapter_config.json").is_file():
        raise checkpoint.DamagedRun(f"{run}: the weights were trained with another backbone.lora_r than config.yaml's "
                                    f"(0): {ADAPTER}/ holds a LoRA adapter; restore the config, or retrain")


def _saved(name: str, p: torch.Tensor) -> bool:
    """A run saves every parameter outside the backbone (even one `train.freeze` held still) and LoRA."""
    return p.requires_grad or not name.startswith("backbone.") or "lora_" in name


def default_context(cfg: Config) -> dict:
    return {"city": "an unnamed city", "domain": "sensor data", "channels": "value", "interval": "step",
            "t_in": cfg.data.t_in, "t_out": cfg.data.t_out}
