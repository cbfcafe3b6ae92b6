"""The benchmark scripts' own arithmetic: the roofline's FLOP count (benchmarks/inference.py), the holiday error
breakdown (benchmarks/holiday_errors.py) and the explanation summary (benchmarks/explain.py)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stllm.backbone import BackboneConfig, build_backbone
from stllm.config import load_config
from stllm.data.synthetic import make_city
from stllm.infer import evaluate
from stllm.model import STLLM
from stllm.prompts import city_layout
from stllm.train import train

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "run"
    train(load_config(ROOT / "configs" / "tiny.yaml", ["train.max_steps=2", "backbone.name=tiny-llama"]), out,
          city=make_city(n_nodes=6, n_days=21, seed=0), progress=False)
    return out


# ---------------------------------------------------------------------------------------------------- roofline


def test_roofline_counts_only_the_attention_the_mask_allows():
    bench = load_benchmark("inference")
    backbone, tokenizer = build_backbone(BackboneConfig(name="tiny-llama", lora_r=4))
    layout = city_layout("Sensors: <NODES>node <ST_HIS> next <ST_PRE></NODES>", tokenizer, n_nodes=3, n_tokens=2)
    n = len(layout.ids)
    full = dataclasses.replace(layout, mask=torch.ones(n, n, dtype=torch.bool).tril())    # plain causal
    masked, causal = bench.backbone_flops(backbone, layout), bench.backbone_flops(backbone, full)
    pairs = int(layout.mask.sum())
    assert pairs < n * (n + 1) // 2 == causal["attended_pairs"]       # node blocks do not see each other
    assert masked["flops"] < causal["flops"] < masked["dense_flops"] == causal["dense_flops"]
    d, layers = masked["d_llm"], masked["n_layers"]
    assert causal["flops"] - masked["flops"] == layers * 4 * d * (n * (n + 1) // 2 - pairs)
    assert masked["dense_flops"] - masked["flops"] == layers * 4 * d * (n * n - pairs)
    linear = 4 * 32 * 32 + 3 * 32 * 64                               # q, k, v, o and gate, up, down of tiny-llama
    lora = 4 * 4 * (32 + 32)                                         # r = 4 on q, k, v, o
    assert masked["linear_params_per_block"] == linear and masked["lora_params_per_block"] == lora
    assert masked["flops"] == layers * (n * 2 * (linear + masked["lora_params_per_block"]) + 4 * d * pairs)


def test_window_flops_cuts_the_nodes_into_groups(run):
    bench = load_benchmark("inference")
    model = STLLM.from_pretrained(run)
    prep = model.prepare(make_city(n_nodes=6, n_days=21, seed=0))
    start = int(prep.splits["test"][0])
    context = prep.batch(np.array([start])).get("context") or {}
    length = lambda g: len(model.layout(g, context).ids)  # noqa: E731
    assert [f["seq_len"] for f in bench.window_flops(model, prep, start, 4)] == [length(4), length(2)]
    assert [f["seq_len"] for f in bench.window_flops(model, prep, start, 0)] == [length(6)]


# ---------------------------------------------------------------------------------------------------- holidays


def test_holiday_groups_add_up_to_the_masked_mae(run, monkeypatch):
    bench = load_benchmark("holiday_errors")
    city = dataclasses.replace(make_city(n_nodes=6, n_days=21, seed=0), holidays="US")   # MLK day: 2024-01-15
    monkeypatch.setattr(bench, "load_city", lambda cfg: city)
    out = bench.errors_by_group(run, ["val", "test"])
    model = STLLM.from_pretrained(run)
    prep = model.prepare(city)
    for split in ("val", "test"):
        groups = out[split]
        assert groups["all"]["windows"] == len(prep.splits[split]) == sum(groups[g]["windows"] for g in bench.GROUPS)
        assert groups["all"]["mae"] == pytest.approx(evaluate(model, prep, prep.splits[split])["mae"], rel=1e-9)
        shares = [groups[g]["share_of_error"] for g in bench.GROUPS]
        assert sum(shares) == pytest.approx(1.0)
    assert out["val"]["holiday"]["windows"] + out["val"]["after_holiday"]["windows"] > 0


# ----------------------------------------------------------------------------------------------------- explain


def _row(by: str, holds, verdict: str, kind: str = "trend") -> dict:
    return {"by": by, "holds": holds, "verdict": verdict, "kind": kind, "quantity": "direction", "text": "x",
            "stated": "up", "actual": "up"}


def test_explain_summary_counts_model_and_program_claims_apart():
    bench = load_benchmark("explain")
    explained = lambda claims: {"claims": claims, "faithfulness": 1.0, "numbers_consistent": True,  # noqa: E731
                                "forecast_consistent": True, "explanation": "", "at": "", "node": "S00"}
    results = [explained([_row("model", True, "holds"), _row("model", False, "fails"),
                          _row("model", None, "unparsed", "unparsed"), _row("program", True, "holds"),
                          _row("program", True, "holds", "forecast_numbers")]),
               explained([_row("model", True, "holds"), _row("program", None, "unchecked"),
                          _row("program", True, "holds")])]
    out = bench.summarise(results, [1.0, 3.0])
    assert out["model"] == {"claims_per_explanation": 1.5, "hold_share": pytest.approx(2 / 3),
                            "unparsed_per_explanation": 0.5, "unparsed_share": 0.25}
    assert out["program"] == {"claims_per_explanation": 1.5, "hold_share": 1.0, "unparsed_per_explanation": 0.0,
                              "unparsed_share": 0.0}
    assert out["failed_by_kind"] == {"model: trend.direction": 1} and out["seconds_per_explanation_median"] == 2.0
    table = bench.table({"city": {"analytic": out}})
    assert "| city | analytic | 2 | 1.5 | 0.667 | 0.250 | 1.5 | 1.000 | 1.00 | - | 2.00 | - |" in table


def test_explain_benchmark_runs_on_a_tiny_run(run):
    bench = load_benchmark("explain")
    out = bench.bench_run("tiny", str(run), n_pairs=3, n_generated=1, max_new_tokens=8)
    analytic = out["analytic"]
    assert analytic["n"] == 3 and analytic["model"]["claims_per_explanation"] == 0      # the program wrote it all
    assert analytic["program"]["claims_per_explanation"] > 5 and analytic["program"]["hold_share"] == 1.0
    assert analytic["program"]["unparsed_share"] == 0.0
    assert out["mae"]["max_abs_diff_explain_vs_city_layout"] < 1e-4
    assert out["mae"]["explain_mode"] == pytest.approx(out["mae"]["city_layout"], rel=1e-5)
    assert out["generated"]["n"] == 1 and set(out["generated"]["model"]) == set(analytic["model"])


# ---------------------------------------------------------------------------------------------- leave one out
def test_leave_one_out_pretrains_on_every_other_series_and_shares_single_source_runs(tmp_path):
    loo = load_benchmark("leave_one_out")
    import yaml
    recipe = yaml.safe_load((ROOT / "configs" / "general.yaml").read_text())
    every = [loo.label(s) for s in loo.series(recipe)]
    assert "nyc-bike/departures" in every and "los-loop" in every and "synthetic-15min" in every
    rest = [s for s in loo.series(recipe) if s["name"] != "los-loop"]
    chosen = loo.with_series(recipe, rest)
    assert loo.label(chosen["data"]) == loo.label(rest[0]) and chosen["data"]["sources"] == rest[1:]
    assert "los-loop" not in [loo.label(s) for s in [chosen["data"], *chosen["data"]["sources"]]]
    a, b = (loo.run_folders(tmp_path, city, 1000, 200) for city in ("los-loop", "bayarea-bike"))
    assert a["single_source"] == b["single_source"] and a["general"] != b["general"]
    assert loo.run_folders(tmp_path, "nyc-bike", 1000, 200)["single_source"] != a["single_source"]
    assert loo.run_folders(tmp_path, "los-loop", 500, 200)["single_source"] != a["single_source"]
    # --set changes the pretraining only: its own general run, the same full-shot and single-source runs
    c = loo.run_folders(tmp_path, "los-loop", 1000, 200, ["encoder.series_features=true"])
    assert c["general"] != a["general"] and (c["full_shot"], c["single_source"]) == (a["full_shot"], a["single_source"])
    before = json.loads(json.dumps(recipe))
    assert loo.changed(recipe, ["encoder.patch_len=6"])["encoder"]["patch_len"] == 6
    assert recipe == before and "patch_len" not in recipe["encoder"]    # the recipe itself is left as it was
    with pytest.raises(SystemExit, match="section.key=value"):
        loo.changed(recipe, ["series_features=true"])


def test_explain_benchmark_adds_pairs_with_notes_and_counts_their_claims(run, tmp_path):
    bench = load_benchmark("explain")
    notes = tmp_path / "notes.csv"
    notes.write_text('start,end,zones,kind,text\n2024-01-19 10:00,2024-01-19 14:00,all,market,"A market fills '
                     'the square"\n')
    out = bench.bench_run("tiny", str(run), n_pairs=1, n_generated=0, max_new_tokens=8, notes=str(notes),
                          n_note_pairs=2)
    assert out["pairs"] == {"random": 1, "with_notes": 2}
    claims = out["analytic"]["note_claims"]
    assert claims["per_explanation_with_notes"] >= 1 and claims["hold_share"] == 1.0


def test_no_benchmark_shadows_a_package_and_leave_one_out_keeps_sys_path(tmp_path):
    """A benchmark run as a script has benchmarks/ first on sys.path, so a file there named like a package (a
    benchmarks/holidays.py once did) hides it: Melbourne's calendar (AU-VIC) needs the `holidays` package. And
    --leave-out loads leave_one_out.py from its file instead of putting benchmarks/ on sys.path."""
    import importlib.util as iu
    for script in (ROOT / "benchmarks").glob("*.py"):
        spec = iu.find_spec(script.stem)
        assert spec is None or Path(spec.origin or "").parent == ROOT / "benchmarks", f"{script.name} shadows a module"
    import sys
    from types import SimpleNamespace
    zero_shot = load_benchmark("zero_shot")
    args = SimpleNamespace(steps=10, all=False, leave_out="atlantis", runs=str(tmp_path), stage2_steps=2, threads=1,
                           set=[], out=str(tmp_path / "row.json"))
    with pytest.raises(SystemExit, match="choose one of"):            # loaded leave_one_out, refused the name
        zero_shot.leave_one_out_main(args)
    assert str(ROOT / "benchmarks") not in sys.path
    sys.modules.pop("holidays", None)
    import holidays
    assert hasattr(holidays, "country_holidays")                      # the package


def test_note_prior_measures_each_note_against_the_week_before_and_scores_the_prior():
    """benchmarks/note_prior.py: a note over which the values double has effect log(2) (+1 smoothing), one over
    which they halve about -log(2); the prior is the language model's up-minus-down log-probability; agreement
    counts the signs."""
    from dataclasses import replace

    from stllm.backbone import BackboneConfig, build_base_model
    from stllm.data.notes import with_notes
    bench = load_benchmark("note_prior")
    city = make_city(n_nodes=3, n_days=21, seed=0)
    values = np.full_like(city.values, 100.0)
    t0 = 14 * 24                                                               # day 15, two weeks in
    values[t0:t0 + 6, 1] = 200.0                                               # node 1 doubles for 6 hours
    values[t0 + 24:t0 + 30, 2] = 50.0                                          # node 2 halves the next day
    city = replace(city, values=values)
    ts = city.timestamps
    fmt = lambda i: str(pd.Timestamp(ts[i]))                                   # noqa: E731
    city = with_notes(city, [
        {"start": fmt(t0), "end": fmt(t0 + 5), "zones": city.nodes["id"][1], "kind": "fair", "text": "A fair"},
        {"start": fmt(t0 + 24), "end": fmt(t0 + 29), "zones": city.nodes["id"][2], "kind": "closure",
         "text": "A closure"}])
    rows = bench.note_effects(city)
    assert rows["kind"].tolist() == ["fair", "closure"] and rows["n"].tolist() == [6, 6]
    np.testing.assert_allclose(rows["effect"], [np.log(1201 / 601), np.log(301 / 601)], rtol=1e-6)
    model, tok = build_base_model(BackboneConfig(name="tiny-llama", n_layers=None, lora_r=0))
    result = bench.measure(city, model.eval(), tok, "visitors")
    assert all(np.isfinite(r["prior"]) for r in result["rows"]) and result["n_notes"] == 2
    same = np.mean([np.sign(r["prior"]) == np.sign(r["effect"]) for r in result["rows"]])
    assert result["sign_agreement"] == same and result["correlation"] is not None
    assert bench.agreement(rows.iloc[:0].assign(prior=[]))["sign_agreement"] is None
