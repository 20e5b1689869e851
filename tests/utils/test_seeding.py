"""plpriv.utils.seeding: one seed derivation for DP-SGD, Poisson sampling, EDM and the audit."""

from __future__ import annotations

import pytest
import torch

from plpriv.utils.seeding import derive_seed, fresh_seed


def test_derived_seeds_depend_on_every_part_and_fit_torch() -> None:
    seeds = {derive_seed(7, "noise", t) for t in range(2000)} | {derive_seed(8, "noise", t) for t in range(2000)}
    assert len(seeds) == 4000  # 63-bit outputs: a collision among 4000 has probability ~1e-12
    assert derive_seed(7, "noise", 3) == derive_seed(7, "noise", 3) != derive_seed(7, "sample", 3)
    assert derive_seed(2**127 + 5, 1) != derive_seed(5, 1)  # large (128-bit) seeds are not truncated to 32 bits
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # valid for torch
    with pytest.raises(TypeError, match="ints or strings"):
        derive_seed(1.5)


def test_fresh_seeds_carry_128_bits_of_entropy() -> None:
    draws = [fresh_seed() for _ in range(64)]
    assert len(set(draws)) == 64 and max(d.bit_length() for d in draws) > 120
