"""Silent divergence (issue #18, item 7): a loss part that grows by orders of magnitude is
warned about once, with its weight; non-finite steps are skipped (their update taken back on
the device) up to ``_max_nonfinite_steps``, then the run stops with its checkpoint kept."""

import logging
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine_step import ExplodingTask
from torch import nn

from kd_losses import DKDWeights, SSDKDWeights
from models import ProjectionHead
from raug.data.loaders import make_loader
from raug.files.checkpoint import load_checkpoint
from raug.methods.dkd import DKDTask
from raug.methods.ssdkd import SSDKDTask
from raug.run.config import RESUMABLE_CHANGES, SHARED_CONFIG, shared_checks
from raug.testing import BlobDataset, TinyNet
from raug.train.engine import FitSettings, NonFiniteLossError, fit, train_one_epoch
from raug.train.outputs import RunOutputs

CPU = torch.device("cpu")
KD_WEIGHT = 12.5


def loaders():
    """12 training batches of 4 per epoch."""
    train = make_loader(BlobDataset(48, seed=1), 4, 0, CPU, 0, train=True)
    val = make_loader(BlobDataset(24, seed=2), 8, 0, CPU, 0, train=False)
    return train, val


def settings(**kw):
    base = {"epochs": 3, "lr": 0.05, "sched_patience": 10, "early_stop": 10, "device": "cpu"}
    return FitSettings(**{**base, **kw})


class WatchedTask(ExplodingTask):
    """CE plus a logged ``kd`` (weight 12.5, 0.5) and ``count`` (weight 0, 2).

    ``grow``: from this (epoch, batch) on, ``kd`` and ``count`` are 1000x larger.
    ``bad``: at these (epoch, batch) the images are NaN too (so the BatchNorm statistics
    and the gradients are), besides the NaN loss and infinite ``kd`` of ``ExplodingTask``.
    """

    def __init__(self, grow=None, bad=()):
        super().__init__(at=set(bad))
        self.grow = grow
        self.states = {}  # (epoch, batch) -> the trained state when the step began

    def part_weights(self):
        return {"kd": KD_WEIGHT, "count": 0.0}

    def train_step(self, batch):
        at = (self.epoch, self.batch + 1)
        self.states[at] = {k: v.clone() for k, v in self.model.state_dict().items()}
        if at in self.at:
            batch = {**batch, "image": batch["image"] * float("nan")}
        out = super().train_step(batch)
        scale = 1000.0 if self.grow is not None and at >= self.grow else 1.0
        out["kd"] = out["kd"] * scale
        out["count"] = torch.tensor(2.0 * scale)
        return out


def _records(caplog, text):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


# ----------------------------------------------------------------------------- growth


def test_a_part_grown_1000x_is_warned_once_with_its_weight(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="raug.train.engine")
    # reference: the first 16 batches (epoch 1 and 4 of epoch 2); growth from epoch 3, batch 2
    fit(WatchedTask(grow=(3, 2)), *loaders(), settings(), RunOutputs(tmp_path))
    grew = _records(caplog, "grew")
    assert len(grew) == 1, grew  # kd grows on 10 batches; count (weight 0) is no loss
    assert grew[0].startswith("loss part kd (weight in the loss: kd=12.5) grew 1000x: 500 at "
                              "epoch 3, batch 2 (training) against 0.5, the median of its "
                              "first 16 batches")


def test_growth_before_the_reference_is_complete_is_not_judged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="raug.train.engine")
    fit(WatchedTask(grow=(1, 0)), *loaders(), settings(), RunOutputs(tmp_path))
    assert _records(caplog, "grew") == []  # its reference is the grown value


# ----------------------------------------------------------------------------- non-finite steps


def test_one_nan_step_within_the_budget_is_skipped_and_warned(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="raug.train.engine")
    task = WatchedTask(bad={(2, 5)})
    result = fit(task, *loaders(), settings(max_nonfinite_steps=1), RunOutputs(tmp_path))
    assert result.last_epoch == 3
    warned = _records(caplog, "non-finite")
    assert warned == [
        "non-finite training step at epoch 2, batch 5 (training): loss=nan, kd=inf (weight in "
        "the loss: kd=12.5); skipped: left out of the means, a non-finite update not applied "
        "(step 1 of the _max_nonfinite_steps=1 the run may skip; warned once per part)"
    ]
    # the NaN step was taken back: weights and BatchNorm statistics as before it
    before, after = task.states[(2, 5)], task.states[(2, 6)]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    # and left out of the epoch's means: kd is 0.5 on every kept batch
    assert result.history[1]["train.kd"] == 0.5
    assert all(math.isfinite(v) for row in result.history for v in row.values())


def test_without_a_budget_the_first_nan_step_stops_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        fit(WatchedTask(bad={(2, 5)}), *loaders(), settings(), RunOutputs(tmp_path))
    assert str(err.value).startswith(
        "non-finite loss at epoch 2, batch 5 (training): loss=nan, kd=inf (weight in the loss: "
        "kd=12.5); 1 non-finite training step(s) in this run, more than _max_nonfinite_steps=0; "
        "the last checkpoint written before this epoch is kept")
    assert load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")["epoch"] == 1


def test_the_step_past_the_budget_stops_with_the_checkpoint_kept(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="raug.train.engine")
    task = WatchedTask(bad={(1, 3), (2, 0), (2, 7)})
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at epoch 2, batch 7 .*kd=12\.5"
                                                 r"\); 3 non-finite training step\(s\) in this "
                                                 r"run, more than _max_nonfinite_steps=2;"):
        fit(task, *loaders(), settings(max_nonfinite_steps=2), RunOutputs(tmp_path))
    assert len(_records(caplog, "non-finite training step")) == 1  # once per part
    last = load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in last["model_state_dict"].values())


def test_the_guard_adds_no_host_sync(monkeypatch):
    task = WatchedTask(bad={(1, 2)})
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.05, momentum=0.9)
    batches = list(loaders()[0])
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self_, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self_, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    stats = train_one_epoch(task, batches, opt, torch.amp.GradScaler("cpu", enabled=False), CPU,
                            None, 1, settings(sync_every=4, max_nonfinite_steps=1))
    assert calls == ["tolist"] * 4 + ["cpu"]  # 12 // 4 syncs + the epoch's tail, predictions
    assert stats["kd"] == 0.5


def test_a_skipped_first_step_leaves_the_momentum_as_if_it_never_ran():
    """SGD creates its momentum buffers on the first step: taken back, they start at zero."""
    batches = list(loaders()[0])[:2]
    runs = {}
    for name, bad in (("skipped", {(1, 0)}), ("clean", set())):
        task = WatchedTask(bad=bad)
        task.model.features[3] = nn.Identity()  # no dropout: the runs draw no random numbers
        opt = torch.optim.SGD(task.trainable_parameters(), lr=0.05, momentum=0.9)
        source = batches if bad else batches[1:]  # the clean run never sees the bad batch
        task.epoch = 0
        train_one_epoch(task, source, opt, torch.amp.GradScaler("cpu", enabled=False), CPU,
                        None, 1, settings(max_nonfinite_steps=1))
        runs[name] = (task, opt)
    (skipped, opt_s), (clean, opt_c) = runs["skipped"], runs["clean"]
    for p_s, p_c in zip(skipped.trainable_parameters(), clean.trainable_parameters()):
        assert torch.equal(p_s, p_c)
        assert torch.equal(opt_s.state[p_s]["momentum_buffer"], opt_c.state[p_c]["momentum_buffer"])


def _rank_worker(rank, root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        task = WatchedTask(bad={(1, 2)} if rank == 1 else ())  # NaN images on rank 1 only
        train = make_loader(BlobDataset(48, seed=1), 4, 0, CPU, 0, train=True, rank=rank,
                            world_size=2)
        val = make_loader(BlobDataset(24, seed=2), 8, 0, CPU, 0, train=False, rank=rank,
                          world_size=2)
        result = fit(task, train, val, settings(epochs=1, max_nonfinite_steps=1),
                     RunOutputs(Path(root) / "run"))
        torch.save({"state": task.model.state_dict(), "history": result.history},
                   Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.numeric
def test_under_torchrun_every_rank_skips_the_step_a_rank_found_non_finite(tmp_path):
    # rank 1's NaN reaches rank 0's gradients through DDP's all-reduce: both take the step back
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        assert torch.isfinite(value.float()).all(), key
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["history"][0]["train.kd"] == 0.5


# ----------------------------------------------------------------------------- the KD tasks' weights


def _batch(n=4, size=8):
    gen = torch.Generator().manual_seed(3)
    return {"image": torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64),
            "label": torch.tensor([0, 1, 2, 1]), "meta": torch.zeros(n, 11, dtype=torch.float64)}


@pytest.mark.parametrize("method", ["none", "blkd", "rkd", "crkd", "d_kd", "fitnet"])
def test_dkd_part_weights_rebuild_the_loss(method):
    torch.manual_seed(0)
    weights = DKDWeights(lambd=0.3, T=4.0, lambd_fitnet=2.0)
    teacher = None if method == "none" else TinyNet().double()
    adapter = nn.Identity() if method in ("crkd", "d_kd", "fitnet") else None
    task = DKDTask(TinyNet().double(), teacher, adapter, method=method, weights=weights)
    out = task.train_step(_batch())
    part_weights = task.part_weights()
    assert set(part_weights) == set(out) - {"loss", "logits"}
    total = sum(w * out[name] for name, w in part_weights.items())
    assert total.item() == pytest.approx(out["loss"].item(), rel=1e-12)


def test_ssdkd_part_weights_rebuild_the_loss():
    torch.manual_seed(0)
    weights = SSDKDWeights(hr_w=0.5)
    task = SSDKDTask(TinyNet().double(), ProjectionHead(8).double(), TinyNet().double(),
                     ProjectionHead(8).double(), nn.Identity(), weights=weights)
    out = task.train_step(_batch())
    part_weights = task.part_weights()
    assert set(part_weights) == set(out) - {"loss", "logits"}
    assert part_weights["n_tf"] == part_weights["n_ss"] == 0.0
    assert part_weights["rkd_angle"] == 0.5 * 1.0 * 50.0
    # hr is the weighted sum of the relational parts: count either, not both
    inside_hr = ("rkd_distance", "rkd_angle", "channel_relation")
    own = {name: w for name, w in part_weights.items() if name not in inside_hr}
    total = sum(w * out[name] for name, w in own.items())
    assert total.item() == pytest.approx(out["loss"].item(), rel=1e-12)
    relational = sum(part_weights[n] * out[n] for n in inside_hr)
    assert relational.item() == pytest.approx(0.5 * out["hr"].item(), rel=1e-12)


# ----------------------------------------------------------------------------- the config key


@pytest.mark.parametrize(("value", "ok"), [(0, True), (5, True), (-1, False), (1.5, False),
                                           (True, False), (None, False)])
def test_max_nonfinite_steps_is_an_integer_at_least_zero(tmp_path, value, ok):
    config = {**SHARED_CONFIG, "_save_folder": str(tmp_path), "_max_nonfinite_steps": value}
    problems = [p for p in shared_checks(config) if p.startswith("_max_nonfinite_steps")]
    assert problems == ([] if ok else [
        f"_max_nonfinite_steps={value!r} is invalid: expected an integer >= 0"])


def test_max_nonfinite_steps_reaches_the_settings_and_may_change_on_resume():
    assert SHARED_CONFIG["_max_nonfinite_steps"] == 0
    assert "_max_nonfinite_steps" in RESUMABLE_CHANGES
    config = {"_epochs": 2, "_lr_init": 0.1, "_sched_factor": 0.1, "_sched_patience": 1,
              "_sched_min_lr": 0.0, "_early_stop": 2, "_best_metric": "loss", "_device": "cpu",
              "_amp": None, "_channels_last": True, "_compile": False, "_resume": False}
    assert FitSettings.from_config(config).max_nonfinite_steps == 0
    assert FitSettings.from_config({**config, "_max_nonfinite_steps": 3}).max_nonfinite_steps == 3
