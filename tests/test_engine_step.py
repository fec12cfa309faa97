"""The training step on the device (issue #16): host syncs every K steps, the compiled
step, uint8 batches normalised on the device, channels-last in validation and views."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import raug.train.engine as engine
from kd_losses.views import rotate_views
from raug.data.loaders import build_data, make_loader
from raug.data.transforms import apply_transform, eval_transform, train_transform
from raug.methods.teacher import frozen_forward
from raug.testing import BlobDataset, TinyNet, write_prepared_dataset
from raug.train.device import autocast
from raug.train.engine import (
    FitSettings,
    NonFiniteLossError,
    evaluate,
    fit,
    normalize_images,
    to_device,
    train_one_epoch,
)
from raug.train.outputs import RunOutputs
from raug.train.task import ClassificationTask, Task

CPU = torch.device("cpu")


def settings(**kw):
    base = {"epochs": 3, "lr": 0.05, "sched_patience": 10, "early_stop": 10, "device": "cpu"}
    return FitSettings(**{**base, **kw})


def loaders(batch_size=8, n_train=48):
    train = make_loader(BlobDataset(n_train, seed=1), batch_size, 0, CPU, 0, train=True)
    val = make_loader(BlobDataset(24, seed=2), batch_size, 0, CPU, 0, train=False)
    return train, val


class PartsTask(ClassificationTask):
    """Cross-entropy plus named parts: a tensor, a Python int and a Python float."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(TinyNet(), class_weight=torch.tensor([1.0, 2.0, 0.5]))

    def train_step(self, batch):
        out = super().train_step(batch)
        out["twice"] = 2 * out["loss"].detach()
        out["count"] = 3
        out["third"] = 1 / 3
        return out


def _reference_train_one_epoch(task, loader, opt, scaler, device, dtype, epoch, settings, *,
                               parallel=None, watch=None):
    """The per-step implementation before issue #16 (one ``tolist`` per step), single process
    (``watch``, issue #18, only warns: these runs are finite and do not grow)."""
    step = parallel if parallel is not None else task
    task.train()
    if hasattr(loader, "sampler"):
        engine.set_loader_epoch(loader, epoch)
    sums, seen, preds, labels = {}, 0, [], []
    for index, batch in enumerate(loader):
        batch = to_device(batch, device, settings.channels_last)
        with autocast(device, dtype):
            out = step(batch)
        names, vector = engine._scalar_vector(out)
        values = dict(zip(names, vector.tolist()))
        engine._check_finite(values, f"epoch {epoch}, batch {index} (training)")
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        n = engine._batch_len(batch)
        seen += n
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value * n
        if "logits" in out and "label" in batch:
            preds.append(out["logits"].detach().argmax(dim=1).cpu())
            labels.append(batch["label"].detach().cpu())
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    stats = {name: total / seen for name, total in sums.items()}
    stats["accuracy"] = engine.accuracy(y_true, y_pred)
    stats["balanced_accuracy"] = engine.balanced_accuracy(y_true, y_pred)
    return stats


# ----------------------------------------------------------------------------- 1. sync-free step


class _Counter:
    """Counts Tensor.item / tolist / cpu calls (the device-to-host transfers), or ``names``."""

    def __init__(self, monkeypatch, names=("item", "tolist", "cpu")):
        self.calls = []
        for name in names:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _epoch_parts(n_train=48, batch_size=4):
    task = PartsTask()
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train, _ = loaders(batch_size, n_train)
    return task, opt, scaler, train


@pytest.mark.parametrize("k", [1, 4, 16])
def test_host_transfers_per_epoch_are_steps_over_k(monkeypatch, k):
    task, opt, scaler, train = _epoch_parts()
    batches = list(train)  # the sampler's own tolist calls stay out of the count
    steps = len(batches)
    assert steps == 12
    counter = _Counter(monkeypatch)
    stats = train_one_epoch(task, batches, opt, scaler, CPU, None, 1, settings(sync_every=k))
    # one tolist per sync (steps // k in the loop, one at the end) + one cpu for predictions
    assert len(counter.calls) <= steps / k + 2, counter.calls
    assert counter.calls.count("tolist") == steps // k + 1
    assert counter.calls.count("cpu") == 1
    assert set(stats) >= {"loss", "twice", "count", "third", "accuracy", "balanced_accuracy"}


def test_host_transfers_with_a_real_loader(monkeypatch):
    task, opt, scaler, train = _epoch_parts(n_train=96)  # 24 steps
    counter = _Counter(monkeypatch)
    train_one_epoch(task, train, opt, scaler, CPU, None, 1, settings(sync_every=4))
    # + per epoch, not per step: the sampler's two tolist (order, seeds) and the
    # DataLoader iterator's item calls (its base seed)
    assert len(counter.calls) <= 24 / 4 + 6, counter.calls


# every Tensor method that waits for the device to hand a value to the host
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def test_evaluation_host_transfers_do_not_grow_with_batches(monkeypatch):
    task = PartsTask()
    calls = {}
    for n_batches in (2, 6):
        source = list(make_loader(BlobDataset(4 * n_batches, seed=2), 4, 0, CPU, 0, train=False))
        with monkeypatch.context() as patch:
            counter = _Counter(patch, HOST_READS)
            result = evaluate(task, source, CPU)
        calls[n_batches] = counter.calls
        # the values are the per-batch ones, gathered once
        images = torch.cat([b["image"] for b in source])
        labels = torch.cat([b["label"] for b in source])
        with torch.no_grad():
            logits = task.eval().model(images)
        torch.testing.assert_close(result.logits, logits)
        assert torch.equal(result.labels, labels)
        per_batch = [F.cross_entropy(z, y, weight=task.class_weight).item()
                     for z, y in zip(logits.split(4), labels.split(4))]
        assert result.stats["loss"] == pytest.approx(np.mean(per_batch), rel=1e-6)  # equal batches
    # the sums (one tolist), the logits and the labels (one cpu each), per split
    assert calls[2] == calls[6] == ["tolist", "cpu", "cpu"]


def test_progress_bar_updates_at_syncs_only(monkeypatch):
    postfixes = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

    monkeypatch.setattr(engine, "tqdm", Bar)
    task, opt, scaler, train = _epoch_parts()
    train_one_epoch(task, list(train), opt, scaler, CPU, None, 1, settings(sync_every=5))
    assert len(postfixes) == 12 // 5


@pytest.mark.parametrize("k", [1, 3, 16])
def test_epoch_means_equal_the_per_step_implementation(tmp_path, monkeypatch, k):
    """float64 sums on the device equal the Python floats of the per-step loop, exactly."""
    new = fit(PartsTask(), *loaders(), settings(sync_every=k), RunOutputs(tmp_path / "new"))
    monkeypatch.setattr(engine, "train_one_epoch", _reference_train_one_epoch)
    old = fit(PartsTask(), *loaders(), settings(), RunOutputs(tmp_path / "old"))
    assert new.history == old.history  # every train.* and val.* value, bit for bit
    assert len(new.history) == 3
    assert new.history[0]["train.count"] == 3.0


class ExplodingTask(ClassificationTask):
    def __init__(self, at):
        torch.manual_seed(0)
        super().__init__(TinyNet())
        self.at, self.epoch, self.batch = at, 0, -1

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.epoch += 1
            self.batch = -1
        return self

    def train_step(self, batch):
        self.batch += 1
        out = super().train_step(batch)
        out["kd"] = torch.tensor(0.5)
        if (self.epoch, self.batch) in self.at:
            out["kd"] = torch.tensor(float("inf"))
            out["loss"] = out["loss"] * float("nan")
        return out


@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_non_finite_loss_names_the_first_bad_batch_of_the_sync(tmp_path, k):
    train, val = loaders(batch_size=4)  # 12 batches per epoch
    task = ExplodingTask(at={(2, 5), (2, 6)})
    with pytest.raises(NonFiniteLossError,
                       match=r"^non-finite loss at epoch 2, batch 5 .*: loss=nan, kd=inf") as err:
        fit(task, train, val, settings(sync_every=k), RunOutputs(tmp_path))
    first = 5 // k * k
    assert "batch 6" not in str(err.value)  # the first bad batch, not a later one
    # found at the first sync after batch 5, not later
    assert task.batch == min(first + k - 1, 11)


def test_sync_every_from_config():
    config = {"_epochs": 2, "_lr_init": 0.1, "_sched_factor": 0.1, "_sched_patience": 1,
              "_sched_min_lr": 0.0, "_early_stop": 2, "_best_metric": "loss", "_device": "cpu",
              "_amp": None, "_channels_last": True, "_compile": False, "_resume": False}
    assert FitSettings.from_config(config).sync_every == 16
    assert FitSettings.from_config({**config, "_sync_every": 1}).sync_every == 1
    from raug.run.config import RESUMABLE_CHANGES, SHARED_CONFIG, shared_checks
    assert SHARED_CONFIG["_sync_every"] == 16
    assert "_sync_every" in RESUMABLE_CHANGES  # runs from before the key still resume
    bad = shared_checks({**SHARED_CONFIG, "_sync_every": 0})
    assert any(p.startswith("_sync_every=0 is invalid") for p in bad)
    assert not any("_sync_every" in p for p in shared_checks(SHARED_CONFIG))


# ----------------------------------------------------------------------------- 2. compiled step


class KDTask(Task):
    """A distillation-shaped step: the student's and the frozen teacher's forward_kd."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__({"model": TinyNet(dropout=0.0)}, {"teacher": TinyNet(dropout=0.0)})

    def train_step(self, batch):
        out_s = self.model.forward_kd(batch["image"])
        out_t = frozen_forward(self.frozen["teacher"], batch["image"])
        ce = F.cross_entropy(out_s["logits"], batch["label"])
        kd = F.mse_loss(out_s["avg_pool"], out_t["avg_pool"])
        return {"loss": ce + kd, "ce": ce, "kd": kd, "logits": out_s["logits"]}

    def eval_step(self, batch):
        return self.weighted_ce_step(batch)


def test_compile_covers_the_training_steps_forward_kd():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    task = KDTask()
    engine._maybe_compile(task, True, CPU, backend=counter)
    assert counter.frame_count == 0
    batch = next(iter(loaders()[0]))
    task.train()
    out = task.train_step(batch)  # the step's forward_kd calls go through compiled frames
    assert counter.frame_count >= 2  # the student's (grad mode) and the teacher's (inference)
    assert counter.op_count > 0
    frames = counter.frame_count
    out["loss"].backward()
    task.train_step(batch)  # same shapes: no recompilation
    assert counter.frame_count == frames
    # the state dicts keep their keys
    assert set(task.model.state_dict()) == set(TinyNet().state_dict())
    torch._dynamo.reset()


def test_compiled_fit_on_cpu_with_an_injected_backend(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = fit(KDTask(), *loaders(), settings(epochs=1, compile=True, compile_backend=counter),
                   RunOutputs(tmp_path / "c"))
    assert counter.frame_count >= 2
    eager = fit(KDTask(), *loaders(), settings(epochs=1), RunOutputs(tmp_path / "e"))
    for key in ("train.loss", "train.kd", "val.loss"):
        assert compiled.history[0][key] == pytest.approx(eager.history[0][key], rel=1e-5)
    torch._dynamo.reset()


def test_compile_without_a_backend_is_cuda_only(caplog):
    task = KDTask()
    with caplog.at_level(logging.INFO, logger="raug.train.engine"):
        engine._maybe_compile(task, True, CPU)
    assert "_compile=True ignored on cpu" in caplog.text
    assert "forward_kd" not in vars(task.model)


# ----------------------------------------------------------------------------- 3. uint8 batches


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(50 + 7 * i, 60, 3), dtype=np.uint8) for i in range(4)]


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(images, channels_last):
    for make in (lambda norm: eval_transform(32, normalise=norm),
                 lambda norm: train_transform(32, seed=5, normalise=norm)):
        floats = torch.stack([apply_transform(make(True), im, seed=i) for i, im in enumerate(images)])
        raw = torch.stack([apply_transform(make(False), im, seed=i) for i, im in enumerate(images)])
        assert raw.dtype == torch.uint8
        assert raw.shape == (4, 3, 32, 32)
        expected = to_device({"image": floats}, CPU, channels_last)["image"]
        got = to_device({"image": raw, "label": torch.arange(4)}, CPU, channels_last)["image"]
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert (got - expected).abs().max().item() <= 1e-6
        # NHWC uint8 batches give the same images
        nhwc = normalize_images(raw.permute(0, 2, 3, 1).contiguous(), channels_last=channels_last)
        assert torch.equal(nhwc, got)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared_dataset(tmp_path_factory.mktemp("prep"), n_train=40, n_test=8, size=36)


def _config(base, **kw):
    return {"_base_path": str(base), "_folder": 2, "_img_size": 32, "_batch_size": 8,
            "_num_workers": 0, "_weights": "frequency", "_use_wce": True, "seed": 7, **kw}


def test_run_loaders_ship_uint8_and_evaluate_as_the_float_path(prepared):
    data = build_data(_config(prepared), CPU)
    batch = next(iter(data.val_loader))
    assert batch["image"].dtype == torch.uint8
    assert batch["image"].shape == (8, 3, 32, 32)
    assert next(iter(data.train_loader))["image"].dtype == torch.uint8
    # the float path: the same datasets with the normalising transform
    float_val = make_loader(type(data.val)(
        _val_frame(prepared), prepared / "train" / "imgs", eval_transform(32), "x.csv"),
        8, 0, CPU, 7, train=False)
    torch.manual_seed(0)
    task = ClassificationTask(TinyNet(num_classes=8))
    a = evaluate(task, data.val_loader, CPU)
    b = evaluate(task, float_val, CPU)
    assert a.ids == b.ids
    assert torch.allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert a.stats["loss"] == pytest.approx(b.stats["loss"], rel=1e-5)


def _val_frame(base):
    from raug.data.loaders import load_splits

    return load_splits(base, 2)[1]


# ----------------------------------------------------------------------------- 4. channels-last


class FormatTask(ClassificationTask):
    def __init__(self):
        super().__init__(TinyNet())
        self.eval_formats = []

    def eval_step(self, batch):
        self.eval_formats.append(batch["image"].is_contiguous(memory_format=torch.channels_last))
        return super().eval_step(batch)


@pytest.mark.parametrize("channels_last", [True, False])
def test_validate_honours_the_channels_last_setting(tmp_path, channels_last):
    task = FormatTask()
    fit(task, *loaders(), settings(epochs=1, channels_last=channels_last), RunOutputs(tmp_path))
    assert task.eval_formats
    assert set(task.eval_formats) == {channels_last}


def test_rotate_views_keeps_channels_last():
    x = torch.randn(3, 3, 6, 6)
    plain = rotate_views(x)
    nhwc = rotate_views(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(plain, nhwc)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    for i in range(3):
        for r in range(4):
            assert torch.equal(nhwc[4 * i + r], torch.rot90(x[i], r, dims=(-2, -1)))
