"""Does the language model know, before any training, which way a note moves the data?

For every note of a notes CSV: what it did in the data (the log of the ratio between the values at its zones and
hours and the same zones and hours a week earlier), and what the language model expects without training (its
log-probability of "higher / more / greater" minus that of "lower / less / fewer" after the note's text). If the
prior points the right way, a note of a kind the training data never held could still be read in the right
direction; if not, a note's meaning has to be learned from examples, and 32 notes are few.

    STLLM_DATA_ROOT=../shared/data python benchmarks/note_prior.py --data nyc-taxi:pickups:taxi_pickups \
        nyc-bike:departures:bike_trips --notes ../shared/data/NYC_Events/events_nyc_2019_2020.csv --out prior.json

--data NAME:CHANNEL:WHAT (WHAT: what the prompt calls the values, "_" for spaces). --backbone: the language model
(default smollm2-135m, all its blocks). Prints a table per dataset; writes the rows, the share of notes whose prior
has the sign of the effect, and the correlation between the two.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np
import pandas as pd
import torch

UP, DOWN = (" higher", " more", " greater"), (" lower", " less", " fewer")


def note_effects(city) -> pd.DataFrame:
    """One row per note that meets the data: kind, text, the log ratio of the sum of its values (channel 0, at its
    zones and hours) to the sum a week earlier (+1 each), and how many entries that compares."""
    from stllm.data.notes import coverage
    texts, kinds, cover = coverage(city.notes, city.timestamps, city.n_nodes)         # cover [T, N, J]
    week = int(pd.Timedelta("7D") / city.interval)
    values = city.values[..., 0]
    rows = []
    for j in range(cover.shape[2]):
        t, n = np.nonzero(cover[:, :, j])
        keep = t >= week
        now, before = values[t[keep], n[keep]], values[t[keep] - week, n[keep]]
        seen = np.isfinite(now) & np.isfinite(before)
        if seen.any():
            ratio = np.log((now[seen].sum() + 1.0) / (before[seen].sum() + 1.0))
            rows.append({"kind": kinds[j], "text": texts[j], "effect": float(ratio), "n": int(seen.sum())})
    return pd.DataFrame(rows, columns=["kind", "text", "effect", "n"])


@torch.no_grad()
def prior(model, tokenizer, text: str, what: str) -> float:
    """The model's log-probability of an up word minus that of a down word after the note (best of each set)."""
    prompt = (f"Event in the city: {text}\nDuring this event, the number of {what} in the area compared with a "
              f"normal day is much")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    logp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    first = lambda w: tokenizer(w, add_special_tokens=False)["input_ids"][0]   # noqa: E731
    return max(logp[first(w)].item() for w in UP) - max(logp[first(w)].item() for w in DOWN)


def agreement(rows: pd.DataFrame) -> dict:
    """Share of notes whose prior has the effect's sign, and the correlation of prior and effect (None when
    fewer than two notes or no spread)."""
    if rows.empty:
        return {"sign_agreement": None, "correlation": None, "n_notes": 0}
    same = float((np.sign(rows["effect"]) == np.sign(rows["prior"])).mean())
    spread = len(rows) > 1 and rows["effect"].std() > 0 and rows["prior"].std() > 0
    corr = float(np.corrcoef(rows["effect"], rows["prior"])[0, 1]) if spread else None
    return {"sign_agreement": same, "correlation": corr, "n_notes": int(len(rows))}


def measure(city, model, tokenizer, what: str) -> dict:
    rows = note_effects(city)
    rows["prior"] = [prior(model, tokenizer, t, what) for t in rows["text"]]
    return {"dataset": city.name, "what": what, **agreement(rows), "rows": rows.to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True,
                        help="NAME:CHANNEL:WHAT, e.g. nyc-taxi:pickups:taxi_pickups")
    parser.add_argument("--notes", required=True, help="notes CSV (start,end,zones,kind,text)")
    parser.add_argument("--backbone", default="smollm2-135m", help="language model name (all its blocks)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    from stllm.backbone import BackboneConfig, build_base_model
    from stllm.data import load
    from stllm.data.notes import with_notes
    model, tokenizer = build_base_model(BackboneConfig(name=args.backbone, n_layers=None, lora_r=0))
    model.eval()
    results = []
    for spec in args.data:
        try:
            name, channel, what = spec.split(":")
        except ValueError:
            raise SystemExit(f"--data {spec!r}: expected NAME:CHANNEL:WHAT, e.g. nyc-taxi:pickups:taxi_pickups")
        city = with_notes(load(name).select_channels([channel]), args.notes)
        result = measure(city, model, tokenizer, what.replace("_", " "))
        results.append(result)
        table = pd.DataFrame(result["rows"])
        print(f"{name} ({channel}): {len(table)} notes, prior has the effect's sign in "
              f"{result['sign_agreement']:.3f}, correlation {result['correlation']}")
        print(table.assign(text=table["text"].str[:60]).round(2).to_string())
    out = {"backbone": args.backbone, "notes": args.notes, "results": results,
           "command": "python benchmarks/note_prior.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
