"""DPSGD under DDP (2 CPU processes, gloo) against the single-process run.

Facts: noise is added once (rank 0) and the clipped, noised gradient is all-reduced, so replicas stay identical;
every rank takes the same number of steps (no desynchronisation); and since all ranks draw the single-process
Poisson batch and split it, the DDP run is the single-process run up to floating-point summation order.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from _helpers import run_script
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from lightning.pytorch import Trainer
    from _dp_toy import ToyClassifier, ToyData
    from plpriv.callbacks import DPSGD

    out, devices, physical, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dp = DPSGD(dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0, seed=4, target_delta=1e-5, accountant="rdp",
               max_physical_batch_size=None if physical == "none" else int(physical), grad_sample_mode=mode)
    model = ToyClassifier(lr=0.5, norm="group", per_sample=mode == "ghost").double()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=9,
                      precision="64-true", callbacks=[dp], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, ToyData(n=40, batch_size=8))
    torch.save({"params": [p.detach() for p in model.parameters()], "steps": dp.steps, "global_step":
                trainer.global_step, "history": dp.history, "sizes": model.seen_batch_sizes},
               f"{out}/rank{trainer.global_rank}_of{devices}.pt")
    """
)


def _run(tmp_path: Path, devices: int, physical: str, mode: str) -> None:
    script = tmp_path / "ddp_dp_sgd.py"
    script.write_text(SCRIPT)
    run_script(script, [str(tmp_path), str(devices), physical, mode], tmp_path, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("physical", "mode"),
    [("none", "hooks"), pytest.param("2", "hooks", marks=pytest.mark.slow),
     pytest.param("none", "ghost", marks=pytest.mark.slow)],
)
def test_ddp_replicas_identical_and_equal_to_single_process(tmp_path: Path, physical: str, mode: str) -> None:
    _run(tmp_path, 2, physical, mode)
    _run(tmp_path, 1, physical, mode)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of1.pt")
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # replicas identical
    assert r0["steps"] == r1["steps"] == single["steps"] == 9 == r0["global_step"] == r1["global_step"]
    assert r0["history"] == single["history"]
    # each rank trained on its share of the single-process batch
    assert [a + b for a, b in zip(r0["sizes"], r1["sizes"])] == single["sizes"] or physical != "none"
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # the single-process run, up to summation order
