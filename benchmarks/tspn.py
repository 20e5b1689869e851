"""Benchmark: tensor SPNs (Ko et al., IEEE TNNLS 2020) against SPNs and classic baselines, side by side in one run.

On binarised digits (embedded; or one of the 20 binary benchmarks with ``--dataset NAME --root DIR``; ``num_vars``
comes from the datamodule) it learns, all on the same train/val/test split:

* ``SPN (RAT-SPN)``     a RAT-SPN (plpriv.nets.RandomSPN) by maximum likelihood (best validation epoch kept): the
                        reference of the compression ratios and losses;
* classic baselines     independent Bernoulli, Chow-Liu tree, Bernoulli mixture (EM; K chosen on validation);
* ``LearnSPN``          a LearnSPN tree (plpriv.nets.LearnSPN; min_instances and p-value chosen on validation);
* ``tSPN data``         a rank-r tSPN per chain order (raster, Hilbert curve, Chow-Liu preorder, greedy MI chain; the
                        learnt orders use the training split only), EM to convergence: stop once validation LL has
                        not risen by ``--em-tol`` for ``--em-patience`` steps, best cores kept; "EM steps" = steps run;
* ``tSPN<-SPN``, ``tSPN<-LearnSPN``  the source mapped to a tSPN (converged EM on ``--distill-samples`` exact samples
                        plus the training rows, in the order best on validation); compression and loss against that
                        source.

Columns: test log-likelihood (nats per example), parameter count (free parameters for the baselines, one per sum
edge and leaf for LearnSPN, all core entries for tSPNs, all weights for the RAT-SPN), compression = source parameters /
model parameters, relative LL loss against the source, inference time of log p(x) per 1,000 samples (best of
``--repeats``, batch 1,000, ``--threads`` threads). A PNG plots test LL against parameter count.

    python benchmarks/tspn.py        # digits, all defaults, 1 thread
    python benchmarks/tspn.py --dataset nltcs --root ~/data/density-estimation --ranks 4 8

Measured (digits, seed 0, train/val/test = 1258/180/359; 2-core CPU shared with two other jobs, 1 thread;
``python benchmarks/tspn.py``: 6 min 19 s wall, 226 s CPU):

| model | order | rank | params | source | compression vs source | test LL (nats) | LL loss vs source | EM steps | ms / 1000 samples | fit s |
|---|---|---|---|---|---|---|---|---|---|---|
| SPN (RAT-SPN) |  |  | 67,600 | - | - | -18.757 | - |  | 636.7 | 23 |
| independent Bernoulli |  |  | 64 | SPN (RAT-SPN) | 1056.2x | -25.347 | +35.13% |  | 0.5 | 0 |
| Chow-Liu tree |  |  | 127 | SPN (RAT-SPN) | 532.3x | -21.115 | +12.57% |  | 0.9 | 0 |
| Bernoulli mixture K=50 |  |  | 3,250 | SPN (RAT-SPN) | 20.8x | -18.191 | -3.02% | 33 | 0.8 | 0 |
| LearnSPN m=20 |  |  | 2,963 | SPN (RAT-SPN) | 22.8x | -17.972 | -4.19% |  | 98.0 | 5 |
| tSPN data | raster | 4 | 2,000 | SPN (RAT-SPN) | 33.8x | -20.886 | +11.35% | 100 | 20.3 | 8 |
| tSPN data | raster | 6 | 4,488 | SPN (RAT-SPN) | 15.1x | -19.798 | +5.55% | 137 | 20.6 | 13 |
| tSPN data | raster | 7 | 6,104 | SPN (RAT-SPN) | 11.1x | -19.463 | +3.76% | 87 | 28.1 | 6 |
| tSPN data | raster | 8 | 7,968 | SPN (RAT-SPN) | 8.5x | -19.167 | +2.18% | 95 | 26.9 | 7 |
| tSPN data | raster | 12 | 17,904 | SPN (RAT-SPN) | 3.8x | -18.718 | -0.21% | 47 | 76.7 | 4 |
| tSPN data | raster | 16 | 31,808 | SPN (RAT-SPN) | 2.1x | -18.346 | -2.20% | 46 | 86.0 | 5 |
| tSPN data | hilbert | 4 | 2,000 | SPN (RAT-SPN) | 33.8x | -20.357 | +8.53% | 92 | 14.4 | 8 |
| tSPN data | hilbert | 6 | 4,488 | SPN (RAT-SPN) | 15.1x | -19.211 | +2.42% | 136 | 20.3 | 13 |
| tSPN data | hilbert | 7 | 6,104 | SPN (RAT-SPN) | 11.1x | -19.073 | +1.68% | 115 | 23.8 | 12 |
| tSPN data | hilbert | 8 | 7,968 | SPN (RAT-SPN) | 8.5x | -18.949 | +1.02% | 74 | 25.8 | 7 |
| tSPN data | hilbert | 12 | 17,904 | SPN (RAT-SPN) | 3.8x | -18.249 | -2.71% | 110 | 49.1 | 11 |
| tSPN data | hilbert | 16 | 31,808 | SPN (RAT-SPN) | 2.1x | -18.150 | -3.24% | 45 | 87.9 | 5 |
| tSPN data | chow_liu | 4 | 2,000 | SPN (RAT-SPN) | 33.8x | -20.145 | +7.40% | 61 | 14.4 | 4 |
| tSPN data | chow_liu | 6 | 4,488 | SPN (RAT-SPN) | 15.1x | -19.700 | +5.03% | 67 | 20.9 | 6 |
| tSPN data | chow_liu | 7 | 6,104 | SPN (RAT-SPN) | 11.1x | -19.410 | +3.48% | 85 | 24.1 | 7 |
| tSPN data | chow_liu | 8 | 7,968 | SPN (RAT-SPN) | 8.5x | -19.518 | +4.05% | 89 | 38.4 | 7 |
| tSPN data | chow_liu | 12 | 17,904 | SPN (RAT-SPN) | 3.8x | -19.064 | +1.64% | 67 | 67.3 | 6 |
| tSPN data | chow_liu | 16 | 31,808 | SPN (RAT-SPN) | 2.1x | -18.506 | -1.34% | 98 | 79.3 | 12 |
| tSPN data | mi_chain | 4 | 2,000 | SPN (RAT-SPN) | 33.8x | -20.264 | +8.03% | 109 | 20.8 | 10 |
| tSPN data | mi_chain | 6 | 4,488 | SPN (RAT-SPN) | 15.1x | -19.562 | +4.29% | 74 | 21.6 | 6 |
| tSPN data | mi_chain | 7 | 6,104 | SPN (RAT-SPN) | 11.1x | -19.609 | +4.54% | 54 | 25.1 | 6 |
| tSPN data | mi_chain | 8 | 7,968 | SPN (RAT-SPN) | 8.5x | -19.415 | +3.51% | 104 | 30.7 | 10 |
| tSPN data | mi_chain | 12 | 17,904 | SPN (RAT-SPN) | 3.8x | -19.144 | +2.06% | 81 | 59.9 | 10 |
| tSPN data | mi_chain | 16 | 31,808 | SPN (RAT-SPN) | 2.1x | -18.724 | -0.18% | 102 | 63.0 | 12 |
| tSPN<-SPN | hilbert | 4 | 2,000 | SPN (RAT-SPN) | 33.8x | -20.886 | +11.35% | 109 | 18.5 | 21 |
| tSPN<-SPN | hilbert | 8 | 7,968 | SPN (RAT-SPN) | 8.5x | -19.604 | +4.51% | 113 | 45.3 | 25 |
| tSPN<-SPN | hilbert | 16 | 31,808 | SPN (RAT-SPN) | 2.1x | -18.730 | -0.15% | 69 | 98.7 | 17 |
| tSPN<-LearnSPN | hilbert | 4 | 2,000 | LearnSPN m=20 | 1.5x | -20.493 | +14.02% | 130 | 14.5 | 24 |
| tSPN<-LearnSPN | hilbert | 8 | 7,968 | LearnSPN m=20 | 0.4x | -19.068 | +6.10% | 103 | 26.4 | 21 |
| tSPN<-LearnSPN | hilbert | 16 | 31,808 | LearnSPN m=20 | 0.1x | -17.998 | +0.14% | 84 | 64.8 | 19 |

**>= 10x compression at < 1% loss against the RAT-SPN: not reached.** Best at >= 10x: tSPN data order hilbert rank 7
(11.1x, -19.073, loss +1.68%). Best order per rank (test LL): r4 chow_liu -20.145, r6 hilbert -19.211, r7 hilbert
-19.073, r8 hilbert -18.949, r12 hilbert -18.249, r16 hilbert -18.150. Against the LearnSPN (2,963 parameters,
-17.972): the smallest tSPN within 1% is tSPN data hilbert rank 16 with 31,808 parameters (0.09x, -18.150).

Reading: EM converges by the validation criterion in 45-140 steps; the Hilbert order gains 0.2-0.6 nats over raster
at every rank from 6 up; the Chow-Liu preorder is best only at rank 4 and, like the greedy MI chain, loses to Hilbert
from rank 6 up (presumably because both chains jump between distant pixels where a subtree or a greedy run ends). The
best tSPN at >= 10x (Hilbert, rank 7) misses the 1% mark at 1.68%; Hilbert rank 8 (8.5x) is at 1.02%. The RAT-SPN reference is weak: a 3.25k-parameter Bernoulli mixture and a
3k-parameter LearnSPN beat it, and mapping the LearnSPN to a tSPN needs rank 16 (31.8k parameters, 0.09x) to come
within 0.14% of it, so on digits the tSPN compresses the RAT-SPN, not the best SPN.
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
from plpriv.nets.binary_baselines import BernoulliMixture, ChowLiuTree, IndependentBernoulli  # noqa: E402
from plpriv.nets.learnspn import LearnSPN  # noqa: E402
from plpriv.nets.spn import RandomSPN, distill_to_tspn, fit_density  # noqa: E402
from plpriv.nets.tspn import TensorSPN  # noqa: E402
from plpriv.nets.variable_order import resolve_order  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default=None, help="folder of the benchmark's .data files (not for digits)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 6, 7, 8, 12, 16])
    p.add_argument("--orders", nargs="+", default=["raster", "hilbert", "chow_liu", "mi_chain"],
                   help="chain orders of the data-trained tSPNs (hilbert: digits only, the 8x8 pixel grid)")
    p.add_argument("--spn-depth", type=int, default=2)
    p.add_argument("--spn-repetitions", type=int, default=20)
    p.add_argument("--spn-sums", type=int, default=10)
    p.add_argument("--spn-leaves", type=int, default=10)
    p.add_argument("--spn-epochs", type=int, default=30)
    p.add_argument("--spn-lr", type=float, default=0.05)
    p.add_argument("--mixture-components", type=int, nargs="+", default=[10, 20, 30, 50], help="chosen on val")
    p.add_argument("--learnspn-min-instances", type=int, nargs="+", default=[20, 50], help="chosen on val")
    p.add_argument("--learnspn-p-values", type=float, nargs="+", default=[0.015, 0.001], help="chosen on val")
    p.add_argument("--em-max-steps", type=int, default=500)
    p.add_argument("--em-tol", type=float, default=1e-3, help="nats of validation LL that count as progress")
    p.add_argument("--em-patience", type=int, default=20)
    p.add_argument("--tspn-epochs", type=int, default=0, help="Adam epochs on the NLL after converged EM")
    p.add_argument("--tspn-lr", type=float, default=0.01)
    p.add_argument("--distill-ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--distill-samples", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/benchmarks/tspn")
    return p.parse_args(argv)


def mean_ll(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.cat([model.log_prob(chunk) for chunk in x.split(1000)]).double().mean().item()


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

    def record(name: str, model: torch.nn.Module, seconds: float, source: str = "SPN (RAT-SPN)", order: str = "",
               rank: int | str = "", steps: int | str = "") -> None:
        models.append(model)
        rows.append({"model": name, "order": order, "rank": rank, "params": model.num_parameters(),
                     "test_ll": mean_ll(model, test), "val_ll": mean_ll(model, val), "source": source,
                     "em_steps": steps, "fit_s": seconds})
        print(f"  {name} {order} {rank}: test LL {rows[-1]['test_ll']:.3f}, {rows[-1]['params']:,} params, "
              f"EM steps {steps}, {seconds:.0f} s", flush=True)

    start = time.perf_counter()
    spn = RandomSPN(d, 2, args.spn_depth, args.spn_repetitions, args.spn_sums, args.spn_leaves, seed=args.seed)
    fit_density(spn, train, args.spn_epochs, lr=args.spn_lr, val=val, seed=args.seed, progress=bar("SPN"))
    record("SPN (RAT-SPN)", spn, time.perf_counter() - start, source="")
    # classic baselines on the same split
    start = time.perf_counter()
    record("independent Bernoulli", IndependentBernoulli(train), time.perf_counter() - start)
    start = time.perf_counter()
    record("Chow-Liu tree", ChowLiuTree(train), time.perf_counter() - start)
    start = time.perf_counter()
    mixtures = [BernoulliMixture(train, k, val, seed=args.seed) for k in args.mixture_components]
    best_mix = max(mixtures, key=lambda m: mean_ll(m, val))
    record(f"Bernoulli mixture K={best_mix.components}", best_mix, time.perf_counter() - start, steps=best_mix.steps)
    # LearnSPN source, hyperparameters chosen on val
    start = time.perf_counter()
    candidates = [LearnSPN(train, m, p, seed=args.seed) for m in args.learnspn_min_instances
                  for p in args.learnspn_p_values]
    learnspn = max(candidates, key=lambda m: mean_ll(m, val))
    learn_name = f"LearnSPN m={learnspn.min_instances}"
    record(learn_name, learnspn, time.perf_counter() - start)
    # tSPNs trained on the data: every order x rank, EM to convergence on validation LL
    orders = [o for o in args.orders if o != "hilbert" or args.dataset == "digits"]  # a pixel grid only
    for order_name in orders:
        order = resolve_order(order_name, d, train)  # learnt orders see the training split only
        for rank in args.ranks:
            start = time.perf_counter()
            tspn = TensorSPN(d, 2, rank, seed=args.seed, order=order)
            steps, _ = tspn.fit_em(train, val, args.em_tol, args.em_patience, args.em_max_steps)
            if args.tspn_epochs:
                fit_density(tspn, train, args.tspn_epochs, lr=args.tspn_lr, val=val, seed=args.seed)
            record("tSPN data", tspn, time.perf_counter() - start, order=order_name, rank=rank, steps=steps)
    # the best order on validation (mean over ranks) for the distilled tSPNs
    data_rows = [r for r in rows if r["model"] == "tSPN data"]
    best_order = max(orders, key=lambda o: sum(r["val_ll"] for r in data_rows if r["order"] == o))
    for source_name, source in (("SPN (RAT-SPN)", spn), (learn_name, learnspn)):
        for rank in args.distill_ranks:
            start = time.perf_counter()
            tspn = distill_to_tspn(source, rank, args.distill_samples, args.em_max_steps, data=train, seed=args.seed,
                                   order=resolve_order(best_order, d, train), val=val, tol=args.em_tol,
                                   patience=args.em_patience)
            record(f"tSPN<-{source_name.split(' ')[0]}", tspn, time.perf_counter() - start, source=source_name,
                   order=best_order, rank=rank, steps=tspn.em_steps_taken)

    for row, ms in zip(rows, time_per_1000(models, test, args.repeats)):
        row["ms_per_1000"] = ms
    by_name = {row["model"]: row for row in rows}
    lines = ["| model | order | rank | params | source | compression vs source | test LL (nats) | LL loss vs source | "
             "EM steps | ms / 1000 samples | fit s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = by_name.get(row["source"])
        comp = f"{ref['params'] / row['params']:.1f}x" if ref else "-"
        loss = f"{100 * (ref['test_ll'] - row['test_ll']) / abs(ref['test_ll']):+.2f}%" if ref else "-"
        lines.append(f"| {row['model']} | {row['order']} | {row['rank']} | {row['params']:,} | "
                     f"{row['source'] or '-'} | {comp} | {row['test_ll']:.3f} | {loss} | {row['em_steps']} | {row['ms_per_1000']:.1f} | "
                     f"{row['fit_s']:.0f} |")
    lines += ["", closing_note(rows, by_name)]
    print("\n" + "\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"tspn_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    save_plot(rows, Path(args.out), args.dataset)
    return rows


def closing_note(rows: list[dict], by_name: dict[str, dict]) -> str:
    """Whether a tSPN reaches >= 10x compression at < 1% test-LL loss against the RAT-SPN, and its best order."""
    ref = by_name["SPN (RAT-SPN)"]
    tspns = [r for r in rows if r["model"].startswith("tSPN")]
    ok = [r for r in tspns
          if ref["params"] / r["params"] >= 10 and ref["test_ll"] - r["test_ll"] < 0.01 * abs(ref["test_ll"])]
    near = [r for r in tspns if ref["params"] / r["params"] >= 10]
    best = max(near, key=lambda r: r["test_ll"]) if near else None
    text = f"**>= 10x compression at < 1% loss against the RAT-SPN: {'reached' if ok else 'not reached'}.** "
    if best:
        loss = 100 * (ref["test_ll"] - best["test_ll"]) / abs(ref["test_ll"])
        text += (f"Best at >= 10x: {best['model']} order {best['order']} rank {best['rank']} "
                 f"({ref['params'] / best['params']:.1f}x, {best['test_ll']:.3f}, loss {loss:+.2f}%). ")
    data_rows = [r for r in tspns if r["model"] == "tSPN data"]
    per_rank = {}
    for r in data_rows:
        if r["rank"] not in per_rank or r["test_ll"] > per_rank[r["rank"]]["test_ll"]:
            per_rank[r["rank"]] = r
    text += "Best order per rank (test LL): " + ", ".join(
        f"r{k} {r['order']} {r['test_ll']:.3f}" for k, r in sorted(per_rank.items())) + ". "
    learn = next(r for r in rows if r["model"].startswith("LearnSPN"))
    close = [r for r in tspns if learn["test_ll"] - r["test_ll"] < 0.01 * abs(learn["test_ll"])]
    text += f"Against the LearnSPN ({learn['params']:,} parameters, {learn['test_ll']:.3f}): "
    if close:
        small = min(close, key=lambda r: r["params"])
        text += (f"the smallest tSPN within 1% is {small['model']} {small['order']} rank {small['rank']} with "
                 f"{small['params']:,} parameters ({learn['params'] / small['params']:.2f}x, {small['test_ll']:.3f}).")
    else:
        text += "no tSPN in the table comes within 1% of its test LL."
    return text


def save_plot(rows: list[dict], out: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for order in dict.fromkeys(r["order"] for r in rows if r["model"] == "tSPN data"):
        pts = [r for r in rows if r["model"] == "tSPN data" and r["order"] == order]
        ax.plot([r["params"] for r in pts], [r["test_ll"] for r in pts], marker="s", label=f"tSPN data, {order}")
    for r in rows:
        if not r["model"].startswith("tSPN data"):
            ax.plot([r["params"]], [r["test_ll"]], marker="*" if "<-" not in r["model"] else "o", ls="", ms=9,
                    label=f"{r['model']} {r['rank']}".strip())
    ref = rows[0]["test_ll"]
    ax.axhline(ref - 0.01 * abs(ref), color="grey", ls="--", lw=1, label="RAT-SPN - 1%")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(bottom=max(min(r["test_ll"] for r in rows), ref - 4))
    ax.set_xlabel("parameters")
    ax.set_ylabel("test log-likelihood (nats)")
    ax.set_title(f"tSPN, SPNs and baselines on {dataset}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / f"tspn_{dataset}.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
