"""The static text of ``plpriv --help`` (no imports: the entry point prints it without loading torch)."""

from __future__ import annotations

__all__ = ["SUBCOMMANDS", "print_top_level_help"]

# One line per subcommand for `plpriv --help`; tests check that it covers LightningCLI's subcommands and `audit`.
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model from a recipe (plus callback fragments); --ckpt_path last resumes a run",
    "validate": "one pass over the validation split from a checkpoint (logs into <run dir>/validate/)",
    "test": "one pass over the test split from a checkpoint (logs into <run dir>/test/)",
    "predict": "predictions from a checkpoint, e.g. EDM samples as PNG grids and .npz (into <run dir>/predict/)",
    "audit": "empirical epsilon lower bounds of DP-SGD with canaries (resumable runner, recipes/audit/*.yaml)",
    "unlearn": "machine unlearning (COLA and baselines) from a checkpoint, with a report (recipes/unlearning/*.yaml)",
    "censoring": "censored sampling: label samples, train reward models, rate (then predict with guidance.yaml)",
}


def print_top_level_help() -> None:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, line in SUBCOMMANDS.items()]
    print("usage: plpriv {" + ",".join(SUBCOMMANDS) + "} ...\n\nplpriv: privacy-aware training with PyTorch"
          " Lightning, driven by YAML recipes.\n\nsubcommands:\n" + "\n".join(lines)
          + "\n\n`plpriv SUBCOMMAND --help` shows a subcommand's options;"
          " `plpriv fit -c recipes/classifier/digits.yaml` trains a digits classifier in ~30 s.")
