"""Configuration of ``plpriv audit`` (dataclasses parsed by jsonargparse from ``recipes/audit/*.yaml``).

The protocol options (see :class:`AuditConfig`): the initialisation every model starts from (``init``), how the
canaries share models (``canaries_per_model``), the number of models per side and split, the crafting of the
``crafted`` canary (the query input of Yoon et al. 2024, or the older inserted variant ``crafted_insert``), the
scores, and the one-step sanity setting (``sanity``).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule, LightningModule

from plpriv.privacy.canaries import CANARY_KINDS, SCORE_HIGHER_IS_IN

__all__ = ["AuditConfig", "CraftingConfig", "PretrainConfig", "SanityConfig", "SettingSpec", "fingerprint"]

#: Canary names accepted in ``canaries``: the kinds of :mod:`plpriv.privacy.canaries` plus ``crafted_insert``.
CANARY_NAMES: tuple[str, ...] = (*CANARY_KINDS, "crafted_insert")
FORMAT_VERSION = 2


@dataclass
class CraftingConfig:
    """Crafting of the ``crafted`` canaries, and the craft split of models.

    Args:
        per_side: models per side of the *craft* split of every setting: OUT models (no canary: the canaries'
            labels, the white-box directions and the OUT models of the crafting objective) and, for ``crafted``,
            as many IN models trained with the blank canary. Disjoint from the reference and evaluation models.
        steps: Adam steps on the input (``crafted``: once; ``crafted_insert``: per round).
        lr: Adam learning rate on the input (pixels live in [-1, 1]).
        max_change: optional L-infinity bound on the change of the input (per round).
        variance_floor: added to the pooled loss variance of the objective's denominator, as a fraction of the
            pooled variance at the starting input (scale-free: small learning rates give small loss differences).
        rounds: ``crafted_insert`` only: rounds of (train ``shadow_in`` models with the current input, optimise it).
        shadow_in: ``crafted_insert`` only: models trained with the current input per round.
    """

    per_side: int = 16
    steps: int = 50
    lr: float = 0.05
    max_change: float | None = None
    variance_floor: float = 0.01
    rounds: int = 2
    shadow_in: int = 8


@dataclass
class PretrainConfig:
    """Non-private pretraining of the initialisation (``init: pretrained``), on a split disjoint from the audit.

    Args:
        fraction: share of the datamodule's training set used for pretraining (the rest is the audited set D).
        epochs: passes over the pretraining split.
        lr: Adam learning rate.
        batch_size: minibatch size of the pretraining loop.
    """

    fraction: float = 0.5
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64


@dataclass
class SanityConfig:
    """The one-step sanity setting: T = 1 step of full-batch DP-GD is exactly (1/sigma)-GDP and the white-box score
    then is an equal-variance Gaussian, so its mu estimate must match 1/sigma (2.0 at epsilon 10, delta 1e-5).

    Args:
        enabled: add the setting ``sanity_t1`` (needs q = 1).
        epsilon: its theoretical epsilon (the noise is calibrated by DPSGD).
        canary: the canary it audits (one whose gradient is clipped: ``blank`` or ``mislabeled``).
        reference_per_side, eval_per_side: models per side (one step is cheap: use many).
        tolerance: ``|mu_hat - 1/sigma|`` allowed before the row is flagged (above: a DP-SGD bug when the
            confidence interval also lies above; below: the audit loses signal).
    """

    enabled: bool = True
    epsilon: float = 10.0
    canary: str = "blank"
    reference_per_side: int = 100
    eval_per_side: int = 400
    tolerance: float = 0.15


@dataclass(frozen=True)
class SettingSpec:
    """One audited setting: a theoretical epsilon (``None``: noise off), its steps, canaries and model counts."""

    name: str
    target_epsilon: float | None
    max_epochs: int
    canaries: tuple[str, ...]
    reference: int  # models per side
    eval: int
    craft: int
    kind: Literal["audit", "noise_off", "sanity"] = "audit"


@dataclass
class AuditConfig:
    """An audit of DP-SGD (``plpriv audit -c recipes/audit/digits.yaml``).

    Args:
        model: the LightningModule to audit; ``model(x)`` must return class logits (scores use cross-entropy).
        data: a LightningDataModule whose ``setup("fit")`` fills ``train_dataset`` and ``test_dataset`` (or
            ``val_dataset``: held-out images the canaries come from) with ``(x, y)`` items; its ``batch_size`` B is
            the DP-SGD divisor, and q = B / N (N without canaries) is passed to DPSGD as a public constant.
        out_dir: models, report.json, report.md and the PNGs go here; rerunning resumes.
        epsilons: theoretical epsilons to audit (the noise is calibrated by DPSGD's ``target_epsilon``).
        noise_off: also audit with ``noise_multiplier=0`` (sanity: the bound must then be large).
        canaries: any of ``mislabeled``, ``blank``, ``in_distribution`` (the held-out image the craft-split models
            find hardest, true label), ``crafted`` (Yoon et al.: the blank canary is trained on, the *query* input
            is crafted on the craft split) and ``crafted_insert`` (a crafted input inserted into training).
        scores: any of ``loss``, ``margin`` (black-box) and ``white_box`` (<theta_T - theta_0, g>).
        init: ``random`` (a seeded initialisation per model), ``fixed`` (one seeded initialisation for all) or
            ``pretrained`` (one initialisation trained non-privately on a split disjoint from the audited data).
        pretrain: see :class:`PretrainConfig` (``init: pretrained``).
        canaries_per_model: ``one`` (each IN model holds one canary; OUT models hold none and serve every canary)
            or ``all`` (every model holds each canary with probability 1/2, balanced per split).
        reference_per_side: models per side (IN / OUT) that choose the thresholds (and the black-box score).
        eval_per_side: models per side the reported bounds are computed on.
        per_side: per-setting ``[reference, eval]`` overrides, e.g. ``{eps2: [30, 90], noise_off: [4, 16]}``.
        max_epochs: training epochs of every model (q = 1: one step per epoch).
        train_size: use only the first ``train_size`` examples of the audited set (quick runs); ``None``: all.
        max_grad_norm, target_delta, accountant, grad_sample_mode: passed to :class:`plpriv.callbacks.DPSGD`.
        crafting: see :class:`CraftingConfig`.
        sanity: see :class:`SanityConfig`.
        confidence: confidence of every bound.
        accelerator: Lightning accelerator of every model (tiny models: ``cpu``).
        seed: seeds the canaries, inclusion, DP-SGD sampling / noise, initialisation and pretraining.
        workers: parallel training processes (0: train in this process).
        progress: show progress bars.
    """

    model: LightningModule
    data: LightningDataModule
    out_dir: str = "runs/audit"
    epsilons: list[float] = field(default_factory=lambda: [2.0, 4.0, 10.0])
    noise_off: bool = True
    canaries: list[str] = field(default_factory=lambda: ["mislabeled", "blank", "in_distribution", "crafted"])
    scores: list[str] = field(default_factory=lambda: ["loss", "margin", "white_box"])
    init: Literal["random", "fixed", "pretrained"] = "fixed"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    canaries_per_model: Literal["one", "all"] = "one"
    reference_per_side: int = 40
    eval_per_side: int = 160
    per_side: dict[str, list[int]] | None = None
    max_epochs: int = 10
    train_size: int | None = None
    max_grad_norm: float = 1.0
    target_delta: float = 1e-5
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    crafting: CraftingConfig = field(default_factory=CraftingConfig)
    sanity: SanityConfig = field(default_factory=SanityConfig)
    confidence: float = 0.95
    accelerator: str = "cpu"
    seed: int = 0
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, LightningModule):
            raise TypeError(f"`model` must be a LightningModule, got {type(self.model).__name__}.")
        if not isinstance(self.data, LightningDataModule):
            raise TypeError(f"`data` must be a LightningDataModule, got {type(self.data).__name__}.")
        self.epsilons = [float(e) for e in self.epsilons]
        bad = [e for e in self.epsilons if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"`epsilons` must be finite and > 0, got {bad}.")
        if len(set(self.epsilons)) != len(self.epsilons):
            raise ValueError(f"`epsilons` has duplicates: {self.epsilons}.")
        if not self.epsilons and not self.noise_off and not self.sanity.enabled:
            raise ValueError("Nothing to audit: give `epsilons`, set `noise_off: true` or enable `sanity`.")
        unknown = [c for c in self.canaries if c not in CANARY_NAMES]
        if unknown or not self.canaries or len(set(self.canaries)) != len(self.canaries):
            raise ValueError(f"`canaries` must be distinct names from {CANARY_NAMES}, got {self.canaries}.")
        unknown = [s for s in self.scores if s not in SCORE_HIGHER_IS_IN]
        if unknown or not self.scores or len(set(self.scores)) != len(self.scores):
            raise ValueError(f"`scores` must be distinct names from {sorted(SCORE_HIGHER_IS_IN)}, got {self.scores}.")
        if self.init not in ("random", "fixed", "pretrained"):
            raise ValueError(f"`init` must be 'random', 'fixed' or 'pretrained', got {self.init!r}.")
        if self.canaries_per_model not in ("one", "all"):
            raise ValueError(f"`canaries_per_model` must be 'one' or 'all', got {self.canaries_per_model!r}.")
        for name in ("max_epochs", "reference_per_side", "eval_per_side"):
            check_int(name, getattr(self, name), 1)
        check_int("workers", self.workers, 0)
        check_int("seed", self.seed, 0)
        if self.train_size is not None:
            check_int("train_size", self.train_size, 2)
        known = {f"eps{e:g}" for e in self.epsilons} | {"noise_off", "sanity_t1"}
        for key, counts in (self.per_side or {}).items():
            if key not in known:
                raise ValueError(f"`per_side` names an unknown setting {key!r}; settings: {sorted(known)}.")
            if len(counts) != 2:
                raise ValueError(f"`per_side.{key}` must be [reference, eval], got {counts}.")
            for v in counts:
                check_int(f"per_side.{key}", v, 1)
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"`max_grad_norm` must be > 0, got {self.max_grad_norm}.")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"`target_delta` must be in (0, 1), got {self.target_delta}.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {self.confidence}.")
        c = self.crafting
        check_int("crafting.per_side", c.per_side, 1)
        check_int("crafting.steps", c.steps, 1)
        if "crafted_insert" in self.canaries:
            check_int("crafting.shadow_in", c.shadow_in, 1)
            check_int("crafting.rounds", c.rounds, 1)
        if not c.lr > 0:
            raise ValueError(f"`crafting.lr` must be > 0, got {c.lr}.")
        if not c.variance_floor > 0:
            raise ValueError(f"`crafting.variance_floor` must be > 0, got {c.variance_floor}.")
        p = self.pretrain
        if self.init == "pretrained":
            if not 0 < p.fraction < 1:
                raise ValueError(f"`pretrain.fraction` must be in (0, 1), got {p.fraction}.")
            check_int("pretrain.epochs", p.epochs, 1)
            check_int("pretrain.batch_size", p.batch_size, 1)
            if not p.lr > 0:
                raise ValueError(f"`pretrain.lr` must be > 0, got {p.lr}.")
        s = self.sanity
        if s.enabled:
            if s.canary not in ("mislabeled", "blank", "in_distribution"):
                raise ValueError(f"`sanity.canary` must be mislabeled, blank or in_distribution, got {s.canary!r}.")
            check_int("sanity.reference_per_side", s.reference_per_side, 2)
            check_int("sanity.eval_per_side", s.eval_per_side, 2)
            if not (math.isfinite(s.epsilon) and s.epsilon > 0):
                raise ValueError(f"`sanity.epsilon` must be finite and > 0, got {s.epsilon}.")
            if not s.tolerance > 0:
                raise ValueError(f"`sanity.tolerance` must be > 0, got {s.tolerance}.")

    def settings(self) -> list[SettingSpec]:
        """The audited settings in order: ``eps<e>`` for each epsilon, ``noise_off``, ``sanity_t1``."""
        over = self.per_side or {}
        base = (self.reference_per_side, self.eval_per_side)
        canaries = tuple(self.canaries)
        craft = self.crafting.per_side
        out = [
            SettingSpec(f"eps{e:g}", e, self.max_epochs, canaries, *over.get(f"eps{e:g}", base), craft)
            for e in self.epsilons
        ]
        if self.noise_off:
            out.append(SettingSpec("noise_off", None, self.max_epochs, canaries, *over.get("noise_off", base), craft,
                                   "noise_off"))
        if self.sanity.enabled:
            s = self.sanity
            counts = over.get("sanity_t1", (s.reference_per_side, s.eval_per_side))
            out.append(SettingSpec("sanity_t1", s.epsilon, 1, (s.canary,), *counts, craft, "sanity"))
        return out


def check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return int(value)


# Everything that changes what a saved model means; the rest (counts, epsilons, workers, ...) may change on resume.
_FINGERPRINT_KEYS = (
    "canaries", "max_epochs", "train_size", "max_grad_norm", "target_delta", "accountant", "grad_sample_mode",
    "init", "pretrain", "canaries_per_model", "crafting", "accelerator", "seed",
)


def _describe(obj: Any) -> dict[str, Any]:
    """Class path and hyper-parameters of a module / datamodule: ``hparams``, else the attributes named like its
    constructor's arguments (plain values only)."""
    hp = getattr(obj, "hparams", None)
    if hp:
        items = dict(hp)
    else:
        names = inspect.signature(type(obj).__init__).parameters
        items = {k: getattr(obj, k) for k in names if k != "self" and hasattr(obj, k)}
    plain = {k: v for k, v in items.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))}
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **json.loads(json.dumps(plain, default=str))}


def _describe_callable(fn: Any) -> Any:
    """A process-independent description of an optimizer factory (classes by name, plain keyword values)."""
    if fn is None:
        return None
    classes = [a for a in (getattr(fn, "func", fn), *getattr(fn, "args", ())) if isinstance(a, type)]
    keywords = {k: v for k, v in getattr(fn, "keywords", {}).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"classes": [f"{c.__module__}.{c.__qualname__}" for c in classes], **keywords}


def fingerprint(cfg: AuditConfig) -> dict[str, Any]:
    """What the saved models of ``cfg.out_dir`` depend on (a resumed audit must match it)."""
    fp = {k: (asdict(v) if k in ("crafting", "pretrain") else v) for k in _FINGERPRINT_KEYS for v in [getattr(cfg, k)]}
    if cfg.init != "pretrained":
        fp.pop("pretrain")
    # the crafting steps only change the query input, which is recomputed from saved models: not part of the meaning
    if "crafted_insert" not in cfg.canaries:
        fp["crafting"] = {"per_side": cfg.crafting.per_side}
    if cfg.sanity.enabled:  # the sanity_t1 models depend on its epsilon and canary, not on its counts
        fp["sanity"] = {"epsilon": cfg.sanity.epsilon, "canary": cfg.sanity.canary}
    return {
        "format": FORMAT_VERSION,
        "model": _describe(cfg.model),
        "optimizer": _describe_callable(getattr(cfg.model, "optimizer_factory", None)),
        "data": _describe(cfg.data),
        **fp,
    }
