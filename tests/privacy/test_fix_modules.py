"""fix_modules (issue 29): each swap computes the same function with the weights carried over; refusals name the
layer and the fix for its type."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from plpriv.nets.dp_attention import DPMultiheadAttention
from plpriv.privacy.validation import fix_modules, validate_modules

N, L, S, E, H = 3, 4, 5, 8, 2


def _masks() -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -1] = padding[2, -2:] = True
    return {
        "none": {},
        "bool_attn_mask": {"attn_mask": causal},
        "float_attn_mask": {"attn_mask": torch.randn(L, S, generator=g)},
        "per_head_attn_mask": {"attn_mask": torch.randn(N * H, L, S, generator=g)},
        "bool_key_padding": {"key_padding_mask": padding},
        "float_key_padding": {"key_padding_mask": torch.randn(N, S, generator=g)},
        "both": {"attn_mask": causal, "key_padding_mask": padding},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("mask", list(_masks()))
def test_attention_swap_keeps_outputs(batch_first: bool, kdim: int | None, mask: str) -> None:
    torch.manual_seed(0)
    holder = nn.Sequential(nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)).eval()
    old = holder[0]
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, kdim or E), torch.randn(N, S, kdim or E)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    kwargs = _masks()[mask]
    before = {(w, a): old(q, k, v, need_weights=w, average_attn_weights=a, **kwargs)
              for w in (True, False) for a in (True, False)}
    assert fix_modules(holder, log=lambda _: None) == ["0"]
    new = holder[0]
    assert isinstance(new, DPMultiheadAttention) and not new.training
    for (w, a), (out, weights) in before.items():
        got, got_weights = new(q, k, v, need_weights=w, average_attn_weights=a, **kwargs)
        torch.testing.assert_close(got, out, atol=1e-6, rtol=0)
        assert (weights is None) == (got_weights is None)
        if weights is not None:
            torch.testing.assert_close(got_weights, weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_swap_keeps_causal_hint_and_unbatched(batch_first: bool) -> None:
    torch.manual_seed(0)
    old = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=False).eval()
    new = DPMultiheadAttention.from_torch(old)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for need_weights in (True, False):
        torch.testing.assert_close(new(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)[0],
                                   old(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)[0],
                                   atol=1e-6, rtol=0)
    one = torch.randn(L, E)
    torch.testing.assert_close(new(one, one, one)[0], old(one, one, one)[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        new(x, x, x, is_causal=True)


@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_loads_a_torch_checkpoint(kdim: int | None) -> None:
    torch.manual_seed(0)
    old = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim).eval()
    new = DPMultiheadAttention(E, H, kdim=kdim, vdim=kdim).eval()
    new.load_state_dict(old.state_dict())
    q, kv = torch.randn(L, N, E), torch.randn(S, N, kdim or E)
    torch.testing.assert_close(new(q, kv, kv)[0], old(q, kv, kv)[0], atol=1e-6, rtol=0)


def test_transformer_encoder_swap_keeps_outputs() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -1] = True
    before = encoder(x, mask=causal, is_causal=True), encoder(x, src_key_padding_mask=padding)
    assert fix_modules(encoder, log=lambda _: None) == ["layers.0.self_attn", "layers.1.self_attn"]
    after = encoder(x, mask=causal, is_causal=True), encoder(x, src_key_padding_mask=padding)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("rnn", "dp_type"), [(nn.LSTM, DPLSTM), (nn.GRU, DPGRU)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_rnn_swap_keeps_outputs(rnn: type[nn.Module], dp_type: type[nn.Module], batch_first: bool) -> None:
    torch.manual_seed(0)
    holder = nn.Sequential(rnn(5, 6, num_layers=2, batch_first=batch_first, bidirectional=True))
    x = torch.randn(N, L, 5) if batch_first else torch.randn(L, N, 5)
    out, hidden = holder[0](x)
    fix_modules(holder, log=lambda _: None)
    assert type(holder[0]) is dp_type
    got, got_hidden = holder[0](x)
    torch.testing.assert_close(got, out, atol=1e-6, rtol=0)
    for a, b in zip(got_hidden if isinstance(got_hidden, tuple) else (got_hidden,),
                    hidden if isinstance(hidden, tuple) else (hidden,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_inplace_layers_become_out_of_place() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Dropout(0.1, inplace=True), nn.Hardswish(True))
    x = torch.randn(4, 3)
    before = net.eval()(x)
    fix_modules(net, log=lambda _: None)
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    torch.testing.assert_close(net(x), before)


@pytest.mark.parametrize(("layer", "named", "fix"), [
    (nn.MultiheadAttention(E, H), "MultiheadAttention", "swaps it for plpriv.nets.dp_attention.DPMultiheadAttention"),
    (nn.MultiheadAttention(E, H, add_bias_kv=True), "MultiheadAttention", "build it with add_bias_kv=False"),
    (nn.LSTM(3, 4), "LSTM", "swaps it for opacus' DPLSTM"),
    (nn.LSTM(3, 4, proj_size=2), "LSTM", "has no proj_size"),
    (nn.BatchNorm1d(4), "BatchNorm1d", r"GroupNorm\(gcd\(32, C\), C\)"),
])
def test_refusal_names_the_layer_and_its_fix(layer: nn.Module, named: str, fix: str) -> None:
    with pytest.raises(ValueError, match=rf"`0` \({named}\): .*{fix}") as info:
        validate_modules([("", nn.Sequential(layer))])
    if isinstance(layer, nn.MultiheadAttention):
        assert "GroupNorm" not in str(info.value)


def test_unfixable_layers_stay_and_are_refused() -> None:
    net = nn.Sequential(nn.MultiheadAttention(E, H, add_bias_kv=True), nn.LSTM(3, 4, proj_size=2))
    assert fix_modules(net, log=lambda _: None) == []
    with pytest.raises(ValueError, match=r"`0` \(MultiheadAttention\).*\n.*`1` \(LSTM\)"):
        validate_modules([("", net)])


class _Residual(nn.Module):
    """timm/torchvision ResNet style: in-place add on a hooked layer's output, then an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        out += x
        return self.act(out).mean(dim=(2, 3))


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_gradients_with_inplace_ops_and_channels_last(mode: str, channels_last: bool) -> None:
    from plpriv.privacy.per_sample import PerSampleHooks

    torch.manual_seed(0)
    net = _Residual()
    x = torch.randn(4, 4, 5, 5)
    if channels_last:  # opacus 1.6's conv rule alone returns zeros for this layout
        x = x.contiguous(memory_format=torch.channels_last)
    hooks = PerSampleHooks([("", net)], mode=mode, max_grad_norm=1.0)
    net(x).pow(2).sum(dim=1).mean().backward()
    got = {n: p.grad_sample.clone() for n, p in net.named_parameters()}
    hooks.cleanup()
    for i in range(len(x)):
        net.zero_grad()
        net(x[i:i + 1]).pow(2).sum().backward()
        for n, p in net.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, atol=1e-5, rtol=1e-4)


def test_ghost_clipping_names_a_layer_used_twice() -> None:
    from plpriv.privacy.per_sample import PerSampleHooks

    class Shared(nn.Module):  # the demo Transformer's embedding, used for source and target
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embed(x) + self.embed(2 * x)

    net = Shared()
    hooks = PerSampleHooks([("net", net)], mode="ghost", max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"`net\.embed` \(Linear\) runs more than once.*'hooks' or 'functorch'"):
        net(torch.randn(4, 3))
    hooks.cleanup()

