"""Benchmark: compressing an SPN onto a tensor train (Ko et al., IEEE TNNLS 2020), side by side in one run.

On binarised digits (embedded; or one of the 20 binary benchmarks with ``--dataset NAME --root DIR``) it learns

* ``SPN``            a RAT-SPN (plpriv.nets.RandomSPN) by maximum likelihood (best validation epoch kept);
* ``tSPN<-SPN r``    a rank-r tSPN fitted to the SPN: EM on exact SPN samples (plpriv.nets.distill_to_tspn);
* ``tSPN data r``    a rank-r tSPN trained on the data directly: EM from the mixture start, then Adam on the NLL
                     (best validation epoch kept);

and prints test log-likelihood (nats per example), parameter count, compression ratio (SPN parameters / model
parameters), the relative LL loss against the SPN, and the inference time of log p(x) per 1,000 samples (best of
``--repeats``, batch 1,000, ``--threads`` threads). A PNG plots test LL against parameter count.

    python benchmarks/tspn.py        # digits, ranks 4 6 8 16 (1 thread: ~8 min on a busy 2-core CPU)
    python benchmarks/tspn.py --dataset nltcs --root ~/data/density-estimation --ranks 4 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plpriv.data import BinaryDensityDataModule  # noqa: E402
from plpriv.nets.spn import RandomSPN, distill_to_tspn, fit_density  # noqa: E402
from plpriv.nets.tspn import TensorSPN  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default=None, help="folder of the benchmark's .data files (not for digits)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 6, 8, 16])
    p.add_argument("--spn-depth", type=int, default=2)
    p.add_argument("--spn-repetitions", type=int, default=20)
    p.add_argument("--spn-sums", type=int, default=10)
    p.add_argument("--spn-leaves", type=int, default=10)
    p.add_argument("--spn-epochs", type=int, default=30)
    p.add_argument("--spn-lr", type=float, default=0.05)
    p.add_argument("--tspn-em-steps", type=int, default=30)
    p.add_argument("--tspn-epochs", type=int, default=10)
    p.add_argument("--tspn-lr", type=float, default=0.01)
    p.add_argument("--distill-samples", type=int, default=10000)
    p.add_argument("--distill-em-steps", type=int, default=30)
    p.add_argument("--distill-epochs", type=int, default=0, help="Adam epochs matching the SPN's outputs after EM")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/benchmarks/tspn")
    return p.parse_args(argv)


def mean_ll(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.cat([model.log_prob(chunk) for chunk in x.split(1000)]).mean().item()


def time_per_1000(models: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Best-of-``repeats`` wall time (ms) of log p on a batch of 1,000 rows for every model. The models take turns
    in each round, so a load change on a shared CPU hits them alike; the minimum is the least disturbed run."""
    batch = x[torch.arange(1000) % len(x)]
    times = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model.log_prob(batch)  # warm-up
        for _ in range(repeats):
            for model, record in zip(models, times):
                start = time.perf_counter()
                model.log_prob(batch)
                record.append(time.perf_counter() - start)
    return [1000 * min(t) for t in times]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dm = BinaryDensityDataModule(args.dataset, root=args.root, seed=args.seed)
    train, val, test = (dm.split_tensor(s) for s in ("train", "val", "test"))
    d = dm.num_vars
    print(f"{args.dataset}: d={d}, train/val/test = {len(train)}/{len(val)}/{len(test)}", flush=True)
    bar = lambda desc: (lambda it: tqdm(it, desc=desc, leave=False))  # noqa: E731
    rows: list[dict] = []
    models: list[torch.nn.Module] = []

    def record(name: str, model: torch.nn.Module, seconds: float) -> None:
        models.append(model)
        rows.append({"model": name, "params": model.num_parameters(), "test_ll": mean_ll(model, test),
                     "fit_s": seconds})

    start = time.perf_counter()
    spn = RandomSPN(d, 2, args.spn_depth, args.spn_repetitions, args.spn_sums, args.spn_leaves, seed=args.seed)
    fit_density(spn, train, args.spn_epochs, lr=args.spn_lr, val=val, seed=args.seed, progress=bar("SPN"))
    record("SPN (RAT-SPN)", spn, time.perf_counter() - start)
    for rank in args.ranks:
        start = time.perf_counter()
        tspn = distill_to_tspn(spn, rank, args.distill_samples, args.distill_em_steps, args.distill_epochs,
                               seed=args.seed, progress=bar(f"tSPN<-SPN r={rank}"))
        record(f"tSPN<-SPN r={rank}", tspn, time.perf_counter() - start)
        start = time.perf_counter()
        tspn = TensorSPN(d, 2, rank, seed=args.seed)
        for _ in bar(f"tSPN data r={rank} EM")(range(args.tspn_em_steps)):
            tspn.em_step(train)
        if args.tspn_epochs:
            fit_density(tspn, train, args.tspn_epochs, lr=args.tspn_lr, val=val, seed=args.seed,
                        progress=bar(f"tSPN data r={rank} Adam"))
        record(f"tSPN data r={rank}", tspn, time.perf_counter() - start)

    for row, ms in zip(rows, time_per_1000(models, test, args.repeats)):
        row["ms_per_1000"] = ms
    ref = rows[0]
    lines = ["| model | params | compression | test LL (nats) | LL loss vs SPN | ms / 1000 samples | speedup | fit s |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        loss = (ref["test_ll"] - row["test_ll"]) / abs(ref["test_ll"])
        lines.append(
            f"| {row['model']} | {row['params']:,} | {ref['params'] / row['params']:.1f}x | {row['test_ll']:.3f} | "
            f"{100 * loss:+.2f}% | {row['ms_per_1000']:.1f} | {ref['ms_per_1000'] / row['ms_per_1000']:.1f}x | "
            f"{row['fit_s']:.0f} |"
        )
    print("\n" + "\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"tspn_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    save_plot(rows, Path(args.out), args.dataset)
    return rows


def save_plot(rows: list[dict], out: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, marker in (("SPN", "*"), ("tSPN<-SPN", "o"), ("tSPN data", "s")):
        pts = [rows[0]] if prefix == "SPN" else [r for r in rows if r["model"].startswith(prefix)]
        ax.plot([r["params"] for r in pts], [r["test_ll"] for r in pts], marker=marker, label=prefix, ms=9)
    ref = rows[0]["test_ll"]
    ax.axhline(ref - 0.01 * abs(ref), color="grey", ls="--", lw=1, label="SPN - 1%")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("test log-likelihood (nats)")
    ax.set_title(f"SPN vs tSPN on {dataset}")
    ax.legend()
    fig.tight_layout()
    path = out / f"tspn_{dataset}.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
