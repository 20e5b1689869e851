"""Standard unlearning metrics (SalUn conventions) and the relearn probe of Jeon et al.

UA = 100 - Acc(D_f), RA = Acc(D_r), TA = test accuracy (remaining classes for class-wise forgetting), all in %.
MIA-Efficacy (Fan et al. 2024 / Jia et al. 2023): an RBF SVC (C=3, gamma="auto") on the confidence p(true label),
fitted on a shadow set (retain samples: member 1, test samples: non-member 0, balanced), applied to D_f; the
percentage of D_f predicted non-member. For class-wise forgetting it is ~100 for every method that forgets the class,
so it cannot rank methods there. Loss-threshold MIA: the loss threshold that best separates the same shadow set,
applied to D_f (percentage predicted non-member). MIA AUC (forget vs unseen): the ROC AUC of the score -loss between
D_f (positives) and unseen test samples of the same classes (negatives); Retrain never saw either (~0.5), a model
that still remembers D_f gives it lower losses than unseen samples (> 0.5); compare as the gap to Retrain's AUC.
Relearn: re-initialise the head, train it alone on a random 2 % (at least ``min_samples``) of the training data
(D_r u D_f) on frozen features, report the forget accuracy (%) on every D_f sample, per seed and averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from plpriv.metrics.idi import check_chain, sequential_chain

__all__ = ["average_gap", "forget_vs_unseen_auc", "loss_threshold_mia", "mia_efficacy", "predict", "relearn_probe",
           "relearn_trials", "roc_auc", "unlearning_metrics"]


@torch.no_grad()
def predict(net: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of ``net`` on a dataset of ``(x, y, ...)`` items (eval mode, on net's device)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits.append(net(batch[0].to(device)).float().cpu())
        labels.append(torch.as_tensor(batch[1]).long())
    net.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def _balanced(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    return rng.permutation(a)[:n], rng.permutation(b)[:n]


def mia_efficacy(conf_retain: np.ndarray, conf_test: np.ndarray, conf_forget: np.ndarray, seed: int = 0) -> float:
    """% of D_f that an SVC on the confidence feature, fitted on retain (member) vs test (non-member), calls
    non-member (SalUn's MIA-Efficacy)."""
    from sklearn.svm import SVC

    members, non_members = _balanced(conf_retain, conf_test, seed)
    x = np.concatenate([members, non_members])[:, None]
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(100.0 * (clf.predict(conf_forget[:, None]) == 0).mean())


def loss_threshold_mia(loss_retain: np.ndarray, loss_test: np.ndarray, loss_forget: np.ndarray, seed: int = 0) -> float:
    """% of D_f above the loss threshold (non-member) that best separates retain (low loss) from test (Yeom et al.
    2018), on the balanced shadow set."""
    members, non_members = _balanced(loss_retain, loss_test, seed)
    candidates = np.unique(np.concatenate([members, non_members]))
    acc = [((members <= t).sum() + (non_members > t).sum()) for t in candidates]
    threshold = candidates[int(np.argmax(acc))]
    return float(100.0 * (loss_forget > threshold).mean())


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher = positive): P(s_pos > s_neg) + P(s_pos = s_neg) / 2, from the
    Mann-Whitney U statistic with average ranks for ties."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(positive, dtype=float).ravel(), np.asarray(negative, dtype=float).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUC needs positive and negative scores, got {len(pos)} and {len(neg)}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("AUC scores must be finite")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def forget_vs_unseen_auc(loss_forget: np.ndarray, loss_unseen: np.ndarray) -> float:
    """MIA AUC of the loss attack (Yeom et al. 2018) between D_f (members of the original's training set) and unseen
    samples of the same classes: score -loss, so AUC > 0.5 when D_f has lower losses. Confidence p(true label) =
    exp(-loss) is monotone in it: the confidence attack has the same AUC."""
    return roc_auc(-np.asarray(loss_forget, dtype=float), -np.asarray(loss_unseen, dtype=float))


def _confidence_and_loss(net: nn.Module, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, float]:
    logits, y = predict(net, dataset)
    loss = F.cross_entropy(logits, y, reduction="none")
    return torch.exp(-loss).numpy(), loss.numpy(), float(100.0 * (logits.argmax(1) == y).float().mean())


def unlearning_metrics(net: nn.Module, forget: Dataset, retain: Dataset, test: Dataset, seed: int = 0,
                       unseen: Dataset | None = None) -> dict[str, float]:
    """UA, RA, TA, MIA (SalUn's MIA-Efficacy) and MIA_loss (loss-threshold), all in %; with ``unseen`` (test samples
    of the forget classes, or any held-out samples like D_f) also MIA_AUC, the forget-vs-unseen loss-attack AUC."""
    conf_f, loss_f, acc_f = _confidence_and_loss(net, forget)
    conf_r, loss_r, acc_r = _confidence_and_loss(net, retain)
    conf_t, loss_t, acc_t = _confidence_and_loss(net, test)
    out = {"UA": 100.0 - acc_f, "RA": acc_r, "TA": acc_t, "MIA": mia_efficacy(conf_r, conf_t, conf_f, seed),
           "MIA_loss": loss_threshold_mia(loss_r, loss_t, loss_f, seed)}
    if unseen is not None:
        out["MIA_AUC"] = forget_vs_unseen_auc(loss_f, _confidence_and_loss(net, unseen)[1])
    return out


def relearn_probe(net: nn.Module, train: Dataset, forget: Dataset, fraction: float = 0.02, min_samples: int = 100,
                  seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int = 100, lr: float = 0.02) -> float:
    """Mean over ``seeds`` of :func:`relearn_trials` (forget accuracy in %)."""
    return float(np.mean(relearn_trials(net, train, forget, fraction, min_samples, seeds, steps, lr)))


def relearn_trials(net: nn.Module, train: Dataset, forget: Dataset, fraction: float = 0.02, min_samples: int = 100,
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int = 100, lr: float = 0.02) -> list[float]:
    """Forget accuracy (%) on every sample of ``forget`` after re-initialising the classifier head and training only
    it (Adam, full batch, on frozen encoder features) on ``max(min_samples, fraction * len(train))`` random samples of
    ``train`` (the paper's 2 %; at least ``min_samples`` so that small data sets hold enough forget samples), one
    value per seed (a fresh subset and head each)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int):
        raise TypeError(f"`min_samples` must be an int, got {type(min_samples).__name__}")
    if min_samples < 2 or not seeds:
        raise ValueError(f"`min_samples` >= 2 and at least one seed required, got {min_samples!r}, {seeds!r}")
    net = getattr(net, "net", net)
    chain, head = sequential_chain(net)
    encoder = nn.Sequential(*[m for _, m in chain], nn.Flatten())
    x_probe = next(iter(DataLoader(forget, batch_size=4)))[0]
    check_chain(net, chain, head, x_probe.to(next(net.parameters()).device))
    feats_forget, y_forget = predict(encoder, forget)
    accs: list[float] = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        n = min(len(train), max(min_samples, round(fraction * len(train))))  # type: ignore[arg-type]
        idx = torch.randperm(len(train), generator=gen)[:n].tolist()  # type: ignore[arg-type]
        feats, labels = predict(encoder, Subset(train, idx))
        torch.manual_seed(seed)
        probe = nn.Linear(feats.shape[1], head.out_features)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(probe(feats), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs.append(float(100.0 * (probe(feats_forget).argmax(1) == y_forget).float().mean()))
    return accs


def average_gap(metrics: dict[str, float], reference: dict[str, float],
                keys: Sequence[str] = ("UA", "RA", "TA", "MIA")) -> float:
    """Avg. Gap = mean_k |metric_k - Retrain's metric_k| (SalUn)."""
    return float(np.mean([abs(metrics[k] - reference[k]) for k in keys]))


def tensor_of(dataset: Dataset, limit: int | None = None) -> Tensor:
    """The inputs of a dataset as one tensor (IDI's forget / retain data), at most ``limit`` (the first ones)."""
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))  # type: ignore[arg-type]
    return torch.cat([b[0] for b in DataLoader(dataset, batch_size=512)])
