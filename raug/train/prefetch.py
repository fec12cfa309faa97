"""Batches moved to the device one step ahead, the copy on a side CUDA stream.

Without it the host-to-device copy of a batch (and its normalisation, see
:func:`raug.train.engine.to_device`) runs on the compute stream, queued behind the
previous step's kernels and in front of the next step's: the GPU computes, then copies,
then computes. :class:`DevicePrefetcher` issues the copy of batch ``i + 1`` on a second
stream before step ``i`` is queued, so copy and compute overlap. The loaders pin their
batches on CUDA (:func:`raug.data.loaders.make_loader`), which makes the copies
asynchronous (``non_blocking``).

The two stream rules that keep this correct:

* the compute stream **waits** for the side stream (``wait_stream``) before it gets a
  batch, so no kernel reads a tensor whose copy is still running;
* every tensor of the batch is **recorded** on the compute stream (``record_stream``):
  it was allocated on the side stream, and without the record the caching allocator
  would hand its memory to the next copy as soon as Python drops the tensor, while
  the compute stream may still be reading it.

On any other device (the CPU) the prefetcher only moves each batch as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Streams:
    """The side stream the copies run on, the compute stream that uses the batches,
    and how to make the side stream current (``torch.cuda.stream``)."""

    side: Any
    compute: Any
    use: Callable[[Any], AbstractContextManager]


def cuda_streams(device: torch.device) -> Streams | None:
    """A new side stream and the current stream of a CUDA ``device``; ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    return Streams(side=torch.cuda.Stream(device), compute=torch.cuda.current_stream(device),
                   use=torch.cuda.stream)


class DevicePrefetcher:
    """Iterate ``batches`` already moved by ``move`` (e.g. :func:`~raug.train.engine.to_device`).

    On CUDA the next batch is moved on a side stream while the caller works on the
    current one (one batch ahead: two batches are on the device at a time). Elsewhere
    each batch is moved when it is asked for. ``len()`` is the source's, so progress
    bars keep their total; ``iter()`` is lazy (nothing is read or copied, and no stream
    made, before the first batch is asked for). ``stream_factory`` (default
    :func:`cuda_streams`) gives the :class:`Streams` of a pass, or ``None`` for the plain
    path; tests pass fake streams.
    Breaking out of the loop early is safe: the batch copied ahead is dropped.
    """

    def __init__(
        self,
        batches: Iterable[Mapping[str, Any]],
        device: torch.device,
        move: Callable[[Mapping[str, Any]], dict],
        stream_factory: Callable[[torch.device], Streams | None] | None = None,
    ):
        self.batches = batches
        self.device = device
        self.move = move
        self.stream_factory = stream_factory or cuda_streams

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        # A generator: nothing starts before the first batch is asked for. tqdm.auto calls
        # iter() once more when the bar is built, and an eager iter(loader) there would
        # start a second set of loader workers for a non-persistent evaluation loader.
        streams = self.stream_factory(self.device)
        if streams is None:
            for batch in self.batches:
                yield self.move(batch)
            return
        yield from self._ahead(streams)

    def _ahead(self, streams: Streams) -> Iterator[dict]:
        source = iter(self.batches)
        ready = self._copy(source, streams)
        while ready is not None:
            streams.compute.wait_stream(streams.side)
            for value in ready.values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(streams.compute)
            batch, ready = ready, self._copy(source, streams)  # the next copy starts now
            yield batch

    def _copy(self, source: Iterator, streams: Streams) -> dict | None:
        """Move the next batch on the side stream (``None`` when the source is exhausted)."""
        batch = next(source, None)
        if batch is None:
            return None
        with streams.use(streams.side):
            return self.move(batch)


__all__ = ["DevicePrefetcher", "Streams", "cuda_streams"]
