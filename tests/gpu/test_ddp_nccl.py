"""DPSGD under DDP with NCCL on two GPUs against the single-GPU run (the GPU twin of
tests/callbacks/test_dp_sgd_ddp.py, which runs gloo on CPU processes).

Facts: noise is added once (rank 0, from the engine's generator on cuda:0 in both runs) and the clipped, noised
gradient is all-reduced, so replicas stay identical; every rank takes the same number of steps; all ranks draw the
single-process Poisson batch and split it, so the DDP run is the single-GPU run up to summation order (fp64 here).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning.pytorch import Callback, Trainer
    from _dp_toy import ToyClassifier, ToyData
    from plpriv.callbacks import DPSGD

    out, devices, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dp = DPSGD(dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0, seed=4, target_delta=1e-5, accountant="rdp",
               grad_sample_mode=mode)
    model = ToyClassifier(lr=0.5, norm="group", per_sample=mode == "ghost").double()
    backend = []

    class Backend(Callback):  # while training: the process group may be gone after fit
        def on_train_start(self, trainer, module):
            dist = torch.distributed
            backend.append(dist.get_backend() if dist.is_available() and dist.is_initialized() else "none")

    trainer = Trainer(accelerator="gpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=9,
                      precision="64-true", callbacks=[dp, Backend()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=out)
    trainer.fit(model, ToyData(n=40, batch_size=8))
    torch.save({"params": [p.detach().cpu() for p in model.parameters()], "steps": dp.steps, "history": dp.history,
                "global_step": trainer.global_step, "sizes": model.seen_batch_sizes, "backend": backend[0]},
               f"{out}/rank{trainer.global_rank}_of{devices}.pt")
    """
)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_nccl_replicas_identical_and_equal_to_single_gpu(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "ddp_nccl_dp_sgd.py"
    script.write_text(SCRIPT)
    for devices in (2, 1):
        run_script(script, [str(tmp_path), str(devices), mode], tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of1.pt")
    assert r0["backend"] == r1["backend"] == "nccl"
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # replicas identical
    assert r0["steps"] == r1["steps"] == single["steps"] == 9 == r0["global_step"] == r1["global_step"]
    assert r0["history"] == single["history"]
    assert [a + b for a, b in zip(r0["sizes"], r1["sizes"])] == single["sizes"]  # each rank its share
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # the single-GPU run, up to summation order
