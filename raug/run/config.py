"""Config keys shared by every experiment script, the ``quick`` preset, and validation.

The shared keys are defined ONCE here (:data:`SHARED_CONFIG`); each script adds
its own keys through :func:`raug.run.experiment.make_experiment`. Relative paths
(``_base_path``, ``_save_folder`` and any key a script lists) resolve against
the repository root, not the working directory, so scripts run from anywhere.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from raug.data.loaders import TEST_CSV, TRAIN_CSV, fold_class_gaps
from raug.errors import ConfigError
from raug.files import runlock
from raug.files.paths import (
    COMPLETED_MARKER,
    REPO_ROOT,
    RESULTS_DIR,
)
from raug.methods.metadata import METADATA_DEFAULTS
from raug.train.device import AMP_CHOICES, amp_problem, check_device
from raug.train.distributed import get_rank
from raug.train.engine import VAL_METRICS
from raug.train.method import Check, Warn

# A check of the run's environment (files, caches), main command only: ``fn(config, warn)``.
FileCheck = Callable[[Mapping[str, Any], Warn | None], list[str]]
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"

SHARED_CONFIG: dict[str, Any] = {
    "_folder": 2,  # validation fold (1..5); training uses the other folds
    "_base_path": str(REPO_ROOT / "data" / "ISIC2019"),  # prepared data (run_preprocess.sh)
    "_batch_size": 128,  # images per batch PER PROCESS (torchrun: global batch = N x this)
    "_epochs": 150,
    "_lr_init": 1e-3,
    "_sched_factor": 0.1,  # ReduceLROnPlateau on the validation loss
    "_sched_patience": 10,
    "_sched_min_lr": 1e-6,
    "_early_stop": 15,  # epochs without improvement of _best_metric
    "_weights": "frequency",  # class weights w_k = round(n_total / n_k, 3)
    "_use_wce": True,  # False: unweighted cross-entropy
    "_best_metric": "loss",  # or accuracy / balanced_accuracy / auc (validation)
    "_pretrained": True,  # ImageNet backbone from the local torch hub cache
    # patient metadata fused with the image features (the seed's MetaBlock keys; they
    # describe the network the script trains, a KD student; docs/metadata.md)
    **METADATA_DEFAULTS,
    "_img_size": 224,
    "_device": "auto",  # auto / cpu / cuda / cuda:<i>
    # None (or "auto"): min(8, CPUs // processes on this node), see
    # raug.data.loaders.resolve_num_workers. None, not "auto", is the default: Sacred warns
    # about a type change when `_num_workers=4` replaces a string, not when it replaces None.
    "_num_workers": None,
    # auto: bf16 on sm_80+, fp16 (GradScaler) on sm_70/75, off on CPU; None / "off" / "bf16" / "fp16"
    "_amp": "auto",
    "_channels_last": True,
    "_compile": False,  # torch.compile (CUDA only)
    "_cudnn_benchmark": True,  # CUDA: torch.backends.cudnn.benchmark (no effect on CPU)
    "_tf32": True,  # CUDA: TF32 float32 matmuls/convolutions (set_float32_matmul_precision("high"))
    "_sync_every": 16,  # training loss parts reach the host every N steps (1 = every step)
    # training steps with a non-finite loss part skipped (warned) before the run stops; 0: none
    "_max_nonfinite_steps": 0,
    "_resume": False,  # continue from <_save_folder>/last-checkpoint
    "_sync_bn": False,  # torchrun on CUDA: SyncBatchNorm (BN statistics over the global batch)
    "_gather_embeddings": False,  # torchrun: relational KD terms over the global batch
    "_save_folder": None,  # None: results/<script default>_fold<_folder>
    # True (set by the named config quick): a smoke run; its default paths under results/
    # move to results/quick/ and a KD run does not take it as its default teacher
    "_quick": False,
    "seed": 2021,
}

QUICK_CONFIG: dict[str, Any] = {
    "_img_size": 64,
    "_epochs": 3,
    "_batch_size": 16,
    "_pretrained": False,
    "_num_workers": 0,
    "_sched_patience": 1,
    "_early_stop": 2,
    "_quick": True,
}

# Keys that may change when a run is resumed (everything else must match).
# _allow_split_mismatch (KD scripts) and _quick change no computation, and runs started
# before they existed have no value for them in their checkpoints: they must still resume.
RESUMABLE_CHANGES = frozenset(
    {"_epochs", "_early_stop", "_device", "_num_workers", "_amp", "_channels_last",
     "_compile", "_resume", "_base_path", "_save_folder", "_sync_bn", "_allow_split_mismatch",
     "_sync_every", "_cudnn_benchmark", "_tf32", "_quick", "_max_nonfinite_steps"}
)

# Sacred seeds numpy's legacy RandomState with the run seed, which accepts [0, 2**32 - 1] only.
SEED_MAX = 2**32 - 1

# Names users type for keys the seed named otherwise; matched like the keys themselves when
# suggesting the key meant by an unknown one (``_lerning_rate`` -> ``_lr_init``).
KEY_ALIASES: dict[str, str] = {"lr": "_lr_init", "learning_rate": "_lr_init", "fold": "_folder"}



def quick_results_path(path: str | os.PathLike) -> Path:
    """Where a ``quick`` run keeps what a real run keeps at ``path``: results/X -> results/quick/X.

    Smoke runs must not take the real runs' default folders: a quick teacher in
    ``results/isic_teacher_fold2`` was picked up as the KD scripts' default teacher and made
    the real teacher run into that folder refuse. Paths outside ``results/`` (or already under
    ``results/quick/``) are returned unchanged.
    """
    path = Path(path)
    if not path.is_relative_to(RESULTS_DIR) or path.is_relative_to(QUICK_RESULTS_DIR):
        return path
    return QUICK_RESULTS_DIR / path.relative_to(RESULTS_DIR)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def shared_checks(config: Mapping[str, Any]) -> list[str]:
    """One-line problems with the shared keys (no file access)."""
    problems: list[str] = []

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            problems.append(f"{key}={config.get(key)!r} is invalid: {allowed}")

    def integer(key: str, minimum: int, maximum: int | None = None) -> None:
        value = config.get(key)
        if maximum is None:
            need(_is_int(value) and value >= minimum, key, f"expected an integer >= {minimum}")
        else:
            need(_is_int(value) and minimum <= value <= maximum, key,
                 f"expected an integer in [{minimum}, {maximum}]")

    missing = [k for k in SHARED_CONFIG if k not in config]
    if missing:
        return [f"missing config key(s): {missing}"]
    integer("_folder", 1)
    integer("_batch_size", 2)
    integer("_epochs", 1)
    integer("_sched_patience", 0)
    integer("_early_stop", 1)
    workers = config["_num_workers"]
    need(workers is None or workers == "auto" or (_is_int(workers) and workers >= 0), "_num_workers",
         "expected 'auto' or an integer >= 0")
    integer("_sync_every", 1)
    integer("_max_nonfinite_steps", 0)
    integer("seed", 0, SEED_MAX)
    size = config["_img_size"]
    need(_is_int(size) and size > 0 and size % 32 == 0, "_img_size",
         "expected a positive multiple of 32 (the networks downsample by 32)")
    lr = config["_lr_init"]
    need(_is_number(lr) and lr > 0, "_lr_init", "expected a number > 0")
    factor = config["_sched_factor"]
    need(_is_number(factor) and 0 < factor < 1, "_sched_factor", "expected a number in (0, 1)")
    min_lr = config["_sched_min_lr"]
    need(_is_number(min_lr) and min_lr >= 0, "_sched_min_lr", "expected a number >= 0")
    need(config["_weights"] == "frequency", "_weights", "allowed: 'frequency'")
    need(config["_best_metric"] in VAL_METRICS, "_best_metric", f"allowed: {list(VAL_METRICS)}")
    need(config["_amp"] in AMP_CHOICES, "_amp", "allowed: 'auto', None, 'off', 'bf16', 'fp16'")
    for key in ("_use_wce", "_pretrained", "_use_meta_data", "_channels_last", "_compile", "_resume",
                "_sync_bn", "_gather_embeddings", "_cudnn_benchmark", "_tf32", "_quick"):
        need(isinstance(config[key], bool), key, "expected True or False")
    for key in ("_base_path", "_save_folder"):
        need(isinstance(config[key], str) and config[key] != "", key, "expected a path")
    device_problem = check_device(config["_device"])
    if device_problem:
        problems.append(device_problem)
    elif config["_amp"] in AMP_CHOICES:
        amp_issue = amp_problem(config["_amp"], config["_device"])  # bf16 on a pre-sm_80 GPU
        if amp_issue:
            problems.append(amp_issue)
    return problems


def data_checks(config: Mapping[str, Any], warn: Warn | None = None) -> list[str]:
    """Problems found in the prepared data: CSV presence, ``_folder`` among the folds, classes.

    Args:
        config: the run's config (shared keys valid, paths absolute).
        warn: called with one line per fact worth a warning that does not stop the run
            (a class absent from the validation fold; from the training folds with
            ``_use_wce=False``); ``None``: not reported.
    """
    base = Path(config["_base_path"])
    train_csv, test_csv = base / TRAIN_CSV, base / TEST_CSV
    problems = []
    for csv in (train_csv, test_csv):
        if not csv.is_file():
            problems.append(f"_base_path={str(base)!r}: {csv} not found (prepare the data with "
                            "run_preprocess.sh or pass _base_path=<prepared folder>)")
    if problems:
        return problems
    try:
        table = pd.read_csv(train_csv, usecols=["folder", "diagnostic"])
        folds = sorted(int(f) for f in table["folder"].unique())
    except ValueError as exc:
        return [f"{train_csv}: cannot read the 'folder' and 'diagnostic' columns ({exc})"]
    folder = config["_folder"]
    if folder not in folds:
        return [f"_folder={folder!r} is invalid: the folds in {train_csv} are {folds}"]
    no_train, no_val = fold_class_gaps(table, folder)
    notes = []
    if no_train:
        training = [f for f in folds if f != folder]
        fact = (f"_folder={folder}: the training folds {training} of {train_csv} hold no image "
                f"of class(es) {no_train}")
        if config.get("_use_wce") is False:
            notes.append(f"{fact}: the network never sees them in training")
        else:
            # class_weights() would divide by a zero count inside the run: say it here instead.
            problems.append(
                f"{fact}, so their frequency class weights are undefined; choose another "
                "_folder, prepare the data with every class in the training folds, or set "
                "_use_wce=False"
            )
    if no_val:
        notes.append(f"_folder={folder}: validation fold {folder} of {train_csv} holds no image "
                     f"of class(es) {no_val}: the validation metrics and the best epoch ignore them")
    for note in notes if warn else ():
        warn(note)
    return problems


def validate_config(
    config: Mapping[str, Any],
    extra_checks: Iterable[Check] = (),
    check_files: bool = True,
    *,
    known_keys: Collection[str] | None = None,
    warn: Warn | None = None,
    file_checks: Iterable[FileCheck] = (),
    notes: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> None:
    """Raise :class:`ConfigError` listing every problem, one line each.

    All stages run, so one error names every problem (keys, data, a script's files such
    as the teacher) instead of revealing the next one only after the first is fixed.

    Args:
        config: the run's config (paths already absolute).
        extra_checks: script-specific checks, each ``config -> iterable of problems``.
        check_files: also look at the prepared data and run ``file_checks`` (skipped for
            ``print_config`` and Sacred's other inspection commands).
        known_keys: the keys the script declares (:func:`declared_keys`); any other key
            of ``config`` is refused. ``None``: not checked.
        warn: receives the data checks' warnings (see :func:`data_checks`).
        file_checks: the script's checks of files outside the data (e.g. the teacher),
            each ``(config, warn) -> problems``; they must cope with invalid keys.
        notes: ``config -> lines`` added only when there are problems and ``check_files``
            (what would go wrong next, e.g. weights still to download); ``None``: none.
    """
    problems = [] if known_keys is None else unknown_key_problems(config, known_keys)
    problems.extend(shared_checks(config))
    for check in extra_checks:
        problems.extend(check(config))
    if check_files and isinstance(config.get("_base_path"), str) and _is_int(config.get("_folder")):
        problems.extend(data_checks(config, warn))
    for file_check in file_checks if check_files else ():
        problems.extend(file_check(config, warn))
    if problems and check_files and notes is not None:
        problems.extend(notes(config))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- unknown keys


def _bare(key: str) -> str:
    return key.lstrip("_").lower()


def closest_keys(key: str, known: Collection[str], limit: int = 3) -> list[str]:
    """The known keys a user most likely meant by ``key`` (possibly none).

    Leading underscores and case are ignored, and :data:`KEY_ALIASES` count as names
    of their keys. The keys that start with ``key`` win when there are at most
    ``limit`` of them (``_lr`` -> ``_lr_init``); otherwise the closest spelling by
    :func:`difflib.get_close_matches` (``_batchsize`` -> ``_batch_size``). A
    one-letter key is too short to be anyone's prefix (``_T`` is not ``_tf_T``).
    """
    names = {alias: target for alias, target in KEY_ALIASES.items() if target in known}
    names.update({_bare(k): k for k in known})
    bare = _bare(key)
    if not bare:
        return []
    starting = sorted({target for name, target in names.items() if name.startswith(bare)})
    if len(bare) > 1 and 0 < len(starting) <= limit:
        return starting
    return [names[name] for name in difflib.get_close_matches(bare, names, n=1, cutoff=0.6)]


def unknown_key_problems(config: Mapping[str, Any], known: Collection[str]) -> list[str]:
    """One line per key of ``config`` outside ``known``, naming the key(s) probably meant."""
    problems = []
    for key in sorted(set(config) - set(known)):
        guesses = closest_keys(key, known)
        hint = f"did you mean {' or '.join(guesses)}?" if guesses else "print_config lists the keys"
        problems.append(f"{key}={config[key]!r} is not a config key of this script; {hint}")
    return problems


def finished_run_markers(save_folder: str | os.PathLike) -> list[str]:
    """Files in ``save_folder`` that show a run already trained there."""
    folder = Path(save_folder)
    candidates = (
        "best-checkpoint/best-checkpoint.pth",
        "last-checkpoint/last-checkpoint.pth",
        COMPLETED_MARKER,
    )
    return [c for c in candidates if (folder / c).exists()]


def check_save_folder(save_folder: str | os.PathLike, resume: bool) -> None:
    """Refuse to start a new run over a finished one (nothing is touched).

    Raises:
        ConfigError: a live process holds the folder's lock (:mod:`raug.files.runlock`);
            ``resume=False`` and the folder holds checkpoints or a ``COMPLETED`` marker;
            or ``resume=True`` with markers but no last checkpoint.
    """
    # A live run first: "add _resume=True" would be wrong advice while another process writes.
    # Rank 0 alone holds a torchrun run's lock: the other ranks see it held and go on.
    if get_rank() == 0 and runlock.held_lock(Path(save_folder)) is None:
        who = runlock.holder(save_folder)
        if who is not None:
            raise folder_in_use_error(save_folder, who)
    found = finished_run_markers(save_folder)
    if not found:
        return
    if not resume:
        raise ConfigError(
            f"_save_folder={str(save_folder)!r} already holds a run ({', '.join(found)}); "
            "nothing was changed. To continue that run add `_resume=True`; to start a new "
            "one choose another folder with `_save_folder=<new folder>`."
        )
    if "last-checkpoint/last-checkpoint.pth" not in found:
        raise ConfigError(
            f"_resume=True but {save_folder}/last-checkpoint/last-checkpoint.pth does not exist "
            f"(found {', '.join(found)}); choose another `_save_folder=<new folder>`."
        )


def folder_in_use_error(save_folder: str | os.PathLike, who: runlock.LockHolder) -> ConfigError:
    """The one-line refusal of a run into a folder whose lock a live process holds."""
    return ConfigError(
        f"_save_folder={save_folder} is in use by a running run ({who.describe()}); "
        "wait for it to finish or choose another _save_folder=<new folder>"
    )


def resume_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose value differs between a checkpoint's config and the current one."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    )
