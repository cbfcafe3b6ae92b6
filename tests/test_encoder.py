import numpy as np
import torch
import torch.nn.functional as F

from stllm.config import load_config
from stllm.data.prepared import PreparedCity
from stllm.data.synthetic import make_city
from stllm.nn.encoder import STEncoder
from stllm.nn.graph import GraphConv, GraphFusion
from stllm.nn.heads import RegressionHead
from stllm.nn.temporal import GatedTemporalConv


def _encoder(cfg, prep):
    torch.manual_seed(0)
    return STEncoder(cfg.encoder, cfg.data, prep.city.n_channels, prep.n_exog).eval()


def test_shapes_through_the_encoder(tiny_city):
    cfg = load_config(None, ["encoder.patch_len=6", "encoder.d_enc=8"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    enc = _encoder(cfg, prep)
    tokens = enc(prep.batch(prep.splits["train"][:5]))
    assert enc.n_tokens == 2 + 2                              # two patches of 6 + day + week
    assert tokens.shape == (5, 6, 4, 8)
    assert torch.isfinite(tokens).all()


def test_no_parameter_depends_on_the_number_of_nodes():
    cfg = load_config()
    small, big = make_city(n_nodes=5, n_days=15, seed=1), make_city(n_nodes=11, n_days=15, seed=2)
    prep_s, prep_b = PreparedCity(small, cfg.data, cfg.encoder), PreparedCity(big, cfg.data, cfg.encoder)
    enc = _encoder(cfg, prep_s)
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    assert shapes == {k: v.shape for k, v in _encoder(cfg, prep_b).state_dict().items()}
    assert enc(prep_b.batch(prep_b.splits["test"][:2])).shape[1] == 11   # the same weights run on both
    assert enc(prep_s.batch(prep_s.splits["test"][:2])).shape[1] == 5


def test_gated_conv_is_causal():
    torch.manual_seed(0)
    layer = GatedTemporalConv(4, [2, 3], dilation=2).eval()
    x = torch.randn(1, 10, 4)                                 # [B, t, d]
    y = layer(x)[0]
    x2 = x.clone()
    x2[:, 7:] += 5.0                                          # change only the future of step 6
    y2 = layer(x2)[0]
    assert torch.allclose(y[:, :7], y2[:, :7])
    assert not torch.allclose(y[:, 7:], y2[:, 7:])


def test_gated_conv_equals_a_dilated_conv1d():
    """The taps-and-matmul form is exactly torch's causal dilated conv1d with the same weights."""
    torch.manual_seed(0)
    d, k, dil = 3, 3, 2
    layer = GatedTemporalConv(d, [k], dilation=dil).eval()
    x = torch.randn(2, 9, d)                                  # [B, t, d]
    w = layer.convs[0].weight.reshape(2 * d, k, d).permute(0, 2, 1)   # [out, in, k]
    conv = F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) * dil, 0)), w, layer.convs[0].bias, dilation=dil)
    f, g = conv.transpose(1, 2).chunk(2, dim=-1)
    h = torch.tanh(f) * torch.sigmoid(g)
    out, skip = layer(x)
    assert torch.allclose(out, x + layer.out(h), atol=1e-5)
    assert torch.allclose(skip, layer.skip(h), atol=1e-5)


def test_graph_conv_and_fusion_formulas():
    torch.manual_seed(0)
    conv = GraphConv(3)
    adj = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    x = torch.randn(2, 3, 1, 3)                               # [b, N, k, d]
    w = conv.lin.weight.T
    manual = F.leaky_relu(torch.einsum("nm,bmkd->bnkd", adj, x @ w), 0.1)
    assert torch.allclose(conv(x, adj), manual, atol=1e-6)
    # node 1 only listens to itself: its output must not move when node 0 changes
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert torch.allclose(conv(x2, adj)[:, 1], conv(x, adj)[:, 1])

    fusion = GraphFusion(3)
    hs, hd = torch.randn(4, 3), torch.randn(4, 3)
    a, b = hs @ fusion.w1.weight.T, hd @ fusion.w2.weight.T
    z = torch.sigmoid(a + b + fusion.bias)
    assert torch.allclose(fusion(hs, hd), fusion.w_bar(z * a + (1 - z) * b), atol=1e-6)


def test_regression_head_formula():
    torch.manual_seed(0)
    head = RegressionHead(d_llm=4, n_tokens=2, t_out=3, n_channels=2, hidden=5)
    h_his, h_pre = torch.randn(2, 7, 2, 4), torch.randn(2, 7, 4)
    y = head(h_his, h_pre)
    assert y.shape == (2, 3, 7, 2)
    a = F.relu(head.w1(head.norm_his(h_his).reshape(2, 7, 8)))
    p = F.relu(head.w2(head.norm_pre(h_pre)))
    manual = head.w3(torch.cat([a, p], -1)).reshape(2, 7, 3, 2).permute(0, 2, 1, 3)
    assert torch.allclose(y, manual, atol=1e-6)


def test_wind_graph_reaches_the_encoder(tiny_city):
    cfg = load_config(None, ["encoder.dynamic_graph=wind"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    enc = _encoder(cfg, prep)
    batch = prep.batch(prep.splits["train"][:2])
    base = enc(batch)
    batch["dynamic_adj"] = torch.eye(6).expand(2, 6, 6)
    assert not torch.allclose(base, enc(batch))


def test_token_mix_keeps_shapes_and_node_independence():
    """encoder.mix_hidden adds an MLP over each node's tokens: same shapes, same weights for any number of nodes,
    and a node's tokens depend on its own other tokens (the recent patch moves when only its week window moves)."""
    cfg = load_config(None, ["encoder.mix_hidden=32", "encoder.d_enc=8", "encoder.static_graph=false",
                             "encoder.dynamic_graph=none"])
    small, big = make_city(n_nodes=5, n_days=15, seed=1), make_city(n_nodes=11, n_days=15, seed=2)
    prep_s, prep_b = PreparedCity(small, cfg.data, cfg.encoder), PreparedCity(big, cfg.data, cfg.encoder)
    enc = _encoder(cfg, prep_s)
    assert enc.mix is not None and enc(prep_b.batch(prep_b.splits["test"][:2])).shape == (2, 11, 3, 8)
    batch = prep_s.batch(prep_s.splits["test"][:1])
    moved = dict(batch, periods=batch["periods"].clone())
    moved["periods"][:, 1] += 3.0                                    # only the week window changes
    a, b = enc(batch), enc(moved)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])               # the recent patch token saw it
    no_mix = _encoder(load_config(None, ["encoder.mix_hidden=0", "encoder.d_enc=8", "encoder.static_graph=false",
                                         "encoder.dynamic_graph=none"]), prep_s)
    assert torch.allclose(no_mix(batch)[:, :, 0], no_mix(moved)[:, :, 0])   # without the mix it could not
