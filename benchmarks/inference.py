"""Inference speed, memory and accuracy of a trained run: fp32 vs int8 vs nf4 backbones, and a 2,000-sensor city.

    STLLM_DATA_ROOT=../shared/data python benchmarks/inference.py \
        --run /tmp/bench/snap/runs/bench/nyc-bike-60min/stllm --windows 256 --repeats 5 --threads 1

Every measurement runs in a fresh subprocess (this script with --worker), so peak RSS is that mode's alone. It
measures the CPU (workers run with CUDA_VISIBLE_DEVICES=""); use --threads to fix torch's thread count.

Per backbone mode (`quantize` none|int8|nf4), on the first --windows test windows of the run's own dataset:
- s/window and windows/s: median over --repeats passes of `stllm.infer.forecast` over the same windows (after
  one warm-up pass), batch --batch-size, so encoder + projector + backbone + head + inverse scaling.
- peak RSS: `ru_maxrss` of the worker (python + torch + data + model + activations).
- model memory: bytes of the backbone's parameters and buffers, each storage counted once (the tied LM head is
  the embedding), plus bitsandbytes' quantization state (nf4 absmax/code, int8 row scales SCB), which lives
  outside parameters. Reported whole and split into the decoder blocks' linear layers (the only part
  bitsandbytes quantizes), the token embedding, and the rest (norms, LoRA, rotary buffers); the ratios to fp32
  are given for the whole backbone and for the truncated decoder blocks alone.
- accuracy: masked MAE (original scale) over those windows, and its relative difference from fp32; also the
  mean |prediction - fp32 prediction| / mean |fp32 prediction|.
- roofline: the backbone forward's achieved FLOP/s divided by the dense fp32 matmul FLOP/s of this machine,
  measured in the same worker just before timing (median of torch.mm on --mm-size square fp32 matrices,
  2 n^3 FLOPs each). Backbone FLOPs per sequence of L tokens, counted analytically for the truncated LLaMA:
      FLOPs = L * n_layers * (2 * P_linear + 2 * P_lora + 4 * L * d)
  P_linear = weights of q, k, v, o, gate, up, down in one block; P_lora = LoRA A+B weights in one block;
  4 L d = Q K^T and A V (2 L d each per token; the kernel computes the full L x L, masked or not). Norms,
  rotary, softmax and the embedding lookup are left out (< 1%). The LM head is never run on this path. The
  backbone's time is taken with forward hooks on the decoder, so the ratio excludes encoder and head time.

The city: `make_city(n_nodes=--city-nodes, n_days=--city-days, n_channels=run's)` through the same run (its
weights take any number of nodes), for each `model.nodes_per_sequence` in --groups: s/window over
--city-windows test windows and the worker's peak RSS. Sequence length per group of g nodes is
header + g * (tokens_per_node + 1); attention costs grow with L^2, the number of sequences with N / g.

Results: JSON at --out (default benchmarks/results/inference.json) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = "/tmp/bench/snap/runs/bench/nyc-bike-60min/stllm"
MODES = {"fp32": "none", "int8": "int8", "nf4": "nf4"}
TARGETS = {"int8": {"mae_rel_diff": 0.01, "model_memory_ratio": 0.5},
           "nf4": {"mae_rel_diff": 0.03, "model_memory_ratio": 0.35},
           "roofline": 0.5, "city_peak_rss_gb": 24.0}


# ------------------------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_flops(size: int, repeats: int = 10) -> float:
    """Median dense fp32 FLOP/s of torch.mm on size x size matrices (2 size^3 FLOPs each)."""
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(param) -> int:
    """bitsandbytes keeps the scales outside the parameter: nf4 QuantState (absmax, code, nested state2), int8 SCB."""
    total = 0
    state = getattr(param, "quant_state", None)
    if state is not None:
        for name in ("absmax", "code"):
            if getattr(state, name, None) is not None:
                total += tensor_bytes(getattr(state, name))
        inner = getattr(state, "state2", None)
        if inner is not None:
            total += sum(tensor_bytes(getattr(inner, n)) for n in ("absmax", "code") if getattr(inner, n, None) is not None)
    scb = getattr(param, "SCB", None)
    if scb is not None:
        total += tensor_bytes(scb)
    return total


def backbone_memory(backbone) -> dict:
    """Bytes of the backbone's parameters + buffers (+ bnb scales), each storage once, split by part."""
    from stllm.backbone import base_model
    model = base_model(backbone)
    embedding = model.get_input_embeddings().weight
    parts = {"decoder_linear": 0, "embedding": 0, "other": 0}
    seen: set[int] = set()
    tensors = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, b) for n, b in model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        key = t.data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        size = tensor_bytes(t) + quant_state_bytes(t)
        if t is embedding or key == embedding.data_ptr():
            parts["embedding"] += size
        elif ".layers." in name and name.endswith("weight") and "lora_" not in name and "norm" not in name:
            parts["decoder_linear"] += size
        else:
            parts["other"] += size
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    return {"bytes": sum(parts.values()), **{f"{k}_bytes": v for k, v in parts.items()},
            "blocks_bytes": parts["decoder_linear"] + _block_other(model),
            "hf_get_memory_footprint": footprint}


def _block_other(model) -> int:
    """Norms (and LoRA) inside the decoder blocks: part of the truncated blocks, not of their linear layers."""
    return sum(tensor_bytes(p) for n, p in model.named_parameters()
               if ".layers." in n and ("norm" in n or "lora_" in n))


def backbone_flops_per_sequence(model, seq_len: int) -> dict:
    """Analytic FLOPs of one backbone forward on a sequence of seq_len tokens (see the module docstring)."""
    from torch import nn

    from stllm.backbone import find_layers, hidden_size
    parent, attr = find_layers(model.backbone)
    block = getattr(parent, attr)[0]
    n_layers = len(getattr(parent, attr))
    lora = sum(p.numel() for n, p in block.named_parameters() if "lora_" in n)
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear and keep in/out_features; peft's LoRA wrappers
    # do not (their base_layer does), so each weight matrix is counted once.
    linear = sum(m.in_features * m.out_features for name, m in block.named_modules()
                 if isinstance(m, nn.Linear) and "lora_" not in name)
    d = hidden_size(model.backbone)
    per_token = 2 * linear + 2 * lora + 4 * seq_len * d
    return {"flops": seq_len * n_layers * per_token, "seq_len": seq_len, "n_layers": n_layers, "d_llm": d,
            "linear_params_per_block": linear, "lora_params_per_block": lora}


class DecoderTimer:
    """Wall time spent inside the decoder's forward (forward hooks), to time the backbone alone."""

    def __init__(self, decoder) -> None:
        self.seconds, self.calls, self._start = 0.0, 0, None
        decoder.register_forward_pre_hook(self._pre)
        decoder.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


# --------------------------------------------------------------------------------------------- workers


def worker_mode(args) -> dict:
    """One backbone mode on the run's own test windows."""
    import numpy as np

    from stllm.backbone import decoder_body
    from stllm.data.fit import load_city
    from stllm.infer import forecast
    from stllm.metrics import MetricAccumulator
    from stllm.model import STLLM
    rss_start = rss_mb()
    model = STLLM.from_pretrained(args.run, quantize=MODES[args.worker])
    memory = backbone_memory(model.backbone)
    city = load_city(model.cfg.data)
    prep = model.prepare(city)
    starts = prep.splits["test"][:args.windows]
    timer = DecoderTimer(decoder_body(model.backbone))

    def one_pass():
        preds, truths = [], []
        for _, pred, true in forecast(model, prep, starts, args.batch_size):
            preds.append(pred)
            truths.append(true)
        return np.concatenate(preds), np.concatenate(truths)

    one_pass()  # warm-up: layouts tokenized, kernels packed (bnb repacks nf4 weights on first CPU call)
    peak = matmul_flops(args.mm_size)
    walls, backbone_s = [], []
    for _ in range(args.repeats):
        timer.seconds = 0.0
        start = time.perf_counter()
        pred, true = one_pass()
        walls.append(time.perf_counter() - start)
        backbone_s.append(timer.seconds)
    acc = MetricAccumulator()
    acc.update(pred, true)
    np.save(Path(args.worker_dir) / f"{args.worker}.npy", pred)
    n = len(starts)
    group = model.cfg.model.nodes_per_sequence or city.n_nodes
    seqs = [min(group, city.n_nodes - lo) for lo in range(0, city.n_nodes, group)]
    context = prep.batch(starts[:1]).get("context") or {}
    flops = [backbone_flops_per_sequence(model, len(model.layout(g, context).ids)) for g in seqs]
    flops_per_window = sum(f["flops"] for f in flops)
    wall, bb = statistics.median(walls), statistics.median(backbone_s)
    achieved = flops_per_window * n / bb
    return {"mode": args.worker, "quantize": MODES[args.worker], "n_windows": n, "n_nodes": city.n_nodes,
            "batch_size": args.batch_size, "repeats": args.repeats,
            "s_per_window": wall / n, "windows_per_s": n / wall, "pass_s_all": walls,
            "backbone_s_per_window": bb / n, "backbone_share": bb / wall,
            "mae": acc.compute()["mae"], "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss_start,
            "model_memory": memory,
            "roofline": {"seq_len": flops[0]["seq_len"], "sequences_per_window": len(seqs),
                         "flops_per_window": flops_per_window, "achieved_flops": achieved,
                         "matmul_peak_flops": peak, "mm_size": args.mm_size, "ratio": achieved / peak,
                         **{k: flops[0][k] for k in ("n_layers", "d_llm", "linear_params_per_block",
                                                     "lora_params_per_block")}}}


def worker_city(args) -> dict:
    """The run on a synthetic city of --city-nodes sensors, nodes_per_sequence = args.group."""
    from stllm.data.synthetic import make_city
    from stllm.backbone import decoder_body
    from stllm.data.fit import fit_to_run
    from stllm.infer import forecast
    from stllm.model import STLLM
    model = STLLM.from_pretrained(args.run)
    model.cfg.model.nodes_per_sequence = args.group
    city = make_city(n_nodes=args.city_nodes, n_days=args.city_days, n_channels=model.meta.n_channels, seed=0)
    mapping = [f"{c}={i}" for i, c in enumerate(city.channels)] if city.channels != model.meta.channels else []
    city = fit_to_run(city, model.meta, mapping)
    prep = model.prepare(city)
    starts = prep.splits["test"][:args.city_windows]
    rss_loaded = rss_mb()
    timer = DecoderTimer(decoder_body(model.backbone))
    for _ in forecast(model, prep, starts[:1], batch_size=1):  # warm-up
        pass
    walls, backbone_s = [], []
    for _ in range(args.city_repeats):
        timer.seconds = 0.0
        start = time.perf_counter()
        for _ in forecast(model, prep, starts, batch_size=1):
            pass
        walls.append(time.perf_counter() - start)
        backbone_s.append(timer.seconds)
    group = args.group or city.n_nodes
    context = prep.batch(starts[:1]).get("context") or {}
    seqs = [min(group, city.n_nodes - lo) for lo in range(0, city.n_nodes, group)]
    flops = sum(backbone_flops_per_sequence(model, len(model.layout(g, context).ids))["flops"] for g in seqs)
    n, wall, bb = len(starts), statistics.median(walls), statistics.median(backbone_s)
    return {"group": args.group, "n_nodes": city.n_nodes, "n_windows": n, "repeats": args.city_repeats,
            "seq_len": len(model.layout(seqs[0], context).ids), "sequences_per_window": len(seqs),
            "s_per_window": wall / n, "pass_s_all": walls, "backbone_s_per_window": bb / n,
            "backbone_flops_per_window": flops, "backbone_achieved_flops": flops * n / bb,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()}


def spawn(args, extra: list[str]) -> dict:
    """Run this script as a worker in a fresh process; returns its JSON."""
    out = Path(args.worker_dir) / f"worker-{len(os.listdir(args.worker_dir))}.json"
    cmd = [sys.executable, __file__, "--run", str(args.run), "--worker-dir", args.worker_dir,
           "--worker-out", str(out), "--threads", str(args.threads), "--windows", str(args.windows),
           "--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--mm-size", str(args.mm_size),
           "--city-nodes", str(args.city_nodes), "--city-days", str(args.city_days),
           "--city-windows", str(args.city_windows), "--city-repeats", str(args.city_repeats), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark, also on a machine with a GPU
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- reporting


def compare(results: dict, worker_dir: str) -> None:
    """Add differences and ratios to fp32, and whether each target is met."""
    import numpy as np
    modes = results["modes"]
    ref = modes.get("fp32")
    if ref is None:
        return
    ref_pred = np.load(Path(worker_dir) / "fp32.npy")
    for name, r in modes.items():
        pred = np.load(Path(worker_dir) / f"{name}.npy")
        r["mae_rel_diff"] = (r["mae"] - ref["mae"]) / ref["mae"]
        r["pred_rel_diff"] = float(np.nanmean(np.abs(pred - ref_pred)) / np.nanmean(np.abs(ref_pred)))
        r["speedup_vs_fp32"] = ref["s_per_window"] / r["s_per_window"]
        mem, ref_mem = r["model_memory"], ref["model_memory"]
        mem["ratio_vs_fp32"] = mem["bytes"] / ref_mem["bytes"]
        mem["blocks_ratio_vs_fp32"] = mem["blocks_bytes"] / ref_mem["blocks_bytes"]
        if name in TARGETS:
            t = TARGETS[name]
            r["targets"] = {"mae_within": t["mae_rel_diff"], "mae_met": abs(r["mae_rel_diff"]) <= t["mae_rel_diff"],
                            "memory_ratio_max": t["model_memory_ratio"],
                            "memory_met_whole": mem["ratio_vs_fp32"] <= t["model_memory_ratio"],
                            "memory_met_blocks": mem["blocks_ratio_vs_fp32"] <= t["model_memory_ratio"]}
    ref["targets"] = {"roofline_min": TARGETS["roofline"], "roofline_met": ref["roofline"]["ratio"] >= TARGETS["roofline"]}


def markdown(results: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"
    lines = ["| backbone | s/window | windows/s | backbone share | peak RSS MiB | model MiB (blocks MiB) | "
             "model / fp32 (blocks) | masked MAE | MAE vs fp32 | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["modes"].items():
        mem = r["model_memory"]
        ratio = f"{mem.get('ratio_vs_fp32', 1):.2f} ({mem.get('blocks_ratio_vs_fp32', 1):.2f})"
        lines.append(f"| {name} | {r['s_per_window']:.4f} | {r['windows_per_s']:.1f} | {r['backbone_share']:.0%} | "
                     f"{r['peak_rss_mb']:.0f} | {mib(mem['bytes'])} ({mib(mem['blocks_bytes'])}) | {ratio} | "
                     f"{r['mae']:.3f} | {r.get('mae_rel_diff', 0):+.2%} | {r['roofline']['ratio']:.2f} |")
    if results.get("city"):
        lines += ["", f"| {results['city'][0]['n_nodes']} sensors: nodes_per_sequence | sequence length | "
                  "sequences/window | s/window | backbone s/window | backbone GFLOP/window | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["city"]:
            lines.append(f"| {c['group'] or 'all'} | {c['seq_len']} | {c['sequences_per_window']} | "
                         f"{c['s_per_window']:.2f} | {c['backbone_s_per_window']:.2f} | "
                         f"{c['backbone_flops_per_window'] / 1e9:.0f} | {c['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    import stllm.backbone  # noqa: F401  (quietens bitsandbytes' import-time warning about `kernels`)
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "bitsandbytes": bnb,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=DEFAULT_RUN, help="trained run folder (its own dataset is evaluated)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--windows", type=int, default=128, help="test windows timed per mode (the first N)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the windows (median)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mm-size", type=int, default=2048, help="square fp32 matmul for the machine's peak")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default)")
    parser.add_argument("--city-nodes", type=int, default=2000)
    parser.add_argument("--city-days", type=int, default=28)
    parser.add_argument("--city-windows", type=int, default=2)
    parser.add_argument("--city-repeats", type=int, default=2)
    parser.add_argument("--groups", type=int, nargs="*", default=[64, 256, 1024, 0],
                        help="nodes_per_sequence values for the city (0 = all nodes in one sequence); none = skip")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--group", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ.setdefault("STLLM_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker_city(args) if args.worker == "city" else worker_mode(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    args.worker_dir = tempfile.mkdtemp(prefix="stllm-inference-")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = os.getloadavg()
    results = {"run": str(args.run), "started_utc": started, "machine": machine(),
               "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker") and k != "group"},
               "targets": TARGETS, "modes": {}, "city": []}
    for name in args.modes:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results["modes"][name] = spawn(args, ["--worker", name])
    for group in args.groups:
        print(f"measuring the {args.city_nodes}-sensor city, nodes_per_sequence={group} ...", file=sys.stderr, flush=True)
        results["city"].append(spawn(args, ["--worker", "city", "--group", str(group)]))
    compare(results, args.worker_dir)
    shutil.rmtree(args.worker_dir, ignore_errors=True)
    for c in results["city"]:
        c["under_24gb"] = c["peak_rss_mb"] / 1024 < TARGETS["city_peak_rss_gb"]
    results["load_avg_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}  # > cores: the machine was shared
    results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
