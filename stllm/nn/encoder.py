"""STEncoder: a window of city data -> ST-tokens [b, N, k, d_enc]. No node-indexed parameters."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stllm.data.prepared import SERIES_FEATURES
from stllm.nn.graph import SpatialBlock
from stllm.nn.temporal import TemporalEncoder

N_TIME_FEATURES = 4  # sin/cos time of day, sin/cos day of week (then, with data.holiday_features, 1 + P flags)


class STEncoder(nn.Module):
    """Patching of the recent window, one token per period window (day, week), graph convolution on all tokens.

    Sizes that come from the data are passed explicitly: n_channels (C) and n_exog (E).
    tokens per node: k = ceil(t_in / patch_len) + len(periods) (+ 1 with data.profile)
    """

    def __init__(self, enc_cfg, data_cfg, n_channels: int, n_exog: int):
        super().__init__()
        d, self.patch_len = enc_cfg.d_enc, enc_cfg.patch_len
        self.t_in, self.t_out = data_cfg.t_in, data_cfg.t_out
        self.n_channels, self.n_exog = n_channels, n_exog
        self.n_patches = math.ceil(self.t_in / self.patch_len)
        self.n_periods = len(data_cfg.periods) + int(data_cfg.profile)   # + the hour-of-week average (data.profile)
        self.n_tokens = self.n_patches + self.n_periods
        self.n_time = N_TIME_FEATURES + (1 + len(data_cfg.periods) if data_cfg.holiday_features else 0)
        n_features = 2 * n_channels + self.n_time + n_exog          # values, masks, calendar, weather
        self.input = nn.Linear(n_features, d)
        self.temporal = TemporalEncoder(d, enc_cfg.temporal_layers, enc_cfg.kernel_sizes, enc_cfg.dropout)
        self.patch = nn.Linear(self.patch_len * d, d)
        # A period window (the target-aligned hours a day or a week earlier) is embedded directly by an MLP:
        # it is already aligned with the targets, so it needs no temporal convolution (and this is 3x cheaper).
        self.period = nn.Sequential(nn.Linear(self.t_out * 2 * n_channels + self.n_time, d), nn.GELU(), nn.Linear(d, d))
        self.token_type = nn.Parameter(torch.randn(self.n_tokens, d) * 0.02)  # closeness patches, day, week
        # What the series is (encoder.series_features): one vector per window added to every token; zero at the
        # start, so a run begins as it would without it
        self.series = nn.Linear(n_channels * SERIES_FEATURES, d, bias=False) if enc_cfg.series_features else None
        if self.series is not None:
            nn.init.zeros_(self.series.weight)
        self.spatial = SpatialBlock(d, enc_cfg.static_graph, enc_cfg.dynamic_graph, enc_cfg.dropout)
        self.mix = TokenMix(self.n_tokens * d, enc_cfg.mix_hidden, enc_cfg.dropout) if enc_cfg.mix_hidden else None

    def _features(self, x, mask, tf, exog, n_nodes: int) -> torch.Tensor:
        """[b, t, N, C] values and masks, [b, t, n_time] calendar, [b, t, N|1, E] weather -> [b*N, t, d]."""
        b, t = x.shape[:2]
        parts = [x, mask, tf[:, :, None, :].expand(b, t, n_nodes, self.n_time)]
        if self.n_exog:
            parts.append(exog.expand(b, t, n_nodes, self.n_exog))
        h = self.input(torch.cat(parts, dim=-1))                      # [b, t, N, d]
        return h.permute(0, 2, 1, 3).reshape(b * n_nodes, t, -1)       # [b*N, t, d]

    def _when(self, tf_out: torch.Tensor) -> torch.Tensor:
        """[b, t_out, n_time] -> [b, n_time]: the first target step's time of day and week; the holiday flags
        as the share of target steps they hold for (a forecast may run into a holiday)."""
        return torch.cat([tf_out[:, 0, :N_TIME_FEATURES], tf_out[:, :, N_TIME_FEATURES:].mean(1)], dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["x"]                                                # [b, t_in, N, C]
        b, _, n_nodes, _ = x.shape
        h = self.temporal(self._features(x, batch["x_mask"], batch["tf_in"], batch["exog"], n_nodes))  # [b*N, t_in, d]
        pad = self.n_patches * self.patch_len - self.t_in
        h = F.pad(h, (0, 0, pad, 0))                                   # left-pad to whole patches
        h = h.reshape(b * n_nodes, self.n_patches, -1)                 # [b*N, k_close, patch_len*d]
        tokens = [self.patch(h)]                                       # [b*N, k_close, d]
        if self.n_periods:
            periods, pmask = batch["periods"], batch["period_mask"]   # [b, P, t_out, N, C]
            when = self._when(batch["tf_out"])[:, None, :].expand(b, n_nodes, self.n_time)    # [b, N, n_time]
            for p in range(self.n_periods):
                flat = torch.cat([periods[:, p], pmask[:, p]], -1)    # [b, t_out, N, 2C]
                flat = flat.permute(0, 2, 1, 3).reshape(b, n_nodes, -1)  # [b, N, t_out*2C]
                hp = self.period(torch.cat([flat, when], -1))          # [b, N, d]
                tokens.append(hp.reshape(b * n_nodes, 1, -1))          # [b*N, 1, d]
        z = torch.cat(tokens, dim=1) + self.token_type                 # [b*N, k, d]
        if self.series is not None:
            z = z + self.series(batch["series"].to(z.dtype).reshape(-1))      # [C * SERIES_FEATURES] -> [d]
        z = z.reshape(b, n_nodes, self.n_tokens, -1)                   # [b, N, k, d]
        z = self.spatial(z, batch.get("static_adj"), batch.get("dynamic_adj"))
        return z if self.mix is None else self.mix(z)


class TokenMix(nn.Module):
    """An MLP over all of a node's tokens, added to them (residual, LayerNorm): without it the recent patches and
    the day / week windows meet only in a head. The same weights for every node.

    [b, N, k, d] -> [b, N, k, d], with width = k * d
    """

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)                                            # [b, N, k*d]
        return self.norm(flat + self.mlp(flat)).view_as(z)
