"""Federated digits at equal epsilon: local DP (every client randomizes its own clipped update: RRSC, SQKR in b bits,
PrivUnitG in d floats) against central DP (a trusted aggregator adds Gaussian noise once: client-level DP-SGD and the
sparsified Gaussian at the same bits budget order), same clients, same rounds, same clipping.

Setting: ``FederatedDigits`` (300 clients, 100 per round, fixed order: 3 rounds an epoch, every client once per
epoch), a linear classifier on 8x8 digits (d = 650), FedSGD with SGD, ``EPOCHS`` epochs; total epsilon ``EPS`` for
every arm: local arms epsilon_0 = EPS / EPOCHS per message (pure, composed over the epochs), central arms calibrated
by their accountant at delta = 1e-3 (fixed-order rounds, zero-out adjacency, no amplification: the same participation
for both trust models). Learning rate per arm chosen on the validation split from ``LRS``; test accuracy mean and 95%
t-interval over ``SEEDS``; bits a client sends per round (float32 values, or the message's bits).

    python benchmarks/federated_local_vs_central.py          # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from scipy import stats
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from plpriv.callbacks import DPSGD
from plpriv.data import FederatedDigits
from plpriv.privacy.local_mechanism import LocalRandomizerMechanism
from plpriv.privacy.mf_mechanism import MatrixFactorizationMechanism

EPS, DELTA, EPOCHS, BITS = 8.0, 1e-3, 4, 6
LRS = (0.5, 2.0)
SEEDS = (0, 1, 2)
D = 650
ARMS: dict[str, dict] = {
    "central: client-level DP-SGD (Gaussian, identity)": dict(kind="central", keep=1.0),
    "central: sparsified Gaussian, keep 1%": dict(kind="central", keep=0.01),
    f"local: RRSC, {BITS} bits": dict(kind="local", randomizer="rrsc"),
    f"local: SQKR, {BITS} bits": dict(kind="local", randomizer="sqkr"),
    "local: PrivUnitG (d floats)": dict(kind="local", randomizer="privunitg"),
}


class Linear(LightningModule):
    """Multinomial logistic regression on flattened images (d = 64 * 10 + 10)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net, self.lr = nn.Linear(64, 10), lr
        self.val_acc, self.test_acc = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_acc(self.net(batch[0].flatten(1)), batch[1])
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_acc(self.net(batch[0].flatten(1)), batch[1])
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def bits_per_round(arm: dict) -> float:
    if arm["kind"] == "local":
        return 32.0 * D if arm["randomizer"] == "privunitg" else float(BITS)
    return 32.0 * D * arm["keep"]  # kept float32 values (indices follow from the shared seed)


def run(arm: dict, lr: float, seed: int) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    data = FederatedDigits(num_clients=300, clients_per_round=100, image_size=8, shuffle=False, seed=0)
    common = dict(max_grad_norm=1.0, target_delta=DELTA, poisson_sampling=False, adjacency="zero_out",
                  participants="clients", accountant="rdp", plot=False, seed=1000 + seed)
    if arm["kind"] == "local":
        mech = LocalRandomizerMechanism(arm["randomizer"], epsilon=EPS / EPOCHS, bits=BITS)
        dp = DPSGD(noise_multiplier=0.0, mechanism=mech, **common)
    else:
        mech = MatrixFactorizationMechanism("identity", keep_fraction=arm["keep"])
        dp = DPSGD(target_epsilon=EPS, mechanism=mech, **common)
    model = Linear(lr)
    trainer = Trainer(accelerator="cpu", max_epochs=EPOCHS, callbacks=[dp], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      check_val_every_n_epoch=EPOCHS)
    trainer.fit(model, data)
    if abs(dp.get_epsilon() - EPS) > 1e-6 * EPS:
        raise RuntimeError(f"{arm}: epsilon {dp.get_epsilon()} != {EPS}")
    val = float(trainer.validate(model, data, verbose=False)[0]["val/acc"])
    return val, float(trainer.test(model, data, verbose=False)[0]["test/acc"])


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for name, arm in ARMS.items():
        start = time.perf_counter()
        results = {lr: [run(arm, lr, s) for s in SEEDS] for lr in LRS}
        best = max(LRS, key=lambda lr: np.mean([r[0] for r in results[lr]]))
        test = [r[1] for r in results[best]]
        half = float(stats.t.ppf(0.975, len(test) - 1) * np.std(test, ddof=1) / math.sqrt(len(test)))
        rows.append((name, best, float(np.mean(test)), half, bits_per_round(arm), time.perf_counter() - start))
        print(f"  done {name} ({rows[-1][-1]:.0f} s)", flush=True)
    print(f"\nfederated digits: 300 clients, 100 per round, {EPOCHS} epochs (k = {EPOCHS} participations), linear"
          f" model d = {D}, epsilon = {EPS} (local: {EPS / EPOCHS:g} per message; central: delta = {DELTA}), lr from"
          f" {LRS} on val, test acc mean +- 95% t-interval over seeds {SEEDS}")
    print("| arm | trust model | lr | test acc | bits per client per round | CPU s |\n|---|---|---|---|---|---|")
    for name, lr, mean, half, bits, secs in rows:
        trust = "local: nobody sees a client's input" if name.startswith("local") else "central: trusted aggregator"
        print(f"| {name} | {trust} | {lr} | {mean:.3f} +- {half:.3f} | {bits:.0f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
