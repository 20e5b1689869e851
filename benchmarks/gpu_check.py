"""GPU readiness check (issue 28): one short, self-checking measurement of what only a GPU can tell.

On one H100/H200 it finishes in under 8 minutes (``--budget`` 450 s; every section has its own time cap and a
section that would start past the deadline is skipped, never fatal) and prints a table, also written with a JSON
record beside it (``--out``, default runs/gpu_check/gpu_check.json and .md; the JSON is rewritten after every
section, so a run killed half-way keeps what it measured):

* EDM DDPM++ CIFAR-10 (the SongUNet of recipes/edm/cifar10_uncond.yaml, read at run time; 55.7M parameters):
  training throughput (img/s) at fp32 (TF32 off), tf32 and bf16 autocast, with the largest batch of ``BATCHES``
  that fits (OOM caught), against NVlabs/edm's figure (``EDM_V100_IMG_S``) and the GPU's peak FLOP rate (training
  FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` x img/s / ``PEAK_TFLOPS``);
* the same with LoRA-conditioned attention (recipes/edm/cifar10_uncond_lora.yaml), as a ratio to without;
* DP-SGD step time through ``plpriv.callbacks.DPSGD`` (opacus hooks and ghost clipping, ``max_physical_batch_size``)
  on the digits EDM net (recipes/edm/digits_lora_dp.yaml) and the CIFAR-10 net, as a ratio to the non-private
  Lightning step at the same logical batch (``32-true``, TF32 on a GPU: under bf16 autocast opacus 1.6 clips with
  bf16 per-sample norms, see tests/gpu/test_dp_on_gpu.py);
* sampling speed (images/s, EDM's 18-step Heun sampler, 35 network evaluations);
* ``torch.compile`` on/off for the bf16 training step (a child process with its own timeout; failures reported).

Data are synthetic and CIFAR-shaped (no download). Sanity checks on every training row: loss finite, gradients
finite, parameters changed; the status column says FAIL otherwise and the exit code is 1.
Plain PyTorch steps are EDM's (``EDMPrecond`` + ``EDMLoss``, Adam at a constant lr: the lr ramp changes no timing).

  python benchmarks/gpu_check.py                      # one GPU, < 8 min (give it timeout 600 s)
  python benchmarks/gpu_check.py --tiny --device cpu  # the same code on a tiny SongUNet, batch 2, CPU, < 30 s
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plpriv from this checkout, installed or not (GPU machines: PYTHONPATH for the rest)
CIFAR_RECIPE = ROOT / "recipes" / "edm" / "cifar10_uncond.yaml"
LORA_RECIPE = ROOT / "recipes" / "edm" / "cifar10_uncond_lora.yaml"
DIGITS_DP_RECIPE = ROOT / "recipes" / "edm" / "digits_lora_dp.yaml"
BATCHES = (512, 256, 128, 64, 32)  # the largest that fits is measured
# NVlabs/edm README, "Training new models": cifar10-32x32 DDPM++ took ~2 days on 8x V100 for the default --duration
# of 200 Mimg (train.py), fp32 (--fp16 off): 200e6 / (2 * 86400 s) / 8 = 144.7 img/s per V100. A loose figure: at the
# 127 GFLOPs per training image FlopCounterMode counts for this net it is 18.4 TFLOPS, above the V100's 15.7 fp32 peak,
# so "~2 days" is rounded down; read ratios to it as approximate.
EDM_V100_IMG_S = 200e6 / (2 * 86400) / 8
# Dense peak TFLOPS (no sparsity), NVIDIA datasheets; keys are matched against torch.cuda.get_device_name().
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # H200 SXM: H100 SXM's compute
    "H100 80GB HBM3": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # H100 SXM5
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}
TINY_NET = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
TINY_LORA = dict(use_lora=True, lora_rank=2, lora_bases=2, lora_mlp=[16, 8])
GPU_CAPS = dict(train=150, lora=90, dp=110, sampling=40, compile=150)  # seconds per section (sum > budget: the
TINY_CAPS = dict(train=20, lora=20, dp=30, sampling=10, compile=20)    # deadline skips what is left)


def peak_for(device_name: str) -> dict[str, float] | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_name.lower()), None)


def recipe_net(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text())["model"]["init_args"]["net"]["init_args"])


def recipe_augment_p(path: Path) -> float:
    return float(yaml.safe_load(path.read_text())["model"]["init_args"].get("augment_p", 0.0))


class Check:
    """Run context: device, deadline, rows; writes the table and JSON after every row."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.deadline = self.t0 + args.budget
        self.caps = TINY_CAPS if args.tiny else GPU_CAPS
        self.rows: list[dict[str, Any]] = []
        self.name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        self.peak = peak_for(self.name) if self.device.type == "cuda" else None
        self.meta: dict[str, Any] = {}
        self.out = Path(args.out)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def cap(self, section: str) -> float:
        return min(self.caps[section], self.left())

    def add(self, **row: Any) -> dict[str, Any]:
        row.setdefault("status", "ok")
        self.rows.append(row)
        self.write()
        print(self.table().splitlines()[-1], flush=True)  # as it comes: a run killed half-way still shows it
        return row

    def failures(self) -> int:
        return sum(r["status"] in ("FAIL", "error") for r in self.rows)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"schema": 1, "script": "benchmarks/gpu_check.py", "date": now, "device": self.name,
                  "device_type": self.device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "tiny": self.args.tiny, "budget_s": self.args.budget,
                  "wall_s": round(time.perf_counter() - self.t0, 1), "peak_tflops": self.peak,
                  "edm_v100_img_s": EDM_V100_IMG_S, **self.meta, "failures": self.failures(), "rows": self.rows}
        self.out.write_text(json.dumps(record, indent=1) + "\n")
        self.out.with_suffix(".md").write_text(self.table() + "\n")

    def table(self) -> str:
        head = (f"plpriv GPU check, {self.name}, torch {torch.__version__}, "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                f"{' (TINY mode: not a measurement)' if self.args.tiny else ''}; "
                f"params {self.meta.get('params', '?')}, train GFLOPs/img {self.meta.get('gflops_per_image', '?')}")
        lines = [head, "", "| section | config | precision | batch | value | unit | ratio | vs | % of peak | status |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            value, ratio, mfu = r.get("value"), r.get("ratio"), r.get("peak_fraction")
            lines.append("| " + " | ".join(str(c) for c in (
                r["section"], r["config"], r.get("precision", ""), r.get("batch", ""),
                "" if value is None else f"{value:.4g}", r.get("unit", ""), "" if ratio is None else f"{ratio:.3f}",
                r.get("vs", ""), "n/a" if mfu is None else f"{100 * mfu:.1f}",
                r["status"] + (f": {r['note']}" if r.get("note") else ""))) + " |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plain EDM steps
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_precision(device: torch.device, precision: str) -> None:
    """fp32: TF32 off (IEEE fp32, the paper's V100 setting); tf32 / bf16: TF32 matmuls and convolutions allowed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.benchmark = True


def make_precond(cfg: dict[str, Any]) -> torch.nn.Module:
    from plpriv.nets import EDMPrecond, SongUNet

    torch.manual_seed(0)
    return EDMPrecond(SongUNet(**cfg))


def images(n: int, cfg: dict[str, Any], device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # synthetic CIFAR-shaped data in [-1, 1]
    res = cfg["img_resolution"]
    return (torch.rand(n, cfg["in_channels"], res, res, generator=g) * 2 - 1).to(device)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


def train_steps(ck: Check, master: torch.nn.Module, cfg: dict[str, Any], batch: int, precision: str, cap: float,
                compile_model: bool = False, inject_nan: bool = False) -> dict[str, Any]:
    """EDM's training step (fresh copy of ``master``): per-step seconds after warm-up, and the sanity checks."""
    from plpriv.nets import EDMLoss

    device, args = ck.device, ck.args
    set_precision(device, precision)
    net = copy.deepcopy(master).to(device).train()
    if compile_model:
        net.model = torch.compile(net.model, backend=args.compile_backend)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    loss_fn, x = EDMLoss(), images(batch, cfg, device)
    before = [p.detach().clone() for p in params]
    loss_ok = grad_ok = True
    times: list[float] = []
    stop = time.perf_counter() + cap
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net, x).sum(dim=(1, 2, 3)).mean()  # EDM: sum over pixels, mean over images
        if inject_nan:
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_ok &= bool(loss.isfinite())
        grad_ok &= all_finite([p.grad for p in params if p.grad is not None])
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > stop and i >= args.warmup:
            break
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    timed = times[args.warmup:] or times[-1:]
    return {"step_s": statistics.median(timed), "first_step_s": times[0], "steps": len(timed),
            "checks": {"loss_finite": loss_ok, "grads_finite": grad_ok, "params_changed": changed}}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(ck: Check, master: torch.nn.Module, cfg: dict[str, Any], precision: str, cap: float,
                  batches: tuple[int, ...], **kw: Any) -> tuple[int, dict[str, Any] | None, str]:
    """Measure at the first batch of ``batches`` that fits: (batch, result, "") or (batch, None, why)."""
    why = "no batch to try"
    for batch in batches:
        try:
            return batch, train_steps(ck, master, cfg, batch, precision, cap, **kw), ""
        except Exception as err:  # noqa: BLE001 - OOM: try a smaller batch; anything else is reported
            if not is_oom(err):
                return batch, None, f"{type(err).__name__}: {str(err)[:200]}"
            why = f"OOM down to batch {batch}"
        finally:
            free()
    return batches[-1] if batches else 0, None, why


def status_of(checks: dict[str, bool]) -> tuple[str, str]:
    bad = [k for k, ok in checks.items() if not ok]
    return ("FAIL", "not " + ", not ".join(bad)) if bad else ("ok", "")


# ------------------------------------------------------------------------------------------ sections
def section_train(ck: Check, name: str, cfg: dict[str, Any], precisions: tuple[str, ...],
                  base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Throughput rows of one network per precision; with ``base`` (the rows without LoRA) also the ratio to it."""
    from torch.utils.flop_counter import FlopCounterMode

    from plpriv.nets import EDMLoss

    section = "lora" if base else "train"
    master = make_precond(cfg)
    params = sum(p.numel() for p in master.parameters())
    net, x = copy.deepcopy(master).to(ck.device), images(2, cfg, ck.device)
    with FlopCounterMode(display=False) as counter:  # forward + backward of the training loss, per image
        EDMLoss()(net, x).sum().backward()
    flops = counter.get_total_flops() / 2
    del net
    ck.meta.setdefault("nets", {})[name] = {"params": params, "gflops_per_image": round(flops / 1e9, 3)}
    if not base:
        ck.meta.update(params=params, gflops_per_image=round(flops / 1e9, 3))
    found: dict[str, dict[str, Any]] = {}
    share = ck.cap(section) / len(precisions)
    for precision in precisions:
        cap = min(share, ck.left())
        if cap < (1 if ck.args.tiny else 10):
            ck.add(section=section, config=name, precision=precision, status="skipped", note="deadline")
            continue
        batches = (2,) if ck.args.tiny else BATCHES
        if base and precision in base:
            batches = tuple(b for b in batches if b <= base[precision]["batch"])
        batch, res, why = largest_batch(ck, master, cfg, precision, cap, batches,
                                        inject_nan=ck.args.inject_nan and not base)
        if res is None:
            ck.add(section=section, config=name, precision=precision, status="error", note=why)
            continue
        rate = batch / res["step_s"]
        status, note = status_of(res["checks"])
        peak = (ck.peak or {}).get(precision)
        row = dict(section=section, config=f"{name} ({params / 1e6:.1f}M)", precision=precision, batch=batch,
                   value=rate, unit="img/s", peak_fraction=flops * rate / (peak * 1e12) if peak else None,
                   status=status, note=note, **res)
        if base and precision in base and base[precision].get("value"):
            row.update(ratio=rate / base[precision]["value"], vs=f"no LoRA, batch {base[precision]['batch']}")
        else:
            row.update(ratio=rate / EDM_V100_IMG_S, vs=f"EDM paper {EDM_V100_IMG_S:.0f} img/s/V100 fp32")
        found[precision] = ck.add(**row)
    return found


def dp_step_times(ck: Check, cfg: dict[str, Any], augment_p: float, batch: int, physical: int, mode: str,
                  cap: float) -> dict[str, Any]:
    """Lightning steps of plpriv's EDM module (+ DPSGD unless ``mode == "none"``), ms per step scaled to ``batch``;
    EDM's augmentation at the recipe's ``augment_p``. Ghost clipping needs per-sample losses: EDM's step returning
    them (benchmarks/dp_overhead.py's ``ghost_module`` drops the augmentation, which leaves ``map_augment`` unused,
    and a parameter without gradient crashes opacus 1.6's ghost-clipping optimizer: ``p.grad`` is None)."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from plpriv.callbacks import DPSGD
    from plpriv.modules import EDM
    from plpriv.nets import SongUNet

    device, args = ck.device, ck.args
    warmup = max(args.warmup, 1)  # the first DP step also runs DPSGD's independence probe
    torch.manual_seed(0)

    class PerSampleEDM(EDM):  # EDM.training_step, per-sample losses (summed over pixels) instead of their mean
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, labels = self.prepare_training_batch(batch)
            with self.training_rng(batch_idx):
                augment_labels = None
                if self.augment is not None:
                    images, augment_labels = self.augment(images)
                loss = self.loss_fn(self.net, images, labels, augment_labels)
            return loss.sum(dim=tuple(range(1, loss.ndim)))

    model = (PerSampleEDM if mode == "ghost" else EDM)(
        SongUNet(**cfg), optimizer=lambda p: torch.optim.Adam(p, lr=1e-4), lr_rampup_img=1, augment_p=augment_p,
        num_val_samples=0, sample_batch_size=2)
    n = batch * 16  # q = 1/16
    data = TensorDataset(images(n, cfg, torch.device("cpu"), seed=1), torch.arange(n) % max(cfg.get("label_dim", 0), 1))
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    before = [p.detach().clone() for p in model.net.parameters()]
    record: dict[str, Any] = {"ms": [], "loss_finite": True}

    stop = time.perf_counter() + cap

    class Timer(Callback):  # also the time cap: stops after the first timed step past ``cap``
        def on_train_batch_start(self, trainer: Trainer, module: Any, b: Any, i: int) -> None:
            sync(device)
            self.t, self.n = time.perf_counter(), len(b[0])

        def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, b: Any, i: int) -> None:
            sync(device)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            record["loss_finite"] &= bool(loss.detach().isfinite().all())
            if self.n and trainer.global_step > warmup:  # Poisson batches vary: scale to the logical batch
                record["ms"].append(1e3 * (time.perf_counter() - self.t) * batch / self.n)
            trainer.should_stop |= bool(record["ms"]) and time.perf_counter() > stop

    dp = [] if mode == "none" else [DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, grad_sample_mode=mode, seed=0,
                                          max_physical_batch_size=physical, dataset_size=n, target_delta=1e-5,
                                          plot=False)]
    trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="32-true",
                      max_steps=warmup + max(args.steps, 1),
                      callbacks=[*dp, Timer()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(ck.out.parent / "lightning"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    after = [p.detach().cpu() for p in model.net.parameters()]
    checks = {"loss_finite": record["loss_finite"], "grads_finite": all_finite(after),  # noised update finite
              "params_changed": any(not torch.equal(a, b) for a, b in zip(before, after))}
    if not record["ms"]:
        raise TimeoutError(f"no timed step within {cap:.0f} s")
    return {"step_ms": statistics.median(record["ms"]), "steps": len(record["ms"]), "checks": checks}


def section_dp(ck: Check, nets: dict[str, tuple[dict[str, Any], float, int, int]]) -> None:
    """DP-SGD vs non-private Lightning steps; TF32 on (Lightning's ``32-true`` on a GPU: cuDNN's default)."""
    precision = "tf32" if ck.device.type == "cuda" else "fp32"
    set_precision(ck.device, precision)
    cap = ck.cap("dp") / (3 * len(nets))
    for name, (cfg, augment_p, batch, physical) in nets.items():
        base: float | None = None
        for mode in ("none", "hooks", "ghost"):
            label = "non-private" if mode == "none" else f"DPSGD {mode}, physical {physical}"
            common = dict(section="dp", config=f"{name}: {label}", precision=precision, batch=batch, unit="ms/step")
            if min(cap, ck.left()) < (1 if ck.args.tiny else 8):
                ck.add(**common, status="skipped", note="deadline")
                continue
            try:
                res = dp_step_times(ck, cfg, augment_p, batch, physical, mode, min(cap, ck.left()))
            except Exception as err:  # noqa: BLE001 - reported in the table
                ck.add(**common, status="error", note=f"{type(err).__name__}: {str(err)[:200]}")
                continue
            finally:
                free()
            status, note = status_of(res["checks"])
            if mode == "none":
                base = res["step_ms"]
            ratio = None if base is None or mode == "none" else res["step_ms"] / base
            ck.add(**common, value=res["step_ms"], ratio=ratio, vs="" if ratio is None else "non-private, same batch",
                   status=status, note=note, **res)


@torch.no_grad()
def section_sampling(ck: Check, cfg: dict[str, Any], batch: int) -> None:
    from plpriv.sampling import edm_sampler

    net = make_precond(cfg).to(ck.device).eval()
    share = ck.cap("sampling") / 2
    for precision in ("fp32", "bf16"):
        common = dict(section="sampling", config="Heun, 18 steps (35 NFE)", precision=precision, batch=batch,
                      unit="img/s")
        if min(share, ck.left()) < (0.5 if ck.args.tiny else 5):
            ck.add(**common, status="skipped", note="deadline")
            continue
        set_precision(ck.device, precision)
        latents = torch.randn(batch, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"], device=ck.device)
        try:
            with torch.autocast(ck.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                net(latents, torch.ones(batch, device=ck.device))  # warm-up (cuDNN autotuning)
                sync(ck.device)
                t = time.perf_counter()
                out = edm_sampler(net, latents, num_steps=18)
                sync(ck.device)
            seconds = time.perf_counter() - t
        except Exception as err:  # noqa: BLE001
            ck.add(**common, status="error", note=f"{type(err).__name__}: {str(err)[:200]}")
            continue
        ok = bool(out.isfinite().all())
        ck.add(**common, value=batch / seconds, status="ok" if ok else "FAIL", note="" if ok else "not finite")
    del net
    free()


def section_compile(ck: Check, cfg: dict[str, Any], batch: int) -> None:
    """Eager vs ``torch.compile`` bf16 training step; in a child process on GPU (a hung compile cannot be stopped
    in-process), in-process in tiny mode (``--compile-backend eager`` there: Dynamo without a C++ toolchain)."""
    common = dict(section="compile", config="train step, eager vs torch.compile", precision="bf16", batch=batch,
                  unit="img/s")
    cap = ck.cap("compile")
    if cap < (1 if ck.args.tiny else 30):
        ck.add(**common, status="skipped", note="deadline")
        return
    if ck.args.tiny and not ck.args.compile_in_child:
        res = compile_pair(ck, cfg, batch, cap)
    else:
        child = ck.out.with_name(ck.out.stem + "_compile.json")
        child.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child-compile", str(batch), "--out", str(child), "--device",
               ck.args.device, "--budget", str(max(1, int(0.8 * cap))), "--compile-backend", ck.args.compile_backend,
               *(["--tiny"] if ck.args.tiny else [])]
        try:
            proc = subprocess.run(cmd, timeout=cap, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            res = json.loads(child.read_text()) if child.exists() else {
                "error": f"child exited {proc.returncode}: {proc.stdout[-300:]}", "crashed": True}
        except subprocess.TimeoutExpired:
            res = {"error": f"compile + measure did not finish within {cap:.0f} s"}
    if "error" in res:  # torch.compile failing or too slow is a finding; the child crashing is a bug here
        ck.add(**common, status="error" if res.get("crashed") else "unsupported", note=res["error"])
        return
    status, note = status_of(res["checks"])
    ck.add(**common, value=res["compiled_img_s"], ratio=res["compiled_img_s"] / res["eager_img_s"], vs="eager",
           status=status, note=note or f"compile + first step {res['first_step_s']:.0f} s", **res)


def compile_pair(ck: Check, cfg: dict[str, Any], batch: int, cap: float) -> dict[str, Any]:
    master = make_precond(cfg)
    try:
        eager = train_steps(ck, master, cfg, batch, "bf16", cap / 4)
        free()
        compiled = train_steps(ck, master, cfg, batch, "bf16", cap / 2, compile_model=True)
    except Exception as err:  # noqa: BLE001 - compile failures are what this section reports
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    return {"eager_img_s": batch / eager["step_s"], "compiled_img_s": batch / compiled["step_s"],
            "first_step_s": compiled["first_step_s"], "checks": compiled["checks"]}


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.json"), help="JSON path (.md beside)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny SongUNet, batch 2, one step per section (CPU test)")
    p.add_argument("--budget", type=float, default=None, help="global deadline in s (default 450; tiny 25)")
    p.add_argument("--sections", nargs="+", default=["train", "lora", "dp", "sampling", "compile"],
                   choices=["train", "lora", "dp", "sampling", "compile"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 6; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 0, DP 1)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny eager)")
    p.add_argument("--inject-nan", action="store_true", help="make the train section's loss NaN (tests the checks)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny 1)")
    p.add_argument("--compile-in-child", action="store_true", help="tiny mode: the compile section in a child "
                   "process, as on a GPU (always there)")
    p.add_argument("--child-compile", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget = args.budget or (25.0 if args.tiny else 450.0)
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 6)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    args.threads = args.threads or (1 if args.tiny else torch.get_num_threads())
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; run with --tiny --device cpu on a CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ck = Check(args)
    if args.child_compile is not None:  # child: one eager/compiled pair, result to --out
        cfg = TINY_NET if args.tiny else recipe_net(CIFAR_RECIPE)
        ck.out.write_text(json.dumps(compile_pair(ck, cfg, args.child_compile, args.budget)))
        return 0
    cfg = TINY_NET if args.tiny else recipe_net(CIFAR_RECIPE)
    lora = {**TINY_NET, **TINY_LORA} if args.tiny else recipe_net(LORA_RECIPE)
    digits = recipe_net(DIGITS_DP_RECIPE)
    digits_batch = int(yaml.safe_load(DIGITS_DP_RECIPE.read_text())["data"]["init_args"]["batch_size"])
    precisions = ("fp32", "bf16") if args.tiny or ck.device.type != "cuda" else ("fp32", "tf32", "bf16")
    ck.write()
    found: dict[str, dict[str, Any]] = {}
    if "train" in args.sections:
        found = section_train(ck, "tiny SongUNet" if args.tiny else "EDM DDPM++ CIFAR-10", cfg, precisions)
    if "lora" in args.sections:
        section_train(ck, "+ LoRA attention", lora, tuple(p for p in precisions if p != "tf32"),
                      base=found or {p: {"batch": BATCHES[0]} for p in precisions})
    if "dp" in args.sections:
        nets = {"digits EDM": (digits, recipe_augment_p(DIGITS_DP_RECIPE), digits_batch, digits_batch // 2),
                "CIFAR-10 EDM": (cfg, recipe_augment_p(CIFAR_RECIPE), 256, 64)}
        if args.tiny:  # the same code on the tiny net only
            nets = {"tiny EDM": (cfg, 0.12, 2, 1)}
        section_dp(ck, nets)
    if "sampling" in args.sections:
        section_sampling(ck, cfg, 2 if args.tiny else 256)
    if "compile" in args.sections:
        section_compile(ck, cfg, 2 if args.tiny else min(found.get("bf16", {}).get("batch", 128), 256))
    ck.write()
    print(ck.table())
    print(f"\n{len(ck.rows)} rows, {ck.failures()} failed; {time.perf_counter() - ck.t0:.0f} s; "
          f"JSON: {ck.out}, table: {ck.out.with_suffix('.md')}")
    return 1 if ck.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
