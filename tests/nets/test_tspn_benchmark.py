"""benchmarks/tspn.py end to end on a tiny 20-benchmark-format dataset the test writes (NLTCS layout, 16 variables)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _write_nltcs(folder: Path) -> None:
    """Rows of a planted chain x_k = x_{k-1} xor noise, in the standard ``nltcs.{train,valid,test}.data`` files."""
    gen = torch.Generator().manual_seed(0)
    for part, n in (("train", 300), ("valid", 60), ("test", 80)):
        x = torch.zeros(n, 16, dtype=torch.long)
        x[:, 0] = (torch.rand(n, generator=gen) < 0.5).long()
        for k in range(1, 16):
            x[:, k] = x[:, k - 1] ^ (torch.rand(n, generator=gen) < 0.1).long()
        (folder / f"nltcs.{part}.data").write_text("\n".join(",".join(map(str, row.tolist())) for row in x) + "\n")


def test_benchmark_reports_converged_rows_orders_baselines_and_learnspn(tmp_path):
    _write_nltcs(tmp_path)
    spec = importlib.util.spec_from_file_location("tspn_benchmark", ROOT / "benchmarks" / "tspn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--dataset", "nltcs", "--root", str(tmp_path), "--ranks", "2", "--orders", "raster", "hilbert",
                       "mi_chain", "--spn-epochs", "2", "--spn-repetitions", "2", "--mixture-components", "2",
                       "--learnspn-min-instances", "50", "--learnspn-p-values", "0.01", "--distill-ranks", "2",
                       "--distill-samples", "300", "--em-max-steps", "60", "--em-patience", "3", "--repeats", "1",
                       "--out", str(tmp_path / "out")])
    names = [r["model"] for r in rows]
    assert names[:5] == ["SPN (RAT-SPN)", "independent Bernoulli", "Chow-Liu tree", "Bernoulli mixture K=2",
                         "LearnSPN m=50"]
    data = [r for r in rows if r["model"] == "tSPN data"]
    assert [r["order"] for r in data] == ["raster", "mi_chain"]  # no Hilbert curve outside the pixel grid
    assert all(1 <= r["em_steps"] < 60 for r in data)  # converged before the cap
    assert {r["source"] for r in rows if r["model"] == "tSPN<-LearnSPN"} == {"LearnSPN m=50"}
    # the planted chain is a rank-2 TT: the data-trained tSPN beats the independent model by a wide margin
    indep = next(r for r in rows if r["model"] == "independent Bernoulli")
    assert max(r["test_ll"] for r in data) > indep["test_ll"] + 3
    table = (tmp_path / "out" / "tspn_nltcs.md").read_text()
    assert "| order |" in table and "LearnSPN" in table and "10x compression" in table
