"""Benchmark: accuracy against ReLU budget for SENet (issue 27), on embedded digits with a small ResNet.

plpriv's TinyResNet (stem 16, BasicBlocks 16 / 32 s2 / 64 s2; 7 ReLU layers, 4,608 ReLUs on 8x8 digits) is trained
all-ReLU once per seed (``--teacher-epochs``), then for each budget (50 / 25 / 10 % of the ReLUs) four students start
from the teacher's weights and train ``--mask-epochs`` (stage 1) + ``--distill-epochs`` (stage 2) epochs:

* ``senet+kd``     SENet allocation (pruning sensitivity), stage-1 mask search by |f_T - f_S| as in SENet's
                   code, KD (+ AT in stage 2, beta = 1000 x 8^2 / 32^2 = 62.5: AT scaled to digits' feature maps);
* ``senet+kd gap`` the same with the ``relu_gap`` mask criterion (|min(x_S, 0)|; plpriv's proposal: SENet's
                   criterion swaps each layer's mask for its complement every epoch, see the module docs);
* ``uniform+rand`` the same keep ratio in every layer, a random mask kept fixed, the same KD losses;
* ``senet no-kd``  SENet allocation and mask search, cross-entropy only (no KD, no AT).

``--shallow`` adds ``senet+kd+shallow``: the least sensitive block's inner ReLU gets 0 ReLUs and the export folds it
(exact); its ReLU and MAC counts (by hooks) are printed for the masked and merged models.

It prints test accuracy (fixed 20 % test split) as mean +- 95 % t-interval over ``--seeds``, the teacher's accuracy
and the CPU time. One thread (``torch.set_num_threads(1)``).

    python benchmarks/relu_budget.py                     # 5 seeds
    python benchmarks/relu_budget.py --seeds 0 1 2 --shallow --methods senet+kd+shallow
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from plpriv.data import DigitsDataModule  # noqa: E402
from plpriv.modules.relu_budget import ReLUBudgetClassifier  # noqa: E402
from plpriv.nets.relu_budget import relu_counts  # noqa: E402

METHODS = {
    "senet+kd": {"allocation": "senet", "mask_search": True},
    "senet+kd gap": {"allocation": "senet", "mask_search": True, "mask_criterion": "relu_gap"},
    "uniform+rand": {"allocation": "uniform", "mask_search": False},
    "senet no-kd": {"allocation": "senet", "mask_search": True, "ce_weight": 1.0, "kd_weight": 0.0, "at_weight": 0.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--mask-epochs", type=int, default=8)
    p.add_argument("--distill-epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--at-weight", type=float, default=62.5)
    p.add_argument("--shallow", action="store_true")
    p.add_argument("--methods", nargs="+", default=None, help="run only these columns (names as in the table)")
    return p.parse_args(argv)


def _trainer(epochs: int) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, image_size=8, val_fraction=0.1, test_fraction=0.2, seed=0)


def _test(trainer: Trainer, module: ReLUBudgetClassifier) -> float:
    return float(trainer.test(module, _data(), verbose=False)[0]["test/acc"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sgd = partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    methods = dict(METHODS)
    if args.shallow:
        methods["senet+kd+shallow"] = {"allocation": "senet", "mask_search": True, "shallow_blocks": 1}
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise ValueError(f"unknown --methods {unknown}: choose from {sorted(methods)} (the shallow one needs "
                             "--shallow)")
        methods = {name: methods[name] for name in args.methods}
    acc: dict[tuple[str, float], list[float]] = {}
    teacher_acc, counts = [], {}
    start, cpu0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            seed_everything(seed)
            teacher = ReLUBudgetClassifier(teacher_epochs=args.teacher_epochs, mask_epochs=0, optimizer=sgd)
            trainer = _trainer(args.teacher_epochs)
            trainer.fit(teacher, _data())
            teacher_acc.append(_test(trainer, teacher))
            path = f"{tmp}/teacher{seed}.pt"
            torch.save(teacher.net.state_dict(), path)
            for budget in args.budgets:
                for name, kwargs in methods.items():
                    seed_everything(seed)
                    kwargs = {"at_weight": args.at_weight, **kwargs}
                    module = ReLUBudgetClassifier(relu_budget=budget, teacher_epochs=0, mask_epochs=args.mask_epochs,
                                                  teacher_checkpoint=path, mask_seed=seed, optimizer=sgd, **kwargs)
                    trainer = _trainer(args.mask_epochs + args.distill_epochs)
                    trainer.fit(module, _data())
                    acc.setdefault((name, budget), []).append(_test(trainer, module))
                    if name.endswith("shallow") and budget not in counts:
                        report = module.export(f"{tmp}/export.pt")
                        counts[budget] = report
                    print(f"seed {seed} budget {budget:.2f} {name:<17} test acc {acc[name, budget][-1]:.4f} "
                          f"ReLUs {sum(relu_counts(module.net).values())}", flush=True)
    wall, cpu = time.time() - start, time.process_time() - cpu0

    def cell(values: list[float]) -> str:
        mean = float(np.mean(values))
        if len(values) < 2:
            return f"{100 * mean:5.1f}"
        half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
        return f"{100 * mean:5.1f} +- {100 * half:4.1f}"

    dense = 4608
    print(f"\nTinyResNet on digits 8x8, {dense} ReLUs dense; test acc % (mean +- 95% t-interval, seeds {args.seeds});"
          f" teacher (all ReLUs) {cell(teacher_acc)}")
    print(f"{'budget':>14} | " + " | ".join(f"{n:>17}" for n in methods))
    for budget in args.budgets:
        relus = round(budget * dense)
        print(f"{f'{budget:.0%} ({relus})':>14} | " + " | ".join(f"{cell(acc[n, budget]):>17}" for n in methods))
    for budget, report in counts.items():
        m, g = report["masked"], report["merged"]
        print(f"shallow at {budget:.0%}: folded {report['folded']}; ReLUs masked {m['relus']} -> merged {g['relus']}, "
              f"MACs {m['total_macs']:,} -> {g['total_macs']:,}")
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s (1 thread)")


if __name__ == "__main__":
    main()
