"""Federated simulation on the embedded digits: the training split divided among N clients (no download).

The train loader yields *client ids* (batch_size = expected clients per round; DP training Poisson-samples them);
``client_batch(id)`` returns all of one client's examples. Validation and test loaders are the usual image batches.
Made for :class:`plpriv.callbacks.SparsifiedGaussian` with ``participants="clients"`` (client-level DP).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from plpriv.data.base import EpochSeededRandomSampler
from plpriv.data.embedded import DigitsDataModule

__all__ = ["ClientIds", "FederatedDigits", "PARTITIONS", "partition_clients"]

PARTITIONS = ("iid", "label_skew")


class ClientIds(Dataset):
    """The ids 0..N-1, each once, as 0-d int64 tensors (collated: a 1-d tensor of the round's client ids).

    A client must be listed once: listed m times it would be Poisson-sampled up to m times a round (sensitivity
    m C); :class:`plpriv.callbacks.SparsifiedGaussian` refuses such a dataset."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = int(num_clients)

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= int(index) < self.num_clients:
            raise IndexError(f"client id {index} out of range 0..{self.num_clients - 1}")
        return torch.tensor(int(index), dtype=torch.long)


def partition_clients(labels: torch.Tensor, num_clients: int, partition: str = "iid", classes_per_client: int = 2,
                      seed: int = 0) -> list[list[int]]:
    """Positions of each client's examples (every example in exactly one client, every client non-empty).

    ``iid``: a seeded permutation cut into N near-equal parts. ``label_skew`` (McMahan et al. 2017's shards): the
    examples sorted by label (ties in seeded random order) are cut into N * classes_per_client shards, and each
    client gets classes_per_client random shards, i.e. mostly that many labels.
    """
    n = len(labels)
    if partition not in PARTITIONS:
        raise ValueError(f"`partition` must be one of {PARTITIONS}, got {partition!r}.")
    if not isinstance(num_clients, int) or not 1 <= num_clients <= n:
        raise ValueError(f"`num_clients` must be an int in [1, {n}] (the training examples), got {num_clients!r}.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    if partition == "iid":
        return [part.tolist() for part in torch.tensor_split(perm, num_clients)]
    if not isinstance(classes_per_client, int) or classes_per_client < 1 or num_clients * classes_per_client > n:
        raise ValueError(f"`classes_per_client` must be an int >= 1 with num_clients * classes_per_client <= {n},"
                         f" got {classes_per_client!r}.")
    order = perm[torch.argsort(labels[perm], stable=True)]  # by label, random within a label
    shards = torch.tensor_split(order, num_clients * classes_per_client)
    assignment = torch.randperm(len(shards), generator=g).reshape(num_clients, classes_per_client)
    return [torch.cat([shards[int(s)] for s in row]).tolist() for row in assignment]


class FederatedDigits(DigitsDataModule):
    """scikit-learn's digits, the training split divided among ``num_clients`` clients.

    Args:
        num_clients: N clients; every training image belongs to exactly one.
        clients_per_round: expected clients per step (the client-id loader's batch_size; q = clients_per_round / N).
        partition: ``"iid"`` or ``"label_skew"`` (each client mostly ``classes_per_client`` labels).
        classes_per_client: labels per client with ``label_skew``.
        batch_size: evaluation batch size.
        image_size, channels, val_fraction, test_fraction, seed: as :class:`DigitsDataModule` (the seed also seeds
            the partition and the per-epoch order of client ids).
        shuffle: a seeded order of client ids every epoch (default); ``False``: the same order every epoch (fixed
            rounds: DP-FTRL's fixed-order participation, ``DPSGD(poisson_sampling=False)``).
    """

    def __init__(
        self,
        num_clients: int = 100,
        clients_per_round: int = 10,
        partition: str = "iid",
        classes_per_client: int = 2,
        batch_size: int = 256,
        image_size: int = 16,
        channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, image_size=image_size, channels=channels, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, shuffle=shuffle)
        if partition not in PARTITIONS:
            raise ValueError(f"`partition` must be one of {PARTITIONS}, got {partition!r}.")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"`num_clients` must be a positive int, got {num_clients!r}.")
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or not (
            1 <= clients_per_round <= num_clients
        ):
            raise ValueError(f"`clients_per_round` must be an int in [1, num_clients={num_clients}], got"
                             f" {clients_per_round!r}.")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.partition = partition
        self.classes_per_client = classes_per_client
        self.client_indices: list[list[int]] | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.client_indices is None:
            labels = self.train_base.tensors[1]  # type: ignore[union-attr]
            self.client_indices = partition_clients(labels, self.num_clients, self.partition,
                                                    self.classes_per_client, self.seed)

    def client_ids(self) -> list[int]:
        """Ids of the clients that have data (all of 0..N-1)."""
        self.setup()
        return [i for i, idx in enumerate(self.client_indices) if idx]  # type: ignore[arg-type]

    def client_batch(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All of client ``client_id``'s examples: ``(images [n, C, H, W], labels [n])``."""
        self.setup()
        if not 0 <= int(client_id) < self.num_clients:
            raise KeyError(f"FederatedDigits has clients 0..{self.num_clients - 1}, not {client_id!r}.")
        idx = torch.as_tensor(self.client_indices[int(client_id)], dtype=torch.long)  # type: ignore[index]
        x, y = self.train_base.tensors  # type: ignore[union-attr]
        return x[idx], y[idx]

    def train_dataloader(self) -> DataLoader:
        ids = ClientIds(self.num_clients)
        sampler = EpochSeededRandomSampler(ids, seed=self.seed) if self.shuffle else SequentialSampler(ids)
        return DataLoader(ids, batch_size=self.clients_per_round, sampler=sampler)
