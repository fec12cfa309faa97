"""Config keys of the two distillation scripts, defined once, and their validation.

``isic_d_kd.py`` and ``isic_ssd_kd.py`` get the shared engine keys
(:data:`raug.run.config.SHARED_CONFIG`), then :data:`KD_SHARED_CONFIG`, then their
own block (:data:`DKD_CONFIG` / :data:`SSDKD_CONFIG`), then the config scope
:func:`kd_paths` (defaults that depend on other keys). The loss weights' keys and
defaults come from the weights classes (``kd_losses.weights``), the allowed
``_kd_method`` values, the adapter and the minimum batch from the method tables
(``kd_losses.methods``): :func:`family_checks` is the one check of a family. Every
problem is one line naming the key and the allowed values; the experiment's
config hook raises them before a run folder exists (``raug.run.kd_experiment``).
The keys are documented in ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import models
from kd_losses import DKD_FAMILY, SSD_KD_FAMILY, DKDWeights, SSDKDWeights
from kd_losses.methods import MIN_BATCH
from kd_losses.weights import config_defaults, weight_problems
from raug.data.loaders import CLASS_NAMES
from raug.files.paths import RESULTS_DIR, resolve_repo_path
from raug.isic2019 import DataError, split_hash
from raug.methods.metadata import metadata_problems
from raug.methods.teacher import (
    TeacherSummary,
    default_teacher_ckpt,
    inspect_teacher,
    split_findings,
    teacher_file_problems,
)
from raug.train.method import Warn

# The relational block's keys (_lambd_drkd, _lambd_crkd) are in both families' weights.
_RELATIONAL_KEYS = {k: v for k, v in config_defaults(DKDWeights).items()
                    if k in config_defaults(SSDKDWeights)}

# Keys both KD scripts share (the seed's names and defaults).
KD_SHARED_CONFIG: dict[str, Any] = {
    "_model_name_teacher": "resnet-50",
    "_model_name_student": "mobilenet",
    "_layer_s": "feats_7x7",  # the only supported layer: the last 1/32 stage
    "_layer_t": "feats_7x7",
    **_RELATIONAL_KEYS,  # RKD block: lambd_drkd * (25 distance + 50 angle); channel relation
    # True: accept a teacher trained on another preparation of the data (its split_hash
    # differs, so its training images may include this run's test images); warns only.
    "_allow_split_mismatch": False,
}

DKD_CONFIG: dict[str, Any] = {
    "_kd_method": "d_kd",  # a row of kd_losses.DKD_FAMILY: none / blkd / rkd / crkd / d_kd / fitnet
    # _lambd, _T, _lambd_fitnet: (1 - lambd) CE_w + lambd T^2 soft_kd; the fitnet hint's weight
    **{k: v for k, v in config_defaults(DKDWeights).items() if k not in _RELATIONAL_KEYS},
}

SSDKD_CONFIG: dict[str, Any] = {
    "_kd_method": "ssd_kd",
    "_batch_size": 32,  # images per batch (each becomes 4 views); the seed's value
    "_epochs_tune": 60,  # phase 1: teacher projection-head epochs
    "_teacher_head": None,  # None: <_save_folder>/teacher-head/teacher-head.pth
    # _kd_T, _tf_T, _ss_T, _ratio_tf, _ratio_ss, _hr_w (kd_losses.SSDKDWeights)
    **{k: v for k, v in config_defaults(SSDKDWeights).items() if k not in _RELATIONAL_KEYS},
}

# Additions to the engine's ``quick`` preset (64 px, no ImageNet weights, ...).
DKD_QUICK: dict[str, Any] = {"_epochs": 2, "_batch_size": 8}
SSDKD_QUICK: dict[str, Any] = {"_epochs": 2, "_epochs_tune": 2, "_batch_size": 4}

SUPPORTED_LAYER = "feats_7x7"
STUDENT_SAVE_PREFIX = "student"
# Each script trains one family; the other family's methods are named in its refusal.
FAMILIES = {"isic_d_kd.py": DKD_FAMILY, "isic_ssd_kd.py": SSD_KD_FAMILY}


def default_student_folder(kd_method: str, folder: int) -> str:
    """Default ``_save_folder`` of a KD run: ``results/student_<_kd_method>_fold<_folder>``."""
    return str(RESULTS_DIR / f"{STUDENT_SAVE_PREFIX}_{kd_method}_fold{folder}")


def kd_paths(_folder, _kd_method):
    """Sacred config scope: defaults that depend on other keys (no side effects).

    ``_teacher_ckpt``: the best checkpoint of isic.py's default run for ``_folder``;
    ``_save_folder``: ``results/student_<_kd_method>_fold<_folder>`` (one per method).
    A ``quick`` run's are moved under ``results/quick/`` (the engine's config hook).
    """
    _teacher_ckpt, _save_folder = (
        default_teacher_ckpt(_folder),
        default_student_folder(_kd_method, _folder),
    )


# ----------------------------------------------------------------------------- checks

Problems = list[str]


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
    allow = config.get("_allow_split_mismatch")
    if not isinstance(allow, bool):
        problems.append(f"_allow_split_mismatch={allow!r} is invalid: expected True or False")
    path = config.get("_teacher_ckpt")
    if not (isinstance(path, str) and path):
        problems.append(f"_teacher_ckpt={path!r} is invalid: expected a checkpoint path")
    # the metadata keys describe the student; the teacher's fusion is its checkpoint's
    problems.extend(metadata_problems(config, "_model_name_student"))
    return problems


def teacher_checks(
    config: Mapping[str, Any], warn: Warn | None = None, *, named: bool = True
) -> Problems:
    """Problems with the ``_teacher_ckpt`` file (none needed for ``_kd_method="none"``).

    The file itself (:func:`raug.methods.teacher.teacher_file_problems`), then the data
    it was trained on (:func:`teacher_split_problems`), then, for the default teacher, how
    it was trained (:func:`default_teacher_problems`). Runs alongside the key checks, so
    keys they refuse (``_teacher_ckpt``, ``_model_name_teacher``) leave the file unjudged.

    Args:
        config: the run's config.
        warn: receives one line per warning that does not stop the run; ``None``: dropped.
        named: whether the user named ``_teacher_ckpt``; ``False``: the default teacher.
    """
    path = config.get("_teacher_ckpt")
    if (config.get("_kd_method") == "none" or not (isinstance(path, str) and path)
            or _model_problem(config, "_model_name_teacher")):
        return []
    problems = teacher_file_problems(path, config["_model_name_teacher"], CLASS_NAMES)
    if problems:
        return problems
    problems = teacher_split_problems(config, warn)
    if not named:
        resolved = str(resolve_repo_path(path))
        problems += default_teacher_problems(config, resolved, inspect_teacher(resolved))
    return problems


def default_teacher_problems(
    config: Mapping[str, Any], path: str, summary: TeacherSummary
) -> Problems:
    """The default teacher must come from a real run at this run's ``_img_size`` (pure).

    The default path holds whatever isic.py's default run for the fold wrote: a smoke run
    (``quick``) or a run at another input size there is not the teacher a user means, and
    it used to be taken silently (a size mismatch only warned). A quick KD run accepts a
    quick teacher (its default is the quick teacher's folder). Naming the file with
    ``_teacher_ckpt`` accepts it as it is.
    """
    anyway = f"or name it with _teacher_ckpt={path} to use it anyway"
    problems = []
    if summary.quick is True and config.get("_quick") is not True:
        problems.append(
            f"_teacher_ckpt={path!r} (the default teacher) was trained by a quick smoke run: "
            f"train the teacher (python experiment/isic/isic.py with _folder={config.get('_folder')}) "
            f"{anyway}"
        )
    size = config.get("_img_size")
    if summary.img_size is not None and summary.img_size != size:
        problems.append(
            f"_teacher_ckpt={path!r} (the default teacher) was trained at {summary.img_size} px "
            f"but this run uses _img_size={size!r}: set _img_size={summary.img_size}, train a "
            f"teacher at {size} px, {anyway}"
        )
    return problems


def teacher_split_problems(config: Mapping[str, Any], warn: Warn | None = None) -> Problems:
    """A teacher trained on another preparation than ``_base_path``'s is refused.

    Compares the teacher's recorded ``split_hash`` with the hash of the prepared CSVs
    (:func:`raug.methods.teacher.split_findings`: the rules, the override
    ``_allow_split_mismatch``). Data without CSVs or an invalid ``_base_path``: nothing to
    compare (the data and key checks report them).
    """
    if not isinstance(config.get("_base_path"), str):
        return []
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


def family_checks(script: str, config: Mapping[str, Any]) -> Problems:
    """Problems with the keys of a KD script's config (the teacher file: :func:`teacher_checks`).

    From the method table of the script's family (``kd_losses.methods``): the allowed
    ``_kd_method`` values, the weights' keys and ranges (``kd_losses.weights``), and the
    method's minimum ``_batch_size`` for the configured weights.
    """
    family = FAMILIES[script]
    problems = kd_shared_checks(config)
    method = config.get("_kd_method")
    if method not in family:
        others = [name for name, rows in FAMILIES.items() if name != script and method in rows]
        where = f" for {script}" if others else ""
        runs = f" (it runs with {others[0]})" if others else ""
        problems.append(f"_kd_method={method!r} is invalid{where}: allowed {list(family)}{runs}")
    row = family.get(method)
    weight_class = next(iter(family.values())).weights_class
    weight_issues = weight_problems(weight_class, config)
    problems += weight_issues
    batch = config.get("_batch_size")
    if row is not None and not weight_issues and isinstance(batch, int):
        minimum = row.min_batch(weight_class.from_config(config))
        # below MIN_BATCH: the engine's shared _batch_size rule names the problem already
        if MIN_BATCH <= batch < minimum:
            problems.append(
                f"_batch_size={batch!r} is invalid for _kd_method={method!r}: the RKD angle "
                f"needs >= {minimum} samples per batch"
            )
    return problems


def dkd_checks(config: Mapping[str, Any]) -> Problems:
    """Problems with the keys of an ``isic_d_kd.py`` config."""
    return family_checks("isic_d_kd.py", config)


def ssdkd_checks(config: Mapping[str, Any]) -> Problems:
    """Problems with the keys of an ``isic_ssd_kd.py`` config (besides ``_kd_method``'s table)."""
    problems = family_checks("isic_ssd_kd.py", config)
    tune = config.get("_epochs_tune")
    if not (isinstance(tune, int) and not isinstance(tune, bool) and tune >= 1):
        problems.append(f"_epochs_tune={tune!r} is invalid: expected an integer >= 1")
    head = config.get("_teacher_head")
    if head is not None and not (isinstance(head, str) and head):
        problems.append(f"_teacher_head={head!r} is invalid: expected None or a file path")
    return problems
