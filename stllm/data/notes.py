"""Notes: dated text about places (`CityData.notes`), read from a notes CSV and routed to windows.

A notes CSV has the columns `start,end,zones,kind,text` (docs/data_formats.md):
    start, end   local clock times ("2019-03-16 11:00"); end >= start; the note holds for every step in [start, end]
    zones        `;`-separated node names or ids of the city, or `all`
    kind         one word ("parade", "closure", ...)
    text         one sentence
Notes outside the data's time range are allowed (they simply never meet a window).

Which nodes and hours a note concerns is data, so routing it is the program's job (`coverage`); what the note
means is the language model's to read (stllm.nn.text).
"""
from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from stllm.data.city import CityData, DataError

COLUMNS = ("start", "end", "zones", "kind", "text")
ALL = "all"


def read_notes(path: str | Path, city: CityData) -> pd.DataFrame:
    """A notes CSV -> a frame with columns start, end (Timestamps), nodes (tuple of node positions; () = all),
    kind, text. Every problem is a DataError naming the file, the row (line number, header = 1) and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: notes file not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{path}: not a readable notes CSV ({type(err).__name__}: {err}); expected the columns "
                        f"{','.join(COLUMNS)}") from None
    return notes_frame(raw, city, source=str(path))


def notes_frame(rows, city: CityData, source: str = "notes") -> pd.DataFrame:
    """Rows (a DataFrame or a list of dicts with start, end, zones, kind, text) -> the checked notes frame."""
    raw = pd.DataFrame(rows).copy()
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: notes need the columns {','.join(COLUMNS)}; missing {missing}, "
                        f"found {list(raw.columns)}")
    names = _node_lookup(city)
    out = []
    for i, row in enumerate(raw.to_dict("records")):
        where = f"{source}, row {i + 2}"   # the line a user sees in an editor (header = line 1)
        start, end = _time(row["start"], where, "start"), _time(row["end"], where, "end")
        if end < start:
            raise DataError(f"{where}: end {end} is before start {start}")
        text, kind = _cell(row["text"]), _cell(row["kind"])
        if not text:
            raise DataError(f"{where}: field 'text' is empty; a note needs one sentence of text")
        out.append({"start": start, "end": end, "nodes": _nodes(_cell(row["zones"]), names, where),
                    "kind": kind, "text": text})
    return pd.DataFrame(out, columns=["start", "end", "nodes", "kind", "text"])


def with_notes(city: CityData, notes) -> CityData:
    """The city with notes attached: `notes` is a notes CSV path, a frame or rows (see notes_frame), or None."""
    if notes is None or (isinstance(notes, str) and not notes):
        return city
    frame = read_notes(notes, city) if isinstance(notes, (str, Path)) else notes_frame(notes, city)
    return replace(city, notes=frame)


def short_notes(notes: pd.DataFrame | None, max_hours: float) -> pd.DataFrame | None:
    """The notes that last at most `max_hours` (end - start); all of them when max_hours is 0."""
    if notes is None or not max_hours:
        return notes
    return notes[(notes["end"] - notes["start"]) <= pd.Timedelta(hours=max_hours)].reset_index(drop=True)


def coverage(notes: pd.DataFrame | None, timestamps: np.ndarray, n_nodes: int
             ) -> tuple[list[str], list[str], np.ndarray]:
    """Route notes to steps and nodes: (texts [J], kinds [J], cover [T, N, J] bool) for the J notes that meet
    `timestamps`. A text is what the language model reads (`note_text`: kind and sentence).

    cover[t, n, j] is true when note j holds at step t (start <= timestamp <= end) and names node n (or all).
    Notes that meet no step are dropped, so J counts only notes that can reach a window.
    """
    texts: list[str] = []
    kinds: list[str] = []
    columns: list[np.ndarray] = []
    if notes is not None and len(notes):
        times = np.asarray(timestamps, dtype="datetime64[ns]")
        for note in notes.itertuples(index=False):
            steps = (times >= np.datetime64(note.start, "ns")) & (times <= np.datetime64(note.end, "ns"))  # [T]
            if not steps.any():
                continue
            nodes = np.zeros(n_nodes, dtype=bool)
            nodes[list(note.nodes) if len(note.nodes) else slice(None)] = True
            columns.append(steps[:, None] & nodes[None, :])                                           # [T, N]
            texts.append(note_text(note.kind, note.text))
            kinds.append(note.kind)
    if not columns:
        return [], [], np.zeros((len(timestamps), n_nodes, 0), dtype=bool)
    return texts, kinds, np.stack(columns, axis=-1)


def note_text(kind: str, text: str) -> str:
    """What the language model reads for one note."""
    return f"{kind}: {text}" if kind else text


def shuffled(notes: pd.DataFrame, city: CityData, seed: int = 0) -> pd.DataFrame:
    """A control: the same texts at wrong places and times. Each note keeps its text and duration but moves to
    another note's start (and a random other set of nodes of the same size), so what the notes say no longer
    matches where and when it happens."""
    rng = np.random.default_rng(seed)
    out = notes.copy()
    span = city.timestamps[-1] - city.timestamps[0]
    starts = []
    for note in notes.itertuples(index=False):
        # a start at least a week from the true one, inside the data
        offset = np.timedelta64(int(rng.uniform(7 * 86400, max(span / np.timedelta64(1, "s") - 7 * 86400, 7 * 86400 + 1))), "s")
        start = np.datetime64(note.start, "ns") + offset
        if start > city.timestamps[-1]:
            start = start - np.timedelta64(span)
        starts.append(pd.Timestamp(start))
    out["end"] = [s + (n.end - n.start) for s, n in zip(starts, notes.itertuples(index=False))]
    out["start"] = starts
    out["nodes"] = [tuple(sorted(rng.choice(city.n_nodes, size=len(n), replace=False).tolist())) if len(n) else ()
                    for n in notes["nodes"]]
    return out


# ---- parsing helpers -------------------------------------------------------------------------------------------
def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _time(value, where: str, field: str) -> pd.Timestamp:
    text = _cell(value)
    try:
        stamp = pd.Timestamp(text) if text else None
    except (ValueError, TypeError, OverflowError):
        stamp = None
    if stamp is None or pd.isna(stamp):
        raise DataError(f"{where}: field {field!r} is {text!r}, not a time; expected e.g. '2019-03-16 11:00'")
    return stamp.tz_localize(None) if stamp.tzinfo is not None else stamp


def _node_lookup(city: CityData) -> dict[str, int]:
    """Node names and ids -> positions (names first: a name that is another node's id keeps its own node)."""
    lookup = {str(i): k for k, i in enumerate(city.nodes["id"])}
    lookup.update({str(n): k for k, n in enumerate(city.nodes["name"])})
    return lookup


def _nodes(zones: str, names: dict[str, int], where: str) -> tuple[int, ...]:
    if not zones:
        raise DataError(f"{where}: field 'zones' is empty; give node names or ids separated by ';', or 'all'")
    if zones.lower() == ALL:
        return ()
    out = []
    for zone in (z.strip() for z in zones.split(";")):
        if not zone:
            continue
        if zone not in names:
            close = difflib.get_close_matches(zone, list(names), n=3, cutoff=0.5)
            hint = f"; closest known: {close}" if close else ""
            raise DataError(f"{where}: field 'zones' names {zone!r}, which is no node of this city{hint}")
        out.append(names[zone])
    return tuple(sorted(set(out)))
