"""Where a zero-shot forecast's error comes from: the naive floor, or the correction the model adds to it.

For a held-out city and a run (e.g. a leave-one-out pretraining run), on every `--every`-th test window:
- `picked`: for each node, the naive reference (last value, a day / a week earlier, the profile) with the smallest
  error on the city's training part (`PreparedCity.reference_fit`), used alone: a hard version of
  `model.floor_city_fit`;
- `floor_alone`: the run's floor with the model's correction set to zero;
- `floor_and_correction`: the run's forecast with its language model off (the encoder-only zero-shot).

    STLLM_DATA_ROOT=../shared/data python benchmarks/floor_parts.py --run runs/loo/beijing-air/steps1000+200/general+... \
        --data beijing-air --channel PM2.5 --every 8

Masked MAE on the original scale; prints one line of JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch


def picked_reference_mae(model, prep, starts: np.ndarray, batch_size: int = 64) -> float:
    """Masked MAE of each node's reference with the smallest training-part error (per horizon step)."""
    from stllm.nn.floor import NaiveFloor
    err = count = 0.0
    std = torch.as_tensor(prep.scaler.std, dtype=torch.float32)
    for lo in range(0, len(starts), batch_size):
        b = prep.batch(starts[lo:lo + batch_size])
        refs, seen = NaiveFloor.references(b, prep.t_out)                                       # [R, b, t, N, C]
        fit = torch.where(seen.bool(), b["reference_fit"][:, None], torch.full_like(refs, float("inf")))
        choice = refs.gather(0, fit.argmin(0, keepdim=True))[0]                                 # [b, t, N, C]
        err += ((choice - b["y"]).abs() * std * b["y_mask"]).sum().item()
        count += b["y_mask"].sum().item()
    return err / max(count, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run trained with model.floor (and data.profile)")
    parser.add_argument("--data", required=True, help="the held-out dataset")
    parser.add_argument("--channel", action="append", default=[], help="its channel (repeatable)")
    parser.add_argument("--every", type=int, default=8, help="use every n-th test window")
    args = parser.parse_args()
    from stllm.data.fit import fit_to_run, load_city
    from stllm.infer import masked_mae_where
    from stllm.model import STLLM
    model = STLLM.from_pretrained(args.run)
    if model.floor is None:
        raise SystemExit(f"{args.run}: trained without model.floor; there is no floor to take apart")
    model.llm_active = False
    city = load_city(replace(model.cfg.data, name=args.data, options={}, channels=args.channel, sources=[], notes=""))
    prep = model.prepare(fit_to_run(city, model.meta))
    starts = prep.splits["test"][::args.every]
    everywhere = {"all": np.ones((len(starts), prep.t_out, prep.n_nodes), bool)}
    result = {"data": args.data, "run": args.run, "windows": int(len(starts)),
              "picked": picked_reference_mae(model, prep, starts),
              "floor_and_correction": masked_mae_where(model, prep, starts, everywhere, 32)["all"][0]}
    forecast = model._forecast
    model._forecast = lambda batch: torch.zeros_like(forecast(batch))       # the correction set to zero
    result["floor_alone"] = masked_mae_where(model, prep, starts, everywhere, 32)["all"][0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
