"""Pytest configuration shared by all tests."""

from __future__ import annotations

import torch

# Two cores on CI: one intra-op thread per test process, so parallel DDP ranks don't oversubscribe.
torch.set_num_threads(1)
