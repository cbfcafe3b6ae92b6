"""Inference speed, memory and accuracy of a trained run: fp32 vs int8 vs nf4 backbones, and a 2,000-sensor city.

    STLLM_DATA_ROOT=../shared/data python benchmarks/inference.py \
        --run /tmp/bench/snap/runs/bench/nyc-bike-60min/stllm --windows 256 --repeats 5 --threads 1

Every measurement runs in a fresh subprocess (this script with --worker), so peak RSS is that mode's alone. It
measures the CPU (workers run with CUDA_VISIBLE_DEVICES=""); use --threads to fix torch's thread count.

Per backbone mode (`quantize` none|int8|nf4), on the first --windows test windows of the run's own dataset:
- s/window and windows/s: median over --repeats passes of `stllm.infer.predict` over the same windows (after
  one warm-up pass), batch --batch-size, so encoder + projector + backbone + head + inverse scaling.
- peak RSS: `ru_maxrss` of the worker (python + torch + data + model + activations).
- model memory: `stllm.backbone.memory_footprint`: the backbone's parameters and buffers, each storage once (the
  tied LM head is the embedding), plus bitsandbytes' quantization state (nf4 absmax/code, int8 row scales SCB).
  The headline figure and its ratio to fp32 (the one the int8 / nf4 targets judge) INCLUDE the token embedding,
  which bitsandbytes leaves unquantized (`embedding_quantized`: false; the table shows its MiB); the decoder
  blocks alone (their linear layers, the only part bitsandbytes quantizes, with their norms and LoRA) are
  reported beside it, labelled as such.
- accuracy: masked MAE (original scale) over those windows, and its relative difference from fp32; also the
  mean |prediction - fp32 prediction| / mean |fp32 prediction|.
- roofline: the backbone forward's achieved FLOP/s divided by the dense fp32 matmul FLOP/s of this machine,
  measured in the same worker just before timing (median of torch.mm on --mm-size square fp32 matrices,
  2 n^3 FLOPs each). Backbone FLOPs per sequence of L tokens, counted analytically for the truncated LLaMA
  (`backbone_flops`), only for the work the layout's attention mask leaves:
      FLOPs = n_layers * (L * (2 * P_linear + 2 * P_lora) + 4 * d * A)
  P_linear = weights of q, k, v, o, gate, up, down in one block; P_lora = LoRA A+B weights in one block;
  A = the (query, key) pairs the mask allows (a node block sees the instruction and itself, causally), and
  4 d per pair = Q K^T and A V (2 d each). The kernel computes the whole L x L score matrix, masked or not; that
  count (A = L^2) is kept as `dense_flops` but is not the work the model needs, so it is not credited. Norms,
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


def backbone_flops(backbone, layout) -> dict:
    """Analytic FLOPs of one backbone forward over `layout` (a `stllm.prompts.CityLayout`; see the module
    docstring): the linear layers on every token, attention only on the (query, key) pairs its mask allows.
    `dense_flops` is what a kernel that computes the whole L x L score matrix does."""
    from torch import nn

    from stllm.backbone import find_layers, hidden_size
    parent, attr = find_layers(backbone)
    block = getattr(parent, attr)[0]
    n_layers = len(getattr(parent, attr))
    lora = sum(p.numel() for n, p in block.named_parameters() if "lora_" in n)
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear and keep in/out_features; peft's LoRA wrappers
    # do not (their base_layer does), so each weight matrix is counted once.
    linear = sum(m.in_features * m.out_features for name, m in block.named_modules()
                 if isinstance(m, nn.Linear) and "lora_" not in name)
    d = hidden_size(backbone)
    seq_len, pairs = len(layout.ids), int(layout.mask.sum())
    tokens = seq_len * (2 * linear + 2 * lora)            # per layer
    return {"flops": n_layers * (tokens + 4 * d * pairs), "dense_flops": n_layers * (tokens + 4 * d * seq_len**2),
            "seq_len": seq_len, "attended_pairs": pairs, "n_layers": n_layers, "d_llm": d,
            "linear_params_per_block": linear, "lora_params_per_block": lora}


def window_flops(model, prep, start: int, group: int) -> list[dict]:
    """`backbone_flops` of each sequence one window's nodes are cut into (`group` nodes each; 0 = all in one)."""
    import numpy as np
    n = prep.city.n_nodes
    group = group or n
    context = prep.batch(np.array([start])).get("context") or {}
    return [backbone_flops(model.backbone, model.layout(min(group, n - lo), context)) for lo in range(0, n, group)]


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


def timed(run_pass, repeats: int, timer: DecoderTimer) -> tuple[list[float], list[float], object]:
    """Wall and backbone seconds of `repeats` calls of run_pass(), and what the last call returned."""
    walls, inside, out = [], [], None
    for _ in range(repeats):
        timer.seconds = 0.0
        start = time.perf_counter()
        out = run_pass()
        walls.append(time.perf_counter() - start)
        inside.append(timer.seconds)
    return walls, inside, out


# --------------------------------------------------------------------------------------------- workers


def worker_mode(args) -> dict:
    """One backbone mode on the run's own test windows."""
    import numpy as np

    from stllm.backbone import decoder_body, memory_footprint
    from stllm.data.fit import load_city
    from stllm.infer import predict
    from stllm.metrics import MetricAccumulator
    from stllm.model import STLLM
    from stllm.train import peak_rss_mb
    rss_start = rss_mb()
    model = STLLM.from_pretrained(args.run, quantize=MODES[args.worker])
    memory = memory_footprint(model.backbone)
    city = load_city(model.cfg.data)
    prep = model.prepare(city)
    starts = prep.splits["test"][:args.windows]
    timer = DecoderTimer(decoder_body(model.backbone))
    one_pass = lambda: predict(model, prep, starts, batch_size=args.batch_size)  # noqa: E731
    one_pass()  # warm-up: layouts tokenized, kernels packed (bnb repacks nf4 weights on first CPU call)
    peak = matmul_flops(args.mm_size)
    walls, backbone_s, out = timed(one_pass, args.repeats, timer)
    acc = MetricAccumulator()
    acc.update(out["prediction"], out["truth"])
    np.save(Path(args.worker_dir) / f"{args.worker}.npy", out["prediction"])
    n = len(starts)
    flops = window_flops(model, prep, starts[0], model.cfg.model.nodes_per_sequence)
    flops_per_window = sum(f["flops"] for f in flops)
    wall, bb = statistics.median(walls), statistics.median(backbone_s)
    achieved = flops_per_window * n / bb
    return {"mode": args.worker, "quantize": MODES[args.worker], "n_windows": n, "n_nodes": city.n_nodes,
            "batch_size": args.batch_size, "repeats": args.repeats,
            "s_per_window": wall / n, "windows_per_s": n / wall, "pass_s_all": walls,
            "backbone_s_per_window": bb / n, "backbone_share": bb / wall,
            "mae": acc.compute()["mae"], "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss_start,
            "model_memory": memory,
            "roofline": {"seq_len": flops[0]["seq_len"], "sequences_per_window": len(flops),
                         "flops_per_window": flops_per_window,
                         "dense_flops_per_window": sum(f["dense_flops"] for f in flops),
                         "attended_pairs_per_window": sum(f["attended_pairs"] for f in flops),
                         "achieved_flops": achieved, "matmul_peak_flops": peak, "mm_size": args.mm_size,
                         "ratio": achieved / peak,
                         **{k: flops[0][k] for k in ("n_layers", "d_llm", "linear_params_per_block",
                                                     "lora_params_per_block")}}}


def worker_city(args) -> dict:
    """The run on a synthetic city of --city-nodes sensors, nodes_per_sequence = args.group."""
    from stllm.backbone import decoder_body
    from stllm.data.fit import fit_to_run
    from stllm.data.synthetic import make_city
    from stllm.infer import forecast
    from stllm.model import STLLM
    from stllm.train import peak_rss_mb
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
    walls, backbone_s, _ = timed(lambda: list(forecast(model, prep, starts, batch_size=1)), args.city_repeats, timer)
    flops = window_flops(model, prep, starts[0], args.group)
    total = sum(f["flops"] for f in flops)
    n, wall, bb = len(starts), statistics.median(walls), statistics.median(backbone_s)
    return {"group": args.group, "n_nodes": city.n_nodes, "n_windows": n, "repeats": args.city_repeats,
            "seq_len": flops[0]["seq_len"], "sequences_per_window": len(flops),
            "s_per_window": wall / n, "pass_s_all": walls, "backbone_s_per_window": bb / n,
            "backbone_flops_per_window": total, "backbone_dense_flops_per_window": sum(f["dense_flops"] for f in flops),
            "backbone_achieved_flops": total * n / bb, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()}


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
                            "memory_ratio_max": t["model_memory_ratio"],    # backbone, embedding included
                            "memory_met": mem["ratio_vs_fp32"] <= t["model_memory_ratio"]}
    ref["targets"] = {"roofline_min": TARGETS["roofline"], "roofline_met": ref["roofline"]["ratio"] >= TARGETS["roofline"]}


def markdown(results: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"
    lines = ["| backbone | s/window | windows/s | backbone share | peak RSS MiB | backbone MiB, embedding included "
             "(embedding MiB, quantized?) | vs fp32, embedding included | decoder blocks alone: MiB, vs fp32 | "
             "masked MAE | MAE vs fp32 | roofline (masked-out attention not counted) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["modes"].items():
        mem = r["model_memory"]
        embedding = f"{mib(mem['embedding_bytes'])}, {'quantized' if mem['embedding_quantized'] else 'not quantized'}"
        lines.append(f"| {name} | {r['s_per_window']:.4f} | {r['windows_per_s']:.1f} | {r['backbone_share']:.0%} | "
                     f"{r['peak_rss_mb']:.0f} | {mib(mem['bytes'])} ({embedding}) | "
                     f"{mem.get('ratio_vs_fp32', 1):.2f} | "
                     f"{mib(mem['blocks_bytes'])}, {mem.get('blocks_ratio_vs_fp32', 1):.2f} | "
                     f"{r['mae']:.3f} | {r.get('mae_rel_diff', 0):+.2%} | {r['roofline']['ratio']:.2f} |")
    if results.get("city"):
        lines += ["", f"| {results['city'][0]['n_nodes']} sensors: nodes_per_sequence | sequence length | "
                  "sequences/window | s/window | backbone s/window | backbone GFLOP/window (masked-out attention not "
                  "counted) | peak RSS MiB |",
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
