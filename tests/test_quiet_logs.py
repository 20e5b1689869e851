"""A normal recipe run prints no warning the user cannot act on.

* the logging interval of every embedded-data recipe fits in one epoch (Lightning warns otherwise), checked against
  the number of batches its own datamodule yields;
* the README's first command, run through the real console script (shrunk to two steps, same recipe otherwise),
  prints no warning at all: not the EMA copy's "modules in eval mode", not Lightning's LeafSpec deprecation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from plpriv.cli import PlprivCLI

from _helpers import ROOT, run_plpriv

# recipes whose data is embedded (no download, no user folder); the CIFAR-10 recipes log every 100 of 97 x 8 steps
EMBEDDED = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml")
    if "trainer" in (yaml.safe_load(p.read_text()) or {}) and "cifar10" not in p.name and "sd_finetune" not in p.name
)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["plpriv"])


@pytest.mark.parametrize("recipe", EMBEDDED, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_logging_interval_fits_in_an_epoch(recipe: Path, tmp_path: Path) -> None:
    cli = PlprivCLI(args=["-c", str(recipe), "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.logger", "false"], run=False)
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    batches = len(data.train_dataloader())
    # Lightning warns when log_every_n_steps > batches per epoch (a DP recipe's Poisson loader has as many batches)
    assert cli.trainer.log_every_n_steps <= batches, (
        f"{recipe.name}: log_every_n_steps={cli.trainer.log_every_n_steps} but an epoch has {batches} batches")


# a warning line: Lightning's "file.py:N: message" format, or a category name, or the known offenders' words
WARNING = re.compile(r"^\S+\.py:\d+: |Warning|deprecated|in eval mode")


def test_readme_command_prints_no_warning(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]  # the README's opening commands
    command = re.search(r"plpriv fit -c (\S+)", block)
    assert command, "the README's first code block should hold the quickstart command"
    net = "--model.init_args.net.init_args."
    proc = run_plpriv(["fit", "-c", str(ROOT / command.group(1)), "--trainer.max_steps", "2",
                       f"{net}model_channels", "8", f"{net}lora_mlp", "[8]", "--trainer.enable_progress_bar",
                       "false"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = re.compile(r"^\s*\d+\s+Modules in (train|eval) mode")  # the model summary table, not a warning
    warnings = [line for line in proc.stdout.splitlines() if WARNING.search(line) and not summary.match(line)]
    assert not warnings, "\n".join(warnings)


def test_resume_prints_no_warning(tmp_path: Path) -> None:
    recipe = str(ROOT / "recipes" / "classifier" / "digits.yaml")
    tiny = ["--data.init_args.image_size", "8", "--model.init_args.backbone_kwargs", "{width: 4}",
            "--trainer.enable_progress_bar", "false"]
    first = run_plpriv(["fit", "-c", recipe, "--trainer.max_epochs", "1", *tiny], cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:]
    resumed = run_plpriv(["fit", "-c", recipe, "--trainer.max_epochs", "2", "--ckpt_path", "last", *tiny],
                         cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Restored all states" in resumed.stdout or "Restoring states" in resumed.stdout  # it did resume
    summary = re.compile(r"^\s*\d+\s+Modules in (train|eval) mode")
    warnings = [line for line in resumed.stdout.splitlines() if WARNING.search(line) and not summary.match(line)]
    assert not warnings, "\n".join(warnings)
