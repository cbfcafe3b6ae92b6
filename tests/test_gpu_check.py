"""benchmarks/gpu_check.py: its CPU smoke run (tiny-gpt2, fp32) end to end, its refusal without CUDA, and the real
GPU run (marker `gpu`, skipped without CUDA)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU visible to torch)")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_training(row: dict, steps: int) -> None:
    assert row["steps_timed"] == steps == len(row["step_s_all"])
    for key in ("step_s_median", "windows_per_s", "peak_mib_steps", "peak_mib_build_and_warmup", "test_mae"):
        assert finite(row[key]) and row[key] > 0, key
    assert row["loss_finite"] is True and row["train_losses"] and all(map(finite, row["train_losses"]))
    assert row["dtypes"]["lora"] == ["float32"] and row["dtypes"]["encoder_projector_head"] == ["float32"]


def check_inference(row: dict, n_windows: int) -> None:
    assert row["n_windows"] == n_windows and row["forecast_finite"] is True
    for key in ("windows_per_s", "peak_mib_load", "peak_mib_inference", "masked_mae", "max_abs_diff_vs_fp32",
                "mean_abs_diff_vs_fp32", "rel_mean_abs_diff_vs_fp32", "windows_per_s_vs_fp32"):
        assert finite(row[key]), key
    assert finite(row["backbone_memory_mib"]["bytes"]) and row["backbone_memory_mib"]["bytes"] > 0
    assert set(row["embedding"]) >= {"class", "dtype", "mib", "quantized"}


def test_cpu_smoke_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert load_script().main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cpu_smoke"] is True and result["cuda"] is False
    assert result["command"] == f"python benchmarks/gpu_check.py --cpu-smoke --out {out}"
    assert result["settings"]["backbone"] == "tiny-gpt2" and finite(result["wall_s"])
    assert list(result["training"]) == ["fp32"]
    check_training(result["training"]["fp32"], result["settings"]["steps"])
    assert result["training"]["fp32"]["dtypes"]["backbone_frozen"] == ["float32"]
    fp32 = result["inference"]["fp32"]
    check_inference(fp32, result["settings"]["windows"])
    assert fp32["max_abs_diff_vs_fp32"] == 0 and fp32["windows_per_s_vs_fp32"] == 1
    assert fp32["embedding"]["quantized"] is False
    for mode in ("int8", "nf4"):   # tiny-gpt2 cannot be quantized: said, not failed
        assert "bitsandbytes" in result["inference"][mode]["skipped"]
    printed = capsys.readouterr().out
    assert "| fp32 | float32 / float32 / float32 |" in printed and "| int8 | skipped" in printed
    assert result["table"] in printed


def test_without_cuda_it_exits_at_once_with_code_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", "unused.json"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr and "--cpu-smoke" in done.stderr
    assert not (ROOT / "unused.json").exists()


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_on_cuda(tmp_path):
    """The real check: SmolLM2, bf16 and fp32 training, fp32 / bf16 / int8 / nf4 inference, in under 8 minutes."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cuda"] is True and result["settings"]["backbone"] == "smollm2-135m"
    train = result["training"]
    for mode in ("bf16", "fp32"):
        check_training(train[mode], result["settings"]["steps"])
    assert train["bf16"]["dtypes"]["backbone_frozen"] == ["bfloat16"]
    assert train["fp32"]["dtypes"]["backbone_frozen"] == ["float32"]
    assert train["bf16"]["peak_mib_steps"] < train["fp32"]["peak_mib_steps"]
    infer = result["inference"]
    for mode, limit in (("fp32", 0.0), ("bf16", 0.02), ("int8", 0.03), ("nf4", 0.05)):
        check_inference(infer[mode], result["settings"]["windows"])
        assert infer[mode]["rel_mean_abs_diff_vs_fp32"] <= limit, (mode, infer[mode]["rel_mean_abs_diff_vs_fp32"])
    assert "Linear8bitLt" in infer["int8"]["linear_layer_classes"]
    assert "Linear4bit" in infer["nf4"]["linear_layer_classes"]
    fp32_mib = infer["fp32"]["backbone_memory_mib"]["bytes"]
    for mode in ("int8", "nf4"):
        assert infer[mode]["backbone_memory_mib"]["bytes"] < fp32_mib
