"""Sacred glue shared by the experiment scripts, and the one runner they call.

A script is three parts (see ``experiment/isic/isic.py``)::

    ex = make_experiment("isic", {"_model_name": "resnet-50"}, save_name="isic_teacher")

    @ex.automain
    def main(_run, _config):
        return run_training(_run, _config, build_task=teacher_task)

:func:`make_experiment` adds the shared keys (:data:`raug.config.SHARED_CONFIG`),
the script's keys, the named config ``quick``, a config hook that resolves
paths and validates the config (before any run folder exists), and the default
observer: a FileStorageObserver whose runs go to ``<_save_folder>/<id>/``,
active only when the command line names no observer (``-F DIR``, ``-m URL``,
``--sql``, ``--tiny_db``, ``--s3``). The experiment is a :class:`RaugExperiment`:
path values given on the command line are resolved against the repository
root too, and under torchrun only rank 0 records a Sacred run.

One run per ``_save_folder`` at a time: the main command holds an exclusive lock on
``<_save_folder>/.lock`` (:mod:`raug.runlock`) from before Sacred creates the run folder
until the run ends; a second run (or ``_resume=True``) into a folder whose run is alive
stops at once with a one-line :class:`raug.config.ConfigError` naming the holder, and so
does a folder that cannot be written. A full disk ends the run with a one-line
:class:`StorageError`; the checkpoints already written stay intact.

:func:`run_training` is everything after the config: data, task, the
:func:`raug.engine.fit` loop, evaluation of the best checkpoint on the
validation fold and the test set, files and Sacred artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sacred import Experiment
from sacred.dependencies import gather_sources_and_dependencies
from sacred.observers import FileStorageObserver, RunObserver
from sacred.serializer import flatten
from sacred.utils import SacredError

from raug import runlock
from raug.atomic import (
    DiskFullError,
    atomic_write_bytes,
    atomic_write_with,
    format_bytes,
    free_bytes,
    is_disk_full,
)
from raug.checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint
from raug.config import (
    COMPLETED_MARKER,
    QUICK_CONFIG,
    REPO_ROOT,
    SHARED_CONFIG,
    Check,
    ConfigError,
    check_save_folder,
    declared_keys,
    default_save_folder,
    folder_in_use_error,
    resolve_repo_path,
    resume_mismatches,
    validate_config,
)
from raug.data import IsicData, build_data
from raug.device import amp_dtype
from raug.distributed import (
    DistEnv,
    get_rank,
    init_distributed,
    set_gather_embeddings,
    teardown,
)
from raug.engine import FitResult, FitSettings, fit, load_modules
from raug.evaluate import SPLIT_FILES, evaluate_split
from raug.isic2019 import DataError, load_prep_info, split_hash
from raug.outputs import RunOutputs
from raug.plots import plot_history
from raug.task import Task

log = logging.getLogger(__name__)

OBSERVER_FLAGS = ("--file_storage", "--mongo_db", "--sql", "--tiny_db", "--s3")
HEADLINE_METRICS = ("loss", "accuracy", "balanced_accuracy", "top2_accuracy", "auc")
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")
_LINE_END = re.compile(r"\r\n|\r|\n")


class ProgressBarFilter:
    """Sacred ``captured_out_filter``: keep log lines, drop tqdm redraws from ``cout.txt``.

    Sacred calls the filter with (previous filtered output + new raw text), and
    FileStorageObserver appends only what lies beyond the length it already
    wrote. So the filter must never change text it returned before: it only
    appends complete lines (ended by ``\\n`` or ``\\r``) that are neither blank
    nor a progress bar, and keeps an unfinished line pending until it ends.
    The terminal still shows the live bars.
    """

    def __init__(self) -> None:
        """Start with nothing emitted."""
        self._emitted = ""
        self._pending = ""

    def __call__(self, text: str) -> str:
        """Filter one snapshot of the captured output."""
        if not text.startswith(self._emitted):  # a new run in the same process
            self._emitted, self._pending = "", ""
        work = self._pending + text[len(self._emitted):]
        pieces = _LINE_END.split(work)
        self._pending = pieces.pop()
        kept = [p for p in pieces if p.strip() and not _PROGRESS_BAR.search(p)]
        self._emitted += "".join(f"{line}\n" for line in kept)
        return self._emitted


# ----------------------------------------------------------------------------- experiment


class StorageError(SacredError, OSError):
    """A run cannot write its files (disk full); Sacred prints the one-line message only.

    Also an ``OSError`` (``errno`` of the cause), so callers that handle file-system
    errors catch it; the full chain stays in the Sacred run's ``fail_trace``.
    """

    def __init__(self, message: str, errno_: int | None = None):
        """One line naming the folder; ``errno_`` of the underlying error."""
        SacredError.__init__(self, message, print_traceback=False)
        self.errno = errno_


class AtomicFileStorageObserver(FileStorageObserver):
    """Sacred's FileStorageObserver with atomic JSON writes and artifact copies.

    Sacred rewrites ``run.json`` (every heartbeat) and ``metrics.json`` in place: a full
    disk or a kill during the write leaves them cut (at 4096 bytes, a buffer's worth),
    and a cut ``metrics.json`` makes every later metrics event fail. Written atomically,
    they hold the previous complete version instead. No fsync (they are rewritten every
    few seconds; a crash of the process, not of the machine, is what this guards).
    """

    def save_json(self, obj, filename):
        """Atomically write ``obj`` as Sacred does (flattened, sorted, indented)."""
        text = json.dumps(flatten(obj), sort_keys=True, indent=2)
        atomic_write_bytes(Path(self.dir) / filename, text.encode("utf-8"), durable=False)

    def save_file(self, filename, target_name=None):
        """Copy an artifact into the run folder atomically (a full disk leaves no half copy)."""
        target_name = target_name or os.path.basename(filename)
        if target_name in ("run.json", "config.json", "cout.txt", "metrics.json"):
            super().save_file(filename, target_name)  # Sacred's refusal of its own files
            return
        source, dest = Path(filename), Path(self.dir) / target_name
        if source.resolve() == dest.resolve():
            return
        atomic_write_with(dest, lambda tmp: shutil.copyfile(source, tmp), durable=False)


class SaveFolderObserver(RunObserver):
    """FileStorageObserver under ``config["_save_folder"]``, unless the CLI chose observers.

    Added to every experiment in code. At the start event it looks at the
    parsed command-line options: if ``-F``/``-m``/... were given it stays
    silent; otherwise it creates an :class:`AtomicFileStorageObserver` under
    ``_save_folder`` and forwards every event to it.

    A record that cannot be written (disk full) never hides the run's own outcome: a
    failed start raises a one-line :class:`StorageError`; a later failed write is one
    warning line (the record catches up at the next event that fits) instead of
    Sacred's traceback per event.
    """

    priority = 20

    def __init__(self) -> None:
        """Start inactive; :meth:`started_event` decides."""
        self.delegate: FileStorageObserver | None = None
        self._warned = False

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        """Create the delegate under ``_save_folder`` when no observer was requested."""
        self.delegate = None
        options = meta_info.get("options", {}) or {}
        if any(options.get(flag) for flag in OBSERVER_FLAGS):
            return None
        folder = resolve_repo_path(config["_save_folder"])
        delegate = AtomicFileStorageObserver(str(folder))
        try:
            run_id = delegate.started_event(
                ex_info, command, host_info, start_time, config, meta_info, _id
            )
        except OSError as exc:
            # Without this the run fails twice: here, then in Sacred's failed event on a
            # delegate that never started (a TypeError on its missing run entry).
            what = f"cannot record the Sacred run in {folder}"
            if is_disk_full(exc, folder):
                what = f"disk full: {what} ({format_bytes(free_bytes(folder) or 0)} free)"
            else:
                what = f"{what}: {exc}"
            raise StorageError(what, exc.errno) from exc
        self.delegate = delegate
        return run_id

    def _forward(self, method: str, *args: Any) -> None:
        if self.delegate is None:
            return
        try:
            getattr(self.delegate, method)(*args)
        except OSError as exc:
            if not self._warned:
                log.warning("the Sacred record in %s is not updated (%s): %s",
                            self.delegate.dir, method, exc)
                self._warned = True

    def queued_event(self, *args, **kwargs):
        """Queueing is not supported by the default observer (use -F with -q)."""
        return None

    def heartbeat_event(self, info, captured_out, beat_time, result):
        """Forward."""
        self._forward("heartbeat_event", info, captured_out, beat_time, result)

    def completed_event(self, stop_time, result):
        """Forward."""
        self._forward("completed_event", stop_time, result)

    def interrupted_event(self, interrupt_time, status):
        """Forward."""
        self._forward("interrupted_event", interrupt_time, status)

    def failed_event(self, fail_time, fail_trace):
        """Forward."""
        self._forward("failed_event", fail_time, fail_trace)

    def resource_event(self, filename):
        """Forward."""
        self._forward("resource_event", filename)

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        """Forward."""
        self._forward("artifact_event", name, filename, metadata, content_type)

    def log_metrics(self, metrics_by_name, info):
        """Forward."""
        self._forward("log_metrics", metrics_by_name, info)


def resolve_path_updates(
    updates: Mapping[str, Any] | None, path_keys: Iterable[str]
) -> dict[str, Any] | None:
    """``updates`` with every relative path value of ``path_keys`` made absolute (repo root).

    Sacred applies command-line values *after* the config hooks' updates, so a
    hook cannot resolve them; they are resolved here, before Sacred sees them.
    """
    if not updates:
        return None if updates is None else dict(updates)
    resolved = dict(updates)
    for key in path_keys:
        value = resolved.get(key)
        if isinstance(value, str) and value:
            resolved[key] = str(resolve_repo_path(value))
    return resolved


def worker_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Command-line options of a torchrun rank > 0: no observer, no run record, warnings only.

    Rank 0 alone records the Sacred run (and creates its folder); the other
    ranks run the same main function unobserved, so they create no
    FileStorageObserver (or MongoDB, SQL, ... connection) and write nothing.
    """
    opts = dict(options or {})
    for flag in OBSERVER_FLAGS:
        opts[flag] = None
    opts["--unobserved"] = True
    opts["--print-config"] = False  # rank 0 prints it
    if not opts.get("--loglevel"):
        opts["--loglevel"] = "WARNING"  # rank 0 prints the log; errors still show
    return opts


class RaugExperiment(Experiment):
    """A Sacred ``Experiment`` that resolves path values and knows about torchrun ranks.

    * Values of ``path_keys`` passed on the command line (``_save_folder=rel/out``)
      or as ``config_updates`` are resolved against the repository root before
      Sacred builds the config, so the run, its observer and ``config.json``
      all use the absolute path (a config hook's resolution would be undone:
      Sacred applies command-line values after the hooks).
      Values from named config files are resolved in the recorded config
      (``run.config``); :func:`run_training` resolves ``_base_path`` and
      ``_save_folder`` again, and the KD code resolves its paths where it uses them.
    * On a torchrun rank > 0 every run is created with :func:`worker_options`.
    * The main command takes the ``_save_folder`` lock (:func:`lock_save_folder`) once the
      config is built and validated (config hooks) and before the run starts (before any
      observer creates ``<_save_folder>/<id>/``), and releases it when the run ends; under
      torchrun rank 0 alone takes it. A refusal leaves nothing behind.
    """

    def __init__(self, name: str, *, path_keys: Iterable[str] = (), **kwargs: Any):
        """Create the experiment; ``kwargs`` go to ``sacred.Experiment``."""
        super().__init__(name, **kwargs)
        self.path_keys = tuple(path_keys)

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), info=None,
                    meta_info=None, options=None):
        # Sacred's internal hook shared by ``run`` and ``run_commandline``.
        config_updates = resolve_path_updates(config_updates, self.path_keys)
        if get_rank() != 0:
            options = worker_options(options)
        run = super()._create_run(command_name, config_updates, named_configs, info,
                                  meta_info, options)
        # Values from a named config file bypass config_updates: fix the recorded config too.
        run.config.update(resolve_path_updates(run.config, self.path_keys))
        folder = run.config.get("_save_folder")
        is_main_command = run.meta_info.get("command") == self.default_command
        if is_main_command and get_rank() == 0 and isinstance(folder, str) and folder:
            run.raug_lock = lock_save_folder(folder)
        return run

    def run(self, command_name=None, config_updates=None, named_configs=(), info=None,
            meta_info=None, options=None):
        """Sacred's ``run``, releasing the ``_save_folder`` lock when the run ends."""
        run = self._create_run(command_name, config_updates, named_configs, info, meta_info,
                               options)
        try:
            run()
        finally:
            lock = getattr(run, "raug_lock", None)
            if lock is not None:
                lock.release()
        return run


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


def make_experiment(
    name: str,
    script_config: Mapping[str, Any],
    quick_overrides: Mapping[str, Any] | None = None,
    *,
    save_name: str | None = None,
    path_keys: Iterable[str] = (),
    extra_checks: Iterable[Check] = (),
) -> Experiment:
    """The Sacred experiment of one script, with the shared keys defined once.

    Args:
        name: experiment name (the ``script`` column of ``python -m raug.runs``).
        script_config: the script's own keys and defaults (may override shared ones).
        quick_overrides: script-specific additions to the ``quick`` named config.
        save_name: default ``_save_folder`` is ``results/<save_name>_fold<_folder>``
            (default: ``name``).
        path_keys: further config keys holding paths to resolve against the repo root.
        extra_checks: script-specific validation, ``config -> iterable of one-line problems``.

    Every command refuses keys the experiment does not declare (``_lr=-1`` names
    ``_lr_init``), before any run folder exists; Sacred itself would let them pass.

    Returns:
        The experiment; the script adds ``@ex.automain``.
    """
    path_keys = ("_base_path", "_save_folder", *path_keys)
    ex = RaugExperiment(name, path_keys=path_keys, save_git_info=False)
    _track_script_sources(ex, sys._getframe(1).f_globals)
    ex.add_config(dict(SHARED_CONFIG))
    ex.add_config(dict(script_config))
    ex.add_named_config("quick", {**QUICK_CONFIG, **dict(quick_overrides or {})})
    ex.captured_out_filter = ProgressBarFilter()
    checks = tuple(extra_checks)
    default_name = save_name or name

    @ex.config_hook
    def resolve_and_validate(config, command_name, logger):
        updates = {}
        if config.get("_save_folder") is None and "_folder" in config:
            updates["_save_folder"] = str(default_save_folder(default_name, config["_folder"]))
        for key in path_keys:
            value = updates.get(key, config.get(key))
            if isinstance(value, str) and value:
                updates[key] = str(resolve_repo_path(value))
        merged = {**config, **updates}
        is_main = command_name == ex.default_command
        # Declared keys are gathered now, not at creation: scripts add config scopes
        # (kd_paths) and named configs after this function returns.
        known = declared_keys(ex.configurations, ex.named_configs)
        validate_config(merged, checks, check_files=is_main, known_keys=known,
                        warn=logger.warning)
        if is_main:
            # Before any observer has created a run folder in it.
            check_save_folder(merged["_save_folder"], merged["_resume"])
        return updates

    ex.observers.append(SaveFolderObserver())
    return ex


def _track_script_sources(ex: Experiment, script_globals: dict) -> None:
    """Record the calling script (not this module) as the experiment's main file.

    Sacred takes the main file from the frame that constructs ``Experiment``,
    which is this module. Re-scan from the script's globals; inside the
    repository the scope is the repository root, so the sources saved with
    each run include the ``raug``/``models``/``kd_losses`` modules it imports.
    """
    main_file = Path(script_globals.get("__file__", "")).resolve()
    base_dir = REPO_ROOT if main_file.is_relative_to(REPO_ROOT) else main_file.parent
    ex.base_dir = str(base_dir)
    ex.doc = script_globals.get("__doc__", "")
    ex.mainfile, ex.sources, ex.dependencies = gather_sources_and_dependencies(
        script_globals, save_git_info=False, base_dir=str(base_dir)
    )


# ----------------------------------------------------------------------------- runner


@dataclass
class RunContext:
    """What a script's ``build_task`` receives."""

    config: dict[str, Any]
    device: torch.device
    data: IsicData
    outputs: RunOutputs
    settings: FitSettings
    run: Any = None


TaskBuilder = Callable[[RunContext], Task]


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
    model = task.modules["model"]
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
            outside :data:`raug.config.RESUMABLE_CHANGES`).
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
    build_task: TaskBuilder,
    *,
    optimizer=None,
    scheduler=None,
    extra_checks: Iterable[Check] = (),
) -> dict[str, float]:
    """Train, evaluate and record one run; returns the flat final metrics (the run's result).

    Args:
        _run: the Sacred run (``None`` outside Sacred).
        config: the run's config (Sacred's ``_config``).
        build_task: ``RunContext -> Task``; may itself call :func:`raug.engine.fit`
            for a preliminary phase (e.g. SSD-KD's head fit) through ``ctx``.
        optimizer: optional optimizer factory passed to :func:`raug.engine.fit`.
        scheduler: optional scheduler factory passed to :func:`raug.engine.fit`.
        extra_checks: the script's validation checks (rerun here for programmatic use).

    Returns:
        ``best_epoch``, ``best.val_<metric>``, ``epochs_run``, ``stopped_early``,
        ``val.*`` and ``test.*`` metrics (see ``docs/engine.md``).
    """
    config = plain_config(config)
    # Relative paths from a named config file or a programmatic caller: the repo root too.
    for key in ("_base_path", "_save_folder"):
        if isinstance(config.get(key), str) and config[key]:
            config[key] = str(resolve_repo_path(config[key]))
    validate_config(config, extra_checks, check_files=True)
    env, device = init_distributed(config["_device"])
    set_gather_embeddings(bool(config.get("_gather_embeddings", False)))
    lock = None
    try:
        # Programmatic callers get the experiment's guarantee too: one writer per folder.
        lock = lock_save_folder(config["_save_folder"]) if env.is_main else None
        return _train_and_finish(_run, config, build_task, env, device, optimizer, scheduler)
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


def _train_and_finish(_run, config, build_task, env: DistEnv, device, optimizer, scheduler):
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
    outputs = RunOutputs(config["_save_folder"], run=_run, is_main=env.is_main)
    ctx = RunContext(config, device, data, outputs, settings, _run)
    log.info(
        "images: %d train / %d val / %d test; class weights %s",
        len(data.train), len(data.val), len(data.test),
        None if data.class_weight is None else [round(w, 3) for w in data.class_weight.tolist()],
    )
    task = build_task(ctx)
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
    history = pd.DataFrame(result.history)
    outputs.write_csv("history.csv", history)
    if outputs.is_main:  # other ranks of a distributed run draw nothing
        outputs.save_figure("history.png", plot_history(result.history))

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
