"""Censored sampling's human-feedback steps (Yoon et al., NeurIPS 2023): label baseline samples, train reward models.

The three steps, with the base model of ``recipes/censoring/digits7.yaml`` (any unconditional or conditional EDM
recipe works the same way)::

    # 1. sample and label: 300 baseline samples, a numbered sheet and a labels file to fill in
    BASE=runs/censoring_digits7/checkpoints/last.ckpt
    plpriv predict -c recipes/censoring/digits7.yaml --model.init_checkpoint $BASE
    plpriv censoring label --samples runs/censoring_digits7/predict/samples/samples.npz \\
        --out runs/censoring_labels            # sheet.png + labels.csv (index,label: 0 malign, 1 benign, blank unsure)
    # 2. train the reward models: 5 members sharing the malign images, each with its own benign images
    plpriv censoring train --samples runs/censoring_digits7/predict/samples/samples.npz \\
        --labels runs/censoring_labels/labels.csv --out runs/censoring_reward --members 5 --pos-weight 0.02 --weight 1
    # 3. sample censored: the written guidance.yaml sets model.guidance (an ensemble ScoreGuidance)
    plpriv predict -c recipes/censoring/digits7.yaml --model.init_checkpoint $BASE \\
        -c runs/censoring_reward/guidance.yaml --model.predict_dir runs/censoring_censored

``label --oracle crossed`` fills the labels with :func:`plpriv.data.crossed_digits.crossed_oracle` instead of a person
(tests, benchmarks); ``rate`` reports the oracle's malign rate of a samples file with its 95 % Wilson interval.
Subsets follow the authors' ``select_partial_feedback.py``: every member gets the same ``num_malign`` malign images and
its own ``num_benign`` benign ones (disjoint across members, so 5 x 10 benign = the Union model's 50).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["main", "read_labels", "select_subsets", "train_reward_model", "wilson_interval", "write_guidance_config",
           "write_label_sheet"]

LABEL_NAMES = {0: "malign", 1: "benign"}
_UNSURE = {"", "?", "-", "none", "unsure"}


def _as_unit_images(images: Tensor | np.ndarray) -> Tensor:
    """uint8 NHWC (``samples.npz``) or float NCHW in ``[-1, 1]`` -> float32 NCHW in ``[-1, 1]``."""
    if images.dtype in (np.uint8, torch.uint8):
        x = torch.as_tensor(np.asarray(images))
        x = x[..., None] if x.ndim == 3 else x
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W] floats in [-1, 1] or uint8 [N, H, W, C], got {tuple(x.shape)}")
    return x


def load_samples(path: str | Path) -> Tensor:
    """The images of a ``plpriv predict`` ``samples.npz`` as float ``[N, C, H, W]`` in ``[-1, 1]``."""
    with np.load(path) as data:
        if "images" not in data.files:
            raise ValueError(f"{path} has no `images` array (it has {data.files}); give plpriv predict's samples.npz")
        return _as_unit_images(data["images"])


def write_label_sheet(images: Tensor | np.ndarray, out_dir: str | Path, ncol: int = 20, cell: int = 48,
                      labels: Sequence[int | None] | None = None) -> tuple[Path, Path]:
    """Write ``sheet.png`` (every image, upscaled to ``cell`` px, its index drawn above it) and ``labels.csv``
    (``index,label``, labels blank or prefilled from ``labels``) into ``out_dir``; returns both paths."""
    from PIL import Image, ImageDraw

    x = _as_unit_images(images)
    n = len(x)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    strip = 14  # pixels for the index text
    sheet = Image.new("RGB", (ncol * (cell + 4), nrow * (cell + strip + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        img = pixels[i].permute(1, 2, 0).numpy()
        tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        tile = tile.resize((cell, cell), Image.NEAREST)
        left, top = (i % ncol) * (cell + 4) + 2, (i // ncol) * (cell + strip + 4) + 2
        draw.text((left, top), str(i), fill="black")
        sheet.paste(tile, (left, top + strip))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, table = out / "sheet.png", out / "labels.csv"
    sheet.save(png)
    with open(table, "w", newline="") as f:
        f.write("# censored sampling labels: 0 = malign, 1 = benign, blank = unsure (left out); one row per index of"
                " sheet.png\n")
        writer = csv.writer(f)
        writer.writerow(["index", "label"])
        for i in range(n):
            writer.writerow([i, "" if labels is None or labels[i] is None else int(labels[i])])
    return png, table


def read_labels(path: str | Path, num_images: int | None = None) -> dict[int, int | None]:
    """Labels ``{index: 0 | 1 | None}`` from a CSV or text file of ``index,label`` lines (comma, tab or spaces).

    ``0`` = malign, ``1`` = benign, blank / ``?`` / ``unsure`` = unsure (``None``); ``malign``/``benign`` are accepted
    too. ``#`` comments, blank lines and an ``index,label`` header are skipped. A bad line raises ``ValueError``
    naming the file and line number.
    """
    labels: dict[int, int | None] = {}
    words = {"0": 0, "1": 1, "malign": 0, "benign": 1}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in (line.split(",") if "," in line else line.split())]
        if parts[0].lower() == "index":
            continue
        where = f"{path}:{lineno}: {raw.strip()!r}:"
        if len(parts) > 2:
            raise ValueError(f"{where} expected `index,label`, got {len(parts)} fields")
        try:
            index = int(parts[0])
        except ValueError:
            raise ValueError(f"{where} the index {parts[0]!r} is not an integer") from None
        if index < 0 or num_images is not None and index >= num_images:
            raise ValueError(f"{where} index {index} is outside the {num_images} images (0..{(num_images or 1) - 1})")
        if index in labels:
            raise ValueError(f"{where} index {index} is labelled twice")
        value = parts[1].lower() if len(parts) > 1 else ""
        if value in _UNSURE:
            labels[index] = None
        elif value in words:
            labels[index] = words[value]
        else:
            raise ValueError(f"{where} label {parts[1]!r} must be 0 (malign), 1 (benign) or blank (unsure)")
    return labels


def select_subsets(labels: dict[int, int | None], num_malign: int, num_benign: int, num_subsets: int,
                   seed: int = 0) -> list[np.ndarray]:
    """Index arrays of ``num_subsets`` training sets: the same ``num_malign`` malign images in each (drawn once) plus
    ``num_benign`` benign images per subset, disjoint across subsets (the authors' ``select_partial_feedback.py``
    with 10 malign labels in all)."""
    malign = np.array(sorted(i for i, v in labels.items() if v == 0), dtype=np.int64)
    benign = np.array(sorted(i for i, v in labels.items() if v == 1), dtype=np.int64)
    if min(num_malign, num_benign, num_subsets) < 1:
        raise ValueError(f"need num_malign, num_benign, num_subsets >= 1, got {num_malign}, {num_benign}, "
                         f"{num_subsets}")
    if len(malign) < num_malign:
        raise ValueError(f"{len(malign)} images are labelled malign, {num_malign} needed: label more samples")
    if len(benign) < num_benign * num_subsets:
        raise ValueError(f"{len(benign)} images are labelled benign, {num_benign} x {num_subsets} subsets = "
                         f"{num_benign * num_subsets} needed: label more samples or lower --num-benign/--members")
    rng = np.random.default_rng(seed)
    shared = rng.choice(malign, size=num_malign, replace=False)
    benign = rng.permutation(benign)
    return [np.concatenate([shared, benign[k * num_benign:(k + 1) * num_benign]]) for k in range(num_subsets)]


def train_reward_model(images: Tensor, labels: Tensor, steps: int = 1001, pos_weight: float = 0.02,
                       time_dependent: bool = True, batch_size: int = 128, copies: int = 10, seed: int = 0,
                       out_path: str | Path | None = None):
    """Train one :class:`plpriv.modules.censoring.RewardModel` for ``steps`` iterations (no logger, no progress bar);
    save it to ``out_path`` when given. Returns the model (eval mode)."""
    from lightning.pytorch import Trainer, seed_everything

    from plpriv.data.labelled import LabelledImagesDataModule
    from plpriv.modules.censoring import RewardModel

    seed_everything(seed, verbose=False)
    data = LabelledImagesDataModule(images, labels, copies=copies, batch_size=batch_size, seed=seed)
    model = RewardModel(time_dependent=time_dependent, in_channels=images.shape[1], pos_weight=pos_weight, seed=seed)
    trainer = Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(out_path))
    return model.eval()


def write_guidance_config(path: str | Path, checkpoints: Sequence[str | Path], weight: float, recurrence: int = 1,
                          time_dependent: bool = True) -> Path:
    """A config fragment for ``plpriv predict -c``: ``model.init_args.guidance`` = the ensemble's guidance term (and
    ``sampler_kwargs.recurrence`` when > 1)."""
    import yaml

    term = "RewardGuidance" if time_dependent else "RewardForwardGuidance"
    init_args: dict = {"guidance": {"class_path": f"plpriv.modules.censoring.{term}", "init_args": {
        "checkpoints": [str(Path(c).resolve()) for c in checkpoints], "weight": float(weight)}}}
    if recurrence > 1:
        init_args["sampler_kwargs"] = {"num_steps": 18, "recurrence": int(recurrence)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump({"model": {"init_args": init_args}}, sort_keys=False))
    return Path(path)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest(...).proportion_ci``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _oracle(name: str):
    if name != "crossed":
        raise ValueError(f"unknown oracle {name!r}; available: crossed")
    from plpriv.data.crossed_digits import crossed_oracle

    return crossed_oracle


def main(argv: Sequence[str] | None = None, prog: str = "python -m plpriv.runners.censoring") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("label", help="write sheet.png and labels.csv for a samples.npz")
    p.add_argument("--samples", required=True, help="plpriv predict's samples.npz")
    p.add_argument("--out", required=True)
    p.add_argument("--oracle", default=None, help="fill the labels with a rule instead of a person: crossed")
    p = sub.add_parser("train", help="train reward models on labelled samples; write reward_<k>.ckpt, guidance.yaml")
    p.add_argument("--samples", required=True)
    p.add_argument("--labels", required=True, help="index,label file (0 malign, 1 benign, blank unsure)")
    p.add_argument("--out", required=True)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--num-malign", type=int, default=10)
    p.add_argument("--num-benign", type=int, default=10)
    p.add_argument("--pos-weight", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=1001)
    p.add_argument("--weight", type=float, default=1.0, help="guidance weight (paper: 1 per member of 5, 5 for one)")
    p.add_argument("--recurrence", type=int, default=1)
    p.add_argument("--time-independent", action="store_true", help="r(x0) with forward guidance instead of r(x, sigma)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("rate", help="the oracle's malign rate of a samples.npz, with its 95%% Wilson interval")
    p.add_argument("--samples", required=True)
    p.add_argument("--oracle", default="crossed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.command == "label":
        images = load_samples(args.samples)
        labels = _oracle(args.oracle)(images).tolist() if args.oracle else None
        png, table = write_label_sheet(images, args.out, labels=labels)
        print(f"wrote {png} ({len(images)} numbered samples) and {table}: fill in 0 (malign) / 1 (benign)")
    elif args.command == "train":
        images = load_samples(args.samples)
        labels = read_labels(args.labels, len(images))
        subsets = select_subsets(labels, args.num_malign, args.num_benign, args.members, args.seed)
        y_all = torch.tensor([labels.get(i) if labels.get(i) is not None else -1 for i in range(len(images))])
        checkpoints = []
        for k, idx in enumerate(subsets):
            path = Path(args.out) / f"reward_{k}.ckpt"
            train_reward_model(images[idx], y_all[idx], steps=args.steps, pos_weight=args.pos_weight,
                               time_dependent=not args.time_independent, seed=args.seed + k, out_path=path)
            checkpoints.append(path)
            print(f"trained {path} on {len(idx)} labelled images")
        cfg = write_guidance_config(Path(args.out) / "guidance.yaml", checkpoints, args.weight, args.recurrence,
                                    not args.time_independent)
        print(f"wrote {cfg}: plpriv predict -c <recipe> -c {cfg} ...")
    else:
        images = load_samples(args.samples)
        malign = int((_oracle(args.oracle)(images) == 0).sum())
        low, high = wilson_interval(malign, len(images))
        print(f"malign {malign}/{len(images)} = {malign / len(images):.2%} (95% Wilson interval {low:.2%}-{high:.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
