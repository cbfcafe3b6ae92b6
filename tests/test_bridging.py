"""Bridging what differs between cities: training data resampled (data.resample), loader options on the command
line (--data-option), and interval errors that say what works."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stllm.cli as cli
from stllm.cli import main
from stllm.config import ConfigError, DataConfig, load_config
from stllm.data.city import DataError
from stllm.data.fit import RunMeta, fit_to_run, load_city
from stllm.data.synthetic import make_city
from stllm.data.windows import Scaler
from stllm.model import STLLM
from stllm.train import train

ROOT = Path(__file__).resolve().parent.parent


def write_city(folder: Path, interval: str = "15min", days: int = 10, seed: int = 0) -> Path:
    """A bring-your-own city: values.csv (wide, 3 sensors, daily-periodic counts) and sensors.csv, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    times = pd.date_range("2024-03-04", periods=int(pd.Timedelta(f"{days}D") / pd.Timedelta(interval)), freq=interval)
    hours = (times.hour + times.minute / 60).to_numpy()
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"timestamp": times.strftime("%Y-%m-%d %H:%M")})
    for k, sensor in enumerate(["s1", "s2", "s3"]):
        frame[sensor] = np.round(10 + 8 * np.sin(2 * np.pi * (hours - 3 * k) / 24) + rng.random(len(times)), 1)
    frame.to_csv(folder / "values.csv", index=False)
    pd.DataFrame({"id": ["s1", "s2", "s3"], "name": ["Duomo", "Navigli", "Brera"], "lat": [45.46, 45.45, 45.47],
                  "lon": [9.19, 9.17, 9.18]}).to_csv(folder / "sensors.csv", index=False)
    return folder / "values.csv"


def tiny(overrides: list[str]):
    return load_config(ROOT / "configs" / "tiny.yaml", ["model.use_llm=false", "train.max_steps=2",
                                                        "train.eval_every=0", "data.periods=[day]", "data.options={}",
                                                        *overrides])


@pytest.fixture(scope="module")
def hourly_run(tmp_path_factory) -> Path:
    """A run trained on a 15-minute city resampled to 1 h at training time (data.resample=1h:sum)."""
    tmp = tmp_path_factory.mktemp("bridging")
    values = write_city(tmp / "city-15min")
    out = tmp / "run"
    train(tiny([f"data.name={values}", "data.resample=1h:sum"]), out, progress=False)
    return out


# ---- 1. data.resample ----------------------------------------------------------------------------------------------
def test_data_resample_is_checked_and_named():
    assert DataConfig(resample="1h:sum").resample == "1h:sum" and DataConfig().resample == ""
    for bad in ("1h", "1h:avg", "soon:sum", "0h:mean", "-1h:sum"):
        with pytest.raises(ConfigError, match=r"data\.resample must be .*'1h:sum'"):
            DataConfig(resample=bad)
    with pytest.raises(ConfigError, match=r"--set: data\.resample"):
        load_config(None, ["data.resample=1h:max"])


def test_load_city_resamples_training_data(tmp_path):
    values = write_city(tmp_path / "c")
    fine = load_city(DataConfig(name=str(values)))
    summed = load_city(DataConfig(name=str(values), resample="1h:sum"))
    mean = load_city(DataConfig(name=str(values), resample="60min:mean"))
    assert fine.interval == pd.Timedelta("15min") and summed.interval == pd.Timedelta("1h")
    assert summed.n_steps == fine.n_steps // 4
    np.testing.assert_allclose(summed.values[1], fine.values[4:8].sum(0), rtol=1e-5)
    np.testing.assert_allclose(mean.values[1], fine.values[4:8].mean(0), rtol=1e-5)
    with pytest.raises(DataError, match=r"data\.resample='10min:sum'.*whole multiple"):
        load_city(DataConfig(name=str(values), resample="10min:sum"))


def test_a_run_trained_with_data_resample_works_at_the_coarser_step(hourly_run):
    model = STLLM.from_pretrained(hourly_run)
    assert model.meta.interval == pd.Timedelta("1h") and model.cfg.data.resample == "1h:sum"


# ---- 2. --data-option ------------------------------------------------------------------------------------------
def test_data_options_reach_the_city(hourly_run, tmp_path, monkeypatch, capsys):
    values = write_city(tmp_path / "milan", interval="1h", days=6, seed=1)
    seen = []
    load_data = cli._load_data
    monkeypatch.setattr(cli, "_load_data", lambda model, args: seen.append(load_data(model, args)) or seen[-1])
    options = ["--data-option", "city=Milan", "domain=pedestrian counts", "--data-option", "units=[people]",
               "holidays=NO"]
    assert main(["evaluate", "--run", str(hourly_run), "--data", str(values), *options,
                 "--out", str(tmp_path / "m.json")]) == 0
    city = seen[-1]
    assert (city.city, city.domain, city.units, city.holidays) == ("Milan", "pedestrian counts", ["people"], "NO")
    assert json.loads((tmp_path / "m.json").read_text())["zero_shot"] is True
    assert main(["predict", "--run", str(hourly_run), "--data", str(values), *options, "--last",
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert seen[-1].city == "Milan" and (tmp_path / "p.csv").is_file()
    assert main(["explain", "--run", str(hourly_run), "--data", str(values), *options, "--node", "s2",
                 "--at", "2024-03-08 08:00", "--json"]) == 0
    assert seen[-1].domain == "pedestrian counts"
    capsys.readouterr()
    # channel=count renames the data's channel: the run's channel is value, so it must then be mapped
    assert main(["evaluate", "--run", str(hourly_run), "--data", str(values), "--data-option", "channel=count",
                 "--channels", "count=value"]) == 0
    assert seen[-1].channels == ["count"]


def test_report_takes_data_options(hourly_run, tmp_path, monkeypatch):
    import stllm.data.fit as fit
    values = write_city(tmp_path / "milan", interval="1h", days=6, seed=1)
    seen = []
    load_for_run = fit.load_for_run
    monkeypatch.setattr(fit, "load_for_run", lambda *a, **k: seen.append(load_for_run(*a, **k)) or seen[-1])
    assert main(["report", "--run", str(hourly_run), "--data", str(values), "--data-option", "city=Milan",
                 "--explain", "0", "--out", str(tmp_path / "r.html")]) == 0
    assert seen[-1].city == "Milan" and (tmp_path / "r.html").is_file()


def test_a_bad_data_option_names_the_accepted_ones(hourly_run, tmp_path, capsys, monkeypatch):
    values = write_city(tmp_path / "milan", interval="1h", days=6, seed=1)
    monkeypatch.setattr(STLLM, "from_pretrained", lambda *a, **k: pytest.fail("checked before the model loads"))
    for command in (["evaluate"], ["predict", "--out", str(tmp_path / "p.npz")],
                    ["explain", "--node", "s1", "--at", "2024-03-08 08:00"]):
        assert main([*command, "--run", str(hourly_run), "--data", str(values), "--data-option", "colour=red"]) == 2
        err = capsys.readouterr().err
        assert "unknown option(s) colour" in err and "city, " in err and "domain" in err and "holidays" in err
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--run", str(hourly_run), "--data", str(values), "--data-option", "Milan"])
    assert exit_.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


def test_data_option_values_are_yaml_but_words_stay_words():
    assert cli.data_option("n_nodes=5") == ("n_nodes", 5)
    assert cli.data_option("units=[a, b]") == ("units", ["a", "b"])
    assert cli.data_option("holidays=NO") == ("holidays", "NO")          # Norway, not YAML 1.1's false
    assert cli.data_option("sf_only=true") == ("sf_only", True)
    assert cli.data_option("domain=") == ("domain", "")


# ---- 3. interval errors that say what works --------------------------------------------------------------------------
def run_meta(interval: str) -> RunMeta:
    return RunMeta(dataset="source", n_nodes=1, channels=["flow"], units=[""], interval=interval,
                   scaler=Scaler(np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)))


def test_finer_data_is_told_to_resample_and_then_fits():
    fine = make_city(n_nodes=3, n_days=3, interval="15min", seed=2)
    with pytest.raises(DataError, match=r"one step is 15min, the run was trained on 1h steps; pass --resample sum "
                                        r"\(counts\) or --resample mean \(levels\) to aggregate 4"):
        fit_to_run(fine, run_meta("1h"))
    assert fit_to_run(fine, run_meta("1h"), resample="mean").interval == pd.Timedelta("1h")


@pytest.mark.parametrize("data, run", [("2h", "1h"), ("40min", "1h"), ("1D", "1h")])
def test_coarser_or_uneven_data_is_told_to_retrain_with_data_resample(data, run):
    city = make_city(n_nodes=3, n_days=6, interval=data, seed=2)
    for resample in (None, "sum", "mean"):                      # --resample cannot help: the same advice
        with pytest.raises(DataError) as err:
            fit_to_run(city, run_meta(run), resample=resample)
        text = str(err.value)
        assert f"one step is {data}, the run was trained on {run} steps" in text
        assert f"data.resample={data}:sum" in text and "Retrain, or fine-tune" in text
        assert "pass --resample" not in text and "can only aggregate" not in text


def test_cli_resample_on_coarser_data_says_retrain(hourly_run, tmp_path, capsys):
    values = write_city(tmp_path / "daily2h", interval="2h", days=8, seed=3)
    assert main(["evaluate", "--run", str(hourly_run), "--data", str(values), "--resample", "sum"]) == 2
    err = capsys.readouterr().err
    assert "one step is 2h, the run was trained on 1h steps" in err and "data.resample=2h:sum" in err
