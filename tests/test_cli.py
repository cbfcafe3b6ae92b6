"""The command line, as a user runs it: train -> evaluate -> predict, and clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stllm.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", TINY, "--out", str(out), "--quiet", "--set", "train.max_steps=4"]) == 0
    return out


def test_evaluate_writes_the_documented_json(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--run", str(run_dir), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    for key in ("dataset", "split", "n_windows", "mae", "rmse", "mape", "per_horizon", "unmasked", "baselines"):
        assert key in m, key
    assert m["split"] == "test" and m["zero_shot"] is False and len(m["per_horizon"]["mae"]) == 12
    assert set(m["baselines"]) == {"last", "same_time_yesterday", "same_time_last_week", "historical_average",
                                  "last_4_weeks"}
    for b in m["baselines"].values():
        assert {"mae", "rmse", "mape", "per_horizon", "unmasked"} <= set(b)
    assert "historical_average" in capsys.readouterr().out       # the table was printed


def test_predict_npz_and_csv(run_dir, tmp_path):
    # the run's own dataset (with the config's loader options) is used when --data names it
    meta = json.loads((run_dir / "meta.json").read_text())
    assert main(["predict", "--run", str(run_dir), "--data", meta["dataset"], "--out", str(tmp_path / "p.npz")]) == 0
    z = np.load(tmp_path / "p.npz")
    assert z["prediction"].shape[1:] == (12, 6, 1) and np.isfinite(z["prediction"]).all()
    assert main(["predict", "--run", str(run_dir), "--data", meta["dataset"], "--last", "--out", str(tmp_path / "p.csv")]) == 0
    frame = pd.read_csv(tmp_path / "p.csv")
    assert list(frame.columns) == ["window_start", "time", "horizon", "node", "channel", "prediction", "truth"]
    assert len(frame) == 12 * 6 and frame["truth"].isna().all()      # the future after the data is unknown


def test_errors_name_what_is_wrong(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "train.lerning_rate" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a stllm run" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--out", str(tmp_path / "y"), "--set", "data.name=/no/such/file.csv"]) == 2
    assert "/no/such/file.csv" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([str(Path(sys.executable).parent / "stllm"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout
