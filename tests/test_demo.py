"""`stllm demo` end to end with a tiny step budget (the real one: configs/demo.yaml's train.max_steps)."""
import json

import pytest


@pytest.mark.slow
def test_demo_trains_both_models_prints_the_table_and_plots(tmp_path, capsys):
    from stllm.cli import main
    from transformers.utils import logging as hf_logging
    try:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--quiet"]) == 0
    finally:
        hf_logging.enable_progress_bar()     # --quiet turns transformers' bars off for the process
    captured = capsys.readouterr()
    out = captured.out
    assert "Loading weights" not in captured.err                          # --quiet: no progress bar at all
    for row in ("stllm (SmolLM2 + LoRA)", "encoder only", "last", "same_time_yesterday", "same_time_last_week",
                "historical_average"):
        assert row in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    events = summary.pop("event_hours_mae")                               # {model: MAE inside the events}
    assert all(v["mae"] == v["mae"] for v in summary.values())           # no NaN figure
    assert set(events) == {"stllm (SmolLM2 + LoRA)", "encoder only"} and all(v == v for v in events.values())
    png = (tmp_path / "demo" / "forecast.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
