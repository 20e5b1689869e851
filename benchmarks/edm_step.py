"""EDM speed benchmark: Lightning training step vs a plain PyTorch loop, LoRA overhead, sampling throughput.

One run measures, for the same network, batch and settings:
  * the training step time through ``plpriv.modules.EDM`` + ``Trainer`` and through a plain PyTorch loop doing EDM's
    step (sigma/noise draw, preconditioned loss, backward, nan_to_num, Adam, lr ramp, EMA); ratio should be <= 1.05;
  * the LoRA overhead: plain-loop step time with ``use_lora`` on vs off;
  * sampling throughput: images/s of EDM's Heun sampler at 35 NFE (18 steps), with and without LoRA.
Both training paths read batches from the same in-memory DataLoader; rounds are interleaved and medians reported, to
be robust on a shared machine. Not a test: run on demand.

  python benchmarks/edm_step.py                          # CPU: the digits quickstart network, batch 64
  python benchmarks/edm_step.py --preset cifar10 --precision bf16 --channels-last [--compile]   # one GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

PRESETS: dict[str, dict[str, Any]] = {
    # recipes/edm/digits_lora.yaml
    "digits": dict(img_resolution=16, in_channels=1, out_channels=1, label_dim=10, augment_dim=0, model_channels=32,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, lora_rank=4, lora_bases=8,
                   lora_mlp=[64, 32]),
    # recipes/edm/cifar10_cond(_lora).yaml (55.7M / 57.7M parameters)
    "cifar10": dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=128,
                    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13, lora_rank=4,
                    lora_bases=18, lora_mlp=[128, 64]),
}


def make_net(preset: str, use_lora: bool, seed: int = 0) -> torch.nn.Module:
    from plpriv.nets import SongUNet

    torch.manual_seed(seed)
    return SongUNet(**PRESETS[preset], use_lora=use_lora)


def make_loader(preset: str, batch: int, n_batches: int) -> DataLoader:
    cfg = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch * n_batches, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"], generator=g) * 2 - 1
    y = torch.randint(0, max(cfg["label_dim"], 1), (len(x),), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time per step is robust to other processes sharing the cores."""
    return time.perf_counter(), time.process_time()


def plain_steps(args: argparse.Namespace, use_lora: bool, steps: int) -> list[tuple[float, float]]:
    """EDM's training step in plain PyTorch; per-step (wall, CPU) times in s, warm-up excluded."""
    from plpriv.nets import EDMLoss, EDMPrecond

    device = torch.device(args.device)
    net = EDMPrecond(make_net(args.preset, use_lora)).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.compile:
        net.model = torch.compile(net.model)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    batch_total, nimg, times = args.batch, 0, []
    loader = make_loader(args.preset, args.batch, args.warmup + steps)
    sync(device)
    last = clock()
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(nimg / 10e6, 1.0)
        with autocast(device, args.precision):
            loss = loss_fn(net, x, y).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        with torch.no_grad():
            beta = 0.5 ** (batch_total / max(min(500_000, nimg * 0.05), 1e-8))
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.copy_(pn.detach().lerp(pe, beta))
        nimg += batch_total
        sync(device)
        now = clock()
        if i >= args.warmup:
            times.append((now[0] - last[0], now[1] - last[1]))
        last = now
    return times


def lightning_steps(args: argparse.Namespace, use_lora: bool, steps: int) -> list[tuple[float, float]]:
    """The same step through plpriv.modules.EDM and a Trainer; per-step wall times between batch starts."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from plpriv.modules import EDM

    device = torch.device(args.device)

    class Timer(Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            sync(device)
            self.stamps.append(clock())

        def on_train_end(self, trainer, module) -> None:
            sync(device)
            self.stamps.append(clock())

    class ChannelsLast(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            batch[0] = batch[0].contiguous(memory_format=torch.channels_last)

    model = EDM(make_net(args.preset, use_lora), num_val_samples=0, lr_rampup_img=10e6)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.net.model = torch.compile(model.net.model)
    timer = Timer()
    callbacks: list[Callback] = [timer] + ([ChannelsLast()] if args.channels_last else [])
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=args.warmup + steps,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=50, callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, make_loader(args.preset, args.batch, args.warmup + steps))
    s = timer.stamps
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(s[args.warmup:-1], s[args.warmup + 1:])]


@torch.no_grad()
def sampling_rate(args: argparse.Namespace, use_lora: bool) -> tuple[float, float]:
    """Images per (wall, CPU) second of the Heun sampler, 18 steps = 35 network evaluations."""
    from plpriv.nets import EDMPrecond
    from plpriv.sampling import edm_sampler

    device = torch.device(args.device)
    net = EDMPrecond(make_net(args.preset, use_lora)).to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.compile:
        net.model = torch.compile(net.model)
    cfg = PRESETS[args.preset]
    latents = torch.randn(args.sample_batch, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"], device=device)
    labels = torch.arange(args.sample_batch, device=device) % max(cfg["label_dim"], 1)
    rates = []
    for r in range(args.sample_rounds + 1):
        sync(device)
        t = clock()
        with autocast(device, args.precision):
            edm_sampler(net, latents, labels, num_steps=18)
        sync(device)
        now = clock()
        if r > 0:  # the first round warms up (and compiles)
            rates.append((args.sample_batch / (now[0] - t[0]), args.sample_batch / (now[1] - t[1])))
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="digits on CPU, cifar10 on GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each training variant")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls/convs exact on Ampere+ GPUs")
    parser.add_argument("--sample-batch", type=int, default=100)
    parser.add_argument("--sample-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-train", action="store_true", help="only measure sampling")
    args = parser.parse_args()
    args.preset = args.preset or ("cifar10" if args.device.startswith("cuda") else "digits")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = True

    results: dict[str, list[tuple[float, float]]] = {"plain": [], "lightning": [], "plain_lora": []}
    for _ in range(0 if args.skip_train else args.rounds):
        results["plain"] += plain_steps(args, use_lora=False, steps=args.steps)
        results["lightning"] += lightning_steps(args, use_lora=False, steps=args.steps)
        results["plain_lora"] += plain_steps(args, use_lora=True, steps=args.steps)
    med = {k: statistics.median(t[0] for t in v) if v else float("nan") for k, v in results.items()}
    cpu = {k: statistics.median(t[1] for t in v) if v else float("nan") for k, v in results.items()}
    rate, rate_lora = sampling_rate(args, use_lora=False), sampling_rate(args, use_lora=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"EDM step benchmark: preset={args.preset} batch={args.batch} precision={args.precision} "
          f"channels_last={args.channels_last} compile={args.compile} device={device} "
          f"({args.rounds} rounds x {args.steps} steps, medians)")
    rows = [
        ("train step, plain PyTorch (ms)", f"{med['plain'] * 1e3:.1f}", f"{cpu['plain'] * 1e3:.1f}"),
        ("train step, Lightning EDM module (ms)", f"{med['lightning'] * 1e3:.1f}", f"{cpu['lightning'] * 1e3:.1f}"),
        ("  ratio Lightning / plain (target <= 1.05)", f"{med['lightning'] / med['plain']:.3f}",
         f"{cpu['lightning'] / cpu['plain']:.3f}"),
        ("train step, plain PyTorch + LoRA (ms)", f"{med['plain_lora'] * 1e3:.1f}", f"{cpu['plain_lora'] * 1e3:.1f}"),
        ("  LoRA overhead (with / without)", f"{med['plain_lora'] / med['plain']:.3f}",
         f"{cpu['plain_lora'] / cpu['plain']:.3f}"),
        ("sampling, 35 NFE (images/s)", f"{rate[0]:.1f}", f"{rate[1]:.1f}"),
        ("sampling + LoRA, 35 NFE (images/s)", f"{rate_lora[0]:.1f}", f"{rate_lora[1]:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("-" * (width + 24))
    print(f"{'':<{width}}  {'wall':>9}  {'CPU time':>9}")
    for name, value, cpu_value in rows:
        print(f"{name:<{width}}  {value:>9}  {cpu_value:>9}")
    print("-" * (width + 24))


if __name__ == "__main__":
    main()
