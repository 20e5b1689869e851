"""Probe the twelve privacy-boundary holes of issue 20 on tiny user-written modules and plpriv's EDM (one table).

One row per hole: ``| hole | measured | value |``. The script detects the DPSGD API from its signature (the new one
wants a public ``dataset_size`` or ``sample_rate`` under add/remove; the old one has no ``dataset_size``,
``adjacency``, ``secret_dir`` or ``log_training_metrics``) and passes only what exists, so it runs unchanged before
and after the fix. A setup refused before training reads "refused: <message>".

Before (the code at b55a153) and after (the working tree):

    git worktree add /tmp/old b55a153
    cd /tmp/old && PYTHONPATH=/tmp/old python /work/main/benchmarks/dp_boundary_probe.py
    cd /work/main && python benchmarks/dp_boundary_probe.py
"""

from __future__ import annotations

import csv
import inspect
import logging
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import dp_accounting
import torch
from dp_accounting import pld
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _dp_toy import ToyClassifier, ToyData, toy_tensors  # noqa: E402

from plpriv.callbacks import DPSGD, SparsifiedGaussian  # noqa: E402
from plpriv.callbacks.memorization_monitor import MemorizationMonitor  # noqa: E402
from plpriv.modules import EDM  # noqa: E402
from plpriv.nets import SongUNet  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

PUBLIC_N = 48  # the public dataset_size given to the new API (the old one has no such argument)


def dp_args(cls: type, **kw: Any) -> dict[str, Any]:
    """Keyword arguments for DPSGD/SparsifiedGaussian of either API: a public size (and delta) where the new one
    needs them, and only the names the installed signature has."""
    params = inspect.signature(cls).parameters
    if "adjacency" in params:
        if kw.get("sample_rate") is None:
            kw.setdefault("dataset_size", PUBLIC_N)
        else:
            kw.setdefault("target_delta", 1e-5)
    return {k: v for k, v in kw.items() if k in params}


def make_dp(**kw: Any) -> DPSGD:
    return DPSGD(**dp_args(DPSGD, **{"max_grad_norm": 1.0, "noise_multiplier": 1.0, "plot": False, **kw}))


def trainer(root: str, callbacks: list, **kw: Any) -> Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "log_every_n_steps": 1, "limit_val_batches": 0, **kw}
    return Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks, **kw)


def header(path: str | Path) -> list[str]:
    with open(path) as f:
        return next(csv.reader(f))


def csv_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


class Sizes(Callback):
    """Test-side spy: the (private) batch of every optimizer step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.first: list[Tensor] = []

    def on_train_batch_start(self, t: Trainer, m: LightningModule, batch: Any, i: int) -> None:
        self.sizes.append(len(batch[0]))
        self.first.append(batch[0][:, 0].detach().clone() if batch[0].ndim == 2 else batch[0][:0])


# ------------------------------------------------------------------------------------------------ 1. N published
def probe_n(root: str) -> str:
    recs = []
    for n in (48, 49):
        dp = make_dp(accountant="rdp", seed=0)
        save = ModelCheckpoint(dirpath=f"{root}/n{n}", save_last=True)
        trainer(root, [dp, save], max_epochs=1, enable_checkpointing=True).fit(ToyClassifier(), ToyData(n=n))
        rec = torch.load(f"{root}/n{n}/last.ckpt", weights_only=False)["plpriv_privacy"]
        recs.append((rec["sample_rate"], rec["delta"], rec["steps"]))
    names = ("sample_rate", "delta", "steps/epoch")
    differ = [k for k, a, b in zip(names, *recs) if a != b]
    shown = "; ".join(f"N={n}: q={q:.4g} delta={d:.3g} steps={s}" for n, (q, d, s) in zip((48, 49), recs))
    return f"differ: {', '.join(differ) or 'nothing'} ({shown})"


# ---------------------------------------------------------------------------------------- 2. training-step logs
class LoggingClassifier(ToyClassifier):
    def training_step(self, batch: Any, i: int) -> Tensor:
        loss = super().training_step(batch, i)
        self.log("train/loss", loss)
        return loss


def probe_logs(root: str) -> str:
    logger = CSVLogger(root, name="run", version="")
    trainer(root, [make_dp(seed=0)], max_steps=4, logger=logger).fit(LoggingClassifier(), ToyData())
    return f"train/loss column in metrics.csv: {'train/loss' in header(f'{root}/run/metrics.csv')}"


# ------------------------------------------------------------------------------------ 3. MemorizationMonitor + DP
class GaussianDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("v", torch.linspace(0.5, 4.0, 16).reshape(1, 4, 4))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.v / (self.v + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2) * x


class DenoiserModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head, self.denoiser = nn.Linear(16, 1), GaussianDenoiser()

    def training_step(self, batch: Any, i: int) -> Tensor:
        return self.head(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def probe_memorization(root: str) -> str:
    images = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=2)
    monitor = MemorizationMonitor(num_samples=3, sigma=0.5, k=2, num_steps=4, replication=True)
    dp = make_dp(sample_rate=0.25, seed=0, accountant="rdp")
    trainer(root, [dp, monitor], max_epochs=1, logger=CSVLogger(root, name="", version=0)).fit(DenoiserModule(), loader)
    path = Path(root) / "version_0" / "memorization_scores.csv"
    if not path.exists():
        return "no memorization_scores.csv written"
    cols = [c for c in header(path) if "replication" in c]
    return f"memorization_scores.csv written, {len(csv_rows(path))} rows, replication columns {cols}"


# ------------------------------------------------------------------------------------- 4. secret beside the ckpt
def probe_secret(root: str) -> str:
    run = Path(root) / "run"
    save = ModelCheckpoint(dirpath=run / "ckpt", save_last=True)
    trainer(root, [make_dp(seed=None), save], max_steps=3, enable_checkpointing=True,
            logger=CSVLogger(root, name="run", version="")).fit(ToyClassifier(), ToyData())
    found = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "secret" in p.name)
    return f"files named *secret* under the run folder: {found or 'none'}"


# ------------------------------------------------------------------------------------------------ EDM helpers
B, N_IMG, STEPS = 8, 40, 4
NET = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0)


class Images(LightningDataModule):
    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.rand(N_IMG, 1, 8, 8, generator=g) * 2 - 1,
                                     torch.randint(0, 10, (N_IMG,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=B, shuffle=True)


def edm(**kw: Any) -> EDM:
    torch.manual_seed(0)
    args = dict(optimizer=partial(torch.optim.Adam, lr=1e-3), lr_rampup_img=64.0, ema_halflife_img=40.0,
                ema_rampup_ratio=0.5, num_val_samples=0, val_sigmas=(1.0,))
    return EDM(SongUNet(**NET), **{**args, **kw})


def edm_dp(secret: int, physical: int | None = None) -> DPSGD:
    return make_dp(seed=secret, accountant="rdp", sample_rate=B / N_IMG, max_physical_batch_size=physical)


# ------------------------------------------------------------------------------------------ 5. EDM images_seen
def probe_images_seen(root: str) -> str:
    out = []
    for secret in (1, 2):
        model, spy = edm(), Sizes()
        trainer(root, [edm_dp(secret), spy], max_steps=STEPS).fit(model, Images())
        out.append(f"seed {secret}: {int(model.images_seen)} (drawn {sum(spy.sizes)}, =={STEPS}x{B}: "
                   f"{int(model.images_seen) == STEPS * B})")
    return "; ".join(out)


# ------------------------------------------------------------------------------- 6. SparsifiedGaussian count
def sparsified(seed: int, **kw: Any) -> SparsifiedGaussian:
    args = dict(max_grad_norm=0.5, noise_multiplier=1.0, seed=seed, target_delta=1e-5, accountant="rdp", plot=False)
    return SparsifiedGaussian(0.3, **dp_args(SparsifiedGaussian, **{**args, **kw}))


def probe_participants(root: str) -> str:
    dense, drawn = [], []
    for seed in (1, 2):
        spy = Sizes()
        logger = CSVLogger(root, name=f"s{seed}", version="")
        trainer(root, [sparsified(seed, sample_rate=8 / 48), spy], max_steps=6, logger=logger).fit(
            ToyClassifier(), ToyData(n=48, batch_size=8))
        rows = [r for r in csv_rows(f"{root}/s{seed}/metrics.csv") if r.get("comm/dense_bytes_per_step")]
        dense.append([round(float(r["comm/dense_bytes_per_step"])) for r in rows])
        drawn.append(spy.sizes)
    dim = sum(p.numel() for p in ToyClassifier().parameters())
    equal = all(d == [n * dim * 4 for n in s[:len(d)]] for d, s in zip(dense, drawn))
    return (f"dense bytes differ between seeds: {dense[0] != dense[1]}; equal realised count x d x 4 at every step:"
            f" {equal} (seed 1: {dense[0]}, drawn {drawn[0]})")


# ---------------------------------------------------------------------------------------- 7. repeated client
class ListedIds(Dataset):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Tensor:
        return torch.tensor(self.ids[i], dtype=torch.long)


class Clients(LightningDataModule):
    def __init__(self, ids: list[int], clients: int = 16, per_round: int = 4) -> None:
        super().__init__()
        self.ids, self.clients, self.per_round = ids, clients, per_round
        self.x, self.y = toy_tensors(clients * 2, seed=3)

    def client_ids(self) -> list[int]:
        return list(range(self.clients))

    def client_batch(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[2 * i:2 * i + 2], self.y[2 * i:2 * i + 2]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ListedIds(self.ids), batch_size=self.per_round, shuffle=False)


def probe_repeated_client(root: str) -> str:
    sg = sparsified(0, sample_rate=0.25, participants="clients")
    trainer(root, [sg], max_steps=3).fit(ToyClassifier(), Clients([0, 0, 0, 0] + list(range(1, 16))))
    return f"trained {sg.steps} steps, reported eps {sg.get_epsilon(1e-5):.3g} (client 0 listed 4x)"


# -------------------------------------------------------------------------------------------- 8. second fit
def pld_eps(q: float, sigma: float, steps: int) -> float:
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(1e-5)


def probe_second_fit(root: str) -> str:
    target = (pld_eps(8 / 48, 1.0, 6) + pld_eps(8 / 48, 1.0, 7)) / 2  # the budget fits 6 steps, not 7
    dp = make_dp(target_epsilon=target, target_delta=1e-5, seed=0)
    trainer(root, [dp], max_steps=4).fit(ToyClassifier(), ToyData())
    first = dp.steps
    trainer(root, [dp], max_steps=4).fit(ToyClassifier(), ToyData())
    eps = dp.get_epsilon(1e-5)
    return f"target {target:.3f}, final {eps:.3f} after {first}+{dp.steps - first} steps (over: {eps > target})"


# ----------------------------------------------------------------------------------------- 9. batch centring
class Centred(ToyClassifier):
    def forward(self, x: Tensor) -> Tensor:
        h = self.net[0](x)
        return self.net[2](torch.tanh(h - h.mean(0, keepdim=True)))


def probe_centring(root: str) -> str:
    dp = make_dp(seed=0)
    trainer(root, [dp], max_steps=3).fit(Centred(), ToyData())
    return f"trained {dp.steps} steps"


# --------------------------------------------------------------------------------------- 10. sampler subclass
class EvenOnly(RandomSampler):
    def __iter__(self):  # type: ignore[override]
        yield from (i for i in super().__iter__() if i % 2 == 0)


def probe_sampler(root: str) -> str:
    x = torch.arange(48).float()[:, None].repeat(1, 5)
    ds = TensorDataset(x, torch.zeros(48, dtype=torch.long))
    spy = Sizes()
    trainer(root, [make_dp(seed=0), spy], max_epochs=2).fit(
        ToyClassifier(lr=0.0), train_dataloaders=DataLoader(ds, batch_size=8, sampler=EvenOnly(ds)))
    seen = {int(v) for t in spy.first for v in t}
    return f"{sum(i % 2 for i in seen)} of 24 odd (held-out) indices trained on ({len(seen)} distinct seen)"


# ----------------------------------------------------------------------------------- 11. EDM virtual steps
def probe_virtual_sigmas(root: str) -> str:
    model = edm()
    drawn: list[tuple[int, Tensor]] = []
    original = model.loss_fn.sample_sigma

    def spy(*a: Any, **k: Any) -> Tensor:
        sigma = original(*a, **k)
        drawn.append((model.global_step, sigma.flatten().clone()))
        return sigma

    model.loss_fn.sample_sigma = spy  # type: ignore[method-assign]
    trainer(root, [edm_dp(3, physical=3)], max_steps=STEPS).fit(model, Images())
    per_step: dict[int, list[Tensor]] = {}
    for step, sigma in drawn:
        per_step.setdefault(step, []).append(sigma)
    split = {s: c for s, c in per_step.items() if len(c) > 1}
    same = [s for s, c in split.items() if any(
        torch.equal(a[:min(len(a), len(b))], b[:min(len(a), len(b))]) and min(len(a), len(b)) > 0
        for i, a in enumerate(c) for b in c[i + 1:])]
    return f"split steps whose chunks repeat sigmas: {len(same)} of {len(split)} (steps {same})"


# --------------------------------------------------------------------------------------- 12. NaN under DP
class PoisonOne(Callback):
    """NaN into example 0's per-sample gradients, once (callbacks run before the module's hook)."""

    done = False

    def on_before_optimizer_step(self, t: Trainer, m: LightningModule, opt: Any) -> None:
        if not self.done:
            for p in m.parameters():
                if getattr(p, "grad_sample", None) is not None:
                    p.grad_sample[0] = float("nan")
                    self.done = True


def probe_nan(root: str) -> str:
    model, poison = edm(lr_rampup_img=0), PoisonOne()
    before = [p.detach().clone() for p in model.net.parameters()]
    trainer(root, [poison, edm_dp(0)], max_steps=1).fit(model, Images())
    finite = all(bool(torch.isfinite(p).all()) for p in model.net.parameters())
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.net.parameters()))
    return f"poisoned: {poison.done}; weights finite after the step: {finite} (moved: {moved})"


PROBES = [
    ("1 N published", "plpriv_privacy record, N=48 vs 49", probe_n),
    ("2 training-step logs", "self.log('train/loss') + CSVLogger", probe_logs),
    ("3 MemorizationMonitor on DP", "replication vs the training set", probe_memorization),
    ("4 secret in ckpt folder", "seed=None, ModelCheckpoint in the run folder", probe_secret),
    ("5 EDM images_seen", f"{STEPS} DP steps, B={B}, two secret seeds", probe_images_seen),
    ("6 SparsifiedGaussian count", "comm/dense_bytes_per_step, two seeds", probe_participants),
    ("7 client listed 4x", "participants='clients'", probe_repeated_client),
    ("8 second fit", "same DPSGD, target_epsilon, 4+4 planned steps", probe_second_fit),
    ("9 batch-centring layer", "h - h.mean(0)", probe_centring),
    ("10 sampler subclass", "RandomSampler yielding even indices", probe_sampler),
    ("11 EDM virtual steps", "sigmas of the chunks of one batch", probe_virtual_sigmas),
    ("12 EDM NaN per-sample grad", "grad_nan_to_num under DP", probe_nan),
]


def run(fn: Any) -> str:
    try:
        with tempfile.TemporaryDirectory() as root:
            value = fn(root)
    except (ValueError, RuntimeError) as err:
        value = "refused: " + " ".join(str(err).split())[:80]
    except Exception as err:  # noqa: BLE001 - one row's failure must not stop the table
        value = f"n/a ({type(err).__name__}: {' '.join(str(err).split())[:80]})"
    return value.replace("|", "/")


def main() -> None:
    import plpriv

    print(f"plpriv from `{Path(plpriv.__file__).parent}`\n")
    print("| hole | measured | value |\n|---|---|---|", flush=True)
    only = set(sys.argv[1:])  # optional row numbers, e.g. `... dp_boundary_probe.py 1 5`
    for name, measured, fn in PROBES:
        if only and name.split()[0] not in only:
            continue
        print(f"| {name} | {measured} | {run(fn)} |", flush=True)


if __name__ == "__main__":
    main()
