"""`stllm report`: one self-contained HTML page about a run on a city's test split.

The page shows a map of the nodes coloured by test MAE, forecast against truth for a few nodes, the metrics next
to the baselines, explained forecasts with each claim marked by its check, and the city's notes in the test
period. Everything is inline (CSS, a few lines of JS, matplotlib figures as SVG), so the file opens offline.

`write_report` gathers plain data from the model (forecasts, metrics, explanations) and `render_page` turns plain
data into HTML; the figures and the layout need no model.
"""
from __future__ import annotations

import html
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stllm.metrics import masked_error_sum

if TYPE_CHECKING:                                  # the CLI imports this module: keep pandas out of its start-up
    from stllm.data.city import CityData

N_PLOTTED = 4            # default number of forecast panels: the nodes with the largest test MAE
MAX_NOTES = 200          # notes listed on the page at most (the rest are counted)


# ---- plain data ---------------------------------------------------------------------------------------------------
def node_errors(result: dict, channel: int = 0) -> np.ndarray:
    """Masked MAE per node [N] over all windows and horizon steps (targets 0 or NaN ignored, as `stllm evaluate`);
    NaN for a node with no such target."""
    pred, true = result["prediction"][..., channel], result["truth"][..., channel]     # [b, t_out, N]
    sums = [masked_error_sum(pred[..., i], true[..., i]) for i in range(pred.shape[-1])]
    return np.array([total / n if n else np.nan for total, n in sums])


def _node(city: CityData, node) -> int:
    """A node position from an id, name or position (a digit string is a position when no id matches)."""
    from stllm.data.city import DataError
    try:
        return city.node_index(node)[0]
    except DataError:
        if str(node).isdigit() and int(node) < city.n_nodes:
            return int(node)
        raise


def worst_nodes(errors: np.ndarray, k: int) -> list[int]:
    """The k node positions with the largest error (NaN last)."""
    return [int(i) for i in np.argsort(-np.nan_to_num(errors, nan=-np.inf), kind="stable")[:k]]


def worst_window(result: dict, node: int, channel: int = 0) -> int:
    """The window (row of `result`) where `node` has its largest mean absolute error."""
    pred, true = result["prediction"][:, :, node, channel], result["truth"][:, :, node, channel]   # [b, t_out]
    err = np.nanmean(np.where(np.isfinite(true), np.abs(pred - true), np.nan), axis=1) if np.isfinite(true).any() \
        else np.zeros(len(pred))
    return int(np.nanargmax(np.nan_to_num(err, nan=-1.0)))


def spring_layout(weights: np.ndarray, iterations: int = 200, seed: int = 0) -> np.ndarray:
    """Fruchterman-Reingold positions [N, 2] for a weighted graph [N, N]: connected nodes pull, all nodes push."""
    n = len(weights)
    pos = np.random.default_rng(seed).uniform(-1, 1, (n, 2))
    if n < 2:
        return pos
    w = np.maximum(weights, weights.T).astype(float)
    k = 1.0 / np.sqrt(n)                                          # the distance at which the forces balance
    step = 0.1
    for _ in range(iterations):
        delta = pos[:, None] - pos[None]                                  # [N, N, 2]
        dist = np.linalg.norm(delta, axis=-1).clip(1e-3)                  # [N, N]
        push = np.einsum("ijk,ij->ik", delta, k * k / dist ** 2 - w * dist / k)   # [N, 2]
        length = np.linalg.norm(push, axis=-1, keepdims=True).clip(1e-9)
        pos += push / length * np.minimum(length, step)
        step -= 0.1 / (iterations + 1)
    return pos


def node_layout(city: CityData) -> tuple[np.ndarray, bool, np.ndarray | None]:
    """Node positions [N, 2] (x, y), whether they are lon/lat, and the graph drawn as edges (None on a map).
    Without coordinates: a spring layout of the city's static graph, or a circle when it has no graph."""
    if city.has_coordinates:
        return city.nodes[["lon", "lat"]].to_numpy(float), True, None
    from stllm.data.city import DataError
    from stllm.data.graphs import static_graph
    try:
        graph = static_graph(city)
    except DataError:
        angle = 2 * np.pi * np.arange(city.n_nodes) / city.n_nodes
        return np.stack([np.cos(angle), np.sin(angle)], 1), False, None
    return spring_layout(graph), False, graph


def active_notes(city: CityData, start, end) -> list[dict]:
    """The city's notes that hold at some time in [start, end], as rows: start, end, where, kind, text."""
    notes = city.notes
    if notes is None or not len(notes):
        return []
    start, end = np.datetime64(start), np.datetime64(end)
    names = city.nodes["name"].astype(str).tolist()
    return [{"start": _minute(n.start), "end": _minute(n.end), "kind": n.kind, "text": n.text,
             "where": "all" if not len(n.nodes) else ", ".join(names[i] for i in n.nodes),
             "nodes": list(n.nodes)}
            for n in notes.sort_values("start").itertuples(index=False) if n.start <= end and n.end >= start]


# ---- figures (inline SVG) -----------------------------------------------------------------------------------------
def _svg(fig) -> str:
    """A matplotlib figure as inline SVG (text kept as text; no XML header or metadata), figure closed."""
    import matplotlib.pyplot as plt
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)
    return text


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def map_svg(xy: np.ndarray, errors: np.ndarray, labels: list[str], geographic: bool, graph: np.ndarray | None,
            marked: list[int], unit: str = "") -> str:
    """Nodes at `xy` [N, 2] coloured by error [N] (grey where NaN), `marked` nodes labelled, edges of `graph`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.5))
    if graph is not None and 0 < (graph > 0).sum() <= 20000:
        i, j = np.nonzero(np.triu(graph > 0, 1))
        ax.plot(np.stack([xy[i, 0], xy[j, 0]]), np.stack([xy[i, 1], xy[j, 1]]), color="#bbb", lw=0.6, zorder=1)
    known = np.isfinite(errors)
    ax.scatter(xy[~known, 0], xy[~known, 1], c="#ccc", s=30, edgecolors="#777", lw=0.5, zorder=2)
    dots = ax.scatter(xy[known, 0], xy[known, 1], c=errors[known], cmap="plasma", s=46 if len(xy) <= 300 else 14,
                      edgecolors="#333", lw=0.5, zorder=3)
    fig.colorbar(dots, ax=ax, shrink=0.8, pad=0.03, label=f"test MAE ({unit})" if unit else "test MAE")
    middle = np.nanmedian(xy[:, 0])
    for i in (range(len(xy)) if len(xy) <= 30 else marked):       # labels point inwards, away from the frame
        right = xy[i, 0] > middle
        ax.annotate(labels[i], xy[i], xytext=(-6 if right else 6, 5), textcoords="offset points", fontsize=8,
                    ha="right" if right else "left", fontweight="bold" if i in marked else "normal")
    ax.margins(0.12)                                        # room for the labels inside the frame
    if geographic:
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_aspect(1 / max(np.cos(np.radians(np.nanmean(xy[:, 1]))), 0.1))
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("no coordinates: a spring layout of the sensor graph", fontsize=9)
    return _svg(fig)


def forecast_svg(result: dict, nodes: list[int], labels: list[str], channel: int = 0, max_windows: int = 168,
                 notes: list[dict] = (), columns: int = 2) -> str:
    """Small multiples: per node, truth and the 1-step and last-step forecasts over the first test windows,
    with the spans of notes that name the node shaded."""
    plt = _pyplot()
    pred, truth, times = result["prediction"], result["truth"], result["timestamps"]   # [b, t_out, N, C], [b, t_out]
    b, h = min(max_windows, len(pred)), pred.shape[1]
    rows = -(-len(nodes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, 2.6 * rows), sharex=True, squeeze=False)
    t0, t1 = times[0, 0], times[b - 1, h - 1]
    for ax, node in zip(axes.flat, nodes):
        ax.plot(times[:b, 0], truth[:b, 0, node, channel], color="black", lw=1.2, label="truth")
        ax.plot(times[:b, 0], pred[:b, 0, node, channel], color="tab:blue", lw=1, label="1 step ahead")
        if h > 1:
            ax.plot(times[:b, h - 1], pred[:b, h - 1, node, channel], color="tab:orange", lw=1, alpha=0.85,
                    label=f"{h} steps ahead")
        for note in notes:
            if not note["nodes"] or node in note["nodes"]:
                a, z = max(np.datetime64(note["start"]), t0), min(np.datetime64(note["end"]), t1)
                if a <= z:
                    ax.axvspan(a, z, color="tab:green", alpha=0.12, lw=0)
        ax.set_title(labels[node], fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(nodes):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.autofmt_xdate()
    return _svg(fig)


def explanation_svg(result: dict) -> str:
    """History, forecast and truth of one explained window."""
    plt = _pyplot()
    nan = lambda xs: [np.nan if x is None else x for x in xs]  # noqa: E731
    ht, ft = (np.array(result[k], dtype="datetime64[m]") for k in ("history_timestamps", "timestamps"))
    fig, ax = plt.subplots(figsize=(6.5, 2.4))
    ax.plot(ht, nan(result["history"]), color="black", lw=1.2, label="history")
    ax.plot(ft, nan(result["truth"]), color="gray", ls="--", lw=1, label="truth")
    ax.plot(ft, result["forecast"], color="tab:blue", lw=1.5, label="forecast")
    ax.axvline(ft[0], color="tab:blue", alpha=0.3, lw=1)
    ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


# ---- HTML ---------------------------------------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape(str(x))


def metrics_html(metrics: dict, name: str = "stllm") -> str:
    """The table `stllm evaluate` prints, as HTML: the run and its baselines, the best value per column bold, "n/a"
    and the reason for a baseline the history cannot support."""
    columns = [("MAE", lambda m: m["mae"]), ("RMSE", lambda m: m["rmse"]), ("MAPE %", lambda m: m["mape"]),
               ("MAE unmasked", lambda m: (m.get("unmasked") or {}).get("mae")),
               ("RMSE unmasked", lambda m: (m.get("unmasked") or {}).get("rmse"))]
    rows = {name: metrics, **metrics["baselines"]}
    values = np.array([[np.nan if get(m) is None else float(get(m)) for _, get in columns]
                       for m in rows.values()])                                       # [rows, columns]
    best = [np.nanmin(v) if np.isfinite(v).any() else np.nan for v in values.T]
    cell = lambda v, k: f"<td{' class=best' if v == best[k] else ''}>{v:.2f}</td>" if np.isfinite(v) \
        else "<td class=na>n/a</td>"  # noqa: E731
    head = "".join(f"<th>{_e(c)}</th>" for c, _ in columns)
    body = "".join(f"<tr{' class=run' if r == 0 else ''}><th>{_e(n)}</th>"
                   + "".join(cell(v, k) for k, v in enumerate(values[r])) + "</tr>" for r, n in enumerate(rows))
    missing = "".join(f"<br>{_e(n)}: n/a, {_e(m['missing'])}" for n, m in rows.items() if m.get("missing"))
    return (f"<table class=metrics><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<p class=caption>MAE/RMSE/MAPE masked (targets equal to 0 or missing ignored), pooled over all horizon "
            f"steps; the best value in each column is bold.{missing}</p>")


VERDICTS = ("failed", "unparsed", "unchecked", "held")     # the order claims are listed and counted in


def verdict(claim: dict) -> str:
    """A claim's check in one word: held, failed, unparsed (a checkable shape the checker could not read) or
    unchecked (the data cannot settle it)."""
    if claim.get("verdict") in ("unparsed", "unchecked"):
        return claim["verdict"]
    return {True: "held", False: "failed"}.get(claim.get("holds"), "unchecked")


def _counts(claims: list[dict]) -> str:
    return ", ".join(f"{n} {v}" for v in VERDICTS if (n := sum(verdict(c) == v for c in claims))) or "none"


def _marked_text(text: str, claims: list[dict]) -> str:
    """The explanation with each claim's words wrapped in <mark class=VERDICT data-by=WRITER> (first free
    occurrence)."""
    spans: list[tuple[int, int, dict]] = []
    for claim in claims:
        needle, at = str(claim.get("text", "")), 0
        while needle and (at := text.find(needle, at)) >= 0:
            if all(at >= z or at + len(needle) <= a for a, z, _ in spans):
                spans.append((at, at + len(needle), claim))
                break
            at += 1
    out, last = [], 0
    for a, z, claim in sorted(spans, key=lambda x: x[:2]):
        v, by = verdict(claim), claim.get("by", "?")
        out += [_e(text[last:a]), f"<mark class={v} data-by={_e(by)} title='{v}, written by the {_e(by)}'>"
                                  f"{_e(text[a:z])}</mark>"]
        last = z
    return "".join(out) + _e(text[last:])


def explanation_html(result: dict, with_plot: bool = True) -> str:
    """One explained forecast: its plot beside the text with each claim marked by its check (underlined where the
    model wrote it), the counts per writer, then the claims listed (failed first) with who wrote them, what they
    stated and what the data says."""
    claims = result.get("claims", [])
    writers = [w for w in ("model", "program") if any(c.get("by") == w for c in claims)]
    per_writer = "; ".join(f"by the {w}: {_counts([c for c in claims if c.get('by') == w])}" for w in writers)
    items = "".join(
        f"<li class='claim {verdict(c)}'><span class=mark>{verdict(c)}</span> "
        f"<span class=by>by the {_e(c.get('by', '?'))}</span> "
        f"<code>{_e(c.get('kind', ''))} {_e(c.get('quantity', ''))}</code> “{_e(c.get('text', ''))}”"
        + (f" — stated {_e(_short(c.get('stated')))}, actual {_e(_short(c.get('actual')))}"
           if c.get("actual") is not None else "")
        + "</li>" for c in sorted(claims, key=lambda c: VERDICTS.index(verdict(c))))
    who = result.get("node_name", result.get("node", ""))
    faith = result.get("faithfulness")
    head = (f"<h3>{_e(who)} · {_e(result.get('channel', ''))} from {_e(result.get('at', ''))}</h3>"
            f"<p class=caption>mode {_e(result.get('mode', ''))}; {per_writer or 'no claim found'}"
            + (f"; faithfulness {faith:.2f}" if faith is not None else "") + "</p>")
    warning = f"<p class=warning>{_e(result['warning'])}</p>" if result.get("warning") else ""
    plot = f"<div class=figure>{explanation_svg(result)}</div>" if with_plot else ""
    return (f"<article class=explanation>{head}<div class=pair>{plot}<p class=rationale>"
            f"{_marked_text(result['explanation'], claims)}</p></div>{warning}"
            f"<details><summary>{len(claims)} claims: {_counts(claims)}</summary><ul class=claims>{items}</ul>"
            "</details></article>")


def _minute(t) -> str:
    return str(np.datetime64(t, "m")).replace("T", " ")


def _duration(step) -> str:
    minutes = int(step / np.timedelta64(1, "m"))
    return f"{minutes // 1440} day(s)" if minutes % 1440 == 0 else f"{minutes // 60} h" if minutes % 60 == 0 \
        else f"{minutes} min"


def _short(x) -> str:
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    if isinstance(x, (list, tuple)) and len(x) > 4:
        return "[" + ", ".join(_short(v) for v in x[:4]) + ", …]"
    return str(x)


def notes_html(notes: list[dict]) -> str:
    rows = "".join(f"<tr><td>{_e(n['start'])}</td><td>{_e(n['end'])}</td><td>{_e(n['where'])}</td>"
                   f"<td>{_e(n['kind'])}</td><td>{_e(n['text'])}</td></tr>" for n in notes[:MAX_NOTES])
    more = f"<p class=caption>… and {len(notes) - MAX_NOTES} more.</p>" if len(notes) > MAX_NOTES else ""
    return ("<table class=notes><thead><tr><th>start</th><th>end</th><th>where</th><th>kind</th><th>text</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>{more}")


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{margin:0 0 4px;font-size:26px} h2{margin:36px 0 8px;padding-top:8px;border-top:1px solid #ddd;font-size:20px}
h3{margin:20px 0 4px;font-size:16px} .sub,.caption{color:#666;font-size:13px} nav a{margin-right:14px}
svg{max-width:100%;height:auto} .figure{margin:8px 0}
table{border-collapse:collapse;font-size:14px;margin:8px 0} th,td{padding:4px 10px;border-bottom:1px solid #e3e3e3}
table.metrics td{text-align:right;font-variant-numeric:tabular-nums} table.metrics th{cursor:pointer;text-align:left}
tr.run th,tr.run td{background:#eef4fb} td.best{font-weight:bold} td.na{color:#999}
table.notes td{vertical-align:top}
.explanation{border:1px solid #e3e3e3;border-radius:6px;padding:4px 16px;margin:14px 0}
.rationale{white-space:pre-wrap;background:#f7f7f7;padding:8px 10px;border-radius:4px;font-size:14px}
mark.held{background:#d7f0d2} mark.failed{background:#f7d0cc} mark.unparsed{background:#fbe7b5} mark{background:#eee}
mark[data-by=model]{border-bottom:2px solid #1565c0}
ul.claims{font-size:13px;padding-left:18px} li.claim{margin:2px 0;list-style:none}
.mark{display:inline-block;min-width:64px;text-align:center;border-radius:3px;padding:0 4px;font-weight:bold;
font-size:12px;background:#ddd} .held .mark{background:#2e7d32;color:#fff} .failed .mark{background:#c62828;color:#fff}
.unparsed .mark{background:#b7791f;color:#fff}
.pair{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,6fr);gap:16px;align-items:start}
details{margin:6px 0 10px} summary{cursor:pointer;color:#444;font-size:14px} .by{color:#888}
.warning{color:#a15c00} #script-errors{color:#c62828}
"""

# The first script records errors of every later one (the test reads them from the DOM); the second makes the
# metrics table sortable by a click on a column and marks the page ready.
JS_ERRORS = """window.onerror=function(msg,src,line){var r=document.documentElement;
r.setAttribute('data-script-errors',(r.getAttribute('data-script-errors')||'')+msg+' (line '+line+'); ');
var box=document.getElementById('script-errors');if(box){box.hidden=false;box.textContent+=msg+'\\n';}};"""
JS_PAGE = """document.querySelectorAll('table.metrics thead th').forEach(function(th,k){
th.title='sort by this column';th.addEventListener('click',function(){var body=th.closest('table').tBodies[0];
var rows=Array.from(body.rows),key=function(r){var t=r.cells[k].textContent;return k?parseFloat(t):t;};
rows.sort(function(a,b){var x=key(a),y=key(b);return x<y?-1:x>y?1:0;});
rows.forEach(function(r){body.appendChild(r);});});});
document.documentElement.setAttribute('data-ready','1');"""


def render_page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The HTML page from (id, heading, inner HTML) sections, with a table of contents."""
    nav = "".join(f"<a href='#{i}'>{_e(h)}</a>" for i, h, _ in sections)
    body = "".join(f"<section id={i}><h2>{_e(h)}</h2>{inner}</section>" for i, h, inner in sections)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style>"
            f"<script>{JS_ERRORS}</script></head><body><main><h1>{_e(title)}</h1><p class=sub>{_e(subtitle)}</p>"
            f"<nav>{nav}</nav><pre id=script-errors hidden></pre>{body}</main><script>{JS_PAGE}</script></body></html>")


def collect(model, city: CityData, nodes: list | None = None, n_explain: int = 3, channel: str | int = 0,
            explain_mode: str | None = None) -> dict:
    """The plain data of a report: test forecasts, metrics with baselines, error per node, the nodes to plot
    (`nodes`: ids, names or positions; default the N_PLOTTED with the largest test MAE), `n_explain` explanations
    (each of the first plotted nodes at its worst test window), and the notes in force in the test split."""
    if getattr(model.cfg.model, "task", "forecast") != "forecast":
        raise ValueError(f"stllm report covers forecast runs; this run has model.task={model.cfg.model.task!r}")
    c = city.channel_index(channel)
    result = model.predict(city, split="test")
    errors = node_errors(result, c)
    chosen = [_node(city, n) for n in nodes] if nodes else worst_nodes(errors, min(N_PLOTTED, city.n_nodes))
    times = result["timestamps"]                                                          # [b, t_out]
    options = {"channel": c, **({"mode": explain_mode} if explain_mode else {})}
    return {"channel": c, "result": result, "metrics": model.evaluate(city, split="test"), "errors": errors,
            "nodes": chosen, "picked": bool(nodes), "notes": active_notes(city, times[0, 0], times[-1, -1]),
            "explained": [model.explain(city, i, _minute(times[worst_window(result, i, c), 0]), **options)
                          for i in chosen[:max(n_explain, 0)]],
            "model": "stllm" if getattr(model, "backbone", None) is not None else "encoder only"}


def page_html(city: CityData, data: dict, title: str | None = None, max_windows: int = 168) -> str:
    """The report page from `collect`'s data; forecasts drawn over the first `max_windows` test windows."""
    c, times, nodes, notes = data["channel"], data["result"]["timestamps"], data["nodes"], data["notes"]
    ids, names = city.nodes["id"].astype(str), city.nodes["name"].astype(str)
    labels = [n if i in n else f"{n} [{i}]" for i, n in zip(ids, names)]
    xy, geographic, graph = node_layout(city)
    b = min(max_windows, len(times))
    drawn_map = map_svg(xy, data["errors"], labels, geographic, graph, nodes, city.units[c])
    sections = [
        ("map", "Test error by node", f"<div class=figure>{drawn_map}</div><p class=caption>Masked MAE of "
         f"{_e(city.channels[c])} per node over the test split; the plotted nodes are labelled in bold.</p>"),
        ("forecasts", "Forecast against truth",
         f"<div class=figure>{forecast_svg(data['result'], nodes, labels, c, b, notes)}</div><p class=caption>The "
         f"first {b} test windows; {'the nodes asked for' if data['picked'] else 'the nodes with the largest test MAE'}"
         f"{'; shaded: notes in force' if notes else ''}.</p>"),
        ("metrics", "Metrics against the baselines", metrics_html(data["metrics"], data["model"])),
        ("explanations", "Explained forecasts",
         "<p class=caption>Each claim in an explanation is checked against the data: <b>held</b>, <b>failed</b>, "
         "<b>unparsed</b> (a sentence of a checkable shape the checker could not read) or unchecked (the data "
         "cannot settle it); each says who wrote it, the model (underlined) or the program (filled-in facts and the "
         "forecast numbers). Each node at its worst test window.</p>"
         + "".join(explanation_html(r) for r in data["explained"])),
    ]
    if city.notes is not None:
        sections.append(("notes", "Notes in the test period", notes_html(notes) if notes else
                         "<p>No note of this city is in force during the test period.</p>"))
    place = f" ({city.city})" if city.city else ""
    subtitle = (f"{city.name}{place}: {city.n_nodes} nodes, {city.channels[c]} ({city.units[c]}), every "
                f"{_duration(city.interval)}; test split {_minute(times[0, 0])} to {_minute(times[-1, -1])}, "
                f"{len(times)} windows; model: {data['model']}")
    return render_page(title or f"stllm report: {city.name}", subtitle, sections)


def write_report(model, city: CityData, out: str | Path, nodes: list | None = None, n_explain: int = 3,
                 channel: str | int = 0, explain_mode: str | None = None, title: str | None = None) -> Path:
    """Write the report page of `model` on `city`'s test split to `out` (see `collect` for the options)."""
    page = page_html(city, collect(model, city, nodes, n_explain, channel, explain_mode), title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# ---- CLI ----------------------------------------------------------------------------------------------------------
def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page about a run on a city's test split")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", required=True, help="dataset name or path (the run's own, or another fitted to it)")
    p.add_argument("--notes", metavar="FILE.csv", help="notes CSV for the data (default: the run's data.notes on its "
                   "own dataset)")
    p.add_argument("--nodes", nargs="+", metavar="NODE", help="sensor ids, names or positions to plot (default: the "
                   f"{N_PLOTTED} with the largest test MAE)")
    p.add_argument("--explain", type=int, default=3, metavar="N", help="explain N of the plotted nodes, each at its "
                   "worst test window (default 3; 0 = none)")
    p.add_argument("--channel", default="0", help="channel to show (name or position; default the first)")
    p.add_argument("--explain-mode", choices=("analytic", "generated"), help="how the explanations are written "
                   "(default: generated when the run has a writer, <run>/writer, else analytic)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    from stllm.cli import add_data_option          # here, not at the top: stllm.cli imports this module
    add_data_option(p)


def cmd_report(args) -> int:
    import torch

    from stllm.cli import check_writable
    check_writable(args.out)                        # refused before the model is loaded, not after forecasting
    from stllm.model import STLLM
    model = STLLM.from_pretrained(args.run)
    if torch.cuda.is_available():
        model.to_device("cuda")
    from stllm.data.fit import load_for_run
    city = load_for_run(model.meta, model.cfg.data, args.data, notes=args.notes, options=dict(args.data_options))
    mode = args.explain_mode or ("generated" if model.load_writer() is not None else None)
    out = write_report(model, city, args.out, nodes=args.nodes, n_explain=args.explain, channel=args.channel,
                       explain_mode=mode)
    print(f"report on {city.name} written to {out}")
    return 0
