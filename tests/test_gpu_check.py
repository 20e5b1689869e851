"""benchmarks/gpu_check.py in its tiny CPU mode (so the GPU check cannot rot): the JSON record beside the table, the
ratios it derives, its time limits, and sanity checks that do fail (a NaN loss is reported, with exit code 1)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)  # a script, not a package: loaded from its file
SPEC.loader.exec_module(gpu_check)

ROW_KEYS = {"section", "config", "status"}
STATUSES = {"ok", "FAIL", "error", "skipped", "unsupported"}


def run(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "gpu_check.json"
    # a generous global budget: on a loaded 2-core machine nothing may be skipped for time in these tests
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--budget", "120", *extra])
    return rc, json.loads(out.read_text())


def check_record(record: dict[str, Any], sections: set[str]) -> list[dict[str, Any]]:
    assert record["schema"] == 1 and record["tiny"] is True and record["device"] == "CPU"
    assert record["peak_tflops"] is None  # no peak table for a CPU: the table says n/a
    assert record["edm_v100_img_s"] == pytest.approx(144.68, abs=0.01)  # 200 Mimg in 2 days on 8 GPUs
    rows = record["rows"]
    assert {r["section"] for r in rows} == sections
    for r in rows:
        assert ROW_KEYS <= r.keys() and r["status"] in STATUSES
        assert r.get("peak_fraction") is None
    return rows


def test_tiny_mode_train_lora_sampling_compile(tmp_path: Path) -> None:
    rc, record = run(tmp_path, "--sections", "train", "lora", "sampling", "compile")
    rows = check_record(record, {"train", "lora", "sampling", "compile"})
    assert rc == 0 and record["failures"] == 0
    assert [r["status"] for r in rows] == ["ok"] * len(rows), rows
    train = {r["precision"]: r for r in rows if r["section"] == "train"}
    assert set(train) == {"fp32", "bf16"}
    for r in rows:
        assert r["value"] > 0 and r["batch"] == 2
        if "checks" in r:
            assert r["checks"] == {"loss_finite": True, "grads_finite": True, "params_changed": True}
    for r in train.values():
        assert r["unit"] == "img/s" and r["value"] == pytest.approx(2 / r["step_s"])
        assert r["ratio"] == pytest.approx(r["value"] / record["edm_v100_img_s"])
    for r in (r for r in rows if r["section"] == "lora"):  # LoRA / no LoRA at the same precision and batch
        assert r["ratio"] == pytest.approx(r["value"] / train[r["precision"]]["value"])
    (compiled,) = (r for r in rows if r["section"] == "compile")
    assert compiled["ratio"] == pytest.approx(compiled["compiled_img_s"] / compiled["eager_img_s"])
    assert {r["precision"] for r in rows if r["section"] == "sampling"} == {"fp32", "bf16"}
    # the parameter count is the tiny net's, and the FLOPs per image count the backward pass: conv / linear
    # backward = 2 x forward (input and weight gradients), less the first layer's input gradient (data need none)
    net = gpu_check.make_precond(gpu_check.TINY_NET)
    assert record["params"] == sum(p.numel() for p in net.parameters())
    x = gpu_check.images(2, gpu_check.TINY_NET, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.ones(2))
    ratio = record["gflops_per_image"] * 1e9 / (counter.get_total_flops() / 2)
    assert 2.5 < ratio <= 3.0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "TINY mode: not a measurement" in table and table.count("\n| ") == len(rows) + 1


def test_tiny_mode_dp_section(tmp_path: Path) -> None:
    rc, record = run(tmp_path, "--sections", "dp")
    rows = check_record(record, {"dp"})
    assert rc == 0, rows
    assert [r["config"] for r in rows] == ["tiny EDM: non-private", "tiny EDM: DPSGD hooks, physical 1",
                                           "tiny EDM: DPSGD ghost, physical 1"]
    base = rows[0]["value"]
    for r in rows:
        assert r["status"] == "ok" and r["unit"] == "ms/step" and r["value"] > 0, r
        assert r["checks"] == {"loss_finite": True, "grads_finite": True, "params_changed": True}
    for r in rows[1:]:
        assert r["ratio"] == pytest.approx(r["value"] / base)


def test_nan_loss_is_reported_as_failure(tmp_path: Path) -> None:
    rc, record = run(tmp_path, "--sections", "train", "--inject-nan")
    rows = check_record(record, {"train"})
    assert rc == 1 and record["failures"] == len(rows) == 2
    for r in rows:
        assert r["status"] == "FAIL" and r["checks"]["loss_finite"] is False and r["checks"]["grads_finite"] is False
        assert "loss_finite" in r["note"]
    assert (tmp_path / "gpu_check.md").read_text().count("| FAIL: not loss_finite") == 2


def test_global_deadline_skips_instead_of_failing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--budget", "0.001",
                         "--sections", "train", "sampling", "compile"])
    rows = check_record(json.loads(out.read_text()), {"train", "sampling", "compile"})
    assert rc == 0 and {r["status"] for r in rows} == {"skipped"}


def test_peak_table_by_device_name() -> None:
    h100 = gpu_check.peak_for("NVIDIA H100 80GB HBM3")
    assert h100 == {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}
    assert gpu_check.peak_for("NVIDIA H200") == h100  # same compute as the H100 SXM
    assert gpu_check.peak_for("Tesla T4") is None  # unknown devices: n/a, never a guess


def test_compile_section_in_a_child_process(tmp_path: Path) -> None:
    """The GPU's way to run the compile section (a child process with its own timeout), on the tiny net."""
    rc, record = run(tmp_path, "--sections", "compile", "--compile-in-child")
    (row,) = check_record(record, {"compile"})
    assert rc == 0 and row["status"] == "ok", row
    assert row["ratio"] == pytest.approx(row["compiled_img_s"] / row["eager_img_s"])
    assert row["checks"] == {"loss_finite": True, "grads_finite": True, "params_changed": True}


def test_largest_batch_steps_down_on_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = []

    def fake_steps(ck: Any, master: Any, cfg: Any, batch: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
        tried.append(batch)
        if batch > 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if batch == 64:
            raise RuntimeError("something else")
        return {"step_s": 1.0}

    monkeypatch.setattr(gpu_check, "train_steps", fake_steps)
    ck = gpu_check.Check(gpu_check.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path / "g.json")]))
    assert gpu_check.largest_batch(ck, None, {}, "bf16", 1.0, (512, 256, 128, 64)) == (128, {"step_s": 1.0}, "")
    assert tried == [512, 256, 128]
    batch, result, why = gpu_check.largest_batch(ck, None, {}, "bf16", 1.0, (512, 64))
    assert (batch, result) == (64, None) and why == "RuntimeError: something else"  # not an OOM: reported
    assert gpu_check.largest_batch(ck, None, {}, "bf16", 1.0, (512, 256))[1:] == (None, "OOM down to batch 256")
