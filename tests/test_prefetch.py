"""The device prefetcher (issue #16): batches in order and unchanged, the CUDA stream
protocol (copy on the side stream, wait, record) simulated with fake streams on the CPU."""

from contextlib import contextmanager

import pytest
import torch

import raug.train.engine as engine
import raug.train.prefetch as prefetch
from raug.data.loaders import make_loader
from raug.testing import BlobDataset, TinyNet
from raug.train.engine import FitSettings, evaluate, to_device, train_one_epoch
from raug.train.prefetch import DevicePrefetcher, Streams, cuda_streams
from raug.train.task import ClassificationTask

CPU = torch.device("cpu")


def batches(n=3, size=4):
    return list(make_loader(BlobDataset(n * size, seed=1), size, 0, CPU, 0, train=False))


def move(batch):
    return to_device(batch, CPU, channels_last=True)


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class Protocol:
    """Fake side/compute streams, a logged ``move`` and logged ``record_stream`` calls."""

    def __init__(self, monkeypatch):
        self.log = []
        self.side, self.compute = FakeStream("side", self.log), FakeStream("compute", self.log)
        self.batch_of = {}  # id(tensor) -> batch index (from its ids)
        self.factory_calls = []

        def record(tensor, stream):
            self.log.append(("record", stream.name, self.batch_of[id(tensor)]))

        monkeypatch.setattr(torch.Tensor, "record_stream", record, raising=False)

    @contextmanager
    def use(self, stream):
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("exit", stream.name))

    def streams(self, device):
        self.factory_calls.append(device)
        return Streams(self.side, self.compute, self.use)

    def move(self, batch):
        index = int(batch["id"][0].split("_")[-1]) // len(batch["id"])
        self.log.append(("move", index))
        moved = move(batch)
        self.batch_of.update({id(v): index for v in moved.values() if isinstance(v, torch.Tensor)})
        return moved


def expected_log(n):
    """Copy 0; then per batch i: wait, record its 3 tensors, copy i + 1 (if any), hand i over."""
    log = [("enter", "side"), ("move", 0), ("exit", "side")]
    for i in range(n):
        log += [("wait", "compute", "side")] + [("record", "compute", i)] * 3
        if i + 1 < n:
            log += [("enter", "side"), ("move", i + 1), ("exit", "side")]
        log.append(("use", i))
    return log


def test_plain_path_off_cuda_moves_each_batch_in_order_unchanged():
    source = batches(3)
    assert cuda_streams(CPU) is None
    out = list(DevicePrefetcher(source, CPU, move))
    assert len(DevicePrefetcher(source, CPU, move)) == 3
    assert [b["id"] for b in out] == [b["id"] for b in source]
    for got, want in zip(out, source):
        assert torch.equal(got["image"], want["image"])  # float batches pass unchanged
        assert torch.equal(got["label"], want["label"])
        assert got["image"].is_contiguous(memory_format=torch.channels_last)


def test_side_stream_protocol_per_batch(monkeypatch):
    proto = Protocol(monkeypatch)
    source = batches(3)
    out = []
    for batch in DevicePrefetcher(source, CPU, proto.move, proto.streams):
        index = proto.batch_of[id(batch["image"])]
        proto.log.append(("use", index))
        out.append(batch)
    assert proto.log == expected_log(3)
    assert proto.factory_calls == [CPU]  # one pair of streams per pass
    for got, want in zip(out, source):
        assert got["id"] == want["id"]
        assert torch.equal(got["image"], want["image"])
        assert torch.equal(got["meta"], want["meta"])


def test_early_break_copies_one_batch_ahead_and_a_new_pass_starts_over(monkeypatch):
    proto = Protocol(monkeypatch)
    pulled = []

    def source():
        for i, batch in enumerate(batches(4)):
            pulled.append(i)
            yield batch

    class Source:
        def __iter__(self):
            return source()

    prefetcher = DevicePrefetcher(Source(), CPU, proto.move, proto.streams)
    for batch in prefetcher:
        first = batch
        break
    assert pulled == [0, 1]  # the batch being used and the one copied ahead, no more
    assert proto.batch_of[id(first["image"])] == 0
    assert [proto.batch_of[id(b["image"])] for b in prefetcher] == [0, 1, 2, 3]
    assert pulled == [0, 1, 0, 1, 2, 3]


def test_iter_alone_reads_nothing(monkeypatch):
    # tqdm.auto calls iter() on the bar's iterable when it is built, then again to loop
    proto = Protocol(monkeypatch)

    class Source:
        started = 0

        def __iter__(self):
            Source.started += 1
            return iter(batches(2))

    for factory in (proto.streams, cuda_streams):
        iter(DevicePrefetcher(Source(), CPU, proto.move, factory))
    assert (Source.started, proto.factory_calls, proto.log) == (0, [], [])


def test_empty_source_yields_nothing_and_copies_nothing(monkeypatch):
    proto = Protocol(monkeypatch)
    assert list(DevicePrefetcher([], CPU, proto.move, proto.streams)) == []
    assert proto.log == []
    it = iter(DevicePrefetcher(batches(1), CPU, proto.move, proto.streams))
    next(it)
    with pytest.raises(StopIteration):
        next(it)


def _task():
    torch.manual_seed(0)
    return ClassificationTask(TinyNet(), class_weight=torch.tensor([1.0, 2.0, 0.5]))


def _train(source):
    task = _task()
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    settings = FitSettings(epochs=1, device="cpu", sync_every=4)
    stats = train_one_epoch(task, source, opt, scaler, CPU, None, 1, settings)
    return stats, evaluate(task, source, CPU)


def test_engine_goes_through_the_prefetcher_with_identical_results(monkeypatch):
    source = batches(5)
    plain_train, plain_eval = _train(source)
    proto = Protocol(monkeypatch)
    monkeypatch.setattr(prefetch, "cuda_streams", proto.streams)  # the CUDA path, simulated
    real_move = engine.to_device

    def logged_to_device(batch, device, channels_last):
        proto.log.append(("move", None))
        moved = real_move(batch, device, channels_last)
        proto.batch_of.update({id(v): None for v in moved.values() if isinstance(v, torch.Tensor)})
        return moved

    monkeypatch.setattr(engine, "to_device", logged_to_device)
    side_train, side_eval = _train(source)
    assert proto.factory_calls == [CPU, CPU]  # the training pass and the evaluation pass
    # every batch of both passes: copied on the side stream, waited for, recorded
    assert proto.log.count(("enter", "side")) == proto.log.count(("move", None)) == 10
    assert proto.log.count(("wait", "compute", "side")) == 10
    assert side_train == plain_train
    assert side_eval.stats == plain_eval.stats
    assert torch.equal(side_eval.logits, plain_eval.logits)
    assert side_eval.ids == plain_eval.ids
