"""The one training loop every method shares.

:func:`fit` trains a :class:`raug.train.task.Task`: device placement, channels-last,
AMP, optional ``torch.compile``, SGD + ReduceLROnPlateau (or caller-supplied
optimizer/scheduler factories), early stopping on a validation value,
checkpoints every epoch (atomic; best and last), exact resume, per-epoch
metrics to the log and to Sacred, and a clear error on a non-finite loss.

Read it top to bottom: :func:`fit` is the loop, the helpers below it are one
epoch of training and one pass of evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from raug.data.loaders import set_loader_epoch
from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raug.files.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from raug.train.device import amp_dtype, autocast, resolve_device
from raug.train.distributed import (
    all_gather_object,
    barrier,
    broadcast_object,
    broadcast_states,
    convert_sync_batchnorm,
    failed_ranks,
    get_rank,
    get_world_size,
    is_initialized,
    is_main_process,
    wrap_task,
)
from raug.train.early_stopping import EarlyStopping, metric_mode
from raug.train.metrics import accuracy, balanced_accuracy, macro_auc
from raug.train.outputs import RunOutputs
from raug.train.prefetch import DevicePrefetcher
from raug.train.task import Task

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best-checkpoint/best-checkpoint.pth"
LAST_CHECKPOINT = "last-checkpoint/last-checkpoint.pth"
VAL_METRICS = ("loss", "accuracy", "balanced_accuracy", "auc")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

# Divergence warning: a training loss part whose batch value exceeds GROWTH_FACTOR times its
# reference, the median of its first GROWTH_REFERENCE_BATCHES finite batch values of the run
# (``fit`` call: a resumed run starts a new reference), is warned about once per part. 100x
# is two orders of magnitude: far above the batch-to-batch noise of a converging loss (a few
# x), passed within a few steps by a diverging one (a distilled student reached 4.8e6 with no
# warning). A median over 16 batches (the default ``_sync_every``), collected over syncs and
# epochs when they are shorter, is not moved by one odd first batch.
GROWTH_FACTOR = 100.0
GROWTH_REFERENCE_BATCHES = 16


class NonFiniteLossError(RuntimeError):
    """A loss (or one of its parts) became NaN or infinite."""


@dataclass
class FitSettings:
    """Everything :func:`fit` needs besides the task and the data.

    ``best_metric`` is a validation value: ``"loss"`` (lower is better) or
    ``"accuracy"``, ``"balanced_accuracy"``, ``"auc"`` (higher is better).
    ``best_path``/``last_path`` are relative to the run folder; ``log_prefix``
    is prepended to every logged metric name (e.g. ``"phase1."``).
    ``sync_bn`` converts BatchNorm to ``SyncBatchNorm`` in a distributed CUDA run
    (ignored otherwise, with a log line).

    ``compile`` compiles every trained and frozen module (``__call__`` and
    ``forward_kd``) with ``torch.compile`` on CUDA (ignored elsewhere, with a log line).
    ``compile_backend`` is the ``torch.compile`` backend: ``None`` = the default
    (inductor) and CUDA only; a given backend (``"eager"``, a
    ``torch._dynamo.testing.CompileCounter``) compiles on any device (tests).

    ``sync_every`` (``_sync_every``): the training loss parts stay on the device and
    reach the host every ``sync_every`` steps and at the end of the epoch; the
    finiteness check and the progress bar run then (1 = every step).

    ``max_nonfinite_steps`` (``_max_nonfinite_steps``): training steps with a non-finite
    loss part (or, without a GradScaler, non-finite gradients) the run skips (warned once
    per part) before it stops with :class:`NonFiniteLossError`; 0 = stop at the first.
    With a positive value and no GradScaler (fp32, bf16) a :class:`_StepGuard` takes such
    a step back on the device; under fp16 the GradScaler already skips it.

    ``cudnn_benchmark`` (``_cudnn_benchmark``) and ``tf32`` (``_tf32``): CUDA speed
    settings applied at the start of :func:`fit` by :func:`apply_cuda_speed_settings`
    (``torch.backends.cudnn.benchmark`` and ``torch.set_float32_matmul_precision("high")``);
    nothing changes on other devices.
    """

    epochs: int
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    sched_factor: float = 0.1
    sched_patience: int = 10
    sched_min_lr: float = 1e-6
    early_stop: int = 15
    best_metric: str = "loss"
    device: str | torch.device = "cpu"
    amp: str | None = None
    channels_last: bool = True
    compile: bool = False
    compile_backend: Any = None
    sync_every: int = 16
    max_nonfinite_steps: int = 0
    resume: bool = False
    sync_bn: bool = False
    cudnn_benchmark: bool = True
    tf32: bool = True
    best_path: str = BEST_CHECKPOINT
    last_path: str = LAST_CHECKPOINT
    log_prefix: str = ""
    desc: str = "epoch"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> FitSettings:
        """Settings from the shared config keys (``_epochs``, ``_lr_init``, ...)."""
        settings = cls(
            epochs=int(config["_epochs"]),
            lr=float(config["_lr_init"]),
            sched_factor=float(config["_sched_factor"]),
            sched_patience=int(config["_sched_patience"]),
            sched_min_lr=float(config["_sched_min_lr"]),
            early_stop=int(config["_early_stop"]),
            best_metric=str(config["_best_metric"]),
            device=config["_device"],
            amp=config["_amp"],
            channels_last=bool(config["_channels_last"]),
            compile=bool(config["_compile"]),
            sync_every=int(config.get("_sync_every", 16)),
            max_nonfinite_steps=int(config.get("_max_nonfinite_steps", 0)),
            resume=bool(config["_resume"]),
            sync_bn=bool(config.get("_sync_bn", False)),
            cudnn_benchmark=bool(config.get("_cudnn_benchmark", True)),
            tf32=bool(config.get("_tf32", True)),
        )
        return replace(settings, **overrides)


def apply_cuda_speed_settings(device: torch.device, settings: FitSettings) -> None:
    """On CUDA, set the process-wide speed flags of ``settings``; elsewhere do nothing.

    ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution
    algorithms once per input shape and keeps the fastest; the training shapes are fixed).
    ``tf32``: ``torch.set_float32_matmul_precision("high")`` and TF32 cuDNN convolutions
    (float32 matmuls/convolutions on TensorFloat-32 tensor cores, sm_80 and newer; a 10-bit
    mantissa in the products, float32 accumulation). ``tf32=False`` asks for strict float32:
    ``"highest"`` and no TF32 convolutions either (PyTorch allows those by default);
    ``cudnn_benchmark=False`` sets ``cudnn.benchmark=False`` (PyTorch's default).
    These flags are global to the process; on a CPU device nothing is touched, so a CPU run
    is bit-identical whatever the settings.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)
    torch.set_float32_matmul_precision("high" if settings.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = bool(settings.tf32)


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    best_epoch: int
    best_value: float | None
    last_epoch: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


def default_optimizer(settings: FitSettings) -> OptimizerFactory:
    """The seed's SGD: momentum 0.9, weight decay 1e-3, lr ``_lr_init``."""
    return lambda params: SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def default_scheduler(settings: FitSettings) -> SchedulerFactory:
    """ReduceLROnPlateau on the validation loss (``_sched_factor/_patience/_min_lr``)."""
    return lambda opt: ReduceLROnPlateau(
        opt,
        mode="min",
        factor=settings.sched_factor,
        patience=settings.sched_patience,
        min_lr=settings.sched_min_lr,
    )


def fit(
    task: Task,
    train_loader: Iterable,
    val_loader: Iterable,
    settings: FitSettings,
    outputs: RunOutputs,
    *,
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    checkpoint_info: Mapping[str, Any] | None = None,
    resume_checkpoint: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``task`` for ``settings.epochs`` epochs (or until early stopping).

    Args:
        task: the method (see :mod:`raug.train.task`).
        train_loader: training batches (its sampler's ``set_epoch`` is called).
        val_loader: validation batches (monitored for the scheduler and early stopping).
        settings: see :class:`FitSettings`.
        outputs: where checkpoints and metrics go.
        optimizer: factory ``params -> Optimizer`` (default: :func:`default_optimizer`).
        scheduler: factory ``optimizer -> scheduler`` (default: :func:`default_scheduler`).
            A ``ReduceLROnPlateau`` steps on the validation loss, others once per epoch.
        checkpoint_info: metadata stored in every checkpoint (model name, class
            names, image size, normalisation, config).
        resume_checkpoint: an already loaded last checkpoint to continue from;
            by default ``settings.resume`` loads ``settings.last_path`` if it exists.

    Returns:
        The best/last epochs, the per-epoch history and the checkpoint paths.

    Under torchrun (a process group exists) every rank calls ``fit`` with its
    shard of the data: the training steps run through one ``DistributedDataParallel``
    around the task, the validation predictions of all ranks are gathered,
    every decision (LR, best epoch, early stop, non-finite loss) is the same on
    all ranks, and only rank 0 writes (``outputs``). ``fit`` returns after a
    barrier, so files rank 0 wrote are complete when any rank reads them.

    Raises:
        NonFiniteLossError: a NaN/inf loss (on any rank: all ranks raise) in more than
            ``settings.max_nonfinite_steps`` training steps, or in validation; the last
            written checkpoints stay valid.
    """
    distributed = is_initialized()
    device = resolve_device(settings.device)
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # cuda:LOCAL_RANK
    apply_cuda_speed_settings(device, settings)
    dtype = amp_dtype(settings.amp, device)
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    task.to(device=device, memory_format=memory_format)
    if settings.sync_bn:
        if distributed and device.type == "cuda":
            convert_sync_batchnorm(task)
        else:
            log.info("_sync_bn=True ignored: SyncBatchNorm needs a distributed run on CUDA")
    _maybe_compile(task, settings.compile, device, settings.compile_backend)

    opt = (optimizer or default_optimizer(settings))(task.trainable_parameters())
    sched = (scheduler or default_scheduler(settings))(opt)
    # Loss scaling is only needed for float16 (bf16 has float32's range).
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    stopper = EarlyStopping(settings.early_stop, metric_mode(settings.best_metric))
    history: list[dict[str, float]] = []
    start = 1

    state = resume_checkpoint
    if state is None and settings.resume and outputs.path(settings.last_path).is_file():
        state = load_checkpoint(outputs.path(settings.last_path))
    if state is not None:
        _restore(state, task, opt, sched, scaler, stopper)
        history = [dict(row) for row in state["history"]]
        start = int(state["epoch"]) + 1
        log.info("resuming after epoch %d from %s", start - 1, outputs.path(settings.last_path))
        for row in history:  # the new Sacred run gets the whole curve
            _log_row(outputs, row, settings.log_prefix)
        barrier()  # every rank has read the same checkpoint before rank 0 may overwrite it
    watch = _LossWatch(task.part_weights(), settings.max_nonfinite_steps)
    parallel = None
    if distributed:
        # After the restore, so every rank starts from rank 0's weights (DDP broadcasts
        # the task's state when it wraps it; this makes it explicit for the trained modules).
        broadcast_states(task.trained, parameters=True)
        parallel = wrap_task(task, device)

    def payload(epoch: int, lean: bool) -> dict[str, Any]:
        return _checkpoint_payload(
            task, epoch, history, stopper, opt, sched, scaler, checkpoint_info, lean
        )

    for epoch in range(start, settings.epochs + 1):
        if stopper.should_stop:
            break
        tic = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        train_stats = train_one_epoch(task, train_loader, opt, scaler, device, dtype, epoch, settings,
                                      parallel=parallel, watch=watch)
        # Ranks updated their BatchNorm statistics on their own shards: evaluate rank 0's
        # (the checkpointed ones) everywhere.
        broadcast_states(task.trained)
        val_stats = validate(task, val_loader, device, dtype, epoch,
                             channels_last=settings.channels_last)
        # Identical already (computed from the gathered predictions); rank 0's copy makes
        # the LR / best / stop decisions the same on every rank by construction.
        val_stats = broadcast_object(val_stats)
        if settings.best_metric not in val_stats:
            raise KeyError(
                f"best_metric={settings.best_metric!r} is not produced by this task's "
                f"validation (available: {sorted(val_stats)})"
            )
        if isinstance(sched, ReduceLROnPlateau):
            sched.step(val_stats["loss"])
        else:
            sched.step()
        improved = stopper.step(val_stats[settings.best_metric], epoch)

        row = {"epoch": epoch, "lr": lr}
        row.update({f"train.{k}": v for k, v in train_stats.items()})
        row.update({f"val.{k}": v for k, v in val_stats.items()})
        history.append(row)
        _log_row(outputs, row, settings.log_prefix)
        # Best before last: after a crash between the two writes, resuming reruns
        # this epoch from the previous last checkpoint and rewrites the same best.
        if improved:
            outputs.save_checkpoint(settings.best_path, payload(epoch, lean=True))
        outputs.save_checkpoint(settings.last_path, payload(epoch, lean=False))
        log.info(_summary(row, settings, time.perf_counter() - tic, improved, stopper))

    if stopper.should_stop:
        log.info(
            "early stopping: no improvement of val %s for %d epochs (best epoch %d)",
            settings.best_metric, stopper.bad_epochs, stopper.best_epoch,
        )
    last_epoch = int(history[-1]["epoch"]) if history else 0
    barrier()  # rank 0's checkpoint writes are complete before any rank reads them
    return FitResult(
        best_epoch=stopper.best_epoch,
        best_value=stopper.best,
        last_epoch=last_epoch,
        stopped_early=stopper.should_stop,
        history=history,
        best_checkpoint=outputs.path(settings.best_path) if stopper.best_epoch else None,
        last_checkpoint=outputs.path(settings.last_path) if history else None,
    )


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(
    task: Task,
    loader: Iterable,
    opt: Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    dtype: torch.dtype | None,
    epoch: int,
    settings: FitSettings,
    *,
    parallel: nn.Module | None = None,
    watch: _LossWatch | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` with optimizer steps; returns sample-weighted means.

    Keys: ``loss``, every named part of the step output, and ``accuracy`` /
    ``balanced_accuracy`` of the training predictions when the step returns logits.
    With ``parallel`` (distributed runs: the task's DDP wrapper) the step runs through
    it and the means cover every rank's samples (the sampler's padding included).

    No per-step host sync: the loss parts are summed on the device (float64, the
    same sums as Python floats of the float32 values) and their per-batch values kept
    there until the next sync, every ``settings.sync_every`` steps and at the end of
    the epoch. A sync copies them to the host at once, checks them (naming the first
    non-finite batch; under torchrun one all-gather tells every rank) and updates the
    progress bar. The training predictions stay on the device until the epoch ends.
    ``watch`` (``fit`` passes the run's; default: a new one) gets the per-batch values at
    every sync: the growth warning and the non-finite budget (``settings.max_nonfinite_steps``).
    A step it counts as non-finite is left out of the means and the accuracies.
    Batches reach the device through :class:`~raug.train.prefetch.DevicePrefetcher`
    (on CUDA the next one is copied on a side stream during the step).
    """
    step = parallel if parallel is not None else task  # either call runs task.train_step
    task.train()
    if hasattr(loader, "sampler"):
        set_loader_epoch(loader, epoch)
    sync_every = max(1, int(settings.sync_every))
    watch = watch or _LossWatch(task.part_weights(), settings.max_nonfinite_steps)
    guard = None
    if settings.max_nonfinite_steps > 0 and not scaler.is_enabled():  # fp16: the GradScaler's job
        guard = _StepGuard(task, opt)
    meter = _LossMeter()
    preds: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (batch, argmax, labels)
    bar = tqdm(_on_device(loader, device, settings.channels_last),
               desc=f"{settings.desc} {epoch}/{settings.epochs} train", leave=False,
               dynamic_ncols=True, disable=not is_main_process())
    for index, batch in enumerate(bar):
        if guard is not None:
            guard.save()  # before the forward pass: it updates the BatchNorm statistics
        with autocast(device, dtype):
            out = step(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        finite_grads = guard.grads_finite() if guard is not None else None
        scaler.step(opt)
        scaler.update()
        if guard is not None:
            guard.take_back_unless(finite_grads)

        meter.add(index, out, _batch_len(batch), finite_grads)
        if "logits" in out and "label" in batch:
            preds.append((index, out["logits"].detach().argmax(dim=1), batch["label"].detach()))
        if (index + 1) % sync_every == 0:  # the same steps on every rank (equal step counts)
            watch.check(epoch, meter.sync(epoch))
            bar.set_postfix(loss=f"{meter.mean('loss'):.4f}")
    watch.check(epoch, meter.sync(epoch))  # always: a collective under torchrun; the epoch's tail
    if meter.seen == 0:
        raise RuntimeError("the training loader yielded no batch (dataset smaller than a batch?) "
                           "or every batch was non-finite")
    sums, seen = meter.sums, meter.seen
    y_pred = y_true = None
    preds = [p for p in preds if p[0] not in meter.dropped]
    if preds:  # one device-to-host copy for the epoch's predictions and labels
        both = torch.stack([torch.cat([p[1] for p in preds]).long(),
                            torch.cat([p[2] for p in preds]).long()]).cpu().numpy()
        y_pred, y_true = both[0], both[1]
    if is_initialized():
        sums, seen, y_pred, y_true = _gather_train_stats(sums, seen, y_pred, y_true)
    stats = {name: total / seen for name, total in sums.items()}
    if y_pred is not None:
        stats["accuracy"] = accuracy(y_true, y_pred)
        stats["balanced_accuracy"] = balanced_accuracy(y_true, y_pred)
    return stats


@dataclass
class _BatchRow:
    """One training batch's values on the host: ``kept`` is False for a non-finite step."""

    index: int
    values: dict[str, float]
    n: int
    kept: bool


class _LossMeter:
    """Sample-weighted sums of a step's scalar parts, kept on the device between syncs.

    ``add`` queues no host work (:class:`_DeviceSums`) and keeps the batch's values on the
    device. ``sync`` copies the sums and the per-batch values since the last sync to the
    host with one ``tolist`` and returns the per-batch rows. A non-finite step (a
    non-finite part, or ``finite_grads`` False: its update was taken back) is left out of the
    sums on the device (``torch.where``) and out of ``seen`` at the sync; its batch index
    joins ``dropped``.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}  # host copy as of the last sync
        self.seen = 0  # samples covered by ``sums``
        self.dropped: set[int] = set()  # batches left out (non-finite steps)
        self._device_sums = _DeviceSums()
        # (batch, names, values, kept flag, samples)
        self._pending: list[tuple[int, tuple[str, ...], torch.Tensor, torch.Tensor, int]] = []

    def add(self, index: int, out: Mapping[str, Any], n: int,
            finite_grads: torch.Tensor | None = None) -> None:
        """Add a step's parts; ``finite_grads``: :meth:`_StepGuard.grads_finite`'s device flag."""
        names, values = _scalar_vector(out)
        kept = torch.isfinite(values).all()
        if finite_grads is not None:
            kept = kept & finite_grads
        self._device_sums.add_values(names, values, n, kept)
        self._pending.append((index, names, values, kept, n))

    def mean(self, name: str) -> float:
        return self.sums.get(name, math.nan) / max(self.seen, 1)

    def sync(self, epoch: int) -> list[_BatchRow]:
        """Bring sums and per-batch values to the host; raise if a running sum overflowed."""
        groups = list(self._device_sums.groups.items())
        pending, self._pending = self._pending, []
        tensors = [v for _, v in groups]
        for _, _, values, kept, _ in pending:
            tensors += [values.double(), kept.double().reshape(1)]
        flat = torch.cat(tensors).tolist() if tensors else []
        sums = _sums_by_name([names for names, _ in groups], flat)
        pos = sum(len(names) for names, _ in groups)
        rows = []
        for index, names, _, _, n in pending:
            rows.append(_BatchRow(index, dict(zip(names, flat[pos:pos + len(names)])), n,
                                  flat[pos + len(names)] == 1.0))
            pos += len(names) + 1
        self.dropped.update(row.index for row in rows if not row.kept)
        self.sums = sums
        self.seen += sum(row.n for row in rows if row.kept)
        span = f"{pending[0][0]}-{pending[-1][0]}" if pending else "none"
        # finite batches can still overflow a sum
        _check_finite(sums, f"epoch {epoch}, batches {span} (training, the epoch's running sums)")
        return rows


class _DeviceSums:
    """Sample-weighted sums of a step's scalar parts, added on the device (no host sync).

    The parts of a batch are stacked into one float32 vector (:func:`_scalar_vector`) and
    ``sum += value.double() * n`` is added on the device, batch after batch, so the
    float64 sums equal the Python floats a per-step loop adds (the same products, in the
    same order). One vector per set of part names (a step may vary its parts).
    """

    def __init__(self) -> None:
        self.groups: dict[tuple[str, ...], torch.Tensor] = {}

    def add(self, out: Mapping[str, Any], n: int) -> None:
        """Add a step output's parts weighted by ``n``."""
        self.add_values(*_scalar_vector(out), n)

    def add_values(self, names: tuple[str, ...], values: torch.Tensor, n: int,
                   kept: torch.Tensor | None = None) -> None:
        """Add float32 ``values`` weighted by ``n``; where the device flag ``kept`` is False, 0.

        Adding 0.0 leaves a float64 sum unchanged, so the sums of the kept batches are
        the same, bit for bit, as without the flag.
        """
        weighted = values.double() * n
        if kept is not None:
            weighted = torch.where(kept, weighted, 0.0)
        total = self.groups.get(names)
        self.groups[names] = weighted if total is None else total + weighted

    def to_host(self) -> dict[str, float]:
        """The sums by name, with one device-to-host copy."""
        if not self.groups:
            return {}
        return _sums_by_name(list(self.groups), torch.cat(list(self.groups.values())).tolist())


def _sums_by_name(groups: Sequence[tuple[str, ...]], flat: Sequence[float]) -> dict[str, float]:
    """Per-name totals of the group vectors laid end to end in ``flat`` (in ``groups`` order)."""
    sums: dict[str, float] = {}
    pos = 0
    for names in groups:
        for name in names:
            sums[name] = sums.get(name, 0.0) + flat[pos]
            pos += 1
    return sums


@dataclass
class EvalOutput:
    """Everything one evaluation pass produced (on the CPU)."""

    stats: dict[str, float]
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    ids: list[str]


def evaluate(
    task: Task,
    loader: Iterable,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    desc: str = "eval",
) -> EvalOutput:
    """Run ``task.eval_step`` over ``loader`` without gradients.

    Returns sample-weighted means of ``loss`` and the other scalar parts, and
    the concatenated float32 logits, labels and image ids.

    No host sync per batch: the sums (:class:`_DeviceSums`), logits and labels stay on
    the device until the split ends and reach the host then, in three copies whatever
    the number of batches; batches arrive through
    :class:`~raug.train.prefetch.DevicePrefetcher`.

    Distributed runs: when the loader's sampler is a rank's shard (it has
    ``shard_indices``, see :class:`raug.data.loaders.ShardSampler`), every rank evaluates
    its shard and gets back the whole split, in the dataset's order, each sample
    once. A loader without shards is evaluated in full by every rank.
    """
    task.eval()
    sums = _DeviceSums()
    seen = 0
    logits, labels, ids = [], [], []
    with torch.inference_mode():
        for batch in tqdm(_on_device(loader, device, channels_last), desc=desc, leave=False,
                          dynamic_ncols=True, disable=not is_main_process()):
            with autocast(device, dtype):
                out = task.eval_step(batch)
            n = _batch_len(batch)
            seen += n
            sums.add(out, n)
            if "logits" in out:
                logits.append(out["logits"].float())
            if "label" in batch:
                labels.append(batch["label"])
            ids.extend(batch.get("id", []))
    result = EvalOutput(stats=sums.to_host(), logits=_cat_to_host(logits),
                        labels=_cat_to_host(labels), ids=ids)
    shard = getattr(getattr(loader, "sampler", None), "shard_indices", None)
    if is_initialized() and shard is not None:
        result, seen = _gather_eval(result, seen, shard)
    result.stats = {name: total / max(seen, 1) for name, total in result.stats.items()}
    return result


def validate(
    task: Task,
    loader: Iterable,
    device: torch.device,
    dtype: torch.dtype | None,
    epoch: int,
    channels_last: bool = True,
) -> dict[str, float]:
    """Validation loss/parts plus accuracy, balanced accuracy and macro AUC (when logits exist).

    ``channels_last`` is the run's ``settings.channels_last`` (the memory format the
    trained modules were converted to).
    """
    result = evaluate(task, loader, device, dtype, channels_last=channels_last,
                      desc=f"epoch {epoch} val")
    _check_finite(result.stats, f"epoch {epoch} (validation)")
    stats = dict(result.stats)
    if result.logits is not None and result.labels is not None:
        y_true = result.labels.numpy()
        probs = torch.softmax(result.logits, dim=1).numpy()
        stats["accuracy"] = accuracy(y_true, probs.argmax(axis=1))
        stats["balanced_accuracy"] = balanced_accuracy(y_true, probs.argmax(axis=1))
        stats["auc"] = macro_auc(y_true, probs)
    return stats


# ----------------------------------------------------------------------------- helpers


def to_device(
    batch: Mapping[str, Any],
    device: torch.device,
    channels_last: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict:
    """Move the tensors of a batch to ``device`` (images channels-last if asked).

    ``uint8`` image batches (what :func:`raug.data.loaders.build_data`'s loaders yield:
    (N, 3, S, S), or (N, S, S, 3)) are copied as bytes and normalised on ``device``:
    ``(x - 255 mean) / (255 std)`` in float32, exactly the arithmetic of the CPU
    transform (albumentations ``Normalize(max_pixel_value=255)``), then made
    channels-last in the same pass when asked. Float tensors are moved as they are.
    """
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.dtype == torch.uint8 and value.dim() == 4:
                value = normalize_images(value, mean, std, channels_last)
            elif channels_last and value.dim() == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = True,
) -> torch.Tensor:
    """``uint8`` images (N, 3, H, W) or (N, H, W, 3) -> normalised float32 (N, 3, H, W).

    The arithmetic of albumentations' ``Normalize(mean, std, max_pixel_value=255)``
    (``(x - mean * 255) * (1 / (std * 255))`` in float32), on the images' device.
    """
    if images.shape[1] != 3 and images.shape[-1] == 3:  # NHWC: a channels-last view of NCHW
        images = images.permute(0, 3, 1, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(dtype=torch.float32, memory_format=fmt)
    scale = 255.0
    m = torch.tensor([v * scale for v in mean], dtype=torch.float32, device=x.device)
    inv = torch.tensor([1.0 / (v * scale) for v in std], dtype=torch.float32, device=x.device)
    return x.sub_(m.view(1, -1, 1, 1)).mul_(inv.view(1, -1, 1, 1))


def _on_device(loader: Iterable, device: torch.device, channels_last: bool) -> DevicePrefetcher:
    """``loader``'s batches moved by :func:`to_device`, one batch ahead on CUDA."""
    return DevicePrefetcher(loader, device, partial(to_device, device=device,
                                                    channels_last=channels_last))


def _cat_to_host(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The per-batch device tensors of a pass, concatenated and copied to the host at once."""
    return torch.cat(tensors).cpu() if tensors else None


def _batch_len(batch: Mapping[str, Any]) -> int:
    if "label" in batch:
        return int(batch["label"].shape[0])
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])


def _scalar_vector(out: Mapping[str, Any]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The scalar entries of a step output as one float32 vector on the loss's device (no sync)."""
    if "loss" not in out:
        raise KeyError(f"a step must return a scalar 'loss'; got keys {sorted(out)}")
    device = out["loss"].device if isinstance(out["loss"], torch.Tensor) else None
    names, values = [], []
    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 and name != "logits":
            values.append(value.detach().float().reshape(()).to(device))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values.append(torch.tensor(float(value), device=device))
        else:
            continue
        names.append(name)
    return tuple(names), torch.stack(values)


def _check_finite(values: Mapping[str, float], where: str) -> None:
    """Raise :class:`NonFiniteLossError` if any value is NaN/inf on any rank (all ranks raise)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    # A collective in distributed runs: a rank that stopped alone would leave the
    # others waiting forever in the next gradient all-reduce.
    ranks = failed_ranks(bool(bad))
    if ranks:
        raise NonFiniteLossError(_non_finite_message(where, bad, ranks))


def _bad_parts_text(values: Mapping[str, float]) -> str:
    """``loss=nan, kd=inf``: the non-finite parts; ``values`` all finite: the gradients were not."""
    parts = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
    return parts or ("non-finite gradients (every loss part finite)" if values else "")


def _non_finite_message(where: str, bad: Mapping[str, float], ranks: Sequence[int],
                        detail: str = "") -> str:
    """The one-line stop message; ``detail`` follows the parts (weights, the step budget)."""
    parts = _bad_parts_text(bad)
    if get_world_size() > 1:
        parts = f"on rank(s) {list(ranks)}" + (f" (here, rank {get_rank()}: {parts})" if parts else "")
    return (f"non-finite loss at {where}: {parts}{detail}; the last checkpoint written before "
            "this epoch is kept (lower _lr_init or check the data)")


def _weights_text(names: Iterable[str], weights: Mapping[str, float]) -> str:
    """`` (weight in the loss: kd=12.5)`` for the named parts whose weight the task declares."""
    known = [f"{name}={weights[name]:g}" for name in names if name in weights]
    return f" (weight in the loss: {', '.join(known)})" if known else ""


class _LossWatch:
    """The run's watch over its training loss parts, on the host values of every sync.

    * Growth: a part's batch value above ``GROWTH_FACTOR`` times its reference (the median
      of its first ``GROWTH_REFERENCE_BATCHES`` finite values) is warned about once per
      part, with its weight in the loss (``Task.part_weights``). Each rank watches its own
      batches (no collective); a part of weight 0 (a count such as ``n_tf``) is not a loss.
    * Non-finite steps: every rank's non-finite batches are gathered (one collective per
      sync, which every rank reaches at the same step); a step non-finite on any rank
      counts once. The first ``max_nonfinite`` are warned about (once per part) and
      skipped; the next one raises :class:`NonFiniteLossError` naming it, its parts and
      their weights, and ``_max_nonfinite_steps``.
    """

    def __init__(self, weights: Mapping[str, float], max_nonfinite: int) -> None:
        self.weights = dict(weights)
        self.max_nonfinite = int(max_nonfinite)
        self.nonfinite_steps = 0
        self._first: dict[str, list[float]] = {}  # values until the reference is known
        self._reference: dict[str, float] = {}
        self._warned: set[str] = set()  # growth warnings given, by part
        self._warned_nonfinite: set[str] = set()

    def check(self, epoch: int, rows: Sequence[_BatchRow]) -> None:
        """Warn about grown parts, count the non-finite steps and stop past the budget."""
        for row in rows:
            if row.kept:
                self._check_growth(epoch, row)
        self._check_nonfinite(epoch, rows)

    def _check_growth(self, epoch: int, row: _BatchRow) -> None:
        for name, value in row.values.items():
            if self.weights.get(name) == 0:
                continue
            reference = self._reference.get(name)
            if reference is None:
                first = self._first.setdefault(name, [])
                first.append(value)
                if len(first) == GROWTH_REFERENCE_BATCHES:
                    self._reference[name] = float(np.median(first))
            elif (name not in self._warned and reference != 0
                  and abs(value) > GROWTH_FACTOR * abs(reference)):
                self._warned.add(name)
                what = "the total loss" if name == "loss" else "loss part"
                log.warning(
                    "%s %s%s grew %.0fx: %.4g at epoch %d, batch %d (training) against %.4g, the "
                    "median of its first %d batches; training goes on (warned once per part: "
                    "lower _lr_init or check the teacher if it keeps growing)",
                    what, name, _weights_text([name], self.weights), abs(value / reference), value,
                    epoch, row.index, reference, GROWTH_REFERENCE_BATCHES,
                )

    def _check_nonfinite(self, epoch: int, rows: Sequence[_BatchRow]) -> None:
        bad = {row.index: row.values for row in rows if not row.kept}
        per_rank = all_gather_object(sorted(bad))  # a collective in distributed runs
        for index in sorted({i for indices in per_rank for i in indices}):
            self.nonfinite_steps += 1
            ranks = [rank for rank, indices in enumerate(per_rank) if index in indices]
            here = bad.get(index, {})
            names = [k for k, v in here.items() if not math.isfinite(v)]
            where = f"epoch {epoch}, batch {index} (training)"
            if self.nonfinite_steps > self.max_nonfinite:
                raise NonFiniteLossError(_non_finite_message(
                    where, here, ranks,
                    f"{_weights_text(names, self.weights)}; {self.nonfinite_steps} non-finite "
                    f"training step(s) in this run, more than _max_nonfinite_steps="
                    f"{self.max_nonfinite}"))
            self._warn_nonfinite(where, here, names, ranks)

    def _warn_nonfinite(self, where: str, here: Mapping[str, float], names: Sequence[str],
                        ranks: Sequence[int]) -> None:
        """Warn, once per part, about a step skipped within ``_max_nonfinite_steps``."""
        # all parts finite here: the gradients were not (or another rank's parts were)
        keys = names or (["gradients"] if here else [f"rank(s) {list(ranks)}"])
        if self._warned_nonfinite.issuperset(keys):
            return
        self._warned_nonfinite.update(keys)
        log.warning(
            "non-finite training step at %s: %s%s; skipped: left out of the means, a non-finite "
            "update not applied (step %d of the _max_nonfinite_steps=%d the run may skip; "
            "warned once per part)",
            where, _bad_parts_text(here) or f"on rank(s) {list(ranks)}",
            _weights_text(names, self.weights), self.nonfinite_steps, self.max_nonfinite,
        )


class _StepGuard:
    """Takes back, on the device, a step whose gradients are not finite (no host sync).

    Used when ``max_nonfinite_steps > 0`` and no GradScaler runs (fp32, bf16): without it a
    NaN gradient enters the weights and the momentum, every later step is NaN, and skipping
    would only postpone the stop. ``save`` copies, before the forward pass, what a step
    changes: the parameters, their optimizer state tensors and the trained modules' buffers
    (BatchNorm statistics). ``take_back_unless(finite)`` keeps the new values where the
    device flag ``finite`` is True and the copies elsewhere (``torch.where``); state tensors
    the step created (SGD's momentum on its first step) get their starting value, zeros.
    The flag comes from the gradients after DDP's all-reduce, so every rank decides alike.
    State kept on another device than its parameter (Adam's host step count) is not
    taken back. Cost: one copy of the parameters, optimizer state and buffers per step.
    """

    def __init__(self, task: Task, opt: Optimizer) -> None:
        self.opt = opt
        self.params = [p for group in opt.param_groups for p in group["params"]]
        self.buffers = list(task.trained.buffers())
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _state(self) -> list[torch.Tensor]:
        return [t for p in self.params for t in self.opt.state.get(p, {}).values()
                if isinstance(t, torch.Tensor) and t.device == p.device]

    @torch.no_grad()
    def save(self) -> None:
        """Copy the parameters, the optimizer state and the buffers (on their device)."""
        self._saved = [(t, t.clone()) for t in (*self.params, *self.buffers, *self._state())]

    @torch.no_grad()
    def grads_finite(self) -> torch.Tensor:
        """A device flag: every gradient is finite (the max-norm propagates NaN and inf)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, norm_type=math.inf).isfinite()

    @torch.no_grad()
    def take_back_unless(self, finite: torch.Tensor) -> None:
        """Where ``finite`` is False, put back what :meth:`save` copied."""
        saved = {id(t) for t, _ in self._saved}
        for tensor, copy in self._saved:
            tensor.copy_(torch.where(finite, tensor, copy))
        for tensor in self._state():
            if id(tensor) not in saved:
                tensor.copy_(torch.where(finite, tensor, torch.zeros_like(tensor)))


def _gather_train_stats(sums, seen, y_pred, y_true):
    """Sum the per-rank loss sums and sample counts; concatenate the training predictions."""
    parts = all_gather_object({"sums": sums, "seen": seen, "pred": y_pred, "true": y_true})
    total: dict[str, float] = {}
    for part in parts:
        for name, value in part["sums"].items():
            total[name] = total.get(name, 0.0) + value
    count = sum(part["seen"] for part in parts)
    if y_pred is None:
        return total, count, None, None
    pred = np.concatenate([part["pred"] for part in parts])
    true = np.concatenate([part["true"] for part in parts])
    return total, count, pred, true


def _gather_eval(result: EvalOutput, seen: int, shard: Sequence[int]) -> tuple[EvalOutput, int]:
    """Every rank's shard of an evaluation, merged in dataset order (each index once)."""
    parts = all_gather_object({
        "index": list(shard), "sums": result.stats, "seen": seen, "ids": result.ids,
        "logits": result.logits, "labels": result.labels,
    })
    index = [i for part in parts for i in part["index"]]
    if len(set(index)) != len(index) or sorted(index) != list(range(len(index))):
        raise RuntimeError(
            "evaluation shards do not partition the split: the ranks' samplers overlap or miss "
            "samples (use raug.data.loaders.ShardSampler)"
        )
    order = torch.as_tensor(np.argsort(np.asarray(index), kind="stable"))
    sums: dict[str, float] = {}
    for part in parts:
        for name, value in part["sums"].items():
            sums[name] = sums.get(name, 0.0) + value

    def merged(key: str) -> torch.Tensor | None:
        tensors = [part[key] for part in parts]
        return None if any(t is None for t in tensors) else torch.cat(tensors)[order]

    ids = [i for part in parts for i in part["ids"]]
    return EvalOutput(
        stats=sums,
        logits=merged("logits"),
        labels=merged("labels"),
        ids=[ids[k] for k in order.tolist()] if len(ids) == len(index) else ids,
    ), sum(part["seen"] for part in parts)


def _maybe_compile(task: Task, enabled: bool, device: torch.device, backend: Any = None) -> None:
    """Compile what the steps run: every trained/frozen module's ``__call__`` and ``forward_kd``.

    ``nn.Module.compile()`` compiles ``__call__`` only, and the training steps call
    ``forward_kd`` (the features and logits in one pass); that bound method is compiled
    too and stored on the instance (not in the state dict: checkpoints keep their keys).
    Without an explicit ``backend`` this happens on CUDA only.
    """
    if not enabled:
        return
    if device.type != "cuda" and backend is None:
        log.info("_compile=True ignored on %s: torch.compile is used on CUDA only", device)
        return
    options = {} if backend is None else {"backend": backend}
    # nn.Module.compile() compiles in place, so state_dict keys keep their names.
    for module in (*task.trained.values(), *task.frozen.values()):
        module.compile(**options)
        forward_kd = getattr(module, "forward_kd", None)
        if callable(forward_kd) and not hasattr(forward_kd, "_torchdynamo_orig_callable"):
            module.forward_kd = torch.compile(forward_kd, **options)


def _log_row(outputs: RunOutputs, row: Mapping[str, float], prefix: str) -> None:
    step = int(row["epoch"])
    for name, value in row.items():
        if name != "epoch":
            outputs.log_scalar(f"{prefix}{name}", value, step)


def _summary(row, settings: FitSettings, seconds: float, improved: bool, stopper) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value:.4f}"

    parts = [
        f"{settings.log_prefix}{settings.desc} {int(row['epoch'])}/{settings.epochs}",
        f"train loss {fmt('train.loss')} acc {fmt('train.accuracy')} bacc {fmt('train.balanced_accuracy')}",
        f"val loss {fmt('val.loss')} acc {fmt('val.accuracy')} bacc {fmt('val.balanced_accuracy')} auc {fmt('val.auc')}",
        f"lr {row['lr']:.2e}",
        f"{seconds:.1f}s",
    ]
    tail = " *best*" if improved else f" (no improvement {stopper.bad_epochs}/{stopper.patience})"
    return " | ".join(parts) + tail


def _scheduler_state(sched) -> dict[str, Any]:
    """Scheduler state in weights_only-loadable types (MultiStepLR keeps a Counter)."""
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in sched.state_dict().items()}


def _load_scheduler_state(sched, state: Mapping[str, Any]) -> None:
    counters = {k for k, v in vars(sched).items() if isinstance(v, Counter)}
    sched.load_state_dict(dict(state))
    for key in counters:
        setattr(sched, key, Counter(getattr(sched, key)))


def _checkpoint_payload(task, epoch, history, stopper, opt, sched, scaler, info, lean) -> dict:
    """Self-describing checkpoint; ``lean`` (best) leaves out the resume-only state."""
    model = task.model
    payload: dict[str, Any] = {
        "model_name": getattr(model, "model_name", type(model).__name__),
        "num_classes": getattr(model, "num_classes", None),
        # metadata fusion (models.fusion.FusionSpec), so a KD run rebuilds its teacher as trained
        **({"fusion": model.fusion.to_dict()} if hasattr(model, "fusion") else {}),
        **dict(info or {}),
        "epoch": int(epoch),
        "model_state_dict": model.state_dict(),
        "extra_state_dicts": {k: m.state_dict() for k, m in task.trained.items() if k != "model"},
        "metrics": dict(history[-1]),
        "history": [dict(r) for r in history],
        "early_stop": stopper.state_dict(),
        "best_epoch": stopper.best_epoch,
    }
    if not lean:
        payload.update(
            optimizer_state_dict=opt.state_dict(),
            scheduler_state_dict=_scheduler_state(sched),
            scaler_state_dict=scaler.state_dict(),
            rng=capture_rng_state(),
        )
        if is_initialized():
            # Each rank continues from its own RNG state after a resume (dropout masks).
            payload["rng_by_rank"] = all_gather_object(payload["rng"])
    return payload


def _restore(state, task, opt, sched, scaler, stopper) -> None:
    """Load a last checkpoint into the live objects (modules, optimizer, RNG, ...)."""
    missing = [n for n in task.trained if n != "model" and n not in state.get("extra_state_dicts", {})]
    if missing:
        raise KeyError(f"the checkpoint to resume from has no state for module(s) {missing}")
    load_modules(task, state)
    opt.load_state_dict(state["optimizer_state_dict"])
    _load_scheduler_state(sched, state["scheduler_state_dict"])
    if state.get("scaler_state_dict"):
        scaler.load_state_dict(state["scaler_state_dict"])
    stopper.load_state_dict(state["early_stop"])
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == get_world_size():
        restore_rng_state(by_rank[get_rank()])
    else:
        restore_rng_state(state["rng"])


def load_modules(task: Task, checkpoint: Mapping[str, Any]) -> None:
    """Load a checkpoint's ``model_state_dict``/``extra_state_dicts`` into ``task.trained``."""
    task.model.load_state_dict(checkpoint["model_state_dict"])
    extras = checkpoint.get("extra_state_dicts", {})
    for name, module in task.trained.items():
        if name != "model" and name in extras:
            module.load_state_dict(extras[name])


__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "VAL_METRICS",
    "EvalOutput",
    "FitResult",
    "FitSettings",
    "NonFiniteLossError",
    "default_optimizer",
    "default_scheduler",
    "evaluate",
    "fit",
    "load_modules",
    "normalize_images",
    "to_device",
    "train_one_epoch",
    "validate",
]
