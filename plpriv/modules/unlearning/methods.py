"""Unlearning methods as LightningModules: COLA (Jeon et al., arXiv 2405.17878) and the standard baselines
(Retrain, FT, GA, RL, l1-sparse, SalUn, SCRUB, Head Distillation), each from an original classifier checkpoint.

Choices the papers leave open are stated in each class's docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from plpriv.data.base import EpochSeededRandomSampler
from plpriv.modules.unlearning.base import FlaggedSubset, UnlearningModule


def _xy(batch: Any) -> tuple[Tensor, Tensor]:
    return batch[0], batch[1]


class Retrain(UnlearningModule):
    """Retrain from scratch on D_r (the gold standard): the original's architecture, re-initialised (seeded)."""

    train_sets = "retain"

    def __init__(self, original: str, epochs: int = 20, lr: float = 0.1, **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)
        torch.manual_seed(self.hparams.forget_seed)
        for module in self.net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def unlearning_loss(self, batch: Any) -> Tensor:
        x, y = _xy(batch)
        return F.cross_entropy(self(x), y)


class FT(UnlearningModule):
    """Fine-tune with cross-entropy on D_r (SalUn: 10 epochs, lr 0.01). It relies on catastrophic forgetting, which
    need not happen: on the digits benchmark (narrow CIFAR-stem ResNet-18, class 0) forget accuracy stays 1.00 after
    the recipe (seeds 0-2) and after 5-10 epochs at lr 0.03-0.1 (seed 0)."""

    train_sets = "retain"

    def __init__(self, original: str, epochs: int = 10, lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)

    def unlearning_loss(self, batch: Any) -> Tensor:
        x, y = _xy(batch)
        return F.cross_entropy(self(x), y)


class L1Sparse(FT):
    """FT + gamma_t * ||theta||_1 (Jia et al. 2023); gamma decays linearly to 0 over the epochs, as in their code.

    Args:
        gamma: initial weight of the l1 penalty (SalUn's code: 5e-4). The penalty sums |theta| over all weights, so
            the gamma that forgets depends on the network: on the digits benchmark (narrow CIFAR-stem ResNet-18,
            10 epochs at lr 0.01) forget accuracy after 5e-4 / 5e-3 / 1e-2 / 2e-2 was 1.00 / 0.99 / 0.24-0.50 /
            0.00 (test 0.92-0.96, seeds 0-2).
    """

    def __init__(self, original: str, gamma: float = 5e-4, **kwargs: Any) -> None:
        super().__init__(original, **kwargs)
        if gamma < 0:
            raise ValueError(f"`gamma` must be >= 0, got {gamma!r}")
        self.gamma = gamma

    def unlearning_loss(self, batch: Any) -> Tensor:
        gamma = self.gamma * (1 - self.current_epoch / self.hparams.epochs)  # linear decay, Jia et al. 2023 code
        l1 = sum(p.abs().sum() for p in self.net.parameters())
        return super().unlearning_loss(batch) + gamma * l1  # l1-sparse objective, Jia et al. 2023 Eq. 5


class GA(UnlearningModule):
    """Gradient ascent on the cross-entropy over D_f (SalUn: 5 epochs, lr 1e-4; raised here to 5e-4 by default,
    which the facts allow when forget accuracy does not drop)."""

    train_sets = "forget"

    def __init__(self, original: str, epochs: int = 5, lr: float = 5e-4, **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)

    def unlearning_loss(self, batch: Any) -> Tensor:
        x, y = _xy(batch)
        return -F.cross_entropy(self(x), y)  # ascend the forget loss (Thudi et al. 2022)


class RL(UnlearningModule):
    """Random labels: D_f samples get a random wrong label (a fresh draw every step), D_r keeps its labels; D_f and
    D_r are shuffled together (the facts' "D_f then D_r" each epoch, mixed within the epoch)."""

    train_sets = "both"

    def __init__(self, original: str, epochs: int = 10, lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)

    def unlearning_loss(self, batch: Any) -> Tensor:
        x, y, is_forget = batch
        y = torch.where(is_forget.bool(), self.random_other_labels(y), y)
        return F.cross_entropy(self(x), y)


def saliency_masks(scores: dict[str, Tensor], keep: float) -> dict[str, Tensor]:
    """0/1 masks keeping exactly ``max(1, round(keep * n))`` of the n entries with the largest scores (global over
    all tensors); ties (e.g. the many exact zeros of weights no gradient reaches) go to the earlier entry."""
    if not 0 < keep <= 1:
        raise ValueError(f"`keep` must be in (0, 1], got {keep!r}")
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    count = max(1, round(keep * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat.cpu(), descending=True, stable=True)[:count]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start:start + s.numel()].view_as(s).to(s.device, torch.float32)
        start += s.numel()
    return masks


class SalUn(RL):
    """Saliency unlearning (Fan et al. 2024): mask_i = 1 for the ``keep`` fraction of weights with the largest
    |d CE(D_f) / d theta_i| (global over all parameters, exactly that fraction: ties broken by position), then RL
    with masked gradients. The mask is computed once at the start of the run and saved in the checkpoint (a resumed
    run keeps it). Use a network whose every weight sees the forget data (e.g. ``stem="cifar"`` ResNets on small
    images): weights that no gradient reaches score 0 and fill the mask by position."""

    def __init__(self, original: str, keep: float = 0.5, **kwargs: Any) -> None:
        super().__init__(original, **kwargs)
        if not 0 < keep <= 1:
            raise ValueError(f"`keep` must be in (0, 1], got {keep!r}")
        self.keep = keep
        self.masks: dict[str, Tensor] = {}

    def on_fit_start(self) -> None:
        if self.masks:
            return  # restored from the checkpoint
        self.net.zero_grad(set_to_none=True)
        loader = torch.utils.data.DataLoader(self.split("forget"), batch_size=self.hparams.batch_size)
        for x, y, _ in loader:
            # saliency: |grad of the forget loss summed over D_f|, Fan et al. 2024 Eq. 6
            F.cross_entropy(self(x.to(self.device)), y.to(self.device), reduction="sum").backward()
        grads = {n: p.grad.abs() for n, p in self.net.named_parameters() if p.grad is not None}
        self.masks = saliency_masks(grads, self.keep)
        self.net.zero_grad(set_to_none=True)

    def on_after_backward(self) -> None:
        for name, p in self.net.named_parameters():
            if p.grad is not None and name in self.masks:
                p.grad.mul_(self.masks[name].to(p.grad.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["salun_masks"] = {n: m.cpu() for n, m in self.masks.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.masks = dict(checkpoint.get("salun_masks", {}))


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2 (Hinton et al. 2015; SCRUB's DistillKL), batch mean.
    Teacher logits may be -inf (HD's masked classes): those classes have p_teacher = 0 and add 0 (0 log 0 = 0),
    where ``F.kl_div`` would give 0 * (-inf) = NaN."""
    t = temperature
    p_teacher = F.softmax(teacher_logits / t, 1)
    kl = torch.xlogy(p_teacher, p_teacher) - p_teacher * F.log_softmax(student_logits / t, 1)
    return kl.sum(1).mean() * t * t


class _ForgetThenRetainBatches(Sampler[list[int]]):
    """Batches of positions in a ``forget + retain`` dataset (the forget samples first): every epoch, D_f shuffled in
    batches of ``forget_batch_size``, then D_r shuffled in batches of ``batch_size`` (SCRUB's max-pass then
    min-pass). The order depends only on ``(seed, epoch)``: Lightning sets the epoch on ``self.sampler``."""

    def __init__(self, n_forget: int, n_retain: int, forget_batch_size: int, batch_size: int, seed: int) -> None:
        self.n_forget, self.n_retain = n_forget, n_retain
        self.forget_batch_size, self.batch_size = forget_batch_size, batch_size
        self.sampler = EpochSeededRandomSampler(range(n_forget + n_retain), seed=seed)  # holds seed and epoch

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.sampler.seed * 1000003 + self.sampler.epoch)
        forget = torch.randperm(self.n_forget, generator=gen).tolist()
        retain = (torch.randperm(self.n_retain, generator=gen) + self.n_forget).tolist()
        for order, size in ((forget, self.forget_batch_size), (retain, self.batch_size)):
            yield from (order[i:i + size] for i in range(0, len(order), size))

    def __len__(self) -> int:
        return -(-self.n_forget // self.forget_batch_size) - (-self.n_retain // self.batch_size)


class SCRUB(UnlearningModule):
    """SCRUB (Kurmanji et al. 2023), with its own schedule: the student starts as the teacher (the original); each
    epoch is a pass of max-steps over D_f (ascend KL(teacher || student), batches of ``forget_batch_size``; only in
    the first ``max_epochs`` epochs), then a pass of min-steps over D_r (descend ``alpha`` KL + ``gamma`` CE).
    Manual optimisation, one SGD optimiser (momentum, weight decay). Defaults as the reference code (T 4, forget
    batches 32, max-steps in 2 epochs) except alpha = gamma = 1 (its CIFAR notebook: 0.001 / 0.99; on digits that
    left test accuracy at 61-92 % over 3 seeds against 97-98 % with 1 / 1).

    With GroupNorm (no train/eval difference) the student equals the teacher at the first max-step, where the KL
    gradient is exactly zero (in the reference code BatchNorm's batch statistics make them differ): weight decay moves
    the student off the teacher, the max-steps grow the difference about exponentially, then the KL explodes. SCRUB
    forgets without wrecking the network only when the max-steps end soon after that escape: tune ``lr``,
    ``forget_batch_size`` and ``max_epochs`` together (benchmarks/unlearning.py states the digits settings).
    """

    train_sets = "both"  # in its own order: see train_dataloader

    def __init__(self, original: str, epochs: int = 5, lr: float = 0.005, max_epochs: int = 2, alpha: float = 1.0,
                 gamma: float = 1.0, temperature: float = 4.0, forget_batch_size: int = 32,
                 **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)
        if not 0 <= max_epochs <= epochs or forget_batch_size < 1 or temperature <= 0:
            raise ValueError(f"`max_epochs` in 0..epochs ({epochs}), `forget_batch_size` >= 1 and `temperature` > 0 "
                             f"required, got {max_epochs!r}, {forget_batch_size!r}, {temperature!r}")
        self.automatic_optimization = False
        self.max_epochs, self.alpha, self.gamma, self.temperature = max_epochs, alpha, gamma, temperature
        self.forget_batch_size = forget_batch_size
        self.teacher = self.original_net()

    def train_dataloader(self) -> DataLoader:
        data = self._require_data()
        dataset = FlaggedSubset(data.train_dataset, self.forget_indices + self.retain_indices, set(self.forget_indices))
        batches = _ForgetThenRetainBatches(len(self.forget_indices), len(self.retain_indices), self.forget_batch_size,
                                           self.hparams.batch_size, self.hparams.forget_seed)
        return DataLoader(dataset, batch_sampler=batches)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y, is_forget = batch
        self.teacher.eval()
        with torch.no_grad():
            teacher = self.teacher(x)
        if bool(is_forget[0]):  # batches are all-forget or all-retain
            if self.current_epoch >= self.max_epochs:
                return None  # max-steps only in the first max_epochs epochs
            loss = -_kl(self(x), teacher, self.temperature)  # max-step: move away from the teacher on D_f
            self.log("train/forget_kl", -loss, prog_bar=True, batch_size=len(y))
        else:
            logits = self(x)
            loss = self.alpha * _kl(logits, teacher, self.temperature) + self.gamma * F.cross_entropy(logits, y)
            self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())


class HeadDistillation(UnlearningModule):
    """Head Distillation (Jeon et al.): freeze the encoder, re-initialise and retrain only the classifier head by
    KL distillation towards the original's logits with the forget classes' logits at -inf, on D_r u D_f (class-wise
    forgetting only). The baseline that looks forgotten on output metrics while its encoder is unchanged."""

    train_sets = "both"

    def __init__(self, original: str, epochs: int = 5, lr: float = 0.01, temperature: float = 1.0,
                 reinit_head: bool = True, **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)
        if self.hparams.forget_classes is None:
            raise ValueError("HeadDistillation masks the forget classes' logits: it needs `forget_classes`, not "
                             "`forget_fraction`")
        self.temperature = temperature
        self.teacher = self.original_net()
        encoder, head = self.encoder_and_head()
        encoder.requires_grad_(False)
        if reinit_head:
            torch.manual_seed(self.hparams.forget_seed)
            head.reset_parameters()

    def unlearning_loss(self, batch: Any) -> Tensor:
        x = batch[0]
        self.teacher.eval()
        encoder, _ = self.encoder_and_head()
        encoder.eval()  # frozen encoder: also its normalisation statistics
        with torch.no_grad():
            target = self.forget_mask_logits(self.teacher(x))  # masked teacher, Jeon et al. (HD)
        return _kl(self(x), target, self.temperature)


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2, L_out), hand-written: no SupCon in the project's
    dependencies. ``features``: [N, d] (normalised here); anchors without positives are skipped."""
    z = F.normalize(features, dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # log softmax over all a != i
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    has = count > 0
    # L = -1/|P(i)| sum_{p in P(i)} log softmax_ip, mean over anchors, Khosla et al. 2020 Eq. 2
    return -(log_prob.masked_fill(~positives, 0).sum(1)[has] / count[has]).mean()


def _shift(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Random integer translation per sample, padded with the background value -1 (a second SupCon view)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class COLA(UnlearningModule):
    """COLlapse-and-Align (Jeon et al.). Collapse (first ``collapse_epochs``): supervised contrastive loss on D_r
    only, encoder + a projection head (Linear-ReLU-Linear); two views per sample (the image and a random
    translation by up to ``max_shift`` pixels). Forget samples have no positives, so their features fall into the
    retain clusters. Align (the remaining epochs): cross-entropy fine-tuning of the whole network on D_r.

    Defaults (10 epochs, 8 of them collapse, SGD lr 0.05) were tuned on digits / class 0 (benchmarks/unlearning.py):
    3 + 3 epochs at lr 0.01 left UA at 8.5%, 4 + 2 at lr 0.05 at 62%.
    With the CIFAR stem they no longer forget (UA 5.4%); benchmarks/unlearning.py uses ``proj_dim=0,
    reinit_head=True`` there (its comment gives the measurements).

    Args:
        collapse_epochs: epochs of the collapse stage (``epochs`` counts both stages).
        temperature: SupCon temperature.
        proj_dim: output size of the projection head; 0: no projection head (SupCon on the encoder's features).
        max_shift: largest translation (pixels) of the second view.
        reinit_head: re-initialise the classifier head (seeded) when the align stage starts, as SupCon trains a fresh
            linear classifier on its features (Khosla et al. 2020); [gap] in the paper, off by default.
    """

    train_sets = "retain"

    def __init__(self, original: str, epochs: int = 10, collapse_epochs: int = 8, lr: float = 0.05,
                 temperature: float = 0.1, proj_dim: int = 64, max_shift: int = 1, reinit_head: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(original, epochs=epochs, lr=lr, **kwargs)
        if not 0 < collapse_epochs < epochs:
            raise ValueError(f"`collapse_epochs` must be in 1..epochs-1 ({epochs - 1}), got {collapse_epochs!r}")
        if not isinstance(reinit_head, bool):
            raise TypeError(f"`reinit_head` must be a bool, got {type(reinit_head).__name__}")
        self.collapse_epochs, self.temperature, self.max_shift = collapse_epochs, temperature, max_shift
        self.reinit_head = reinit_head
        width = self.net.num_features if hasattr(self.net, "num_features") else None
        if width is None:
            raise TypeError(f"{type(self.net).__name__} has no `num_features`: use a timm model or SmallCNN")
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 0:
            raise ValueError(f"`proj_dim` must be an int >= 0 (0: SupCon on the encoder features), got {proj_dim!r}")
        self.projection = (nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, proj_dim)) if proj_dim
                           else nn.Identity())

    def on_train_epoch_start(self) -> None:
        if self.reinit_head and self.current_epoch == self.collapse_epochs:  # align starts (a resume: at an epoch end)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.hparams.forget_seed)
                self.encoder_and_head()[1].reset_parameters()

    def unlearning_loss(self, batch: Any) -> Tensor:
        x, y = _xy(batch)
        if self.current_epoch >= self.collapse_epochs:
            return F.cross_entropy(self(x), y)  # align stage
        gen = torch.Generator().manual_seed(self.hparams.forget_seed * 7919 + self.global_step)
        views = torch.cat([x, _shift(x.cpu(), gen, self.max_shift).to(x.device)])
        encoder, _ = self.encoder_and_head()
        return supcon_loss(self.projection(encoder(views)), torch.cat([y, y]), self.temperature)  # collapse stage


METHODS: dict[str, type[UnlearningModule]] = {
    "Retrain": Retrain, "FT": FT, "GA": GA, "RL": RL, "l1-sparse": L1Sparse, "SalUn": SalUn, "SCRUB": SCRUB,
    "HD": HeadDistillation, "COLA": COLA,
}
