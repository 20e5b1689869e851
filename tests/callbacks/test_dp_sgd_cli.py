"""A user's own LightningModule (not from plpriv) trains privately with DPSGD stacked from YAML via the plpriv CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from _helpers import ROOT, run_plpriv

from plpriv.callbacks import DPSGD
from plpriv.cli import PlprivCLI

USER_CONFIG = """
seed_everything: 0
trainer:
  max_steps: 6
  accelerator: cpu
  devices: 1
  log_every_n_steps: 2
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: user, version: ""}}
model:
  class_path: _dp_toy.ToyClassifier
  init_args: {{lr: 0.5}}
data:
  class_path: _dp_toy.ToyData
  init_args: {{n: 48, batch_size: 8}}
"""


def test_user_module_trains_privately_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "user.yaml"
    config.write_text(USER_CONFIG.format(root=tmp_path))
    fragment = ROOT / "callbacks" / "dp_sgd.yaml"
    proc = run_plpriv(
        ["fit", "-c", str(config), "-c", str(fragment), "--trainer.callbacks.init_args.target_epsilon", "5",
         "--trainer.callbacks.init_args.accountant", "rdp",  # rdp: fast; the accountants are tested elsewhere
         "--trainer.callbacks.init_args.dataset_size", "48",  # the user's public size (add/remove: N itself unread)
         "--trainer.callbacks.init_args.target_delta", "null"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "calibrated noise_multiplier" in proc.stdout and "DPSGD: 6 steps" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "user" / "dp_sgd" / "metrics.csv")))
    eps = [(int(r["step"]), float(r["dp/epsilon"])) for r in rows if r.get("dp/epsilon")]
    assert len(eps) >= 3 and all(b > a for (_, a), (_, b) in zip(eps, eps[1:]))  # logged, increasing
    assert 0 < eps[-1][1] <= 5.0
    deltas = [float(r["dp/delta"]) for r in rows if r.get("dp/delta")]
    assert deltas and all(math.isclose(d, 48**-1.1, rel_tol=1e-6) for d in deltas)  # target_delta: null -> 1/dataset_size^1.1
    assert all(math.isclose(float(r["dp/sample_rate"]), 1 / 6, rel_tol=1e-6) for r in rows if r.get("dp/sample_rate"))
    assert (tmp_path / "user" / "dp_sgd" / "dp_epsilon.png").is_file()  # the fragment gives DP runs their own dir


@pytest.mark.parametrize(
    "recipe",
    ["recipes/classifier/digits_dp.yaml", pytest.param("recipes/edm/digits_lora_dp.yaml", marks=pytest.mark.slow)],
)
def test_dp_recipes_train_and_account(tmp_path: Path, recipe: str) -> None:
    cli = PlprivCLI(
        args=["-c", str(ROOT / recipe), "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"],
        run=False,
    )
    (dp,) = [c for c in cli.trainer.callbacks if isinstance(c, DPSGD)]
    assert dp.target_delta == 1e-5 and dp.target_epsilon is not None
    cli.trainer.fit(cli.model, cli.datamodule)
    # max_steps=2 is the whole plan here: the noise was calibrated so that these 2 steps spend the budget
    assert dp.steps == 2 and dp.target_epsilon - 0.05 <= dp.get_epsilon() <= dp.target_epsilon
