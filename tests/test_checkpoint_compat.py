"""Checkpoints written before the redesign (commit 4b0cdc9) still load and resume.

``tests/data/main_4b0cdc9_{last,best}.pth`` were written by the engine of commit 4b0cdc9
(``tests/data/make_main_4b0cdc9_checkpoints.py``, run in a checkout of that commit): a
task with two trained modules (``model``, ``adapter``) and a frozen teacher, 2 epochs.
The task is now an ``nn.Module`` with ``trained``/``frozen`` module tables; the files'
keys (``model_state_dict``, ``extra_state_dicts``, optimizer, scheduler, RNG, history)
must mean what they meant.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raug.data.loaders import make_loader
from raug.files.checkpoint import load_checkpoint
from raug.testing import BlobDataset, TinyNet
from raug.train.engine import FitSettings, fit, load_modules
from raug.train.outputs import RunOutputs
from raug.train.task import Task

DATA = Path(__file__).parent / "data"
LAST, BEST = DATA / "main_4b0cdc9_last.pth", DATA / "main_4b0cdc9_best.pth"


class TwoModuleTask(Task):
    """The generator's task, written against today's API."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__({"model": TinyNet(dropout=0.0), "adapter": nn.Linear(8, 8)},
                         {"teacher": TinyNet(dropout=0.0)}, torch.tensor([1.0, 2.0, 0.5]))

    def _step(self, batch):
        out = self.model.forward_kd(batch["image"])
        hint = self.trained["adapter"](out["avg_pool"])
        with torch.no_grad():
            t = self.frozen["teacher"].forward_kd(batch["image"])["avg_pool"]
        ce = F.cross_entropy(out["logits"], batch["label"], weight=self.class_weight)
        mse = F.mse_loss(hint, t)
        return {"loss": ce + mse, "ce": ce, "mse": mse, "logits": out["logits"]}

    def train_step(self, batch):
        return self._step(batch)

    def eval_step(self, batch):
        return self._step(batch)


def _loaders():
    cpu = torch.device("cpu")
    return (make_loader(BlobDataset(48, seed=1), 8, 0, cpu, 0, train=True),
            make_loader(BlobDataset(24, seed=2), 8, 0, cpu, 0, train=False))


def test_old_best_checkpoint_loads_into_the_module_task():
    saved = load_checkpoint(BEST)  # weights_only=True
    task = TwoModuleTask()
    load_modules(task, saved)
    for name, module in task.trained.items():
        want = saved["model_state_dict"] if name == "model" else saved["extra_state_dicts"][name]
        got = module.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # the frozen teacher is not in the file and keeps its own weights
    assert set(saved["extra_state_dicts"]) == {"adapter"}


def test_old_last_checkpoint_resumes_with_its_optimizer_history_and_rng(tmp_path):
    old = load_checkpoint(LAST)
    assert old["epoch"] == 2
    (tmp_path / "last-checkpoint").mkdir()
    (tmp_path / "last-checkpoint" / "last-checkpoint.pth").write_bytes(LAST.read_bytes())
    train, val = _loaders()
    settings = FitSettings(epochs=3, lr=0.05, sched_patience=10, early_stop=10, device="cpu",
                           resume=True)
    result = fit(TwoModuleTask(), train, val, settings, RunOutputs(tmp_path))
    # epochs 1-2 come from the old file unchanged; epoch 3 is new and trains on
    assert result.history[:2] == old["history"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[2]["train.loss"] < old["history"][0]["train.loss"]
    new = load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")
    # the momentum buffers were restored (same parameter order) and kept being updated
    old_state, new_state = old["optimizer_state_dict"]["state"], new["optimizer_state_dict"]["state"]
    assert old_state.keys() == new_state.keys()
    assert all(old_state[k]["momentum_buffer"].shape == new_state[k]["momentum_buffer"].shape
               for k in old_state)
    assert set(new["extra_state_dicts"]) == {"adapter"}
