"""PoissonBatchSampler / PoissonDataLoader against the facts DP-SGD accounting needs.

Facts: under Poisson sampling each example joins each batch independently with probability q (so the inclusion
frequency of every example is q and batch sizes are Binomial(N, q)); under DDP the ranks' local batches partition
the global batch and every rank takes the same number of steps; a resumed iteration continues the uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from plpriv.privacy.poisson import PoissonBatchSampler, PoissonDataLoader, split_batch


def test_inclusion_is_independent_bernoulli_q() -> None:
    n, q, steps = 200, 0.1, 400
    sampler = PoissonBatchSampler(n, q, steps, seed=3)
    counts = np.zeros(n)
    sizes = []
    for batch in sampler:
        counts[batch] += 1
        sizes.append(len(batch))
        assert len(set(batch)) == len(batch)  # no duplicates within a batch (sampling without replacement)
    assert len(sizes) == steps
    # every example's inclusion count is Binomial(steps, q): a chi-square goodness of fit over all examples
    expected = steps * q
    chi2 = ((counts - expected) ** 2 / (expected * (1 - q))).sum()
    assert stats.chi2.sf(chi2, df=n) > 1e-3
    # batch sizes are Binomial(n, q): mean n q, variance n q (1 - q)
    assert abs(np.mean(sizes) - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert abs(np.var(sizes) / (n * q * (1 - q)) - 1) < 0.25


def test_ranks_partition_the_global_batch_and_never_desynchronise() -> None:
    n, q, steps, world = 30, 0.05, 50, 3  # expected local batch 0.5: many empty local batches
    samplers = [PoissonBatchSampler(n, q, steps, seed=7, rank=r, world_size=world) for r in range(world)]
    single = PoissonBatchSampler(n, q, steps, seed=7)
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank] == [steps] * world  # same number of steps on every rank, empties included
    assert any(len(b) == 0 for batches in per_rank for b in batches)
    for step, full in enumerate(single):
        parts = [per_rank[r][step] for r in range(world)]
        union = sorted(i for p in parts for i in p)
        assert union == sorted(full)  # the ranks' batches partition the single-process batch
        assert len(union) == len(set(union))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_epochs_differ_and_resume_continues_the_same_batches() -> None:
    sampler = PoissonBatchSampler(40, 0.2, 10, seed=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    sampler.set_epoch(1)
    sampler.start_at(6)
    assert list(sampler) == epoch1[6:]
    assert list(sampler) == epoch1  # start_at applies to one iteration only


class _DictDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"x": self.x[i], "y": i}


def test_loader_empty_batches_keep_structure_and_dtype() -> None:
    loader = PoissonDataLoader(_DictDataset(20), sample_rate=0.02, num_batches=30, seed=0)
    batches = list(loader)
    assert len(batches) == 30
    empties = [b for b in batches if len(b["y"]) == 0]
    assert empties, "q N = 0.4: some batches must be empty"
    for b in empties:
        assert b["x"].shape == (0, 3) and b["x"].dtype == torch.float32
        assert b["y"].dtype == torch.int64


def test_loader_from_data_loader_public_divisor_and_resumes() -> None:
    ds = TensorDataset(torch.arange(50).float())
    user = DataLoader(ds, batch_size=8, collate_fn=None)
    loader = PoissonDataLoader.from_data_loader(user, seed=5)
    assert len(loader) == len(user) == 7
    assert loader.batch_size == 8  # the public divisor is the user's B, not q N = 50 / 7 (opacus' q = 1/len)
    assert loader.sample_rate == pytest.approx(8 / 50)
    assert loader.expected_batch_size == pytest.approx(8.0)
    one_more = PoissonDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(51).float()), batch_size=8))
    assert one_more.batch_size == loader.batch_size and len(one_more) == len(loader)
    full = [b[0].tolist() for b in loader]
    # stop after 3 batches, save, resume in a fresh loader
    fresh = PoissonDataLoader.from_data_loader(user, seed=5)
    it = iter(fresh)
    head = [next(it)[0].tolist() for _ in range(3)]
    state = fresh.state_dict()
    assert state == {"epoch": 0, "consumed": 3}
    resumed = PoissonDataLoader.from_data_loader(user, seed=5)
    resumed.load_state_dict(state)
    tail = [b[0].tolist() for b in resumed]
    assert head + tail == full
    # a state saved at the end of an epoch continues with the next epoch
    resumed.load_state_dict({"epoch": 0, "consumed": 7})
    nxt = [b[0].tolist() for b in resumed]
    epoch1 = PoissonDataLoader.from_data_loader(user, seed=5)
    epoch1.sampler.set_epoch(1)
    assert nxt == [b[0].tolist() for b in epoch1]


def test_split_batch_chunks_every_tensor_along_dim0() -> None:
    batch = (torch.arange(10).view(10, 1), {"y": torch.arange(10), "meta": "keep"}, [f"f{i}" for i in range(10)])
    chunks = split_batch(batch, 10, 4)
    assert [len(c[0]) for c in chunks] == [4, 3, 3]
    assert torch.cat([c[0] for c in chunks]).view(-1).tolist() == list(range(10))
    assert torch.cat([c[1]["y"] for c in chunks]).tolist() == list(range(10))
    assert all(c[1]["meta"] == "keep" for c in chunks)
    assert sum((c[2] for c in chunks), []) == [f"f{i}" for i in range(10)]
    assert split_batch(batch, 10, 10) == [batch]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": 0, "sample_rate": 0.1, "num_batches": 1},
        {"num_samples": 5, "sample_rate": 0.0, "num_batches": 1},
        {"num_samples": 5, "sample_rate": 1.5, "num_batches": 1},
        {"num_samples": 5, "sample_rate": 0.1, "num_batches": 0},
        {"num_samples": 5, "sample_rate": 0.1, "num_batches": 1, "rank": 2, "world_size": 2},
    ],
)
def test_sampler_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="num_samples|sample_rate|num_batches|rank"):
        PoissonBatchSampler(**kwargs)


def test_poisson_batches_stay_inside_the_users_sampler_support() -> None:
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    from plpriv.privacy.poisson import sampler_support

    ds = TensorDataset(torch.arange(40))
    allowed = list(range(0, 40, 3))
    user = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(allowed))
    loader = PoissonDataLoader.from_data_loader(user, seed=1)
    seen = {int(i) for _ in range(5) for batch in loader for i in batch[0]}
    assert seen and seen <= set(allowed) and len(seen) > len(allowed) // 2
    assert loader.sample_rate == pytest.approx(4 / len(allowed))
    assert sampler_support(DataLoader(ds, batch_size=4, shuffle=True)) is None
    with pytest.raises(ValueError, match="WeightedRandomSampler.*unequal probabilities.*Subset"):
        PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 40, 40)))
    with pytest.raises(ValueError, match="batch sampler"):
        PoissonDataLoader.from_data_loader(DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]))
