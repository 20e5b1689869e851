"""Periodic memorization monitoring from the sharpness of the learned log density (Jeon et al., ICML 2025)."""

from __future__ import annotations

import csv
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from plpriv.metrics.hessian import hessian_scores, log_density_hessian_eigs
from plpriv.metrics.replication import ReplicationScore
from plpriv.privacy.contract import find_private_training
from plpriv.sampling.edm import edm_sampler
from plpriv.utils.figures import figure, run_dir, save_and_log_figure

__all__ = ["MemorizationMonitor"]

#: Attribute names tried, in order, when ``denoiser_attr`` is not given.
DEFAULT_DENOISER_ATTRS: tuple[str, ...] = ("ema_denoiser", "denoiser")


def resolve_denoiser(pl_module: LightningModule, denoiser_attr: str | None = None) -> Callable[..., Tensor]:
    """The module's denoiser ``D(x, sigma, class_labels)``: ``getattr(pl_module, name)``, called first when it is a
    getter (a method with no required arguments, e.g. ``ema_denoiser()``)."""
    names = (denoiser_attr,) if denoiser_attr else DEFAULT_DENOISER_ATTRS
    for name in names:
        obj = getattr(pl_module, name, None)
        if obj is None or not callable(obj):
            continue
        if not isinstance(obj, nn.Module):
            required = [p for p in inspect.signature(obj).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if not required:
                obj = obj()
        return obj
    raise AttributeError(
        f"{type(pl_module).__name__} exposes no denoiser under {list(names)}: give MemorizationMonitor(denoiser_attr=...)"
        " the name of an attribute (or no-argument getter) holding D(x, sigma, class_labels)"
    )


def _train_dataset(trainer: Trainer) -> Dataset:
    dm = getattr(trainer, "datamodule", None)
    ds = getattr(dm, "train_dataset", None)
    if ds is None:
        loader = trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
    if ds is None:
        raise RuntimeError("MemorizationMonitor needs a map-style training dataset (datamodule.train_dataset or "
                           "trainer.train_dataloader.dataset) for source='train', replication or the image shape")
    return ds


def _image_of(item: Any) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


class MemorizationMonitor(Callback):
    """Every ``every_n_epochs`` training epochs, score samples by the Hessian spectrum of log p_sigma.

    For each of ``num_samples`` points (EDM samples from fixed seeded latents, or fixed training images) the ``k``
    largest and ``k`` most negative Hessian eigenvalues at noise level ``sigma`` come from one Lanczos run on JVPs
    (:func:`plpriv.metrics.log_density_hessian_eigs`). The per-sample score is the sharpness of the flattest
    directions: minus the mean of the k largest normalised eigenvalues sigma^2 * lambda, ~1 on an isolated peak
    (memorised: no direction is flat) and ~0 where directions follow the data manifold. A sample counts as memorised
    when its score exceeds ``threshold``.

    Logs ``memorization/rate`` (fraction memorised) and ``memorization/score_mean`` (and, with ``replication``,
    ``memorization/replication_{mean,p95,fraction}``), a figure with histograms of both ends of the normalised
    spectrum (memorised vs not) and appends per-sample scores to ``<log dir>/memorization_scores.csv``. Rank zero
    only.

    Under differential privacy (a private-training callback such as :class:`plpriv.callbacks.DPSGD` in
    ``trainer.callbacks``) everything written here leaves the process, but only the weights are covered by epsilon.
    Samples from fixed seeded latents are a function of the weights (post-processing) and stay allowed; statistics
    that read the training set (``source="train"``, and ``replication`` against the training set: its similarities
    and nearest-training-image indices reveal membership) are refused at ``setup``, before any step. Give
    ``replication_reference``, a public image set, to compute the replication score against it instead, or opt in
    knowingly with ``allow_private_statistics`` (warned once; the files are then not covered by epsilon).

    Denoiser protocol: the LightningModule exposes ``D(x, sigma, class_labels) -> denoised`` as an attribute or a
    no-argument getter named ``denoiser_attr`` (default: the first of ``ema_denoiser``, ``denoiser``; plpriv's EDM
    module has both, ``ema_denoiser`` being its EMA network). The denoiser's ``label_dim`` attribute (0 or missing:
    unconditional) decides whether one-hot class labels are drawn.

    Args:
        every_n_epochs: run after every n-th training epoch.
        num_samples: points scored each time.
        sigma: noise level of the density p_sigma whose Hessian is taken.
        k: eigenvalues per sample at each end of the spectrum.
        source: ``"generated"`` (EDM sampler) or ``"train"`` (training images).
        threshold: score above which a sample counts as memorised. 1.0 (default) is the score of an exactly
            memorised point (D = x0); learned denoisers overshoot, so replicas score above 1 (1.4-2.0 in
            ``benchmarks/memorization.py``), other generations mostly 0.5-0.8.
        num_iters: Lanczos iterations (default ``min(d, max(2k, k + 20))``).
        num_steps: sampler steps; ``sampler_kwargs`` go to :func:`plpriv.sampling.edm_sampler`.
        batch_size: samples per batched Lanczos run (memory: batch_size * num_iters * d floats).
        replication: also log the replication score of the same samples against the training set (or
            ``replication_reference``); ``replication_feature`` / ``replication_threshold`` / ``replication_center``
            configure :class:`plpriv.metrics.ReplicationScore`.
        replication_reference: a public reference set used instead of the training set for ``replication``: a
            map-style dataset of images or ``(image, ...)`` tuples, or a tensor (N, C, H, W);
            ``replication_index`` then indexes it. Required for ``replication`` under DP.
        allow_private_statistics: under DP, compute the training-set statistics anyway (``source="train"``,
            ``replication`` without a reference); their outputs are not covered by epsilon.
        img_shape: (C, H, W) of generated samples; default: the module's ``image_shape`` attribute, else the shape
            of a training image.
        seed: seeds latents, labels, training-image choice and Lanczos start vectors (same points every time).
        denoiser_attr: see the protocol above.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        sigma: float = 0.5,
        k: int = 16,
        source: Literal["generated", "train"] = "generated",
        threshold: float = 1.0,
        num_iters: int | None = None,
        num_steps: int = 18,
        sampler_kwargs: dict[str, Any] | None = None,
        batch_size: int = 64,
        replication: bool = False,
        replication_feature: Literal["pixels", "sscd"] | nn.Module = "pixels",
        replication_threshold: float = 0.95,
        replication_center: bool = True,
        img_shape: Sequence[int] | None = None,
        seed: int = 0,
        denoiser_attr: str | None = None,
        csv_name: str = "memorization_scores.csv",
        replication_reference: Dataset | Tensor | None = None,
        allow_private_statistics: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("num_samples", num_samples), ("k", k),
                            ("num_steps", num_steps), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0, got {sigma!r}")
        if source not in ("generated", "train"):
            raise ValueError(f"`source` must be 'generated' or 'train', got {source!r}")
        if num_iters is not None and num_iters < k:
            raise ValueError(f"`num_iters` must be >= k ({k}), got {num_iters!r}")
        if img_shape is not None and len(img_shape) != 3:
            raise ValueError(f"`img_shape` must be (C, H, W), got {img_shape!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.sigma = float(sigma)
        self.k = k
        self.source = source
        self.threshold = float(threshold)
        self.num_iters = num_iters
        self.num_steps = num_steps
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.batch_size = batch_size
        self.replication = replication
        self.replication_feature = replication_feature
        self.replication_threshold = replication_threshold
        self.replication_center = replication_center
        self.img_shape = tuple(img_shape) if img_shape is not None else None
        self.seed = seed
        self.denoiser_attr = denoiser_attr
        self.csv_name = csv_name
        self.replication_reference = replication_reference
        self.allow_private_statistics = bool(allow_private_statistics)
        self.history: list[dict[str, float]] = []
        self._replication_metric: ReplicationScore | None = None
        self._warned_private = False

    # -- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    # -- differential privacy ---------------------------------------------------------------------------------
    def _training_set_statistics(self) -> list[str]:
        """What this configuration would compute from the training set (empty: public data and weights only)."""
        reads = []
        if self.source == "train":
            reads.append("source='train' scores training images (use source='generated')")
        if self.replication and self.replication_reference is None:
            reads.append("replication compares samples to the training set (give a public `replication_reference`, "
                         "or set replication=False)")
        return reads

    def _check_private(self, trainer: Trainer) -> None:
        """Refuse training-set statistics under DP (unless opted in), before the first step."""
        reads = self._training_set_statistics()
        if not reads or find_private_training(trainer.callbacks) is None:
            return
        if not self.allow_private_statistics:
            raise ValueError("MemorizationMonitor under DP: " + "; ".join(reads) + ". Its outputs would leak "
                             "training-set membership outside epsilon (allow_private_statistics=True to override).")
        if not self._warned_private:
            self._warned_private = True
            rank_zero_warn(f"MemorizationMonitor(allow_private_statistics=True): {self.csv_name}, its figures and "
                           "logged metrics are computed from the training set and are NOT covered by the DP epsilon.")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_private(trainer)

    # -- hooks ----------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        directory = run_dir(trainer)  # `log_dir` is a collective under DDP: every rank, before the rank-zero check
        if trainer.is_global_zero:
            self.run(trainer, pl_module, directory)

    def run(self, trainer: Trainer, pl_module: LightningModule, directory: Path | None = None) -> dict[str, Any]:
        """Score samples now, log them and write them into ``directory`` (default: the run's log dir; nowhere
        without one), on rank zero; returns the per-sample results. Under DDP pass ``directory`` from all ranks."""
        if not trainer.is_global_zero:
            return {}
        self._check_private(trainer)  # also when called by hand, outside `fit`
        directory = directory if directory is not None else run_dir(trainer)
        denoiser = resolve_denoiser(pl_module, self.denoiser_attr)
        # eval() for sampling and scoring, then every submodule back to its own mode (an EMA copy may stay in eval).
        modes = {m: m.training for root in (pl_module, denoiser) if isinstance(root, nn.Module) for m in root.modules()}
        for m in modes:
            m.eval()
        try:
            results = self._score(trainer, pl_module, denoiser)
        finally:
            for m, flag in modes.items():
                m.training = flag
        epoch = trainer.current_epoch
        rate = results["memorized"].float().mean().item()
        entry = {"epoch": float(epoch), "rate": rate, "score_mean": results["score"].mean().item()}
        metrics = {"memorization/rate": rate, "memorization/score_mean": entry["score_mean"]}
        if "replication" in results:
            entry.update({f"replication_{k}": v for k, v in results["replication_summary"].items()})
            metrics.update({f"memorization/replication_{k}": v for k, v in results["replication_summary"].items()})
        self.history.append(entry)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if directory is not None:
            self._write_csv(directory, epoch, results)
        self._plot(trainer, epoch, results, directory)
        return results

    # -- internals ------------------------------------------------------------------------------------------------
    def _points(
        self, trainer: Trainer, pl_module: LightningModule, denoiser: Callable[..., Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        device = pl_module.device
        g = torch.Generator().manual_seed(self.seed)
        label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        if self.source == "train":
            ds = _train_dataset(trainer)
            pick = torch.randperm(len(ds), generator=g)[: self.num_samples].tolist()  # type: ignore[arg-type]
            items = [ds[i] for i in pick]
            x = torch.stack([_image_of(it) for it in items]).to(device)
            labels = None
            if label_dim and isinstance(items[0], (tuple, list)) and len(items[0]) > 1:
                labels = F.one_hot(torch.as_tensor([int(it[1]) for it in items]), label_dim).float().to(device)
            return x, labels
        shape = self.img_shape or getattr(pl_module, "image_shape", None)
        if shape is None:  # the data domain's shape: public
            ref = self.replication_reference
            shape = tuple(_image_of(_train_dataset(trainer)[0] if ref is None else ref[0]).shape)
        latents = torch.randn((self.num_samples, *shape), generator=g).to(device)
        labels = None
        if label_dim:
            labels = F.one_hot(torch.randint(label_dim, (self.num_samples,), generator=g), label_dim).float().to(device)
        xs = [
            edm_sampler(denoiser, latents[s : s + self.batch_size],
                        None if labels is None else labels[s : s + self.batch_size],
                        num_steps=self.num_steps, **self.sampler_kwargs)
            for s in range(0, self.num_samples, self.batch_size)
        ]
        return torch.cat(xs).float(), labels

    def _score(self, trainer: Trainer, pl_module: LightningModule, denoiser: Callable[..., Tensor]) -> dict[str, Any]:
        x, labels = self._points(trainer, pl_module, denoiser)
        g = torch.Generator().manual_seed(self.seed + 1)
        eigs = []
        for s in range(0, x.shape[0], self.batch_size):
            xb = x[s : s + self.batch_size]
            lb = None if labels is None else labels[s : s + self.batch_size]
            k = min(self.k, xb[0].numel())
            small, large = log_density_hessian_eigs(denoiser, xb, self.sigma, k=k, class_labels=lb, largest=True,
                                                    num_iters=self.num_iters, generator=g)
            eigs.append((small.cpu(), large.cpu()))
        smallest, largest = torch.cat([e[0] for e in eigs]), torch.cat([e[1] for e in eigs])
        score = hessian_scores(largest, self.sigma).sharpness
        out: dict[str, Any] = {
            "samples": x.detach().cpu(),
            "smallest": smallest,
            "largest": largest,
            "score": score,
            "memorized": score > self.threshold,
        }
        if self.replication:
            metric = self._replication(trainer, x.device)
            metric.reset()
            metric.update(x)
            sims, idx = metric.per_sample()
            out["replication"], out["replication_index"] = sims.cpu(), idx.cpu()
            summary = metric.compute()
            out["replication_summary"] = {
                "mean": summary["mean"].item(), "p95": summary["p95"].item(), "fraction": summary["fraction_above"].item()
            }
        return out

    def _replication(self, trainer: Trainer, device: torch.device) -> ReplicationScore:
        if self._replication_metric is None:  # reference features: extracted once per fit
            ref = self.replication_reference
            reference = ref if isinstance(ref, Tensor) else DataLoader(
                _train_dataset(trainer) if ref is None else ref, batch_size=256, shuffle=False)
            self._replication_metric = ReplicationScore(
                reference, feature=self.replication_feature, threshold=self.replication_threshold,
                center=self.replication_center,
                sync_on_compute=False,  # only rank zero computes: a cross-rank sync here would wait forever
            ).to(device)
        return self._replication_metric

    def _write_csv(self, directory: Path, epoch: int, results: dict[str, Any]) -> None:
        path = directory / self.csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = ["epoch", "sample", "score", "max_eig_normalized", "min_eig_normalized", "memorized"]
        has_rep = "replication" in results
        if has_rep:
            fields += ["replication", "replication_index"]
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(fields)
            s2 = self.sigma**2
            for i in range(results["score"].shape[0]):
                row = [epoch, i, f"{results['score'][i].item():.6g}", f"{results['largest'][i, 0].item() * s2:.6g}",
                       f"{results['smallest'][i, 0].item() * s2:.6g}", int(results["memorized"][i])]
                if has_rep:
                    row += [f"{results['replication'][i].item():.6g}", int(results["replication_index"][i])]
                writer.writerow(row)

    def _plot(self, trainer: Trainer, epoch: int, results: dict[str, Any], directory: Path | None) -> None:
        s2 = self.sigma**2
        mem = results["memorized"].numpy()
        fig = figure(figsize=(9, 3.5))
        for col, (key, title) in enumerate((("largest", "largest"), ("smallest", "most negative"))):
            lam = (results[key] * s2).numpy()
            ax = fig.add_subplot(1, 2, col + 1)
            bins = torch.linspace(min(-1.0, float(lam.min())), max(0.0, float(lam.max())), 41).numpy()
            for sel, name, color in ((~mem, "not memorized", "tab:blue"), (mem, "memorized", "tab:red")):
                if sel.any():
                    ax.hist(lam[sel].ravel(), bins=bins, alpha=0.6, density=True, color=color,
                            label=f"{name} ({int(sel.sum())})")
            ax.set_xlabel(rf"$\sigma^2\lambda$, {self.k} {title} Hessian eigenvalues")
            ax.set_ylabel("density")
            ax.legend()
        fig.suptitle(f"epoch {epoch}, sigma={self.sigma:g}")
        fig.tight_layout()
        save_and_log_figure(trainer, fig, f"memorization/eigenvalues_epoch{epoch:04d}", directory=directory)
