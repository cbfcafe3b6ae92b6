"""A floor under every forecast: scale from the window itself (data.window_norm) and a start from the naive
forecasts its history supports (model.floor).

Per-window normalisation (RevIN, as OpenCity and UniST use it): each window's node and channel is read relative to
its own mean and spread over what the model is shown (the recent history and the target-aligned period windows:
a day and a week earlier, the hour-of-week profile), and the forecast is scaled back. A city whose values are ten
times larger then gives the same normalised inputs, and a forecast ten times larger. The spread is taken over the
period windows too: a station that was empty all night has no spread in its history, but yesterday's same hours
show the morning rush the forecast must reach.

The naive floor: a learned mix, per horizon step, of the history's last step (when it is observed), the same time a day earlier and a
week earlier (and the hour-of-week profile with data.profile), over those the history reaches (a missing one
gets no weight). The model adds its correction to that mix, so on a new city its start is the city's own rhythm.
With model.floor_fit the mix is also the window's own: each reference loses weight with its error on the window's
history (what it would have said about each history step against what happened), so a city whose hour-of-week
average fits best leans on it, and one with a steady level on the last value, without training on that city.
With model.floor_city_fit each node's mix also follows how well each reference forecast the city's training part
(`PreparedCity.reference_fit`: relative errors computed once per city from its own inputs, as the profile is):
twelve history steps are a short record, a city's months of its own data are a long one.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_SPREAD = 1e-3   # on the scaled axis (z-scores): a window with no spread at all is read as this flat


def window_stats(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread [b, 1, N, C] of each window's node and channel over its observed inputs (history and
    period windows)."""
    values, masks = [batch["x"]], [batch["x_mask"]]                       # [b, t_in, N, C]
    if "periods" in batch:
        values.append(batch["periods"].flatten(1, 2))                      # [b, P*t_out, N, C]
        masks.append(batch["period_mask"].flatten(1, 2))
    x, m = torch.cat(values, 1), torch.cat(masks, 1)
    seen = m.sum(1, keepdim=True)
    n = seen.clamp(min=1.0)
    mean = (x * m).sum(1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / n
    spread = var.sqrt().clamp(min=MIN_SPREAD)
    return mean, torch.where(seen > 0, spread, torch.ones_like(spread))   # nothing seen: the scaled axis as it is


def normalized(batch: dict, mean: torch.Tensor, spread: torch.Tensor) -> dict:
    """The batch with its inputs (x, periods) read relative to (mean, spread); unobserved entries stay 0."""
    out = dict(batch)
    out["x"] = (batch["x"] - mean) / spread * batch["x_mask"]
    if "periods" in batch:
        out["periods"] = (batch["periods"] - mean[:, None]) / spread[:, None] * batch["period_mask"]
    if "periods_hist" in batch:
        out["periods_hist"] = (batch["periods_hist"] - mean[:, None]) / spread[:, None] * batch["periods_hist_mask"]
    return out


class NaiveFloor(nn.Module):
    """[b, t_out, N, C]: a per-step softmax mix of the naive forecasts a window's history supports.

    References: the last step of the history (no weight where it is missing), then each period window of the batch (in data.periods
    order, then the profile). Their weights start equal; a reference that is unobserved at an entry gets none there,
    and an entry with no reference at all gets 0 (the window's mean, with data.window_norm).
    """

    def __init__(self, t_out: int, n_references: int, fit: bool = False, city_fit: bool = False):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_references, t_out))
        # model.floor_fit: a reference's weight also falls with its error on the window's own history, by a learned
        # sharpness (softplus, starting at 1 per unit of error on the axis the inputs are on)
        self.sharpness = nn.Parameter(torch.tensor(0.5413)) if fit else None   # softplus(0.5413) = 1.0
        # model.floor_city_fit: the same for each reference's relative error on the city's training part
        self.city_sharpness = nn.Parameter(torch.tensor(0.5413)) if city_fit else None

    def history_errors(self, batch: dict) -> torch.Tensor:
        """[R, b, 1, N, C]: each reference's mean absolute error over the history steps where both it and the value
        are observed (the last value as a one-step-ahead forecast of the next history step); references with no such
        step get the largest error any reference has there, so they are not preferred for lack of evidence."""
        x, m = batch["x"], batch["x_mask"]                                   # [b, t_in, N, C]
        errs, seen = [(x[:, 1:] - x[:, :-1]).abs()], [m[:, 1:] * m[:, :-1]]
        if "periods_hist" in batch:
            for ref, rm in zip(batch["periods_hist"].unbind(1), batch["periods_hist_mask"].unbind(1)):
                errs.append((ref - x).abs())
                seen.append(rm * m)
        err = torch.stack([(e * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1.0)
                           for e, w in zip(errs, seen)])                     # [R, b, 1, N, C]
        has = torch.stack([w.sum(1, keepdim=True) > 0 for w in seen])
        worst = torch.where(has, err, torch.zeros_like(err)).amax(0, keepdim=True)
        return torch.where(has, err, worst)

    @staticmethod
    def references(batch: dict, t_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive references of a batch and their masks, [R, b, t_out, N, C] each: the last value of the history,
        then each period window (data.periods order, then the profile)."""
        refs = [batch["x"][:, -1:].expand(-1, t_out, -1, -1)]               # [b, t_out, N, C]
        masks = [batch["x_mask"][:, -1:].expand(-1, t_out, -1, -1)]
        if "periods" in batch:
            refs += list(batch["periods"].unbind(1))
            masks += list(batch["period_mask"].unbind(1))
        return torch.stack(refs), torch.stack(masks)

    def forward(self, batch: dict) -> torch.Tensor:
        refs, masks = self.references(batch, self.logits.shape[1])          # [R, b, t_out, N, C]
        if len(refs) != self.logits.shape[0]:
            raise ValueError(f"model.floor: the batch has {len(refs)} naive references, the model was built for "
                             f"{self.logits.shape[0]} (data.periods and data.profile must match the run's)")
        logits = self.logits[:, None, :, None, None]                         # [R, 1, t_out, 1, 1]
        if self.sharpness is not None:
            logits = logits - nn.functional.softplus(self.sharpness) * self.history_errors(batch)
        if self.city_sharpness is not None:
            if "reference_fit" not in batch:
                raise ValueError("model.floor_city_fit needs the batch's reference_fit (PreparedCity with "
                                 "data.periods or data.profile)")
            fit = batch["reference_fit"].to(logits.dtype)[:, None]           # [R, 1, t_out, N, C]
            logits = logits - nn.functional.softplus(self.city_sharpness) * fit
        weights = torch.softmax(logits, 0) * masks
        return (weights * refs).sum(0) / weights.sum(0).clamp(min=1e-6)
