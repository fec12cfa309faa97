"""Data-parallel training under ``torchrun``: process group, ranks and the collectives the engine uses.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device
and tells each its place through environment variables: ``RANK`` (global),
``WORLD_SIZE``, ``LOCAL_RANK`` (on its node) and ``LOCAL_WORLD_SIZE``. Without
them, or with ``WORLD_SIZE=1``, everything here is a no-op and a run is the
plain single-process run, bit for bit.

What the rest of the toolkit relies on (``docs/distributed.md``):

* :func:`init_distributed` / :func:`teardown`: one process group per run
  (NCCL on CUDA, gloo on CPU), each process on ``cuda:LOCAL_RANK``.
* :func:`get_rank`, :func:`get_world_size`, :func:`is_main_process`: rank 0 is
  the only process that writes files or records the Sacred run. Before the
  process group exists the rank comes from ``RANK``, so writes are silenced
  from the very start.
* :func:`wrap_task`: one ``DistributedDataParallel`` around a whole task (an
  ``nn.Module`` whose ``forward`` is its training step).
* :func:`gather_embeddings`, :func:`own_rows`: the hooks the KD tasks call for
  their relational terms (identity / all rows unless ``_gather_embeddings=True``
  in a distributed run).
* :func:`all_gather_rows`: all-gather along rows with the gradient for one's own
  rows; :func:`all_gather_object`, :func:`broadcast_object`,
  :func:`failed_ranks`, :func:`barrier`, :func:`broadcast_states` for
  gathering predictions and agreeing on decisions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raug.train.device import (
    DeviceError,
    arch_problem,
    check_device,
    resolve_device,
    unusable_gpu_problem,
)

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Process-level switch set by the runner from ``_gather_embeddings`` (see gather_embeddings).
_GATHER = {"enabled": False}
# Whether init_distributed created the process group (teardown destroys only that one).
_OWNED = {"group": False}


class DistributedError(RuntimeError):
    """The torchrun environment is malformed or a collective cannot be used as asked."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (all defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and records the Sacred run."""
        return self.rank == 0


def env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (absent = single process).

    Args:
        environ: the environment (default ``os.environ``).

    Raises:
        DistributedError: a variable that is not a non-negative integer, or a rank
            outside ``[0, WORLD_SIZE)``; the message names the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for name in ENV_VARS:
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[name] = int(raw)
        except ValueError as exc:
            raise DistributedError(f"{name}={raw!r} is not an integer (set by torchrun)") from exc
        if values[name] < 0:
            raise DistributedError(f"{name}={raw!r} must be >= 0")
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    local_rank = values.get("LOCAL_RANK", rank if world > 1 else 0)
    local_world = values.get("LOCAL_WORLD_SIZE", world)
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    if rank >= world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if local_rank >= max(local_world, 1):
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


# ----------------------------------------------------------------------------- process group


def is_initialized() -> bool:
    """Whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank: the process group's, or torchrun's ``RANK`` before it exists."""
    if is_initialized():
        return dist.get_rank()
    return env_from_environ().rank


def get_world_size() -> int:
    """Number of processes taking part in collectives (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (also true in every single-process run)."""
    return get_rank() == 0


def distributed_device(spec: str, env: DistEnv, cuda_count: int | None = None) -> torch.device:
    """The device of one torchrun process for the ``_device`` string ``spec``.

    ``auto`` and ``cuda`` give each process ``cuda:LOCAL_RANK`` (``auto`` runs on
    the CPU on a machine without an NVIDIA GPU, and refuses where one is present
    but torch cannot use CUDA); ``cpu`` is the CPU; ``cuda:<i>`` is accepted only
    with one process per node (otherwise every process would share that GPU). A
    GPU this torch build has no kernels for is refused (``raug.train.device.arch_problem``).

    Args:
        spec: the ``_device`` value.
        env: this process's torchrun environment.
        cuda_count: number of visible CUDA devices (default: ask torch).

    Raises:
        DeviceError: an unknown or unavailable device, or too few GPUs for
            ``LOCAL_WORLD_SIZE``; the message names ``_device``.
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and cuda_count == 0:
        problem = unusable_gpu_problem(spec)
        if problem:
            raise DeviceError(problem)
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        if cuda_count == 0:
            raise DeviceError(f"_device={spec!r} but CUDA is not available on this machine; use _device=cpu")
        if env.local_rank >= cuda_count:
            raise DeviceError(
                f"_device={spec!r}: LOCAL_RANK={env.local_rank} needs cuda:{env.local_rank} but only "
                f"{cuda_count} CUDA device(s) exist; start at most {cuda_count} processes per node"
            )
        # cuda_count may be given (tests): check the GPU only where torch sees it.
        if torch.cuda.is_available() and env.local_rank < torch.cuda.device_count():
            problem = arch_problem(env.local_rank)
            if problem:
                raise DeviceError(problem)
        return torch.device("cuda", env.local_rank)
    if env.local_world_size > 1:
        raise DeviceError(
            f"_device={spec!r} would put all {env.local_world_size} processes of this node on one "
            "device; use _device=cuda or _device=auto (each process takes cuda:LOCAL_RANK)"
        )
    problem = check_device(spec)
    if problem:
        raise DeviceError(problem)
    return torch.device(spec)


def init_distributed(device_spec: str, timeout_s: float | None = None) -> tuple[DistEnv, torch.device]:
    """Join the torchrun job (if any) and pick this process's device.

    Outside torchrun (or with ``WORLD_SIZE=1``) nothing is initialised and the
    device is ``_device`` resolved as in a single-process run.

    Args:
        device_spec: the ``_device`` value.
        timeout_s: collective timeout in seconds (default: torch's).

    Returns:
        ``(env, device)``.
    """
    env = env_from_environ()
    if not env.is_distributed:
        return env, resolve_device(device_spec)
    device = distributed_device(device_spec, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        kwargs: dict[str, Any] = {"backend": "nccl" if device.type == "cuda" else "gloo"}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        _OWNED["group"] = True
        log.info("process group: rank %d of %d (local rank %d), backend %s, device %s",
                 env.rank, env.world_size, env.local_rank, kwargs["backend"], device)
    return env, device


def teardown() -> None:
    """Destroy the process group :func:`init_distributed` created, if any (idempotent).

    A process group the caller created itself is left alone.
    """
    set_gather_embeddings(False)
    if _OWNED["group"] and is_initialized():
        dist.destroy_process_group()
    _OWNED["group"] = False


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- agreeing and gathering


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` without a group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def failed_ranks(failed: bool) -> list[int]:
    """Ranks reporting ``failed=True`` (the same list on every rank).

    A rank that hit a problem (e.g. a non-finite loss) must not leave the
    others waiting in a collective: every rank calls this at the same point,
    and all of them stop together when the list is not empty.
    """
    if not is_initialized():
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_collective_device())
    flags[dist.get_rank()] = int(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return [int(r) for r in torch.nonzero(flags).flatten().tolist()]


def broadcast_states(modules: Mapping[str, nn.Module], parameters: bool = False, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (and parameters if asked) into every rank's modules.

    Each rank updates its BatchNorm running statistics on its own shard; before
    evaluation they are made equal to rank 0's, which are the ones its
    checkpoint holds. With ``parameters=True`` the weights too (a module DDP
    does not wrap, e.g. one without trainable parameters, starts equal everywhere).
    """
    if not is_initialized():
        return
    for module in modules.values():
        tensors = [*module.parameters(), *module.buffers()] if parameters else module.buffers()
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradients of all ranks for own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        # all_gather needs equal shapes: pad to the longest shard, cut afterwards.
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        shards = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shards, padded.contiguous())
        return torch.cat([shard[:n] for shard, n in zip(shards, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computed the same loss from the same gathered rows; the
        # gradient of rank r's rows is the sum of all ranks' gradients for them.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_rows(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, with a gradient.

    Shards may hold different numbers of rows. Gradient: the rows of this rank
    receive the sum over ranks of each rank's gradient for them, i.e.
    ``world_size * dL/d(own rows)`` when every rank evaluates the same loss ``L``
    on the gathered tensor. ``DistributedDataParallel`` averages parameter
    gradients over ranks, so the parameters get exactly the gradient of ``L``
    computed in one process on the concatenated batch. Rows of other ranks are
    constants here (their gradient reaches them on their own rank).

    Every rank must call it at the same point (it is a collective). Without a
    process group it returns ``tensor`` unchanged.

    Args:
        tensor: this rank's rows.
        sizes: every rank's row count when the caller knows them (equal shards in
            training, :func:`gather_embeddings`); ``None`` exchanges them first, one
            extra collective and one host sync.
    """
    if not is_initialized():
        return tensor
    if sizes is None:
        count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=_collective_device())
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        sizes = torch.cat(counts).tolist()
    if len(sizes) != dist.get_world_size() or sizes[dist.get_rank()] != tensor.shape[0]:
        raise DistributedError(f"all_gather_rows: sizes {list(sizes)} do not fit rank "
                               f"{dist.get_rank()}'s {tensor.shape[0]} rows")
    return _AllGatherRows.apply(tensor, tuple(sizes))


def set_gather_embeddings(enabled: bool) -> None:
    """Switch :func:`gather_embeddings` on or off for this process (the runner sets ``_gather_embeddings``)."""
    _GATHER["enabled"] = bool(enabled)


def gather_enabled() -> bool:
    """Whether :func:`gather_embeddings` gathers right now.

    Only in a distributed run with ``_gather_embeddings=True`` and only while
    autograd records (training steps): evaluation runs under inference mode on
    unpadded shards of different lengths, where a collective per batch would hang.
    """
    return (
        _GATHER["enabled"]
        and is_initialized()
        and torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
    )


def gather_embeddings(tensor: torch.Tensor) -> torch.Tensor:
    """The hook of the relational KD terms: the global batch's rows, or ``tensor`` unchanged.

    With ``_gather_embeddings=True`` in a torchrun job (see :func:`gather_enabled`)
    returns :func:`all_gather_rows` of ``tensor`` (student rows keep their
    gradient; teacher rows are constants anyway); otherwise ``tensor`` itself,
    so the relational terms see the per-process batch of ``_batch_size``.

    Training shards are equal on every rank (``raug.data.loaders.EpochSampler``
    pads the epoch to a multiple of the world size and every rank batches its
    equal share alike), so the row counts are not exchanged: no host sync.
    """
    if not gather_enabled():
        return tensor
    return all_gather_rows(tensor, (tensor.shape[0],) * dist.get_world_size())


def own_rows(n_local: int) -> slice | None:
    """This rank's rows in a tensor :func:`gather_embeddings` gathered from ``n_local`` rows each.

    The relational KD terms average over these anchors only (``anchors`` of
    :func:`kd_losses.rkd.rkd_angle`): rank r computes the distance and angle rows of
    its own samples against the whole global batch, O(N_local x N_global x D) memory,
    instead of every rank computing all N_global anchors. The mean over ranks of the
    per-rank values is the global loss (equal shards), and since a rank's rows get
    every rank's gradient (:func:`all_gather_rows`) and DDP averages, the parameters
    get exactly the single-process gradient. ``None`` (all rows) when not gathering.
    """
    if not gather_enabled():
        return None
    start = get_rank() * n_local
    return slice(start, start + n_local)


def gather_fields(out: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """A copy of ``out`` with ``out[k]`` replaced by :func:`gather_embeddings` for each k in ``keys``."""
    return {k: gather_embeddings(v) if k in keys else v for k, v in out.items()}


# ----------------------------------------------------------------------------- DDP around a task


def wrap_task(task: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """One ``DistributedDataParallel`` around the whole task (a :class:`raug.train.task.Task`).

    ``wrapper(batch)`` runs ``task.forward(batch)``, i.e. ``task.train_step``, so every
    trained module the step uses (``forward_kd`` included) has its gradients averaged
    over the ranks; frozen modules have no trainable parameters and take no part in
    the reduction. The task itself stays the object the engine checkpoints, evaluates
    and optimises (the wrapper shares its parameters).

    Args:
        task: the task, already on ``device``.
        device: this rank's device.
        find_unused_parameters: passed to DDP (only needed when a step leaves some
            trainable parameter unused).

    ``forward_sync_buffers=False`` (what older torch called ``broadcast_buffers=False``,
    deprecated in the pinned torch): DDP copies rank 0's buffers once, when it wraps
    the task, but not before each forward. Each rank's BatchNorm running statistics
    then follow its own shard during an epoch, and the engine makes them equal to
    rank 0's before every validation with :func:`broadcast_states` (docs/distributed.md,
    "BatchNorm"); this saves one broadcast of every buffer per step.
    """
    return DistributedDataParallel(
        task,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        forward_sync_buffers=False,
    )


def convert_sync_batchnorm(task: nn.Module) -> None:
    """Replace the BatchNorm layers of the task's trained modules by ``SyncBatchNorm`` (in place).

    Parameters and buffers are reused, so an optimizer built before and the
    ``state_dict`` keys (checkpoints) stay the same; frozen modules keep plain BatchNorm
    (they run in eval mode, where the two are the same).
    """
    task.trained = nn.SyncBatchNorm.convert_sync_batchnorm(task.trained)


__all__ = [
    "DistEnv",
    "DistributedError",
    "all_gather_object",
    "all_gather_rows",
    "barrier",
    "broadcast_object",
    "broadcast_states",
    "convert_sync_batchnorm",
    "distributed_device",
    "env_from_environ",
    "failed_ranks",
    "gather_embeddings",
    "gather_enabled",
    "gather_fields",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
    "is_main_process",
    "set_gather_embeddings",
    "teardown",
    "wrap_task",
]
