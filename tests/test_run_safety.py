"""A run folder survives every mistake: refused resumes change nothing, files are only replaced whole, damaged
files get named errors, bad arguments are refused before work is done, and `kill -9` at any step resumes to the
same metrics."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stllm import checkpoint
from stllm.cli import main
from stllm.model import STLLM
from stllm.train import train
from run_results import numbers

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
ENCODER_ONLY = ["model.use_llm=false", "train.max_steps=2", "train.eval_every=1"]


def hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (names relative to it) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """A finished tiny GPT-2 run (LoRA adapter, prompt, checkpoints), to copy and damage."""
    from stllm.config import load_config
    out = tmp_path_factory.mktemp("safety") / "run"
    train(load_config(TINY, ["train.max_steps=2", "train.eval_every=1"]), out, progress=False)
    return out


@pytest.fixture
def run_copy(llm_run, tmp_path):
    return Path(shutil.copytree(llm_run, tmp_path / "run"))


# ---- 1. resume compares configs before touching a file ----------------------------------------------------------
def test_a_refused_resume_names_every_key_and_leaves_the_run_byte_identical(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", TINY, "--out", str(run), "--quiet", "--set", *ENCODER_ONLY]) == 0
    before = hashes(run)
    assert main(["train", "--config", TINY, "--out", str(run), "--quiet", "--resume", "--set", *ENCODER_ONLY,
                 "encoder.d_enc=32", "model.head_hidden=8", "train.max_steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stllm train: error: --resume")
    assert "encoder.d_enc: 16 in the run, 32 given" in err and "model.head_hidden: 32 in the run, 8 given" in err
    assert "train.max_steps" not in err.split("A resumed")[0]             # a budget key is no difference
    assert hashes(run) == before                                         # not one byte changed, nothing added
    STLLM.from_pretrained(run)                                           # and the run still loads


def test_resume_without_a_run_is_a_clear_error_and_creates_nothing(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="does not exist; drop --resume"):
        train(tiny_config(ENCODER_ONLY), tmp_path / "none", resume=True, progress=False)
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no run \(no config.yaml\)"):
        train(tiny_config(ENCODER_ONLY), tmp_path / "empty", resume=True, progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_finished_run_continues_with_a_larger_budget_and_is_left_alone_without_one(tmp_path, tiny_config):
    from stllm.train import RESUME_MAY_CHANGE
    assert set(RESUME_MAY_CHANGE) >= {"train.max_steps", "train.max_minutes", "train.epochs", "train.patience"}
    run = tmp_path / "run"
    first = train(tiny_config(ENCODER_ONLY), run, progress=False)
    assert first["training"]["steps"] == 2 and first["training"]["stopped_by"] == "max_steps"
    more = train(tiny_config([*ENCODER_ONLY, "train.max_steps=4"]), run, resume=True, progress=False)
    assert more["training"]["steps"] == 4 and more["training"]["stopped_by"] == "max_steps"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    before = hashes(run)                                                 # the budget is spent: nothing to do
    again = train(tiny_config([*ENCODER_ONLY, "train.max_steps=3"]), run, resume=True, progress=False)
    assert again == json.loads((run / "metrics.json").read_text()) and hashes(run) == before


class Interrupt(Exception):
    pass


def test_a_warm_started_run_resumed_after_its_first_validation_validates_step_0_once(tmp_path, tiny_config):
    train(tiny_config(ENCODER_ONLY), tmp_path / "src", progress=False)
    cfg = tiny_config([*ENCODER_ONLY, f"train.init_from={tmp_path / 'src'}", "train.max_steps=4",
                       "train.eval_every=2", "train.lr_decay_after=1"])
    whole = train(cfg, tmp_path / "whole", progress=False)

    def stop(step):
        raise Interrupt
    with pytest.raises(Interrupt):                                     # after step 1: the checkpoint is step 0's
        train(cfg, tmp_path / "cut", progress=False, on_step=stop)
    assert checkpoint.load(tmp_path / "cut" / "checkpoints/last.safetensors")[1]["step"] == 0
    assert numbers(train(cfg, tmp_path / "cut", resume=True, progress=False)) == numbers(whole)
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("whole", "cut")]
    assert [r["step"] for r in logs[1]] == [0, 2, 4] and numbers(logs[0]) == numbers(logs[1])


# ---- 2. files are replaced only by complete new versions ----------------------------------------------------------
def test_every_file_of_a_run_is_written_beside_and_renamed_into_place(tmp_path, tiny_config, monkeypatch):
    renamed, rename = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), rename(src, dst))[1])
    train(tiny_config(["train.max_steps=2", "train.eval_every=1"]), tmp_path / "run", progress=False)
    assert {"config.yaml", "model.safetensors", "meta.json", "metrics.json", "prompt.txt", "adapter",
            "last.safetensors", "best.safetensors"} <= set(renamed)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_a_crash_while_saving_leaves_the_old_weights_and_adapter_whole(run_copy, monkeypatch):
    model = STLLM.from_pretrained(run_copy)
    before = hashes(run_copy)

    def half_then_crash(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt
    monkeypatch.setattr("stllm.model.save_file", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(run_copy)
    monkeypatch.undo()

    def adapter_half_then_crash(folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_config.json").write_text("{")
        raise KeyboardInterrupt
    monkeypatch.setattr(model.backbone, "save_pretrained", adapter_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(run_copy)
    after = hashes(run_copy)
    for name in ("model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert after[name] == before[name], name
    assert not [p for p in run_copy.rglob("*") if p.name.endswith(".tmp")]
    STLLM.from_pretrained(run_copy)


def test_replacing_keeps_the_old_file_or_folder_when_writing_fails(tmp_path):
    (tmp_path / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with checkpoint.replacing(tmp_path / "f.txt") as tmp:
            tmp.write_text("ne")
            raise RuntimeError
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("old")
    with checkpoint.replacing(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    checkpoint.atomic_write_text(tmp_path / "g.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "old" and (tmp_path / "g.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["b"]         # the folder swapped whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt", "g.txt"]
    os.replace(tmp_path / "d", tmp_path / "d.old")                  # a crash between a folder's two renames
    (tmp_path / "f.txt.tmp").write_text("half")                       # and one while writing a file
    checkpoint.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt", "g.txt"]


# ---- 3. the run folder is made only after config and data are checked ---------------------------------------------
@pytest.mark.parametrize("bad", [["data.name=/no/such/file.csv"], ["data.options={n_nodez: 6}"],
                                 ["train.encoder_first_steps=2", "model.encoder_skip=false"]])
def test_a_bad_config_or_data_leaves_no_run_folder(tmp_path, tiny_config, bad):
    with pytest.raises(ValueError):
        train(tiny_config(bad), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- 4. damaged inputs get named errors --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_weights_name_the_run(run_copy, capsys, damage):
    weights = run_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + b"zip" * 400)
    with pytest.raises(checkpoint.DamagedRun, match=rf"the weights of {run_copy} are damaged \(model.safetensors: "
                                                    r".+\); retrain or restore it"):
        STLLM.from_pretrained(run_copy)
    assert main(["evaluate", "--run", str(run_copy)]) == 2
    assert capsys.readouterr().err.startswith(f"stllm evaluate: error: the weights of {run_copy} are damaged")


def test_a_config_that_does_not_parse_is_named(run_copy, capsys):
    (run_copy / "config.yaml").write_text("data: [unclosed\n  t_in: 12\n")
    with pytest.raises(ValueError, match=rf"{run_copy / 'config.yaml'} does not parse as YAML"):
        STLLM.from_pretrained(run_copy)
    (run_copy / "config.yaml").write_text("- just\n- a list\n")
    assert main(["predict", "--run", str(run_copy), "--data", "synthetic", "--out", str(run_copy / "p.npz")]) == 2
    assert "config.yaml is damaged: expected sections" in capsys.readouterr().err


def test_a_damaged_meta_json_is_named(run_copy):
    (run_copy / "meta.json").write_text('{"n_nodes": 6,')
    with pytest.raises(checkpoint.DamagedRun, match=f"meta.json of {run_copy} is damaged"):
        STLLM.from_pretrained(run_copy)


@pytest.mark.parametrize("key, value, message", [
    ("encoder.d_enc", 32, "encoder.d_enc is 32 in the config, 16 in the weights"),
    ("model.head_hidden", 64, "model.head_hidden is 64 in the config, 32 in the weights"),
    ("encoder.mix_hidden", 128, "encoder.mix_hidden is 128 in the config, 256 in the weights"),
    ("backbone.lora_r", 8, "backbone.lora_r is 8 in the config, 4 in the weights"),
    ("data.t_out", 6, "data.t_out is 6 in the config, 12 in the weights"),
    ("model.tokens_per_node", 2, "model.tokens_per_node is 2 in the config, 1 in the weights"),
    ("encoder.mix_hidden", 0, "the weights were trained with another encoder.mix_hidden than config.yaml's"),
])
def test_weights_that_do_not_fit_the_config_name_the_key(run_copy, key, value, message):
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    (run_copy / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(checkpoint.DamagedRun, match=message):
        STLLM.from_pretrained(run_copy)


def test_shapes_no_key_explains_name_the_tensor_and_both_shapes():
    from stllm.config import load_config
    message = checkpoint.explain_shapes({"pre_query": ((32,), (64,))}, load_config(TINY))
    assert message == "pre_query has shape [64] in the weights, [32] in the model its config builds"


# ---- 5. CLI arguments are checked before a model is loaded -------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    loaded = []
    monkeypatch.setattr(STLLM, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a) or 1 / 0))
    return loaded


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_batch_size_must_be_positive(tmp_path, capsys, command):
    args = [command, "--run", str(tmp_path), "--batch-size", "0"]
    args += ["--data", "synthetic", "--out", str(tmp_path / "p.npz")] if command == "predict" else []
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert f"stllm {command}: error: argument --batch-size: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_output_paths_are_refused_before_the_model_is_loaded(tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("not a folder")
    cases = [(["predict", "--data", "synthetic", "--out", str(tmp_path / "p.txt")], "--out must end in .npz or .csv"),
             (["predict", "--data", "synthetic", "--out", str(tmp_path / "file" / "p.npz")], "is not a folder"),
             (["evaluate", "--out", str(tmp_path / "file" / "sub" / "m.json")], "is not a folder"),
             (["evaluate", "--out", str(tmp_path)], "is a folder; give a file name")]
    for args, message in cases:
        assert main([args[0], "--run", str(tmp_path), *args[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"stllm {args[0]}: error: --out") and message in err, err
    assert no_loading == []


# ---- 6. a reproducible stage-1 budget, and why a run stopped -----------------------------------------------------
def test_encoder_first_steps_ends_stage_one_after_that_many_steps(tmp_path, tiny_config):
    cfg = tiny_config(["train.encoder_first_steps=2", "train.max_steps=4", "train.eval_every=3", "train.patience=10",
                       "train.lora_lr=0.01"])
    metrics = train(cfg, tmp_path / "run", progress=False)
    stage1 = metrics["training"]["encoder_stage"]
    assert stage1["steps"] == 2 and stage1["stopped_by"] == "encoder_first_steps"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4]              # stage 1 validates at its end, then eval_every
    last = checkpoint.load(tmp_path / "run" / "checkpoints/last.safetensors")[0]
    assert any(last[k].abs().max() > 0 for k in last if "lora_B" in k)    # stage 2 trained the adapter


@pytest.mark.parametrize("overrides, reason", [
    (["train.max_steps=2"], "max_steps"),
    (["train.max_steps=0", "train.max_minutes=1e-9"], "max_minutes"),
    (["train.max_steps=5", "train.patience=1", "train.lr=1000", "train.grad_clip=0"], "early_stopping"),
    (["train.max_steps=0", "train.train_stride=60"], "epochs"),
])
def test_metrics_say_what_stopped_the_run(tmp_path, tiny_config, capsys, overrides, reason):
    metrics = train(tiny_config(["model.use_llm=false", "train.eval_every=1", *overrides]), tmp_path / "run",
                    progress=False)
    assert metrics["training"]["stopped_by"] == reason
    assert ("train.max_minutes=1e-09 reached after 1 steps" in capsys.readouterr().out) == (reason == "max_minutes")


# ---- 7. kill -9 at any step resumes to identical metrics ---------------------------------------------------------
KILLED = """
import os, signal, sys
import peft, transformers.models.gpt2.modeling_gpt2   # imported once, before the children fork
from stllm import checkpoint
from stllm.config import load_config
from stllm.data.fit import load_city
from stllm.train import train
overrides, out, kills = sys.argv[1].split(), sys.argv[2], sys.argv[3:]
load_city(load_config("configs/tiny.yaml", overrides).data)   # imports the data modules; numpy only
save = checkpoint.atomic_save
for kill in kills:   # one child per kill, forked before torch computes anything, each ended by SIGKILL
    where, k = kill.split(":")
    pid = os.fork()
    if pid == 0:
        def after_step(step):                  # step:k - after optimizer step k
            if where == "step" and step == int(k):
                os.kill(os.getpid(), signal.SIGKILL)
        saves = []
        def atomic_save(tensors, path, metadata=None):   # save:n - halfway through writing the n-th last.safetensors
            saves.append(path)
            if where == "save" and str(path).endswith("last.safetensors") and len(
                    [p for p in saves if str(p).endswith("last.safetensors")]) == int(k):
                open(str(path) + ".tmp", "wb").write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            save(tensors, path, metadata)
        checkpoint.atomic_save = atomic_save
        train(load_config("configs/tiny.yaml", overrides), f"{out}/{where}_{k}", progress=False, on_step=after_step)
        os._exit(0)
    print("status", kill, os.waitpid(pid, 0)[1], flush=True)
"""


def test_kill_9_at_a_random_step_resumes_to_the_same_metrics(tmp_path, tiny_config):
    """SIGKILL after a random optimizer step (one before the first checkpoint), and halfway through writing a
    checkpoint (the one that switches stage 2 on, and a random one); each resumed run ends with the uninterrupted
    run's metrics.json and log, every number equal."""
    # two stages (stage 1 ends at step 4), an average of the weights and dropout: every kind of state must resume
    overrides = ["train.max_steps=8", "train.eval_every=3", "train.encoder_first_steps=4", "train.patience=10",
                 "train.ema=0.5", "encoder.dropout=0.2", "train.lora_lr=0.01", "train.num_threads=1"]
    # last.safetensors is written at steps 3, 4 (validation), 4 (stage 2 begins), 6, 8 (validation), 8 (done)
    rng = np.random.default_rng(7)
    kills = ["step:2", f"step:{rng.integers(4, 9)}", "save:3", f"save:{rng.choice([1, 2, 4, 5, 6])}"]
    done = subprocess.run([sys.executable, "-c", KILLED, " ".join(overrides), str(tmp_path), *kills],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})   # forking is safe with one thread
    assert done.returncode == 0, done.stderr
    statuses = {k: int(s) for tag, k, s in (line.split() for line in done.stdout.splitlines() if line[:6] == "status")}
    assert list(statuses) == kills, done.stdout
    assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in statuses.values()), statuses
    assert not (tmp_path / "step_2" / "checkpoints").exists()        # killed before its first checkpoint
    threads = torch.get_num_threads()
    try:
        whole = train(tiny_config(overrides), tmp_path / "whole", progress=False)
        whole_log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
        for kill in kills:
            run = tmp_path / kill.replace(":", "_")
            assert not (run / "metrics.json").exists()
            resumed = train(tiny_config(overrides), run, resume=True, progress=False)
            assert numbers(resumed) == numbers(whole), kill
            assert numbers(json.loads((run / "metrics.json").read_text())) == numbers(whole), kill
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            assert numbers(log) == numbers(whole_log), kill                # no record lost, none twice
            assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], kill
    finally:
        torch.set_num_threads(threads)
    assert whole["training"]["encoder_stage"]["steps"] == 4 and whole["training"]["stopped_by"] == "max_steps"
