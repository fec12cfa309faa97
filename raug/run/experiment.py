"""Sacred glue shared by the experiment scripts: the only module that knows Sacred.

A script is three parts (see ``experiment/isic/isic.py``)::

    TEACHER = Method("teacher", teacher_task, checks=(check_model,))
    ex = make_experiment("isic", {"_model_name": "resnet-50"}, method=TEACHER,
                         save_name="isic_teacher")

    @ex.automain
    def main(_run, _config):
        return ex.train(_run, _config)

:func:`make_experiment` adds the shared keys (:data:`raug.run.config.SHARED_CONFIG`),
the script's keys, the named config ``quick``, a config hook that resolves
paths and validates the config (before any run folder exists), and the default
observer: a FileStorageObserver whose runs go to ``<_save_folder>/<id>/``,
active only when the command line names no observer (``-F DIR``, ``-m URL``,
``--sql``, ``--tiny_db``, ``--s3``). The experiment is a :class:`RaugExperiment`:
path values given on the command line are resolved against the repository
root too, and under torchrun only rank 0 records a Sacred run.

One run per ``_save_folder`` at a time: the main command holds an exclusive lock on
``<_save_folder>/.lock`` (:mod:`raug.files.runlock`) from before Sacred creates the run folder
until the run ends; a second run (or ``_resume=True``) into a folder whose run is alive
stops at once with a one-line :class:`ConfigError` naming the holder, and so
does a folder that cannot be written. A full disk ends the run with a one-line
:class:`StorageError`; the checkpoints already written stay intact. (Both are the
Sacred forms of :mod:`raug.errors`' framework-free errors: Sacred prints their message
without a traceback.)

``ex.train`` calls :func:`raug.run.runner.run_training`, everything after the config:
data, the method's phases and task, the :func:`raug.train.engine.fit` loop, evaluation of
the best checkpoint on the validation fold and the test set, files and Sacred artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sacred import Experiment
from sacred.config import chain_evaluate_config_scopes
from sacred.dependencies import gather_sources_and_dependencies
from sacred.observers import FileStorageObserver, RunObserver
from sacred.observers.mongo import parse_mongo_db_arg
from sacred.serializer import flatten
from sacred.utils import SacredError, ensure_wellformed_argv

import models
from raug import errors
from raug.files import atomic
from raug.files.paths import REPO_ROOT, default_save_folder, resolve_repo_path
from raug.run.config import (
    QUICK_CONFIG,
    SHARED_CONFIG,
    FileCheck,
    check_save_folder,
    quick_results_path,
    validate_config,
)
from raug.run.pretrained import add_imagenet_weights_hook, needs_imagenet_weights
from raug.run.runner import lock_save_folder, run_training
from raug.train.distributed import get_rank
from raug.train.engine import LAST_CHECKPOINT
from raug.train.method import Check, Method

log = logging.getLogger(__name__)

OBSERVER_FLAGS = ("--file_storage", "--mongo_db", "--sql", "--tiny_db", "--s3")
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


class ConfigError(SacredError, errors.ConfigError):
    """:class:`raug.errors.ConfigError` as Sacred prints it: the message, no traceback."""

    def __init__(self, message: str):
        """Create the error; ``message`` holds one line per problem."""
        SacredError.__init__(self, message, print_traceback=False)


class StorageError(SacredError, errors.StorageError):
    """:class:`raug.errors.StorageError` as Sacred prints it: the one-line message only.

    Also an ``OSError`` (``errno`` of the cause), so callers that handle file-system
    errors catch it; the full chain stays in the Sacred run's ``fail_trace``.
    """

    def __init__(self, message: str, errno_: int | None = None):
        """One line naming the folder; ``errno_`` of the underlying error."""
        SacredError.__init__(self, message, print_traceback=False)
        self.errno = errno_

    def __str__(self) -> str:
        """The message alone."""
        return str(self.args[0])


def for_sacred(exc: BaseException) -> BaseException:
    """The Sacred form of a toolkit error (prints one line), or ``exc`` itself."""
    if isinstance(exc, SacredError):
        return exc
    if isinstance(exc, errors.ConfigError):
        return ConfigError(str(exc))
    if isinstance(exc, errors.StorageError):
        return StorageError(str(exc), exc.errno)
    return exc


@contextlib.contextmanager
def sacred_errors():
    """Within the block, toolkit errors leave as their Sacred forms (one line, no traceback)."""
    try:
        yield
    except (errors.ConfigError, errors.StorageError) as exc:
        converted = for_sacred(exc)
        if converted is exc:
            raise
        raise converted from exc


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
        atomic.atomic_write_bytes(Path(self.dir) / filename, text.encode("utf-8"), durable=False)

    def save_file(self, filename, target_name=None):
        """Copy an artifact into the run folder atomically (a full disk leaves no half copy)."""
        target_name = target_name or os.path.basename(filename)
        if target_name in ("run.json", "config.json", "cout.txt", "metrics.json"):
            super().save_file(filename, target_name)  # Sacred's refusal of its own files
            return
        source, dest = Path(filename), Path(self.dir) / target_name
        if source.resolve() == dest.resolve():
            return
        atomic.atomic_write_with(dest, lambda tmp: shutil.copyfile(source, tmp), durable=False)


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
            if atomic.is_disk_full(exc, folder):
                what = f"disk full: {what} ({atomic.format_bytes(atomic.free_bytes(folder) or 0)} free)"
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


MONGO_PING_MS = 2000
DEFAULT_MONGO_URL = "localhost:27017"  # MongoObserver's server when -m names a database only


def check_mongo_observer(options: Mapping[str, Any] | None, timeout_ms: int = MONGO_PING_MS) -> None:
    """Ping the MongoDB server of ``-m`` before the run starts.

    Sacred's MongoObserver meets a missing server only at the run's start event: it waits
    pymongo's 30 s server selection, prints its traceback, then a second ``TypeError`` from
    its failed event. A short ping fails in seconds with one line, before any folder exists.

    Raises:
        ConfigError: the ``-m`` value cannot be parsed, or no server answers (names it and
            what to do).
    """
    spec = (options or {}).get("--mongo_db")
    if not spec:
        return
    import pymongo  # only runs recorded in MongoDB need it

    try:
        url = parse_mongo_db_arg(spec).get("url", DEFAULT_MONGO_URL)
    except (AttributeError, ValueError):  # Sacred's parser fails on a value it cannot match
        raise ConfigError(f"-m {spec} is invalid: expected [host:port:]db_name[.collection]") from None
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        reason = str(exc).split(" (configured timeouts")[0].split(", Timeout")[0]
        raise ConfigError(
            f"-m {spec}: no MongoDB server answers at {url} within {timeout_ms / 1000:g} s "
            f"({reason}); start the server or correct host:port, or run without -m to record "
            "the run in _save_folder"
        ) from None
    finally:
        client.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM as an interrupt: Sacred records INTERRUPTED for it as for Ctrl-C."""

    def __init__(self, signum: int):
        """Remember the signal (the exit status is 128 + its number)."""
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Python's default for SIGTERM (``kill``, a job scheduler, torchrun stopping its ranks)
    ends the process on the spot: Sacred's record stays RUNNING and nothing says how to
    continue. As an interrupt, the run unwinds like a Ctrl-C: INTERRUPTED in ``run.json``,
    one line with the resume command. Only the main thread may set a handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(argv: list[str] | None, save_folder: str) -> str:
    """The command that continues a run: its command line with ``_resume=True`` and its folder.

    Other values stay as given: a resume refuses a config that differs (beyond
    :data:`raug.run.config.RESUMABLE_CHANGES`). Without a command line (``ex.run()``),
    the two keys alone.
    """
    keys = ["_resume=True", f"_save_folder={save_folder}"]
    if not argv:
        return shlex.join(keys)
    kept = [a for a in argv[1:] if not a.startswith(("_resume=", "_save_folder="))]
    if "with" in kept:
        at = kept.index("with") + 1
        kept[at:at] = keys
    else:
        kept += ["with", *keys]
    return shlex.join(["python", argv[0], *kept])


def runs_command(save_folder: str) -> str:
    """The command that lists the runs of ``save_folder`` (:mod:`raug.report.runs`)."""
    return shlex.join(["python", "-m", "raug.report.runs", save_folder])


def end_message(run: Any, outcome: str, resume: str) -> str:
    """One line at the end of a run: its outcome, where its outputs are, what to type next.

    ``outcome``: ``COMPLETED``, ``FAILED`` or ``INTERRUPTED``. The resume command is given
    when a last checkpoint exists (or the run was interrupted: it then starts afresh).
    """
    folder = run.config["_save_folder"]
    last = Path(folder) / LAST_CHECKPOINT
    name = "the run" if run._id is None else f"run {run._id}"  # None: --unobserved
    line = f"{name} {outcome}; outputs in {folder}"
    if outcome == "INTERRUPTED":
        kept = f"the last checkpoint {last} is intact" if last.is_file() else "no checkpoint yet"
        return f"{line}; {kept}; continue with: {resume}"
    if outcome == "FAILED" and last.is_file():
        line += f"; once the cause is fixed, continue with: {resume}"
    return f"{line}; list the runs: {runs_command(folder)}"


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
        self.given_keys: frozenset[str] = frozenset()

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), info=None,
                    meta_info=None, options=None):
        # Sacred's internal hook shared by ``run`` and ``run_commandline``.
        config_updates = resolve_path_updates(config_updates, self.path_keys)
        # The keys the user set (command line or config_updates), for the config hooks: Sacred
        # does not tell them apart from defaults (a default teacher is checked more strictly).
        self.given_keys = frozenset(config_updates or ())
        if get_rank() != 0:
            options = worker_options(options)
        with sacred_errors():  # the config hooks' refusals print one line
            run = super()._create_run(command_name, config_updates, named_configs, info,
                                      meta_info, options)
        # Values from a named config file bypass config_updates: fix the recorded config too.
        run.config.update(resolve_path_updates(run.config, self.path_keys))
        folder = run.config.get("_save_folder")
        is_main_command = run.meta_info.get("command") == self.default_command
        run.raug_announce = is_main_command and get_rank() == 0 and isinstance(folder, str) and bool(folder)
        if run.raug_announce:
            with sacred_errors():
                check_mongo_observer(options)
                run.raug_lock = lock_save_folder(folder)
        return run

    method: Method | None = None

    def train(self, _run: Any, config: Mapping[str, Any]) -> dict[str, float]:
        """Run the experiment's method (:func:`raug.run.runner.run_training`): the scripts' main.

        The config hook validated the config with the method's checks before the run
        folder existed, so the runner does not repeat them.
        """
        if self.method is None:
            raise RuntimeError(f"experiment {self.path!r} was made without a method")
        return run_training(_run, config, self.method, validated=True)

    command_line: list[str] | None = None

    def run(self, command_name=None, config_updates=None, named_configs=(), info=None,
            meta_info=None, options=None):
        """Sacred's ``run``, releasing the ``_save_folder`` lock when the run ends.

        The main command logs its save folder with the resume and list commands at the
        start, and one line with the outcome at the end.
        """
        run = self._create_run(command_name, config_updates, named_configs, info, meta_info,
                               options)
        announce = run.raug_announce
        resume = resume_command(self.command_line, run.config.get("_save_folder")) if announce else ""
        if announce:
            folder = run.config["_save_folder"]
            log.info("save folder %s; if interrupted, continue with: %s; list the runs: %s",
                     folder, resume, runs_command(folder))
        try:
            with sacred_errors():  # the runner's refusals and a full disk print one line
                run()
        except KeyboardInterrupt:
            if announce:
                log.warning("%s", end_message(run, "INTERRUPTED", resume))
            raise
        except BaseException:
            if announce:
                log.error("%s", end_message(run, "FAILED", resume))
            raise
        else:
            if announce:
                log.info("%s", end_message(run, "COMPLETED", resume))
        finally:
            lock = getattr(run, "raug_lock", None)
            if lock is not None:
                lock.release()
        return run

    def run_commandline(self, argv=None):
        """Sacred's command line; SIGTERM interrupts like Ctrl-C, and neither prints a traceback.

        The run logged its INTERRUPTED line with the resume command (:meth:`run`); the
        process exits with 128 + the signal number, as a shell reports a signal.
        """
        argv = ensure_wellformed_argv(argv)
        self.command_line = list(argv)
        with sigterm_interrupts():
            try:
                return super().run_commandline(argv)
            except KeyboardInterrupt as exc:
                sys.exit(128 + getattr(exc, "signum", signal.SIGINT))


def declared_keys(configurations: Iterable[Any], named_configs: Mapping[str, Any]) -> frozenset[str]:
    """Every top-level key an experiment declares, from its config scopes and named configs.

    Sacred's own check for added keys misses most of them once an experiment has more
    than one config scope (``_lr=-1`` simply joins the config), so the engine compares
    the config with this set itself.

    Args:
        configurations: the experiment's config scopes in order (``ex.configurations``:
            dicts, and functions such as :func:`raug.methods.kd_config.kd_paths`).
        named_configs: ``ex.named_configs`` (``quick`` and any other preset).
    """
    defaults, _ = chain_evaluate_config_scopes(list(configurations))
    keys = set(defaults)
    for named in named_configs.values():
        keys.update(named(preset=defaults))
    return frozenset(keys)


def command_keys(ex: Experiment, command_name: str) -> frozenset[str]:
    """Config keys a command takes as parameters (``save_config``'s ``config_filename``).

    Sacred fills a command's parameters that have defaults from the config, so
    ``save_config with config_filename=x.json`` puts that key in the config: it is declared
    for that command, not refused as unknown.
    """
    command = ex.commands.get(command_name)
    return frozenset(command.signature.kwargs) if command is not None else frozenset()


def quick_path_updates(config: Mapping[str, Any], path_keys: Iterable[str]) -> dict[str, str]:
    """For a ``quick`` run, its paths under ``results/`` moved to ``results/quick/``.

    Only default paths move (``_save_folder``, a KD script's default teacher; the caller
    leaves out the keys the user gave), so a smoke run neither writes into nor reads from
    the real runs' default folders.
    """
    if config.get("_quick") is not True:
        return {}
    updates = {}
    for key in path_keys:
        value = config.get(key)
        if isinstance(value, str) and value:
            moved = str(quick_results_path(value))
            if moved != value:
                updates[key] = moved
    return updates


def missing_weights_notes(config: Mapping[str, Any], model_key: str) -> list[str]:
    """One line when ``_pretrained=True`` needs ImageNet weights the hub cache lacks.

    Listed with a config's other problems, so an offline user learns of the download
    before fixing the rest; a valid run downloads them (:mod:`raug.run.pretrained`).
    """
    if not needs_imagenet_weights(config):
        return []
    try:
        path = models.imagenet_weights_path(config.get(model_key))
    except ValueError:  # unknown model: the key checks name it
        return []
    if path.is_file():
        return []
    return [f"_pretrained=True: the ImageNet weights of {model_key}={config[model_key]!r} are not "
            f"in the torch hub cache ({path}); a valid run downloads them from "
            f"{models.imagenet_weights_url(config[model_key])} (offline: copy the file there or "
            "set _pretrained=False)"]


def make_experiment(
    name: str,
    script_config: Mapping[str, Any],
    quick_overrides: Mapping[str, Any] | None = None,
    *,
    method: Method | None = None,
    save_name: str | None = None,
    path_keys: Iterable[str] = (),
    extra_checks: Iterable[Check] = (),
    file_checks: Iterable[FileCheck] = (),
    weights_key: str | None = None,
) -> RaugExperiment:
    """The Sacred experiment of one script, with the shared keys defined once.

    Args:
        name: experiment name (the ``script`` column of ``python -m raug.report.runs``).
        script_config: the script's own keys and defaults (may override shared ones).
        quick_overrides: script-specific additions to the ``quick`` named config.
        method: what the script trains (``ex.train(_run, _config)`` runs it); its
            ``checks`` validate the config here, once, before any run folder exists.
        save_name: default ``_save_folder`` is ``results/<save_name>_fold<_folder>``
            (default: ``name``).
        path_keys: further config keys holding paths to resolve against the repo root.
        extra_checks: further validation, ``config -> iterable of one-line problems``.
        file_checks: checks of files the run needs besides the data (the teacher),
            ``(config, warn) -> problems``; main command only, listed with the others.
        weights_key: the key naming the network that starts from ImageNet weights with
            ``_pretrained=True``; a valid run of the main command downloads them when missing.

    Every command refuses keys the experiment does not declare (``_lr=-1`` names
    ``_lr_init``), before any run folder exists; Sacred itself would let them pass. The
    main command also checks the data, ``file_checks`` and the save folder, and reports
    every problem of the config in one error; Sacred's inspection commands
    (``print_config``, ``print_named_configs``, ``print_dependencies``, ``save_config``)
    look at no file, so they work offline and before the data or the teacher exist.

    Returns:
        The experiment; the script adds ``@ex.automain``.
    """
    path_keys = ("_base_path", "_save_folder", *path_keys)
    ex = RaugExperiment(name, path_keys=path_keys, save_git_info=False)
    ex.method = method
    _track_script_sources(ex, sys._getframe(1).f_globals)
    ex.add_config(dict(SHARED_CONFIG))
    ex.add_config(dict(script_config))
    ex.add_named_config("quick", {**QUICK_CONFIG, **dict(quick_overrides or {})})
    ex.captured_out_filter = ProgressBarFilter()
    checks = (*(method.checks if method else ()), *extra_checks)
    file_checks = tuple(file_checks)
    default_name = save_name or name

    def notes(config: Mapping[str, Any]) -> list[str]:
        return missing_weights_notes(config, weights_key) if weights_key else []

    @ex.config_hook
    def resolve_and_validate(config, command_name, logger):
        updates = {}
        if config.get("_save_folder") is None and "_folder" in config:
            updates["_save_folder"] = str(default_save_folder(default_name, config["_folder"]))
        for key in path_keys:
            value = updates.get(key, config.get(key))
            if isinstance(value, str) and value:
                updates[key] = str(resolve_repo_path(value))
        # Sacred would override the move of a value the user gave: leave those alone here too.
        defaults = [key for key in path_keys if key not in ex.given_keys]
        updates.update(quick_path_updates({**config, **updates}, defaults))
        merged = {**config, **updates}
        is_main = command_name == ex.default_command
        # Declared keys are gathered now, not at creation: scripts add config scopes
        # (kd_paths) and named configs after this function returns.
        known = declared_keys(ex.configurations, ex.named_configs) | command_keys(ex, command_name)
        validate_config(merged, checks, check_files=is_main, known_keys=known,
                        warn=logger.warning, file_checks=file_checks, notes=notes)
        if is_main:
            # Before any observer has created a run folder in it.
            check_save_folder(merged["_save_folder"], merged["_resume"])
        return updates

    if weights_key is not None:
        # After the validation hook: a download only starts for an otherwise valid run.
        add_imagenet_weights_hook(ex, weights_key)
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


