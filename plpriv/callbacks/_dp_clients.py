"""Client-level DP for :class:`plpriv.callbacks.DPSGD` (``participants="clients"``): the train loader yields client
ids, the datamodule's ``client_batch(id)`` returns a client's data; each step's batch is the sampled clients' data,
concatenated, and the mechanism's optimizer learns which example is whose (each client's update is its mean
gradient over its own data, clipped as one participant). Works with any mechanism that groups participants
(``bind_participants``: the sparsified Gaussian, DP-FTRL)."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer

from plpriv.callbacks._dp_training_step import batch_size_of

__all__ = ["ClientRounds"]


def _cat(batches: Sequence[Any]) -> Any:
    """Concatenate collated batches along dim 0 (tensors, tuples / lists, dicts)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches), 0)
    if isinstance(first, dict):
        return type(first)({k: _cat([b[k] for b in batches]) for k in first})
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))
    raise ValueError(f"participants='clients': cannot concatenate client batches of type {type(first).__name__}.")


def _empty(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)({k: _empty(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty(v) for v in batch)
    return batch


class ClientRounds:
    """The client source of a run and the training-step wrapper that turns client ids into their data."""

    def __init__(self, owner: str, source: Any, first_client: int) -> None:
        self.owner, self.source, self.first_client = owner, source, first_client

    @classmethod
    def check(cls, owner: str, trainer: Trainer, pl_module: LightningModule, dataset: Any) -> ClientRounds:
        """Refuse, before training, a source without ``client_batch``, ids listed twice and ids without data."""
        source = next((s for s in (trainer.datamodule, pl_module) if callable(getattr(s, "client_batch", None))),
                      None)
        if source is None:
            raise ValueError(f"{owner}(participants='clients') needs a datamodule (or module) with"
                             " `client_batch(client_id)` returning that client's data, and a train loader of client"
                             " ids (e.g. plpriv.data.FederatedDigits).")
        ids = [int(dataset[i]) for i in range(len(dataset))]
        repeated = sorted((i, m) for i, m in Counter(ids).items() if m > 1)
        if repeated:
            listed = ", ".join(f"{i} ({m} times)" for i, m in repeated[:10]) + (" ..." if len(repeated) > 10 else "")
            raise ValueError(f"{owner}(participants='clients'): the train loader's dataset lists client ids"
                             f" more than once: {listed}. A client listed m times is sampled up to m times a round"
                             " and its update counted m times (sensitivity m x max_grad_norm, accounted as one). List"
                             " every client id once (e.g. plpriv.data.ClientIds(num_clients)).")
        known = set(int(i) for i in source.client_ids()) if callable(getattr(source, "client_ids", None)) else None
        missing = [i for i in ids if (known is not None and i not in known)]
        if known is None:
            for i in ids:
                try:
                    if batch_size_of(source.client_batch(i)) <= 0:
                        missing.append(i)
                except (KeyError, IndexError):
                    missing.append(i)
        if missing:
            raise ValueError(f"{owner}(participants='clients'): the train loader yields client ids"
                             f" {missing[:10]}{' ...' if len(missing) > 10 else ''} that have no data in"
                             f" {type(source).__name__} (ids with data: client_ids()).")
        return cls(owner, source, ids[0])

    def wrap(self, pl_module: LightningModule, sparsifier: Any) -> Callable[[], None]:
        """Client ids -> the sampled clients' data; returns the undo. ``training_step`` is the only place a batch can
        be rebuilt from ids before the module sees it (Lightning has no hook that replaces the batch)."""
        dp_step, source, owner, first = pl_module.training_step, self.source, self.owner, self.first_client

        @functools.wraps(dp_step)
        def client_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            ids = batch[0] if isinstance(batch, (list, tuple)) else batch
            ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
            if len(set(ids)) != len(ids):  # check() refused repeated ids; the dataset changed since?
                raise RuntimeError(f"{owner}(participants='clients'): a round sampled client ids"
                                   f" {sorted(i for i, m in Counter(ids).items() if m > 1)} more than once; every"
                                   " client id must be listed once in the train loader's dataset.")
            batches = [source.client_batch(i) for i in ids]
            sizes = [batch_size_of(b) for b in batches]
            data = _cat(batches) if batches else _empty(source.client_batch(first))  # an empty round keeps the shape
            sparsifier.keys = ids
            counts = torch.tensor(sizes, dtype=torch.long) if sizes else torch.zeros(0, dtype=torch.long)
            sparsifier.groups = torch.repeat_interleave(torch.arange(len(ids)), counts)
            return dp_step(move_data_to_device(data, pl_module.device), *args, **kwargs)

        pl_module.training_step = client_step  # type: ignore[method-assign]
        return lambda: setattr(pl_module, "training_step", dp_step)
