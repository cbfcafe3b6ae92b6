"""`stllm report`: a tiny run's page is self-contained, holds every section, and renders in headless Chromium
without script errors (skipped without chromium, except on CI)."""
import argparse
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stllm import report
from stllm.config import load_config
from stllm.data.notes import with_notes
from stllm.data.synthetic import make_city
from stllm.model import STLLM

ROOT = Path(__file__).resolve().parent.parent
NOTES = [{"start": "2024-01-20 06:00", "end": "2024-01-20 18:00", "zones": "all", "kind": "parade",
          "text": "A parade crosses the centre."},
         {"start": "2024-01-02 00:00", "end": "2024-01-02 06:00", "zones": "S01", "kind": "closure",
          "text": "A note before the test period."}]
FETCHED = re.compile(r"""(?:\b(?:src|href|action|poster|data)\s*=\s*["']?\s*|url\(\s*["']?\s*|@import\s+["']?)"""
                     r"""(?:https?:)?//""", re.I)   # anything a browser would fetch from the network


def city():
    return make_city(n_nodes=6, n_days=21, seed=0)     # the city configs/tiny.yaml names


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from stllm.train import train
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.use_llm=false"])
    out = tmp_path_factory.mktemp("report") / "run"
    train(cfg, out, city=city(), progress=False)
    return out


@pytest.fixture(scope="module")
def page(run) -> Path:
    return report.write_report(STLLM.from_pretrained(run), with_notes(city(), NOTES), run.parent / "report.html")


def test_page_is_self_contained_and_complete(page):
    text = page.read_text(encoding="utf-8")
    assert not FETCHED.findall(text)
    assert "<link" not in text and "<img" not in text           # styles inline, figures inline SVG
    for section in ("map", "forecasts", "metrics", "explanations", "notes"):
        assert f"<section id={section}>" in text, section
    for name in ("historical_average", "same_time_yesterday", "encoder only"):   # the table of `stllm evaluate`
        assert f"<th>{name}</th>" in text
    assert "A parade crosses the centre." in text and "before the test period" not in text   # notes of the test split
    assert "<mark class=held data-by=program" in text and text.count("<article class=explanation>") == 3
    assert text.count("<svg") == 2 + 3                          # map, forecasts, one plot per explanation


def test_metrics_table_marks_the_best_and_missing_baselines():
    row = lambda mae: {"mae": mae, "rmse": mae, "mape": mae, "unmasked": {"mae": mae, "rmse": mae}}  # noqa: E731
    table = report.metrics_html({**row(2.0), "baselines": {"last": row(3.0), "same_time_last_week": {
        "mae": None, "rmse": None, "mape": None, "unmasked": {"mae": None, "rmse": None},
        "missing": "needs 168 steps of history before the first window, has 40"}}})
    assert table.count("<td class=best>2.00</td>") == 5 and table.count("<td>3.00</td>") == 5
    assert table.count("<td class=na>n/a</td>") == 5 and "same_time_last_week: n/a, needs 168 steps" in table


def test_claims_are_marked_by_their_check_and_writer():
    claim = lambda text, holds, by, verdict=None: {"kind": "trend", "quantity": "direction", "text": text,  # noqa: E731
                                                  "stated": "up", "actual": None if holds is None else "up",
                                                  "holds": holds, "by": by, "verdict": verdict}
    claims = [claim("flow rose", True, "model", "holds"), claim("at 137.0", False, "program", "fails"),
              claim("it rained", None, "model", "unchecked"), claim("Yesterday it rose by 12.5", None, "model",
                                                                     "unparsed")]
    result = {"node_name": "S03 University", "channel": "flow", "at": "2024-01-18 09:00", "mode": "generated",
              "explanation": "Since 8:00 flow rose, at 137.0 now; it rained. Yesterday it rose by 12.5.",
              "claims": claims, "faithfulness": 0.5}
    out = report.explanation_html(result, with_plot=False)
    assert "<mark class=held data-by=model title='held, written by the model'>flow rose</mark>" in out
    assert "<mark class=failed data-by=program title='failed, written by the program'>at 137.0</mark>" in out
    assert "<mark class=unchecked data-by=model" in out and "<mark class=unparsed data-by=model" in out
    assert "4 claims: 1 failed, 1 unparsed, 1 unchecked, 1 held" in out      # failed first, in the counts and list
    assert "by the model: 1 unparsed, 1 unchecked, 1 held; by the program: 1 failed" in out
    assert out.index("claim failed") < out.index("claim unparsed") < out.index("claim unchecked") \
        < out.index("claim held")
    assert out.count("<span class=by>by the model</span>") == 3 and out.count("by the program</span>") == 1


def test_spring_layout_keeps_components_apart():
    two_triangles = np.zeros((6, 6))
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]:
        two_triangles[a, b] = two_triangles[b, a] = 1
    xy = report.spring_layout(two_triangles)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    inside = [dist[a, b] for a, b in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]]
    assert max(inside) < dist[:3, 3:].min()


def test_map_without_coordinates_uses_the_graph():
    c = city()
    nodes = c.nodes.assign(lat=np.nan, lon=np.nan)
    ring = np.roll(np.eye(6), 1, axis=1) + np.roll(np.eye(6), -1, axis=1)
    xy, geographic, graph = report.node_layout(replace(c, nodes=nodes, adjacency=ring))
    assert xy.shape == (6, 2) and not geographic and np.array_equal(graph > 0, ring > 0)
    svg = report.map_svg(xy, np.array([1.0, 2, np.nan, 4, 5, 6]), list("abcdef"), geographic, graph, [0])
    assert svg.startswith("<svg") and "spring layout" in svg


def test_node_errors_match_numpy():
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(5, 3, 4, 2)), rng.normal(size=(5, 3, 4, 2))
    truth[0, 0, 1, 0], truth[1, 2, 1, 0], truth[:, :, 3, 0] = 0.0, np.nan, np.nan
    errors = report.node_errors({"prediction": pred, "truth": truth}, channel=0)
    for n in range(3):
        p, t = pred[:, :, n, 0].ravel(), truth[:, :, n, 0].ravel()
        keep = np.isfinite(t) & (t != 0)
        assert errors[n] == pytest.approx(np.abs(p[keep] - t[keep]).mean())
    assert np.isnan(errors[3]) and report.worst_nodes(errors, 4)[-1] == 3


def test_cli_writes_the_report(run, tmp_path, capsys):
    notes = tmp_path / "notes.csv"
    notes.write_text("start,end,zones,kind,text\n2024-01-20 06:00,2024-01-20 18:00,S02,market,A market day.\n")
    parser = argparse.ArgumentParser()
    report.add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--run", str(run), "--data", "synthetic", "--notes", str(notes),
                              "--nodes", "S01", "S02", "--explain", "1", "--out", str(tmp_path / "r.html")])
    assert report.cmd_report(args) == 0
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "A market day." in text and text.count("<article class=explanation>") == 1
    assert "S01 Old Town · flow from" in text and "written to" in capsys.readouterr().out


# ---- headless Chromium --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (apt-get install -y chromium); the page was checked without a browser"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true needs chromium: {reason}")
        pytest.skip(reason)
    return path


def browse(chromium: str, page: Path, tmp: Path, *what: str) -> subprocess.CompletedProcess:
    """Chromium, headless and offline (every host name resolves to nothing), on a local page."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,2400"]
    return subprocess.run([chromium, *flags, *what, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(tmp)})


def test_page_renders_in_chromium(page, chromium, tmp_path):
    done = browse(chromium, page, tmp_path, "--dump-dom")
    dom, root = done.stdout, re.search(r"<html[^>]*>", done.stdout).group(0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data-script-errors" not in root and "Uncaught" not in done.stderr, (root, done.stderr[-2000:])
    assert 'data-ready="1"' in root                              # the page's own script ran to its end
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', dom, re.S))
    assert "<svg" in sections["map"] and "test MAE" in sections["map"]
    assert sections["forecasts"].count("<svg") == 1 and "1 step ahead" in sections["forecasts"]
    assert "<svg" in sections["explanations"] and '<li class="claim held">' in sections["explanations"]
    assert '<mark class="held" data-by="program" title="held, written by the program">' in sections["explanations"]
    assert "A parade" in sections["notes"]

    shot = tmp_path / "shot.png"
    done = browse(chromium, page, tmp_path, f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_chromium_sees_a_script_error(page, chromium, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace("</main>", "</main><script>noSuchFunction()</script>"))
    done = browse(chromium, broken, tmp_path, "--dump-dom")
    root = re.search(r"<html[^>]*>", done.stdout).group(0)
    assert "data-script-errors" in root and "noSuchFunction" in root and "Uncaught" in done.stderr
