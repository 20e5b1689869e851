"""Packed ternary export: code packing by hand, exact round trip of models, the size/MAC report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plpriv.export import layer_report, pack_codes, pack_ternary, unpack_codes, unpack_ternary
from plpriv.nets import FaceCenterNet, ternarize

WIDTHS = (8, 16, 16, 16, 16)


def test_packing_by_hand():
    # 2 bits, little-endian digits c + 1: [-1, 0, 1, 1] -> 0 + 1*4 + 2*16 + 2*64 = 164
    assert pack_codes(torch.tensor([-1, 0, 1, 1]), "2bit").tolist() == [164]
    # base 3: five +1 -> 2 * (1 + 3 + 9 + 27 + 81) = 242
    assert pack_codes(torch.ones(5), "base3").tolist() == [242]


@pytest.mark.parametrize(("packing", "per_byte"), [("2bit", 4), ("base3", 5)])
def test_codes_round_trip(packing, per_byte):
    codes = torch.randint(-1, 2, (1001,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_codes(codes, packing)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 // per_byte)
    assert torch.equal(unpack_codes(packed, 1001, packing), codes)
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        pack_codes(torch.tensor([2]), packing)


@pytest.mark.parametrize(("mode", "full", "packing"), [("twn", False, "2bit"), ("ttq", True, "base3")])
def test_model_round_trip_is_exact(mode, full, packing, tmp_path):
    torch.manual_seed(0)
    net = ternarize(FaceCenterNet(widths=WIDTHS), mode=mode, fully_quantized=full)
    for m in net.modules():  # non-trivial norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.rand(2, 4, 32, 32)
    info = pack_ternary(net, tmp_path / "m.pt", packing=packing)
    loaded = unpack_ternary(tmp_path / "m.pt")  # rebuilt from the stored constructor
    assert torch.equal(loaded(x), net(x))
    into = unpack_ternary(tmp_path / "m.pt", model=FaceCenterNet(widths=WIDTHS))  # into a fresh float net
    assert torch.equal(into(x), net(x))
    assert info["payload_bytes"] == layer_report(net, x, packing)[-1]["bytes"]  # the report counts what is stored
    if mode == "twn":  # by hand: 16*8*9 + 3 * 16*16*9 codes at 4 per byte, 4 fp32 alphas of 16; float stem and head
        codes = (16 * 8 * 9 // 4) + 3 * (16 * 16 * 9 // 4)
        assert info["payload_bytes"] == codes + 4 * 4 * 16 + 4 * (4 * 8 * 9 + 16 * 5 + 5) + 4 * 4 * (8 + 4 * 16)


def test_report_counts_params_bytes_and_macs():
    net = ternarize(FaceCenterNet(widths=WIDTHS))
    rows = {r["layer"]: r for r in layer_report(net, torch.zeros(1, 4, 64, 64))}
    stem = rows["features.0"]  # float conv 4 -> 8, 3x3, stride 2 on 64x64: 32 * 32 * 8 outputs, 4 * 9 MACs each
    assert stem["params"] == 4 * 8 * 9 and stem["bytes"] == 4 * 4 * 8 * 9 and stem["macs"] == 32 * 32 * 8 * 36
    inner = rows["features.3"]  # ternary 8 -> 16 at 16x16: 2 bits per weight + one fp32 alpha per channel (TWN)
    assert inner["bits"] == 2.0 and inner["bytes"] == 8 * 16 * 9 // 4 + 4 * 16
    assert inner["macs"] == 16 * 16 * 16 * 8 * 9
    total = rows["total"]
    assert total["params"] == sum(v.numel() for v in FaceCenterNet(widths=WIDTHS).state_dict().values()
                                  if v.is_floating_point())


def test_unpack_needs_an_architecture(tmp_path):
    net = ternarize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    pack_ternary(net, tmp_path / "s.pt")
    with pytest.raises(ValueError, match="model="):
        unpack_ternary(tmp_path / "s.pt")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    assert torch.equal(unpack_ternary(tmp_path / "s.pt", model=fresh)(x), net.eval()(x))
    with pytest.raises(ValueError, match="ternarize"):
        pack_ternary(nn.Linear(2, 2), tmp_path / "f.pt")
