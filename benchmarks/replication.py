"""Benchmark: replication and quality of LoyalDiffusion (Li et al., arXiv 2412.01118) on digits with duplicates.

Four rows, same data, seed and optimizer-step budget: ``plain`` (EDM + SongUNet), ``rau_all`` (EDM + RAUNet, ITBs at
every noise level), ``loyal`` (LoyalDiffusion: plain U-Net below ``sigma_threshold``, RAU-Net above) and ``edm_cb``
(plain EDM + TimestepSelectiveMitigation). The data are scikit-learn's digits with the first training image of classes
0, 2, 4, 6, 8 repeated ``--dup-factor`` times (as benchmarks/memorization.py).

Replication (Somepalli et al. 2023): top-1 cosine similarity of each generation to the training set (mean-centred
pixels; SSCD cannot be fetched here), its 95th percentile, the fraction above ``--replica-threshold``, the fraction
that replicate one of the duplicated images, and the background distribution (each training image vs its nearest other
one). Quality: accuracy of a classifier trained on real digits on the class-conditional generations, and FID in that
classifier's penultimate features ("classifier-FID") against the training images. Training time: wall seconds of fit.

    python benchmarks/replication.py --seeds 0 1 2            # table in <out>/results.md, JSON, sample grid PNGs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from plpriv.callbacks import TimestepSelectiveMitigation
from plpriv.data import DigitsDataModule
from plpriv.metrics import FID, ClassifierFeatures, ReplicationScore
from plpriv.modules import EDM, LoyalDiffusion
from plpriv.nets import RAUNet, SmallCNN, SongUNet, sigma_from_timestep_fraction
from plpriv.utils.figures import save_and_log_images

ROWS = ("plain", "rau_all", "loyal", "edm_cb")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/replication")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--model-channels", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dup-classes", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    p.add_argument("--dup-factor", type=int, default=100)
    p.add_argument("--timestep-threshold", type=float, default=0.5, help="DDPM t/T (linear schedule) -> sigma")
    p.add_argument("--sigma-threshold", type=float, default=None, help="overrides --timestep-threshold")
    p.add_argument("--itb", default="conv3x3")
    p.add_argument("--rau-levels", type=int, nargs="+", default=None)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sampler-steps", type=int, default=18)
    p.add_argument("--replica-threshold", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def data(args: argparse.Namespace, seed: int) -> tuple[DigitsDataModule, list[int]]:
    base = DigitsDataModule(image_size=args.image_size, channels=1, val_fraction=0.1, test_fraction=0.1, seed=0)
    base.setup()
    labels = base.train_base.tensors[1]  # type: ignore[union-attr]
    dup = [int((labels == c).nonzero()[0]) for c in args.dup_classes]
    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, channels=1, val_fraction=0.1,
                          test_fraction=0.1, seed=0, duplicate_indices=dup, duplicate_factor=args.dup_factor,
                          drop_last=True)
    dm.setup()
    return dm, dup


def classifier(dm: DigitsDataModule, steps: int = 600) -> tuple[SmallCNN, float]:
    """SmallCNN on the real training images (no duplicates); returns it and its test accuracy."""
    torch.manual_seed(0)
    x, y = dm.train_base.tensors  # type: ignore[union-attr]
    net = SmallCNN(1, 10, width=16)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = dm.test_dataset.tensors if hasattr(dm.test_dataset, "tensors") else next(iter(dm.test_dataloader()))
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    return net, acc


def build(row: str, args: argparse.Namespace, seed: int, sigma_threshold: float) -> tuple[EDM, list]:
    cfg = dict(img_resolution=args.image_size, in_channels=1, out_channels=1, label_dim=10,
               model_channels=args.model_channels, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[args.image_size // 2], dropout=0.0)
    common = dict(optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), lr_rampup_img=2000, ema_halflife_img=2000,
                  seed=seed, sampler_kwargs={"num_steps": args.sampler_steps}, num_val_samples=0)
    torch.manual_seed(seed)  # same base weights in every row of a seed
    if row == "rau_all":
        return EDM(RAUNet(**cfg, rau_levels=args.rau_levels, itb=args.itb), **common), []
    net = SongUNet(**cfg)
    if row == "loyal":
        return LoyalDiffusion(net, sigma_threshold=sigma_threshold, rau_levels=args.rau_levels, itb=args.itb,
                              **common), []
    callbacks = []
    if row == "edm_cb":
        callbacks = [TimestepSelectiveMitigation(sigma_threshold=sigma_threshold, rau_levels=args.rau_levels,
                                                 itb=args.itb)]
    return EDM(net, **common), callbacks


def evaluate(model: EDM, args: argparse.Namespace, seed: int, rep: ReplicationScore, dup: list[int],
             clf: SmallCNN, train: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    n = args.num_samples
    g = torch.Generator().manual_seed(seed + 1000)
    latents = torch.randn(n, *model.image_shape, generator=g)
    labels = torch.arange(n) % 10
    model.eval()
    x = torch.cat([model.sample(latents=latents[s: s + 250], class_labels=labels[s: s + 250])
                   for s in range(0, n, 250)]).clamp(-1, 1)
    rep.reset()
    rep.update(x)
    sims, nearest = rep.per_sample()
    summary = {k: float(v) for k, v in rep.compute().items()}
    replica_dup = torch.isin(nearest, torch.tensor(dup)) & (sims > args.replica_threshold)
    with torch.no_grad():
        acc = float((clf(x).argmax(1) == labels).float().mean())
    fid = FID(ClassifierFeatures(clf), input_shape=model.image_shape)
    fid.update(train, real=True)
    fid.update(x, real=False)
    return {"sim_p95": summary["p95"], "sim_mean": summary["mean"], "frac_above": summary["fraction_above"],
            "frac_dup_replicas": float(replica_dup.float().mean()), "class_acc": acc, "cfid": float(fid.compute()),
            "bg_p95": summary["background_p95"], "bg_mean": summary["background_mean"],
            "bg_frac_above": summary["background_fraction_above"]}, x


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sigma_threshold = args.sigma_threshold or sigma_from_timestep_fraction(args.timestep_threshold)
    dm, dup = data(args, 0)
    clf, clf_acc = classifier(dm)
    train = dm.train_base.tensors[0]  # type: ignore[union-attr]
    rep = ReplicationScore(train, feature="pixels", center=True, threshold=args.replica_threshold,
                           background_queries=None)
    results: list[dict] = []
    for seed in args.seeds:
        for row in args.rows:
            model, callbacks = build(row, args, seed, sigma_threshold)
            trainer = Trainer(max_steps=args.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                              num_sanity_val_steps=0, limit_val_batches=0)
            t0 = time.time()
            trainer.fit(model, train_dataloaders=dm.train_dataloader())
            train_s = time.time() - t0
            metrics, x = evaluate(model, args, seed, rep, dup, clf, train)
            results.append({"row": row, "seed": seed, "train_s": train_s, **metrics})
            save_and_log_images(None, x[:100], f"samples_{row}_seed{seed}", nrow=10, directory=out)
            print(json.dumps(results[-1]), flush=True)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "sigma_threshold": sigma_threshold,
                                                          "classifier_test_acc": clf_acc, "rows": results}, indent=2))
    cols = ["sim_p95", "frac_above", "frac_dup_replicas", "class_acc", "cfid", "train_s"]
    lines = [f"sigma_threshold {sigma_threshold:.3g}, itb {args.itb}, {args.steps} steps, seeds {args.seeds}, "
             f"classifier test acc {clf_acc:.3f}, background p95 {results[0]['bg_p95']:.3f} / frac above "
             f"{results[0]['bg_frac_above']:.3f}", "",
             "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in args.rows:
        vals = [r for r in results if r["row"] == row]
        cells = []
        for c in cols:
            v = torch.tensor([r[c] for r in vals], dtype=torch.float64)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(vals) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
