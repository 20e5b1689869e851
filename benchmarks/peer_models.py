"""DP-SGD on peers' models (issue 29): one table of model, grad-sample mode, result and step time vs non-private.

Each tiny model of ``tests/privacy/test_peer_models.py`` trains under ``DPSGD(fix_modules=True)`` (noise 0, fixed
batches of 4); the result says whether the first step's clipped per-sample gradient sum equals the micro-batch
reference (max abs error), or why the model was refused. The step-time ratio is the fastest private step over the
fastest non-private step of the unchanged model (the first step, with DPSGD's independence probe, left out).

    python benchmarks/peer_models.py [--steps 10]

Ghost clipping runs with per-example losses (its contract); a ratio compares each mode with the same plain model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "privacy"))
from test_peer_models import BATCH, C, LR, N, PEERS, REFUSED, _Record, reference_clipped_sum  # noqa: E402

from plpriv.callbacks import DPSGD  # noqa: E402

FUNCTORCH = ("lightning_demo_transformer", "lightning_demo_lstm", "timm_resnet18")


def modes(name: str) -> tuple[str, ...]:
    return ("hooks", "functorch", "ghost") if name in FUNCTORCH else ("hooks", "ghost")


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)


def _fit(name: str, steps: int, dp: DPSGD | None, root: str) -> tuple[LightningModule, _StepTimer, _Record]:
    torch.manual_seed(0)
    model, data = PEERS[name]() if name in PEERS else REFUSED[name][0]()
    model.per_sample = dp is not None and dp.grad_sample_mode == "ghost"  # ghost clipping: per-example losses
    timer, record = _StepTimer(), _Record()
    callbacks: list[Callback] = [timer, record] + ([dp] if dp is not None else [])
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=steps, default_root_dir=root, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False))
    return model, timer, record


def row(name: str, mode: str, steps: int, root: str) -> tuple[str, str, str, str]:
    dp = DPSGD(max_grad_norm=C, noise_multiplier=0.0, poisson_sampling=False, seed=0, target_delta=1e-5,
               accountant="rdp", dataset_size=N, grad_sample_mode=mode, fix_modules=True)
    try:
        model, timer, record = _fit(name, steps, dp, root)
    except (ValueError, TypeError, RuntimeError) as error:
        text = str(error).splitlines()[-1].strip()
        return name, mode, f"refused: {text[:55]} ... {text[-60:]}", "-"
    trainable = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    update = torch.cat([((record.params[0][i] - record.params[1][i]) * BATCH / LR).flatten() for i in trainable])
    want = torch.cat([g.flatten() for g in reference_clipped_sum(model, record.params[0], record.batches[0])])
    error = float((update - want).abs().max())
    result = f"trains; clipped sum = reference (max err {error:.1e})" if error < 1e-3 else f"WRONG (err {error:.2g})"
    _, plain, _ = _fit(name, steps, None, root)
    ratio = min(timer.times[1:]) / min(plain.times[1:])  # min: the least disturbed step on a shared machine
    return name, mode, result, f"{ratio:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (>= 3)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [("model", "grad_sample_mode", "result", "step time / non-private")]
    with tempfile.TemporaryDirectory() as root:
        for name in [*PEERS, *REFUSED]:
            for mode in modes(name):
                rows.append(row(name, mode, max(3, args.steps), root))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-|-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
