"""The Sacred experiment of a KD script: engine keys + KD keys + method keys + defaults.

``isic_d_kd.py`` and ``isic_ssd_kd.py`` are each one call of :func:`make_kd_experiment`
with their method (:data:`raug.methods.dkd.DKD_METHOD`, :data:`raug.methods.ssdkd.SSD_KD_METHOD`);
the keys and their checks are in :mod:`raug.methods.kd_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raug.methods.kd_config import KD_SHARED_CONFIG, kd_paths, teacher_checks
from raug.run.experiment import RaugExperiment, make_experiment
from raug.train.method import Method, Warn


def make_kd_experiment(
    name: str,
    method_config: Mapping[str, Any],
    quick_overrides: Mapping[str, Any],
    method: Method,
) -> RaugExperiment:
    """The Sacred experiment of a KD script.

    Validation, all before any run folder is created, in the engine's config hook: the
    method's checks (the keys) and, for the main command only, like the engine's data
    checks, the teacher file (:func:`raug.methods.kd_config.teacher_checks`), so
    ``print_config`` works before a teacher exists; every problem is reported at once.
    A teacher the user did not name (the default of ``_folder``) must also be a real run
    at this ``_img_size``. A second hook fetches the student's ImageNet weights for
    ``_pretrained=True`` (:mod:`raug.run.pretrained`, main command only).

    Args:
        name: experiment name.
        method_config: :data:`~raug.methods.kd_config.DKD_CONFIG` or ``SSDKD_CONFIG``.
        quick_overrides: :data:`~raug.methods.kd_config.DKD_QUICK` or ``SSDKD_QUICK``.
        method: what the script trains (its ``checks`` validate the keys).
    """

    def check_teacher(config: Mapping[str, Any], warn: Warn | None) -> list[str]:
        # ex is bound below, before Sacred runs any hook.
        return teacher_checks(config, warn, named="_teacher_ckpt" in ex.given_keys)

    ex = make_experiment(
        name,
        {**KD_SHARED_CONFIG, **dict(method_config)},
        quick_overrides,
        method=method,
        path_keys=("_teacher_ckpt", "_teacher_head"),
        file_checks=(check_teacher,),
        weights_key="_model_name_student",
    )
    ex.config(kd_paths)
    return ex
