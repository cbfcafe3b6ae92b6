"""Rationale datasets: run a teacher over (node, start) samples and keep the results as a `datasets.Dataset`.

Columns: prompt (the student's node-layout prompt), rationale (text with the FORECAST_SLOT placeholder),
target (list of t_out floats, the true future; None where missing), teacher (name), facts (JSON string of
`Facts.to_dict()`), node (node id), start (timestamp of the first target step, "YYYY-MM-DD HH:MM").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from datasets import Dataset, Features, Sequence, Value, load_from_disk

from stllm.data.city import CityData
from stllm.distill.facts import Effect
from stllm.distill.teachers import Teacher

FEATURES = Features({"prompt": Value("string"), "rationale": Value("string"), "target": Sequence(Value("float64")),
                     "teacher": Value("string"), "facts": Value("string"), "node": Value("string"),
                     "start": Value("string")})
DATASET_DIR = "dataset"          # save_rationales: the `save_to_disk` folder inside out_dir
JSONL = "rationales.jsonl"       # ... and the same rows as JSON lines next to it


def distill(city: CityData, teacher: Teacher, samples: Iterable[tuple], t_in: int = 12, t_out: int = 12,
            channel: str | int = 0, effects: dict[str, dict[str, Effect]] | None = None) -> Dataset:
    """One rationale per (node, start) sample (node: id, name or position; start: index or timestamp)."""
    rows = []
    for node, start in samples:
        r = teacher.explain(city, node, start, t_in=t_in, t_out=t_out, channel=channel, effects=effects)
        rows.append({"prompt": r.prompt, "rationale": r.text, "target": list(r.target), "teacher": r.teacher_name,
                     "facts": json.dumps(r.facts, ensure_ascii=False), "node": r.facts["node_id"],
                     "start": r.facts["start"]})
    return Dataset.from_list(rows, features=FEATURES)


def save_rationales(ds: Dataset, out_dir: str | Path) -> Path:
    """Write `out_dir/dataset/` (save_to_disk) and `out_dir/rationales.jsonl`; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(out / DATASET_DIR))
    with open(out / JSONL, "w", encoding="utf-8") as fh:
        for row in ds:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def load_rationales(directory: str | Path) -> Dataset:
    """The dataset written by `save_rationales` (from the JSONL when the dataset folder is missing)."""
    d = Path(directory)
    if (d / DATASET_DIR).is_dir():
        return load_from_disk(str(d / DATASET_DIR))
    if (d / JSONL).is_file():
        with open(d / JSONL, encoding="utf-8") as fh:
            return Dataset.from_list([json.loads(line) for line in fh if line.strip()], features=FEATURES)
    raise FileNotFoundError(f"no rationales in {d}: expected {d / DATASET_DIR}/ or {d / JSONL} "
                            "(written by stllm.distill.save_rationales)")
