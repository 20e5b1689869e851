"""Benchmark: the sparsified Gaussian mechanism (Chen et al., ICML 2024) against the uncompressed Gaussian mechanism.

Part 1, mean estimation (closed form, one Monte Carlo check): at the same (epsilon, delta), the MSE of the sparsified
estimator (noise calibrated by plpriv's accountant) over the Gaussian mechanism's (DP-SGD's accountant), for keep
fractions gamma, in three regimes: one release at full participation (q = 1, T = 1), T = 100 releases at q = 1
(where the accountant is exact), and T = 1000 Poisson-subsampled releases at q = 0.1 (where it is a valid upper
bound, see plpriv.privacy.sparsified_gaussian [D]). The column ``paper`` is the ratio a rate-q-gamma accountant
would give (the 1-sparse input's epsilon: what the paper-style analysis reports; not a proven guarantee at q < 1).
The abstract's "MSEs that fast converge to those of the uncompressed Gaussian mechanism" is, by the closed form, the
limit of large noise (sigma_0 -> infinity: small epsilon or many releases), where sigma -> gamma sigma_0, together
with n << gamma d sigma_0^2 (sparsification error against noise).

Part 2, DP training on the embedded digits at the same epsilon: DP-SGD (keep 1) vs keep 0.1 vs keep 0.01, with
examples as participants (recipes/sparsified/digits_examples.yaml) and with clients (FederatedDigits,
recipes/sparsified/digits_clients.yaml), test accuracy and the bytes the participants send per step.

    python benchmarks/sparsified_gaussian.py --out runs/benchmarks/sparsified_gaussian          # both parts
    python benchmarks/sparsified_gaussian.py --skip-training                                   # part 1 only (~1 min)
    python benchmarks/sparsified_gaussian.py --epochs 15 --rounds 300 --epsilon 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plpriv.privacy.accounting import calibrate_noise_multiplier  # noqa: E402
from plpriv.privacy.sparsified_gaussian import (  # noqa: E402
    SparsifiedGaussianMechanism,
    gaussian_mechanism_mse,
    mask_seed,
    sparsified_gaussian_mse,
    sparsified_gaussian_noise_multiplier,
)

KEEP = (1.0, 0.5, 0.2, 0.1, 0.05, 0.01)
REGIMES = ((1.0, 1), (1.0, 100), (0.1, 1000))  # (q, releases)


def paper_sigma(target: float, delta: float, q: float, gamma: float, steps: int) -> float:
    """The noise a rate-q-gamma accountant would calibrate (DP-SGD's PRV accountant at q gamma): the paper-style
    number, exact for a 1-sparse input, not a proven guarantee at q < 1."""
    return calibrate_noise_multiplier(target, delta, q * gamma, steps)


def mse_table(epsilons: list[float], n: int, dim: int, delta: float) -> list[dict[str, Any]]:
    rows = []
    for q, steps in REGIMES:
        for eps in epsilons:
            sigma0 = sparsified_gaussian_noise_multiplier(eps, delta, q, 1.0, steps)
            base = gaussian_mechanism_mse(n, dim, 1.0, sigma0)
            # like with like: both sides calibrated by RDP alone (the sparsified bound is an RDP bound; the default
            # baseline above uses DP-SGD's tighter PRV accountant, which favours the uncompressed side)
            sigma0_rdp = sparsified_gaussian_noise_multiplier(eps, delta, q, 1.0, steps, accountant="rdp")
            base_rdp = gaussian_mechanism_mse(n, dim, 1.0, sigma0_rdp)
            for gamma in KEEP:
                sigma = sparsified_gaussian_noise_multiplier(eps, delta, q, gamma, steps) if gamma < 1 else sigma0
                sigma_rdp = (sparsified_gaussian_noise_multiplier(eps, delta, q, gamma, steps, accountant="rdp")
                             if gamma < 1 else sigma0_rdp)
                row = {"q": q, "releases": steps, "epsilon": eps, "keep": gamma, "sigma0": sigma0, "sigma": sigma,
                       "mse_ratio": sparsified_gaussian_mse(n, n, dim, 1.0, sigma, gamma) / base,
                       "mse_ratio_rdp": sparsified_gaussian_mse(n, n, dim, 1.0, sigma_rdp, gamma) / base_rdp,
                       "noise_ratio": (sigma / (gamma * sigma0)) ** 2}
                if q < 1 and gamma < 1:
                    s_paper = paper_sigma(eps, delta, q, gamma, steps)
                    row["paper_mse_ratio"] = sparsified_gaussian_mse(n, n, dim, 1.0, s_paper, gamma) / base
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def monte_carlo_check(trials: int = 400) -> dict[str, float]:
    n, d, sigma, gamma = 20, 2000, 0.3, 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    mech = SparsifiedGaussianMechanism(1.0, sigma, gamma)
    err = [float(((mech.release(x, [mask_seed(1, t, i) for i in range(n)], g).estimate - x.mean(0)) ** 2).sum())
           for t in range(trials)]
    return {"monte_carlo": sum(err) / trials, "closed_form": sparsified_gaussian_mse(n, n, d, 1.0, sigma, gamma)}


# --------------------------------------------------------------------------------------------------- training
def train(participants: str, keep: float, args: argparse.Namespace) -> dict[str, Any]:
    from functools import partial

    from lightning.pytorch import Trainer, seed_everything

    from plpriv.callbacks import SparsifiedGaussian
    from plpriv.data import DigitsDataModule, FederatedDigits
    from plpriv.modules import ImageClassifier

    seed_everything(0)
    lr = args.lr_examples if participants == "examples" else args.lr_clients
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group",
                            backbone_kwargs={"act": "tanh", "width": args.width},
                            optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9))
    if participants == "examples":
        data: Any = DigitsDataModule(batch_size=args.batch, image_size=16, channels=1, seed=0)
        delta, limits = 1e-5, {"max_epochs": args.epochs}
    else:
        data = FederatedDigits(num_clients=args.clients, clients_per_round=args.per_round, partition=args.partition,
                               image_size=16, seed=0)
        delta, limits = args.client_delta, {"max_steps": args.rounds}
    sg = SparsifiedGaussian(keep, max_grad_norm=1.0, target_epsilon=args.epsilon, target_delta=delta,
                            participants=participants, seed=args.seed, plot=False)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[sg], default_root_dir=str(args.out / "runs"), **limits)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
        test = trainer.test(model, data, verbose=False)[0]
    # measurement of what was actually packed: the realised counts of the last step, an UNPUBLISHED path (they
    # reveal the Poisson draw; sg.comm_stats, the logged numbers, are public expectations)
    comm = sg._unpublished_last_step_comm()
    dim = sum(p.numel() for p in model.parameters())
    return {"participants": participants, "keep": keep, "lr": lr, "epsilon": sg.get_epsilon(), "delta": delta,
            "epsilon_paper_style": sg.get_epsilon_lower_bound(), "sigma": sg.effective_noise_multiplier,
            "q": sg.sample_rate, "steps": sg.steps, "test_acc": test["test/acc"], "dim": dim,
            "bytes_per_participant": comm["comm/bytes_per_step"] / max(comm["participants"], 1),
            "dense_bytes_per_participant": dim * 4, "seconds": time.time() - start}


def markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REGIMES), figsize=(4.2 * len(REGIMES), 3.6), dpi=110, sharey=True)
    for ax, (q, steps) in zip(axes, REGIMES):
        for eps in sorted({r["epsilon"] for r in rows}):
            sel = [r for r in rows if r["q"] == q and r["releases"] == steps and r["epsilon"] == eps]
            ax.plot([r["keep"] for r in sel], [r["mse_ratio"] for r in sel], marker="o", label=f"eps {eps:g}")
            paper = [r for r in sel if "paper_mse_ratio" in r]
            if paper:
                ax.plot([r["keep"] for r in paper], [r["paper_mse_ratio"] for r in paper], ls="--", color="gray")
        ax.set(xscale="log", yscale="log", xlabel="keep fraction gamma", title=f"q={q:g}, {steps} releases")
        ax.axhline(1, color="k", lw=0.8)
    axes[0].set_ylabel("MSE / Gaussian mechanism's (same eps)")
    axes[0].legend(fontsize=8)
    axes[-1].text(0.02, 0.02, "dashed: rate-q*gamma (paper-style) accounting", transform=axes[-1].transAxes,
                  fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "sparsified_gaussian")
    p.add_argument("--mse-epsilons", type=float, nargs="+", default=[8.0, 2.0, 0.5])
    p.add_argument("--participants-per-release", type=int, default=100)
    p.add_argument("--dim", type=int, default=26_000)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-mse", action="store_true")
    p.add_argument("--participants", nargs="+", default=["examples", "clients"], choices=["examples", "clients"])
    p.add_argument("--width", type=int, default=16, help="SmallCNN width (16: d = 26,090; 4: d = 1,930)")
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr-examples", type=float, default=0.3)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--partition", default="iid")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--client-delta", type=float, default=1e-3)
    p.add_argument("--lr-clients", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="fixed noise/mask seed (a benchmark, not a private release)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    text = []
    if not args.skip_mse:
        results["monte_carlo"] = monte_carlo_check()
        print(json.dumps(results["monte_carlo"]), flush=True)
        results["mse"] = mse_table(args.mse_epsilons, args.participants_per_release, args.dim, 1e-5)
        plot(results["mse"], args.out / "sparsified_gaussian_mse.png")
        text += ["## MSE at equal epsilon (delta 1e-5), n = %d, d = %d" % (args.participants_per_release, args.dim),
                 markdown(results["mse"], ["q", "releases", "epsilon", "keep", "sigma0", "sigma", "noise_ratio",
                                           "mse_ratio", "mse_ratio_rdp", "paper_mse_ratio"])]
    if not args.skip_training:
        results["training"] = []
        for participants in args.participants:
            for keep in args.keep:
                row = train(participants, keep, args)
                print(json.dumps(row), flush=True)
                results["training"].append(row)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
        text += [f"## DP training on digits at epsilon {args.epsilon}",
                 markdown(results["training"], ["participants", "keep", "lr", "epsilon", "epsilon_paper_style", "delta",
                                                "sigma", "q", "steps", "test_acc", "dim", "bytes_per_participant",
                                                "dense_bytes_per_participant", "seconds"])]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text("\n\n".join(text) + "\n")
    print("\n\n".join(text))


if __name__ == "__main__":
    main()
