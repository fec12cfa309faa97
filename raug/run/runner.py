"""The runner: everything a run does after its config, with no experiment framework.

:func:`run_training` takes a config (a plain dict) and a :class:`Method`, and runs:
the save-folder lock, the process group (torchrun), data, the method's
preliminary :class:`Phase` s in order (SSD-KD's teacher-head fit), its task,
the :func:`raug.train.engine.fit` loop with exact resume, evaluation of the best
checkpoint on the validation fold and the test set, files, plots and the
``COMPLETED`` marker. The Sacred glue (:mod:`raug.run.experiment`) calls it from the
scripts' main functions; tests and notebooks can call it directly.

Records go through ``_run`` when one is given (anything with Sacred's ``log_scalar``,
``add_artifact`` and ``info``), so a run is recorded the same way with or without
Sacred.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raug.data.loaders import build_data
from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raug.errors import ConfigError, StorageError
from raug.files import runlock
from raug.files.atomic import DiskFullError
from raug.files.checkpoint import load_checkpoint
from raug.files.paths import COMPLETED_MARKER, resolve_repo_path
from raug.isic2019 import DataError, load_prep_info, split_hash
from raug.report.evaluate import SPLIT_FILES, evaluate_split
from raug.report.plots import plot_history
from raug.run.config import (
    check_save_folder,
    folder_in_use_error,
    resume_mismatches,
    validate_config,
)
from raug.train.device import amp_dtype
from raug.train.distributed import DistEnv, init_distributed, set_gather_embeddings, teardown
from raug.train.engine import FitResult, FitSettings, fit, load_modules
from raug.train.method import Check, Method, RunContext, TaskBuilder, as_method
from raug.train.outputs import RunOutputs
from raug.train.task import Task

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("loss", "accuracy", "balanced_accuracy", "top2_accuracy", "auc")


def lock_save_folder(save_folder: str | os.PathLike) -> runlock.RunLock | None:
    """Take the run's exclusive lock on ``save_folder``; ``None`` if this process holds it.

    Returns:
        The new lock (the caller releases it), or ``None`` when this process already holds
        it (the experiment took it before :func:`run_training`).

    Raises:
        ConfigError: another live process holds the folder (its pid, host, start and
            command line are named), or the folder or its lock file cannot be created.
    """
    folder = resolve_repo_path(save_folder)
    if runlock.held_lock(folder) is not None:
        return None
    try:
        return runlock.acquire(folder)
    except runlock.FolderInUseError as exc:
        raise folder_in_use_error(folder, exc.holder) from None
    except OSError as exc:
        reason, where = exc.strerror or str(exc), exc.filename or folder
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir's "File exists" / "Not a directory" would mislead
            reason, where = "a file is in the way", blocker
        raise ConfigError(
            f"_save_folder={folder} cannot be written ({reason}: {where}); "
            "choose a writable _save_folder=<folder>"
        ) from None


def write_history(outputs: RunOutputs, history: Sequence[Mapping[str, float]], *,
                  plot: bool = True) -> None:
    """``history.csv`` and (``plot``) ``history.png`` of the epochs so far, each atomically.

    A reader (a user watching a long run, :mod:`raug.report.runs`) never sees a cut file.
    """
    outputs.write_csv("history.csv", pd.DataFrame(list(history)))
    if plot and outputs.is_main:  # other ranks of a distributed run draw nothing
        outputs.save_figure("history.png", plot_history(history))


class HistoryOutputs(RunOutputs):
    """The run's outputs, rewriting the history files with every last checkpoint.

    The engine writes the last checkpoint once per epoch, holding the whole history, so
    ``history.csv`` follows the run epoch by epoch and a long run can be watched while it
    trains. The CSV costs milliseconds; drawing ``history.png`` about 0.2-0.7 s on a
    2-core CPU, so it is redrawn once at least :data:`PLOT_COST_FACTOR` times its last
    drawing time has passed: every epoch of a real run, a few times in a seconds-long
    test run (:func:`finish_run` draws the final one).
    """

    PLOT_COST_FACTOR = 10

    def __init__(self, folder: str | Path, run: Any = None, is_main: bool | None = None, *,
                 last_path: str = FitSettings.last_path):
        """``last_path``: the last checkpoint's path in the folder (the fit's settings)."""
        super().__init__(folder, run=run, is_main=is_main)
        self.last_path = str(last_path)
        self._next_plot = 0.0

    def save_checkpoint(self, relpath: str | Path, payload: dict) -> Path:
        """Write the checkpoint; after the last one, the history it holds."""
        path = super().save_checkpoint(relpath, payload)
        if str(relpath) == self.last_path:
            start = time.monotonic()
            plot = start >= self._next_plot
            write_history(self, payload["history"], plot=plot)
            if plot:
                self._next_plot = start + self.PLOT_COST_FACTOR * (time.monotonic() - start)
        return path


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-plain copy of a (read-only, nested) Sacred config."""
    return json.loads(json.dumps(config))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (Sacred does the same at run start)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code draws from the legacy RNG
    torch.manual_seed(seed)


def checkpoint_info(config: Mapping[str, Any], class_names: list[str], task: Task) -> dict:
    """The self-describing part of every checkpoint of this run."""
    model = task.model
    info = {
        "model_name": getattr(model, "model_name", type(model).__name__),
        "num_classes": int(getattr(model, "num_classes", len(class_names))),
        "class_names": list(class_names),
        "img_size": int(config["_img_size"]),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "config": plain_config(config),
    }
    preparation = data_preparation(config["_base_path"])
    if preparation is not None:
        info["data_preparation"] = preparation
    return info


def data_preparation(base_path: str | Path) -> dict | None:
    """How the training images were prepared (``prep_info.json``), for checkpoints.

    Prediction on new images repeats the preparation's shrink (``size``) before the
    evaluation transform. ``None`` for a folder without ``prep_info.json`` (not made by
    ``run_preprocess.sh``).
    """
    try:
        info = load_prep_info(resolve_repo_path(base_path))
    except DataError:
        return None
    return {"size": info.get("size"), "split_hash": info.get("split_hash")}


def load_resume_state(config: Mapping[str, Any], settings: FitSettings) -> dict | None:
    """The last checkpoint to continue from (``_resume=True``), after checking its config.

    Raises:
        ConfigError: the checkpoint was written with a different config (keys
            outside :data:`raug.run.config.RESUMABLE_CHANGES`).
    """
    path = resolve_repo_path(config["_save_folder"]) / settings.last_path
    if not (config["_resume"] and path.is_file()):
        if config["_resume"]:
            log.info("_resume=True but %s does not exist: starting from scratch", path)
        return None
    state = load_checkpoint(path)
    mismatches = resume_mismatches(state.get("config", {}), config)
    if mismatches:
        raise ConfigError(
            f"cannot resume from {path}: its config differs in\n  " + "\n  ".join(mismatches)
        )
    return state


def run_training(
    _run: Any,
    config: Mapping[str, Any],
    build_task: Method | TaskBuilder,
    *,
    optimizer=None,
    scheduler=None,
    extra_checks: Iterable[Check] = (),
    validated: bool = False,
) -> dict[str, float]:
    """Train, evaluate and record one run; returns the flat final metrics (the run's result).

    Args:
        _run: the Sacred run or another recorder (``None``: files only).
        config: the run's config (e.g. Sacred's ``_config``).
        build_task: the :class:`Method` (phases, then its task), or a bare
            ``RunContext -> Task`` builder (a method without phases).
        optimizer: optional optimizer factory passed to :func:`raug.train.engine.fit`.
        scheduler: optional scheduler factory passed to :func:`raug.train.engine.fit`.
        extra_checks: further config checks, added to the method's.
        validated: the config was already validated (the experiment's config hook ran
            the same checks before creating the run folder); ``False`` runs them here.

    Returns:
        ``best_epoch``, ``best.val_<metric>``, ``epochs_run``, ``stopped_early``,
        ``val.*`` and ``test.*`` metrics (see ``docs/engine.md``).
    """
    method = as_method(build_task, extra_checks)
    config = plain_config(config)
    # Relative paths from a named config file or a programmatic caller: the repo root too.
    for key in ("_base_path", "_save_folder"):
        if isinstance(config.get(key), str) and config[key]:
            config[key] = str(resolve_repo_path(config[key]))
    if not validated:
        validate_config(config, method.checks, check_files=True)
    env, device = init_distributed(config["_device"])
    set_gather_embeddings(bool(config.get("_gather_embeddings", False)))
    lock = None
    try:
        # Programmatic callers get the experiment's guarantee too: one writer per folder.
        lock = lock_save_folder(config["_save_folder"]) if env.is_main else None
        return _train_and_finish(_run, config, method, env, device, optimizer, scheduler)
    except DiskFullError as exc:
        raise StorageError(disk_full_message(exc, config["_save_folder"]), exc.errno) from exc
    except BaseException:
        if env.is_distributed:
            # Sacred records rank 0's failure only; torchrun then stops the other ranks.
            log.exception("rank %d of %d failed; the process group is torn down",
                          env.rank, env.world_size)
        raise
    finally:
        if lock is not None:
            lock.release()
        teardown()


def disk_full_message(exc: DiskFullError, save_folder: str | os.PathLike) -> str:
    """One line: what could not be written, the space left, and what survives."""
    last = Path(save_folder) / FitSettings.last_path
    kept = (f"the last good checkpoint {last} is intact: free some space, then continue "
            "with _resume=True" if last.is_file() else "no checkpoint was written yet")
    return f"{exc}; the run stopped, {kept}"


def _train_and_finish(_run, config, method: Method, env: DistEnv, device, optimizer, scheduler):
    """The body of :func:`run_training` once the process group (if any) exists."""
    # Recorded, not a Sacred key: tables warn when runs mix splits (docs/comparisons.md), and
    # being in every checkpoint's config it makes a resume on different data refuse.
    config["_split_hash"] = split_hash(config["_base_path"])
    if _run is not None:
        _run.info["split_hash"] = config["_split_hash"]
    settings = FitSettings.from_config(config)
    if env.is_distributed:
        settings = replace(settings, device=device)  # cuda:LOCAL_RANK, not the bare "cuda"
    resume_state = load_resume_state(config, settings)
    if resume_state is None:
        check_save_folder(config["_save_folder"], resume=False)
    # Rank 0 keeps the run seed (single-process runs are unchanged); other ranks draw
    # their own dropout masks. Weights start equal anyway (broadcast from rank 0).
    seed_everything(int(config["seed"]) + env.rank)
    log.info("device %s; data %s (validation fold %s)", device, config["_base_path"], config["_folder"])
    if env.is_distributed:
        log.info("distributed: %d processes, _batch_size=%d per process (global batch %d)",
                 env.world_size, config["_batch_size"], env.world_size * config["_batch_size"])

    data = build_data(config, device, rank=env.rank, world_size=env.world_size)
    outputs = HistoryOutputs(config["_save_folder"], run=_run, is_main=env.is_main,
                             last_path=settings.last_path)
    ctx = RunContext(config, device, data, outputs, settings, _run)
    log.info(
        "images: %d train / %d val / %d test; class weights %s",
        len(data.train), len(data.val), len(data.test),
        None if data.class_weight is None else [round(w, 3) for w in data.class_weight.tolist()],
    )
    for number, phase in enumerate(method.phases, start=1):
        log.info("phase %d/%d: %s", number, len(method.phases) + 1, phase.name)
        ctx.phase_results[phase.name] = phase.run(ctx)
    if method.phases:
        log.info("phase %d/%d: %s", len(method.phases) + 1, len(method.phases) + 1, method.name)
    task = method.build_task(ctx)
    result = fit(
        task, data.train_loader, data.val_loader, settings, outputs,
        optimizer=optimizer, scheduler=scheduler,
        checkpoint_info=checkpoint_info(config, data.class_names, task),
        resume_checkpoint=resume_state,
    )
    return finish_run(ctx, task, result)


def finish_run(ctx: RunContext, task: Task, result: FitResult) -> dict[str, float]:
    """Evaluate the best checkpoint on val and test; write metrics, plots, artifacts, marker."""
    outputs, settings = ctx.outputs, ctx.settings
    write_history(outputs, result.history)

    if result.best_checkpoint is None:
        raise RuntimeError(f"no best checkpoint in {outputs.folder}: no epoch improved {settings.best_metric}")
    best = load_checkpoint(result.best_checkpoint)
    load_modules(task, best)
    dtype = amp_dtype(settings.amp, ctx.device)
    metrics: dict[str, float] = {
        "best_epoch": float(result.best_epoch),
        f"best.val_{settings.best_metric}": float(result.best_value),
        "epochs_run": float(result.last_epoch),
        "stopped_early": float(result.stopped_early),
    }
    for split, loader in (("val", ctx.data.val_loader), ("test", ctx.data.test_loader)):
        metrics.update(
            evaluate_split(task, loader, split, ctx.data.class_names, outputs, ctx.device,
                           dtype, settings.channels_last)
        )
    outputs.write_json("metrics.json", metrics)

    # Only test.* is logged: val.* names are the per-epoch curves already.
    for name in HEADLINE_METRICS:
        outputs.log_scalar(f"test.{name}", metrics[f"test.{name}"], result.best_epoch)
    for split in ("val", "test"):
        for filename in SPLIT_FILES:
            outputs.add_artifact(f"{split}_pred/{filename}", f"{split}_{filename}")
    outputs.add_artifact("metrics.json", "final_metrics.json")
    outputs.add_artifact("history.csv", "history.csv")
    outputs.add_artifact("history.png", "history.png")
    outputs.add_artifact(settings.best_path, "best-checkpoint.pth")
    outputs.write_json(
        COMPLETED_MARKER,
        {"completed": datetime.now(UTC).isoformat(timespec="seconds"),
         "run_id": getattr(ctx.run, "_id", None), "best_epoch": result.best_epoch},
    )
    log.info(
        "test: accuracy %.4f, balanced accuracy %.4f, AUC %.4f (best epoch %d)",
        metrics["test.accuracy"], metrics["test.balanced_accuracy"], metrics["test.auc"],
        result.best_epoch,
    )
    return run_result(metrics, settings.best_metric)


def run_result(metrics: Mapping[str, float], best_metric: str) -> dict[str, float]:
    """The Sacred result: the headline subset of ``metrics.json`` (per-class values stay there)."""
    keys = ["best_epoch", f"best.val_{best_metric}", "epochs_run", "stopped_early"]
    keys += [f"{split}.{name}" for split in ("val", "test") for name in ("n", *HEADLINE_METRICS)]
    return {key: metrics[key] for key in keys}


__all__ = [
    "HEADLINE_METRICS",
    "HistoryOutputs",
    "checkpoint_info",
    "data_preparation",
    "disk_full_message",
    "finish_run",
    "load_resume_state",
    "lock_save_folder",
    "plain_config",
    "run_result",
    "run_training",
    "seed_everything",
    "write_history",
]
