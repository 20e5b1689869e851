"""Packed storage of ternary models and a per-layer size/compute report.

``pack_ternary(model, path)`` stores every ternary layer's codes at 2 bits per weight (4 per byte) or 5 weights per
byte (base 3: 3^5 = 243 <= 256) plus per-channel scales (float32: one alpha for TWN, W_p and W_n for TTQ), and every other tensor as float32;
``unpack_ternary(path)`` rebuilds the model (from the stored constructor, or into a given ``model``) with the stored
ternary weights frozen, so its outputs equal the original's exactly. ``layer_report`` lists parameters, bits, bytes
and MACs per layer.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from plpriv.nets.ternary import TernaryConv2d, TernaryLinear, ternarize, ternary_layers

Packing = Literal["2bit", "base3"]
FORMAT = "plpriv-ternary-v1"


def pack_codes(codes: Tensor, packing: Packing = "2bit") -> Tensor:
    """Codes in {-1, 0, 1} -> uint8 bytes: 2 bits each (4 per byte) or base 3 (5 per byte)."""
    digits = (codes.flatten().to(torch.int64) + 1)  # {-1, 0, 1} -> {0, 1, 2}
    if digits.numel() and (digits.min() < 0 or digits.max() > 2):
        raise ValueError("`codes` must hold only -1, 0 and 1")
    per, base = (4, 4) if packing == "2bit" else (5, 3) if packing == "base3" else (0, 0)
    if per == 0:
        raise ValueError(f"`packing` must be '2bit' or 'base3', got {packing!r}")
    pad = (-digits.numel()) % per
    digits = torch.cat([digits, digits.new_zeros(pad)]).view(-1, per)
    weights = base ** torch.arange(per, dtype=torch.int64)  # little-endian digits
    return (digits * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, numel: int, packing: Packing = "2bit") -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int8."""
    per, base = (4, 4) if packing == "2bit" else (5, 3)
    values = packed.to(torch.int64).view(-1, 1)
    digits = (values // base ** torch.arange(per, dtype=torch.int64)) % base
    return (digits.flatten()[:numel] - 1).to(torch.int8)


def _arch(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return None
    return {"class_path": f"{type(model).__module__}.{type(model).__qualname__}", "init_args": config}


def pack_ternary(model: nn.Module, path: str | os.PathLike, packing: Packing = "2bit") -> dict[str, int]:
    """Write ``model`` to ``path`` in packed form; returns ``{"payload_bytes", "file_bytes"}``.

    A model with a ``config`` dict (its constructor's arguments, as plpriv's nets have) can be rebuilt by
    ``unpack_ternary(path)`` alone; any other needs ``unpack_ternary(path, model=<same architecture>)``.
    """
    layers = ternary_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ternary layer: call plpriv.nets.ternarize(model) first")
    ternary: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        codes, pos, neg = layer.ternary_state()
        if layer.mode == "twn":  # one alpha per channel (a channel without +1 or -1 codes has 0 on that side)
            pos = neg = torch.maximum(pos, neg)
        ternary[name] = {"packed": pack_codes(codes, packing), "shape": list(codes.shape), "scale_pos": pos.float(),
                         "scale_neg": None if layer.mode == "twn" else neg.float(),
                         "kind": "conv" if isinstance(layer, TernaryConv2d) else "linear", "mode": layer.mode}
    skip = {f"{n}.{k}" for n in layers for k in ("weight", "w_p", "w_n", "frozen_weight")}
    floats = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}
    quantizer = {"fully_quantized": _first_last_ternary(model, layers), "act_bits": _act_bits(model)}
    blob = {"format": FORMAT, "packing": packing, "arch": _arch(model), "quantizer": quantizer, "ternary": ternary,
            "float": floats}
    torch.save(blob, path)
    payload = sum(t["packed"].numel() + 4 * t["scale_pos"].numel() * (1 if t["scale_neg"] is None else 2)
                  for t in ternary.values())
    payload += sum(v.numel() * v.element_size() for v in floats.values() if v.is_floating_point())
    return {"payload_bytes": int(payload), "file_bytes": Path(path).stat().st_size}


def _first_last_ternary(model: nn.Module, layers: dict[str, nn.Module]) -> bool:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return bool(names) and names[0] in layers and names[-1] in layers


def _act_bits(model: nn.Module) -> int | None:
    from plpriv.nets.ternary import ActivationQuantizer

    bits = {m.bits for m in model.modules() if isinstance(m, ActivationQuantizer)}
    return bits.pop() if len(bits) == 1 else None


def unpack_ternary(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a packed model; ``model`` (same architecture, float or ternarized) is filled in, else rebuilt from the file."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file written by plpriv.export.pack_ternary")
    if model is None:
        arch = blob["arch"]
        if arch is None:
            raise ValueError(f"{path} stores no constructor: pass `model=` (an instance of the packed architecture)")
        module_name, _, cls_name = arch["class_path"].rpartition(".")
        model = getattr(importlib.import_module(module_name), cls_name)(**arch["init_args"])
    ternary = blob["ternary"]
    existing = ternary_layers(model)
    if set(existing) != set(ternary):  # a float model: convert exactly the stored layers
        q = blob["quantizer"]
        modes = {t["mode"] for t in ternary.values()}
        ternarize(model, mode=modes.pop() if len(modes) == 1 else "twn", fully_quantized=q["fully_quantized"],
                  act_bits=q["act_bits"])
        existing = ternary_layers(model)
        if set(existing) != set(ternary):
            raise ValueError(f"the model's ternary layers {sorted(existing)} differ from the file's {sorted(ternary)}")
    missing, unexpected = model.load_state_dict(blob["float"], strict=False)
    unexpected = [k for k in unexpected if not k.endswith("frozen_weight")]
    if unexpected:
        raise ValueError(f"{path} holds tensors the model lacks: {unexpected[:5]}")
    for name, t in ternary.items():
        numel = int(torch.tensor(t["shape"]).prod())
        codes = unpack_codes(t["packed"], numel, blob["packing"]).view(t["shape"])
        neg = t["scale_pos"] if t["scale_neg"] is None else t["scale_neg"]
        existing[name].load_ternary(codes, t["scale_pos"], neg)
    return model.eval()


def layer_report(model: nn.Module, example: Tensor, packing: Packing = "2bit") -> list[dict[str, Any]]:
    """Per conv/linear layer: parameters, bits per weight, bytes (weights + scales + bias) and MACs for ``example``,
    then one row ``"(other)"`` for remaining tensors (norms, PACT clips) and a ``"total"`` row."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod: nn.Module, inp: Any, out: Tensor, name: str = name) -> None:
                macs[name] = int(out.numel() // out.shape[0] * mod.weight[0].numel())  # one MAC per weight per output
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows, counted = [], 0
    bits_per = 2.0 if packing == "2bit" else 8.0 / 5.0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        n = m.weight.numel()
        bias = m.bias.numel() if m.bias is not None else 0
        ternary = isinstance(m, (TernaryConv2d, TernaryLinear))
        if ternary:
            per = 4 if packing == "2bit" else 5
            scales = 1 if m.mode == "twn" else 2  # TWN: one alpha per channel; TTQ: W_p and W_n
            nbytes = -(-n // per) + 4 * scales * m.weight.shape[0] + 4 * bias
        else:
            nbytes = 4 * (n + bias)
        counted += n + bias + (sum(p.numel() for p in (getattr(m, "w_p", None), getattr(m, "w_n", None)) if p is not None))
        rows.append({"layer": name, "type": type(m).__name__, "params": n + bias,
                     "bits": bits_per if ternary else 32.0, "bytes": int(nbytes), "macs": macs.get(name, 0)})
    other = sum(v.numel() for k, v in model.state_dict().items() if v.is_floating_point() and not k.endswith("frozen_weight"))
    other -= counted
    rows.append({"layer": "(other)", "type": "norm/clip", "params": int(other), "bits": 32.0, "bytes": int(4 * other), "macs": 0})
    rows.append({"layer": "total", "type": "", "params": sum(r["params"] for r in rows), "bits": float("nan"),
                 "bytes": sum(r["bytes"] for r in rows), "macs": sum(r["macs"] for r in rows)})
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """The report as a fixed-width table."""
    lines = [f"{'layer':<16} {'type':<14} {'params':>8} {'bits':>5} {'bytes':>8} {'MACs':>11}"]
    for r in rows:
        bits = "" if r["bits"] != r["bits"] else f"{r['bits']:.1f}"
        lines.append(f"{r['layer']:<16} {r['type']:<14} {r['params']:>8} {bits:>5} {r['bytes']:>8} {r['macs']:>11}")
    return "\n".join(lines)
