"""The README's first command, measured as a new user meets it: wall and CPU time, warnings printed, sample accuracy.

One run:
  1. runs ``plpriv fit -c recipes/edm/digits_lora.yaml`` (or ``--recipe``) in a fresh empty directory, exactly as the
     README gives it, and records wall time and the CPU time of the process tree (``getrusage(RUSAGE_CHILDREN)``);
  2. lists every warning line the run printed (a normal run should print none);
  3. trains an independent classifier on the *real* digits' training split at the recipe's resolution (plpriv's
     ``ImageClassifier`` small CNN; its accuracy on the real test split is printed as a sanity check);
  4. draws ``--num-samples`` class-conditional samples (class ``i % 10``) from the run's ``last.ckpt`` (EMA weights,
     the recipe's sampler) and reports how often the classifier labels a sample with its requested class.

  python benchmarks/quickstart.py                      # the README's command 1, ~5 min on an idle 2-core machine
  python benchmarks/quickstart.py --workdir runs/qs --skip-fit   # only re-score an existing run
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WARNING = re.compile(r"(Warning|warn\(|deprecated|Found \d+ module)", re.IGNORECASE)


def run_fit(recipe: Path, workdir: Path, extra: list[str]) -> tuple[float, float, list[str]]:
    """Run the CLI like a user (fresh directory); return (wall s, CPU s of the process tree, warning lines)."""
    exe = shutil.which("plpriv") or f"{sys.executable} -m plpriv.cli"
    cmd = exe.split() + ["fit", "-c", str(recipe), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(workdir / "fit.log", "w") as log:
        proc = subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = (workdir / "fit.log").read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"fit failed (exit {proc.returncode}); see {workdir / 'fit.log'}:\n{text[-3000:]}")
    # progress bars redraw with \r: split on both so each warning is one line
    warnings = sorted({ln.strip() for ln in re.split(r"[\r\n]", text) if WARNING.search(ln)})
    return wall, cpu, warnings


def train_classifier(image_size: int, seed: int, epochs: int) -> tuple[torch.nn.Module, float]:
    """A digits classifier trained on the real training split only; returns it and its real test accuracy."""
    from lightning.pytorch import Trainer, seed_everything

    from plpriv.data import DigitsDataModule
    from plpriv.modules import ImageClassifier

    seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, image_size=image_size, channels=1, seed=0)
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group")
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    acc = float(trainer.test(model, data, verbose=False)[0]["test/acc"])
    return model.eval(), acc


@torch.no_grad()
def sample_accuracy(ckpt: Path, classifier: torch.nn.Module, num_samples: int, out_png: Path) -> tuple[float, list[float]]:
    from plpriv.modules import EDM
    from plpriv.utils.figures import save_and_log_images

    edm = EDM.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    labels = torch.arange(num_samples) % 10
    images = torch.cat([edm.sample(class_labels=labels[i: i + 250], generator=torch.Generator().manual_seed(i),
                                   num_samples=len(labels[i: i + 250])) for i in range(0, num_samples, 250)])
    pred = classifier(images.clamp(-1, 1)).argmax(1)
    save_and_log_images(None, images[:100], out_png.stem, nrow=10, directory=out_png.parent)
    per_class = [float((pred[labels == c] == c).float().mean()) for c in range(10)]
    return float((pred == labels).float().mean()), per_class


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes/edm/digits_lora.yaml"))
    p.add_argument("--workdir", default=None, help="run directory (default: a fresh temporary one)")
    p.add_argument("--skip-fit", action="store_true", help="score the existing run in --workdir")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("extra", nargs="*", help="extra CLI arguments after `--`, e.g. -- --trainer.max_epochs 5")
    args = p.parse_args()
    recipe = Path(args.recipe).resolve()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="plpriv_quickstart_"))
    workdir.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg = yaml.safe_load(recipe.read_text())
    image_size = int(cfg["data"]["init_args"]["image_size"])
    run_dir = workdir / cfg["trainer"]["default_root_dir"]
    rows = []
    if not args.skip_fit:
        wall, cpu, warnings = run_fit(recipe, workdir, args.extra)
        rows += [("fit wall time", f"{wall:.0f} s"), ("fit CPU time (all threads)", f"{cpu:.0f} s"),
                 ("load average at the end (1 min)", f"{os.getloadavg()[0]:.1f}"),
                 ("warnings printed", str(len(warnings)))]
        for w in warnings:
            print("warning:", w[:300])
    torch.manual_seed(0)
    classifier, real_acc = train_classifier(image_size, seed=0, epochs=args.classifier_epochs)
    acc, per_class = sample_accuracy(run_dir / "checkpoints" / "last.ckpt", classifier, args.num_samples,
                                     workdir / "quickstart_samples.png")
    rows += [("classifier accuracy, real test digits", f"{100 * real_acc:.1f} %"),
             (f"sample accuracy ({args.num_samples} class-conditional samples)", f"{100 * acc:.1f} %"),
             ("worst class", f"{min(range(10), key=lambda c: per_class[c])} ({100 * min(per_class):.0f} %)")]
    width = max(len(r[0]) for r in rows)
    print(f"\nquickstart: {recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe}  (run in {workdir})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  sample grid: {workdir / 'quickstart_samples.png'}")


if __name__ == "__main__":
    main()
