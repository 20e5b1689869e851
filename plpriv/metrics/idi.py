"""Information Difference Index (IDI) of an unlearned model (Jeon et al., arXiv 2405.17878).

For each layer l the mutual information I(Z_l; Y) between the layer's features Z_l and the binary label Y (1: forget
sample, 0: retain sample, class balanced, so I <= log 2) is estimated with InfoNCE, for the unlearned model u, the
retrained model r and the original model o. ID(theta) = sum_l [I_theta(Z_l; Y) - I_r(Z_l; Y)], IDI = ID(u) / ID(o):
the original scores 1, Retrain 0, and the sign is kept (an unlearned model can hold less than Retrain).

Choices the paper leaves open (documented here):

- The critic f is a copy of layers l+1..L of the evaluated network (``critic_init="model"``, its trained weights;
  ``"random"``: re-initialised) followed by a two-layer projection head; g is two learned label embeddings; the score
  is s(z, y) = f(z)^T g(y) and the contrast runs over the labels of the batch (K = batch size).
- The copied layers l+1..L are always trainable in the critic, whatever the evaluated network's ``requires_grad``
  flags (a frozen network, e.g. a teacher or HD's encoder, would otherwise get a projection-only critic); the
  caller's network is never modified.
- The critic is fitted on ``1 - holdout`` of the balanced sample and the estimate is taken on the held-out rest
  (an estimate on the fitting data is biased up towards log 2 for any model).
- Every trial draws its own balanced subsample, fit/eval split and critic initialisation (the same ones for the three
  models, so trials are paired). Intervals (95 %): Student-t over trials for the mean MI per layer and per model;
  a paired bootstrap over trials for IDI, a ratio of means. One trial has no interval (None), never a zero spread.
- Networks must be sequential chains (the classifier's modules run in the order they are registered): plpriv's
  ``SmallCNN`` and timm's ResNet family. Default layers: timm's ``feature_info`` stages (what ``features_only``
  exposes), or the outputs of ``SmallCNN``'s three stages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "IDIResult",
    "bootstrap_ratio_interval",
    "default_layers",
    "infonce_mutual_information",
    "information_difference_index",
    "layer_mutual_information",
    "mean_interval",
    "sample_counts",
    "sequential_chain",
]


def _classifier(net: nn.Module) -> nn.Module:
    if hasattr(net, "get_classifier"):  # timm
        return net.get_classifier()
    if isinstance(getattr(net, "head", None), nn.Linear):  # plpriv SmallCNN
        return net.head
    linears = [m for m in net.children() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(net).__name__} has no classifier to find: use a timm model or plpriv's SmallCNN")
    return linears[-1]


def default_layers(net: nn.Module) -> list[str]:
    """timm's ``feature_info`` module names (the ``features_only`` stages), or SmallCNN's three stage outputs."""
    net = getattr(net, "net", net)  # an ImageClassifier
    info = getattr(net, "feature_info", None)
    if info is not None:
        return [entry["module"] for entry in info] if isinstance(info, list) else list(info.module_name())
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        return [f"features.{i}" for i, m in enumerate(features) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    raise ValueError(f"no default layers for {type(net).__name__}: pass `layers` (names from named_modules())")


def sequential_chain(net: nn.Module, layers: Sequence[str] = ()) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """``(chain, classifier)``: the modules that map the input to the pre-logit features, in order (the network's
    own modules, not copies), with every name in ``layers`` one of the chain's entries; ``classifier(chain(x))``
    equals ``net(x)`` (checked by the callers on a probe batch)."""
    net = getattr(net, "net", net)
    head = _classifier(net)

    def expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is head:
                continue
            if any(layer.startswith(full + ".") for layer in layers):
                if not isinstance(child, nn.Sequential):
                    raise ValueError(f"layer inside {full!r}, which is not an nn.Sequential: choose a stage output")
                out += expand(full + ".", child)
            else:
                out.append((full, child))
        return out

    chain = expand("", net)
    names = [n for n, _ in chain]
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ValueError(f"layers {missing} are not stages of {type(net).__name__}; choose from {names}")
    return chain, head


def _run(chain: Sequence[nn.Module], x: Tensor) -> Tensor:
    for module in chain:
        x = module(x)
    return x.flatten(1) if x.ndim > 2 else x


def check_chain(net: nn.Module, chain: Sequence[tuple[str, nn.Module]], head: nn.Module, x: Tensor) -> None:
    """Raise ValueError when ``head(chain(x))`` is not ``net(x)`` (the network is not a sequential chain)."""
    with torch.no_grad():
        ok = torch.allclose(head(_run([m for _, m in chain], x)), net(x), atol=1e-4, rtol=1e-4)
    if not ok:
        raise ValueError(f"{type(net).__name__} is not a sequential chain of its children: IDI and the encoder/head "
                         "split support plpriv's SmallCNN and timm ResNets")


def _reset(module: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def infonce_mutual_information(
    z_fit: Tensor,
    y_fit: Tensor,
    z_eval: Tensor,
    y_eval: Tensor,
    critic: nn.Module,
    dim: int,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> float:
    """InfoNCE estimate (nats) of I(Z; Y) for integer labels: fit ``critic`` (z -> R^dim) and label embeddings
    g on ``(z_fit, y_fit)`` for ``steps`` Adam steps, then evaluate on ``(z_eval, y_eval)`` in one contrast batch."""
    if steps < 1 or batch_size < 2 or dim < 1:
        raise ValueError(f"`steps` >= 1, `batch_size` >= 2 and `dim` >= 1 required, got {steps}, {batch_size}, {dim}")
    if len(z_fit) != len(y_fit) or len(z_eval) != len(y_eval) or len(z_eval) < 2:
        raise ValueError(f"features and labels must pair up (fit {len(z_fit)}/{len(y_fit)}, eval {len(z_eval)}/"
                         f"{len(y_eval)}) with >= 2 evaluation samples")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    labels = int(max(y_fit.max(), y_eval.max())) + 1
    g = nn.Embedding(labels, dim)
    params = list(critic.parameters()) + list(g.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)

    def estimate(z: Tensor, y: Tensor) -> Tensor:
        scores = critic(z) @ g(y).T  # s(z_i, y_j) = f(z_i)^T g(y_j), Jeon et al. Sec. IDI
        # InfoNCE: mean_i log( exp s(z_i,y_i) / ((1/K) sum_j exp s(z_i,y_j)) ), van den Oord et al. 2018 Eq. 4
        return (scores.diagonal() - torch.logsumexp(scores, dim=1) + math.log(len(y))).mean()

    critic.train()
    n = len(z_fit)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(batch_size, n)]
        loss = -estimate(z_fit[idx], y_fit[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    critic.eval()
    with torch.no_grad():
        return float(estimate(z_eval, y_eval))


def sample_counts(n_forget: int, n_retain: int, holdout: float) -> dict[str, int]:
    """The estimator's sample per trial: ``per_label`` = min(n_forget, n_retain) of each label, ``fit`` / ``eval``
    the critic's fitting and held-out parts of the 2 * per_label balanced samples."""
    n = min(n_forget, n_retain)
    n_eval = max(2, int(round(holdout * 2 * n)))
    return {"forget_available": n_forget, "retain_available": n_retain, "per_label": n, "fit": 2 * n - n_eval,
            "eval": n_eval}


class _Critic(nn.Module):
    """f: a copy of layers l+1..L, flattened, then a two-layer projection head."""

    def __init__(self, tail: Sequence[nn.Module], in_features: int, dim: int) -> None:
        super().__init__()
        self.tail = nn.Sequential(*tail)
        self.proj = nn.Sequential(nn.Linear(in_features, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.proj(_run(list(self.tail), z))


def layer_mutual_information(
    net: nn.Module,
    forget_x: Tensor,
    retain_x: Tensor,
    layers: Sequence[str] | None = None,
    trials: int = 10,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 128,
    dim: int = 32,
    holdout: float = 0.3,
    critic_init: str = "model",
    seed: int = 0,
) -> tuple[list[str], np.ndarray]:
    """``(layers, mi)``: ``mi[t, l]`` is trial t's InfoNCE estimate of I(Z_l; Y) (nats), Y = 1 on ``forget_x``,
    0 on ``retain_x`` (both subsampled to the smaller count, so the sample is balanced; a fresh subsample per
    trial). ``net`` is copied, never modified."""
    if critic_init not in ("model", "random"):
        raise ValueError(f"`critic_init` must be 'model' or 'random', got {critic_init!r}")
    if not 0 < holdout < 1:
        raise ValueError(f"`holdout` must be in (0, 1), got {holdout}")
    if trials < 1:
        raise ValueError(f"`trials` must be >= 1, got {trials}")
    layers = list(layers) if layers is not None else default_layers(net)
    net = copy.deepcopy(getattr(net, "net", net)).cpu().eval()
    chain, head = sequential_chain(net, layers)
    check_chain(net, chain, head, retain_x[:4])
    names = [n for n, _ in chain]
    mi = np.zeros((trials, len(layers)))
    counts = sample_counts(len(forget_x), len(retain_x), holdout)
    n, n_eval = counts["per_label"], counts["eval"]
    for t in range(trials):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        xs = torch.cat([forget_x[torch.randperm(len(forget_x), generator=gen)[:n]],
                        retain_x[torch.randperm(len(retain_x), generator=gen)[:n]]])
        ys = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
        order = torch.randperm(2 * n, generator=gen)
        fit, ev = order[n_eval:], order[:n_eval]
        for j, layer in enumerate(layers):
            cut = names.index(layer) + 1
            with torch.no_grad():
                z = xs
                for _, module in chain[:cut]:
                    z = module(z)
            tail = copy.deepcopy([m for _, m in chain[cut:]])
            for m in tail:  # layers l+1..L are trained in f whatever the evaluated net's flags
                m.requires_grad_(True)
            if critic_init == "random":
                for k, m in enumerate(tail):
                    _reset(m, seed + k)
            with torch.no_grad():
                width = _run(tail, z[:2]).shape[1]
            torch.manual_seed(seed * 1000 + t * 100 + j)
            critic = _Critic(tail, width, dim)
            mi[t, j] = infonce_mutual_information(z[fit], ys[fit], z[ev], ys[ev], critic, dim, steps=steps, lr=lr,
                                                  batch_size=batch_size, seed=seed * 1000 + t * 100 + j)
    return layers, mi


def mean_interval(values: Sequence[float] | np.ndarray,
                  level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, low, high)``: the Student-t interval of the mean over trials (axis 0: one entry per column of a 2-d
    array, numpy scalars for 1-d input); ``low`` and ``high`` are NaN for fewer than two trials (no spread can be
    estimated from one)."""
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), got {level!r}")
    v = np.asarray(values, dtype=float)
    mean = v.mean(0)
    if len(v) < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(0, ddof=1) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def bootstrap_ratio_interval(num: np.ndarray, den: np.ndarray, level: float = 0.95, resamples: int = 10000,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)`` resampling paired trials (seeded); NaN for fewer
    than two trials."""
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"`level` in (0, 1) and `resamples` >= 1 required, got {level!r}, {resamples!r}")
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) != len(den):
        raise ValueError(f"`num` and `den` must pair up, got {len(num)} and {len(den)} trials")
    if len(num) < 2:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(num), (resamples, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num[idx].sum(1) / den[idx].sum(1)
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return math.nan, math.nan
    low, high = np.percentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class IDIResult:
    """IDI and its parts; ``mi[model]`` holds per-trial, per-layer estimates (nats); ``idi_interval`` is the 95 %
    paired-bootstrap interval over trials (None for one trial); ``samples`` the sample counts used."""

    idi: float
    id_unlearned: float
    id_original: float
    layers: list[str]
    mi: dict[str, np.ndarray] = field(repr=False)
    idi_trials: list[float] = field(default_factory=list)
    idi_interval: tuple[float, float] | None = None
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def trials(self) -> int:
        return len(next(iter(self.mi.values()))) if self.mi else 0

    @property
    def idi_std(self) -> float:
        """Sample standard deviation of the per-trial IDIs; NaN for one trial (never a zero spread)."""
        return float(np.std(self.idi_trials, ddof=1)) if len(self.idi_trials) > 1 else math.nan

    def curves(self) -> dict[str, list[float]]:
        """Per-layer mean MI of each model."""
        return {k: v.mean(0).tolist() for k, v in self.mi.items()}

    def curve_intervals(self) -> dict[str, list[list[float]] | None]:
        """Per model, per layer: the 95 % t-interval ``[low, high]`` of the mean MI (None for one trial)."""
        out: dict[str, list[list[float]] | None] = {}
        for k, v in self.mi.items():
            _, low, high = mean_interval(v)
            out[k] = None if len(v) < 2 else [[float(a), float(b)] for a, b in zip(low, high)]
        return out

    def to_dict(self) -> dict:
        return {"IDI": self.idi, "IDI_ci95": list(self.idi_interval) if self.idi_interval else None,
                "IDI_std": _or_none(self.idi_std), "trials": self.trials, "ID_unlearned": self.id_unlearned,
                "ID_original": self.id_original, "layers": self.layers, "mi": self.curves(),
                "mi_ci95": self.curve_intervals(), "samples": dict(self.samples)}

    def plot(self, path: str | Path) -> Path:
        """Per-layer MI curves of the three models as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, values in self.mi.items():
            mean, low, high = mean_interval(values)
            yerr = None if len(values) < 2 else np.stack([mean - low, high - mean])
            ax.errorbar(range(len(self.layers)), mean, yerr=yerr, marker="o", label=name, capsize=3)
        ax.axhline(math.log(2), color="grey", ls=":", lw=1, label="log 2")
        ax.set_xticks(range(len(self.layers)), self.layers, rotation=30)
        ax.set_ylabel("I(Z_l; Y) [nats]")
        ci = f" [{self.idi_interval[0]:.2f}, {self.idi_interval[1]:.2f}]" if self.idi_interval else ""
        ax.set_title(f"IDI = {self.idi:.3f}{ci} ({self.trials} trials, 95 % CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def information_difference_index(
    unlearned: nn.Module,
    retrained: nn.Module,
    original: nn.Module,
    forget_data: Tensor,
    retain_data: Tensor,
    layers: Sequence[str] | None = None,
    cache: dict[Any, Any] | None = None,
    plot: str | Path | None = None,
    **estimator: object,
) -> IDIResult:
    """IDI = ID(unlearned) / ID(original), ID(theta) = sum_l [I_theta(Z_l;Y) - I_retrain(Z_l;Y)] (Jeon et al.).

    ``forget_data`` / ``retain_data``: input images of D_f and D_r (all of them: each trial subsamples the larger
    set to a balanced sample). ``estimator``: keyword arguments of :func:`layer_mutual_information` (``trials``,
    default 10; ``steps``, ``critic_init``, ...). Estimates are computed once per distinct model object; pass the
    same ``cache`` dict across calls to reuse the retrained and original ones.
    """
    cache = {} if cache is None else cache
    layers = list(layers) if layers is not None else default_layers(original)
    mi: dict[str, np.ndarray] = {}
    settings = repr((layers, sorted(estimator.items())))  # a cached estimate is reused only with the same settings
    for name, model in (("original", original), ("retrain", retrained), ("unlearned", unlearned)):
        key = (id(model), settings)
        if key not in cache or cache[key][0] is not model:  # the model is kept: its id cannot be reused
            mi_model = layer_mutual_information(model, forget_data, retain_data, layers, **estimator)[1]
            cache[key] = (model, mi_model)
        mi[name] = cache[key][1]
    per_trial_id = {k: (v - mi["retrain"]).sum(1) for k, v in mi.items()}  # ID per trial, Jeon et al. Sec. IDI
    id_u, id_o = float(per_trial_id["unlearned"].mean()), float(per_trial_id["original"].mean())
    if abs(id_o) < 1e-12:
        raise ValueError("ID(original) is 0: the original and retrained models carry the same information; IDI is "
                         "undefined (check that `retrained` never saw the forget data)")
    trials = [float(a / b) for a, b in zip(per_trial_id["unlearned"], per_trial_id["original"]) if abs(b) > 1e-12]
    low, high = bootstrap_ratio_interval(per_trial_id["unlearned"], per_trial_id["original"])
    holdout = float(estimator.get("holdout", 0.3))  # type: ignore[arg-type]
    samples = sample_counts(len(forget_data), len(retain_data), holdout)
    result = IDIResult(idi=id_u / id_o, id_unlearned=id_u, id_original=id_o, layers=layers, mi=mi, idi_trials=trials,
                       idi_interval=None if math.isnan(low) else (low, high), samples=samples)
    if plot is not None:
        result.plot(plot)
    return result
