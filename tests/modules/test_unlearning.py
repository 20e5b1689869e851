"""Every unlearning method starts from the original checkpoint and lowers forget accuracy on a tiny problem."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from plpriv.data import DigitsDataModule
from plpriv.modules import ImageClassifier
from plpriv.modules.unlearning import METHODS, SalUn, UnlearningModule, mia_efficacy, supcon_loss
from plpriv.modules.unlearning.evaluation import loss_threshold_mia, predict

# per method: settings strong enough to act within 2 tiny epochs
TINY = {"Retrain": {"epochs": 2, "lr": 0.05}, "FT": {"epochs": 2, "lr": 0.05}, "GA": {"epochs": 2, "lr": 0.01},
        "RL": {"epochs": 2, "lr": 0.05}, "l1-sparse": {"epochs": 3, "lr": 0.05}, "SalUn": {"epochs": 2, "lr": 0.05},
        "SCRUB": {"epochs": 2, "lr": 0.02, "max_epochs": 2}, "HD": {"epochs": 2, "lr": 0.05},
        "COLA": {"epochs": 2, "collapse_epochs": 1, "lr": 0.05}}


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, image_size=8, val_fraction=0.1, test_fraction=0.1, seed=0)


def _fit(module, **kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, **kwargs)
    trainer.fit(module)
    return trainer


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> str:
    seed_everything(0)
    model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 8},
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=_data())
    path = tmp_path_factory.mktemp("original") / "original.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _forget_acc(module: UnlearningModule) -> float:
    logits, y = predict(module.net, module.split("forget"))
    return float((logits.argmax(1) == y).float().mean())


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_lowers_forget_accuracy(name: str, original: str):
    seed_everything(0)
    start = METHODS["FT"](original, forget_classes=[0]).attach_data(_data())
    before = _forget_acc(start)
    assert before > 0.9  # the original knows class 0
    module = METHODS[name](original, forget_classes=[0], **TINY[name]).attach_data(_data())
    if name not in ("Retrain", "HD"):  # starts from the original's weights (Retrain: re-initialised; HD: its head)
        assert _forget_acc(module) == pytest.approx(before)
    encoder = {k: v.clone() for k, v in module.encoder_and_head()[0].state_dict().items()}
    _fit(module, max_epochs=module.hparams.epochs)
    if name == "HD":  # only the head was trained: the encoder is the original's
        original_encoder = start.encoder_and_head()[0].state_dict()
        for k, v in module.encoder_and_head()[0].state_dict().items():
            assert torch.equal(v, encoder[k]) and torch.equal(v, original_encoder[k]), k
    after = _forget_acc(module)
    assert after < before - 0.3, f"{name}: forget accuracy {before:.2f} -> {after:.2f}"
    logits, y = predict(module.net, module.test_split())
    assert (y != 0).all()  # TA counts the remaining classes only


def test_random_fraction_and_several_classes_forget_specs(original: str):
    module = METHODS["FT"](original, forget_fraction=0.1, forget_seed=3).attach_data(_data())
    n = len(module.forget_indices) + len(module.retain_indices)
    assert len(module.forget_indices) == round(0.1 * n) and not set(module.forget_indices) & set(module.retain_indices)
    several = METHODS["FT"](original, forget_classes=[1, 7]).attach_data(_data())
    labels = {int(several.split("forget")[i][1]) for i in range(len(several.forget_indices))}
    assert labels == {1, 7}
    with pytest.raises(ValueError, match="forget_fraction"):
        METHODS["HD"](original, forget_fraction=0.1)
    with pytest.raises(ValueError, match="exactly one forget spec"):
        METHODS["FT"](original)
    with pytest.raises(ValueError, match="forget_classes"):
        METHODS["FT"](original, forget_classes=[10])


def test_plain_fit_with_a_datamodule_is_refused(original: str):
    module = METHODS["FT"](original, forget_classes=[0])
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="plpriv unlearn"):
        trainer.fit(module, datamodule=_data())


def test_salun_mask_keeps_the_chosen_fraction_and_freezes_the_rest(original: str):
    module = SalUn(original, forget_classes=[0], epochs=1, lr=0.05, keep=0.3, weight_decay=0.0,
                   momentum=0.0).attach_data(_data())
    start = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    _fit(module, max_epochs=1)
    total = sum(m.numel() for m in module.masks.values())
    kept = sum(m.sum().item() for m in module.masks.values())
    assert kept / total == pytest.approx(0.3, abs=0.01)
    for n, p in module.net.named_parameters():  # without weight decay or momentum, masked weights never move
        frozen = module.masks[n] == 0
        assert torch.equal(p.detach()[frozen], start[n][frozen])


def test_supcon_loss_matches_hand_computation():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])  # anchor 2 has no positive: skipped
    t = 0.5
    # anchors 0 and 1: positive sim 1/t, the other 0/t -> -log(e^2 / (e^2 + e^0))
    expected = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1))
    assert supcon_loss(f, y, t) == pytest.approx(float(expected), rel=1e-5)


def test_mia_scores_separate_members_from_non_members():
    rng = torch.Generator().manual_seed(0)
    members = 0.9 + 0.1 * torch.rand(200, generator=rng)  # confident on training data
    non_members = 0.5 * torch.rand(200, generator=rng)
    assert mia_efficacy(members.numpy(), non_members.numpy(), members[:50].numpy()) < 5  # D_f looks like members
    assert mia_efficacy(members.numpy(), non_members.numpy(), non_members[:50].numpy()) > 95
    loss_m, loss_n = -torch.log(members), -torch.log(non_members)
    assert loss_threshold_mia(loss_m.numpy(), loss_n.numpy(), loss_n[:50].numpy()) > 95
