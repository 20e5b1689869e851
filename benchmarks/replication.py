"""Benchmark: replication and quality of LoyalDiffusion (Li et al., arXiv 2412.01118) on digits with duplicates.

Four rows, same data, seed and optimizer-step budget: ``plain`` (EDM + SongUNet), ``rau_all`` (EDM + RAUNet, ITBs at
every noise level), ``loyal`` (LoyalDiffusion: plain U-Net below ``sigma_threshold``, RAU-Net above) and ``edm_cb``
(plain EDM + TimestepSelectiveMitigation). The data are scikit-learn's 8x8 digits (``--train-per-class`` images per
class of the training split, 0: all) with the first training image of classes 0, 2, 4, 6, 8 present ``--dup-factor``
times (as benchmarks/memorization.py).

Replication (Somepalli et al. 2023): top-1 cosine similarity of each generation to the training images (mean-centred
pixels; SSCD cannot be fetched here), its 95th percentile, the fraction above ``--replica-threshold``, the fraction
that replicate one of the duplicated images, and the background distribution (each training image vs its nearest other
one). Quality: accuracy of a classifier trained on all real training digits on the class-conditional generations, and
FID in that classifier's penultimate features ("classifier-FID") against the training images. Training time: wall
seconds of fit. ``--sweep SIGMA ...`` runs :meth:`plpriv.modules.LoyalDiffusion.sweep_thresholds` instead (one
LoyalDiffusion per threshold, the best trade-off by :func:`plpriv.modules.loyal.select_best_threshold`).

Measured (2-core CPU, 1 thread; defaults: 200 images + 5 x 19 extra copies, 600 steps of batch 64, sigma threshold
3.44, conv3x3 ITBs on the 4x4 skips; mean ± std of seeds 0 and 1): fraction of generations above 0.95 similarity
(background 0.040) plain 0.271 ± 0.004, LoyalDiffusion 0.283 ± 0.016, class accuracy 0.972 / 0.971; seed 0 only:
RAU-Net everywhere 0.266, EDM + callback 0.278. ``--itb none --sweep 1 3.44``: 0.288 / 0.272. No reduction here; the
zero-residual ITB starts as, and stays close to, the identity.

    python benchmarks/replication.py --seeds 0                               # table in <out>/results.md, JSON, PNGs
    python benchmarks/replication.py --seeds 1 --rows plain loyal --append   # another seed into the same table
    python benchmarks/replication.py --sweep 0.5 1 3.44     # threshold sweep: <out>/sweep.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import TimestepSelectiveMitigation
from plpriv.data import DigitsDataModule
from plpriv.metrics import ReplicationScore
from plpriv.modules import EDM, LoyalDiffusion
from plpriv.modules.loyal import generation_metrics, select_best_threshold
from plpriv.nets import RAUNet, SmallCNN, SongUNet, sigma_from_timestep_fraction
from plpriv.utils.figures import save_and_log_images

ROWS = ("plain", "rau_all", "loyal", "edm_cb")
TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
COLS = ["sim_p95", "frac_above", "frac_dup_replicas", "class_acc", "cfid", "train_s"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/replication")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--model-channels", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-per-class", type=int, default=20, help="training images per class (0: all, ~144)")
    p.add_argument("--dup-classes", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    p.add_argument("--dup-factor", type=int, default=20, help="copies of each duplicated image (1: no duplicates)")
    p.add_argument("--timestep-threshold", type=float, default=0.5, help="DDPM t/T (linear schedule) -> sigma")
    p.add_argument("--sigma-threshold", type=float, default=None, help="overrides --timestep-threshold")
    p.add_argument("--itb", default="conv3x3")
    p.add_argument("--rau-levels", type=int, nargs="+", default=None)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sampler-steps", type=int, default=18)
    p.add_argument("--replica-threshold", type=float, default=0.95)
    p.add_argument("--sweep", type=float, nargs="+", default=None, metavar="SIGMA",
                   help="instead of the four rows: LoyalDiffusion.sweep_thresholds over these sigma thresholds")
    p.add_argument("--accuracy-tolerance", type=float, default=0.02, help="sweep: the 'comparable quality' margin")
    p.add_argument("--best-by", default="frac_above", choices=["sim_p95", "frac_above", "frac_dup_replicas"],
                   help="sweep: the replication measure minimised (sim_p95 saturates once >5%% are replicas)")
    p.add_argument("--append", action="store_true",
                   help="add this run's rows to <out>/results.json (another seed of the same settings)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def data(args: argparse.Namespace) -> tuple[DigitsDataModule, TensorDataset, list[int]]:
    """The digits split, the training images used (``--train-per-class`` per class) and the duplicated ones among
    them (the first image of each ``--dup-classes`` class)."""
    dm = DigitsDataModule(image_size=args.image_size, channels=1, val_fraction=0.1, test_fraction=0.1, seed=0)
    dm.setup()
    x, y = dm.train_base.tensors  # type: ignore[union-attr]
    if args.train_per_class > 0:
        keep = torch.cat([(y == c).nonzero().flatten()[: args.train_per_class] for c in range(10)]).sort().values
        x, y = x[keep], y[keep]
    dup = [int((y == c).nonzero()[0]) for c in args.dup_classes]
    return dm, TensorDataset(x, y), dup


def train_loader(train: TensorDataset, dup: list[int], args: argparse.Namespace, seed: int) -> DataLoader:
    """The training images plus ``--dup-factor - 1`` extra copies of each duplicated one, shuffled from ``seed``."""
    x, y = train.tensors
    extra = torch.tensor(dup, dtype=torch.long).repeat_interleave(args.dup_factor - 1)
    both = TensorDataset(torch.cat([x, x[extra]]), torch.cat([y, y[extra]]))
    return DataLoader(both, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def classifier(dm: DigitsDataModule, steps: int = 600) -> tuple[SmallCNN, float]:
    """SmallCNN on all real training images of the split (no duplicates); returns it and its test accuracy."""
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


def net_config(args: argparse.Namespace) -> dict:
    return dict(img_resolution=args.image_size, in_channels=1, out_channels=1, label_dim=10,
                model_channels=args.model_channels, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[args.image_size // 2], dropout=0.0)


def module_kwargs(args: argparse.Namespace, seed: int) -> dict:
    return dict(optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), lr_rampup_img=2000, ema_halflife_img=2000,
                seed=seed, sampler_kwargs={"num_steps": args.sampler_steps}, num_val_samples=0)


def build(row: str, args: argparse.Namespace, seed: int, sigma_threshold: float) -> tuple[EDM, list]:
    cfg, common = net_config(args), module_kwargs(args, seed)
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


def table(results: list[dict], key: str, keys: list) -> list[str]:
    """Markdown rows: mean ± std over seeds of each column, one row per ``key`` value."""
    lines = [f"| {key} | " + " | ".join(COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
    for k in keys:
        vals = [r for r in results if r[key] == k]
        cells = []
        for c in COLS:
            v = torch.tensor([r[c] for r in vals], dtype=torch.float64)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(vals) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def sweep(args: argparse.Namespace, train: TensorDataset, dup: list[int], clf: SmallCNN, rep: ReplicationScore,
          out: Path, header: str) -> None:
    results: list[dict] = []
    for seed in args.seeds:
        res = LoyalDiffusion.sweep_thresholds(
            lambda: SongUNet(**net_config(args)), args.sweep, train_loader(train, dup, args, seed), rep, clf,
            max_steps=args.steps, num_samples=args.num_samples, fid_reference=train.tensors[0], duplicated=dup,
            accuracy_tolerance=args.accuracy_tolerance, replication_key=args.best_by, seed=seed, trainer_kwargs=TRAINER,
            rau_levels=args.rau_levels, itb=args.itb,
            **{k: v for k, v in module_kwargs(args, seed).items() if k != "seed"})
        for row in res["rows"]:
            results.append({"seed": seed, **row})
            print(json.dumps(results[-1]), flush=True)
        print(f"seed {seed}: best sigma_threshold {res['best']['sigma_threshold']:g} ({res['rule']})", flush=True)
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=2))
    means = [{"sigma_threshold": t, **{c: sum(r[c] for r in results if r["sigma_threshold"] == t) / len(args.seeds)
                                       for c in ("sim_p95", "frac_above", "frac_dup_replicas", "class_acc")}}
             for t in args.sweep]
    best = select_best_threshold(means, args.accuracy_tolerance, args.best_by)
    lines = [header, "", *table(results, "sigma_threshold", list(args.sweep)), "",
             f"best (seed means; lowest {args.best_by} with class_acc >= best - {args.accuracy_tolerance:g}): "
             f"sigma_threshold {best['sigma_threshold']:g}"]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sigma_threshold = args.sigma_threshold or sigma_from_timestep_fraction(args.timestep_threshold)
    dm, train, dup = data(args)
    clf, clf_acc = classifier(dm)
    x_train = train.tensors[0]
    rep = ReplicationScore(x_train, feature="pixels", center=True, threshold=args.replica_threshold,
                           background_queries=None)
    bg = rep.background()
    header = (f"{len(x_train)} training images + {len(dup)} x {args.dup_factor - 1} extra copies, {args.steps} steps "
              f"of batch {args.batch_size}, itb {args.itb}, seeds {args.seeds}, classifier test acc {clf_acc:.3f}, "
              f"background p95 {float(torch.quantile(bg.double(), 0.95)):.3f} / frac above "
              f"{float((bg > args.replica_threshold).float().mean()):.3f}")
    if args.sweep:
        sweep(args, train, dup, clf, rep, out, header)
        return
    results: list[dict] = []
    if args.append and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())["rows"]
    for seed in args.seeds:
        for row in args.rows:
            model, callbacks = build(row, args, seed, sigma_threshold)
            trainer = Trainer(max_steps=args.steps, callbacks=callbacks, **TRAINER)
            t0 = time.time()
            trainer.fit(model, train_dataloaders=train_loader(train, dup, args, seed))
            train_s = time.time() - t0
            metrics, x = generation_metrics(model, rep, clf, args.num_samples, seed + 1000, x_train, dup)
            results.append({"row": row, "seed": seed, "train_s": train_s, **metrics})
            save_and_log_images(None, x[:100], f"samples_{row}_seed{seed}", nrow=10, directory=out)
            print(json.dumps(results[-1]), flush=True)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "sigma_threshold": sigma_threshold,
                                                          "classifier_test_acc": clf_acc, "rows": results}, indent=2))
    seeds = sorted({r["seed"] for r in results})
    lines = [f"sigma_threshold {sigma_threshold:.3g}; " + header.replace(f"seeds {args.seeds}", f"seeds {seeds}"), "",
             *table(results, "row", [r for r in ROWS if any(x["row"] == r for x in results)])]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
