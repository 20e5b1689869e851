"""SparsifiedGaussian's privacy boundary: what it logs, returns and prints is public; one client is one participant.

Facts used:
* The number of participants of a Poisson round is private (it reveals who took part); the public quantity is the
  expected count B (the noise divisor). So every published ``comm/*`` number must be a function of public constants:
  B, d (the model's parameter count), the element size, gamma (k / d with k-subset masks, k = round(gamma d)).
  Two runs that differ only in the secret seed (other Poisson draws, other masks) must publish identical numbers.
* A client listed m times in the clients dataset would be Poisson-sampled up to m times a round (sensitivity m C,
  accounted as C): refused before training.
* Poisson(B) has E[(1 - g)^M] = exp(-B g), and positions rank, rank + W, ... of M split M among the W ranks.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _dp_toy import PROBE_CALLS, ToyClassifier, ToyData, toy_tensors
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from plpriv.callbacks import SparsifiedGaussian
from plpriv.privacy.sparsified_step import expected_rank_chunk
from plpriv.data import FederatedDigits

PER_CLIENT = 2
DIM = 5 * 8 + 8 + 8 * 3 + 3  # ToyClassifier(features=5, hidden=8, classes=3): 75 parameters
ELEM = 4  # float32


class ListedIds(Dataset):
    """Client ids as listed (possibly with repeats), as 0-d int64 tensors."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(self.ids[index], dtype=torch.long)


class Clients(LightningDataModule):
    def __init__(self, ids: list[int], clients: int, clients_per_round: int) -> None:
        super().__init__()
        self.ids, self.clients, self.clients_per_round = ids, clients, clients_per_round
        self.x, self.y = toy_tensors(clients * PER_CLIENT, seed=3)

    def client_ids(self) -> list[int]:
        return list(range(self.clients))

    def client_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(i * PER_CLIENT, (i + 1) * PER_CLIENT)
        return self.x[sl], self.y[sl]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ListedIds(self.ids), batch_size=self.clients_per_round, shuffle=False)


def fit(tmp_path: Path, name: str, seed: int, participants: str, mask: str, keep: float
        ) -> tuple[SparsifiedGaussian, list[int], list[dict[str, str]], list[str]]:
    """Six logged steps; returns the callback, the participants each step saw (a test-only spy on the module, not a
    published path), the rows of metrics.csv and the lines printed at the end."""
    if participants == "clients":
        data: LightningDataModule = Clients(list(range(16)), clients=16, clients_per_round=4)
        rate = 4 / 16
    else:
        data, rate = ToyData(n=48, batch_size=8), 8 / 48
    sg = SparsifiedGaussian(keep, max_grad_norm=0.5, noise_multiplier=1.0, seed=seed, target_delta=1e-5,
                            sample_rate=rate, participants=participants, mask=mask, accountant="rdp", plot=False)
    model = ToyClassifier()
    logger = CSVLogger(tmp_path, name=name, version="")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=6, logger=logger, log_every_n_steps=1,
                      callbacks=[sg], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    level = lightning_logger.level
    lightning_logger.setLevel(logging.INFO)
    try:
        trainer.fit(model, data)
    finally:
        lightning_logger.removeHandler(handler)
        lightning_logger.setLevel(level)
    per = PER_CLIENT if participants == "clients" else 1
    sizes = [n // per for n in model.seen_batch_sizes[PROBE_CALLS:]]  # after the first step's independence probe
    with open(tmp_path / name / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/bytes_per_step")]
    return sg, sizes, rows, [line for line in lines if line.startswith(("SparsifiedGaussian:", "DPSGD:"))]


@pytest.mark.parametrize(("participants", "mask", "keep", "kept", "b"), [
    ("clients", "bernoulli", 0.3, 0.3, 4),  # B = the loader's batch size: 4 clients per round
    ("examples", "k_subset", 0.25, 19 / DIM, 8),  # k = round(0.25 * 75) = 19 coordinates
])
def test_published_comm_numbers_are_public_expectations(tmp_path: Path, participants: str, mask: str, keep: float,
                                                        kept: float, b: int) -> None:
    a_sg, a_sizes, a_rows, a_lines = fit(tmp_path, "a", 1, participants, mask, keep)
    b_sg, b_sizes, b_rows, b_lines = fit(tmp_path, "b", 2, participants, mask, keep)
    assert len(a_sizes) == len(b_sizes) == 6 and a_sizes != b_sizes  # the private counts differ at logged steps
    assert len(a_rows) == len(b_rows) == 6  # every step logged
    dense = b * DIM * ELEM
    expected = {"comm/keep_fraction": keep, "comm/bytes_per_step": dense * kept, "comm/dense_bytes_per_step": dense,
                "comm/compression": 1 / kept}
    for ra, rb in zip(a_rows, b_rows):
        comm_a = {k: float(v) for k, v in ra.items() if k.startswith("comm/") and v}
        comm_b = {k: float(v) for k, v in rb.items() if k.startswith("comm/") and v}
        assert comm_a == comm_b
        assert comm_a == pytest.approx(expected, rel=1e-7, abs=0)  # Lightning logs float32
    for row in a_rows:
        assert not any("participant" in k for k in row)
    assert a_sg.comm_stats == b_sg.comm_stats == pytest.approx(expected, rel=1e-12, abs=0)
    assert a_lines == b_lines  # what is printed (start, epsilon, comm) is the same too
    (end,) = [line for line in a_lines if "in expectation" in line]
    assert f"{dense * kept:.0f} bytes in expectation instead of {dense:.0f} dense" in end
    # the realised counts exist only on the unpublished path, and they do follow the draw
    assert a_sg._unpublished_last_step_comm()["participants"] == a_sizes[-1]
    assert b_sg._unpublished_last_step_comm()["participants"] == b_sizes[-1]


@pytest.mark.parametrize("b", [0.5, 4.0, 37.0])
@pytest.mark.parametrize("keep", [0.1, 1.0])
def test_expected_rank_chunk_is_a_closed_form_of_public_constants(b: float, keep: float) -> None:
    clients, values = expected_rank_chunk(b, 1, 0, DIM, keep)
    assert clients == pytest.approx(b, rel=1e-9)
    assert values == pytest.approx(DIM if keep >= 1 else DIM * (1 - math.exp(-b * keep)), rel=1e-9)
    split = [expected_rank_chunk(b, 3, r, DIM, keep)[0] for r in range(3)]
    assert sum(split) == pytest.approx(b, rel=1e-9) and split[0] >= split[1] >= split[2]


def test_a_client_listed_twice_is_refused_before_any_step(tmp_path: Path) -> None:
    ids = [0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7]
    model = ToyClassifier()
    start = [p.detach().clone() for p in model.parameters()]
    sg = SparsifiedGaussian(0.3, max_grad_norm=0.5, noise_multiplier=1.0, seed=0, target_delta=1e-5,
                            sample_rate=0.25, participants="clients", accountant="rdp", plot=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, callbacks=[sg],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"more than once: 3 \(2 times\), 5 \(3 times\)\. .*once"):
        trainer.fit(model, Clients(ids, clients=8, clients_per_round=2))
    assert model.seen_batch_sizes == [] and sg.steps == 0 and not sg.history
    for p0, p in zip(start, model.parameters()):
        assert torch.equal(p0, p)


def test_federated_digits_lists_every_client_once() -> None:
    data = FederatedDigits(num_clients=7, clients_per_round=2)
    dataset: Any = data.train_dataloader().dataset
    assert sorted(int(dataset[i]) for i in range(len(dataset))) == list(range(7))
