"""The plpriv CLI: every recipe and fragment parses, fragments append callbacks, bad recipes fail early."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from plpriv.cli import PlprivCLI, main

from _helpers import ROOT, run_plpriv

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "audit")  # audit: tests/runners
FRAGMENTS = sorted((ROOT / "callbacks").glob("*.yaml"))
BASE = ROOT / "recipes" / "classifier" / "digits.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """In-process CLI calls get their arguments from ``args``, not from pytest's own command line."""
    monkeypatch.setattr("sys.argv", ["plpriv"])


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_recipes_and_fragments():
    assert BASE in RECIPES
    assert len(FRAGMENTS) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses(recipe: Path, capsys):
    """Each recipe is a complete, valid config: class paths import, every init_arg exists with the right type."""
    config = _print_config(["-c", str(recipe)], capsys)
    assert "class_path" in config["model"] and "class_path" in config["data"]


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.name)
def test_fragment_appends_to_recipe(fragment: Path, capsys):
    """A fragment adds its callbacks after the recipe's own; none of the recipe's callbacks is lost."""
    raw = yaml.safe_load(fragment.read_text())
    assert set(raw) == {"trainer"} and "callbacks+" in raw["trainer"], (
        f"{fragment.name}: a fragment must hold `trainer: callbacks+: [...]` so that it appends"
    )
    # besides callbacks, a fragment may only rename the run's version directory (the DP fragment does)
    assert set(raw["trainer"]) - {"callbacks+"} <= {"logger"}
    assert raw["trainer"].get("logger", {"init_args": {}}).keys() == {"init_args"}
    assert set(raw["trainer"].get("logger", {"init_args": {}})["init_args"]) <= {"version"}
    added = raw["trainer"]["callbacks+"]
    added = added if isinstance(added, list) else [added]
    base = yaml.safe_load(BASE.read_text())["trainer"]["callbacks"]
    merged = _print_config(["-c", str(BASE), "-c", str(fragment)], capsys)["trainer"]["callbacks"]
    assert [c["class_path"] for c in merged] == [c["class_path"] for c in base + added]


def test_two_fragments_and_recipe_callbacks_all_reach_the_trainer(tmp_path):
    cli = PlprivCLI(
        args=[
            "-c", str(BASE),
            "-c", str(ROOT / "callbacks" / "lr_monitor.yaml"),
            "-c", str(ROOT / "callbacks" / "early_stopping.yaml"),
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ],
        run=False,
    )
    kinds = [type(c) for c in cli.trainer.callbacks]
    for expected in (ModelCheckpoint, LearningRateMonitor, EarlyStopping):
        assert expected in kinds, f"{expected.__name__} missing from {kinds}"
    best, last = [c for c in cli.trainer.callbacks if type(c) is ModelCheckpoint]
    assert best.monitor == "val/acc" and last.filename == "last"  # the recipe's own settings survived


def test_command_line_append_keeps_recipe_callbacks(capsys):
    config = _print_config(
        ["-c", str(BASE), "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"], capsys
    )
    names = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert names == ["ModelCheckpoint", "ModelCheckpoint", "LearningRateMonitor"]


def _mutated_recipe(tmp_path: Path, old: str, new: str) -> Path:
    text = BASE.read_text()
    assert old in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("batch_size: 64", "batch_sise: 64", "batch_sise"),  # typo'd init arg
        ("batch_size: 64", "batch_size: sixtyfour", "sixtyfour"),  # wrong type
        ("max_epochs: 10", "max_epoch: 10", "max_epoch"),  # typo'd trainer key
        ("plpriv.modules.ImageClassifier", "plpriv.modules.ImageClasifier", "ImageClasifier"),  # bad class path
    ],
)
def test_bad_recipe_fails_before_training_naming_the_key(tmp_path, old, new, named):
    recipe = _mutated_recipe(tmp_path, old, new)
    result = run_plpriv(["fit", "-c", str(recipe), "--trainer.default_root_dir", str(tmp_path)], cwd=tmp_path)
    assert result.returncode != 0
    assert named in result.stdout
    assert "Epoch 0" not in result.stdout and not (tmp_path / "runs").exists()  # nothing was trained or written


def test_sbatch_command_line_parses(capsys):
    """The srun line of docker/slurm.sbatch is a valid plpriv command once its shell variables are filled in."""
    script = (ROOT / "docker" / "slurm.sbatch").read_text()
    lines = script.replace("\\\n", " ").splitlines()
    (srun,) = [line for line in lines if line.strip().startswith("srun") and " plpriv " in line]
    command = srun.split(" plpriv ", 1)[1]
    values = {"RECIPE": str(BASE), "NNODES": "2", "GPUS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2"}
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), command)
    command = re.sub(r'"([^"]*)"', r"\1", command)
    args = command.split()
    assert args[0] == "fit" and "$" not in command, command
    config = _print_config(args[1:], capsys)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "4"
    assert config["trainer"]["strategy"] == "ddp"


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_threads_sets_intra_op_threads_before_the_run(tmp_path, threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        PlprivCLI(args=["-c", str(BASE), "--torch_threads", str(threads), "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(tmp_path)], run=False)
        assert torch.get_num_threads() == threads
        with pytest.raises(ValueError, match="torch_threads"):
            PlprivCLI(args=["-c", str(BASE), "--torch_threads", "0", "--trainer.logger", "false"], run=False)
    finally:
        torch.set_num_threads(before)


def test_callback_flag_reaches_the_named_callback_with_fragments_stacked(tmp_path):
    """`--trainer.callbacks.init_args.KEY` reaches only the last callback; `--callback.NAME.KEY` the one named NAME,
    with another fragment stacked after dp_sgd.yaml (issue 25)."""
    from plpriv.callbacks import DPSGD

    common = ["-c", str(BASE), "-c", str(ROOT / "callbacks" / "dp_sgd.yaml"),
              "-c", str(ROOT / "callbacks" / "lr_monitor.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = PlprivCLI(args=[*common, "--callback.DPSGD.target_epsilon", "2.5", "--callback.LearningRateMonitor"
                          ".logging_interval=epoch"], run=False)
    (dp,) = [c for c in cli.trainer.callbacks if isinstance(c, DPSGD)]
    (lr,) = [c for c in cli.trainer.callbacks if isinstance(c, LearningRateMonitor)]
    assert dp.target_epsilon == 2.5 and lr.logging_interval == "epoch"
    with pytest.raises(ValueError, match="no callback 'DPSG' in this run"):
        PlprivCLI(args=[*common, "--callback.DPSG.target_epsilon", "2"], run=False)
    with pytest.raises(ValueError, match="2 callbacks are ModelCheckpoint"):
        PlprivCLI(args=[*common, "--callback.ModelCheckpoint.monitor", "val/loss"], run=False)
    with pytest.raises(ValueError, match="target_epsilon` must be > 0"):  # the constructor checks the value
        PlprivCLI(args=[*common, "--callback.DPSGD.target_epsilon", "-1"], run=False)
