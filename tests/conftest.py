"""Pytest configuration shared by all tests."""

from __future__ import annotations

import pytest
import torch

# Two cores on CI: one intra-op thread per test process, so parallel DDP ranks don't oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Trainer(deterministic=True) turns torch's deterministic mode on for the whole process and never back off: a
    later test using an op without a deterministic kernel (max_unpool2d) would fail depending on test order."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
