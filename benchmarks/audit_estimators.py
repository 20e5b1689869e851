"""Benchmark: how tight can a many-model audit be, and which factor limits it?

Two parts, both printed as Markdown tables:

* ``estimators`` (seconds, no training): equal-variance Gaussian scores with known mu (the exact white-box score of
  full-batch DP-GD in the linear regime) are audited the way ``plpriv audit`` does it (threshold chosen with the
  estimator's own objective on reference models, bound on evaluation models). It prints the mean and 10th
  percentile of the GDP and Clopper-Pearson epsilon lower bounds for each (reference, eval) count per side and
  each mu, and the largest bound the counts can certify (a perfect attack). A measured audit whose rows reach
  these numbers is limited by the number of models, not by its scores.
* ``protocols`` (trains models, ``--protocols``): small audits of the blank canary at theoretical epsilon 10 on
  digits for the initialisation / learning-rate / step-count variants of issue 10 (random init at lr 0.5, fixed
  init at lr 0.05, pretrained init at lr 0.05 and 0.5, and one step), printing the Gaussian-fit mu of the
  white-box and loss scores next to sqrt(T)/sigma = 2: where the canary's push is pulled back by the data, mu
  falls below 2 and no estimator can certify much.

    python benchmarks/audit_estimators.py                         # estimator table (~1 CPU-minute)
    python benchmarks/audit_estimators.py --protocols --per-side 40  # + protocol table (~10 CPU-minutes)
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from plpriv.privacy.audit import ScoreSplit, audit_counts, estimate, gdp_mu_to_epsilon


def estimator_table(counts: list[tuple[int, int]], mus: list[float], trials: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = ["| mu (eps at 1e-5) | ref/side | eval/side | GDP mean | GDP p10 | CP mean | CP p10 | perfect GDP | perfect CP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mu in mus:
        for n_ref, n_ev in counts:
            gdp, cp = [], []
            for _ in range(trials):
                ids = iter(range(10**9))
                ref = ScoreSplit(rng.normal(-mu, 1, n_ref), rng.normal(0, 1, n_ref),
                                 [next(ids) for _ in range(n_ref)], [next(ids) for _ in range(n_ref)])
                ev = ScoreSplit(rng.normal(-mu, 1, n_ev), rng.normal(0, 1, n_ev),
                                [next(ids) for _ in range(n_ev)], [next(ids) for _ in range(n_ev)])
                gdp.append(estimate(ref, ev, 1e-5, estimator="gdp").epsilon)
                cp.append(estimate(ref, ev, 1e-5, estimator="clopper_pearson").epsilon)
            best = audit_counts(0, 0, n_ev, n_ev, 1e-5)
            lines.append(f"| {mu:.2f} ({gdp_mu_to_epsilon(mu, 1e-5):.2f}) | {n_ref} | {n_ev} | {np.mean(gdp):.2f} |"
                         f" {np.percentile(gdp, 10):.2f} | {np.mean(cp):.2f} | {np.percentile(cp, 10):.2f} |"
                         f" {best.epsilon_gdp:.2f} | {best.epsilon:.2f} |")
    return "\n".join(lines)


def protocol_table(per_side: int, workers: int) -> str:
    import torch

    from plpriv.data import DigitsDataModule
    from plpriv.modules import ImageClassifier
    from plpriv.runners.audit import AuditConfig, CraftingConfig, SanityConfig, run_audit

    variants = [  # (name, init, lr, steps)
        ("random init, lr 0.5, T 10", "random", 0.5, 10),
        ("fixed init, lr 0.05, T 10", "fixed", 0.05, 10),
        ("pretrained, lr 0.5, T 10", "pretrained", 0.5, 10),
        ("pretrained, lr 0.05, T 10", "pretrained", 0.05, 10),
        ("pretrained, lr 0.05, T 1", "pretrained", 0.05, 1),
    ]
    lines = ["| protocol | sqrt(T)/sigma | mu white-box (Gaussian fit) | mu loss | GDP eps_LB wb / bb | train CPU-min |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, init, lr, steps in variants:
            cfg = AuditConfig(
                model=ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 4},
                                      optimizer=partial(torch.optim.SGD, lr=lr)),
                data=DigitsDataModule(image_size=8, batch_size=1000, val_fraction=0.0, test_fraction=0.1),
                out_dir=str(Path(tmp) / name.replace(" ", "_").replace(",", "")), epsilons=[10.0], noise_off=False,
                canaries=["blank"], init=init, max_epochs=steps, reference_per_side=max(per_side // 4, 2),
                eval_per_side=per_side, crafting=CraftingConfig(per_side=4), sanity=SanityConfig(enabled=False),
                workers=workers, progress=False)
            res = run_audit(cfg)["settings"]["eps10"]
            rows = res["results"]["blank"]
            wb, loss = rows["white_box"], rows["loss"]
            fmt = lambda r: f"{r['gaussian_mu'][0]:.2f} [{r['gaussian_mu'][1]:.2f}, {r['gaussian_mu'][2]:.2f}]"  # noqa: E731
            lines.append(f"| {name} | {res['mu_theory']:.2f} | {fmt(wb)} | {fmt(loss)} |"
                         f" {wb['gdp']['epsilon']:.2f} / {loss['gdp']['epsilon']:.2f} |"
                         f" {res['train_cpu_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--protocols", action="store_true", help="also train the protocol variants (minutes)")
    ap.add_argument("--per-side", type=int, default=40, help="evaluation models per side per protocol variant")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    counts = [(30, 60), (20, 100), (30, 220), (50, 450), (100, 900)]
    print("## Estimator limits on exactly Gaussian scores (mean and 10th percentile over trials)\n")
    print(estimator_table(counts, [0.9, 1.85, 2.0], args.trials))
    if args.protocols:
        print("\n## Protocol variants: blank canary at theoretical epsilon 10 on digits\n")
        print(protocol_table(args.per_side, args.workers))


if __name__ == "__main__":
    main()
