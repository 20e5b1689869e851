"""ReLU budgets for private inference: SENet's three stages (Kundu et al., ICLR 2023) around any classifier.

Epochs ``[0, teacher_epochs)`` train the all-ReLU model (stage 0; skipped with a ``teacher_checkpoint``). At the start
of stage 1 the model is copied into a frozen teacher, the per-layer ReLU sensitivity is measured, the budget is
allocated across layers and every layer gets a random mask with its exact ReLU count. Stage 1 (``mask_epochs``)
trains the student with ``gamma CE + alpha KD`` and, at each epoch end, moves each layer's ReLUs to the positions
where the student's post-activation features differ most from the teacher's (top-k of ``sum |f_T - f_S|``, exact k).
Stage 2 (the remaining epochs) freezes the masks and distils with ``gamma CE + alpha KD + beta AT``. The ReLU count is
logged (``relu/count``, ``relu/fraction``); ``val/acc_budget`` is the validation accuracy once the masks are frozen
(0 before), the metric to select checkpoints on. ``export_path`` writes the masked and merged models at fit end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from plpriv.nets.relu_budget import (
    TinyResNet, allocate_budget, attention_loss, dense_relu_counts, kd_loss, linearization_sensitivity,
    pruning_sensitivity, random_mask, relu_counts, relu_layers, to_masked, topk_mask,
)
from plpriv.nets.relu_export import export_relu_budget

Allocation = Literal["senet", "linearize", "uniform"]


def build_backbone(backbone: str = "tiny_resnet", num_classes: int = 10, in_chans: int = 1,
                   backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``tiny_resnet`` -> :class:`plpriv.nets.relu_budget.TinyResNet`; ``torchvision.<name>`` -> that torchvision
    model without weights (``cifar_stem: true`` in ``backbone_kwargs``: 3x3 stride-1 stem, no max-pool); any other
    name -> :func:`plpriv.modules.classifier.build_backbone` with BatchNorm (``small_cnn`` or a timm model)."""
    kwargs = dict(backbone_kwargs or {})
    if backbone == "tiny_resnet":
        return TinyResNet(in_chans=in_chans, num_classes=num_classes, **kwargs)
    if backbone.startswith("torchvision."):
        import torchvision

        cifar_stem = bool(kwargs.pop("cifar_stem", False))
        net = torchvision.models.get_model(backbone.split(".", 1)[1], weights=None, num_classes=num_classes, **kwargs)
        conv1 = getattr(net, "conv1", None)
        if (cifar_stem or in_chans != 3) and not isinstance(conv1, nn.Conv2d):
            raise ValueError(f"{backbone}: `cifar_stem` and in_chans != 3 need a ResNet-style `conv1`")
        if cifar_stem or in_chans != 3:
            k, s, p = ((3, 3), 1, 1) if cifar_stem else (conv1.kernel_size, conv1.stride, conv1.padding)
            net.conv1 = nn.Conv2d(in_chans, conv1.out_channels, k, stride=s, padding=p, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        if cifar_stem:
            net.maxpool = nn.Identity()
        return net
    from plpriv.modules.classifier import build_backbone as classifier_backbone

    return classifier_backbone(backbone, num_classes, in_chans, "batch", False, kwargs)


class ReLUBudgetClassifier(LightningModule):
    """A classifier trained to meet a ReLU budget (SENet), with the ReLU count as a logged metric.

    Args:
        backbone, num_classes, in_chans, backbone_kwargs: the classifier (:func:`build_backbone`).
        image_size: the training images' side (the masks are per pixel).
        relu_budget: ReLUs kept: a fraction of the dense count if <= 1, else an absolute count.
        allocation: per-layer counts from ``senet`` (pruning-based sensitivity), ``linearize`` (accuracy drop when
            a layer is linearised) or ``uniform`` (the same keep ratio everywhere).
        mask_search: stage 1 moves the ReLUs at each epoch end; False keeps the initial random mask.
        mask_criterion: the stage-1 score per position, summed over the epoch: ``feature_diff`` (SENet's code:
            ``|f_T - f_S|`` of the masked student, which tends to swap the mask for its complement every epoch, as
            a ReLU position matches the teacher best) or ``relu_gap`` (``|min(x_S, 0)|``, what linearising the
            position changes in the student; does not depend on the current mask).
        teacher_epochs, mask_epochs: lengths of stage 0 and stage 1; stage 2 runs to ``trainer.max_epochs``.
        teacher_checkpoint: weights of the trained all-ReLU model (a Lightning checkpoint of this module or of
            ``ImageClassifier``, or a state dict of the backbone); then ``teacher_epochs`` may be 0.
        proxy_density: weights kept by the global magnitude pruning of the ``senet`` sensitivity.
        sensitivity_batches: training batches for the ``linearize`` sensitivity.
        shallow_blocks: the blocks with the least sensitive inner ReLU get 0 ReLUs there, so that the export folds
            them exactly (the "shallow" follow-up); the budget goes to the other layers.
        ce_weight, kd_weight, at_weight, temperature: ``gamma``, ``alpha``, ``beta`` and T of the losses (AT in
            stage 2 only, on the residual blocks' outputs).
        mask_seed: seed of the initial random masks.
        optimizer, lr_scheduler: as in ImageClassifier; without a scheduler, ``stage_cosine`` restarts a cosine
            decay at every stage (stepped per epoch).
        export_path: write :func:`plpriv.nets.relu_export.export_relu_budget` there at the end of fit (a relative
            path is inside the run's log directory).
    """

    def __init__(
        self,
        backbone: str = "tiny_resnet",
        num_classes: int = 10,
        in_chans: int = 1,
        image_size: int = 8,
        backbone_kwargs: dict[str, Any] | None = None,
        relu_budget: float = 0.25,
        allocation: Allocation = "senet",
        mask_search: bool = True,
        mask_criterion: Literal["feature_diff", "relu_gap"] = "feature_diff",
        teacher_epochs: int = 10,
        mask_epochs: int = 10,
        teacher_checkpoint: str | None = None,
        proxy_density: float = 0.1,
        sensitivity_batches: int = 4,
        shallow_blocks: int = 0,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        at_weight: float = 1000.0,
        temperature: float = 4.0,
        mask_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        stage_cosine: bool = True,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        if mask_criterion not in ("feature_diff", "relu_gap"):
            raise ValueError(f"`mask_criterion` must be 'feature_diff' or 'relu_gap', got {mask_criterion!r}")
        if allocation not in ("senet", "linearize", "uniform"):
            raise ValueError(f"`allocation` must be 'senet', 'linearize' or 'uniform', got {allocation!r}")
        for name, value in (("teacher_epochs", teacher_epochs), ("mask_epochs", mask_epochs),
                            ("shallow_blocks", shallow_blocks), ("sensitivity_batches", sensitivity_batches)):
            if int(value) != value or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        if image_size < 1 or num_classes < 2:
            raise ValueError(f"`image_size` must be >= 1 and `num_classes` >= 2, got {image_size!r}, {num_classes!r}")
        if min(ce_weight, kd_weight, at_weight) < 0 or temperature <= 0:
            raise ValueError("the loss weights must be >= 0 and `temperature` > 0, got "
                             f"{ce_weight}, {kd_weight}, {at_weight}, {temperature}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.arch = {"class_path": f"{__name__}.build_backbone", "init_args": {
            "backbone": backbone, "num_classes": num_classes, "in_chans": in_chans,
            "backbone_kwargs": dict(backbone_kwargs or {})}}
        example = self.example_input
        self.net = self._build(teacher_checkpoint)
        self.teacher = to_masked(build_backbone(backbone, num_classes, in_chans, backbone_kwargs), example)
        self.teacher.requires_grad_(False)
        self.dense = sum(dense_relu_counts(self.net).values())
        self.budget = self._budget_count(relu_budget)
        blocks = [n for n in relu_layers(self.net) if n.endswith(".acts.0")]  # first inner ReLU of each block
        if shallow_blocks > len(blocks):
            raise ValueError(f"`shallow_blocks` must be <= {len(blocks)} (the residual blocks of {backbone!r}), got "
                             f"{shallow_blocks}")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.plan: dict[str, Any] | None = None  # set at the start of stage 1 (saved in checkpoints)
        self._features: dict[str, dict[str, Tensor]] = self._no_features()
        self._diff: dict[str, Tensor] = {}
        for role, net in (("student", self.net), ("teacher", self.teacher)):
            for name, layer in relu_layers(net).items():
                layer.register_forward_hook(self._keeper(role, name))

    @staticmethod
    def _no_features() -> dict[str, dict[str, Tensor]]:
        return {"student": {}, "teacher": {}, "student_in": {}, "teacher_in": {}}

    @property
    def example_input(self) -> Tensor:
        return torch.zeros(1, self.hparams.in_chans, self.hparams.image_size, self.hparams.image_size)

    def _build(self, teacher_checkpoint: str | None) -> nn.Module:
        h = self.hparams
        net = build_backbone(h.backbone, h.num_classes, h.in_chans, h.backbone_kwargs)
        state = None
        if teacher_checkpoint is not None:
            state = torch.load(teacher_checkpoint, map_location="cpu", weights_only=False)
            state = state.get("state_dict", state)
            if any(k.startswith("net.") for k in state):  # a Lightning checkpoint: the backbone's part
                state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
            unmasked = set(net.state_dict())
            if set(state) == unmasked:
                net.load_state_dict(state)
                state = None
        net = to_masked(net, self.example_input)
        if state is not None:
            try:
                net.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"`teacher_checkpoint` {teacher_checkpoint!r} does not fit backbone "
                                 f"{h.backbone!r} with {h.backbone_kwargs}: {err}") from err
        return net

    def _budget_count(self, relu_budget: float) -> int:
        if 0 < relu_budget <= 1:
            return round(relu_budget * self.dense)
        if relu_budget > 1 and int(relu_budget) == relu_budget and relu_budget <= self.dense:
            return int(relu_budget)
        raise ValueError(f"`relu_budget` must be a fraction in (0, 1] or a whole number of ReLUs in [2, {self.dense}]"
                         f" (the dense count), got {relu_budget!r}")

    def _keeper(self, role: str, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.stage > 0 and self.training:
                self._features[role][name] = output
                self._features[f"{role}_in"][name] = inputs[0]
        return hook

    @property
    def stage(self) -> int:
        epoch = self.current_epoch
        return 0 if epoch < self.hparams.teacher_epochs else 1 if epoch < self.hparams.teacher_epochs + \
            self.hparams.mask_epochs else 2

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> ReLUBudgetClassifier:
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never move
        return self

    # ---- stage transitions -------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        if self.stage >= 1 and self.plan is None:
            self._start_budget()
        if self.stage == 2 and not all(bool(m.frozen) for m in relu_layers(self.net).values()):
            for layer in relu_layers(self.net).values():
                layer.freeze()
        self._diff = {}

    def _sensitivity(self) -> dict[str, float]:
        h = self.hparams
        if h.allocation == "senet":
            return pruning_sensitivity(self.teacher, self.example_input.to(self.device), h.proxy_density)
        if h.allocation == "uniform":
            return {name: 1.0 for name in relu_layers(self.teacher)}
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule is not None else \
            self.trainer.train_dataloader
        with torch.random.fork_rng(devices=[]):  # a fresh loader draws its order: keep the run's RNG untouched
            batches = []
            for x, y in loader:
                batches.append((x.to(self.device), y.to(self.device)))
                if len(batches) >= max(1, h.sensitivity_batches):
                    break
        return linearization_sensitivity(self.teacher, batches)

    def _start_budget(self) -> None:
        """Teacher <- the all-ReLU model; sensitivity; allocation; random masks with the exact counts."""
        h = self.hparams
        self.teacher.load_state_dict(self.net.state_dict())
        sensitivity = self._sensitivity()
        layers = relu_layers(self.net)
        names = list(layers)
        fixed_zero: set[int] = set()
        if h.shallow_blocks:
            inner = [i for i, n in enumerate(names) if n.endswith(".acts.0")]
            fixed_zero = set(sorted(inner, key=lambda i: (sensitivity[names[i]], i))[: h.shallow_blocks])
        sizes = [layers[n].mask.numel() for n in names]
        counts = allocate_budget(sizes, [sensitivity[n] for n in names], self.budget, fixed_zero)
        generator = torch.Generator().manual_seed(h.mask_seed)
        for name, k in zip(names, counts):
            layers[name].set_mask(random_mask(layers[name].mask.shape, k, generator))
        self.plan = {"counts": dict(zip(names, counts)), "sensitivity": sensitivity,
                     "shallow": [names[i].rsplit(".acts.0", 1)[0] for i in sorted(fixed_zero)]}

    def on_train_epoch_end(self) -> None:
        if self.stage == 1 and self.hparams.mask_search and self._diff:
            changed = 0
            for name, layer in relu_layers(self.net).items():
                diff = self.trainer.strategy.reduce(self._diff[name], reduce_op="sum")  # sum over devices
                new = topk_mask(diff, self.plan["counts"][name])
                changed += int((new != layer.mask).sum())
                layer.set_mask(new)
            self.log("relu/mask_change", changed / self.dense)  # normalised Hamming distance between masks
        self._diff = {}
        self._log_relus()

    def _log_relus(self) -> None:
        count = sum(relu_counts(self.net).values())
        self.log("relu/count", float(count), sync_dist=False)
        self.log("relu/fraction", count / self.dense, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["relu_budget_plan"] = self.plan

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.plan = checkpoint.get("relu_budget_plan")

    # ---- steps -------------------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = self.hparams
        logits = self.net(x)
        if self.stage == 0:
            loss = F.cross_entropy(logits, y)
            self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student, teacher = self._features["student"], self._features["teacher"]
        loss = h.ce_weight * F.cross_entropy(logits, y) + h.kd_weight * kd_loss(logits, teacher_logits, h.temperature)
        if self.stage == 2 and h.at_weight > 0:
            names = [n for n in student if n.endswith("out_act")] or list(student)
            loss = loss + h.at_weight * attention_loss([student[n] for n in names], [teacher[n] for n in names])
        if self.stage == 1 and h.mask_search:
            for name, f_s in student.items():
                if h.mask_criterion == "feature_diff":  # SENet's code: sum over the epoch of |f_T - f_S|
                    d = (teacher[name] - f_s.detach()).abs().sum(0)
                else:  # relu_gap: sum of |relu(x_S) - x_S| = |min(x_S, 0)|, what linearising the position changes
                    d = self._features["student_in"][name].detach().clamp(max=0).abs().sum(0)
                self._diff[name] = self._diff[name] + d if name in self._diff else d
        self._features = self._no_features()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(y))
        final = self.stage == 2 and self.plan is not None  # the budget is met and the masks are frozen
        hits = (logits.argmax(1) == y).float().mean() if final else logits.new_zeros(())
        self.log("val/acc_budget", hits, batch_size=len(y), sync_dist=True)  # batch-size-weighted epoch mean


    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, batch_size=len(y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    # ---- optimisation and export -------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
        if not self.hparams.stage_cosine:
            return optimizer
        bounds = [0, self.hparams.teacher_epochs, self.hparams.teacher_epochs + self.hparams.mask_epochs,
                  max(self.trainer.max_epochs or 0, self.hparams.teacher_epochs + self.hparams.mask_epochs + 1)]

        def factor(epoch: int) -> float:  # cosine restarted per stage: 0.5 (1 + cos(pi t / T))
            stage = max(i for i in range(3) if bounds[i] <= epoch) if epoch < bounds[3] else 2
            t, length = epoch - bounds[stage], max(bounds[stage + 1] - bounds[stage], 1)
            return 0.5 * (1 + math.cos(math.pi * min(t, length) / length))

        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor)}

    def export(self, path: str) -> dict[str, Any]:
        """The masked model with per-layer ReLU counts and MACs, and the merged model (see relu_export)."""
        return export_relu_budget(self.net, path, self.arch, list(self.example_input.shape[1:]))

    def on_fit_end(self) -> None:
        if self.hparams.export_path is not None and self.trainer.is_global_zero:
            path = Path(self.hparams.export_path)
            if not path.is_absolute():  # into the run's own folder (the logger's; trainer.log_dir is a collective)
                base = getattr(self.logger, "log_dir", None) or self.trainer.default_root_dir
                path = Path(base) / path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.export(str(path))
