"""Benchmark: cost of DP-SGD, and of the DPSGD callback over opacus used directly.

One run measures, for the same network, data and logical batch (Poisson batches of expected size ``--batch`` for the
private runs, fixed batches of that size otherwise), the time of a training step (forward, backward, clipping, noise,
optimizer step; data loading excluded), scaled to ``--batch`` examples (Poisson batch sizes vary from step to step),
and the peak memory, for every ``grad_sample_mode`` (hooks, functorch, ghost):

* ``plain``      a plain PyTorch loop, non-private;
* ``plain+opacus``  the same loop with opacus' ``PrivacyEngine.make_private(wrap_model=False)`` (hooks / functorch) or
  ghost clipping (``DPTensorFastGradientClipping``: two backward passes);
* ``lightning``  ``Trainer.fit`` of plpriv's module (ImageClassifier, EDM), non-private;
* ``lightning+DPSGD``  the same with ``plpriv.callbacks.DPSGD``.

The runs to compare alternate step by step in one process: each (net, mode) process runs ``Trainer.fit`` (with
DPSGD for a private mode) and, next to every Lightning step (before it on even steps, after it on odd ones), one step
of the plain non-private loop and one of the plain opacus loop, on their own copies of the model. Ratios are medians
[quartiles] of the per-step ratios, so a change of machine load hits both sides of a pair alike.

Networks: ``classifier`` = plpriv's SmallCNN on 32x32 digits (recipes/classifier/digits.yaml), ``edm`` = the
SongUNet with LoRA attention of recipes/edm/digits_lora.yaml at its resolution (EDM loss, EMA update each step in
both loops); both recipes are read at run time. Ghost clipping needs per-sample losses: for the Lightning runs the
modules are subclassed to return them (``training_step`` -> loss per example).

Reported ratios: DP / non-private within each framework (Lightning's through the plain non-private loop run next to
both), callback / plain opacus (goal <= 1.05), Lightning / plain non-private. Peak memory: CUDA, max allocated per
runner; CPU, peak RSS of the (net, mode) process, which holds all its runners and ~0.5 GB of Python/torch.

``--accuracy`` also trains recipes/classifier/digits_dp.yaml at epsilon 1, 3, 8 (delta 1e-5) and without DP and
reports validation and test accuracy.

    python benchmarks/dp_overhead.py --accuracy               # timing and accuracy tables (CPU: ~40 min)
    python benchmarks/dp_overhead.py                          # timing table only
    python benchmarks/dp_overhead.py --threads 1 --steps 30 --edm-steps 10   # CPU, shared 2-core machine: ~6 min
    python benchmarks/dp_overhead.py --device cuda --steps 100 --edm-steps 50
    python benchmarks/dp_overhead.py --accuracy --skip-timing # accuracy table only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_RECIPE = ROOT / "recipes" / "classifier" / "digits.yaml"
EDM_RECIPE = ROOT / "recipes" / "edm" / "digits_lora.yaml"
DP_RECIPE = ROOT / "recipes" / "classifier" / "digits_dp.yaml"
MODES = ("hooks", "functorch", "ghost")
SIGMA, CLIP = 1.0, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/dp_overhead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nets", nargs="+", default=["classifier", "edm"], choices=["classifier", "edm"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=64, help="logical (expected) batch size")
    p.add_argument("--steps", type=int, default=30, help="timed paired steps per configuration")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--edm-steps", type=int, default=10, help="timed paired steps for the EDM network (slow on CPU)")
    p.add_argument("--edm-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations; per-step times are pooled over rounds")
    p.add_argument("--accuracy", action="store_true", help="also train the DP digits recipe at epsilon 1, 3, 8")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--lrs", type=float, nargs=4, default=[0.05, 0.1, 0.3, 0.3],
                   metavar=("NONDP", "EPS1", "EPS3", "EPS8"), help="SGD learning rates for the accuracy runs")
    p.add_argument("--one", nargs=2, metavar=("NET", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models and data
def build(net: str, batch: int) -> tuple[Any, Any, int]:
    """(LightningModule, DataModule, image size) for a network, as in its recipe."""
    from plpriv.data import DigitsDataModule
    from plpriv.modules import EDM, ImageClassifier
    from plpriv.nets import SongUNet

    if net == "classifier":
        recipe = yaml.safe_load(CLASSIFIER_RECIPE.read_text())
        args = recipe["model"]["init_args"]
        model = ImageClassifier(backbone=args["backbone"], num_classes=args["num_classes"], in_chans=args["in_chans"],
                                norm=args["norm"], optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        size = recipe["data"]["init_args"]["image_size"]
    else:
        recipe = yaml.safe_load(EDM_RECIPE.read_text())
        args = recipe["model"]["init_args"]
        unet = SongUNet(**args["net"]["init_args"])
        model = EDM(net=unet, sigma_data=args["sigma_data"], optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
                    lr_rampup_img=args["lr_rampup_img"], ema_halflife_img=args["ema_halflife_img"],
                    num_val_samples=4, sample_batch_size=4)
        size = recipe["data"]["init_args"]["image_size"]
    return model, DigitsDataModule(batch_size=batch, image_size=size, channels=1, seed=0), size


def per_sample_loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The module's training loss per example (ImageClassifier: cross-entropy; EDM: EDM loss summed over pixels)."""
    if hasattr(model, "loss_fn"):
        return model.loss_fn(model.net, x, y).sum(dim=(1, 2, 3))
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def ghost_module(model: Any) -> Any:
    """The same module whose training_step returns per-sample losses (what ghost clipping needs)."""
    base = type(model)

    class PerSample(base):  # type: ignore[misc, valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if hasattr(self, "prepare_training_batch"):  # EDM: records the batch its EMA step reads
                x, y = self.prepare_training_batch(batch)
            return per_sample_loss(self, x, y)

    model.__class__ = PerSample
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- one configuration
def forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


class PlainLoop:
    """A plain PyTorch training loop of ``net``: non-private (``mode="none"``) or through opacus directly
    (``PrivacyEngine.make_private(wrap_model=False)``; ghost: ``DPTensorFastGradientClipping``, two backward passes).
    :meth:`step` runs one step and returns its time scaled to ``--batch`` examples (``None`` for an empty batch)."""

    def __init__(self, net: str, mode: str, args: argparse.Namespace) -> None:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        self.mode, self.args = mode, args
        self.model, dm, _ = build(net, args.batch)
        dm.setup("fit")
        self.model = self.model.to(args.device).train()
        optimizer = self.model.configure_optimizers()
        self.optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        loader = DataLoader(dm.train_dataset, batch_size=args.batch, shuffle=True, drop_last=True)
        self.hooks = None
        if mode != "none":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = PrivacyEngine(accountant="prv")
                out = engine.make_private(module=self.model.net, optimizer=self.optimizer, data_loader=loader,
                                          noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=True,
                                          grad_sample_mode=mode, wrap_model=False,
                                          criterion=torch.nn.CrossEntropyLoss())
            self.hooks, self.optimizer, loader = out[0], out[1], out[-1]
        self.batches = forever(loader)
        self.is_edm = hasattr(self.model, "update_ema")

    def step(self) -> float | None:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        x, y = next(self.batches)
        x, y = x.to(self.args.device), y.to(self.args.device)
        sync(self.args.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            losses = per_sample_loss(self.model, x, y)
            if self.mode == "ghost":
                DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "mean").backward()
            else:
                losses.mean().backward()
            self.optimizer.step()
            if self.is_edm:  # EDM's EMA update, as in its optimizer_step
                self.model.update_ema(batch_images=len(x))
        sync(self.args.device)
        return (time.perf_counter() - t0) * self.args.batch / len(x) if len(x) else None


def run_pair(net: str, mode: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """``Trainer.fit`` of plpriv's module (with ``DPSGD(dataset_size=48, grad_sample_mode=mode)`` unless ``mode="none"``) hosting the
    plain loops: each Lightning step is timed between its batch-start and batch-end hooks, and next to it (before it
    on even steps, after it on odd ones, in reversed order) one step of a plain non-private loop and, for a private
    mode, one of the plain opacus loop. Returns per-step times (ms, scaled to ``--batch``) of every runner, paired by
    index (a pair is dropped when a Poisson batch is empty)."""
    from lightning.pytorch import Callback, Trainer

    from plpriv.callbacks import DPSGD

    guests = {"plain": PlainLoop(net, "none", args)}
    if mode != "none":
        guests["plain+opacus"] = PlainLoop(net, mode, args)
    model, dm, _ = build(net, args.batch)
    if mode == "ghost":
        model = ghost_module(model)
    times: dict[str, list[float]] = {"lightning": [], **{name: [] for name in guests}}
    peaks: dict[str, float] = {name: 0.0 for name in times}

    def timed(name: str, fn: Any) -> float | None:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = fn()
        if args.device.startswith("cuda"):
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
        return t

    class Alternate(Callback):  # last in the list: its batch-end hook runs after DPSGD's
        def __init__(self) -> None:
            self.step, self.row = 0, {}

        def run_guests(self, reverse: bool) -> None:
            for name, loop in (reversed(guests.items()) if reverse else guests.items()):
                self.row[name] = timed(name, loop.step)

        def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            self.row = {}
            if self.step % 2 == 0:
                self.run_guests(reverse=False)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            self.n = len(batch[0])
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Trainer, *a: Any) -> None:
            sync(args.device)
            self.row["lightning"] = (time.perf_counter() - self.t0) * args.batch / self.n if self.n else None
            if args.device.startswith("cuda"):
                peaks["lightning"] = max(peaks["lightning"], torch.cuda.max_memory_allocated() / 2**20)
            if self.step % 2 == 1:
                self.run_guests(reverse=True)
            if self.step >= args.warmup and all(t is not None for t in self.row.values()):
                for name, t in self.row.items():
                    times[name].append(1e3 * t)
            self.step += 1

    callbacks: list[Callback] = [] if mode == "none" else [
        DPSGD(dataset_size=48, max_grad_norm=CLIP, noise_multiplier=SIGMA, grad_sample_mode=mode, seed=0, target_delta=1e-5)
    ]
    trainer = Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                      max_steps=args.warmup + args.steps, callbacks=[*callbacks, Alternate()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=args.out)
    trainer.fit(model, dm)
    if not args.device.startswith("cuda"):  # CPU: one peak RSS for the whole process (all runners)
        peaks = dict.fromkeys(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    return {"times": times, "peak_mb": peaks}  # type: ignore[dict-item]


def one(args: argparse.Namespace) -> None:
    net, mode = args.one
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    result = {"net": net, "mode": mode, **run_pair(net, mode, args)}
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver
def timing(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One process per (net, mode), ``--repeats`` rounds; per-step times pooled over rounds."""
    results: dict[tuple[str, str], dict[str, Any]] = {}
    base = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch), "--threads",
            str(args.threads), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for _ in range(args.repeats):
        for net in args.nets:
            steps, warmup = (args.edm_steps, args.edm_warmup) if net == "edm" else (args.steps, args.warmup)
            for mode in ("none", *args.modes):
                cmd = [*base, "--steps", str(steps), "--warmup", str(warmup), "--one", net, mode]
                proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stdout[-3000:], file=sys.stderr)
                    raise RuntimeError(f"{net}/{mode} failed")
                result = json.loads(line[7:])
                print(f"{net:10s} {mode:9s} " + "  ".join(
                    f"{name} {statistics.median(t):.1f} ms" for name, t in result["times"].items()), flush=True)
                if (net, mode) in results:
                    for name, t in result["times"].items():
                        results[(net, mode)]["times"][name] += t
                else:
                    results[(net, mode)] = result
    return list(results.values())


def paired(a: list[float], b: list[float]) -> str:
    """Median and quartiles of the per-step ratios a_i / b_i."""
    r = [x / y for x, y in zip(a, b)]
    q1, q2, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0],) * 3
    return f"{q2:.3f} [{q1:.2f}-{q3:.2f}]"


def timing_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {(r["net"], r["mode"]): r for r in results}
    mem = "peak alloc MB" if args.device.startswith("cuda") else "peak RSS MB (process, all runners)"
    med = statistics.median
    threads = f" ({args.threads} threads)" if args.device == "cpu" else ""
    rows = [f"device {args.device}{threads}, logical batch {args.batch}, {args.steps} paired steps (EDM: {args.edm_steps}) x "
            f"{args.repeats} round(s) after {args.warmup} (EDM: {args.edm_warmup}) warm-up, sigma={SIGMA}, C={CLIP}; "
            "ms per step are medians; ratios are medians [quartiles] of per-step ratios between runs alternated "
            "step by step in one process",
            "",
            "| net | grad_sample_mode | plain ms | plain+opacus ms | Lightning ms | Lightning+DPSGD ms "
            "| DP/non-DP plain | DP/non-DP Lightning | DPSGD / plain opacus (goal <= 1.05) "
            f"| Lightning / plain, non-private | {mem} |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for net in args.nets:
        t0 = by[(net, "none")]["times"]
        lightning_over_plain = med([x / y for x, y in zip(t0["lightning"], t0["plain"])])
        rows.append(f"| {net} | non-private | {med(t0['plain']):.1f} | | {med(t0['lightning']):.1f} | | | | "
                    f"| {paired(t0['lightning'], t0['plain'])} | {by[(net, 'none')]['peak_mb']['lightning']:.0f} |")
        for mode in args.modes:
            r = by[(net, mode)]
            t = r["times"]
            # Lightning DP / Lightning non-DP through the plain non-private loop run next to both.
            dp_lightning = med([x / y for x, y in zip(t["lightning"], t["plain"])]) / lightning_over_plain
            rows.append(f"| {net} | {mode} | {med(t['plain']):.1f} | {med(t['plain+opacus']):.1f} | "
                        f"| {med(t['lightning']):.1f} | {paired(t['plain+opacus'], t['plain'])} | {dp_lightning:.2f} "
                        f"| {paired(t['lightning'], t['plain+opacus'])} | | {r['peak_mb']['lightning']:.0f} |")
    return "\n".join(rows)


def accuracy(out: Path, lrs: dict[str, float]) -> str:
    """Train recipes/classifier/digits_dp.yaml at epsilon 1, 3, 8 and without DP (DPSGD removed); the SGD learning
    rate per setting is ``lrs``: for DP the best of {0.1, 0.3, 1.0} by validation accuracy in a sweep; without DP
    0.05 (unclipped, noiseless gradients are larger: 0.3 diverges)."""
    from lightning.pytorch import seed_everything

    from plpriv.callbacks import DPSGD
    from plpriv.cli import PlprivCLI

    # The released model is the best-validation checkpoint: selected on data DP-SGD never trains on, it is
    # post-processing of the whole run, whose epsilon (after all steps) is the one reported.
    rows = ["| run | lr | epsilon of the run (delta=1e-5) | noise multiplier | steps | val acc (best ckpt) | test acc "
            "| time s |", "|---|---|---|---|---|---|---|---|"]
    for name in ("non-private", "1", "3", "8"):
        lr = lrs[name]
        cli_args = ["-c", str(DP_RECIPE), f"--trainer.default_root_dir={out / name}",
                    f"--model.optimizer.init_args.lr={lr}",
                    f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name=eps_{name}",
                    "--trainer.enable_progress_bar=false"]
        if name != "non-private":
            cli_args.append(f"--trainer.callbacks.init_args.target_epsilon={float(name)}")
        cli = PlprivCLI(args=cli_args, run=False)
        seed_everything(0)
        trainer, model, dm = cli.trainer, cli.model, cli.datamodule
        dp = next(c for c in trainer.callbacks if isinstance(c, DPSGD))
        if name == "non-private":
            trainer.callbacks.remove(dp)
        t0 = time.time()
        trainer.fit(model, dm)
        elapsed = time.time() - t0
        spent = "-" if name == "non-private" else f"{dp.get_epsilon():.3f}"  # before the checkpoint reload below
        best = trainer.checkpoint_callback.best_model_path or None
        val = trainer.validate(model, dm, ckpt_path=best, verbose=False)[0]["val/acc"]
        test = trainer.test(model, dm, ckpt_path=best, verbose=False)[0]["test/acc"]
        sigma = "-" if name == "non-private" else f"{dp.effective_noise_multiplier:.3f}"
        rows.append(f"| {name} | {lr:g} | {spent} | {sigma} | {trainer.global_step} | {val:.4f} | {test:.4f} "
                    f"| {elapsed:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        one(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    if not args.skip_timing:
        results = timing(args, out)
        (out / "timing.json").write_text(json.dumps(results, indent=1))
        report.append(timing_table(results, args))
    if args.accuracy:
        report.append(accuracy(out, dict(zip(("non-private", "1", "3", "8"), args.lrs))))
    text = "\n\n".join(report)
    (out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
