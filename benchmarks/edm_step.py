"""EDM speed benchmark: Lightning training step vs a plain PyTorch loop, LoRA overhead, sampling throughput.

One run measures, for the same network, batch and settings:
  * the training step time through ``plpriv.modules.EDM`` + ``Trainer`` and through a plain PyTorch loop doing EDM's
    step (sigma/noise draw, preconditioned loss, backward, nan_to_num, Adam, lr ramp, EMA); ratio should be <= 1.05;
  * the LoRA overhead: plain-loop step time with ``use_lora`` on vs off;
  * sampling throughput: images/s of EDM's Heun sampler at 35 NFE (18 steps), with and without LoRA.
With ``--against-edm PATH`` (a checkout of github.com/NVlabs/edm, imported from PATH at run time, never copied) it
instead measures the network alone: forward+backward of ``plpriv.nets.SongUNet`` against EDM's own ``SongUNet`` with
the same config, weights (state dict copied) and batch, for the 64-channel CIFAR-10 config (batch 8) and the config of
recipes/edm/digits_lora.yaml (read at run time, its batch size); then the LoRA overhead of the quickstart network
(``use_lora`` on / off) with its inherent share (FLOPs counted by ``torch.utils.flop_counter``). Calls alternate in
pairs (order swapped every pair) in one process, one thread by default; medians of the per-pair ratios.
Both training paths read batches from the same in-memory DataLoader; rounds are interleaved and medians reported, to
be robust on a shared machine. Not a test: run on demand.

  python benchmarks/edm_step.py                          # CPU: the digits quickstart network, batch 64
  python benchmarks/edm_step.py --preset cifar10 --precision bf16 --channels-last [--compile]   # one GPU
  python benchmarks/edm_step.py --against-edm /tmp/nvlabs_edm --threads 1   # git clone github.com/NVlabs/edm there
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
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


QUICKSTART_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "edm" / "digits_lora.yaml"
# The 64-channel variant of EDM's class-conditional CIFAR-10 DDPM++ (EDM's own option --cbase=64), batch 8.
CIFAR10_64 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=64,
                  channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)
# SongUNet arguments that EDM's SongUNet has too (the rest, use_lora/lora_*/freeze_base, are plpriv's own).
SHARED_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels",
               "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout", "label_dropout",
               "channel_mult_noise", "resample_filter")


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


# ----------------------------------------------------------------------------------------------------------------
# --against-edm: the network alone, against NVlabs/edm's SongUNet.


def import_edm_songunet(path: str) -> type[torch.nn.Module]:
    """EDM's ``training.networks.SongUNet`` from a checkout at ``path`` (with its own ``torch_utils``/``dnnlib``)."""
    root = Path(path).expanduser().resolve()
    if not (root / "training" / "networks.py").is_file() or not (root / "torch_utils").is_dir():
        raise SystemExit(f"--against-edm {path}: no training/networks.py and torch_utils/ there; pass a checkout of "
                         f"github.com/NVlabs/edm (git clone https://github.com/NVlabs/edm {path})")
    loaded = sys.modules.get("training")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent.parent != root:
        raise SystemExit(f"--against-edm {path}: another module named 'training' is already imported ({loaded})")
    sys.path.insert(0, str(root))
    try:
        networks = importlib.import_module("training.networks")
    except ImportError as err:
        raise SystemExit(f"--against-edm {path}: importing EDM's training/networks.py failed: {err}. It needs numpy "
                         f"and the checkout's own torch_utils/ and dnnlib/; install what is missing in this "
                         f"environment (nothing of EDM is stubbed or vendored here)") from err
    return networks.SongUNet


def quickstart_net_args() -> tuple[dict[str, Any], int]:
    """SongUNet init_args and batch size of recipes/edm/digits_lora.yaml, as the file says now."""
    recipe = yaml.safe_load(QUICKSTART_RECIPE.read_text())
    return dict(recipe["model"]["init_args"]["net"]["init_args"]), int(recipe["data"]["init_args"]["batch_size"])


def net_inputs(cfg: dict[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
    """(x, noise labels ln(sigma)/4, one-hot class labels, augment labels) as EDMPrecond feeds them."""
    g = torch.Generator().manual_seed(1)
    res, label_dim, augment_dim = cfg["img_resolution"], cfg.get("label_dim", 0), cfg.get("augment_dim", 0)
    x = torch.randn(batch, cfg["in_channels"], res, res, generator=g)
    sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()  # EDM's training distribution, ln sigma ~ N(-1.2, 1.2^2)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % max(label_dim, 1), max(label_dim, 1)).float()
    augment = torch.zeros(batch, augment_dim) if augment_dim else None
    return x, sigma.log() / 4, labels[:, :label_dim], augment


def copy_into_edm(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load plpriv's state dict into EDM's network (same names; EDM additionally holds resample_filter buffers)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("resample_filter")]
    if missing or unexpected:
        raise SystemExit(f"state dicts do not map: missing in plpriv {missing[:5]}, unknown to EDM {unexpected[:5]}")


def fwd_bwd(net: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(*inputs).square().mean().backward()
    return step


def alternated_pairs(a: Callable[[], None], b: Callable[[], None], pairs: int, warmup: int) -> dict[str, list[float]]:
    """Per-call (wall, CPU) seconds of ``a`` and ``b``, called in pairs whose order flips every pair."""
    for _ in range(warmup):
        a(), b()
    out: dict[str, list[float]] = {"a_wall": [], "a_cpu": [], "b_wall": [], "b_cpu": []}
    for i in range(pairs):
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            t = clock()
            fn()
            now = clock()
            out[f"{name}_wall"].append(now[0] - t[0])
            out[f"{name}_cpu"].append(now[1] - t[1])
    return out


def ratio_row(label: str, batch: int, t: dict[str, list[float]], *extra: str) -> str:
    """Markdown row: median wall ms of a and b, median (range) of the per-pair ratio a/b in wall and CPU time."""
    cells = [label, str(batch), f"{statistics.median(t['a_wall']) * 1e3:.1f}", f"{statistics.median(t['b_wall']) * 1e3:.1f}"]
    for kind in ("wall", "cpu"):
        r = [x / y for x, y in zip(t[f"a_{kind}"], t[f"b_{kind}"])]
        cells.append(f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})")
    return "| " + " | ".join([*cells, *extra]) + " |"


def train_flops(net: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fwd_bwd(net, inputs)()
    return counter.get_total_flops()


def against_edm(args: argparse.Namespace) -> None:
    from plpriv.nets import SongUNet

    edm_songunet = import_edm_songunet(args.against_edm)
    quick, quick_batch = quickstart_net_args()
    configs = {"CIFAR-10 DDPM++ 64 ch": (CIFAR10_64, args.cifar_batch, args.pairs),
               "quickstart (digits_lora.yaml)": (quick, quick_batch, args.quick_pairs)}
    print(f"plpriv SongUNet vs NVlabs/edm SongUNet ({args.against_edm}), forward+backward of mean(out^2), train mode, "
          f"CPU {torch.get_num_threads()} thread(s), {args.pairs} (quickstart: {args.quick_pairs}) alternated pairs after "
          f"{args.warmup} warm-up pairs; ms: medians, ratios: median (range) of the per-pair ratios\n")
    header = ["| network | batch | plpriv ms | EDM ms | plpriv / EDM wall | plpriv / EDM CPU | max rel. diff of outputs (eval) |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    for name, (cfg, batch, pairs) in configs.items():
        shared = {k: v for k, v in cfg.items() if k in SHARED_ARGS}
        torch.manual_seed(0)
        ours = SongUNet(**shared)
        theirs = edm_songunet(**shared)
        copy_into_edm(ours, theirs)
        inputs = net_inputs(cfg, batch)
        with torch.no_grad():
            ours.eval(), theirs.eval()
            reference = theirs(*inputs)
            diff = ((ours(*inputs) - reference).abs().max() / reference.abs().max()).item()
        ours.train(), theirs.train()
        t = alternated_pairs(fwd_bwd(ours, inputs), fwd_bwd(theirs, inputs), pairs, args.warmup)
        print(ratio_row(name, batch, t, f"{diff:.1e}"), flush=True)

    # LoRA overhead on the quickstart network, with the recipe's own LoRA settings.
    lora_args = {k: v for k, v in quick.items() if k.startswith("lora_") and k != "lora_only"}
    torch.manual_seed(0)
    with_lora = SongUNet(**{**quick, "use_lora": True, **lora_args})
    torch.manual_seed(0)
    without = SongUNet(**{**quick, "use_lora": False})
    inputs = net_inputs(quick, quick_batch)
    flops = train_flops(with_lora, inputs) / train_flops(without, inputs)
    t = alternated_pairs(fwd_bwd(with_lora, inputs), fwd_bwd(without, inputs), args.quick_pairs, args.warmup)
    n_lora = sum(p.numel() for p in with_lora.parameters()) - sum(p.numel() for p in without.parameters())
    print(f"\nLoRA overhead, quickstart network, batch {quick_batch} ({lora_args}; +{n_lora:,} parameters); "
          f"inherent: fwd+bwd FLOPs with / without LoRA = {flops:.3f}\n")
    print("| network | batch | LoRA ms | no LoRA ms | LoRA / no LoRA wall | LoRA / no LoRA CPU |\n|---|---|---|---|---|---|")
    print(ratio_row("quickstart (digits_lora.yaml)", quick_batch, t), flush=True)


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
    parser.add_argument("--against-edm", metavar="PATH", default=None,
                        help="a checkout of github.com/NVlabs/edm: time plpriv's SongUNet against EDM's (CPU)")
    parser.add_argument("--pairs", type=int, default=10, help="--against-edm: timed alternated pairs, CIFAR-10 config")
    parser.add_argument("--quick-pairs", type=int, default=40, help="--against-edm: timed pairs, quickstart network")
    parser.add_argument("--cifar-batch", type=int, default=8, help="--against-edm: batch of the CIFAR-10 config")
    args = parser.parse_args()
    if args.against_edm:
        torch.set_num_threads(args.threads or 1)
        args.warmup = min(args.warmup, 2)
        against_edm(args)
        return
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
