"""What a run writes are Hugging Face artifacts, and stllm reads them back as such: adapter/ opens with plain
`peft.PeftModel.from_pretrained`, model.safetensors holds no LoRA, and the rationales `stllm distill` writes are
the rows `stllm train` reads (`datasets.load_from_disk`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from stllm.backbone import build_base_model
from stllm.config import load_config
from stllm.data.prepared import PreparedCity
from stllm.data.synthetic import make_city
from stllm.model import STLLM, run_weights
from stllm.train import build_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
STARTS = np.array([100, 200, 300])


@pytest.fixture(scope="module")
def city():
    return make_city(n_nodes=6, n_days=21, seed=0)           # the city configs/tiny.yaml names


def shaken(cfg, city) -> STLLM:
    """A tiny model whose LoRA (every adapter) and head are moved off their start, as training moves them."""
    model = build_model(cfg, PreparedCity(city, cfg.data, cfg.encoder))
    if cfg.explain.enabled and cfg.explain.own_adapter:
        model.add_explain_adapter()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("head."):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def forecasts(model: STLLM, city) -> torch.Tensor:
    prep = model.prepare(city)
    with torch.no_grad():
        return model(prep.batch(STARTS))


def lora_params(model: STLLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_the_adapter_folder_opens_with_plain_peft_on_the_base_model(tmp_path, city, arch):
    cfg = load_config(TINY, [f"backbone.name={arch}"])
    model = shaken(cfg, city)
    model.save_pretrained(tmp_path / "run")
    assert not any("lora_" in k for k in load_file(tmp_path / "run" / "model.safetensors"))
    base, _ = build_base_model(cfg.backbone)                   # the base model of this run, without LoRA
    plain = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])             # [b, L]
    with torch.no_grad():
        want = model.backbone(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        bare = build_base_model(cfg.backbone)[0](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(bare, want)                      # the adapter is not a no-op


def test_a_run_without_lora_in_its_weights_loads_with_the_same_forecasts(tmp_path, city):
    model = shaken(load_config(TINY), city)
    before = forecasts(model, city)
    model.save_pretrained(tmp_path / "run")
    assert not any("lora_" in k for k in load_file(tmp_path / "run" / "model.safetensors"))
    loaded = STLLM.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(forecasts(loaded, city), before, rtol=0, atol=0)
    own = lora_params(model)
    assert own.keys() == lora_params(loaded).keys()
    assert all(torch.equal(own[k], v) for k, v in lora_params(loaded).items())


def test_the_explain_adapter_is_saved_by_peft_in_its_subfolder_and_loaded_from_there(tmp_path, city):
    model = shaken(load_config(TINY, ["explain.enabled=true", "explain.form=slots"]), city)
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "adapter" / "explain" / "adapter_model.safetensors").is_file()
    loaded = STLLM.from_pretrained(tmp_path / "run")
    assert set(loaded.backbone.peft_config) == {"default", "explain"} and loaded.backbone.active_adapter == "default"
    own, back = lora_params(model), lora_params(loaded)
    assert own.keys() == back.keys() and all(torch.equal(own[k], v) for k, v in back.items())
    assert any(not torch.equal(v, own[k.replace(".explain.", ".default.")]) for k, v in own.items() if ".explain." in k)
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {n for n, p in loaded.named_parameters() if p.requires_grad})


def test_a_run_saved_with_lora_inside_model_safetensors_still_loads(tmp_path, city):
    """Runs saved before the LoRA moved to adapter/ alone: LoRA in model.safetensors, adapter/ stale or gone."""
    model = shaken(load_config(TINY), city)
    before = forecasts(model, city)
    run = tmp_path / "run"
    model.save_pretrained(run)
    save_file(model.trainable_state_dict(), str(run / "model.safetensors"))   # the old layout
    for f in sorted((run / "adapter").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (run / "adapter").rmdir()
    torch.testing.assert_close(forecasts(STLLM.from_pretrained(run), city), before, rtol=0, atol=0)


def test_run_weights_gives_a_fresh_model_the_runs_lora_from_its_adapter(tmp_path, city):
    cfg = load_config(TINY)
    model = shaken(cfg, city)
    before = forecasts(model, city)
    model.save_pretrained(tmp_path / "run")
    fresh = build_model(cfg, PreparedCity(city, cfg.data, cfg.encoder)).eval()
    fresh.load_trainable_state_dict(run_weights(tmp_path / "run", fresh))          # strict: every tensor
    torch.testing.assert_close(forecasts(fresh, city), before, rtol=0, atol=0)


def test_train_reads_back_exactly_the_rows_distill_wrote(tmp_path, city, monkeypatch):
    from datasets import load_from_disk

    from stllm.distill import student
    folder = tmp_path / "distilled"
    student.write_rationales(load_config(TINY, ["backbone.name=tiny-llama", "explain.n_samples=3"]), folder, city)
    written = load_from_disk(str(folder / "dataset"))
    cfg = load_config(TINY, ["backbone.name=tiny-llama", "explain.enabled=true", "explain.form=slots", "explain.forecaster=false",
                             "explain.n_samples=5", "explain.batch_size=3", "explain.steps=1"])
    cfg.explain.rationales = str(folder)          # explain.rationales: the folder `stllm distill` wrote
    seen = []
    joint_loss = student.joint_loss
    monkeypatch.setattr(student, "joint_loss", lambda model, prep, chunk, *a: seen.extend(chunk)
                        or joint_loss(model, prep, chunk, *a))
    metrics = student.train_student(cfg, tmp_path / "student", city=city, progress=False)
    assert metrics["explain"]["n_samples"] == len(written) == 3                # not the 5 the config would write
    assert sorted(x.rationale for x in seen) == sorted(written["rationale"])
    assert sorted(x.prompt for x in seen) == sorted(written["prompt"])
    assert load_from_disk(str(tmp_path / "student" / "rationales" / "dataset")).to_list() == written.to_list()
