"""One seed derivation for all of plpriv: a seed that depends on every part and on nothing else.

Used for per-step Poisson masks and noise (DP-SGD), per-step diffusion noise (EDM) and the audit's per-model seeds,
so that a resumed or distributed run draws exactly what an uninterrupted single-process run would have drawn.
"""

from __future__ import annotations

import secrets
import zlib

import numpy as np

__all__ = ["derive_seed", "fresh_seed"]


def _as_int(part: int | str) -> int:
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    if isinstance(part, bool) or not isinstance(part, (int, np.integer)):
        raise TypeError(f"seed parts must be ints or strings, got {part!r}.")
    return int(part) % 2**128  # SeedSequence takes non-negative ints of any size


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed (valid for ``torch.Generator.manual_seed`` and numpy) hashed from ``parts`` by numpy's
    ``SeedSequence``: e.g. ``derive_seed(seed, "noise", step)``."""
    state = np.random.SeedSequence([_as_int(p) for p in parts]).generate_state(2, dtype=np.uint64)
    return int(state[0]) >> 1


def fresh_seed() -> int:
    """128 bits of OS entropy (``secrets``), for seeds that must stay secret."""
    return secrets.randbits(128)
