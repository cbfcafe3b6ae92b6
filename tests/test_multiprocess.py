"""Training under `accelerate launch` with 2 processes: the command README gives for several GPUs, here on the
CPU (torchrun starts the processes; without CUDA they join a gloo group, accelerate's MULTI_CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "stllm.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--out", str(out), "--quiet", "--set", "train.max_steps=4", "train.eval_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]                      # one writer: the main process
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 4 and metrics["mae"] == metrics["mae"]
    assert "training on 2 processes" in done.stdout
    assert "historical_average" in done.stdout                      # the table is printed once, by the main process
    assert done.stdout.count("historical_average") == 1
