"""SparsifiedGaussian (a DPSGD subclass) against independent facts.

Facts used:
* keep_fraction = 1 with examples as participants is DP-SGD: same seed, same update, same epsilon as DPSGD.
* The mechanism (Chen et al. 2024): every participant's update is clipped to C, multiplied by its own mask (seeded
  by the run's seed, the step and the participant's key: its position in the global batch, or its client id), the
  masked updates are summed, noise is added once, and the sum is divided by B gamma; here recomputed by hand, one
  example (or one client) at a time, without opacus.
* A client's update is its mean gradient over its own data (FedSGD).
* A resumed run is the uninterrupted run (masks, noise, batches, epsilon, weights).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_script
from _dp_toy import PROBE_CALLS, ToyClassifier, ToyData, toy_tensors
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader

from plpriv.callbacks import DPSGD, SparsifiedGaussian
from plpriv.data import FederatedDigits
from plpriv.data.federated import ClientIds, partition_clients
from plpriv.privacy.sparsified_gaussian import draw_mask, mask_seed

ROOT = Path(__file__).resolve().parents[2]


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                    log_every_n_steps=1000)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class ToyClients(LightningDataModule):
    """``clients`` clients of ``per_client`` toy examples each; the train loader yields client ids."""

    def __init__(self, clients: int = 12, per_client: int = 3, clients_per_round: int = 4,
                 missing: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.clients, self.per_client, self.clients_per_round = clients, per_client, clients_per_round
        self.missing = missing
        x, y = toy_tensors(clients * per_client, seed=3)
        self.x, self.y = x.to(dtype), y

    def client_ids(self) -> list[int]:
        return [i for i in range(self.clients) if i not in self.missing]

    def client_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(i * self.per_client, (i + 1) * self.per_client)
        return self.x[sl], self.y[sl]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ClientIds(self.clients), batch_size=self.clients_per_round, shuffle=True)


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append([t.clone() for t in batch] if isinstance(batch, (list, tuple)) else batch.clone())


def flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * min(1.0, c / (float(g.norm()) + 1e-6))


def apply_update(model: nn.Module, update: torch.Tensor, lr: float) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in model.parameters():
        out.append(p.detach() - lr * update[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


# --------------------------------------------------------------------------- examples as participants
def test_keep_fraction_one_is_dpsgd_bit_for_bit(tmp_path: Path) -> None:
    runs = {}
    for name, cb in (("dpsgd", DPSGD(dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0, seed=3, target_delta=1e-5)),
                     ("sparsified", SparsifiedGaussian(1.0, dataset_size=48, max_grad_norm=0.5, noise_multiplier=1.0, seed=3,
                                                       target_delta=1e-5))):
        model = ToyClassifier()
        make_trainer(tmp_path, [cb], max_steps=5).fit(model, ToyData(n=48, batch_size=8))
        runs[name] = (model, cb)
    (a, dp), (b, sg) = runs["dpsgd"], runs["sparsified"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # the same update, bit for bit
    assert sg.history == dp.history and sg.get_epsilon() == dp.get_epsilon()
    assert sg.comm_stats["comm/compression"] == 1.0


def test_masked_update_equals_clipped_masked_micro_batch_loop(tmp_path: Path) -> None:
    seed, gamma, c, lr, b = 21, 0.3, 0.2, 0.5, 8
    model = ToyClassifier(lr=lr).double()
    start = [p.detach().clone() for p in model.parameters()]
    reference = ToyClassifier(lr=lr).double()
    recorder = BatchRecorder()
    sg = SparsifiedGaussian(gamma, dataset_size=48, max_grad_norm=c, noise_multiplier=0.0, seed=seed, target_delta=1e-5,
                            accountant="rdp")
    make_trainer(tmp_path, [recorder, sg], max_steps=1, precision="64-true").fit(model, ToyData(n=48, batch_size=b))
    x, y = recorder.batches[0]
    dim = sum(p.numel() for p in reference.parameters())
    total = torch.zeros(dim, dtype=torch.float64)
    for i in range(len(y)):  # position i in the global Poisson batch, step 0
        mask = draw_mask(dim, gamma, mask_seed(seed, 0, i)).double()
        total += clip(flat_grad(reference, x[i: i + 1].double(), y[i: i + 1]), c) * mask
    expected = apply_update(reference, total / (b * gamma), lr)
    for p0, p, e in zip(start, model.parameters(), expected):
        assert not torch.equal(p0, p)
        torch.testing.assert_close(p.detach(), e, atol=1e-12, rtol=0)
    sent = sg.comm_stats
    assert sent["comm/bytes_per_step"] < 0.5 * sent["comm/dense_bytes_per_step"]


def test_virtual_steps_keep_every_examples_mask(tmp_path: Path) -> None:
    """max_physical_batch_size splits the Poisson batch; the masks follow the examples' global positions."""
    runs = []
    for physical in (None, 3):
        model = ToyClassifier(lr=0.5).double()
        sg = SparsifiedGaussian(0.3, dataset_size=48, max_grad_norm=0.3, noise_multiplier=0.7, seed=5, target_delta=1e-5,
                                accountant="rdp", max_physical_batch_size=physical)
        make_trainer(tmp_path, [sg], max_steps=4, precision="64-true").fit(model, ToyData(n=48, batch_size=8))
        runs.append(model)
    assert max(runs[1].seen_batch_sizes) <= 3 < max(runs[0].seen_batch_sizes)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- clients as participants
def test_client_update_is_the_clipped_masked_sum_of_client_mean_gradients(tmp_path: Path) -> None:
    seed, gamma, c, lr = 5, 0.4, 0.3, 0.5
    data = ToyClients(dtype=torch.float64)
    model, reference = ToyClassifier(lr=lr).double(), ToyClassifier(lr=lr).double()
    recorder = BatchRecorder()
    sg = SparsifiedGaussian(gamma, dataset_size=12, max_grad_norm=c, noise_multiplier=0.0, seed=seed, target_delta=1e-3,
                            participants="clients", accountant="rdp")
    make_trainer(tmp_path, [recorder, sg], max_steps=1, precision="64-true").fit(model, data)
    ids = recorder.batches[0].tolist()
    assert ids and len(model.seen_batch_sizes) == 1 + PROBE_CALLS  # the step and its independence probe
    assert model.seen_batch_sizes[-1] == 3 * len(ids)
    dim = sum(p.numel() for p in reference.parameters())
    total, kept = torch.zeros(dim, dtype=torch.float64), 0
    for cid in ids:
        mask = draw_mask(dim, gamma, mask_seed(seed, 0, cid))
        total += clip(flat_grad(reference, *data.client_batch(cid)), c) * mask.double()
        kept += int(mask.sum())
    expected = apply_update(reference, total / (data.clients_per_round * gamma), lr)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-12, rtol=0)
    sent = sg._unpublished_last_step_comm()  # realised counts: unpublished (comm_stats: public expectations)
    assert sent["comm/bytes_per_step"] == kept * 8  # the kept float64 values, nothing else
    assert sent["comm/dense_bytes_per_step"] == len(ids) * dim * 8 and sent["participants"] == len(ids)
    assert sg.comm_stats["comm/bytes_per_step"] == pytest.approx(data.clients_per_round * gamma * dim * 8)
    assert sg.sample_rate == pytest.approx(4 / 12) and sg.num_samples == 12  # q over clients


@pytest.mark.parametrize("participants", ["examples", "clients"])
def test_empty_poisson_rounds_are_noise_only_steps(tmp_path: Path, participants: str) -> None:
    # q N = 1: P(empty) = (11/12)^12 ~ 0.35 per round, so 24 rounds without one has probability ~3e-5
    recorder = BatchRecorder()
    sg = SparsifiedGaussian(0.3, dataset_size=12, max_grad_norm=0.5, noise_multiplier=1.0, seed=5, target_delta=1e-3,
                            accountant="rdp", participants=participants, plot=False)
    data = ToyClients(clients_per_round=1) if participants == "clients" else ToyData(n=12, batch_size=1)
    model = ToyClassifier()
    make_trainer(tmp_path, [sg, recorder], max_steps=24).fit(model, data)
    sizes = [len(b[0]) if isinstance(b, (list, tuple)) else len(b) for b in recorder.batches]
    assert 0 in sizes
    assert sg.steps == 24 and sum(n for _, _, n in sg.history) == 24  # empty rounds are steps, and accounted
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- resume, records, logs
@pytest.mark.parametrize("participants", ["examples", "clients"])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, participants: str) -> None:
    """A run killed at step 4 keeps its secret in the private secret_dir (outside the run folder) and resumes exactly
    what an uninterrupted run with that seed trains (same masks, batches and noise)."""
    secrets = tmp_path.parent / f"{tmp_path.name}-secrets"

    class Kill(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == 4:
                raise RuntimeError("killed")

    def run(max_steps: int, ckpt: str | None, every: int | None, seed: int | None = None, kill: bool = False
            ) -> tuple[ToyClassifier, SparsifiedGaussian]:
        model = ToyClassifier()
        sg = SparsifiedGaussian(0.3, dataset_size=12 if participants == "clients" else 48, max_grad_norm=0.5,
                                noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", seed=seed,
                                participants=participants, secret_dir=str(secrets))
        callbacks: list[Callback] = [sg] + ([Kill()] if kill else [])
        if every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1,
                                             every_n_train_steps=every))
        data = ToyClients() if participants == "clients" else ToyData(n=48, batch_size=8)
        make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every)).fit(
            model, data, ckpt_path=ckpt)
        return model, sg

    with pytest.raises(RuntimeError, match="killed"):
        run(7, None, every=4, kill=True)
    (kept,) = secrets.iterdir()  # the seed (and so every mask) lives only in the owner-only secret file
    seed = int(__import__("json").loads(kept.read_text())["seed"])
    full, sg_full = run(7, None, every=None, seed=seed)
    resumed, sg_res = run(7, str(tmp_path / "ckpt" / "step=4.ckpt"), every=None)
    assert list(secrets.iterdir()) == []  # the resumed fit ended: its secret is deleted
    assert sg_res.steps == sg_full.steps == 7 and sg_res.history == sg_full.history
    assert sg_res.get_epsilon() == sg_full.get_epsilon()
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ckpt = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    record = ckpt["plpriv_privacy"]
    assert record["mechanism"] == "sparsified-gaussian" and record["keep_fraction"] == 0.3
    assert record["participants"] == participants
    assert not [p for p in tmp_path.rglob("*") if "secret" in p.name]
    assert str(seed).encode() not in (tmp_path / "ckpt" / "step=4.ckpt").read_bytes()


def test_comm_and_dp_metrics_are_logged(tmp_path: Path) -> None:
    sg = SparsifiedGaussian(0.1, dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, target_delta=1e-5,
                            accountant="rdp", plot=False)
    logger = CSVLogger(tmp_path, name="log", version="")
    make_trainer(tmp_path, [sg], max_steps=2, logger=logger, log_every_n_steps=1).fit(ToyClassifier(), ToyData())
    header = (tmp_path / "log" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("dp/epsilon", "comm/keep_fraction", "comm/bytes_per_step", "comm/dense_bytes_per_step",
                "comm/compression"):
        assert key in header


def test_end_of_training_line_names_the_sparsified_accountant(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    sg = SparsifiedGaussian(0.1, dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, target_delta=1e-5,
                            accountant="rdp", plot=False)
    lightning_logger = logging.getLogger("lightning.pytorch")  # does not propagate to caplog's root handler
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            make_trainer(tmp_path, [sg], max_steps=3).fit(ToyClassifier(), ToyData(n=48, batch_size=8))
    finally:
        lightning_logger.removeHandler(caplog.handler)
    line = next(r.getMessage() for r in caplog.records if "steps, (epsilon, delta)" in r.getMessage())
    dpsgd = RDPAccountant()
    dpsgd.history = list(sg.history)
    assert sg.get_epsilon() < dpsgd.get_epsilon(1e-5)  # not DP-SGD's rdp epsilon: the masks amplify
    assert f"{sg.get_epsilon():.4f}" in line and "sparsified Gaussian" in line and "SparsifiedMechanism" in line


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", [0, 1.5, -1.0, float("nan")])
def test_keep_fraction_outside_the_unit_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"keep_fraction.*" + repr(bad).replace(".", r"\.")):
        SparsifiedGaussian(bad, max_grad_norm=1.0, noise_multiplier=1.0)


def test_clients_missing_from_the_data_fail_before_training(tmp_path: Path) -> None:
    model = ToyClassifier()
    start = [p.detach().clone() for p in model.parameters()]
    sg = SparsifiedGaussian(0.5, dataset_size=12, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, participants="clients")
    with pytest.raises(ValueError, match=r"client ids \[3, 7\]"):
        make_trainer(tmp_path, [sg], max_steps=3).fit(model, ToyClients(missing=(3, 7)))
    assert sg.steps == 0 and all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(grad_sample_mode="ghost"), "ghost"),
    (dict(participants="clients", max_physical_batch_size=4), "clipped twice"),
    (dict(participants="everyone"), "participants"),
    (dict(mask="top_k"), "mask"),
])
def test_bad_arguments_are_refused_eagerly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparsifiedGaussian(0.5, max_grad_norm=1.0, noise_multiplier=1.0, **kwargs)


def test_clients_need_a_client_source(tmp_path: Path) -> None:
    sg = SparsifiedGaussian(0.5, dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, participants="clients")
    with pytest.raises(ValueError, match="client_batch"):
        make_trainer(tmp_path, [sg], max_steps=1).fit(ToyClassifier(), ToyData())


# --------------------------------------------------------------------------- FederatedDigits
@pytest.mark.parametrize("partition", ["iid", "label_skew"])
def test_federated_digits_partition(partition: str) -> None:
    dm = FederatedDigits(num_clients=40, clients_per_round=5, partition=partition, classes_per_client=2, seed=1)
    dm.setup()
    indices = dm.client_indices
    flat = sorted(i for idx in indices for i in idx)
    assert flat == list(range(len(dm.train_base)))  # every training image in exactly one client
    assert dm.client_ids() == list(range(40))
    labels = dm.train_base.tensors[1]
    per_client = [len(set(labels[idx].tolist())) for idx in indices]
    if partition == "iid":
        assert max(map(len, indices)) - min(map(len, indices)) <= 1 and sum(per_client) / 40 > 5
    else:
        assert max(per_client) <= 4 and sum(per_client) / 40 <= 2.6
    again = FederatedDigits(num_clients=40, clients_per_round=5, partition=partition, seed=1)
    again.setup()
    assert again.client_indices == indices  # seeded
    x, y = dm.client_batch(7)
    assert x.shape[1:] == (1, 16, 16) and len(x) == len(y) == len(indices[7])
    with pytest.raises(KeyError, match="not 40"):
        dm.client_batch(40)
    with pytest.raises(ValueError, match="num_clients"):
        partition_clients(labels, 0)
    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedDigits(num_clients=4, clients_per_round=5)


# --------------------------------------------------------------------------- DDP: kept values only
DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from lightning.pytorch import Trainer
    from _dp_toy import ToyClassifier
    from _dp_toy import ToyData
    from test_sparsified_gaussian import ToyClients
    from plpriv.callbacks import SparsifiedGaussian

    out, devices, participants = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sg = SparsifiedGaussian(0.1, dataset_size=16 if participants == "clients" else 40, max_grad_norm=0.5, noise_multiplier=1.0, seed=4, target_delta=1e-3,
                            accountant="rdp", participants=participants)
    model = ToyClassifier(lr=0.5, hidden=64).double()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=5,
                      precision="64-true", callbacks=[sg], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    data = (ToyClients(clients=16, per_client=3, clients_per_round=6, dtype=torch.float64) if participants == "clients"
            else ToyData(n=40, batch_size=8))
    trainer.fit(model, data)
    torch.save({"params": [p.detach() for p in model.parameters()], "steps": sg.steps, "history": sg.history,
                "comm": sg.comm_stats}, f"{out}/rank{trainer.global_rank}_of{devices}.pt")
    """
)


@pytest.mark.distributed
@pytest.mark.parametrize("participants", ["clients", pytest.param("examples", marks=pytest.mark.slow)])
def test_ddp_exchanges_kept_values_only_and_equals_the_single_process_run(tmp_path: Path, participants: str) -> None:
    """Clients: kept values by all_gather, noise added identically on every rank. Examples (slow): masks keyed by
    global batch position, DP-SGD's dense all-reduce of the noised sum."""
    script = tmp_path / "ddp_sparsified.py"
    script.write_text(DDP_SCRIPT)
    for devices in (2, 1):
        run_script(script, [str(tmp_path), str(devices), participants], tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of1.pt")
    for a, b, s in zip(r0["params"], r1["params"], single["params"]):
        assert torch.equal(a, b)  # replicas identical: every rank rebuilt the same sum and added the same noise
        torch.testing.assert_close(a, s, atol=1e-10, rtol=0)  # the single-process run, up to rounding
    assert r0["steps"] == single["steps"] == 5 and r0["history"] == single["history"]
    comm = r0["comm"]
    if participants == "clients":
        assert comm["comm/rank_bytes_sent"] < 0.6 * comm["comm/rank_dense_bytes"], comm  # kept values, not d floats
        assert comm["comm/bytes_per_step"] == r1["comm"]["comm/bytes_per_step"]


# --------------------------------------------------------------------------- recipes and fragment
@pytest.mark.parametrize("recipe", ["recipes/sparsified/digits_examples.yaml",
                                    "recipes/sparsified/digits_clients.yaml"])
def test_sparsified_recipes_train_and_account(tmp_path: Path, recipe: str) -> None:
    from plpriv.cli import PlprivCLI

    cli = PlprivCLI(
        args=["-c", str(ROOT / recipe), "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
              "--data.init_args.image_size=8", "--model.init_args.backbone_kwargs={act: tanh, width: 4}",
              "--trainer.callbacks.init_args.accountant=rdp"],
        run=False,
    )
    (sg,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsifiedGaussian)]
    assert sg.keep_fraction == 0.1 and sg.seed is None and sg.target_epsilon == 3.0
    cli.trainer.fit(cli.model, cli.datamodule)
    assert sg.steps == 2 and sg.get_epsilon() <= sg.target_epsilon
    assert sg.comm_stats["comm/compression"] > 5


def test_fragment_stacks_onto_a_recipe() -> None:
    import yaml

    fragment = yaml.safe_load((ROOT / "callbacks" / "sparsified_gaussian.yaml").read_text())
    (entry,) = fragment["trainer"]["callbacks+"]
    assert entry["class_path"] == "plpriv.callbacks.SparsifiedGaussian"
    SparsifiedGaussian(**{k: v for k, v in entry["init_args"].items()})  # the arguments are the callback's
