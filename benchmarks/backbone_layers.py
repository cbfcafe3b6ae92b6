"""Forward+backward time of the SmolLM2 backbone truncated to k layers, with LoRA, on this machine.

One step = a batch of `--batch` sequences of `--seq-len` positions fed as inputs_embeds (as the projector
does), hidden states of the last layer read by a dummy head, backward into the LoRA weights and the inputs.
The LM head is skipped (`logits_to_keep=1`), as the regression path does; `--lm-head` includes it.

    python benchmarks/backbone_layers.py --out /tmp/backbone_layers.json
    python benchmarks/backbone_layers.py --threads 1 --out /tmp/backbone_layers_1thread.json

On cores shared with other jobs, two torch threads wait on each other and wall times swing by 10x; one
thread (and the "cpu ms" column) gives stable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from stllm.backbone import BackboneConfig, build_backbone, describe, hidden_size


def time_step(model: torch.nn.Module, x: torch.Tensor, lm_head: bool) -> tuple[float, float]:
    """(wall, CPU) seconds for one forward+backward on inputs_embeds x [b, L, d_llm]. CPU time is the sum
    over this process's threads; on a machine shared with other jobs it tracks the work better than wall."""
    x = x.detach().requires_grad_(True)  # the projector upstream is trained, so gradients reach the inputs
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model(inputs_embeds=x, output_hidden_states=True, logits_to_keep=0 if lm_head else 1)
    loss = out.hidden_states[-1].pow(2).mean()  # (b, L, d_llm) -> scalar, stands in for the head's loss
    if lm_head:
        loss = loss + out.logits.float().logsumexp(-1).mean()
    loss.backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(k: int, args: argparse.Namespace) -> dict:
    cfg = BackboneConfig(n_layers=k, lora_r=args.lora_r, quantize=args.quantize)
    model, _ = build_backbone(cfg)
    model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, hidden_size(model), generator=gen) * 0.05  # (b, L, d_llm)
    time_step(model, x, args.lm_head)  # warmup
    walls, cpus = zip(*[time_step(model, x, args.lm_head) for _ in range(args.repeats)])
    ms = statistics.median(walls) * 1e3
    ms_min = min(walls) * 1e3  # less sensitive to other processes sharing the cores
    tokens = args.batch * args.seq_len
    return {
        "k": k,
        "ms_per_step": round(ms, 1),
        "ms_min": round(ms_min, 1),
        "tokens_per_s": round(tokens / (ms / 1e3), 1),
        "min_per_10k_windows": round(10_000 / args.batch * ms / 1e3 / 60, 1),
        "cpu_ms_per_step": round(statistics.median(cpus) * 1e3, 1),
        "ms_all": [round(t * 1e3, 1) for t in walls],
        "load_avg_1min": round(os.getloadavg()[0], 2),  # > cores means the timing was shared
        "params_trainable": describe(model)["params_trainable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=180)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"])
    parser.add_argument("--lm-head", action="store_true", help="also compute full-vocabulary logits")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    columns = ["k", "ms_per_step", "ms_min", "cpu_ms_per_step", "tokens_per_s", "min_per_10k_windows", "load_avg_1min"]
    print(" ".join(f"{c:>12}" for c in ["k", "ms/step", "ms min", "cpu ms", "tokens/s", "min/10k win", "load"]))
    results = []
    for k in args.layers:
        results.append(measure(k, args))
        print(" ".join(f"{results[-1][c]:>12}" for c in columns))
    report = {
        "model": "smollm2-135m",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "quantize": args.quantize,
        "lm_head": args.lm_head,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
