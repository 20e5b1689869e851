"""`plpriv --help` lists every subcommand; `plpriv SUB --help` opens with plpriv's guidance (real console script)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from _helpers import ROOT

PLPRIV = Path(sys.executable).parent / "plpriv"  # the installed console script


def _plpriv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PLPRIV), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_top_level_help_lists_every_subcommand_once():
    result = _plpriv("--help")
    assert result.returncode == 0, result.stderr
    runners = {p.stem for p in (ROOT / "plpriv" / "runners").glob("*.py") if "_" not in p.stem}  # audit, unlearn, ...
    expected = set(LightningCLI.subcommands()) | runners  # Lightning's own and plpriv's runners
    lines = [line for line in result.stdout.splitlines() if re.match(r"^  \w+  +\S", line)]
    listed = [line.split()[0] for line in lines]
    assert sorted(listed) == sorted(expected), result.stdout
    assert all(len(line) <= 120 for line in lines)  # one line each


def test_no_arguments_shows_the_subcommands_and_fails():
    result = _plpriv()
    assert result.returncode == 2
    assert "audit" in result.stdout and "predict" in result.stdout


def test_fit_help_starts_with_plpriv_guidance_then_lightning_options():
    result = _plpriv("fit", "--help")
    assert result.returncode == 0, result.stderr
    head, _, rest = result.stdout.partition("Lightning's options follow.")
    assert head.startswith("plpriv fit:")
    for pointer in ("recipes/", "-c callbacks/", "--model.help", "--ckpt_path last", "plpriv.modules.EDM",
                    "plpriv.data.DigitsDataModule", "plpriv.callbacks.DPSGD"):
        assert pointer in head, pointer
    assert "--trainer.max_epochs" in rest and "--ckpt_path" in rest


def test_predict_help_has_its_own_guidance():
    result = _plpriv("predict", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("plpriv predict:") and "--ckpt_path" in result.stdout.split("\n\n")[1]


def test_the_advertised_model_help_works():
    result = _plpriv("fit", "--model.help", "plpriv.modules.EDM")
    assert result.returncode == 0, result.stderr
    assert "--model.sigma_data" in result.stdout and "--model.init_checkpoint" in result.stdout
    # concise: the class's own arguments, not jsonargparse's list of every importable nn.Module (1,601 lines before)
    assert "torch.ao.nn" not in result.stdout and "plpriv.nets.SongUNet" in result.stdout
    assert len(result.stdout.splitlines()) < 400, len(result.stdout.splitlines())


def test_top_level_help_imports_neither_torch_nor_lightning():
    """`plpriv --help` is static text: a first-time user does not wait seconds for torch and Lightning imports
    (python -X importtime plpriv/entry.py --help; about 0.1 s against ~5 s CPU before)."""
    code = ("import sys\nfrom plpriv.entry import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nheavy = sorted(m for m in ('torch', 'lightning') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout and "subcommands:" in result.stdout
