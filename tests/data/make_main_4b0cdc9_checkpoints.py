"""Run with the code of commit 4b0cdc9 (the last before the redesign): write a tiny
two-module task's checkpoints (model + adapter, optimizer, scheduler, RNG, history)."""
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from raug.engine import FitSettings, fit
from raug.outputs import RunOutputs
from raug.task import BaseTask
from torch import nn

from raug.data import make_loader
from raug.testing import BlobDataset, TinyNet


class TwoModuleTask(BaseTask):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__({"model": TinyNet(dropout=0.0), "adapter": nn.Linear(8, 8)},
                         {"teacher": TinyNet(dropout=0.0)})
        self.class_weight = torch.tensor([1.0, 2.0, 0.5])
    def _step(self, batch):
        out = self.modules["model"].forward_kd(batch["image"])
        hint = self.modules["adapter"](out["avg_pool"])
        with torch.no_grad():
            t = self.frozen_modules["teacher"].forward_kd(batch["image"])["avg_pool"]
        ce = F.cross_entropy(out["logits"], batch["label"], weight=self.class_weight)
        mse = F.mse_loss(hint, t)
        return {"loss": ce + mse, "ce": ce, "mse": mse, "logits": out["logits"]}
    def train_step(self, batch): return self._step(batch)
    def eval_step(self, batch): return self._step(batch)

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
cpu = torch.device("cpu")
train = make_loader(BlobDataset(48, seed=1), 8, 0, cpu, 0, train=True)
val = make_loader(BlobDataset(24, seed=2), 8, 0, cpu, 0, train=False)
s = FitSettings(epochs=2, lr=0.05, sched_patience=10, early_stop=10, device="cpu")
r = fit(TwoModuleTask(), train, val, s, RunOutputs(out), checkpoint_info={"model_name": "tinynet"})
print(r.history)
