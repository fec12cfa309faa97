"""Config keys of the two distillation scripts, defined once, and their validation.

``isic_d_kd.py`` and ``isic_ssd_kd.py`` get the shared engine keys
(:data:`raug.config.SHARED_CONFIG`), then :data:`KD_SHARED_CONFIG`, then their
own block (:data:`DKD_CONFIG` / :data:`SSDKD_CONFIG`), then the config scope
:func:`kd_paths` (defaults that depend on other keys). Validation extends the
engine's config hook through ``extra_checks``: every problem is one line naming
the key and the allowed values, raised before Sacred creates a run folder.
The keys are documented in ``docs/methods.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sacred import Experiment

import models
from kd_losses import KD_METHODS
from raug.config import RESULTS_DIR, ConfigError, Warn, resolve_repo_path
from raug.data import CLASS_NAMES
from raug.experiment import make_experiment
from raug.isic2019 import DataError, split_hash
from raug.methods.teacher import (
    default_teacher_ckpt,
    inspect_teacher,
    split_findings,
    teacher_file_problems,
)
from raug.pretrained import add_imagenet_weights_hook

# Keys both KD scripts share (the seed's names and defaults).
KD_SHARED_CONFIG: dict[str, Any] = {
    "_model_name_teacher": "resnet-50",
    "_model_name_student": "mobilenet",
    "_layer_s": "feats_7x7",  # the only supported layer: the last 1/32 stage
    "_layer_t": "feats_7x7",
    "_lambd_drkd": 1.0,  # RKD block: lambd_drkd * (25 distance + 50 angle)
    "_lambd_crkd": 1000.0,  # channel relation
    # True: accept a teacher trained on another preparation of the data (its split_hash
    # differs, so its training images may include this run's test images); warns only.
    "_allow_split_mismatch": False,
}

DKD_CONFIG: dict[str, Any] = {
    "_kd_method": "d_kd",  # none / blkd / rkd / crkd / d_kd / fitnet
    "_lambd": 0.5,  # (1 - lambd) CE_w + lambd T^2 soft_kd
    "_T": 5.0,
    "_lambd_fitnet": 1.0,  # hint weight of _kd_method="fitnet"
}

SSDKD_CONFIG: dict[str, Any] = {
    "_kd_method": "ssd_kd",
    "_batch_size": 32,  # images per batch (each becomes 4 views); the seed's value
    "_epochs_tune": 60,  # phase 1: teacher projection-head epochs
    "_teacher_head": None,  # None: <_save_folder>/teacher-head/teacher-head.pth
    "_kd_T": 4.0,
    "_tf_T": 4.0,
    "_ss_T": 0.5,
    "_ratio_tf": 1.0,
    "_ratio_ss": 0.75,
    "_hr_w": 1.0,
}

# Additions to the engine's ``quick`` preset (64 px, no ImageNet weights, ...).
DKD_QUICK: dict[str, Any] = {"_epochs": 2, "_batch_size": 8}
SSDKD_QUICK: dict[str, Any] = {"_epochs": 2, "_epochs_tune": 2, "_batch_size": 4}

SUPPORTED_LAYER = "feats_7x7"
RKD_MIN_BATCH = 3  # RKD angle compares triplets of samples
SSD_KD_METHOD = "ssd_kd"
STUDENT_SAVE_PREFIX = "student"


def default_student_folder(kd_method: str, folder: int) -> str:
    """Default ``_save_folder`` of a KD run: ``results/student_<_kd_method>_fold<_folder>``."""
    return str(RESULTS_DIR / f"{STUDENT_SAVE_PREFIX}_{kd_method}_fold{folder}")


def kd_paths(_folder, _kd_method):
    """Sacred config scope: defaults that depend on other keys (no side effects).

    ``_teacher_ckpt``: the best checkpoint of isic.py's default run for ``_folder``;
    ``_save_folder``: ``results/student_<_kd_method>_fold<_folder>`` (one per method).
    """
    _teacher_ckpt, _save_folder = (
        default_teacher_ckpt(_folder),
        default_student_folder(_kd_method, _folder),
    )


# ----------------------------------------------------------------------------- checks

Problems = list[str]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _need_number(
    config: Mapping[str, Any], key: str, problems: Problems, *, positive: bool = False,
    maximum: float | None = None,
) -> None:
    """Append a problem unless ``config[key]`` is a number >= 0 (> 0 / <= maximum if asked)."""
    value = config.get(key)
    ok = _is_number(value) and (value > 0 if positive else value >= 0)
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if maximum is not None:
            allowed = f"a number in [0, {maximum:g}]"
        else:
            allowed = "a number > 0" if positive else "a number >= 0"
        problems.append(f"{key}={value!r} is invalid: expected {allowed}")


def _model_problem(config: Mapping[str, Any], key: str) -> str | None:
    try:
        models.canonical_name(config.get(key))
    except ValueError as exc:
        return f"{key}={config.get(key)!r} is invalid: {exc}"
    return None


def kd_shared_checks(config: Mapping[str, Any]) -> Problems:
    """Problems with :data:`KD_SHARED_CONFIG` keys (no file access)."""
    problems: Problems = []
    for key in ("_model_name_teacher", "_model_name_student"):
        problem = _model_problem(config, key)
        if problem:
            problems.append(problem)
    for key in ("_layer_s", "_layer_t"):
        if config.get(key) != SUPPORTED_LAYER:
            problems.append(
                f"{key}={config.get(key)!r} is invalid: only {SUPPORTED_LAYER!r} (the last "
                "1/32 feature map) is supported"
            )
    for key in ("_lambd_drkd", "_lambd_crkd"):
        _need_number(config, key, problems)
    allow = config.get("_allow_split_mismatch")
    if not isinstance(allow, bool):
        problems.append(f"_allow_split_mismatch={allow!r} is invalid: expected True or False")
    path = config.get("_teacher_ckpt")
    if not (isinstance(path, str) and path):
        problems.append(f"_teacher_ckpt={path!r} is invalid: expected a checkpoint path")
    return problems


def teacher_checks(config: Mapping[str, Any], warn: Warn | None = None) -> Problems:
    """Problems with the ``_teacher_ckpt`` file (none needed for ``_kd_method="none"``).

    The file itself (:func:`raug.methods.teacher.teacher_file_problems`), then the data
    it was trained on (:func:`teacher_split_problems`).

    Args:
        config: the run's config (keys valid).
        warn: receives one line per warning that does not stop the run; ``None``: dropped.
    """
    if config.get("_kd_method") == "none":
        return []
    problems = teacher_file_problems(
        config["_teacher_ckpt"], config["_model_name_teacher"], CLASS_NAMES
    )
    return problems or teacher_split_problems(config, warn)


def teacher_split_problems(config: Mapping[str, Any], warn: Warn | None = None) -> Problems:
    """A teacher trained on another preparation than ``_base_path``'s is refused.

    Compares the teacher's recorded ``split_hash`` with the hash of the prepared CSVs
    (:func:`raug.methods.teacher.split_findings`: the rules, the override
    ``_allow_split_mismatch``). Data without CSVs: nothing to compare (the data checks
    report them).
    """
    try:
        data_hash = split_hash(resolve_repo_path(config["_base_path"]))
    except DataError:
        return []
    path = str(resolve_repo_path(config["_teacher_ckpt"]))
    problems, warnings = split_findings(
        path, inspect_teacher(path).split_hash, data_hash,
        allow_mismatch=config.get("_allow_split_mismatch") is True,
    )
    for line in warnings if warn else ():
        warn(line)
    return problems


def uses_rkd(config: Mapping[str, Any]) -> bool:
    """Whether a D-KD config activates the RKD distance/angle terms."""
    return config.get("_kd_method") in ("rkd", "d_kd") and config.get("_lambd_drkd") != 0


def dkd_checks(config: Mapping[str, Any]) -> Problems:
    """Problems with the keys of an ``isic_d_kd.py`` config (the teacher file: :func:`teacher_checks`)."""
    problems = kd_shared_checks(config)
    method = config.get("_kd_method")
    if method not in KD_METHODS:
        problems.append(f"_kd_method={method!r} is invalid: allowed {list(KD_METHODS)}")
    _need_number(config, "_lambd", problems, maximum=1.0)
    _need_number(config, "_T", problems, positive=True)
    _need_number(config, "_lambd_fitnet", problems)
    batch = config.get("_batch_size")
    if uses_rkd(config) and isinstance(batch, int) and batch < RKD_MIN_BATCH:
        problems.append(
            f"_batch_size={batch!r} is invalid for _kd_method={method!r}: the RKD angle needs "
            f">= {RKD_MIN_BATCH} samples per batch"
        )
    return problems


def ssdkd_checks(config: Mapping[str, Any]) -> Problems:
    """Problems with the keys of an ``isic_ssd_kd.py`` config (the teacher file: :func:`teacher_checks`)."""
    problems = kd_shared_checks(config)
    method = config.get("_kd_method")
    if method != SSD_KD_METHOD:
        problems.append(
            f"_kd_method={method!r} is invalid for isic_ssd_kd.py: allowed [{SSD_KD_METHOD!r}] "
            "(the D-KD ablations run with isic_d_kd.py)"
        )
    for key in ("_kd_T", "_tf_T", "_ss_T"):
        _need_number(config, key, problems, positive=True)
    for key in ("_ratio_tf", "_ratio_ss"):
        _need_number(config, key, problems, maximum=1.0)
    _need_number(config, "_hr_w", problems)
    tune = config.get("_epochs_tune")
    if not (isinstance(tune, int) and not isinstance(tune, bool) and tune >= 1):
        problems.append(f"_epochs_tune={tune!r} is invalid: expected an integer >= 1")
    head = config.get("_teacher_head")
    if head is not None and not (isinstance(head, str) and head):
        problems.append(f"_teacher_head={head!r} is invalid: expected None or a file path")
    # _batch_size >= 2 images (each rotated view is matched among them): shared check.
    return problems


# ----------------------------------------------------------------------------- experiment


def make_kd_experiment(
    name: str,
    method_config: Mapping[str, Any],
    quick_overrides: Mapping[str, Any],
    checks: Iterable[Callable[[Mapping[str, Any]], Iterable[str]]],
) -> Experiment:
    """The Sacred experiment of a KD script: engine keys + KD keys + method keys + defaults.

    Validation: ``checks`` (the keys) extend the engine's config hook; a second
    hook then checks the teacher file (:func:`teacher_checks`) for the main
    command only, like the engine's data checks, so ``print_config`` works
    before a teacher exists; a third one fetches the student's ImageNet weights
    for ``_pretrained=True`` (:mod:`raug.pretrained`, main command only). All
    run before any run folder is created.

    Args:
        name: experiment name.
        method_config: :data:`DKD_CONFIG` or :data:`SSDKD_CONFIG`.
        quick_overrides: :data:`DKD_QUICK` or :data:`SSDKD_QUICK`.
        checks: the script's key checks (e.g. ``[dkd_checks]``).
    """
    ex = make_experiment(
        name,
        {**KD_SHARED_CONFIG, **dict(method_config)},
        quick_overrides,
        path_keys=("_teacher_ckpt", "_teacher_head"),
        extra_checks=checks,
    )
    ex.config(kd_paths)

    @ex.config_hook
    def check_teacher_file(config, command_name, logger):
        # Sacred runs the hooks in order: the engine's (keys, data, save folder)
        # has passed when this one runs, so the keys used here are valid.
        if command_name == ex.default_command:
            problems = teacher_checks(config, warn=logger.warning)
            if problems:
                raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return {}

    # Last: a download only starts once everything else about the run is valid.
    add_imagenet_weights_hook(ex, "_model_name_student")
    return ex
