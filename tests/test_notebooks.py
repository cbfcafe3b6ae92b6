"""The notebooks run end to end (executed with nbclient, as a user would run them)."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, env: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb


@pytest.mark.slow
def test_quickstart_runs_end_to_end():
    nb = run_notebook("quickstart.ipynb", {"STLLM_QUICKSTART_STEPS": "12"})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "same_time_last_week" in text and "[windows, horizon, sensors, channels]" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)      # the forecast plot was drawn


@pytest.mark.slow
def test_zero_shot_notebook_runs_on_real_data():
    """NYC bike -> San Francisco on a slice: a short source run, zero-shot, TTA, the plot, one-week few-shot."""
    from conftest import real_data
    real_data("NYC_Manhattan_TaxiBike")
    real_data("BayArea_BikeShare_2014")
    nb = run_notebook("zero_shot.ipynb", {"STLLM_ZERO_SHOT_STEPS": "6", "STLLM_ZERO_SHOT_WINDOWS": "24"})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "evaluated on bayarea-bike-sf (35 sensors), 24 test windows" in text
    for row in ("stllm zero-shot", "stllm zero-shot + TTA", "stllm few-shot (7 days)", "last value"):
        assert row in text, row
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2      # the two maps and the forecasts
