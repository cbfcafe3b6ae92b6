"""The text probe, small and fast: a tiny random GPT-2 reads the notes of a synthetic city whose events exist only
in notes (benchmarks/text_probe.py is the full version, with SmolLM2 and paraphrased test notes)."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_probe_city_hides_events_in_notes_only():
    from stllm.data.probe import EVENTS, event_mask, make_probe_city
    from stllm.data.synthetic import make_city
    city, plain = make_probe_city(n_nodes=8, n_days=28), make_city(n_nodes=8, n_days=28)
    ratio = city.values / plain.values                                     # [T, N, 1]: 1 outside events
    inside = event_mask(city, np.arange(city.n_steps), 1)[:, 0]            # [T, N]
    finite = np.isfinite(ratio[..., 0]) & (plain.values[..., 0] > 0)
    assert np.allclose(ratio[..., 0][~inside & finite], 1.0)
    seen = np.round(ratio[..., 0][inside & finite].astype(float), 3)
    assert np.isin(seen, [round(f, 3) for f, *_ in EVENTS]).all()          # only the events' factors
    test_nodes = {n for nodes, start in zip(city.notes["nodes"], city.notes["start"])
                  if start >= city.timestamps[int(0.8 * city.n_steps)] for n in nodes}
    assert test_nodes and all(n % 2 == 1 for n in test_nodes)             # test events: the other sensors


@pytest.mark.slow
def test_a_tiny_language_model_learns_to_read_the_notes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import text_probe
    result = text_probe.run_probe(tmp_path, steps=200, stage1_steps=0, paraphrase_test=False,
                                  extra=["train.eval_every=25", "train.val_windows=60", "train.epochs=100",
                                         "model.note_hidden=32"],
                                  config=ROOT / "configs" / "tiny.yaml", city_size=(8, 28))
    ratios = result["ratios"]
    assert ratios["event_stllm_over_encoder_only"] < 0.85                  # the notes are read (0.69 measured)
    assert ratios["event_shuffled_over_encoder_only"] > 0.9                # at wrong places and times: no gain
    assert result["event_windows"]["no_notes"] > result["event_windows"]["stllm"] * 1.2
    assert 0.95 < ratios["other_stllm_over_encoder_only"] < 1.05            # elsewhere: about the ablation
