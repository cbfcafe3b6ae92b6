"""The object users hold: `STLLM.from_pretrained(run)` -> predict / evaluate / explain / save_pretrained; and the
rooms of the package (no module reaches into another's private names)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stllm.data.city import DataError
from stllm.data.fit import RunMeta
from stllm.data.prepared import PreparedCity
from stllm.data.synthetic import make_city
from stllm.explain import explain
from stllm.model import STLLM
from stllm.train import build_model, train

ROOT = Path(__file__).resolve().parent.parent
AT = 450                                   # a test-split window of the 21-day city (history 438..449)


@pytest.fixture(scope="module")
def city():
    return make_city(n_nodes=6, n_days=21, seed=0)            # the city configs/tiny.yaml names


@pytest.fixture(scope="module")
def run(tmp_path_factory, city):
    from stllm.config import load_config
    out = tmp_path_factory.mktemp("api") / "run"
    train(load_config(ROOT / "configs" / "tiny.yaml", ["train.max_steps=3"]), out, city=city, progress=False)
    return out


@pytest.fixture(scope="module")
def model(run):
    return STLLM.from_pretrained(run)


def test_from_pretrained_returns_one_object_that_carries_its_data_settings(model, city):
    assert isinstance(model, STLLM) and not model.training
    prep = PreparedCity(city, model.cfg.data, model.cfg.encoder)
    m = model.meta
    assert isinstance(m, RunMeta) and m.dataset == "synthetic" and m.n_nodes == 6
    assert (m.channels, m.units, m.n_channels) == (["flow"], ["count"], 1)
    assert m.interval == pd.Timedelta("1h") and m.exog_names == prep.exog_names and m.n_exog == len(prep.exog_names)
    assert m.train_end == pd.Timestamp(city.timestamps[prep.train_end - 1])
    np.testing.assert_array_equal(m.scaler.mean, prep.scaler.mean)       # the training part's scaler
    np.testing.assert_array_equal(m.scaler.std, prep.scaler.std)
    assert model.tokenizer is not None and model.backbone is not None


def test_save_pretrained_then_from_pretrained_round_trips_the_carried_fields(model, city, tmp_path):
    model.save_pretrained(tmp_path / "copy")                              # no meta argument: the model holds it
    copy = STLLM.from_pretrained(tmp_path / "copy")
    assert copy.meta.to_dict() == model.meta.to_dict()
    assert json.loads((tmp_path / "copy" / "meta.json").read_text()) == model.meta.to_dict()
    assert RunMeta.from_dict(model.meta.to_dict()).to_dict() == model.meta.to_dict()
    assert copy.cfg.to_dict() == model.cfg.to_dict() and copy.prompt.text == model.prompt.text
    assert copy.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    a, b = model.trainable_state_dict(), copy.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(copy.predict(city, at=AT)["prediction"], model.predict(city, at=AT)["prediction"])


def test_saving_a_model_without_its_meta_is_refused(city, tmp_path):
    from stllm.config import load_config
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.use_llm=false"])
    fresh = build_model(cfg, PreparedCity(city, cfg.data, cfg.encoder))
    assert fresh.meta is not None                                         # training's builder attaches it
    fresh.meta = None
    with pytest.raises(ValueError, match="carries no RunMeta"):
        fresh.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "config.yaml").exists()


def test_predict_one_window_at_a_time_for_chosen_nodes(model, city):
    whole = model.predict(city)                                           # every test window, every node
    assert whole["prediction"].shape[1:] == (12, 6, 1) and whole["node_ids"] == city.nodes["id"].tolist()
    at = pd.Timestamp(city.timestamps[AT])
    one = model.predict(city, at=str(at), nodes=["S03", "S01", 5])        # ids, a name or a position, in any order
    assert one["prediction"].shape == (1, 12, 3, 1) and one["node_ids"] == ["S03", "S01", "S05"]
    assert pd.Timestamp(one["timestamps"][0, 0]) == at and list(one["starts"]) == [AT]
    k = list(whole["starts"]).index(AT)
    np.testing.assert_allclose(one["prediction"][0], whole["prediction"][k][:, [3, 1, 5]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(one["truth"][0], city.values[AT:AT + 12][:, [3, 1, 5]])
    by_step = model.predict(city, at=AT, nodes="S03")
    np.testing.assert_allclose(by_step["prediction"][0, :, 0], one["prediction"][0, :, 0], rtol=1e-6)
    last = model.predict(city, last=True)
    np.testing.assert_allclose(model.predict(city, at=city.n_steps)["prediction"], last["prediction"], rtol=1e-6)
    assert np.isnan(last["truth"]).all()                                  # the future after the data is unknown
    with pytest.raises(ValueError, match="not both"):
        model.predict(city, at=AT, last=True)
    with pytest.raises(DataError, match="unknown node 'S99'"):
        model.predict(city, at=AT, nodes=["S99"])
    with pytest.raises(DataError, match="outside the data"):
        model.predict(city, at="2030-01-01 00:00")


def test_evaluate_gives_the_metrics_of_stllm_evaluate(model, run, city):
    m = model.evaluate(city)
    stored = json.loads((run / "metrics.json").read_text())
    assert m["mae"] == pytest.approx(stored["mae"], rel=1e-5) and m["n_windows"] == stored["n_windows"]
    assert set(m["baselines"]) == {"last", "same_time_yesterday", "same_time_last_week", "historical_average",
                                  "last_4_weeks"}
    assert m["zero_shot"] is False and m["source_dataset"] == "synthetic" and m["split"] == "test"
    prep = model.prepare(city)                                            # prepared once, used for several calls
    assert model.evaluate(prep, split="val")["n_windows"] == len(prep.splits["val"])
    other = make_city(n_nodes=4, n_days=21, seed=5, name="elsewhere")
    assert model.evaluate(other)["zero_shot"] is True


def test_explain_on_the_object(model, city):
    r = model.explain(city, "S03", AT)
    assert r == explain(model, city, "S03", AT)                           # the same as the module's function
    assert r["mode"] == "analytic" and r["node"] == "S03" and r["numbers_consistent"] is True
    head = model.predict(city, at=AT, nodes="S03")["prediction"][0, :, 0, 0]
    np.testing.assert_allclose(r["forecast"], head, rtol=1e-5)            # the head's numbers, as predict gives
    assert r["faithfulness"] == 1.0


# ------------------------------------------------------------------------------------------------- rooms


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Imports in one stllm module of another stllm module's private (underscore) names, or of a private module
    from outside its package; `module._name` attribute reads of an imported stllm module count too."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found, modules = [], {}

    def private_module(module: str) -> bool:   # stllm.a._b is private to stllm.a and what lies under it
        parts = module.split(".")
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(parts[:i])
                return not (package == owner or package.startswith(owner + "."))
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:                     # relative: resolve against this package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if not module.startswith("stllm"):
                continue
            if private_module(module):
                found.append(f"{path.name}:{node.lineno} imports from private module {module}")
            for alias in node.names:
                if alias.name.startswith("_") and module != name:
                    found.append(f"{path.name}:{node.lineno} from {module} import {alias.name}")
                else:
                    modules[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stllm"):
                    if private_module(alias.name):
                        found.append(f"{path.name}:{node.lineno} imports private module {alias.name}")
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = sorted((ROOT / "stllm").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in _private_imports(f)]
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_private_import_check_catches_what_it_should(tmp_path):
    probe = tmp_path / "stllm" / "data" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("\n".join([
        "from stllm.metrics import _mean_where, masked_mae",    # a private name: caught
        "from stllm.data.loaders._common import read_csv",      # a private module of another package: caught
        "from stllm import model",
        "model._saved",                                          # a private attribute of a module: caught
        "from stllm.data._own import helper",                    # a private module of its own package: allowed
    ]))
    found = _private_imports(probe, tmp_path)
    assert len(found) == 3, found
