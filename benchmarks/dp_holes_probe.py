"""Probe the nine DP-SGD review holes on small user-written modules and print what DPSGD did (one table).

Uses only DPSGD's constructor and public attributes, so the same script runs against older plpriv checkouts
(``PYTHONPATH=<old checkout> python benchmarks/dp_holes_probe.py``) for before/after numbers.

    python benchmarks/dp_holes_probe.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import dp_accounting
import torch
import torch.nn.functional as F
from dp_accounting import pld
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _dp_toy import ToyClassifier, ToyData, toy_tensors  # noqa: E402

from plpriv.callbacks import DPSGD  # noqa: E402

warnings.filterwarnings("ignore")
import logging  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def trainer(root: str, callbacks: list, **kw: Any) -> Trainer:
    kw = {"log_every_n_steps": 1000, **kw}
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kw)


def pld_eps(*parts: tuple[float, float, int]) -> float:
    acc = pld.PLDAccountant()
    for q, s, k in parts:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), k))
    return acc.get_epsilon(1e-5)


def refused(fn: Any) -> str:
    try:
        return fn()
    except (ValueError, RuntimeError) as err:
        return "refused: " + str(err).split(":")[0][:60]


def probe_checkpoint(root: str) -> str:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, accountant="rdp")
    t = trainer(root, [dp], max_steps=2)
    t.fit(ToyClassifier(), ToyData())
    t.save_checkpoint(f"{root}/p.ckpt")
    state = torch.load(f"{root}/p.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in state.items() if "DPSGD" in k)
    keys = [k for k in state if "seed" in k or "generator" in k]
    return f"secret keys in checkpoint: {keys or 'none'}"


class Growing(LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.calls, self.ds = 0, TensorDataset(*toy_tensors(48))

    def train_dataloader(self) -> DataLoader:
        self.calls += 1
        return DataLoader(self.ds, batch_size=8 if self.calls == 1 else 16, shuffle=True)


def probe_reload(root: str) -> str:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    trainer(root, [dp], max_epochs=2, reload_dataloaders_every_n_epochs=1).fit(ToyClassifier(), Growing())
    truth = pld_eps((8 / 48, 1.0, 6), (16 / 48, 1.0, 3))
    return f"reported {dp.get_epsilon():.3f} / PLD of the run {truth:.3f}"


class TwoSteps(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, i: int) -> None:
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()


def probe_two_steps(root: str) -> str:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    trainer(root, [dp], max_steps=10).fit(TwoSteps(), ToyData())
    return f"reported {dp.get_epsilon():.3f} for {dp.steps} releases (5 batches x 2)"


class PublicToo(ToyClassifier):
    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1]) + 0.1 * self(torch.randn(5, 5)).square().mean()


def probe_public_batch(root: str) -> str:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    trainer(root, [dp], max_steps=3).fit(PublicToo(), ToyData(batch_size=12))
    return "trained silently (rows mixed)"


def probe_divisor(root: str) -> str:
    out = []
    for n in (48, 49):
        dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
        seen: list[float] = []

        class Spy(Callback):
            def on_train_batch_end(self, t: Trainer, *a: Any) -> None:
                seen.append(float(t.optimizers[0].expected_batch_size))

        trainer(root, [dp, Spy()], max_steps=1).fit(ToyClassifier(), ToyData(n=n, batch_size=8))
        out.append(f"{seen[0]:.3g}")
    return "divisor N=48 / N=49: " + " / ".join(out)


def probe_accumulation(root: str) -> str:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=2.0, target_epsilon=3.0, target_delta=1e-5,
               poisson_sampling=False, seed=0)
    trainer(root, [dp, GradientAccumulationScheduler({0: 1, 1: 6})], max_epochs=40).fit(ToyClassifier(), ToyData())
    return f"final epsilon {dp.get_epsilon():.2f} vs target 3 after {dp.steps} steps"


class Subset(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        x = torch.arange(60).float()[:, None].repeat(1, 5)
        return DataLoader(TensorDataset(x, torch.zeros(60, dtype=torch.long)), batch_size=6,
                          sampler=SubsetRandomSampler(list(range(0, 60, 2))))


def probe_sampler(root: str) -> str:
    seen: set[int] = set()

    class Spy(Callback):
        def on_train_batch_start(self, t: Trainer, m: LightningModule, batch: Any, i: int) -> None:
            seen.update(int(v) for v in batch[0][:, 0])

    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0)
    trainer(root, [dp, Spy()], max_epochs=3).fit(ToyClassifier(lr=0.0), Subset())
    return f"{sum(i % 2 for i in seen)} of {len(seen)} drawn examples outside the sampler's subset"


class Functional(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.head.weight, self.head.bias)


def probe_frozen(root: str) -> str:
    model = Functional()
    before = model.head.weight.detach().clone()
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=0.0, target_delta=1e-5, seed=0)
    trainer(root, [dp], max_steps=5).fit(model, ToyData())
    return f"head.weight moved by {float((model.head.weight - before).abs().max()):.3g} in 5 steps (frozen)"


def probe_prefetch(root: str) -> str:
    import concurrent.futures as cf

    asked: list[int] = []
    submit = cf.ThreadPoolExecutor.submit

    def spy(self: Any, fn: Any, *args: Any, **kw: Any) -> Any:
        if args and isinstance(args[0], list):
            asked.append(sum(int(k) for _, _, k in args[0]))
        return submit(self, fn, *args, **kw)

    cf.ThreadPoolExecutor.submit = spy  # type: ignore[method-assign]
    try:
        dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5, seed=0, accountant="rdp")
        trainer(root, [dp], max_steps=1, log_every_n_steps=10**4).fit(ToyClassifier(), ToyData())
    finally:
        cf.ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
    return f"1-step fit, log_every_n_steps=1e4: prefetch asked for {max(asked, default=0)} steps"


def main() -> None:
    probes = [("1 checkpoint secret", probe_checkpoint), ("2 stale rate (reload)", probe_reload),
              ("3 two steps per batch", probe_two_steps), ("4 second batch size", probe_public_batch),
              ("5 divisor reveals N", probe_divisor), ("6 budget vs scheduler", probe_accumulation),
              ("7 sampler replaced", probe_sampler), ("8 frozen parameter", probe_frozen),
              ("9 prefetch horizon", probe_prefetch)]
    print("| hole | what DPSGD did |\n|---|---|")
    for name, fn in probes:
        with tempfile.TemporaryDirectory() as root:
            print(f"| {name} | {refused(lambda: fn(root))} |", flush=True)


if __name__ == "__main__":
    main()
