"""Reading a run's results in tests: its numbers without the clock, and its log."""
import json
from pathlib import Path

TIMING = {"wall_s", "windows_per_s", "peak_rss_mb", "elapsed_s"}   # clock and memory readings, not results


def numbers(tree, prefix: str = "") -> dict:
    """{dotted.path: value} for every leaf of a JSON tree (metrics.json, log records), timing readings left out."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if key not in TIMING
                for k, v in numbers(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in numbers(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def log_of(run: Path) -> list[dict]:
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
