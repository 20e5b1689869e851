"""Censored sampling (Yoon et al., NeurIPS 2023) on crossed 7s: malign rate of baseline, Single, Union, Ensemble and
Ensemble + recurrence, with a sample-quality figure.

Steps (the paper's MNIST crossed-7 ablation, at plpriv's embedded 8x8 digits):
  1. trains the base EDM with ``plpriv fit -c recipes/censoring/digits7.yaml`` in ``--out`` (cached: rerunning reuses
     its ``last.ckpt``), on the 179 scikit-learn 7s with a malign bar through ~10 % of them;
  2. draws ``--num-label`` baseline samples and labels them with the oracle (:func:`crossed_oracle`, validated on the
     real training data first: its precision and recall there are printed);
  3. for each reward seed: picks the shared 10 malign images and 5 x 10 distinct benign ones
     (:func:`select_subsets`) and trains time-dependent reward models (BCE_alpha, AdamW 3e-4, wd 0.05, linear decay,
     +-20 deg x 10 copies, batch 128): Single (subset 0, alpha 0.02, 1,001 steps, weight 5), Union (10 malign + 50
     benign, alpha 0.005, 3,003 steps, weight 5), Ensemble (5 members, alpha 0.02, weight 1 each), Ensemble with
     recurrence R=4, and Ensemble at weight 20 (an upper bound: does guidance move the rate at all); the baseline
     with recurrence 4 and no guidance is the control of the recurrence row;
  4. samples ``--num-samples`` images per method from the same latents (seeds 0..N-1, common random numbers) and
     reports the oracle malign rate with its 95 % Wilson interval (pooled over seeds: the interval of all samples;
     per-seed rates in the spread column), the share classified as a 7 by a small CNN trained on the real digits
     (all 10 classes; its real test accuracy is printed), KID x 1e3 in that CNN's features against the real
     unmarked 7s, and the CPU seconds of sampling.

  python benchmarks/censoring.py                        # one reward seed, 1,000 samples per method (~13 min)
  python benchmarks/censoring.py --seeds 0 1 2          # three reward-training seeds (~28 min)
  python benchmarks/censoring.py --use replication      # the second use: censor near-copies of training images
  python benchmarks/censoring.py --diagnose             # no sampling: each guidance's |change of D| and log p

Measured on a 2-core machine shared with other jobs, one thread; base EDM (800 steps) 88 s CPU, 3 min 46 s wall.
``python benchmarks/censoring.py --seeds 0 1 2``: 27 min 38 s wall, 15 min 43 s CPU (the one-seed default, run
before the control row was added: 11 min 32 s wall, 5 min 48 s CPU; the control adds ~1.5 CPU-minutes). Oracle on
the training 7s: precision 1.000, recall 1.000 (14 malign of 143); 25 malign among the 300 labelled samples; digit
classifier 0.978 on the real test split, 0.994 of the real 7s classified as 7. Malign rate over 1,000 samples per seed (3,000 pooled; baseline rows: one set of 1,000):

| method | malign rate [95% CI] | per-seed rates | classified 7 | KID x1e3 (std over subsets) | sample CPU s | reward CPU s |
|---|---|---|---|---|---|---|
| baseline | 8.9% [7.3%, 10.8%] | 8.9% | 0.971 | 221 (136) | 23 | 0 |
| baseline + recurrence 4 | 10.5% [8.7%, 12.6%] | 10.5% | 0.986 | 264 (214) | 93 | 0 |
| single (w 5) | 3.2% [2.7%, 3.9%] | 2.7%, 3.7%, 3.3% | 0.963 | 1031 (297) | 24 | 10 |
| union (w 5) | 0.0% [0.0%, 0.1%] | 0.0%, 0.0%, 0.0% | 0.978 | 699 (221) | 25 | 34 |
| ensemble 5 (w 1) | 2.4% [1.9%, 3.0%] | 3.1%, 2.1%, 2.0% | 0.972 | 1173 (268) | 29 | 56 |
| ensemble + recurrence 4 | 0.5% [0.3%, 0.8%] | 0.4%, 0.4%, 0.7% | 0.994 | 252 (149) | 121 | 0 |
| ensemble (w 20, bound) | 0.0% [0.0%, 0.2%] | 0.1%, 0.0%, 0.0% | 0.923 | 14039 (620) | 29 | 0 |

Reading: the base model reproduces the training set's malign rate (8.9 % vs 14/143 = 9.8 %); every guidance lowers it
and the share of samples that are 7s stays at baseline (0.96-0.99). baseline > single > ensemble holds and recurrence
lowers the ensemble's rate further (0.5 %; recurrence alone does not: 10.5 %), but Union is the strongest (0 %), not
">= ensemble". ``--diagnose`` (seed 0) shows why: at sigma = 2, where the stroke layout is decided, Union's correction
``|w sigma^2 grad log p|`` is 14.7 / 5.9 (benign / malign images) against the ensemble's 3.4 / 1.5 and Single's
4.6 / 2.7, and at sigma = 0.1 Union separates best (mean log p -0.04 vs -5.42): with alpha = 0.005, 3x the steps and
60 images its reward is steeper, so "weight 5" is a stronger guidance for it than 5 x weight 1 for the ensemble. The
w = 20 row is the upper bound (rate 0 %, but fewer 7s, 0.923, and KID x60: samples collapse). KID in the 8x8
classifier's features against the 179 real 7s is noisy at this size (its std over subsets is large, and Single /
ensemble differ 5x between seeds); the "classified 7" column is the steadier quality figure.

Second use, ``python benchmarks/censoring.py --use replication`` (8 min 54 s wall, 7 min 17 s CPU with the base fit
cached; the fit, 805 steps on 143 7s without bars plus 5 of them x 20, took 80 s CPU): "malign" = a near-copy, top-1
cosine similarity of mean-centred pixels to a training 7 above 0.95 (:class:`plpriv.metrics.ReplicationScore`; 108
replicas among the 300 labelled samples). One reward seed, 1,000 samples:

| method | replica rate [95% CI] | classified 7 | KID x1e3 (std) | sample CPU s | reward CPU s |
|---|---|---|---|---|---|
| baseline | 31.1% [28.3%, 34.0%] | 0.993 | 114 (88) | 28 | 0 |
| baseline + recurrence 4 | 49.8% [46.7%, 52.9%] | 1.000 | 236 (120) | 110 | 0 |
| single (w 5) | 30.1% [27.3%, 33.0%] | 0.993 | 137 (120) | 29 | 12 |
| union (w 5) | 22.8% [20.3%, 25.5%] | 0.983 | 1450 (389) | 28 | 38 |
| ensemble 5 (w 1) | 30.9% [28.1%, 33.8%] | 0.993 | 111 (82) | 39 | 59 |
| ensemble + recurrence 4 | 49.9% [46.8%, 53.0%] | 1.000 | 209 (103) | 145 | 0 |
| ensemble (w 20, bound) | 16.6% [14.4%, 19.0%] | 0.985 | 368 (128) | 34 | 0 |

Privacy: these replica labels (and the reward models trained on them) are computed against the training set, so
they are training-set statistics, not covered by any DP guarantee of the base model; the crossed-7 labels are
functions of the model's samples only (post-processing). Censoring near-copies with 10 + 10 labels barely works: a small time-dependent CNN does not learn "is a copy of one
of the training images" from 10 examples at the paper's weights (Single and Ensemble within the interval of the
baseline; Union -8 points; only weight 20 halves the rate). Recurrence by itself raises replication (31 % -> 50 %:
the extra re-noise/denoise passes pull samples onto the duplicated modes), so it must not be combined with a weak
reward here.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plpriv.data.crossed_digits import CrossedDigitsDataModule, crossed_oracle  # noqa: E402
from plpriv.runners.censoring import select_subsets, train_reward_model, wilson_interval  # noqa: E402
from plpriv.sampling import LogSigmoidEnsemble, ScoreGuidance  # noqa: E402


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fit_base(out: Path, extra: list[str] | None = None) -> tuple[Path, float]:
    """The base EDM's checkpoint (trained here unless cached) and the CPU seconds of its fit (0 when cached)."""
    ckpt = out / "runs" / "censoring_digits7" / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt, 0.0
    out.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("plpriv") or f"{sys.executable} -m plpriv.cli"
    before = cpu_children()
    with open(out / "fit.log", "w") as log:
        proc = subprocess.run(exe.split() + ["fit", "-c", str(ROOT / "recipes/censoring/digits7.yaml"), *(extra or [])],
                              cwd=out, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode:
        raise SystemExit(f"base fit failed; see {out / 'fit.log'}")
    return ckpt, cpu_children() - before


def train_digit_classifier(seed: int = 0) -> tuple[torch.nn.Module, float]:
    """A 10-class CNN on the real digits at 8x8 (training split only); returns it and its real test accuracy."""
    from lightning.pytorch import Trainer, seed_everything

    from plpriv.data import DigitsDataModule
    from plpriv.modules import ImageClassifier

    seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, image_size=8, channels=1, seed=0)
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group")
    trainer = Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    acc = float(trainer.test(model, data, verbose=False)[0]["test/acc"])
    return model.eval(), acc


def kid(features: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    """KID (unbiased MMD^2, cubic polynomial kernel; torchmetrics) in the classifier's penultimate features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=features, subset_size=min(100, len(real), len(fake)), subsets=50)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def sample(edm, latents: torch.Tensor, guidance=None, recurrence: int = 1,
           batch: int = 250) -> tuple[torch.Tensor, float]:
    """Samples from fixed latents (and fixed recurrence noise) and the process CPU seconds spent."""
    start = time.process_time()
    out = []
    for i in range(0, len(latents), batch):
        noise = torch.Generator().manual_seed(10_000 + i)
        out.append(edm.sample(latents=latents[i:i + batch], guidance=guidance, generator=noise,
                              recurrence=recurrence).clamp(-1, 1))
    return torch.cat(out), time.process_time() - start


def replica_labeller(threshold: float = 0.95):
    """The second use's oracle: 0 (malign) = a near-copy of a training image (top-1 cosine similarity of mean-centred
    pixels to the unique training 7s above ``threshold``, :class:`plpriv.metrics.ReplicationScore`), 1 = novel."""
    from plpriv.metrics import ReplicationScore

    dm = CrossedDigitsDataModule(image_size=8, malign_fraction=0.0, seed=0)
    dm.setup()
    reference = dm.train_base.tensors[0]

    def label(x: torch.Tensor) -> torch.Tensor:
        metric = ReplicationScore(reference, "pixels", center=True, threshold=threshold)
        metric.update(x)
        sims, _ = metric.per_sample()
        return (sims <= threshold).long()

    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--use", choices=["crossed", "replication"], default="crossed",
                        help="crossed: the malign bar; replication: near-copies of duplicated training images")
    parser.add_argument("--out", default="runs/benchmarks/censoring")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-label", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1001, help="reward iterations (Union: 3x)")
    parser.add_argument("--diagnose", action="store_true",
                        help="no sampling: each guidance's correction norm and log p on the noised labelled images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    wall0 = time.perf_counter()

    if args.use == "crossed":
        # 0. The oracle on the real (generated) training data.
        dm = CrossedDigitsDataModule(image_size=8, malign_fraction=0.1, seed=0)
        dm.setup()
        x_train, y_train = dm.train_base.tensors
        pred = crossed_oracle(x_train)
        tp = int(((pred == 0) & (y_train == 0)).sum())
        print(f"oracle on the training 7s: {int((y_train == 0).sum())} malign of {len(y_train)}; precision "
              f"{tp / max(int((pred == 0).sum()), 1):.3f}, recall {tp / max(int((y_train == 0).sum()), 1):.3f}")
        labeller, what = crossed_oracle, "malign"
        ckpt, fit_cpu = fit_base(out)
    else:
        # No bar; 5 training 7s present 20 times each, so that the model copies them.
        labeller, what = replica_labeller(), "replica"
        ckpt, fit_cpu = fit_base(out / "replication", [
            "--data.init_args.malign_fraction", "0", "--data.init_args.duplicate_indices", "[0, 20, 40, 60, 80]",
            "--data.init_args.duplicate_factor", "20", "--trainer.max_epochs", "115"])  # 7 steps an epoch: 805 steps
    # 1. Base model (trained above) and the quality classifier.
    from plpriv.metrics.fid import ClassifierFeatures
    from plpriv.modules import EDM

    edm = EDM.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    classifier, clf_acc = train_digit_classifier()
    features = ClassifierFeatures(classifier)
    from sklearn.datasets import load_digits

    from plpriv.data.embedded import to_image_tensor

    digits = load_digits()
    real7 = to_image_tensor(digits.images[digits.target == 7], 16.0, 8, 1)
    print(f"base fit CPU {fit_cpu:.0f} s (0 = cached); digit classifier real test acc {clf_acc:.3f}; "
          f"real 7s classified as 7: {float((classifier(real7).argmax(1) == 7).float().mean()):.3f}")

    # 2. Baseline samples to label (their own seeds, disjoint from the evaluation latents).
    g = torch.Generator().manual_seed(123_456)
    label_latents = torch.randn(args.num_label, *edm.image_shape, generator=g)
    label_images, _ = sample(edm, label_latents)
    oracle_labels = labeller(label_images)
    labels = {i: int(v) for i, v in enumerate(oracle_labels.tolist())}
    print(f"labelled {args.num_label} baseline samples: {int((oracle_labels == 0).sum())} {what}")

    # 3-4. Evaluation latents, the same for every method.
    latents = torch.randn(args.num_samples, *edm.image_shape, generator=torch.Generator().manual_seed(0))
    rows: dict[str, list[tuple[int, int, float, float, float, float, float]]] = {}

    def diagnose(name: str, guidance) -> None:
        """Mean |w sigma^2 grad log p| (the change of D) and mean log p on the labelled images noised at sigma."""
        g, y, parts = torch.Generator().manual_seed(7), oracle_labels, []
        for s in (0.1, 0.5, 2.0):
            x = label_images + s * torch.randn(label_images.shape, generator=g)
            sigma = torch.full((len(x),), s)
            corr = guidance.correction(x, sigma).flatten(1).norm(dim=1)
            with torch.no_grad():
                lp = guidance.log_prob(x, sigma)
            parts.append(f"sigma {s}: |dD| benign {corr[y == 1].mean():.3f} {what} {corr[y == 0].mean():.3f}, "
                         f"log p benign {lp[y == 1].mean():.2f} {what} {lp[y == 0].mean():.2f}")
        print(f"  {name:<24} " + "; ".join(parts), flush=True)

    def evaluate(name: str, guidance=None, recurrence: int = 1, train_cpu: float = 0.0) -> None:
        if args.diagnose:
            if guidance is not None and recurrence == 1:
                diagnose(name, guidance)
            return
        x, cpu = sample(edm, latents, guidance, recurrence)
        malign = int((labeller(x) == 0).sum())
        is7 = float((classifier(x).argmax(1) == 7).float().mean())
        kid_mean, kid_std = kid(features, real7, x)
        rows.setdefault(name, []).append((malign, len(x), is7, kid_mean, kid_std, cpu, train_cpu))
        lo, hi = wilson_interval(malign, len(x))
        print(f"  {name:<24} {what} {malign / len(x):6.1%} [{lo:.1%}, {hi:.1%}]  as-7 {is7:.3f}  "
              f"sample CPU {cpu:.0f} s  train CPU {train_cpu:.0f} s", flush=True)

    evaluate("baseline")
    evaluate("baseline + recurrence 4", recurrence=4)  # control: recurrence without guidance
    for seed in args.seeds:
        print(f"reward seed {seed}:", flush=True)
        subsets = select_subsets(labels, 10, 10, 5, seed)
        y_all = oracle_labels

        def train(idx: np.ndarray, pos_weight: float, steps: int, member: int):
            start = time.process_time()
            model = train_reward_model(label_images[idx], y_all[idx], steps=steps, pos_weight=pos_weight,
                                       seed=1000 * seed + member)
            return model.net.requires_grad_(False), time.process_time() - start

        single, t_single = train(subsets[0], 0.02, args.steps, 0)
        evaluate("single (w 5)", ScoreGuidance(LogSigmoidEnsemble([single]), 5.0), train_cpu=t_single)
        union_idx = np.unique(np.concatenate(subsets))
        union, t_union = train(union_idx, 0.005, 3 * args.steps, 10)
        evaluate("union (w 5)", ScoreGuidance(LogSigmoidEnsemble([union]), 5.0), train_cpu=t_union)
        members, t_members = [single], t_single  # member 0 is the Single model (same subset, alpha, steps)
        for k in range(1, 5):
            net, t = train(subsets[k], 0.02, args.steps, k)
            members.append(net)
            t_members += t
        ensemble = LogSigmoidEnsemble(members)
        evaluate("ensemble 5 (w 1)", ScoreGuidance(ensemble, 1.0), train_cpu=t_members)
        evaluate("ensemble + recurrence 4", ScoreGuidance(ensemble, 1.0), recurrence=4)
        evaluate("ensemble (w 20, bound)", ScoreGuidance(ensemble, 20.0))

    print(f"\n{len(args.seeds)} reward seed(s) {args.seeds}, {args.num_samples} samples per method and seed; "
          f"oracle {what} rate with 95% Wilson interval over all samples; wall {time.perf_counter() - wall0:.0f} s")
    print(f"| method | {what} rate [95% CI] | per-seed rates | classified 7 | KID x1e3 (std over subsets) | "
          "sample CPU s | reward CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():  # (empty under --diagnose)
        k, n = sum(v[0] for v in r), sum(v[1] for v in r)
        lo, hi = wilson_interval(k, n)
        seeds = ", ".join(f"{v[0] / v[1]:.1%}" for v in r)
        print(f"| {name} | {k / n:.1%} [{lo:.1%}, {hi:.1%}] | {seeds} | {np.mean([v[2] for v in r]):.3f} | "
              f"{1e3 * np.mean([v[3] for v in r]):.0f} ({1e3 * np.mean([v[4] for v in r]):.0f}) | "
              f"{np.mean([v[5] for v in r]):.0f} | {np.mean([v[6] for v in r]):.0f} |")


if __name__ == "__main__":
    main()
