"""The shared training loop on tiny tensors: learning, checkpoints, stopping, LR, resume, NaN."""

import pytest
import torch
import torch.nn.functional as F

from raug.data.loaders import make_loader
from raug.files.checkpoint import is_project_checkpoint, load_checkpoint
from raug.testing import BlobDataset, TinyNet
from raug.train.engine import FitSettings, NonFiniteLossError, evaluate, fit, load_modules
from raug.train.outputs import RunOutputs
from raug.train.task import ClassificationTask, Task

pytestmark = pytest.mark.numeric

CPU = torch.device("cpu")
INFO = {"class_names": ["a", "b", "c"], "img_size": 8, "config": {"seed": 3}}


def loaders(seed=0, batch_size=8, workers=0):
    train = make_loader(BlobDataset(48, seed=1), batch_size, workers, CPU, seed, train=True)
    val = make_loader(BlobDataset(24, seed=2), batch_size, workers, CPU, seed, train=False)
    return train, val


def settings(**kw):
    base = {"epochs": 4, "lr": 0.05, "sched_patience": 10, "early_stop": 10, "device": "cpu"}
    return FitSettings(**{**base, **kw})


def make_task(init_seed=0):
    torch.manual_seed(init_seed)
    return ClassificationTask(TinyNet(), class_weight=torch.tensor([1.0, 2.0, 0.5]))


def test_training_learns_and_writes_loadable_checkpoints(tmp_path):
    train, val = loaders()
    task = make_task()
    result = fit(task, train, val, settings(epochs=6), RunOutputs(tmp_path), checkpoint_info=INFO)
    losses = [row["val.loss"] for row in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.history[-1]["val.accuracy"] > 0.8
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert {"train.loss", "train.accuracy", "train.balanced_accuracy", "val.auc", "lr"} <= set(
        result.history[0]
    )

    best = load_checkpoint(tmp_path / "best-checkpoint" / "best-checkpoint.pth")
    last = load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")
    assert is_project_checkpoint(best)
    assert is_project_checkpoint(last)
    assert last["epoch"] == 6
    assert best["epoch"] == result.best_epoch
    assert best["model_name"] == "tinynet"
    assert best["num_classes"] == 3
    assert best["class_names"] == ["a", "b", "c"]
    assert best["config"] == {"seed": 3}
    assert best["metrics"]["val.loss"] == min(losses)
    assert "optimizer_state_dict" in last
    assert "rng" in last
    assert "optimizer_state_dict" not in best
    assert len(last["history"]) == 6

    # the best weights reproduce the best epoch's validation loss exactly
    fresh = make_task(init_seed=99)
    fresh.to(CPU)
    load_modules(fresh, best)
    again = evaluate(fresh, val, CPU, channels_last=True)
    # the same weights, batches and channels-last evaluation as fit's validation: the same
    # kernels, so equal on any CPU (observed 0 with the generic and AVX2 kernels)
    assert again.stats["loss"] == pytest.approx(best["metrics"]["val.loss"], rel=1e-6)
    assert again.ids == [f"img_{i:04d}" for i in range(24)]


class ScriptedTask(Task):
    """Validation losses follow a script; training does a harmless step."""

    def __init__(self, val_losses):
        super().__init__({"model": TinyNet(dropout=0.0)})
        self.val_losses = list(val_losses)
        self.calls = 0

    def train_step(self, batch):
        logits = self.trained["model"](batch["image"])
        return {"loss": 0.0 * F.cross_entropy(logits, batch["label"]) + 1.0, "logits": logits}

    def eval_step(self, batch):
        loss = self.val_losses[min(self.calls - 1, len(self.val_losses) - 1)]
        return {"loss": torch.tensor(loss)}

    def eval(self):
        self.calls += 1
        return super().eval()


def test_early_stopping_triggers_after_patience(tmp_path):
    train, val = loaders(batch_size=48)
    # best at epoch 2, then 3 epochs without improvement -> stops after epoch 5
    task = ScriptedTask([1.0, 0.5, 0.6, 0.5, 0.7, 0.1, 0.1])
    result = fit(task, train, val, settings(epochs=7, early_stop=3), RunOutputs(tmp_path))
    assert result.best_epoch == 2
    assert result.best_value == 0.5
    assert result.stopped_early
    assert result.last_epoch == 5
    assert load_checkpoint(tmp_path / "best-checkpoint" / "best-checkpoint.pth")["epoch"] == 2


def test_plateau_scheduler_reduces_lr_after_patience(tmp_path):
    train, val = loaders(batch_size=48)
    task = ScriptedTask([1.0] * 6)
    s = settings(epochs=6, lr=0.1, sched_patience=1, sched_factor=0.1, sched_min_lr=1e-3)
    result = fit(task, train, val, s, RunOutputs(tmp_path))
    lrs = [row["lr"] for row in result.history]
    # epoch 1 sets the best; epochs 2-3 are bad; after 2 bad epochs (> patience 1) -> x0.1
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_best_metric_higher_is_better(tmp_path):
    train, val = loaders()
    result = fit(make_task(), train, val, settings(epochs=3, best_metric="balanced_accuracy"),
                 RunOutputs(tmp_path))
    values = [row["val.balanced_accuracy"] for row in result.history]
    assert result.best_value == max(values)
    assert result.best_epoch == values.index(max(values)) + 1


def params_of(task):
    return {k: v.detach().clone() for k, v in task.trained["model"].state_dict().items()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    train, val = loaders(seed=5)
    torch.manual_seed(123)
    straight = make_task()
    full = fit(straight, train, val, settings(epochs=4), RunOutputs(tmp_path / "a"))

    torch.manual_seed(123)
    first = make_task()
    fit(first, *loaders(seed=5), settings(epochs=2), RunOutputs(tmp_path / "b"))
    # a new process: other initial weights, other global RNG state, fresh loaders
    torch.manual_seed(777)
    resumed_task = make_task(init_seed=42)
    resumed = fit(resumed_task, *loaders(seed=5), settings(epochs=4, resume=True),
                  RunOutputs(tmp_path / "b"))

    assert resumed.history == full.history
    a, b = params_of(straight), params_of(resumed_task)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_epoch == full.best_epoch


def test_resume_of_a_finished_run_trains_no_more(tmp_path):
    train, val = loaders()
    first = fit(make_task(), train, val, settings(epochs=2), RunOutputs(tmp_path))
    again = fit(make_task(5), train, val, settings(epochs=2, resume=True), RunOutputs(tmp_path))
    assert again.history == first.history
    assert again.last_epoch == 2


class ExplodingTask(ClassificationTask):
    """Returns a NaN loss with an infinite ``kd`` part at epoch 2, batch 1."""

    def __init__(self):
        super().__init__(TinyNet())
        self.epoch = 0
        self.batch = -1

    def train(self, mode=True):  # nn.Module.eval() calls train(False)
        super().train(mode)
        if mode:
            self.epoch += 1
            self.batch = -1

    def train_step(self, batch):
        self.batch += 1
        out = super().train_step(batch)
        out["ce"] = out["loss"].detach()
        out["kd"] = torch.tensor(0.5)
        if (self.epoch, self.batch) == (2, 1):
            out["kd"] = torch.tensor(float("inf"))
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_loss_names_epoch_batch_and_part(tmp_path):
    train, val = loaders()
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 1.*loss=nan, kd=inf") as err:
        fit(ExplodingTask(), train, val, settings(epochs=3), RunOutputs(tmp_path))
    assert "ce=" not in str(err.value)
    last = load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")
    assert last["epoch"] == 1
    assert last["metrics"]["train.kd"] == pytest.approx(0.5)


def test_named_loss_parts_are_averaged_per_epoch(tmp_path):
    class PartsTask(ClassificationTask):
        def train_step(self, batch):
            out = super().train_step(batch)
            out["twice"] = 2 * out["loss"].detach()
            out["count"] = 3
            return out

    train, val = loaders()
    result = fit(PartsTask(TinyNet()), train, val, settings(epochs=1), RunOutputs(tmp_path))
    row = result.history[0]
    assert row["train.twice"] == pytest.approx(2 * row["train.loss"])
    assert row["train.count"] == 3.0


def test_custom_optimizer_and_epoch_scheduler(tmp_path):
    train, val = loaders()
    result = fit(
        make_task(), train, val, settings(epochs=4), RunOutputs(tmp_path),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 3], gamma=0.1),
    )
    assert [r["lr"] for r in result.history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    # MultiStepLR keeps a Counter: it must survive the weights_only round trip
    again = fit(
        make_task(), train, val, settings(epochs=4, resume=True), RunOutputs(tmp_path),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 3], gamma=0.1),
    )
    assert again.history == result.history


def test_frozen_modules_stay_in_eval_mode_and_out_of_checkpoints(tmp_path):
    teacher = TinyNet()

    class KD(ClassificationTask):
        def __init__(self):
            super().__init__(TinyNet())
            self.frozen["teacher"] = teacher
            teacher.requires_grad_(False)

        def train_step(self, batch):
            assert not teacher.training
            with torch.no_grad():
                t = teacher(batch["image"])
            out = super().train_step(batch)
            out["kd"] = F.mse_loss(out["logits"], t)
            out["loss"] = out["loss"] + out["kd"]
            return out

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train, val = loaders()
    fit(KD(), train, val, settings(epochs=1), RunOutputs(tmp_path))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    last = load_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth")
    assert last["extra_state_dicts"] == {}


def test_unknown_best_metric_is_reported(tmp_path):
    train, val = loaders(batch_size=48)
    with pytest.raises(KeyError, match=r"best_metric=.auc.*available"):
        fit(ScriptedTask([1.0]), train, val, settings(epochs=1, best_metric="auc"),
            RunOutputs(tmp_path))


# ----------------------------------------------------------------------------- mixed precision


def test_amp_setting_per_device(caplog):
    from raug.train.device import amp_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(None, cpu) is None
    assert amp_dtype("off", cuda) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16  # explicit opt-in on CPU (AMX / AVX512-BF16)
    assert amp_dtype("bf16", cuda) is torch.bfloat16
    assert amp_dtype("fp16", cuda) is torch.float16
    with caplog.at_level("WARNING", logger="raug.train.device"):
        assert amp_dtype("fp16", cpu) is None
    assert "_amp='fp16' ignored on cpu" in caplog.text
    with pytest.raises(ValueError, match="_amp='fp8' is unknown"):
        amp_dtype("fp8", cpu)


def test_bf16_training_on_cpu_follows_float32(tmp_path):
    """_amp='bf16' on CPU trains under autocast, learns, and stays near the float32 run."""
    full = fit(make_task(), *loaders(), settings(epochs=3), RunOutputs(tmp_path / "fp32"))
    mixed = fit(make_task(), *loaders(), settings(epochs=3, amp="bf16"), RunOutputs(tmp_path / "bf16"))
    first = [row["train.loss"] for row in mixed.history]
    assert first[-1] < first[0]
    # bf16 rounds the conv/linear inputs and weights to 8 significant bits (u = 2^-8 =
    # 3.9e-3) and accumulates in float32 on any CPU: each step of this 2-layer net moves by
    # O(u) relative, so after 3 epochs the losses differ by a few u (observed 3.3e-3 < u);
    # 5e-2 = 13u
    for a, b in zip(full.history, mixed.history):
        assert b["train.loss"] == pytest.approx(a["train.loss"], rel=0.05)
        assert b["val.loss"] == pytest.approx(a["val.loss"], rel=0.05)
    # the autocast really ran: bf16 rounding makes the losses differ from float32's
    assert mixed.history[-1]["val.loss"] != full.history[-1]["val.loss"]
