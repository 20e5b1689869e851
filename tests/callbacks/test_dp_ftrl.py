"""DPSGD(mechanism=MatrixFactorizationMechanism(...)): DP-FTRL on any LightningModule. The noise added is exactly
the strategy's correlated noise (regenerated here by the direct formula), epsilon is the closed form, what cannot be
accounted is refused before training, resume is exact with the kept secret and refused without it, DDP equals one
process."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_script
from _dp_toy import ToyClassifier, ToyData, ZeroGradModel
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from plpriv.callbacks import DPSGD
from plpriv.privacy.matrix_factorization import correlated_noise, gaussian_epsilon
from plpriv.privacy.mf_mechanism import NOISE_TAG, MatrixFactorizationMechanism

ROOT = Path(__file__).resolve().parents[2]


class FixedData(ToyData):
    """The toy data in a fixed order (every example at the same step of every epoch)."""

    def __init__(self, *args: Any, shuffle: bool = False, own_sampler: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shuffle, self.own_sampler = shuffle, own_sampler  # own_sampler: with use_distributed_sampler=False

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.own_sampler and trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(self.dataset, trainer.world_size, trainer.global_rank, shuffle=self.shuffle)
            return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle)


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                    log_every_n_steps=1000)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def ftrl(strategy: str = "bsr", keep: float = 1.0, **kwargs: Any) -> DPSGD:
    args: dict[str, Any] = dict(max_grad_norm=1.0, noise_multiplier=1.3, target_delta=1e-5, poisson_sampling=False,
                                adjacency="zero_out", mechanism=MatrixFactorizationMechanism(strategy,
                                                                                             keep_fraction=keep))
    return DPSGD(**{**args, **kwargs})


class Params(Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        self.seen.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


@pytest.mark.parametrize("strategy", ["bsr", "tree"])
def test_added_noise_is_the_strategys_correlated_noise(tmp_path: Path, strategy: str) -> None:
    """Zero gradients, SGD lr 1: step t moves the weights by -(sigma C (N w)_t) / B, with w regenerated from the
    run's seed by matrix_factorization's direct formula (not the engine's recursive stream)."""
    model = ZeroGradModel(width=4).double()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cb, params = ftrl(strategy, seed=3), Params()
    make_trainer(tmp_path, [cb, params], max_epochs=3, precision="64-true").fit(model, FixedData(n=24, batch_size=6))
    assert cb.steps == 12 and cb.engine.record()["horizon"] == 12
    noise_matrix = cb.mechanism.strategy.noise
    shapes = [p.shape for p in model.parameters()]
    before = [start, *params.seen[:-1]]
    for t in range(12):
        z = torch.cat([correlated_noise(noise_matrix, t, shape, lambda j, i=i: cb.derive_seed(NOISE_TAG, i, j),
                                        std=1.3, dtype=torch.float64).flatten() for i, shape in enumerate(shapes)])
        torch.testing.assert_close(before[t] - params.seen[t], z / 6.0, atol=1e-10, rtol=0)


def test_epsilon_record_and_no_secret(tmp_path: Path) -> None:
    cb = ftrl("optimized_banded", target_epsilon=4.0, noise_multiplier=None, seed=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    make_trainer(tmp_path, [cb, ckpt], max_epochs=4, enable_checkpointing=True).fit(ToyClassifier(),
                                                                                    FixedData(n=24, batch_size=6))
    record = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["plpriv_privacy"]
    assert record["mechanism"] == "matrix-factorization" and record["participation"] == "fixed-order"
    assert (record["min_separation"], record["max_participations"], record["horizon"]) == (4, 4, 16)
    assert record["sensitivity"] == pytest.approx(2.0)  # unit-column banded, k = 4
    sigma = cb.effective_noise_multiplier
    assert cb.get_epsilon() == pytest.approx(gaussian_epsilon(2.0 / sigma, 1e-5), rel=1e-9)
    assert cb.get_epsilon() == pytest.approx(4.0, rel=1e-6)
    assert "seed" not in json.dumps(cb.state_dict(), default=str)


def test_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        ftrl(poisson_sampling=True)
    with pytest.raises(ValueError, match="zero_out"):
        ftrl(adjacency="add_remove", dataset_size=24)
    model = ToyClassifier()
    with pytest.raises(ValueError, match="max_steps"):  # unbounded run: no horizon to build the strategy for
        make_trainer(tmp_path, [ftrl(seed=0)], max_epochs=-1, max_steps=-1).fit(model, FixedData(n=24, batch_size=6))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="pads the last shard|cannot tell"):
        class Weighted(FixedData):
            def train_dataloader(self) -> DataLoader:
                sampler = torch.utils.data.WeightedRandomSampler([1.0] * 24, 24)
                return DataLoader(self.dataset, batch_size=6, sampler=sampler)
        make_trainer(tmp_path, [ftrl(seed=0)], max_epochs=2).fit(model, Weighted(n=24))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reshuffled_epochs_use_the_general_bound(tmp_path: Path) -> None:
    fixed, shuffled = ftrl("bsr", seed=0), ftrl("bsr", seed=0)
    make_trainer(tmp_path, [fixed], max_epochs=4).fit(ToyClassifier(), FixedData(n=24, batch_size=6))
    make_trainer(tmp_path, [shuffled], max_epochs=4).fit(ToyClassifier(), FixedData(n=24, batch_size=6, shuffle=True))
    assert shuffled.engine.record()["participation"] == "reshuffled"
    assert shuffled.engine.record()["sensitivity"] > fixed.engine.record()["sensitivity"]
    assert shuffled.get_epsilon() > fixed.get_epsilon()


def test_resume_is_exact_with_the_kept_secret_and_refused_without(tmp_path: Path) -> None:
    secrets = tmp_path.parent / f"{tmp_path.name}-secrets"

    class Kill(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == 6:
                raise RuntimeError("killed")

    def run(ckpt: str | None, seed: int | None = None, kill: bool = False, secret: bool = True,
            max_epochs: int = 3) -> tuple[ToyClassifier, DPSGD]:
        model, cb = ToyClassifier(), ftrl("optimized_banded", seed=seed,
                                          secret_dir=str(secrets) if secret else None)
        callbacks: list[Callback] = [cb] + ([Kill()] if kill else [])
        if kill:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1,
                                             every_n_train_steps=1))
        make_trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=kill).fit(
            model, FixedData(n=24, batch_size=6), ckpt_path=ckpt)
        return model, cb

    with pytest.raises(RuntimeError, match="killed"):
        run(None, kill=True)
    (kept,) = secrets.iterdir()
    seed = int(json.loads(kept.read_text())["seed"])
    with pytest.raises(ValueError, match="inside an epoch"):  # Lightning would restart the loader: batch 0 twice
        run(str(tmp_path / "ckpt" / "step=5.ckpt"))
    ckpt = str(tmp_path / "ckpt" / "step=4.ckpt")  # an end-of-epoch checkpoint (4 steps per epoch)
    with pytest.raises(ValueError, match="planned for 12 steps"):
        run(ckpt, max_epochs=4)
    full, cb_full = run(None, seed=seed)
    resumed, cb_res = run(ckpt)
    assert cb_res.steps == cb_full.steps == 12 and cb_res.get_epsilon() == cb_full.get_epsilon()
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="second release"):
        run(ckpt, secret=False)  # the secret was deleted when the resumed fit ended
    assert str(seed).encode() not in Path(ckpt).read_bytes()


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from lightning.pytorch import Trainer
    from _dp_toy import ToyClassifier
    from test_dp_ftrl import FixedData, ftrl

    out, devices, participants = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cb = ftrl("optimized_banded", seed=4, participants=participants)
    model = ToyClassifier(lr=0.5, hidden=16).double()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                      precision="64-true", callbacks=[cb], logger=False, enable_checkpointing=False,
                      use_distributed_sampler=False,  # FixedData's own DistributedSampler(shuffle=False)
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    if participants == "clients":
        from torch.utils.data import DataLoader, DistributedSampler
        from test_sparsified_gaussian import ToyClients
        from plpriv.data.federated import ClientIds

        class FixedClients(ToyClients):
            def train_dataloader(self):
                ids = ClientIds(self.clients)
                sampler = (DistributedSampler(ids, devices, trainer.global_rank, shuffle=False) if devices > 1
                           else None)
                return DataLoader(ids, batch_size=self.clients_per_round // devices, sampler=sampler)

        data = FixedClients(clients=16, per_client=3, clients_per_round=4, dtype=torch.float64)
    else:
        data = FixedData(n=24, batch_size=8 // devices, own_sampler=True)
    trainer.fit(model, data)
    torch.save({"params": [p.detach() for p in model.parameters()], "steps": cb.steps,
                "epsilon": cb.get_epsilon()}, f"{out}/rank{trainer.global_rank}_of{devices}.pt")
    """
)


@pytest.mark.distributed
@pytest.mark.parametrize("participants", ["examples", pytest.param("clients", marks=pytest.mark.slow)])
def test_ddp_equals_the_single_process_run(tmp_path: Path, participants: str) -> None:
    """2 gloo processes, each with a DistributedSampler(shuffle=False) (fixed order: the same global batches as one
    process with twice the batch size): same steps, epsilon and weights; the noise is added once (rank zero).
    (Lightning's own injected sampler shuffles: accounted as reshuffled epochs, the general bound.) Clients (slow):
    each rank hosts half of every round's clients, the ranks exchange the clipped sums and each adds the same
    seeded correlated noise."""
    script = tmp_path / "ddp_ftrl.py"
    script.write_text(DDP_SCRIPT)
    for devices in (2, 1):
        run_script(script, [str(tmp_path), str(devices), participants], tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of1.pt")
    assert r0["steps"] == single["steps"] == (6 if participants == "examples" else 8)
    assert r0["epsilon"] == single["epsilon"]
    for a, b, s in zip(r0["params"], r1["params"], single["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, s, atol=1e-10, rtol=0)


def test_clients_mode_federated_rounds(tmp_path: Path) -> None:
    """Client-level DP-FTRL on FederatedDigits with fixed rounds: 12 clients, 4 per round, 3 rounds per epoch: every
    client takes part once per epoch at the same round (k = 2 epochs, b = 3); each client's update (its mean gradient)
    is clipped as one participant, so the step's noiseless sum has norm <= 4 C."""
    from plpriv.data import FederatedDigits
    from plpriv.modules import ImageClassifier

    cb = ftrl("bsr", participants="clients", seed=2, noise_multiplier=0.0, target_delta=1e-3)
    data = FederatedDigits(num_clients=12, clients_per_round=4, image_size=8, shuffle=False)
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group",
                            backbone_kwargs={"act": "tanh", "width": 4})
    norms: list[float] = []

    class Norm(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            norms.append(float(torch.cat([p.summed_grad.flatten() for p in cb.dp_optimizer.params]).norm()))

    make_trainer(tmp_path, [cb, Norm()], max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0).fit(model, data)
    record = cb.engine.record()
    assert cb.steps == 6 and (record["participation"], record["min_separation"], record["max_participations"]) == (
        "fixed-order", 3, 2)
    assert record["sensitivity"] == pytest.approx(2 ** 0.5)
    assert max(norms) <= 4.0 + 1e-5 and min(norms) > 0.5  # 4 clipped client updates of norm <= 1
    with pytest.raises(ValueError, match="groups each"):
        DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-3, dataset_size=12, participants="clients")


def test_recipe_trains_and_accounts(tmp_path: Path) -> None:
    from plpriv.cli import PlprivCLI

    cli = PlprivCLI(
        args=["-c", str(ROOT / "recipes/streaming/digits_ftrl.yaml"), "--trainer.max_epochs=2",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
              "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--data.init_args.image_size=8",
              "--model.init_args.backbone_kwargs={act: tanh, width: 4}"],
        run=False,
    )
    (dp,) = [c for c in cli.trainer.callbacks if isinstance(c, DPSGD)]
    assert isinstance(dp.mechanism, MatrixFactorizationMechanism) and dp.mechanism.strategy_name == "bsr"
    cli.trainer.fit(cli.model, cli.datamodule)
    record = dp.engine.record()
    assert (record["participation"], record["horizon"], record["max_participations"]) == ("fixed-order", 46, 2)
    assert dp.get_epsilon() == pytest.approx(4.0, rel=1e-6)
