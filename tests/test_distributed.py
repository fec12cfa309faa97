"""Data parallelism under torchrun: helpers, gradient-correct all-gather, DDP fit, and the scripts.

Multi-process tests use 2 CPU processes with gloo: ``torch.multiprocessing.spawn``
for the engine-level checks and ``python -m torch.distributed.run`` for the
experiment scripts, exactly as a user launches them.
"""

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kd_losses import RelationalWeights, relational_kd
from raug.data.loaders import TEST_CSV, TRAIN_CSV, EpochSampler, ShardSampler, make_loader
from raug.files.checkpoint import load_checkpoint
from raug.files.paths import REPO_ROOT
from raug.run.experiment import resolve_path_updates, worker_options
from raug.testing import BlobDataset, TinyNet
from raug.train.device import DeviceError
from raug.train.distributed import (
    DistEnv,
    DistributedError,
    all_gather_rows,
    distributed_device,
    env_from_environ,
    gather_embeddings,
    own_rows,
    set_gather_embeddings,
    wrap_task,
)
from raug.train.engine import FitSettings, NonFiniteLossError, evaluate, fit
from raug.train.outputs import RunOutputs
from raug.train.task import ClassificationTask

SCRIPTS = REPO_ROOT / "experiment" / "isic"
CPU = torch.device("cpu")
WORLD = 2
QUICK = ["with", "quick", "_device=cpu", "_img_size=32", "_epochs=1"]


# ----------------------------------------------------------------------------- pure helpers


def test_env_from_environ_reads_torchrun_variables_and_names_bad_ones():
    assert env_from_environ({}) == DistEnv()
    env = env_from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.is_distributed
    assert not env.is_main
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        env_from_environ({"WORLD_SIZE": "two"})
    with pytest.raises(DistributedError, match="RANK=2 is outside WORLD_SIZE=2"):
        env_from_environ({"RANK": "2", "WORLD_SIZE": "2"})


def test_distributed_device_rules():
    two_per_node = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert distributed_device("cpu", two_per_node, cuda_count=2) == CPU
    assert distributed_device("auto", two_per_node, cuda_count=0) == CPU
    assert distributed_device("auto", two_per_node, cuda_count=2) == torch.device("cuda", 1)
    assert distributed_device("cuda", two_per_node, cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="LOCAL_RANK=1 needs cuda:1 but only 1 CUDA device"):
        distributed_device("cuda", two_per_node, cuda_count=1)
    with pytest.raises(DeviceError, match="_device='cuda:0' would put all 2 processes"):
        distributed_device("cuda:0", two_per_node, cuda_count=2)
    with pytest.raises(DeviceError, match="_device='cuda' but CUDA is not available"):
        distributed_device("cuda", two_per_node, cuda_count=0)


def test_epoch_sampler_shards_partition_the_padded_epoch():
    single = list(EpochSampler(11, seed=5).__iter__())
    shards = []
    for rank in range(3):
        sampler = EpochSampler(11, seed=5, rank=rank, num_replicas=3)
        sampler.set_epoch(0)
        shards.append(list(sampler))
        assert len(sampler) == 4
    # rank r holds every 3rd pair of the single-process sequence, padded with its head
    padded = single + single[:1]
    assert [pair for k in range(4) for pair in (shards[0][k], shards[1][k], shards[2][k])] == padded
    # one replica is exactly the single-process sampler, for every epoch
    for epoch in (1, 7):
        a, b = EpochSampler(11, seed=5), EpochSampler(11, seed=5, rank=0, num_replicas=1)
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)


def test_shard_sampler_covers_every_index_once():
    shards = [ShardSampler(10, rank, 3) for rank in range(3)]
    assert [s.shard_indices for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_outputs_of_a_rank_above_zero_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    quiet = RunOutputs(tmp_path / "run")
    assert not quiet.is_main
    quiet.save_checkpoint("last-checkpoint/last-checkpoint.pth", {"epoch": 1})
    quiet.write_json("metrics.json", {"a": 1.0})
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    loud = RunOutputs(tmp_path / "run")
    loud.write_json("metrics.json", {"a": 1.0})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"a": 1.0}


def test_worker_options_silence_observers_and_path_updates_resolve_against_the_repo():
    opts = worker_options({"--file_storage": "/tmp/runs", "--mongo_db": "host:1:db", "--loglevel": None,
                           "--print-config": True})
    assert opts["--unobserved"] is True
    assert opts["--print-config"] is False
    assert opts["--file_storage"] is None
    assert opts["--mongo_db"] is None
    assert opts["--loglevel"] == "WARNING"
    assert worker_options({"--loglevel": "DEBUG"})["--loglevel"] == "DEBUG"
    keys = ("_base_path", "_save_folder", "_teacher_ckpt")
    resolved = resolve_path_updates(
        {"_save_folder": "rel/out", "_teacher_ckpt": "/abs/t.pth", "_epochs": 3}, keys)
    assert resolved == {"_save_folder": str(REPO_ROOT / "rel" / "out"), "_teacher_ckpt": "/abs/t.pth",
                        "_epochs": 3}
    assert resolve_path_updates(None, keys) is None


def test_one_ddp_wrapper_runs_the_task_step_and_reduces_only_trained_modules(tmp_path):
    """The whole task is one DDP module: ``wrapper(batch)`` is ``task.train_step(batch)``
    (``forward_kd`` included), gradients reach the trained modules, never the frozen ones."""

    class KDish(ClassificationTask):
        def __init__(self):
            torch.manual_seed(0)
            super().__init__(TinyNet(dropout=0.0))
            self.trained["adapter"] = nn.Linear(8, 8)
            self.frozen["teacher"] = TinyNet(dropout=0.0).requires_grad_(False)

        def train_step(self, batch):
            out = self.model.forward_kd(batch["image"])
            with torch.no_grad():
                t = self.frozen["teacher"].forward_kd(batch["image"])["avg_pool"]
            loss = F.cross_entropy(out["logits"], batch["label"]) + F.mse_loss(
                self.trained["adapter"](out["avg_pool"]), t)
            return {"loss": loss, "logits": out["logits"]}

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        task = KDish().eval()  # eval: no BN update, so both calls see the same weights
        batch = next(iter(make_loader(BlobDataset(8), 8, 0, CPU, 0, train=False)))
        wrapper = wrap_task(task, CPU)
        assert wrapper.module is task
        out = wrapper(batch)
        torch.testing.assert_close(out["loss"], task.train_step(batch)["loss"], rtol=0, atol=0)
        out["loss"].backward()
        assert all(p.grad is not None for p in task.trainable_parameters())
        assert all(p.grad is None for p in task.frozen.parameters())
        assert {id(p) for p in task.trainable_parameters()} == {
            id(p) for p in task.trained.parameters()}
    finally:
        dist.destroy_process_group()


def test_gather_embeddings_is_the_identity_without_a_process_group():
    t = torch.randn(4, 3, requires_grad=True)
    set_gather_embeddings(True)
    try:
        assert gather_embeddings(t) is t
        assert all_gather_rows(t) is t
    finally:
        set_gather_embeddings(False)


# ----------------------------------------------------------------------------- multi-process (spawn)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of WORLD gloo processes runs every engine-level worker (start-up is the cost)."""
    root = tmp_path_factory.mktemp("spawn")
    mp.spawn(_entry, args=(str(root / "pg_init"), str(root)), nprocs=WORLD, join=True)
    return root


def _entry(rank, init, out):
    torch.set_num_threads(1)
    # A short timeout: a regression that leaves a rank waiting fails instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        for name, worker in (("gather", _gather_grad_worker), ("fit", _ddp_fit_worker),
                             ("nonfinite", _nonfinite_worker)):
            folder = Path(out) / name
            folder.mkdir(exist_ok=True)
            worker(rank, folder)
            dist.barrier()
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _relational_loss(emb_s, emb_t, anchors=None):
    """25 RKD distance + 50 RKD angle, through the block the KD tasks use."""
    rkd_only = RelationalWeights(lambd_drkd=1.0, lambd_crkd=0.0)
    return relational_kd({"avg_pool": emb_s}, {"avg_pool": emb_t}, rkd_only, anchors=anchors)["hr"]


def _problem():
    """A student layer, inputs of 8 samples split 3 + 5 over two ranks, teacher embeddings.

    Float64 throughout: the claim is that the gathered computation *is* the single-process
    one, and in float32 the two summation orders differ by CPU kernel (3.4e-5 relative on
    an AMD EPYC, issue #18); in float64 the same reordering stays below 1e-12.
    """
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    emb_t = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    return layer, x, emb_t, [slice(0, 3), slice(3, 8)]


@contextlib.contextmanager
def _host_reads():
    """Records every Tensor.item / tolist call (a host sync on CUDA) inside the block."""
    reads = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _name=name, _original=original, **kwargs):
                reads.append(_name)
                return _original(self_, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield reads


def _gather_grad_worker(rank, out):
    layer, x, emb_t, shards = _problem()
    ddp = nn.parallel.DistributedDataParallel(layer)
    own = shards[rank]
    emb_s = all_gather_rows(ddp(x[own]))  # gradient-correct, unequal shards (3 and 5 rows)
    teacher = all_gather_rows(emb_t[own])  # constants: no gradient needed
    loss = _relational_loss(emb_s, teacher)
    loss.backward()
    # the raw per-shard gradient: world_size * dL/d(own rows)
    rows = x[own].clone().requires_grad_(True)
    _relational_loss(all_gather_rows(rows @ layer.weight.detach().t()), teacher).backward()
    # The tasks' path: equal shards (4 + 4) as training gives them; the hooks gather only
    # when switched on and while autograd records, and each rank averages the RKD rows of
    # its own anchors only (own_rows) against the global batch.
    half = slice(4 * rank, 4 * rank + 4)
    hook_layer = copy.deepcopy(layer)
    hook_layer.zero_grad(set_to_none=True)
    hook_ddp = nn.parallel.DistributedDataParallel(hook_layer)
    set_gather_embeddings(True)
    try:
        with torch.inference_mode():
            in_eval = gather_embeddings(emb_t[half]).shape[0]
        anchors = own_rows(4)
        with _host_reads() as reads:  # the hooks read nothing back to the host
            hook_loss = _relational_loss(gather_embeddings(hook_ddp(x[half])),
                                         gather_embeddings(emb_t[half]), anchors)
            hook_loss.backward()
    finally:
        set_gather_embeddings(False)
    off = (gather_embeddings(emb_t[half]).shape[0], own_rows(4))
    torch.save({"loss": loss.detach(), "weight": layer.weight.grad, "bias": layer.bias.grad,
                "rows": rows.grad, "hook_loss": hook_loss.detach(),
                "hook_weight": hook_layer.weight.grad, "hook_bias": hook_layer.bias.grad,
                "hook_rows": (in_eval, (anchors.start, anchors.stop), off), "reads": reads},
               out / f"rank{rank}.pt")


@pytest.mark.numeric
def test_all_gather_rows_gives_the_single_process_gradient(spawned):
    out = spawned / "gather"
    layer, x, emb_t, shards = _problem()
    loss = _relational_loss(layer(x), emb_t)
    loss.backward()
    x_rows = x.clone().requires_grad_(True)
    _relational_loss(x_rows @ layer.weight.detach().t(), emb_t).backward()
    for rank in range(WORLD):
        got = torch.load(out / f"rank{rank}.pt", weights_only=True)
        # float64: only summation order differs, ~1e-15 relative; 1e-10 leaves a wide margin
        assert torch.allclose(got["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        # DDP averages over ranks: the parameters get exactly the concatenated-batch gradient
        assert torch.allclose(got["weight"], layer.weight.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got["bias"], layer.bias.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got["rows"], WORLD * x_rows.grad[shards[rank]], rtol=1e-10,
                              atol=1e-12)
        # the hook path: rank r's anchors are its own rows; gradients equal the one process's
        assert got["hook_rows"] == (4, (4 * rank, 4 * rank + 4), (4, None))
        assert got["reads"] == []  # equal training shards: no row counts exchanged
        assert torch.allclose(got["hook_weight"], layer.weight.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got["hook_bias"], layer.bias.grad, rtol=1e-10, atol=1e-12)
    # each rank's value covers its own anchors: their mean is the single-process loss
    hook_losses = [torch.load(out / f"rank{r}.pt", weights_only=True)["hook_loss"]
                   for r in range(WORLD)]
    assert torch.allclose(sum(hook_losses) / WORLD, loss.detach(), rtol=1e-10, atol=1e-12)
    assert abs((hook_losses[0] - hook_losses[1]).item()) > 1e-3 * loss.item()  # really per rank


def _blobs(n, seed, dtype=torch.float32):
    data = BlobDataset(n, seed=seed)
    data.images = data.images.to(dtype)
    return data


def _tiny_loaders(rank, batch_size=8, dtype=torch.float32):
    train = make_loader(_blobs(46, 1, dtype), batch_size, 0, CPU, 7, train=True, rank=rank,
                        world_size=WORLD)
    val = make_loader(_blobs(21, 2, dtype), batch_size, 0, CPU, 7, train=False, rank=rank,
                      world_size=WORLD)
    return train, val


def _settings(**kw):
    return FitSettings(**{"epochs": 3, "lr": 0.05, "early_stop": 10, "sched_patience": 10,
                          "device": "cpu", **kw})


class _ForwardKdTask(ClassificationTask):
    """Trains through ``forward_kd`` (as the KD tasks do): must still go through DDP."""

    def _step(self, batch):
        logits = self.trained["model"].forward_kd(batch["image"])["logits"]
        return {"loss": F.cross_entropy(logits, batch["label"], weight=self.class_weight),
                "logits": logits}


def _task(seed):
    torch.manual_seed(seed)
    return _ForwardKdTask(TinyNet(), class_weight=torch.tensor([1.0, 2.0, 0.5]))


def _ddp_fit_worker(rank, out):
    straight = _task(0)
    torch.manual_seed(100 + rank)  # dropout masks differ per rank, as in run_training
    full = fit(straight, *_tiny_loaders(rank), _settings(), RunOutputs(out / "a"))
    # interrupted after epoch 2, resumed in "new processes" from rank 0's last checkpoint
    first = _task(0)
    torch.manual_seed(100 + rank)
    fit(first, *_tiny_loaders(rank), _settings(epochs=2), RunOutputs(out / "b"))
    resumed_task = _task(5 + rank)  # other weights and RNG state on each rank
    resumed = fit(resumed_task, *_tiny_loaders(rank), _settings(resume=True), RunOutputs(out / "b"))
    # unweighted CE: a batch-size-independent mean (a class-weighted one depends on the batching).
    # Float64 (a copy of the model): the claim is that the gathered split *is* the whole
    # split; in float32 the per-batch means of the two batchings differ by rounding, by an
    # amount that depends on the CPU's kernels (issue #18).
    plain = ClassificationTask(copy.deepcopy(straight.trained["model"]).double())
    sharded = evaluate(plain, _tiny_loaders(rank, dtype=torch.float64)[1], CPU)
    whole = evaluate(plain, make_loader(_blobs(21, 2, torch.float64), 8, 0, CPU, 7, train=False),
                     CPU)
    torch.save({
        "full": full.history, "resumed": resumed.history,
        "weights": {k: v.clone() for k, v in straight.trained["model"].state_dict().items()},
        "resumed_weights": {k: v.clone() for k, v in resumed_task.trained["model"].state_dict().items()},
        "sharded": (sharded.ids, sharded.logits, sharded.stats), "whole": (whole.ids, whole.logits, whole.stats),
    }, out / f"rank{rank}.pt")


@pytest.mark.numeric
def test_ddp_fit_agrees_across_ranks_resumes_exactly_and_gathers_whole_splits(spawned):
    out = spawned / "fit"
    got = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # every rank holds the same model (forward_kd went through DDP: gradients were averaged)
    # and took the same decisions (history incl. val metrics and lr)
    assert got[0]["full"] == got[1]["full"]
    assert all(torch.equal(got[0]["weights"][k], got[1]["weights"][k]) for k in got[0]["weights"])
    assert [row["epoch"] for row in got[0]["full"]] == [1, 2, 3]
    # resume under DDP is bit-identical to the uninterrupted run (each rank gets its own RNG back)
    for rank in range(WORLD):
        assert got[rank]["resumed"] == got[rank]["full"]
        w, r = got[rank]["weights"], got[rank]["resumed_weights"]
        assert all(torch.equal(w[k], r[k]) for k in w)
    # sharded evaluation gathers the whole split in file order, each sample once
    for rank in range(WORLD):
        ids, logits, stats = got[rank]["sharded"]
        ids_all, logits_all, stats_all = got[rank]["whole"]
        assert ids == ids_all == [f"img_{i:04d}" for i in range(21)]
        # float64 forward, which evaluate rounds once to float32: at most 1 float32 ulp
        # (1.2e-7 relative) apart; a misplaced sample differs by O(1)
        assert torch.allclose(logits, logits_all, rtol=1e-6, atol=1e-12)
        # float64 batch means, each rounded once to float32 by evaluate (<= 2^-24 relative),
        # then summed as positive terms in float64: the batchings differ by <= 2^-23 = 1.2e-7
        assert stats["loss"] == pytest.approx(stats_all["loss"], rel=1e-6)
    # only rank 0 wrote: one checkpoint pair, the last one with both ranks' RNG states
    last = load_checkpoint(out / "a" / "last-checkpoint" / "last-checkpoint.pth")
    assert last["epoch"] == 3
    assert len(last["rng_by_rank"]) == WORLD
    assert sorted(p.name for p in (out / "a").rglob("*") if p.is_file()) == [
        "best-checkpoint.pth", "last-checkpoint.pth"]


class _ExplodingTask(ClassificationTask):
    """NaN loss on rank 1 only, at its third training batch."""

    def __init__(self):
        super().__init__(TinyNet())
        self.calls = 0

    def train_step(self, batch):
        out = super().train_step(batch)
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 3:
            out["loss"] = out["loss"] * float("nan")
        return out


def _nonfinite_worker(rank, out):
    torch.manual_seed(0)
    try:
        fit(_ExplodingTask(), *_tiny_loaders(rank, batch_size=4), _settings(epochs=2), RunOutputs(out / "run"))
    except NonFiniteLossError as exc:
        (out / f"rank{rank}.txt").write_text(str(exc))


@pytest.mark.numeric
def test_a_non_finite_loss_on_one_rank_stops_every_rank(spawned):
    out = spawned / "nonfinite"
    messages = [(out / f"rank{r}.txt").read_text() for r in range(WORLD)]
    for message in messages:
        assert "non-finite loss at epoch 1, batch 2 (training): on rank(s) [1]" in message
    assert "rank 1: loss=nan" in messages[1]
    assert not (out / "run").exists()  # stopped in epoch 1: nothing was written


# ----------------------------------------------------------------------------- the scripts under torchrun


def torchrun(script, *args, cwd=REPO_ROOT, nproc=WORLD, timeout=600):
    """``python -m torch.distributed.run --standalone --nproc_per_node=N <script> <args>``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def check_single_completed_run(out, base, name):
    """One Sacred run, COMPLETED, logged once per epoch; predictions cover each split exactly once."""
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.isdigit())
    assert runs == ["1"]
    run = json.loads((out / "1" / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["experiment"]["name"] == name
    metrics = json.loads((out / "1" / "metrics.json").read_text())
    assert metrics["train.loss"]["steps"] == [1]  # rank 1 logged nothing
    assert "distributed: 2 processes" in (out / "1" / "cout.txt").read_text()

    full = pd.read_csv(base / TRAIN_CSV, dtype={"image": str})
    expected = {"test": list(pd.read_csv(base / TEST_CSV, dtype={"image": str})["image"]),
                "val": list(full.loc[full["folder"] == 2, "image"])}
    final = json.loads((out / "metrics.json").read_text())
    for split, ids in expected.items():
        frame = pd.read_csv(out / f"{split}_pred" / "predictions.csv", dtype={"image": str})
        assert list(frame["image"]) == ids
        assert frame["image"].is_unique
        assert final[f"{split}.n"] == len(ids)
        assert run["result"][f"{split}.n"] == len(ids)

    # checkpoints written once, by rank 0: one file each, no temp files, both ranks' RNG states
    for kind in ("best", "last"):
        assert [p.name for p in (out / f"{kind}-checkpoint").iterdir()] == [f"{kind}-checkpoint.pth"]
    assert not list(out.rglob("*.tmp"))
    last = load_checkpoint(out / "last-checkpoint" / "last-checkpoint.pth")
    assert last["epoch"] == 1
    assert len(last["rng_by_rank"]) == WORLD
    assert last["config"]["_save_folder"] == str(out)
    return run


@pytest.fixture(scope="module")
def torchrun_teacher(prepared_isic, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "teacher"
    torchrun(SCRIPTS / "isic.py", *QUICK, f"_base_path={prepared_isic}", f"_save_folder={out}")
    return {"out": out, "base": Path(prepared_isic)}


def test_isic_py_under_torchrun_records_one_run_covering_the_test_set(torchrun_teacher):
    run = check_single_completed_run(torchrun_teacher["out"], torchrun_teacher["base"], "isic")
    assert run["result"]["best_epoch"] == 1


def test_isic_d_kd_py_under_torchrun_records_one_run_covering_the_test_set(torchrun_teacher, tmp_path):
    teacher = torchrun_teacher["out"] / "best-checkpoint" / "best-checkpoint.pth"
    out = tmp_path / "dkd"
    torchrun(SCRIPTS / "isic_d_kd.py", *QUICK, f"_base_path={torchrun_teacher['base']}",
             f"_save_folder={out}", f"_teacher_ckpt={teacher}")
    check_single_completed_run(out, torchrun_teacher["base"], "isic_d_kd")
    metrics = json.loads((out / "1" / "metrics.json").read_text())
    for part in ("ce", "kd", "rkd_distance", "rkd_angle", "channel_relation"):
        assert metrics[f"train.{part}"]["steps"] == [1], part


@pytest.mark.slow
def test_isic_ssd_kd_py_under_torchrun_with_global_batch_relations(torchrun_teacher, tmp_path):
    teacher = torchrun_teacher["out"] / "best-checkpoint" / "best-checkpoint.pth"
    out = tmp_path / "ssd"
    torchrun(SCRIPTS / "isic_ssd_kd.py", *QUICK, f"_base_path={torchrun_teacher['base']}",
             f"_save_folder={out}", f"_teacher_ckpt={teacher}", "_epochs_tune=1",
             "_gather_embeddings=True")
    check_single_completed_run(out, torchrun_teacher["base"], "isic_ssd_kd")
    head = load_checkpoint(out / "teacher-head" / "teacher-head.pth")
    assert head["kind"] == "ssd-kd-teacher-head"
    assert not (out / "teacher-head" / "teacher-head-phase1").exists()


@pytest.mark.slow
def test_torchrun_resume_continues_from_rank_0_checkpoint(torchrun_teacher, tmp_path):
    out = tmp_path / "resumed"
    args = [f"_base_path={torchrun_teacher['base']}", f"_save_folder={out}", "_model_name=mobilenet"]
    torchrun(SCRIPTS / "isic.py", *QUICK, *args)
    torchrun(SCRIPTS / "isic.py", "with", "quick", "_device=cpu", "_img_size=32", "_epochs=2",
             "_resume=True", *args)
    last = load_checkpoint(out / "last-checkpoint" / "last-checkpoint.pth")
    assert [row["epoch"] for row in last["history"]] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert json.loads((out / "2" / "run.json").read_text())["status"] == "COMPLETED"


# ----------------------------------------------------------------------------- relative paths


def test_relative_paths_on_the_command_line_resolve_against_the_repo_root(prepared_isic, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    target = tmp_path / "relative_out"
    rel_out = os.path.relpath(target, REPO_ROOT)  # "../../tmp/..."; means another place from cwd
    rel_base = os.path.relpath(prepared_isic, REPO_ROOT)
    assert (cwd / rel_out).resolve() != target.resolve()
    named = tmp_path / "paths.json"  # a named config file: the other way values bypass the hooks
    named.write_text(json.dumps({"_base_path": rel_base}))
    cmd = [sys.executable, str(SCRIPTS / "isic.py"), *QUICK, str(named), "_batch_size=48",
           "_model_name=mobilenet", f"_save_folder={rel_out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (target / "COMPLETED").is_file()
    assert (target / "best-checkpoint" / "best-checkpoint.pth").is_file()
    assert list(cwd.iterdir()) == []  # nothing relative to the working directory
    config = json.loads((target / "1" / "config.json").read_text())
    assert config["_save_folder"] == str(REPO_ROOT / rel_out)
    assert config["_base_path"] == str(REPO_ROOT / rel_base)
    assert load_checkpoint(target / "last-checkpoint" / "last-checkpoint.pth")["config"][
        "_save_folder"] == str(REPO_ROOT / rel_out)


def test_relative_teacher_path_is_resolved_in_the_recorded_config():
    spec = importlib.util.spec_from_file_location("script_isic_d_kd_paths", SCRIPTS / "isic_d_kd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = module.ex.run("print_config", config_updates={
        "_teacher_ckpt": "results/t/best.pth", "_save_folder": "results/rel_out",
        "_pretrained": False})
    assert run.config["_teacher_ckpt"] == str(REPO_ROOT / "results" / "t" / "best.pth")
    assert run.config["_save_folder"] == str(REPO_ROOT / "results" / "rel_out")
    assert not (REPO_ROOT / "results" / "rel_out").exists()

