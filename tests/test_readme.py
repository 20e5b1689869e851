"""The README opens with the two commands, lists every recipe and fragment, and its Python example runs."""

from __future__ import annotations

import re

import pytest

from _helpers import ROOT

README = (ROOT / "README.md").read_text()


def _first_code_block() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None and README.index("```bash") < README.index("\n\n", README.index("# plpriv")) + 3
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    run, test = _first_code_block()
    assert "plpriv fit -c recipes/" in run and "pip install" in run
    assert "pytest" in test and '".[test]"' in test


def test_ci_runs_the_readme_test_command():
    _, test = _first_code_block()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "callbacks").glob("*.yaml")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_recipe_and_fragment_is_in_the_readme(path):
    name = str(path.relative_to(ROOT / ("recipes" if "recipes" in path.parts else "callbacks")))
    assert f"`{name}`" in README, f"add {name} to the README's table"


def test_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README executes as written (in a scratch directory)."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


def test_the_readme_thread_claim_holds_for_every_edm_digits_recipe():
    # README: "the EDM digits recipes set 1" (torch_threads), the cheap half of keeping its timings honest
    import yaml

    assert "the EDM digits recipes set 1" in (ROOT / "README.md").read_text()
    recipes = sorted((ROOT / "recipes" / "edm").glob("digits*.yaml"))
    assert recipes
    for path in recipes:
        assert yaml.safe_load(path.read_text()).get("torch_threads") == 1, path.name
