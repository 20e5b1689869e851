"""Benchmark: float vs ternary vs fully quantized always-on face detector on synthetic sensor RAW (issue 14).

Lee et al., arXiv 2311.01001, give no widths or numbers for this setting, so this is plpriv's own shallow detector
(plpriv.nets.FaceCenterNet) on FaceScenesDataModule's RAW scenes (128x128 sRGB -> 4x64x64 packed RGGB, noise, 10-bit
ADC). It trains

* ``float``           from scratch, ``--epochs`` epochs;
* ``ternary``         TWN weights (first and last conv float), fine-tuned from the float weights, ``--ft-epochs``;
* ``ternary scratch`` the same net trained ternary from scratch, ``--epochs`` epochs;
* ``full``            every conv ternary + ``--act-bits`` PACT activations, fine-tuned from float, ``--ft-epochs``;

and prints test mAP@0.5 (torchmetrics), the packed model size in bytes (plpriv.export.pack_ternary, 2 bits/weight
and 5 weights/byte; float: fp32; norms and first/last float convs fp32), the ratio to float, MACs per frame and CPU
latency per frame (batch 1, median of ``--repeats``, ``--threads`` threads) of the model as unpacked from its packed
file. Latency runs the ternary weights through PyTorch's dense float convs (no ternary kernels), so it shows the
network's cost, not a ternary speed-up. Boxes on test scenes go to ``<out>/<variant>.png``, the numbers to
``<out>/results.json``.

    python benchmarks/ternary.py            # 1 thread: ~8 min idle, ~20 min on a loaded 2-core machine

Measured once (2026-12-01, 1 thread, 2-core machine under load average ~9, so latencies are noisy):
float 0.711 mAP@0.5, 394,516 B; ternary (fine-tuned) 0.734, 32,532 B (12.1x, 2 bits) / 27,695 B (14.2x, base 3);
ternary from scratch 0.749; fully quantized (4-bit PACT) 0.683 (96 %), 29,276 B (13.5x) / 24,395 B (16.2x);
25.4 M MACs per 4x64x64 RAW frame, ~10 ms per frame for all (dense float convs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from plpriv.data import FaceScenesDataModule  # noqa: E402
from plpriv.export import layer_report, pack_ternary, unpack_ternary  # noqa: E402
from plpriv.modules import TernaryFaceDetector  # noqa: E402
from plpriv.modules.face_detector import draw_detections  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument("--widths", type=int, nargs=5, default=[16, 32, 64, 64, 64])
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default="runs/bench_ternary")
    p.add_argument("--skip-scratch", action="store_true", help="leave out the ternary-from-scratch run")
    return p.parse_args(argv)


def fit(dm: FaceScenesDataModule, epochs: int, lr: float, **model_kwargs) -> tuple[TernaryFaceDetector, float, float]:
    seed_everything(0)
    model = TernaryFaceDetector(optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4),
                                lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
                                num_log_images=0, **model_kwargs)
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    model.test_map.reset()
    mAP = trainer.test(model, dm, verbose=False)[0]["test/map50"]
    return model.eval(), mAP, seconds


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = FaceScenesDataModule(num_train=args.num_train, batch_size=32)
    dm.setup()
    frame = torch.zeros(1, dm.in_chans, dm.input_size, dm.input_size)
    common = {"in_chans": dm.in_chans, "widths": args.widths}

    images, targets = next(iter(dm.test_dataloader()))
    results = []
    runs: dict[str, tuple[TernaryFaceDetector, float, float]] = {}
    runs["float"] = fit(dm, args.epochs, args.lr, quantization="float", **common)
    float_ckpt = out / "float_state.pt"
    torch.save({"state_dict": runs["float"][0].state_dict()}, float_ckpt)
    runs["ternary"] = fit(dm, args.ft_epochs, args.ft_lr, quantization="ternary", init_checkpoint=str(float_ckpt), **common)
    if not args.skip_scratch:
        runs["ternary scratch"] = fit(dm, args.epochs, args.lr, quantization="ternary", **common)
    runs["full"] = fit(dm, args.ft_epochs, args.ft_lr, quantization="full", act_bits=args.act_bits,
                       init_checkpoint=str(float_ckpt), **common)


    float_bytes = None
    for name, (model, mAP, seconds) in runs.items():
        rows = layer_report(model.net, frame)
        deployed = model.net
        if name == "float":
            bytes_2bit = bytes_b3 = rows[-1]["bytes"]
            float_bytes = bytes_2bit
        else:
            stem = out / name.replace(" ", "_")
            bytes_2bit = pack_ternary(model.net, f"{stem}_2bit.pt", "2bit")["payload_bytes"]
            bytes_b3 = pack_ternary(model.net, f"{stem}_base3.pt", "base3")["payload_bytes"]
            deployed = unpack_ternary(f"{stem}_2bit.pt")  # frozen ternary weights, as deployed
            with torch.no_grad():
                if not torch.equal(deployed(images[:4]), model.net(images[:4])):
                    raise RuntimeError(f"{name}: the unpacked model's outputs differ from the trained one's")
        results.append({"variant": name, "map50": mAP, "bytes_2bit": bytes_2bit, "bytes_base3": bytes_b3,
                         "ratio_2bit": float_bytes / bytes_2bit, "ratio_base3": float_bytes / bytes_b3,
                         "macs": rows[-1]["macs"], "latency_ms": latency_ms(deployed, frame, args.repeats),
                         "train_s": seconds})
        with torch.no_grad():
            preds = model.detect(images[:16])
        from torchvision.utils import save_image

        save_image(draw_detections(images[:16], preds, targets[:16]), out / f"{name.replace(' ', '_')}.png", nrow=4)

    ref = results[0]["map50"]
    print(f"\nFaceScenes RAW test split ({len(dm.test_dataset)} scenes, input {tuple(frame.shape[1:])}), "
          f"{args.threads} thread(s)")
    print(f"{'variant':<16} {'mAP@0.5':>8} {'% float':>8} {'bytes 2b':>9} {'x':>6} {'bytes b3':>9} {'x':>6} "
          f"{'MACs':>11} {'ms/frame':>9} {'train s':>8}")
    for r in results:
        print(f"{r['variant']:<16} {r['map50']:>8.3f} {100 * r['map50'] / max(ref, 1e-9):>7.1f}% {r['bytes_2bit']:>9} "
              f"{r['ratio_2bit']:>6.1f} {r['bytes_base3']:>9} {r['ratio_base3']:>6.1f} {r['macs']:>11} "
              f"{r['latency_ms']:>9.3f} {r['train_s']:>8.0f}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
