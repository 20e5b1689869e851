"""Benchmark: memorization detection by the Hessian spectrum of log p_sigma (Jeon et al., ICML 2025).

Trains the EDM digits quickstart (recipes/edm/digits_lora.yaml) with a few training images duplicated many times
(``DigitsDataModule(duplicate_indices, duplicate_factor)``), with MemorizationMonitor attached, then generates samples
and asks whether the eigenvalue score separates generations that replicate a duplicated image from the rest.

Ground truth: the replication score (top-1 cosine similarity to the training set, mean-centred pixels): a generation
replicates a duplicated image when its nearest training image is one of them and the similarity exceeds
``--replica-threshold``. Detection score: sharpness of the flattest directions, -mean of the k largest normalised
Hessian eigenvalues sigma^2 * lambda of log p_sigma(x | class) at the generated sample (1: no flat direction, an
isolated peak). The k most negative eigenvalues (same Lanczos run) are reported for comparison.
Reports AUROC and TPR at 1% FPR (torchmetrics), eigenvalue histograms (PNG), JVPs per score and time per sample.

    python benchmarks/memorization.py                       # train (the recipe's 40 epochs on CPU) + evaluate
    python benchmarks/memorization.py --ckpt runs/benchmarks/memorization/final.ckpt  # evaluate only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from plpriv.cli import PlprivCLI
from plpriv.data import DigitsDataModule
from plpriv.metrics import ReplicationScore, hessian_scores, log_density_hessian_eigs
from plpriv.utils.figures import figure, save_and_log_figure

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "edm" / "digits_lora.yaml"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/memorization")
    p.add_argument("--ckpt", default=None, help="skip training, evaluate this checkpoint")
    p.add_argument("--max-epochs", type=int, default=None, help="override the recipe's trainer.max_epochs")
    p.add_argument("--dup-classes", type=int, nargs="+", default=[0, 2, 4, 6, 8],
                   help="one duplicated training image per listed class (its first image in the training split)")
    p.add_argument("--dup-factor", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=400)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--num-iters", type=int, default=None)
    p.add_argument("--replica-threshold", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--monitor-every", type=int, default=20, help="MemorizationMonitor period in epochs (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: robust on a shared CPU)")
    return p.parse_args()


def duplicated_images(dup_classes: list[int], seed: int) -> tuple[DigitsDataModule, list[int]]:
    dm = DigitsDataModule(image_size=8, channels=1, val_fraction=0.1, test_fraction=0.1, seed=seed)  # the recipe's split
    dm.setup()
    labels = dm.train_base.tensors[1]  # type: ignore[union-attr]
    return dm, [int((labels == c).nonzero()[0]) for c in dup_classes]


def build(args: argparse.Namespace, dup: list[int], out: Path) -> PlprivCLI:
    cli_args = [
        "-c", str(RECIPE),
        f"--seed_everything={args.seed}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.logger.init_args.name=train",
        f"--data.init_args.duplicate_indices={json.dumps(dup)}",
        f"--data.init_args.duplicate_factor={args.dup_factor}",
    ]
    if args.max_epochs is not None:
        cli_args.append(f"--trainer.max_epochs={args.max_epochs}")
    if args.monitor_every > 0:
        fragment = out / "memorization_monitor.yaml"  # same syntax as callbacks/memorization_monitor.yaml
        fragment.write_text(
            "trainer:\n  callbacks+:\n    - class_path: plpriv.callbacks.MemorizationMonitor\n      init_args:\n"
            f"        every_n_epochs: {args.monitor_every}\n        num_samples: 50\n        sigma: {args.sigma}\n"
            f"        k: {args.k}\n        replication: true\n"
            f"        replication_threshold: {args.replica_threshold}\n"
        )
        cli_args += ["-c", str(fragment)]
    sys.argv = sys.argv[:1]  # the benchmark's own flags are parsed already; LightningCLI gets `cli_args` only
    return PlprivCLI(args=cli_args, run=False)


class CountingDenoiser:
    """Counts network calls: inside torch.func.jvp one call is one JVP (primal + tangent in one forward pass)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.calls = net, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.net(x, sigma, labels)


def _unit(scores: torch.Tensor) -> torch.Tensor:
    # torchmetrics' binary ROC/AUROC pass scores outside [0, 1] through a sigmoid, which saturates (ties) for large
    # values; a monotone min-max map to [0, 1] leaves ROC and AUROC unchanged.
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def detection(score: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    fpr, tpr, _ = binary_roc(_unit(score), target)
    return {
        "auroc": float(binary_auroc(_unit(score), target)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_3pct_fpr": float(tpr[fpr <= 0.03].max()),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm, dup = duplicated_images(args.dup_classes, args.seed)
    cli = build(args, dup, out)
    model = cli.model
    t0 = time.time()
    if args.ckpt is None:
        cli.trainer.fit(model, cli.datamodule)
        train_s = time.time() - t0
        cli.trainer.save_checkpoint(out / "final.ckpt")  # the recipe keeps last.ckpt only every 10 epochs
        trained_steps = cli.trainer.global_step
    else:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        train_s, trained_steps = float("nan"), int(ckpt["global_step"])
    model.eval()

    # Generations: fixed latents, classes 0..9 in turn.
    n = args.num_samples
    g = torch.Generator().manual_seed(args.seed + 1000)
    latents = torch.randn(n, *model.image_shape, generator=g)
    labels = torch.arange(n) % 10
    t0 = time.time()
    x = torch.cat([model.sample(latents=latents[s : s + 100], class_labels=labels[s : s + 100]) for s in range(0, n, 100)])
    sample_s = time.time() - t0

    # Ground truth from the replication score against the training split without duplicates.
    train = dm.train_base.tensors[0]  # type: ignore[union-attr]
    rep = ReplicationScore(train, feature="pixels", center=True, threshold=args.replica_threshold, background_queries=None)
    rep.update(x)
    sims, nn_idx = rep.per_sample()
    rep_summary = {k: float(v) for k, v in rep.compute().items()}
    replica = torch.isin(nn_idx, torch.tensor(dup)) & (sims > args.replica_threshold)

    # Eigenvalue scores (conditional density p_sigma(x | class), EMA network), both ends from one Lanczos run.
    den = CountingDenoiser(model.ema_denoiser)
    eg = torch.Generator().manual_seed(args.seed)
    small, large, t0 = [], [], time.time()
    for s in range(0, n, args.batch_size):
        lo, hi = log_density_hessian_eigs(den, x[s : s + args.batch_size], args.sigma, k=args.k, largest=True,
                                          class_labels=labels[s : s + args.batch_size], num_iters=args.num_iters,
                                          generator=eg)
        small.append(lo)
        large.append(hi)
    eig_s = time.time() - t0
    smallest, largest = torch.cat(small), torch.cat(large)
    calls_per_batch = den.calls / -(-n // args.batch_size)  # = m JVPs + 1 forward (whose graph the m VJPs reuse)
    scores = {
        "sharpness_largest": hessian_scores(largest, args.sigma).sharpness,
        "sharpness_most_negative": hessian_scores(smallest, args.sigma).sharpness,
        "count_largest_below_-0.5": hessian_scores(largest, args.sigma, threshold=0.5).count_below.float(),
    }
    target = replica.long()
    results: dict[str, object] = {
        "duplicated_indices": dup, "dup_factor": args.dup_factor,
        "trained_steps": trained_steps,
        "num_samples": n, "num_replicas": int(replica.sum()), "sigma": args.sigma, "k": args.k,
        "replica_threshold": args.replica_threshold, "replication": rep_summary,
        "train_seconds": train_s, "sample_seconds": sample_s,
        "jvps_per_score": calls_per_batch - 1, "vjps_per_score": calls_per_batch - 1, "forwards_per_score": 1,
        "eig_seconds_per_sample": eig_s / n, "torch_threads": torch.get_num_threads(),
    }
    if 0 < int(replica.sum()) < n:
        for name, score in scores.items():
            results[name] = {**detection(score, target), "mean_replicas": float(score[replica].mean()),
                             "mean_rest": float(score[~replica].mean())}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    torch.save({"samples": x, "labels": labels, "smallest": smallest, "largest": largest, "replication": sims,
                "nearest": nn_idx, "replica": replica}, out / "scores.pt")
    print(json.dumps(results, indent=2))

    # Figures: both ends of the normalised spectrum and the per-sample score, replicas vs the rest.
    s2 = args.sigma**2
    fig = figure(figsize=(13, 3.8))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    panels = [(largest * s2, f"{args.k} largest"), (smallest * s2, f"{args.k} most negative")]
    for ax, (lam, title) in zip(axes, panels):
        bins = torch.linspace(min(-1.0, float(lam.min())), max(0.0, float(lam.max())), 50).numpy()
        for sel, name, color in ((~replica, "other generations", "tab:blue"), (replica, "replicas of duplicated", "tab:red")):
            ax.hist(lam[sel].ravel().numpy(), bins=bins, density=True, alpha=0.6, color=color,
                    label=f"{name} ({int(sel.sum())})")
        ax.set_xlabel(rf"$\sigma^2\lambda$, {title} Hessian eigenvalues ($\sigma$={args.sigma:g})")
        ax.set_ylabel("density")
        ax.legend()
    score = scores["sharpness_largest"]
    bins = torch.linspace(float(score.min()), float(score.max()), 40).numpy()
    for sel, name, color in ((~replica, "other generations", "tab:blue"), (replica, "replicas of duplicated", "tab:red")):
        axes[2].hist(score[sel].numpy(), bins=bins, density=True, alpha=0.6, color=color, label=name)
    auc = results["sharpness_largest"]["auroc"] if "sharpness_largest" in results else float("nan")  # type: ignore[index]
    axes[2].set_xlabel(f"score: -mean of the {args.k} largest (AUROC {auc:.3f})")
    axes[2].legend()
    fig.tight_layout()
    print("figure:", save_and_log_figure(None, fig, "eigenvalue_histograms", directory=out))


if __name__ == "__main__":
    main()
