"""Benchmark: cost of DP-SGD, and of the DPSGD callback over opacus used directly.

One run measures, for the same network, data and logical batch (Poisson batches of expected size ``--batch`` for the
private runs, fixed batches of that size otherwise), the median time of a training step (forward, backward,
clipping, noise, optimizer step; data loading excluded), scaled to ``--batch`` examples (Poisson batch sizes vary
from step to step and run to run), and the peak memory:

* ``plain``      a plain PyTorch loop, non-private;
* ``plain+opacus``  the same loop with opacus' ``PrivacyEngine.make_private(wrap_model=False)`` (hooks / functorch) or
  ghost clipping (``DPTensorFastGradientClipping``: two backward passes);
* ``lightning``  ``Trainer.fit`` of plpriv's module (ImageClassifier, EDM), non-private;
* ``lightning+DPSGD``  the same with ``plpriv.callbacks.DPSGD``.

Networks: ``classifier`` = plpriv's SmallCNN on 32x32 digits (recipes/classifier/digits.yaml), ``edm`` = the
SongUNet with LoRA attention of recipes/edm/digits_lora.yaml on 16x16 digits (EDM loss, EMA update each step in
both loops). Ghost clipping needs per-sample losses: for the Lightning runs the modules are subclassed to return
them (``training_step`` -> loss per example).

Reported ratios: DP / non-private within each framework, callback / plain opacus (goal <= 1.05), and the overhead
of the callback net of Lightning's own overhead: (lightning+DPSGD / lightning) / (plain+opacus / plain).
Every configuration runs in its own process, so peak memory is per configuration (CUDA: max allocated; CPU: peak
RSS of the process, which includes ~0.5 GB of Python/torch).

``--accuracy`` also trains recipes/classifier/digits_dp.yaml at epsilon 1, 3, 8 (delta 1e-5) and without DP and
reports validation and test accuracy.

    python benchmarks/dp_overhead.py --accuracy               # timing and accuracy tables (CPU: ~40 min)
    python benchmarks/dp_overhead.py                          # timing table only (CPU: ~20 min)
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
from itertools import cycle
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
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--edm-steps", type=int, default=5, help="timed steps for the EDM network (slow on CPU)")
    p.add_argument("--edm-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations; each reports its fastest round (for shared, noisy machines)")
    p.add_argument("--accuracy", action="store_true", help="also train the DP digits recipe at epsilon 1, 3, 8")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--lrs", type=float, nargs=4, default=[0.05, 0.1, 0.3, 0.3],
                   metavar=("NONDP", "EPS1", "EPS3", "EPS8"), help="SGD learning rates for the accuracy runs")
    p.add_argument("--one", nargs=3, metavar=("NET", "RUNNER", "MODE"), help=argparse.SUPPRESS)
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
            if hasattr(self, "_global_batch"):
                self._global_batch = len(x)  # EDM's EMA step reads it
            return per_sample_loss(self, x, y)

    model.__class__ = PerSample
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- one configuration
def run_plain(net: str, mode: str, args: argparse.Namespace) -> list[float]:
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    from torch.utils.data import DataLoader

    model, dm, _ = build(net, args.batch)
    dm.setup("fit")
    model = model.to(args.device).train()
    module = model.net
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    loader = DataLoader(dm.train_dataset, batch_size=args.batch, shuffle=True, drop_last=True)
    hooks = None
    if mode != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
            out = engine.make_private(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
                                      max_grad_norm=CLIP, poisson_sampling=True, grad_sample_mode=mode,
                                      wrap_model=False, criterion=torch.nn.CrossEntropyLoss())
        hooks, optimizer, loader = out[0], out[1], out[-1]
    times = []
    is_edm = hasattr(model, "update_ema")
    for step, (x, y) in zip(range(args.warmup + args.steps), cycle(loader)):
        x, y = x.to(args.device), y.to(args.device)
        sync(args.device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses = per_sample_loss(model, x, y)
        if mode == "ghost":
            DPTensorFastGradientClipping(hooks, optimizer, losses, "mean").backward()
        else:
            losses.mean().backward()
        optimizer.step()
        if is_edm:  # EDM's EMA update, as in its optimizer_step
            model._global_batch = len(x)
            model.update_ema()
        sync(args.device)
        if step >= args.warmup and len(x):
            times.append((time.perf_counter() - t0) * args.batch / len(x))
    return times


def run_lightning(net: str, mode: str, args: argparse.Namespace) -> list[float]:
    from lightning.pytorch import Callback, Trainer

    from plpriv.callbacks import DPSGD

    model, dm, _ = build(net, args.batch)
    if mode == "ghost":
        model = ghost_module(model)
    times: list[float] = []

    class StepTimer(Callback):  # last in the list: its batch-end hook runs after DPSGD's
        def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            sync(args.device)
            self.n = len(batch[0])
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Trainer, *a: Any) -> None:
            sync(args.device)
            if trainer.global_step > args.warmup and self.n:
                times.append((time.perf_counter() - self.t0) * args.batch / self.n)

    callbacks: list[Callback] = [] if mode == "none" else [
        DPSGD(max_grad_norm=CLIP, noise_multiplier=SIGMA, grad_sample_mode=mode, seed=0, target_delta=1e-5)
    ]
    trainer = Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                      max_steps=args.warmup + args.steps, callbacks=[*callbacks, StepTimer()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=args.out)
    trainer.fit(model, dm)
    return times


def one(args: argparse.Namespace) -> None:
    net, runner, mode = args.one
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = (run_plain if runner == "plain" else run_lightning)(net, mode, args)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"net": net, "runner": runner, "mode": mode, "median_ms": 1e3 * statistics.median(times),
              "mean_ms": 1e3 * statistics.fmean(times), "steps": len(times), "peak_mb": peak}
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver
def timing(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    base = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch), "--threads",
            str(args.threads), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for _ in range(args.repeats):
        for net in args.nets:
            steps, warmup = (args.edm_steps, args.edm_warmup) if net == "edm" else (args.steps, args.warmup)
            for mode in ("none", *args.modes):
                for runner in ("plain", "lightning"):  # back to back: both see the same machine load
                    cmd = [*base, "--steps", str(steps), "--warmup", str(warmup), "--one", net, runner, mode]
                    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        print(proc.stdout[-3000:], file=sys.stderr)
                        raise RuntimeError(f"{net}/{runner}/{mode} failed")
                    result = json.loads(line[7:])
                    print(f"{net:10s} {runner:9s} {mode:9s} {result['median_ms']:9.1f} ms  {result['peak_mb']:8.0f} MB",
                          flush=True)
                    key = (net, runner, mode)
                    if key not in results or result["median_ms"] < results[key]["median_ms"]:
                        results[key] = result
    return list(results.values())


def timing_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {(r["net"], r["runner"], r["mode"]): r for r in results}
    mem = "peak alloc MB" if args.device.startswith("cuda") else "peak RSS MB"
    rows = [f"device {args.device}, logical batch {args.batch}, median of {args.steps} steps (EDM: {args.edm_steps}), "
            f"fastest of {args.repeats} round(s), sigma={SIGMA}, C={CLIP}",
            "",
            "| net | grad_sample_mode | plain ms | plain+opacus ms | Lightning ms | Lightning+DPSGD ms "
            "| DP/non-DP plain | DP/non-DP Lightning | DPSGD / plain opacus | DPSGD overhead net of Lightning "
            f"| {mem} plain+opacus | {mem} Lightning+DPSGD |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for net in args.nets:
        p0, l0 = by[(net, "plain", "none")], by[(net, "lightning", "none")]
        rows.append(f"| {net} | non-private | {p0['median_ms']:.1f} | | {l0['median_ms']:.1f} | | | | | "
                    f"| {p0['peak_mb']:.0f} | {l0['peak_mb']:.0f} |")
        for mode in args.modes:
            p, l = by[(net, "plain", mode)], by[(net, "lightning", mode)]
            ratio = l["median_ms"] / p["median_ms"]
            net_overhead = (l["median_ms"] / l0["median_ms"]) / (p["median_ms"] / p0["median_ms"])
            rows.append(f"| {net} | {mode} | | {p['median_ms']:.1f} | | {l['median_ms']:.1f} "
                        f"| {p['median_ms'] / p0['median_ms']:.2f} | {l['median_ms'] / l0['median_ms']:.2f} "
                        f"| {ratio:.3f} | {net_overhead:.3f} | {p['peak_mb']:.0f} | {l['peak_mb']:.0f} |")
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
