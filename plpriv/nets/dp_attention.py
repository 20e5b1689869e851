"""Multi-head attention that opacus can train privately, a drop-in for ``torch.nn.MultiheadAttention``.

opacus' per-sample gradients exist for ``nn.Linear``; ``nn.MultiheadAttention`` multiplies its packed
``in_proj_weight`` inside ``F.multi_head_attention_forward``, where no hook sees it. This module computes the same
function from four ``nn.Linear`` projections and ``F.scaled_dot_product_attention``, with the same ``forward``
signature, masks and outputs.

Why not ``opacus.layers.DPMultiheadAttention`` (opacus 1.6): it asserts ``is_causal=False`` ("We currently do not
support causal mask"), which ``nn.Transformer`` and ``nn.TransformerEncoder/Decoder`` pass for causal models, and it
keeps ``batch_first=False`` inputs sequence-first through its linear layers, which opacus' batch-first hooks read
wrongly. Here inputs are made batch-first before any projection.

``load_state_dict`` also takes an ``nn.MultiheadAttention`` checkpoint (its keys are mapped to the projections).
``add_bias_kv`` and ``add_zero_attn`` are not supported (:meth:`from_torch` refuses them; no per-sample rule).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DPMultiheadAttention"]


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """``nn.MultiheadAttention``'s mask rule: a bool mask is True where attention is NOT allowed (-inf); a float
    mask is added to the scores."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"`{name}` must be a bool or float tensor, got dtype {mask.dtype}.")
    return mask.to(dtype)


class DPMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` from separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linear layers.

    Args: as ``nn.MultiheadAttention`` (``embed_dim``, ``num_heads``, ``dropout``, ``bias``, ``kdim``, ``vdim``,
    ``batch_first``). ``forward`` takes and returns what ``nn.MultiheadAttention.forward`` does.
    """

    # read by nn.TransformerEncoder(Layer)'s fast-path checks, which then decline the fused kernel
    in_proj_weight: Tensor | None = None
    in_proj_bias: Tensor | None = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads}).")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}.")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.register_load_state_dict_pre_hook(self._from_torch_keys)

    def _from_torch_keys(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
        """Also load ``nn.MultiheadAttention`` checkpoints (packed ``in_proj_*`` or separate ``*_proj_weight``)."""
        names = ("q_proj", "k_proj", "v_proj")
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None:
                for name, part in zip(names, packed.split(self.embed_dim)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
        for name in names:
            separate = state_dict.pop(f"{prefix}{name}_weight", None)
            if separate is not None:
                state_dict[f"{prefix}{name}.weight"] = separate

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> DPMultiheadAttention:
        """The same function as ``module``, weights copied exactly (device, dtype and ``requires_grad`` kept)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(module).__name__}.")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("nn.MultiheadAttention(add_bias_kv=True or add_zero_attn=True) has no DP replacement:"
                             " build it with add_bias_kv=False, add_zero_attn=False.")
        ref = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.out_proj.bias is not None,
                  kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first, device=ref.device,
                  dtype=ref.dtype)
        e = module.embed_dim
        with torch.no_grad():
            if module.in_proj_weight is not None:
                weights = module.in_proj_weight.split(e)
            else:
                weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            biases = module.in_proj_bias.split(e) if module.in_proj_bias is not None else (None,) * 3
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                proj.weight.requires_grad_(w.requires_grad)
                if b is not None:
                    proj.bias.copy_(b)  # type: ignore[union-attr]
                    proj.bias.requires_grad_(b.requires_grad)  # type: ignore[union-attr]
            new.out_proj.load_state_dict(module.out_proj.state_dict())
            for p, old in zip(new.out_proj.parameters(), module.out_proj.parameters()):
                p.requires_grad_(old.requires_grad)
        new.train(module.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # batch first before the projections: opacus' hooks read dim 0 as the batch
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (nn.MultiheadAttention's rule: is_causal is a hint"
                             " that attn_mask is causal); pass e.g. nn.Transformer.generate_square_subsequent_mask.")
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(n, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(n, src, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, src, self.num_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        # nn.MultiheadAttention trusts the hint and runs the fused causal kernel in exactly this case
        causal_only = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal_only else self._merged_mask(attn_mask, key_padding_mask, n, tgt, src, q.dtype)
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal_only)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, tgt: int, src: int,
                     dtype: torch.dtype) -> Tensor | None:
        """One additive mask of shape broadcastable to (N, H, L, S)."""
        mask = _float_mask(attn_mask, "attn_mask", dtype)
        if mask is not None:
            if mask.dim() == 3:  # (N * H, L, S)
                if mask.shape != (n * self.num_heads, tgt, src):
                    raise ValueError(f"attn_mask of shape {tuple(mask.shape)} must be ({n * self.num_heads}, {tgt},"
                                     f" {src}) (batch * num_heads, target, source) or ({tgt}, {src}).")
                mask = mask.view(n, self.num_heads, tgt, src)
            elif mask.shape != (tgt, src):
                raise ValueError(f"attn_mask of shape {tuple(mask.shape)} must be ({tgt}, {src}) (target, source).")
        padding = _float_mask(key_padding_mask, "key_padding_mask", dtype)
        if padding is not None:
            if padding.shape != (n, src):
                raise ValueError(f"key_padding_mask of shape {tuple(padding.shape)} must be ({n}, {src}).")
            padding = padding.view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        return mask
